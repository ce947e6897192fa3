//! Outbox epochs: a consumer follows one producer history. A producer whose outbox was
//! recreated (another epoch) or went back below the cursor (restored) halts the consumer
//! instead of having new events skipped silently, until an operator resets the cursor. On
//! SQLite always and on PostgreSQL when `TESSERA_TEST_DATABASE_URL` is set.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use tempfile::TempDir;
use tessera::users::v1::{UserDeleted, WatchEventsResponse, watch_events_response::Event};
use tessera_store::{Consumer, Db, Migration, StoreError, Tx, outbox, run_consumer, testing};
use tessera_testing::eventually;
use tokio::{sync::watch as signal, task::JoinHandle};
use tonic::{Code, Status};

tessera_store::watch_events!(UserEvents = tessera::users::v1);

const MIGRATIONS: &[Migration] = &[Migration::portable(
    "applied",
    "CREATE TABLE applied (user_id TEXT PRIMARY KEY, sequence BIGINT NOT NULL)",
)];

/// A fresh database per backend (SQLite file in `dir`, PostgreSQL schema when configured).
async fn fresh(label: &str, dir: &TempDir) -> Vec<(&'static str, Db)> {
    let path = dir.path().join(format!("{label}.db"));
    let mut out = vec![(
        "sqlite",
        Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap(),
    )];
    if let Some(pg) = testing::postgres(label, MIGRATIONS).await.unwrap() {
        out.push(("postgres", pg));
    }
    out
}

async fn append(db: &Db, user_id: &str) -> i64 {
    let mut tx = db.begin().await.unwrap();
    let seq = outbox::append::<UserEvents>(
        &mut tx,
        Event::UserDeleted(UserDeleted {
            user_id: user_id.into(),
        }),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    seq
}

/// Follows `source`'s outbox through `outbox::stream`, as a service's WatchEvents would serve
/// it, recording each deleted user in `applied`.
struct Follower {
    source: Db,
}

impl Consumer for Follower {
    type Event = WatchEventsResponse;
    type Error = Status;
    type Stream = outbox::WatchStream<WatchEventsResponse>;

    fn name(&self) -> &str {
        "users-events"
    }

    async fn open(&self, after: i64) -> Result<Self::Stream, Status> {
        outbox::stream::<UserEvents>(&self.source, after, &[])
    }

    fn sequence(&self, event: &Self::Event) -> i64 {
        event.sequence
    }

    fn epoch<'e>(&self, event: &'e Self::Event) -> Option<&'e str> {
        Some(&event.epoch)
    }

    async fn apply(&self, tx: &mut Tx, event: Self::Event) -> Result<(), StoreError> {
        if let Some(Event::UserDeleted(d)) = event.event {
            sqlx::query("INSERT INTO applied (user_id, sequence) VALUES ($1, $2)")
                .bind(d.user_id)
                .bind(event.sequence)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

struct Running {
    stop: signal::Sender<bool>,
    task: JoinHandle<()>,
}

fn follow(target: &Db, source: &Db) -> Running {
    let (stop, shutdown) = signal::channel(false);
    let task = tokio::spawn(run_consumer(
        target.clone(),
        Follower {
            source: source.clone(),
        },
        shutdown,
    ));
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the consumer stops on shutdown")
            .unwrap();
    }
}

async fn applied(db: &Db) -> Vec<String> {
    sqlx::query_scalar("SELECT user_id FROM applied ORDER BY user_id")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn an_outbox_has_one_epoch_for_life_and_streams_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite_epoch = None;
    for (name, db) in fresh("epoch_life", &dir).await {
        let epoch = db.epoch().unwrap().to_owned();
        if name == "sqlite" {
            sqlite_epoch = Some(epoch.clone());
        }
        assert!(epoch.len() >= 16, "{name}: a random id: {epoch}");
        append(&db, "u1").await;
        let first = outbox::stream::<UserEvents>(&db, 0, &[])
            .unwrap()
            .next()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.epoch, epoch, "{name}");
        // Migrating again (a restart) keeps it.
        db.migrate(MIGRATIONS).await.unwrap();
        assert_eq!(db.epoch(), Some(epoch.as_str()), "{name}");
    }
    // Reopening the SQLite file keeps it; a new database draws another.
    let path = dir.path().join("epoch_life.db");
    let reopened = Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap();
    let other = Db::open(dir.path().join("other.db").to_str().unwrap(), &[])
        .await
        .unwrap();
    assert_eq!(reopened.epoch(), sqlite_epoch.as_deref());
    assert_ne!(reopened.epoch(), other.epoch());
}

