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
use tessera_mesh::events::event_fields;
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
                event_fields: post_changes(),
                ..Default::default()
            };
            Ok(posts.watch_events(request).await?.into_inner())
        }
    };
    let key = |event: PostEvent| match event.event {
        // A progress marker: no event, nothing changed.
        None => Changed::Nothing,
        // Sent only by a producer that does not know `event_fields`: a new id, not cached.
        Some(PostKind::PostCreated(_)) => Changed::Nothing,
        Some(PostKind::PostUpdated(updated)) => Changed::key(updated.post.map(|p| p.post_id)),
        Some(PostKind::PostDeleted(deleted)) => Changed::Key(deleted.post_id),
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
                event_fields: user_changes(),
                ..Default::default()
            };
            Ok(users.watch_events(request).await?.into_inner())
        }
    };
    let key = |event: UserEvent| match event.event {
        None => Changed::Nothing,
        Some(UserKind::UserCreated(_)) => Changed::Nothing,
        Some(UserKind::UserUpdated(updated)) => Changed::key(updated.user.map(|u| u.user_id)),
        Some(UserKind::UserDeleted(deleted)) => Changed::Key(deleted.user_id),
    };
    follow("users", cache.users_part(), open, key, stop).await;
}

/// The kinds of PostService event that change a post the cache may hold: its edits and
/// deletions. A new post's id was never fetched, so PostCreated is not asked for: sending it
/// to every gateway was one of the two event deliveries each CreatePost cost the mesh.
///
/// The list names what this gateway knows. A kind added to the contract later reaches a
/// gateway built before it only as the cache's age bound allows; a test here fails until the
/// kind is listed (or declared harmless), so a gateway built with the contract knows it.
pub fn post_changes() -> Vec<i32> {
    event_fields(
        [
            PostKind::PostUpdated(Default::default()),
            PostKind::PostDeleted(Default::default()),
        ]
        .map(|event| PostEvent {
            event: Some(event),
            ..Default::default()
        }),
    )
}

/// The kinds of UserService event that change a profile the cache may hold.
pub fn user_changes() -> Vec<i32> {
    event_fields(
        [
            UserKind::UserUpdated(Default::default()),
            UserKind::UserDeleted(Default::default()),
        ]
        .map(|event| UserEvent {
            event: Some(event),
            ..Default::default()
        }),
    )
}

/// What an event changed in a part of the cache.
enum Changed {
    /// Nothing held (a progress marker, a new id).
    Nothing,
    /// The entry of this id.
    Key(String),
    /// Possibly anything (an event without its id): the part is emptied.
    Unknown,
}

impl Changed {
    fn key(id: Option<String>) -> Self {
        id.map_or(Changed::Unknown, Changed::Key)
    }
}

/// The loop shared by both followers. `key` says what an event changed.
async fn follow<V, E, F>(
    owner: &str,
    part: &Part<V>,
    open: impl Fn() -> F,
    key: impl Fn(E) -> Changed,
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
                            Changed::Nothing => {}
                            Changed::Key(key) => part.invalidate(&key),
                            Changed::Unknown => part.clear(),
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

#[cfg(test)]
mod tests {
    use tessera_mesh::events::is_event_field;

    use super::*;

    /// Every kind of event the owners' contracts have, by field number.
    fn all_kinds<M: prost::Message + Default>() -> Vec<i32> {
        (1..=64).filter(|&f| is_event_field::<M>(f)).collect()
    }

    // A kind added to a contract is asked for unless it is listed here as changing nothing a
    // cache holds: the filter would otherwise drop it silently.
    #[test]
    fn every_kind_but_a_creation_is_asked_for() {
        let created = |event| event_fields([event]);
        let mut posts = post_changes();
        posts.extend(created(PostEvent {
            event: Some(PostKind::PostCreated(Default::default())),
            ..Default::default()
        }));
        posts.sort_unstable();
        assert_eq!(posts, all_kinds::<PostEvent>());
        let mut users = user_changes();
        users.extend(event_fields([UserEvent {
            event: Some(UserKind::UserCreated(Default::default())),
            ..Default::default()
        }]));
        users.sort_unstable();
        assert_eq!(users, all_kinds::<UserEvent>());
    }
}
