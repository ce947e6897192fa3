//! The shape every `WatchEventsResponse` shares, for producers and followers alike: an
//! envelope of `sequence` (field 1), `create_time` (2) and `epoch` (15) around an `event`
//! oneof, whose field number says what kind of event it is. A `WatchEventsRequest` names the
//! kinds it wants by those numbers (`event_fields`), and a response with the envelope and no
//! event is a progress marker: the stream got this far past events of other kinds.
//!
//! ```
//! use tessera::posts::v1::{PostDeleted, WatchEventsResponse, watch_events_response::Event};
//! use tessera_mesh::events::{event_field, event_fields};
//! use prost::Message as _;
//!
//! let deleted = WatchEventsResponse {
//!     sequence: 7,
//!     event: Some(Event::PostDeleted(PostDeleted::default())),
//!     epoch: "e1".into(),
//!     ..Default::default()
//! };
//! assert_eq!(event_field(&deleted.encode_to_vec()), Some(4));
//! assert_eq!(event_fields([deleted]), vec![4]);
//! let marker = WatchEventsResponse { sequence: 9, epoch: "e1".into(), ..Default::default() };
//! assert_eq!(event_field(&marker.encode_to_vec()), None);
//! ```

use prost::{
    Message,
    bytes::Buf,
    encoding::{DecodeContext, WireType, decode_key, encode_key, skip_field},
};

/// The envelope's field numbers.
const ENVELOPE: [u32; 3] = [1, 2, 15];

/// The field number of the event in an encoded `WatchEventsResponse` (or in an outbox payload,
/// the same message with only the event set): its first field outside the envelope. `None` for
/// a progress marker, and for bytes that do not parse.
pub fn event_field(mut encoded: &[u8]) -> Option<i32> {
    while encoded.has_remaining() {
        let (tag, wire_type) = decode_key(&mut encoded).ok()?;
        if !ENVELOPE.contains(&tag) {
            return i32::try_from(tag).ok();
        }
        skip_field(wire_type, tag, &mut encoded, DecodeContext::default()).ok()?;
    }
    None
}

/// The field numbers of the events in `examples`, one message per kind wanted (what a
/// follower puts in `WatchEventsRequest.event_fields`).
pub fn event_fields<M: Message>(examples: impl IntoIterator<Item = M>) -> Vec<i32> {
    examples
        .into_iter()
        .filter_map(|m| event_field(&m.encode_to_vec()))
        .collect()
}

/// Whether `field` is an event of the `event` oneof of `M` (a `WatchEventsResponse`): an
/// empty message in that field decodes into the oneof and encodes back as it. An unknown
/// field is dropped by the decode; an envelope field is not an event.
pub fn is_event_field<M: Message + Default>(field: i32) -> bool {
    let Ok(tag) = u32::try_from(field) else {
        return false;
    };
    if !(1..=prost::encoding::MAX_TAG).contains(&tag) || ENVELOPE.contains(&tag) {
        return false;
    }
    let mut probe = Vec::with_capacity(8);
    encode_key(tag, WireType::LengthDelimited, &mut probe);
    probe.push(0);
    M::decode(probe.as_slice()).is_ok_and(|m| event_field(&m.encode_to_vec()) == Some(field))
}

#[cfg(test)]
mod tests {
    use tessera::{
        comments::v1 as comments,
        posts::v1::{PostCreated, WatchEventsResponse, watch_events_response::Event},
    };

    use super::*;

    #[test]
    fn the_event_oneof_fields_are_events_and_nothing_else_is() {
        for field in [3, 4, 5] {
            assert!(is_event_field::<WatchEventsResponse>(field), "{field}");
        }
        // Envelope, unknown, out of range.
        for field in [1, 2, 15, 6, 14, 0, -3, i32::MAX] {
            assert!(!is_event_field::<WatchEventsResponse>(field), "{field}");
        }
        assert!(is_event_field::<comments::WatchEventsResponse>(4));
        assert!(!is_event_field::<comments::WatchEventsResponse>(5));
    }

    #[test]
    fn the_event_is_found_after_the_envelope_and_garbage_is_none() {
        let created = WatchEventsResponse {
            sequence: 3,
            create_time: Some(prost_types::Timestamp {
                seconds: 5,
                nanos: 1,
            }),
            event: Some(Event::PostCreated(PostCreated::default())),
            epoch: "e".into(),
        };
        assert_eq!(event_field(&created.encode_to_vec()), Some(3));
        assert_eq!(event_field(&[0x08]), None);
        assert_eq!(event_field(&[0xff, 0xff]), None);
        assert_eq!(event_field(&[]), None);
    }
}
