//! What comments learns from other services' events: a deleted post takes its comments with
//! it, a deleted user takes theirs. Each cascade deletes the rows, records a tombstone (so a
//! CreateComment racing with the event cannot leave an orphan behind) and emits one
//! CommentDeleted per removed comment, all in the transaction that advances the cursor.

use tessera::{
    comments::v1::{CommentDeleted, watch_events_response::Event},
    posts::v1::{
        WatchEventsResponse as PostEvent, post_service_server,
        watch_events_response::Event as PostKind,
    },
    users::v1::{
        WatchEventsResponse as UserEvent, user_service_server,
        watch_events_response::Event as UserKind,
    },
};
use tessera_client::Channel;
use tessera_store::{Apply, StoreError, Tx, follow, now_micros};
use tokio::sync::watch;

use crate::{Comments, service::append};

/// The key spaces of the tombstone locks (`Tx::lock_key`): a post's comments, a user's.
pub(crate) const POST_KEY: &str = "comments.post";
pub(crate) const USER_KEY: &str = "comments.user";

/// The cursor name of the posts consumer in the comments database.
pub const POST_EVENTS_CURSOR: &str = "posts-events";
/// The cursor name of the users consumer in the comments database.
pub const USER_EVENTS_CURSOR: &str = "users-events";

/// Follows PostService.WatchEvents until `shutdown` turns true: PostDeleted deletes the
/// post's comments.
pub async fn follow_post_events(
    comments: Comments,
    posts: Channel,
    shutdown: watch::Receiver<bool>,
) {
    follow(comments.db.clone(), posts, PostEvents, shutdown).await;
}

/// Follows UserService.WatchEvents until `shutdown` turns true: UserDeleted deletes the
/// user's comments.
pub async fn follow_user_events(
    comments: Comments,
    users: Channel,
    shutdown: watch::Receiver<bool>,
) {
    follow(comments.db.clone(), users, UserEvents, shutdown).await;
}

struct PostEvents;

impl Apply for PostEvents {
    const PRODUCER: &'static str = post_service_server::SERVICE_NAME;
    const CURSOR: &'static str = POST_EVENTS_CURSOR;
    type Event = PostEvent;

    // New and edited posts concern no comment: posts does not send them.
    fn kinds(&self) -> Vec<PostEvent> {
        vec![PostEvent {
            event: Some(PostKind::PostDeleted(Default::default())),
            ..Default::default()
        }]
    }

    async fn apply(&self, tx: &mut Tx, event: PostEvent) -> Result<(), StoreError> {
        match event.event {
            Some(PostKind::PostDeleted(deleted)) => {
                // Waits for creates that passed the tombstone check (see `Comments::insert`).
                tx.lock_key(POST_KEY, &deleted.post_id).await?;
                sqlx::query(
                    "INSERT INTO deleted_posts (post_id, delete_time) VALUES ($1, $2) \
                     ON CONFLICT (post_id) DO NOTHING",
                )
                .bind(&deleted.post_id)
                .bind(now_micros())
                .execute(&mut **tx)
                .await?;
                cascade(tx, "post_id", &deleted.post_id).await
            }
            _ => Ok(()),
        }
    }
}

struct UserEvents;

impl Apply for UserEvents {
    const PRODUCER: &'static str = user_service_server::SERVICE_NAME;
    const CURSOR: &'static str = USER_EVENTS_CURSOR;
    type Event = UserEvent;

    fn kinds(&self) -> Vec<UserEvent> {
        vec![UserEvent {
            event: Some(UserKind::UserDeleted(Default::default())),
            ..Default::default()
        }]
    }

    async fn apply(&self, tx: &mut Tx, event: UserEvent) -> Result<(), StoreError> {
        match event.event {
            Some(UserKind::UserDeleted(deleted)) => {
                tx.lock_key(USER_KEY, &deleted.user_id).await?;
                sqlx::query(
                    "INSERT INTO deleted_users (user_id, delete_time) VALUES ($1, $2) \
                     ON CONFLICT (user_id) DO NOTHING",
                )
                .bind(&deleted.user_id)
                .bind(now_micros())
                .execute(&mut **tx)
                .await?;
                cascade(tx, "author_id", &deleted.user_id).await
            }
            _ => Ok(()),
        }
    }
}

/// Deletes the comments whose `column` is `value` and emits CommentDeleted for each.
async fn cascade(tx: &mut Tx, column: &'static str, value: &str) -> Result<(), StoreError> {
    let rows: Vec<(String, String)> = sqlx::query_as(&format!(
        "DELETE FROM comments WHERE {column} = $1 RETURNING comment_id, post_id"
    ))
    .bind(value)
    .fetch_all(&mut **tx)
    .await?;
    let count = rows.len();
    for (comment_id, post_id) in rows {
        append(
            tx,
            Event::CommentDeleted(CommentDeleted {
                comment_id,
                post_id,
            }),
        );
    }
    if count > 0 {
        tracing::info!(column, value, count, "cascaded comment deletion");
    }
    Ok(())
}
