//! PostService: posts, their pages, optimistic updates, and the events comments and
//! notifications follow. Also the consumer that deletes a user's posts when UserService
//! reports the user deleted.
//!
//! Not for: comments (their service follows `PostDeleted`), authenticating requests (the mesh
//! server stack puts the verified end user into the request), or author profiles.
//!
//! # Constructing it
//!
//! ```no_run
//! # async fn f(users: tessera_client::Channel) -> Result<(), tessera_posts::Error> {
//! use tessera::{
//!     posts::v1::post_service_server::PostServiceServer,
//!     users::v1::user_service_client::UserServiceClient,
//! };
//! use tessera_posts::Posts;
//!
//! // A SQLite path, or a postgres:// URL; migrations run here.
//! // Moderators' roles are confirmed with UserService (their tokens may be stale).
//! let posts = Posts::open("/var/lib/tessera/posts.db")
//!     .await?
//!     .with_users(UserServiceClient::new(users.clone()));
//! let service = PostServiceServer::new(posts.clone());
//!
//! // UserDeleted -> delete that user's posts. Runs until `shutdown` turns true.
//! let (stop, shutdown) = tokio::sync::watch::channel(false);
//! tokio::spawn(tessera_posts::follow_user_events(posts.clone(), users, shutdown));
//! # Ok(()) }
//! ```
//!
//! [`Posts::with_db`] takes an already opened [`tessera_store::Db`] and runs [`MIGRATIONS`].
//!
//! # Behaviour
//!
//! - The author of a new post is the verified end user; a `request_id` makes a retried
//!   CreatePost return the first post (per author).
//! - ListPosts pages newest first with an opaque keyset token (create time and id), so pages
//!   stay correct while posts are added; a token only fits the `author_id` it was issued for.
//! - UpdatePost and DeletePost: the author, a MODERATOR or an ADMIN; a moderator's role is
//!   the one UserService stores now (GetUser), not the token's. Updates need the current
//!   `etag` (stale gives ABORTED) and produce a new one.
//! - DeletePost and the user-deletion cascade append `PostDeleted` in the same transaction,
//!   so comments cascade in turn. After a `UserDeleted`, that user can no longer post
//!   (FAILED_PRECONDITION), even with a token issued before the deletion.

#![forbid(unsafe_code)]

mod consumers;
mod error;
mod service;

use tessera_store::Migration;

pub use consumers::{USER_EVENTS_CURSOR, follow_user_events};
pub use error::Error;
pub use service::Posts;

/// The service's schema. Passed to `Db::open` by [`Posts::open`]; exposed for tools.
pub const MIGRATIONS: &[Migration] = &[Migration::portable(
    "posts",
    "CREATE TABLE posts (
        post_id TEXT PRIMARY KEY,
        author_id TEXT NOT NULL,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        tags TEXT NOT NULL,
        create_time BIGINT NOT NULL,
        update_time BIGINT NOT NULL,
        etag TEXT NOT NULL
    );
    CREATE INDEX posts_by_time ON posts (create_time, post_id);
    CREATE INDEX posts_by_author ON posts (author_id, create_time, post_id);
    CREATE TABLE create_requests (
        author_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        post_id TEXT NOT NULL,
        PRIMARY KEY (author_id, request_id)
    );
    CREATE TABLE deleted_authors (
        author_id TEXT PRIMARY KEY,
        delete_time BIGINT NOT NULL
    );",
)];
