//! Tessera's comment service: comments on posts.
//!
//! [`Comments`] implements `tessera.comments.v1.CommentService` over its own database
//! (SQLite or PostgreSQL through `tessera-store`). Creating a comment checks the post with
//! PostService.GetPost and is idempotent per author and `request_id`; every create and
//! delete appends a CommentCreated / CommentDeleted event to the outbox in the same
//! transaction, which `WatchEvents` streams (notifications follows it). [`follow_post_events`]
//! and [`follow_user_events`] are the consumers that delete the comments of deleted posts and
//! deleted users, exactly once each.
//!
//! Not for: anything about posts or users beyond those ids (their services own them), or
//! notifying anyone (the notification service reacts to this service's events).
//!
//! # Wiring it
//!
//! ```no_run
//! # async fn f(
//! #     posts: tessera_client::Channel,
//! #     users: tessera_client::Channel,
//! #     shutdown: tokio::sync::watch::Receiver<bool>,
//! # ) -> Result<(), tessera_comments::Error> {
//! use tessera::{
//!     comments::v1::comment_service_server::CommentServiceServer,
//!     posts::v1::post_service_client::PostServiceClient,
//!     users::v1::user_service_client::UserServiceClient,
//! };
//! use tessera_comments::{Comments, follow_post_events, follow_user_events};
//!
//! // A SQLite path, or a postgres:// URL; migrations run here.
//! // Moderators' roles are confirmed with UserService (their tokens may be stale).
//! let comments = Comments::open("/var/lib/tessera/comments.db", PostServiceClient::new(posts.clone()))
//!     .await?
//!     .with_users(UserServiceClient::new(users.clone()));
//! tokio::spawn(follow_post_events(comments.clone(), posts, shutdown.clone()));
//! tokio::spawn(follow_user_events(comments.clone(), users, shutdown));
//! let service = CommentServiceServer::new(comments);
//! # Ok(()) }
//! ```
//!
//! # Behaviour worth knowing
//!
//! - Bodies are 1..=10000 characters (Unicode scalar values), not blank, without NUL.
//! - ListComments does not ask posts whether the post exists: an unknown post lists empty.
//!   Page sizes: 0 means 20, above 100 is capped to 100, negative is INVALID_ARGUMENT.
//!   Page tokens are bound to their post.
//! - DeleteComment: the comment's author, the post's author, or a MODERATOR or ADMIN as
//!   UserService stores the role now (GetUser), not as the token says. A comment that is gone
//!   is NOT_FOUND (also for a retry after success).
//! - Deleted posts and users leave tombstones, so a CreateComment racing with their events
//!   gets NOT_FOUND (post) or UNAUTHENTICATED (a token that outlived its user) instead of
//!   leaving an orphan. Cascades emit one CommentDeleted per removed comment.

#![forbid(unsafe_code)]

mod consumers;
mod error;
mod service;

use tessera_store::Migration;

pub use consumers::{
    POST_EVENTS_CURSOR, USER_EVENTS_CURSOR, follow_post_events, follow_user_events,
};
pub use error::Error;
pub use service::{Comments, DEFAULT_PAGE_SIZE, MAX_BODY_CHARS, MAX_PAGE_SIZE};

/// The comment service's schema, in order. Never edit a released entry: append.
pub const MIGRATIONS: &[Migration] = &[Migration::portable(
    "comments",
    "CREATE TABLE comments (
        comment_id TEXT PRIMARY KEY,
        post_id TEXT NOT NULL,
        author_id TEXT NOT NULL,
        post_author_id TEXT NOT NULL,
        body TEXT NOT NULL,
        create_time BIGINT NOT NULL,
        request_id TEXT
    );
    CREATE INDEX comments_by_post ON comments (post_id, create_time, comment_id);
    CREATE INDEX comments_by_author ON comments (author_id);
    CREATE UNIQUE INDEX comments_by_request ON comments (author_id, request_id);
    CREATE TABLE deleted_posts (post_id TEXT PRIMARY KEY, delete_time BIGINT NOT NULL);
    CREATE TABLE deleted_users (user_id TEXT PRIMARY KEY, delete_time BIGINT NOT NULL);",
)];
