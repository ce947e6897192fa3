//! Group commit on SQLite: a write transaction that commits with another queued for the turn
//! hands the turn on and returns only when the shared COMMIT did; the members' events arrive
//! in order; a member that fails or goes away takes only its own writes with it and commits
//! the others at once; a group whose next writer went away while queued is committed by the
//! handle itself; a failed COMMIT fails
//! every member and leaves the next writer a clean connection; many concurrent writers all
//! commit, each whole.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::oneshot;

use tessera_store::{Db, DbOptions, Migration, Tx};

const MIGRATIONS: &[Migration] = &[
    Migration::portable(
        "items",
        "CREATE TABLE items (id TEXT PRIMARY KEY, n BIGINT NOT NULL)",
    ),
    // Checked on each statement, unless a transaction defers it.
    Migration::portable(
        "item_tags",
        "CREATE TABLE item_tags (item_id TEXT NOT NULL REFERENCES items (id), tag TEXT NOT NULL)",
    ),
];

async fn open(dir: &tempfile::TempDir) -> Db {
    Db::open(dir.path().join("group.db").to_str().unwrap(), MIGRATIONS)
        .await
        .unwrap()
}

async fn ids(db: &Db) -> Vec<String> {
    sqlx::query_scalar("SELECT id FROM items ORDER BY id")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

async fn insert(tx: &mut Tx, id: &str) {
    sqlx::query("INSERT INTO items (id, n) VALUES ($1, 1)")
        .bind(id)
        .execute(&mut **tx)
        .await
        .unwrap();
}

/// A writer queued for the turn, handed back once it has it (its transaction begun).
fn queue_writer(db: &Db) -> (oneshot::Receiver<Tx>, tokio::task::JoinHandle<()>) {
    let (send, got) = oneshot::channel();
    let task = tokio::spawn({
        let db = db.clone();
        async move {
            let tx = db.begin().await.unwrap();
            let _ = send.send(tx);
        }
    });
    (got, task)
}

/// `a` inserted and committing, with the writer returned queued behind it: `a`'s commit
/// runs in the task returned.
async fn hand_over(
    db: &Db,
    id: &str,
) -> (
    tokio::task::JoinHandle<tessera_store::Result<()>>,
    oneshot::Receiver<Tx>,
) {
    let mut a = db.begin().await.unwrap();
    insert(&mut a, id).await;
    a.append_on_commit(id.as_bytes().to_vec());
    let (next, _task) = queue_writer(db);
    tessera_testing::eventually!(db.writers_waiting() == 1);
    let committing = tokio::spawn(a.commit());
    (committing, next)
}

#[tokio::test]
async fn a_commit_with_a_writer_queued_waits_for_the_shared_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir).await;
    let mut events = Box::pin(db.events(0));
    let (a, next) = hand_over(&db, "a").await;
    let mut b = next.await.unwrap();
    // `b` has the turn inside `a`'s transaction: it sees `a`'s row, nobody else does yet, and
    // `a` has not been told it committed.
    let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE id = 'a'")
        .fetch_one(&mut *b)
        .await
        .unwrap();
    assert_eq!(seen, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!a.is_finished(), "a returned before its COMMIT");
    assert!(ids(&db).await.is_empty());
    insert(&mut b, "b").await;
    b.append_on_commit(b"b".to_vec());
    b.commit().await.unwrap();
    a.await.unwrap().unwrap();
    assert_eq!(ids(&db).await, ["a", "b"]);
    for (sequence, payload) in [(1, b"a"), (2, b"b")] {
        let event = events.next().await.unwrap().unwrap();
        assert_eq!(
            (event.sequence, event.payload.as_slice()),
            (sequence, &payload[..])
        );
    }
    db.close().await;
}

#[tokio::test]
async fn a_member_that_fails_takes_only_its_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir).await;
    for round in 0..3 {
        let (a, next) = hand_over(&db, &format!("a{round}")).await;
        let mut b = next.await.unwrap();
        insert(&mut b, &format!("b{round}")).await;
        // A statement that fails, then the transaction given up: nothing of it stays.
        let dup = sqlx::query("INSERT INTO items (id, n) VALUES ($1, 1)")
            .bind(format!("a{round}"))
            .execute(&mut *b)
            .await;
        assert!(dup.is_err(), "a{round} already exists in the group");
        // Another writer waits for the turn, and is not waited for.
        let (c, _task) = queue_writer(&db);
        tessera_testing::eventually!(db.writers_waiting() == 1);
        if round == 0 {
            b.rollback().await.unwrap();
        } else {
            drop(b);
        }
        // Committed as `b` left, with nobody else waited for: what `b` collided with is there
        // for `b`'s caller to read.
        let committed = ids(&db).await;
        assert!(committed.contains(&format!("a{round}")), "{committed:?}");
        a.await.unwrap().unwrap();
        drop(c.await.unwrap());
    }
    assert_eq!(ids(&db).await, ["a0", "a1", "a2"]);
    assert_eq!(db.last_sequence().await.unwrap(), 3);
    db.close().await;
}

