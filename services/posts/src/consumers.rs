//! UserService events → posts: a deleted user's posts are deleted, each with a PostDeleted
//! event, in the transaction that advances the cursor.

use tessera::users::v1::{WatchEventsResponse, user_service_server, watch_events_response::Event};
use tessera_client::Channel;
use tessera_store::{Apply, StoreError, Tx, now_micros};
use tokio::sync::watch;

use crate::{
    Posts,
    service::{append, post_deleted},
};

/// The key space of the tombstone lock (`Tx::lock_key`) on an author's posts.
pub(crate) const AUTHOR_KEY: &str = "posts.author";

/// The cursor name in posts' database.
pub const USER_EVENTS_CURSOR: &str = "users-events";

/// What posts does with UserService's events; see [`follow_user_events`].
struct UserEvents;

impl Apply for UserEvents {
    const PRODUCER: &'static str = user_service_server::SERVICE_NAME;
    const CURSOR: &'static str = USER_EVENTS_CURSOR;
    type Event = WatchEventsResponse;

    // Only a deletion touches posts: users sends no other kind.
    fn kinds(&self) -> Vec<WatchEventsResponse> {
        vec![WatchEventsResponse {
            event: Some(Event::UserDeleted(Default::default())),
            ..Default::default()
        }]
    }

    async fn apply(&self, tx: &mut Tx, event: WatchEventsResponse) -> Result<(), StoreError> {
        let Some(Event::UserDeleted(deleted)) = event.event else {
            return Ok(());
        };
        let n = delete_author(tx, &deleted.user_id).await?;
        tracing::info!(user_id = %deleted.user_id, posts = n, "deleted a deleted user's posts");
        Ok(())
    }
}

/// Records the author as deleted (so a still-valid token cannot post again) and deletes
/// their posts, appending PostDeleted for each when the transaction commits (after all its
/// row changes: the appends take the outbox lock, see `Tx::append_event`).
async fn delete_author(tx: &mut Tx, author_id: &str) -> Result<usize, StoreError> {
    // Waits for creates that passed the tombstone check (see `Posts::insert_post`).
    tx.lock_key(AUTHOR_KEY, author_id).await?;
    sqlx::query(
        "INSERT INTO deleted_authors (author_id, delete_time) VALUES ($1, $2) \
         ON CONFLICT (author_id) DO NOTHING",
    )
    .bind(author_id)
    .bind(now_micros())
    .execute(&mut **tx)
    .await?;
    let mut post_ids: Vec<(i64, String)> =
        sqlx::query_as("DELETE FROM posts WHERE author_id = $1 RETURNING create_time, post_id")
            .bind(author_id)
            .fetch_all(&mut **tx)
            .await?;
    sqlx::query("DELETE FROM create_requests WHERE author_id = $1")
        .bind(author_id)
        .execute(&mut **tx)
        .await?;
    post_ids.sort();
    for (_, post_id) in &post_ids {
        append(tx, post_deleted(post_id, author_id));
    }
    Ok(post_ids.len())
}

/// Follows UserService's events until `shutdown` turns `true`: each `UserDeleted` deletes that
/// user's posts (each emitting `PostDeleted`, so comments cascade), exactly once, with the
/// cursor kept in posts' database. Reconnects with backoff when the stream fails.
pub async fn follow_user_events(posts: Posts, users: Channel, shutdown: watch::Receiver<bool>) {
    tessera_store::follow(posts.db().clone(), users, UserEvents, shutdown).await;
}
