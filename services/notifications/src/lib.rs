//! Tessera's notification service: tells post authors about new comments on their posts.
//!
//! [`Notifications`] implements `tessera.notifications.v1.NotificationService` over its own
//! database. Notifications are created only by [`follow_comment_events`], the consumer of
//! CommentService.WatchEvents, exactly once per comment (cursor and insert commit
//! together); [`follow_user_events`] removes a deleted user's notifications. ListNotifications
//! and MarkNotificationsRead serve the caller's own notifications; SubscribeNotifications
//! streams new ones live through per-user broadcast channels fed from this service's own
//! outbox, so a subscriber connected to any replica hears about notifications created by
//! any other (see the `hub` module).
//!
//! Not for: deciding what a comment or post is (their services own them) or sending
//! anything outside the mesh (no e-mail, no push).
//!
//! # Wiring it
//!
//! ```no_run
//! # async fn f(
//! #     comments: tessera_client::Channel,
//! #     users: tessera_client::Channel,
//! #     shutdown: tokio::sync::watch::Receiver<bool>,
//! # ) -> Result<(), tessera_notifications::Error> {
//! use tessera::notifications::v1::notification_service_server::NotificationServiceServer;
//! use tessera_notifications::{Notifications, follow_comment_events, follow_user_events};
//!
//! // A SQLite path, or a postgres:// URL; migrations run and the fan-out task starts here
//! // (it stops by itself when the last clone of `notifications` is dropped).
//! let notifications = Notifications::open("/var/lib/tessera/notifications.db").await?;
//! tokio::spawn(follow_comment_events(notifications.clone(), comments, shutdown.clone()));
//! tokio::spawn(follow_user_events(notifications.clone(), users, shutdown));
//! let service = NotificationServiceServer::new(notifications.clone());
//! // When draining: end the long-lived streams so they do not hold up shutdown.
//! notifications.close_subscriptions();
//! # Ok(()) }
//! ```
//!
//! # Behaviour worth knowing
//!
//! - A comment on one's own post notifies no one. A deleted comment takes its notification
//!   with it; a deleted user takes theirs and those they caused.
//! - ListNotifications: newest first; page sizes 0 → 20, capped at 100; page tokens are bound
//!   to the caller and the `unread_only` filter.
//! - MarkNotificationsRead is all or nothing: an unknown id is NOT_FOUND, another user's is
//!   PERMISSION_DENIED, and then nothing is marked. At most 1000 ids; duplicates are fine.
//! - A subscriber that falls 64 notifications behind gets ABORTED (list, then resubscribe)
//!   rather than a silent gap.
//! - Streams are bounded ([`SubscriptionLimits`], see the `limits` module): per user
//!   (RESOURCE_EXHAUSTED past it), per replica (UNAVAILABLE: try again, maybe elsewhere), and
//!   in lifetime (the stream ends with UNAVAILABLE, or UNAUTHENTICATED when the token it was
//!   opened with expires; list, then resubscribe).

#![forbid(unsafe_code)]

mod consumers;
mod error;
mod hub;
mod limits;
mod service;

use tessera_store::Migration;

pub use consumers::{
    COMMENT_EVENTS_CURSOR, USER_EVENTS_CURSOR, follow_comment_events, follow_user_events,
};
pub use error::Error;
pub use hub::Subscription;
pub use limits::{BoundedSubscription, SubscriptionLimits};
pub use service::{DEFAULT_PAGE_SIZE, MAX_MARK_IDS, MAX_PAGE_SIZE, Notifications};

/// The notification service's schema, in order. Never edit a released entry: append.
pub const MIGRATIONS: &[Migration] = &[Migration::portable(
    "notifications",
    "CREATE TABLE notifications (
        notification_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        post_id TEXT NOT NULL,
        comment_id TEXT NOT NULL UNIQUE,
        actor_id TEXT NOT NULL,
        -- 0 or 1: sqlx's Any driver cannot decode SQLite BOOLEAN columns.
        is_read BIGINT NOT NULL,
        create_time BIGINT NOT NULL
    );
    CREATE INDEX notifications_by_user ON notifications (user_id, create_time, notification_id);
    CREATE INDEX notifications_by_actor ON notifications (actor_id);
    CREATE TABLE deleted_users (user_id TEXT PRIMARY KEY, delete_time BIGINT NOT NULL);",
)];
