//! `outbox::append` and `outbox::stream`: the outbox served as a `WatchEvents` stream.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use tessera::users::v1::{UserCreated, UserDeleted, watch_events_response::Event};
use tessera_mesh::errors::violated_fields;
use tessera_store::{Db, outbox};
use tonic::Code;

tessera_store::watch_events!(UserEvents = tessera::users::v1);

async fn sqlite() -> (Db, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("w.db").to_str().unwrap(), &[])
        .await
        .unwrap();
    (db, dir)
}

fn deleted(user_id: &str) -> Event {
    Event::UserDeleted(UserDeleted {
        user_id: user_id.into(),
    })
}

#[tokio::test]
async fn appended_events_stream_back_stamped() {
    let (db, _dir) = sqlite().await;
    let mut tx = db.begin().await.unwrap();
    let first = outbox::append::<UserEvents>(&mut tx, deleted("a"))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let mut events = outbox::stream::<UserEvents>(&db, 0, &[]).unwrap();
    let got = events.next().await.unwrap().unwrap();
    assert_eq!(got.sequence, first);
    assert!(got.create_time.unwrap().seconds > 1_600_000_000);
    assert_eq!(got.event, Some(deleted("a")));

    // Follows new commits, and resumes after a cursor.
    let mut tx = db.begin().await.unwrap();
    let second =
        outbox::append::<UserEvents>(&mut tx, Event::UserCreated(UserCreated { user: None }))
            .await
            .unwrap();
    tx.commit().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.sequence, second);
    let mut resumed = outbox::stream::<UserEvents>(&db, first, &[]).unwrap();
    assert_eq!(resumed.next().await.unwrap().unwrap().sequence, second);
}

#[tokio::test]
async fn a_negative_cursor_is_invalid() {
    let (db, _dir) = sqlite().await;
    let Err(err) = outbox::stream::<UserEvents>(&db, -1, &[]) else {
        panic!("a negative after_sequence is accepted");
    };
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["after_sequence"]);
}

#[tokio::test]
async fn a_corrupt_payload_ends_the_stream_with_internal() {
    let (db, _dir) = sqlite().await;
    let mut tx = db.begin().await.unwrap();
    // Field 1 (sequence) with the length-delimited wire type: not a WatchEventsResponse.
    tx.append_event(&[0x0a, 0x05, 0x01]).await.unwrap();
    tx.commit().await.unwrap();
    let mut events = outbox::stream::<UserEvents>(&db, 0, &[]).unwrap();
    let err = events.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert_eq!(
        err.message(),
        "internal error",
        "the cause stays in the log"
    );
}

#[tokio::test]
async fn a_cursor_older_than_the_outbox_keeps_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let options = tessera_store::DbOptions {
        outbox_retention: Some(Duration::ZERO),
        ..tessera_store::DbOptions::default()
    };
    let db = Db::open_with(dir.path().join("w.db").to_str().unwrap(), options, &[])
        .await
        .unwrap();
    for i in 0..tessera_store::PRUNE_EVERY {
        let mut tx = db.begin().await.unwrap();
        outbox::append::<UserEvents>(&mut tx, deleted(&format!("u{i}")))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let mut events = outbox::stream::<UserEvents>(&db, 0, &[]).unwrap();
    let err = events.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("pruned"), "{}", err.message());
    assert!(events.next().await.is_none());
}

fn created(user_id: &str) -> Event {
    Event::UserCreated(UserCreated {
        user: Some(tessera::users::v1::User {
            user_id: user_id.into(),
            ..Default::default()
        }),
    })
}

async fn append_all(db: &Db, events: impl IntoIterator<Item = Event>) -> Vec<i64> {
    let mut sequences = Vec::new();
    for event in events {
        let mut tx = db.begin().await.unwrap();
        sequences.push(outbox::append::<UserEvents>(&mut tx, event).await.unwrap());
        tx.commit().await.unwrap();
    }
    sequences
}

/// UserDeleted's field number in the `event` oneof.
const USER_DELETED: i32 = 4;

#[tokio::test]
async fn only_the_kinds_asked_for_are_sent_and_a_marker_reports_the_rest() {
    let (db, _dir) = sqlite().await;
    let seq = append_all(
        &db,
        [created("a"), deleted("a"), created("b"), created("c")],
    )
    .await;
    let mut events = outbox::stream::<UserEvents>(&db, 0, &[USER_DELETED]).unwrap();
    let first = events.next().await.unwrap().unwrap();
    assert_eq!((first.sequence, first.event), (seq[1], Some(deleted("a"))));
    // The two creations after it come as one marker, once nothing else is there.
    let started = std::time::Instant::now();
    let marker = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() >= outbox::MARKER_DELAY / 2,
        "{:?}",
        started.elapsed()
    );
    assert_eq!((marker.sequence, marker.event), (seq[3], None));
    assert!(marker.create_time.is_some());
    assert_eq!(marker.epoch, db.epoch().unwrap());

    // A wanted event after skipped ones comes without a marker before it: its sequence moves
    // the cursor past them.
    let more = append_all(&db, [created("d"), deleted("b")]).await;
    let next = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((next.sequence, next.event), (more[1], Some(deleted("b"))));

    // Without a filter every kind comes, and no marker.
    let mut all = outbox::stream::<UserEvents>(&db, 0, &[]).unwrap();
    for expected in seq.iter().chain(&more) {
        let got = all.next().await.unwrap().unwrap();
        assert_eq!(got.sequence, *expected);
        assert!(got.event.is_some());
    }
}

#[tokio::test]
async fn a_long_run_of_other_kinds_is_reported_while_it_is_read() {
    let (db, _dir) = sqlite().await;
    let n = outbox::MARKER_EVERY as usize + 300;
    let mut tx = db.begin().await.unwrap();
    let payloads: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            use prost::Message as _;
            tessera::users::v1::WatchEventsResponse {
                event: Some(created(&format!("u{i}"))),
                ..Default::default()
            }
            .encode_to_vec()
        })
        .collect();
    let seq = tx.append_events(&payloads).await.unwrap();
    tx.commit().await.unwrap();
    let mut events = outbox::stream::<UserEvents>(&db, 0, &[USER_DELETED]).unwrap();
    let first = events.next().await.unwrap().unwrap();
    assert_eq!(
        (first.sequence, first.event),
        (seq[outbox::MARKER_EVERY as usize - 1], None)
    );
    let second = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((second.sequence, second.event), (seq[n - 1], None));
}

#[tokio::test]
async fn event_fields_that_are_not_events_are_invalid() {
    let (db, _dir) = sqlite().await;
    // 1 is `sequence`, 15 `epoch`, 6 nothing; 3-5 are the oneof's.
    for (fields, bad) in [
        (vec![4, 1], vec!["event_fields[1]"]),
        (vec![15, 3, 6], vec!["event_fields[0]", "event_fields[2]"]),
        (vec![0], vec!["event_fields[0]"]),
        (vec![-4], vec!["event_fields[0]"]),
    ] {
        let Err(err) = outbox::stream::<UserEvents>(&db, 0, &fields) else {
            panic!("{fields:?} accepted");
        };
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&err), bad, "{fields:?}");
    }
    let Err(err) = outbox::stream::<UserEvents>(&db, 0, &[4; 33]) else {
        panic!("33 kinds accepted");
    };
    assert_eq!(violated_fields(&err), ["event_fields"]);
    assert!(outbox::stream::<UserEvents>(&db, 0, &[3, 4, 5]).is_ok());
}
