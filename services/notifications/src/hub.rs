//! Live delivery: one tokio broadcast channel per subscribed user, fed from the outbox.
//!
//! A notification is created by whichever replica's consumer applies the CommentCreated
//! event, but its author may be subscribed to any replica. So the consumer does not publish
//! directly: it appends a delivery record to this service's own outbox in the transaction
//! that creates the notification, and every replica runs one fan-out task that follows the
//! outbox ([`tessera_store::Db::events`]) and publishes each record to the local channel of
//! its user. That also means nothing is published for a transaction that did not commit.
//!
//! Channels exist only while someone listens: a [`Subscription`] removes its user's channel
//! when it is the last one dropped (the client went away), so the map stays as small as the
//! set of connected users, and no task is spawned per subscriber.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt};
use prost::Message;
use tessera::notifications::v1::{Notification, SubscribeNotificationsResponse};
use tessera_store::Db;
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
use tonic::Status;

/// How many notifications a subscriber may fall behind before its stream is ended.
const CHANNEL_CAPACITY: usize = 64;

/// The outbox record: who to deliver what to.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Delivery {
    #[prost(string, tag = "1")]
    pub user_id: String,
    #[prost(message, optional, tag = "2")]
    pub notification: Option<Notification>,
}

/// The per-user channels of this process.
#[derive(Default)]
pub(crate) struct Hub {
    channels: Mutex<HashMap<String, broadcast::Sender<Published>>>,
}

/// A notification with the outbox sequence of its delivery record.
#[derive(Clone)]
pub(crate) struct Published {
    sequence: i64,
    notification: Notification,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<Published>>> {
        // Never held across an await; a panic while held cannot leave the map inconsistent.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A subscription to what is delivered after outbox sequence `after`: the fan-out may
    /// still be publishing older records, which the subscriber never sees (they were created
    /// before it subscribed; ListNotifications has them).
    pub(crate) fn subscribe(self: &Arc<Self>, user_id: &str, after: i64) -> Subscription {
        let receiver = self
            .lock()
            .entry(user_id.to_owned())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe();
        Subscription {
            inner: BroadcastStream::new(receiver),
            after,
            done: false,
            _guard: Guard {
                hub: Arc::clone(self),
                user_id: user_id.to_owned(),
            },
        }
    }

    pub(crate) fn publish(&self, user_id: &str, sequence: i64, notification: Notification) {
        if let Some(sender) = self.lock().get(user_id) {
            // No receivers left is fine: the last one is about to remove the channel.
            let _ = sender.send(Published {
                sequence,
                notification,
            });
        }
    }

    /// Drops every channel: open subscriptions end cleanly (for graceful shutdown).
    pub(crate) fn close_all(&self) {
        self.lock().clear();
    }

    /// Users with at least one open subscription.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn release(&self, user_id: &str) {
        let mut channels = self.lock();
        if channels
            .get(user_id)
            .is_some_and(|s| s.receiver_count() == 0)
        {
            channels.remove(user_id);
        }
    }
}

/// Removes the user's channel when the last subscription goes.
struct Guard {
    hub: Arc<Hub>,
    user_id: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.hub.release(&self.user_id);
    }
}

/// The SubscribeNotifications response stream.
pub struct Subscription {
    // Declared before the guard: fields drop in order, so the receiver is gone by the time
    // the guard counts the remaining ones.
    inner: BroadcastStream<Published>,
    /// Records at or before this outbox sequence were created before the subscription.
    after: i64,
    done: bool,
    _guard: Guard,
}

impl Stream for Subscription {
    type Item = Result<SubscribeNotificationsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            return match self.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(published))) if published.sequence <= self.after => continue,
                Poll::Ready(Some(Ok(published))) => {
                    Poll::Ready(Some(Ok(SubscribeNotificationsResponse {
                        notification: Some(published.notification),
                    })))
                }
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                    // Skipping silently would lose notifications; say so and let the client
                    // re-list and resubscribe.
                    self.done = true;
                    Poll::Ready(Some(Err(Status::aborted(format!(
                        "the subscriber fell {missed} notifications behind; list them and subscribe again"
                    )))))
                }
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

/// Follows the outbox after `after` and publishes each delivery to the hub, until `stop`'s
/// sender is dropped (the service is gone).
pub(crate) async fn fan_out(db: Db, hub: Arc<Hub>, mut after: i64, mut stop: watch::Receiver<()>) {
    loop {
        let events = db.events(after);
        let mut events = std::pin::pin!(events);
        loop {
            let item = tokio::select! {
                _ = stop.changed() => return,
                item = events.next() => item,
            };
            match item {
                Some(Ok(event)) => {
                    after = event.sequence;
                    match Delivery::decode(event.payload.as_slice()) {
                        Ok(Delivery {
                            user_id,
                            notification: Some(n),
                        }) => hub.publish(&user_id, event.sequence, n),
                        Ok(_) => {}
                        Err(err) => tracing::error!(
                            sequence = event.sequence, error = %err, "corrupt delivery record"
                        ),
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "reading the notification outbox failed");
                    break;
                }
                None => return,
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
