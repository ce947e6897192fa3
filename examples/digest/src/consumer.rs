//! PostService events → digest: a new post is remembered (id, author, time) so digests can
//! order it; a deleted one is forgotten. Both in the transaction that advances the cursor.

use tessera::posts::v1::{
    WatchEventsRequest, WatchEventsResponse, post_service_client::PostServiceClient,
    watch_events_response::Event,
};
use tessera_client::Channel;
use tessera_store::{StoreError, Tx, now_micros};
use tokio::sync::watch;

use crate::Digest;

/// The cursor name in digest's database.
pub const POST_EVENTS_CURSOR: &str = "posts-events";

/// Follows PostService.WatchEvents for the digest; see [`follow_post_events`].
pub struct PostEvents {
    posts: PostServiceClient<Channel>,
}

impl PostEvents {
    pub fn new(posts: PostServiceClient<Channel>) -> Self {
        Self { posts }
    }
}

impl tessera_store::Consumer for PostEvents {
    type Event = WatchEventsResponse;
    type Error = tonic::Status;
    type Stream = tonic::Streaming<WatchEventsResponse>;

    fn name(&self) -> &str {
        POST_EVENTS_CURSOR
    }

    async fn open(&self, after_sequence: i64) -> Result<Self::Stream, tonic::Status> {
        let mut posts = self.posts.clone();
        Ok(posts
            .watch_events(WatchEventsRequest {
                after_sequence,
                ..Default::default()
            })
            .await?
            .into_inner())
    }

    fn sequence(&self, event: &WatchEventsResponse) -> i64 {
        event.sequence
    }

    fn epoch<'e>(&self, event: &'e WatchEventsResponse) -> Option<&'e str> {
        Some(&event.epoch)
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
pub async fn follow_post_events(
    digest: Digest,
    posts: PostServiceClient<Channel>,
    shutdown: watch::Receiver<bool>,
) {
    tessera_store::run_consumer(digest.db().clone(), PostEvents::new(posts), shutdown).await;
}
