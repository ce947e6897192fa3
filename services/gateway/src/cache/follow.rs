//! The followers that keep the cache honest: one per owner, each following its `WatchEvents`
//! from now (the gateway keeps no cursor, having no database) and dropping what each event
//! names. A part of the cache is used only while its stream is open; when the stream ends or
//! fails, that part is emptied and bypassed until a new stream is open, because events were
//! possibly missed in between.

use std::{future::Future, time::Duration};

use tessera::{
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
use tokio::sync::watch;
use tonic::{Status, Streaming};

use super::{Cache, CacheValue, Part};

/// The first pause before subscribing again after a failure; it doubles up to [`MAX_RETRY`].
const MIN_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Keeps the cache's posts in step with PostService's events until `stop` turns `true`.
pub async fn follow_post_events(
    cache: Cache,
    posts: PostServiceClient<Channel>,
    stop: watch::Receiver<bool>,
) {
    let open = || {
        let mut posts = posts.clone();
        async move {
            let request = PostWatch {
                from_now: true,
                ..Default::default()
            };
            Ok(posts.watch_events(request).await?.into_inner())
        }
    };
    let key = |event: PostEvent| match event.event? {
        PostKind::PostCreated(created) => created.post.map(|p| p.post_id),
        PostKind::PostUpdated(updated) => updated.post.map(|p| p.post_id),
        PostKind::PostDeleted(deleted) => Some(deleted.post_id),
    };
    follow("posts", cache.posts_part(), open, key, stop).await;
}

/// Keeps the cache's profiles in step with UserService's events until `stop` turns `true`.
pub async fn follow_user_events(
    cache: Cache,
    users: UserServiceClient<Channel>,
    stop: watch::Receiver<bool>,
) {
    let open = || {
        let mut users = users.clone();
        async move {
            let request = UserWatch {
                from_now: true,
                ..Default::default()
            };
            Ok(users.watch_events(request).await?.into_inner())
        }
    };
    let key = |event: UserEvent| match event.event? {
        UserKind::UserCreated(created) => created.user.map(|u| u.user_id),
        UserKind::UserUpdated(updated) => updated.user.map(|u| u.user_id),
        UserKind::UserDeleted(deleted) => Some(deleted.user_id),
    };
    follow("users", cache.users_part(), open, key, stop).await;
}

/// The loop shared by both followers. `key` names what an event changed; `None` (an event
/// kind this gateway does not know, or one without its id) empties the part instead, since
/// it might change anything.
async fn follow<V, E, F>(
    owner: &str,
    part: &Part<V>,
    open: impl Fn() -> F,
    key: impl Fn(E) -> Option<String>,
    mut stop: watch::Receiver<bool>,
) where
    V: CacheValue,
    E: prost::Message + Default + 'static,
    F: Future<Output = Result<Streaming<E>, Status>>,
{
    let mut retry = MIN_RETRY;
    while !*stop.borrow() {
        let opened = tokio::select! {
            opened = open() => opened,
            _ = stop.changed() => break,
        };
        match opened {
            Ok(mut stream) => {
                // The owner read its newest sequence before answering: every change after
                // this point comes as an event, so what is fetched from now on may be kept.
                part.reset(true);
                retry = MIN_RETRY;
                tracing::debug!(owner, "following events; caching");
                let ended = loop {
                    let item = tokio::select! {
                        item = stream.message() => item,
                        _ = stop.changed() => break None,
                    };
                    match item {
                        Ok(Some(event)) => match key(event) {
                            Some(key) => part.invalidate(&key),
                            None => part.clear(),
                        },
                        Ok(None) => break Some(Status::unavailable("the stream ended")),
                        Err(status) => break Some(status),
                    }
                };
                part.reset(false);
                match ended {
                    Some(status) => {
                        tracing::info!(owner, %status, "event stream ended; cache bypassed until resubscribed");
                    }
                    None => break,
                }
            }
            Err(status) => {
                tracing::warn!(owner, %status, "cannot follow events; cache bypassed");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            _ = stop.changed() => break,
        }
        retry = (retry * 2).min(MAX_RETRY);
    }
    part.reset(false);
}
