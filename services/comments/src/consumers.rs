//! What comments learns from other services' events: a deleted post takes its comments with
//! it, a deleted user takes theirs. Each cascade deletes the rows, records a tombstone (so a
//! CreateComment racing with the event cannot leave an orphan behind) and emits one
//! CommentDeleted per removed comment, all in the transaction that advances the cursor.

use sqlx::Row;
use tessera::{
    comments::v1::{CommentDeleted, watch_events_response::Event},
    posts::v1::{
        WatchEventsRequest as PostWatch, WatchEventsResponse as PostEvent,
        post_service_client::PostServiceClient, watch_events_response::Event as PostKind,
    },
    users::v1::{
        WatchEventsRequest as UserWatch, WatchEventsResponse as UserEvent,
        user_service_client::UserServiceClient, watch_events_response::Event as UserKind,
    },
};
use tessera_client::Channel;
use tessera_store::{Consumer, StoreError, Tx, now_micros, run_consumer};
use tokio::sync::watch;
use tonic::{Status, Streaming};

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
    posts: PostServiceClient<Channel>,
    shutdown: watch::Receiver<bool>,
) {
    run_consumer(comments.db.clone(), PostsConsumer { posts }, shutdown).await;
}

/// Follows UserService.WatchEvents until `shutdown` turns true: UserDeleted deletes the
/// user's comments.
pub async fn follow_user_events(
    comments: Comments,
    users: UserServiceClient<Channel>,
    shutdown: watch::Receiver<bool>,
) {
    run_consumer(comments.db.clone(), UsersConsumer { users }, shutdown).await;
}

struct PostsConsumer {
    posts: PostServiceClient<Channel>,
}

impl Consumer for PostsConsumer {
    type Event = PostEvent;
    type Error = Status;
    type Stream = Streaming<PostEvent>;

    fn name(&self) -> &str {
        POST_EVENTS_CURSOR
    }

    async fn open(&self, after_sequence: i64) -> Result<Self::Stream, Status> {
        let mut posts = self.posts.clone();
        Ok(posts
            .watch_events(PostWatch {
                after_sequence,
                ..Default::default()
            })
            .await?
            .into_inner())
    }

    fn sequence(&self, event: &PostEvent) -> i64 {
        event.sequence
    }

    fn epoch<'e>(&self, event: &'e PostEvent) -> Option<&'e str> {
        Some(&event.epoch)
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

struct UsersConsumer {
    users: UserServiceClient<Channel>,
}

impl Consumer for UsersConsumer {
    type Event = UserEvent;
    type Error = Status;
    type Stream = Streaming<UserEvent>;

    fn name(&self) -> &str {
        USER_EVENTS_CURSOR
    }

    async fn open(&self, after_sequence: i64) -> Result<Self::Stream, Status> {
        let mut users = self.users.clone();
        Ok(users
            .watch_events(UserWatch {
                after_sequence,
                ..Default::default()
            })
            .await?
            .into_inner())
    }

    fn sequence(&self, event: &UserEvent) -> i64 {
        event.sequence
    }

    fn epoch<'e>(&self, event: &'e UserEvent) -> Option<&'e str> {
        Some(&event.epoch)
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
    let rows = sqlx::query(&format!(
        "DELETE FROM comments WHERE {column} = $1 RETURNING comment_id, post_id"
    ))
    .bind(value)
    .fetch_all(&mut **tx)
    .await?;
    for row in &rows {
        let comment_id: String = row.try_get(0)?;
        let post_id: String = row.try_get(1)?;
        append(
            tx,
            Event::CommentDeleted(CommentDeleted {
                comment_id,
                post_id,
            }),
        )
        .await?;
    }
    if !rows.is_empty() {
        tracing::info!(
            column,
            value,
            count = rows.len(),
            "cascaded comment deletion"
        );
    }
    Ok(())
}
