//! What notifications learns from other services' events.
//!
//! - CommentCreated: when the commenter is not the post's author, the post's author gets a
//!   notification. Inserted in the transaction that advances the cursor (and unique per
//!   comment besides), so a replayed event never notifies twice.
//! - CommentDeleted: the notification about that comment is removed — it would point at
//!   nothing, and a moderator deleting abuse should not leave it in the author's list.
//!   Comments emits CommentDeleted for cascades too (deleted posts and users), so those
//!   clean up the same way.
//! - UserDeleted: the user's notifications go, and so do those where they were the actor;
//!   a tombstone keeps a late CommentCreated (the comment stream may lag the user stream)
//!   from notifying a user who no longer exists.

use prost::Message;
use tessera::{
    comments::v1::{
        CommentCreated, WatchEventsResponse as CommentEvent, comment_service_server,
        watch_events_response::Event as CommentKind,
    },
    notifications::v1::Notification,
    users::v1::{
        WatchEventsResponse as UserEvent, user_service_server,
        watch_events_response::Event as UserKind,
    },
};
use tessera_client::Channel;
use tessera_store::{Apply, StoreError, Tx, follow, now_micros, timestamp};
use tokio::sync::watch;

use crate::{Notifications, hub::Delivery, service::UNREAD};

/// The cursor name of the comments consumer in the notifications database.
pub const COMMENT_EVENTS_CURSOR: &str = "comments-events";
/// The cursor name of the users consumer in the notifications database.
pub const USER_EVENTS_CURSOR: &str = "users-events";

/// Follows CommentService.WatchEvents until `shutdown` turns true.
pub async fn follow_comment_events(
    notifications: Notifications,
    comments: Channel,
    shutdown: watch::Receiver<bool>,
) {
    follow(
        notifications.db().clone(),
        comments,
        CommentEvents,
        shutdown,
    )
    .await;
}

/// Follows UserService.WatchEvents until `shutdown` turns true.
pub async fn follow_user_events(
    notifications: Notifications,
    users: Channel,
    shutdown: watch::Receiver<bool>,
) {
    follow(notifications.db().clone(), users, UserEvents, shutdown).await;
}

struct CommentEvents;

impl Apply for CommentEvents {
    const PRODUCER: &'static str = comment_service_server::SERVICE_NAME;
    const CURSOR: &'static str = COMMENT_EVENTS_CURSOR;
    type Event = CommentEvent;

    async fn apply(&self, tx: &mut Tx, event: CommentEvent) -> Result<(), StoreError> {
        match event.event {
            Some(CommentKind::CommentCreated(created)) => notify(tx, created).await,
            Some(CommentKind::CommentDeleted(deleted)) => {
                sqlx::query("DELETE FROM notifications WHERE comment_id = $1")
                    .bind(&deleted.comment_id)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

async fn notify(tx: &mut Tx, created: CommentCreated) -> Result<(), StoreError> {
    let Some(comment) = created.comment else {
        return Ok(());
    };
    let recipient = created.post_author_id;
    if recipient.is_empty() || recipient == comment.author_id {
        return Ok(());
    }
    let now = now_micros();
    let notification = Notification {
        notification_id: uuid::Uuid::now_v7().to_string(),
        post_id: comment.post_id,
        comment_id: comment.comment_id,
        actor_id: comment.author_id,
        read: false,
        create_time: Some(timestamp(now)),
    };
    // A deleted recipient gets nothing; checked in the insert itself (one statement per
    // event, not two: this loop is what a consumer's catch-up spends its time on).
    let inserted = sqlx::query(
        "INSERT INTO notifications \
         (notification_id, user_id, post_id, comment_id, actor_id, is_read, create_time) \
         SELECT $1, $2, $3, $4, $5, $6, $7 \
         WHERE NOT EXISTS (SELECT 1 FROM deleted_users WHERE user_id = $2) \
         ON CONFLICT (comment_id) DO NOTHING",
    )
    .bind(&notification.notification_id)
    .bind(&recipient)
    .bind(&notification.post_id)
    .bind(&notification.comment_id)
    .bind(&notification.actor_id)
    .bind(UNREAD)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        let delivery = Delivery {
            user_id: recipient,
            notification: Some(notification),
        };
        tx.append_event(&delivery.encode_to_vec()).await?;
    }
    Ok(())
}

struct UserEvents;

impl Apply for UserEvents {
    const PRODUCER: &'static str = user_service_server::SERVICE_NAME;
    const CURSOR: &'static str = USER_EVENTS_CURSOR;
    type Event = UserEvent;

    // Only a deletion removes notifications: other user events cost no transaction.
    fn wants(&self, event: &UserEvent) -> bool {
        matches!(event.event, Some(UserKind::UserDeleted(_)))
    }

    async fn apply(&self, tx: &mut Tx, event: UserEvent) -> Result<(), StoreError> {
        let Some(UserKind::UserDeleted(deleted)) = event.event else {
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO deleted_users (user_id, delete_time) VALUES ($1, $2) \
             ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(&deleted.user_id)
        .bind(now_micros())
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM notifications WHERE user_id = $1 OR actor_id = $1")
            .bind(&deleted.user_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
