//! PostService events → digest: a new post is remembered (id, author, time) so digests can
//! order it; a deleted one is forgotten. Both in the transaction that advances the cursor.

use tessera::posts::v1::{WatchEventsResponse, post_service_server, watch_events_response::Event};
use tessera_client::Channel;
use tessera_store::{Apply, StoreError, Tx, now_micros};
use tokio::sync::watch;

use crate::Digest;

/// The cursor name in digest's database.
pub const POST_EVENTS_CURSOR: &str = "posts-events";

/// What the digest does with PostService's events; see [`follow_post_events`].
struct PostEvents;

impl Apply for PostEvents {
    const PRODUCER: &'static str = post_service_server::SERVICE_NAME;
    const CURSOR: &'static str = POST_EVENTS_CURSOR;
    type Event = WatchEventsResponse;

    // An edit changes nothing the digest keeps (id, author, create time): posts does not
    // send them.
    fn kinds(&self) -> Vec<WatchEventsResponse> {
        [
            Event::PostCreated(Default::default()),
            Event::PostDeleted(Default::default()),
        ]
        .map(|event| WatchEventsResponse {
            event: Some(event),
            ..Default::default()
        })
        .into()
    }

    async fn apply(&self, tx: &mut Tx, event: WatchEventsResponse) -> Result<(), StoreError> {
        match event.event {
            Some(Event::PostCreated(created)) => {
                let Some(post) = created.post else {
                    return Ok(());
                };
                // The post's own create time orders the digest; an event without one (not
                // sent by PostService) is ordered by when it arrived.
                let micros = post
                    .create_time
                    .map(|t| t.seconds.saturating_mul(1_000_000) + i64::from(t.nanos / 1000))
                    .unwrap_or_else(now_micros);
                sqlx::query(
                    "INSERT INTO digest_posts (post_id, author_id, create_time) VALUES ($1, $2, $3) \
                     ON CONFLICT (post_id) DO NOTHING",
                )
                .bind(&post.post_id)
                .bind(&post.author_id)
                .bind(micros)
                .execute(&mut **tx)
                .await?;
            }
            Some(Event::PostDeleted(deleted)) => {
                sqlx::query("DELETE FROM digest_posts WHERE post_id = $1")
                    .bind(&deleted.post_id)
                    .execute(&mut **tx)
                    .await?;
            }
            // An edit changes nothing the digest keeps (id, author, create time).
            Some(Event::PostUpdated(_)) | None => {}
        }
        Ok(())
    }
}

/// Follows PostService's events until `shutdown` turns `true`, exactly once per event, with
/// the cursor kept in digest's database; reconnects with backoff when the stream fails.
pub async fn follow_post_events(digest: Digest, posts: Channel, shutdown: watch::Receiver<bool>) {
    tessera_store::follow(digest.db().clone(), posts, PostEvents, shutdown).await;
}
