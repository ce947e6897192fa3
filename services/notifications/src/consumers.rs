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

use std::collections::HashSet;

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
            Some(CommentKind::CommentCreated(created)) => notify(tx, vec![created]).await,
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

    // A catch-up is mostly CommentCreated: each run of them is inserted in one statement
    // and their deliveries appended in one more, instead of two statements an event.
    async fn apply_all(
        &self,
        tx: &mut Tx,
        events: Vec<CommentEvent>,
    ) -> Result<(), (usize, StoreError)> {
        let mut run: Vec<CommentCreated> = Vec::new();
        let mut run_start = 0;
        for (index, event) in events.into_iter().enumerate() {
            match event.event {
                Some(CommentKind::CommentCreated(created)) => {
                    if run.is_empty() {
                        run_start = index;
                    }
                    run.push(created);
                }
                other => {
                    let run = std::mem::take(&mut run);
                    notify(tx, run).await.map_err(|err| (run_start, err))?;
                    let single = CommentEvent {
                        event: other,
                        ..Default::default()
                    };
                    self.apply(tx, single).await.map_err(|err| (index, err))?;
                }
            }
        }
        notify(tx, run).await.map_err(|err| (run_start, err))
    }
}

/// Notifies the posts' authors of `created` (in order), but not of their own comments, nor a
/// deleted user, nor twice for one comment; each new notification's delivery is appended to
/// the outbox for live subscribers. Three statements for the whole run.
async fn notify(tx: &mut Tx, created: Vec<CommentCreated>) -> Result<(), StoreError> {
    let now = now_micros();
    let notifications: Vec<(String, Notification)> = created
        .into_iter()
        .filter_map(|created| {
            let comment = created.comment?;
            let recipient = created.post_author_id;
            if recipient.is_empty() || recipient == comment.author_id {
                return None;
            }
            let notification = Notification {
                notification_id: uuid::Uuid::now_v7().to_string(),
                post_id: comment.post_id,
                comment_id: comment.comment_id,
                actor_id: comment.author_id,
                read: false,
                create_time: Some(timestamp(now)),
            };
            Some((recipient, notification))
        })
        .collect();
    let mut inserted = HashSet::new();
    for chunk in notifications.chunks(NOTIFY_CHUNK) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| {
                let p = 7 * i;
                format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5,
                    p + 6,
                    p + 7
                )
            })
            .collect();
        // VALUES names its columns column1..column7 on both engines. A deleted recipient
        // (a tombstone) gets nothing; a comment already notified is skipped by its key.
        let sql = format!(
            "INSERT INTO notifications \
             (notification_id, user_id, post_id, comment_id, actor_id, is_read, create_time) \
             SELECT column1, column2, column3, column4, column5, column6, column7 \
             FROM (VALUES {}) AS v \
             WHERE NOT EXISTS (SELECT 1 FROM deleted_users d WHERE d.user_id = v.column2) \
             ON CONFLICT (comment_id) DO NOTHING RETURNING comment_id",
            rows.join(", ")
        );
        let mut query = sqlx::query_scalar::<_, String>(&sql);
        for (recipient, notification) in chunk {
            query = query
                .bind(&notification.notification_id)
                .bind(recipient)
                .bind(&notification.post_id)
                .bind(&notification.comment_id)
                .bind(&notification.actor_id)
                .bind(UNREAD)
                .bind(now);
        }
        inserted.extend(query.fetch_all(&mut **tx).await?);
    }
    let deliveries: Vec<Vec<u8>> = notifications
        .into_iter()
        .filter(|(_, n)| inserted.contains(&n.comment_id))
        .map(|(user_id, notification)| {
            Delivery {
                user_id,
                notification: Some(notification),
            }
            .encode_to_vec()
        })
        .collect();
    tx.append_events(&deliveries).await?;
    Ok(())
}

/// Notifications per INSERT. SQLite looks a parameter's name up in a list, so reading all of a
/// statement's names costs the square of their number (measured: 13% of a catch-up's CPU at
/// 500 rows of seven, when it was done on every run). The store's writer connection now does
/// it once per statement text, and each chunk size is a text of its own: 64 rows keep both
/// that first time and the number of texts small.
const NOTIFY_CHUNK: usize = 64;

struct UserEvents;

impl Apply for UserEvents {
    const PRODUCER: &'static str = user_service_server::SERVICE_NAME;
    const CURSOR: &'static str = USER_EVENTS_CURSOR;
    type Event = UserEvent;

    // Only a deletion removes notifications: users sends no other kind.
    fn kinds(&self) -> Vec<UserEvent> {
        vec![UserEvent {
            event: Some(UserKind::UserDeleted(Default::default())),
            ..Default::default()
        }]
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