/// The writer a commit handed the turn to gives up before it takes it: nobody is left to
/// commit the group but the handle.
#[tokio::test]
async fn a_group_left_without_a_writer_is_committed_by_the_handle() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir).await;
    let mut a = db.begin().await.unwrap();
    insert(&mut a, "a").await;
    let (_never, b) = queue_writer(&db);
    tessera_testing::eventually!(db.writers_waiting() == 1);
    // Driven by hand on this one thread, so that `b` cannot run in between: the first poll
    // releases `a` into its group and yields, the second hands the turn to `b`.
    let mut commit = Box::pin(a.commit());
    assert!(futures::poll!(&mut commit).is_pending());
    assert!(futures::poll!(&mut commit).is_pending());
    b.abort();
    assert!(b.await.unwrap_err().is_cancelled());
    tokio::time::timeout(Duration::from_secs(5), commit)
        .await
        .expect("the handle commits the group")
        .unwrap();
    assert_eq!(ids(&db).await, ["a"]);
    // And the turn is free for the next writer.
    let mut d = db.begin().await.unwrap();
    insert(&mut d, "d").await;
    d.commit().await.unwrap();
    assert_eq!(ids(&db).await, ["a", "d"]);
    db.close().await;
}

/// A COMMIT refused at the end (a member deferred a foreign key it broke, which a grouping
/// handle tells transactions not to do) fails every member, and the next writer gets a clean
/// connection.
#[tokio::test]
async fn a_refused_group_commit_fails_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir).await;
    let mut a = db.begin().await.unwrap();
    sqlx::query("PRAGMA defer_foreign_keys = ON")
        .execute(&mut *a)
        .await
        .unwrap();
    sqlx::query("INSERT INTO item_tags (item_id, tag) VALUES ('missing', 'x')")
        .execute(&mut *a)
        .await
        .unwrap();
    let (next, _task) = queue_writer(&db);
    tessera_testing::eventually!(db.writers_waiting() == 1);
    let a = tokio::spawn(a.commit());
    let mut b = next.await.unwrap();
    insert(&mut b, "b").await;
    b.append_on_commit(b"b".to_vec());
    let refused = b.commit().await.unwrap_err();
    let also = a.await.unwrap().unwrap_err();
    assert_eq!(refused.to_string(), also.to_string());
    assert!(
        format!("{:?}", also).contains("FOREIGN KEY"),
        "the member gets the COMMIT's own error: {also:?}"
    );
    assert!(ids(&db).await.is_empty());
    assert_eq!(db.last_sequence().await.unwrap(), 0);
    let mut c = db.begin().await.unwrap();
    insert(&mut c, "c").await;
    c.commit().await.unwrap();
    assert_eq!(ids(&db).await, ["c"]);
    db.close().await;
}

/// Many writers at once, each with rows and an event: every one commits whole, and the events
/// arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_all_commit_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir).await;
    let mut events = Box::pin(db.events(0));
    let writers = (0..64).map(|w| {
        let db = db.clone();
        tokio::spawn(async move {
            for round in 0..10 {
                let mut tx = db.begin().await?;
                for row in 0..3 {
                    sqlx::query("INSERT INTO items (id, n) VALUES ($1, $2)")
                        .bind(format!("w{w}-r{round}-{row}"))
                        .bind(row)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.append_on_commit(format!("w{w}-r{round}").into_bytes());
                tx.commit().await?;
            }
            Ok::<_, tessera_store::StoreError>(())
        })
    });
    for writer in futures::future::join_all(writers).await {
        writer.unwrap().unwrap();
    }
    assert_eq!(ids(&db).await.len(), 64 * 10 * 3);
    assert_eq!(db.last_sequence().await.unwrap(), 640);
    for sequence in 1..=640 {
        assert_eq!(events.next().await.unwrap().unwrap().sequence, sequence);
    }
    db.close().await;
}

/// A schema with a deferrable constraint, or the option off: transactions never share a
/// COMMIT, so a commit with a writer queued returns before that writer runs.
#[tokio::test]
async fn no_groups_with_a_deferrable_constraint_or_the_option_off() {
    let deferrable: &[Migration] = &[
        MIGRATIONS[0],
        Migration::portable(
            "notes",
            "CREATE TABLE notes (item_id TEXT REFERENCES items (id) DEFERRABLE INITIALLY \
             DEFERRED)",
        ),
    ];
    for (name, migrations, group_commit) in
        [("deferrable", deferrable, true), ("off", MIGRATIONS, false)]
    {
        let dir = tempfile::tempdir().unwrap();
        let options = DbOptions {
            group_commit,
            ..DbOptions::default()
        };
        let db = Db::open_with(
            dir.path().join("g.db").to_str().unwrap(),
            options,
            migrations,
        )
        .await
        .unwrap();
        let (a, next) = hand_over(&db, "a").await;
        tokio::time::timeout(Duration::from_secs(5), a)
            .await
            .unwrap_or_else(|_| panic!("{name}: a waits for the writer behind it"))
            .unwrap()
            .unwrap();
        assert_eq!(ids(&db).await, ["a"], "{name}");
        next.await.unwrap().commit().await.unwrap();
        db.close().await;
    }
}
