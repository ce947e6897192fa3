//! DigestService: the example of a service another team adds to the Tessera mesh. A user
//! follows authors (FollowAuthor) and reads a digest (GetDigest): the newest posts of those
//! authors, as PostService serves them now, and their count of unread notifications.
//!
//! It is written only against the platform crates: the contract lives in
//! `proto/tessera/digest/v1/digest.proto` with its access rules in the mesh options,
//! [`tessera_store`] keeps its data and its cursor on posts' `WatchEvents`
//! ([`follow_post_events`]), and [`tessera_client`] stubs call PostService and
//! NotificationService with the end user's token carried along. The mesh server
//! (`tessera_mesh::server::Workload`) around it does identity, access rules, deadlines and
//! load shedding, so the handlers below only validate and do the work.
//!
//! Not for: anything the five services already do; it keeps no posts of its own beyond the ids,
//! authors and times it needs to order a digest.
//!
//! # Constructing it
//!
//! ```no_run
//! # async fn f(clients: tessera_client::Clients) -> Result<(), tessera_example_digest::Error> {
//! use tessera::digest::v1::digest_service_server::DigestServiceServer;
//! use tessera_example_digest::Digest;
//!
//! let digest = Digest::open("/var/lib/tessera/digest.db", clients.posts(), clients.notifications())
//!     .await?;
//! let (_stop, shutdown) = tokio::sync::watch::channel(false);
//! tokio::spawn(tessera_example_digest::follow_post_events(digest.clone(), clients.channel("posts"), shutdown));
//! let service = DigestServiceServer::new(digest);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod consumers;
mod error;
mod service;

use tessera_store::Migration;

pub use consumers::{POST_EVENTS_CURSOR, follow_post_events};
pub use error::Error;
pub use service::Digest;

/// The service's schema. Passed to `Db::open` by [`Digest::open`].
pub const MIGRATIONS: &[Migration] = &[Migration::portable(
    "digest",
    "CREATE TABLE follows (
        user_id TEXT NOT NULL,
        author_id TEXT NOT NULL,
        PRIMARY KEY (user_id, author_id)
    );
    CREATE TABLE digest_posts (
        post_id TEXT PRIMARY KEY,
        author_id TEXT NOT NULL,
        create_time BIGINT NOT NULL
    );
    CREATE INDEX digest_posts_by_author ON digest_posts (author_id, create_time, post_id);",
)];
