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

    let mut events = outbox::stream::<UserEvents>(&db, 0).unwrap();
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
    let mut resumed = outbox::stream::<UserEvents>(&db, first).unwrap();
    assert_eq!(resumed.next().await.unwrap().unwrap().sequence, second);
}

#[tokio::test]
async fn a_negative_cursor_is_invalid() {
    let (db, _dir) = sqlite().await;
    let Err(err) = outbox::stream::<UserEvents>(&db, -1) else {
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
    let mut events = outbox::stream::<UserEvents>(&db, 0).unwrap();
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
    let mut events = outbox::stream::<UserEvents>(&db, 0).unwrap();
    let err = events.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("pruned"), "{}", err.message());
    assert!(events.next().await.is_none());
}
