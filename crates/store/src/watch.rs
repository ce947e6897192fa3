//! The outbox as a service's `WatchEvents`: the payload convention in one place, both ways.
//!
//! A service appends its `WatchEventsResponse` with only the `event` oneof set ([`append`]);
//! its `WatchEvents` handler streams the outbox back as those messages with `sequence` and
//! `create_time` filled in from the stored [`Event`](crate::Event) ([`stream`]).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use prost_types::Timestamp;
use tessera_mesh::errors::{internal, invalid_field};
use tonic::Status;

use crate::{Db, StoreError, Tx, error::Result, error_chain, timestamp};

/// A service's `WatchEventsResponse`: `sequence`, `create_time`, and an `event` oneof.
///
/// Implemented here for every such message in the contracts (the orphan rule keeps services
/// from implementing it for generated types themselves); a new service with `WatchEvents`
/// adds its message to the list below.
pub trait OutboxMessage: prost::Message + Default + Send + 'static {
    /// The message's `event` oneof.
    type Event: Send;

    /// The message with only `event` set: what goes into the outbox.
    fn from_event(event: Self::Event) -> Self;

    /// Fills in what the outbox assigned: the event's sequence and append time, and the
    /// outbox's epoch.
    fn stamp(&mut self, sequence: i64, create_time: Timestamp, epoch: &str);
}

macro_rules! outbox_messages {
    ($($package:ident),+ $(,)?) => {$(
        impl OutboxMessage for tessera::$package::v1::WatchEventsResponse {
            type Event = tessera::$package::v1::watch_events_response::Event;

            fn from_event(event: Self::Event) -> Self {
                Self {
                    event: Some(event),
                    ..Default::default()
                }
            }

            fn stamp(&mut self, sequence: i64, create_time: Timestamp, epoch: &str) {
                self.sequence = sequence;
                self.create_time = Some(create_time);
                self.epoch = epoch.to_owned();
            }
        }
    )+};
}

outbox_messages!(users, posts, comments);

/// What a `WatchEvents` handler returns (its `WatchEventsStream`).
pub type WatchStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// Appends `event` to the outbox inside `tx`, encoded as `M` with only its `event` set;
/// returns the event's sequence. Call it as the last write of the transaction (see
/// [`Tx::append_event`]).
pub async fn append<M: OutboxMessage>(tx: &mut Tx, event: M::Event) -> Result<i64> {
    tx.append_event(&M::from_event(event).encode_to_vec()).await
}

/// The body of a `WatchEvents` handler: every event after `after_sequence`, decoded as `M` and
/// stamped with its sequence, append time and the outbox epoch; the backlog first, then new events as they
/// commit (see [`Db::events`]).
///
/// A negative `after_sequence` is INVALID_ARGUMENT naming the field. A storage failure or a
/// payload that does not decode as `M` comes out as an opaque INTERNAL item, the cause
/// logged; tonic ends the response with it and the client reconnects from its cursor.
pub fn stream<M: OutboxMessage>(db: &Db, after_sequence: i64) -> Result<WatchStream<M>, Status> {
    if after_sequence < 0 {
        return Err(invalid_field("after_sequence", "must not be negative"));
    }
    let epoch = db.epoch().unwrap_or_default().to_owned();
    let events = db.events(after_sequence).map(move |item| {
        let event = item.map_err(|err| match err {
            // The caller's cursor is not in what is kept (older than the retention, or ahead
            // of an outbox that went back): its own problem, said plainly.
            StoreError::Pruned { .. } | StoreError::Ahead { .. } => {
                Status::out_of_range(err.to_string())
            }
            err => internal(error_chain(&err)),
        })?;
        let mut msg = M::decode(event.payload.as_slice()).map_err(|err| {
            internal(format!("outbox event {} is corrupt: {err}", event.sequence))
        })?;
        msg.stamp(event.sequence, timestamp(event.create_time), &epoch);
        Ok(msg)
    });
    Ok(Box::pin(events))
}