#[tokio::test]
async fn a_cursor_ahead_of_the_outbox_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    for (name, db) in fresh("epoch_ahead", &dir).await {
        append(&db, "u1").await;
        append(&db, "u2").await;
        let refused = outbox::stream::<UserEvents>(&db, 5, &[])
            .unwrap()
            .next()
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.code(), Code::OutOfRange, "{name}: {refused:?}");
        assert!(
            refused.message().contains("ahead") && refused.message().contains("ends at 2"),
            "{name}: {refused:?}"
        );
        // Up to date is not ahead: the stream waits and delivers the next event.
        let mut live = outbox::stream::<UserEvents>(&db, 2, &[]).unwrap();
        append(&db, "u3").await;
        let next = tokio::time::timeout(Duration::from_secs(10), live.next())
            .await
            .expect("the live event arrives")
            .unwrap()
            .unwrap();
        assert_eq!(next.sequence, 3, "{name}");
    }
}

#[tokio::test]
async fn a_producer_with_another_history_halts_the_consumer_until_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let targets = fresh("epoch_target", &dir).await;
    let originals = fresh("epoch_original", &dir).await;
    let recreated = fresh("epoch_recreated", &dir).await;
    for (((name, target), (_, original)), (_, recreated)) in
        targets.into_iter().zip(originals).zip(recreated)
    {
        // The consumer follows the original producer and records its epoch.
        for u in ["a1", "a2", "a3"] {
            append(&original, u).await;
        }
        let running = follow(&target, &original);
        eventually!(
            target.cursor("users-events").await.unwrap() == 3,
            "the original's events applied"
        );
        running.stop().await;
        let state = target.cursor_state("users-events").await.unwrap();
        assert_eq!(state.epoch.as_deref(), original.epoch(), "{name}");
        assert_eq!(state.halted, None, "{name}");

        // The producer's database is recreated: a new epoch, sequences from 1 again, and
        // already past the cursor. Events 4 and 5 of the new history must not be applied.
        for u in ["b1", "b2", "b3", "b4", "b5"] {
            append(&recreated, u).await;
        }
        let running = follow(&target, &recreated);
        eventually!(
            target
                .cursor_state("users-events")
                .await
                .unwrap()
                .halted
                .is_some(),
            "the consumer halts"
        );
        running.stop().await;
        let state = target.cursor_state("users-events").await.unwrap();
        let halted = state.halted.unwrap();
        assert!(
            halted.contains("users")
                && halted.contains("epoch")
                && halted.contains(recreated.epoch().unwrap()),
            "{name}: the halt names the producer and the epochs: {halted}"
        );
        assert_eq!(state.position, 3, "{name}");
        assert_eq!(applied(&target).await, ["a1", "a2", "a3"], "{name}");

        // The operator resets the cursor deliberately: the whole new history is applied.
        let before = target.reset_cursor("users-events", 0).await.unwrap();
        assert_eq!(before.position, 3, "{name}");
        let running = follow(&target, &recreated);
        eventually!(
            target.cursor("users-events").await.unwrap() == 5,
            "the recreated producer's events applied"
        );
        running.stop().await;
        let state = target.cursor_state("users-events").await.unwrap();
        assert_eq!(state.epoch.as_deref(), recreated.epoch(), "{name}");
        assert_eq!(state.halted, None, "{name}");
        assert_eq!(
            applied(&target).await,
            ["a1", "a2", "a3", "b1", "b2", "b3", "b4", "b5"],
            "{name}"
        );

        // The producer is restored from an older backup: same epoch, but its outbox now ends
        // below the cursor. Waiting would skip its next events; the consumer halts instead.
        sqlx::query("DELETE FROM tessera_outbox WHERE sequence > 2")
            .execute(recreated.pool())
            .await
            .unwrap();
        let running = follow(&target, &recreated);
        eventually!(
            target
                .cursor_state("users-events")
                .await
                .unwrap()
                .halted
                .is_some_and(|h| h.contains("ahead")),
            "the consumer halts on a cursor ahead"
        );
        // Events appended meanwhile (sequence 3, below the cursor) are never applied.
        append(&recreated, "c3").await;
        running.stop().await;
        assert_eq!(applied(&target).await.len(), 8, "{name}");
        assert_eq!(target.cursor("users-events").await.unwrap(), 5, "{name}");

        // Reset to where the restored history diverged: it continues from there.
        target.reset_cursor("users-events", 2).await.unwrap();
        sqlx::query("DELETE FROM applied WHERE user_id IN ('b3', 'b4', 'b5')")
            .execute(target.pool())
            .await
            .unwrap();
        let running = follow(&target, &recreated);
        eventually!(
            target.cursor("users-events").await.unwrap() == 3,
            "the restored history applied"
        );
        running.stop().await;
        assert_eq!(
            applied(&target).await,
            ["a1", "a2", "a3", "b1", "b2", "c3"],
            "{name}"
        );
    }
}
