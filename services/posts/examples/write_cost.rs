//! What one CreatePost-shaped SQLite write transaction costs, step by step, on the posts
//! service's schema: an empty transaction, one that inserts a post as CreatePost does (three
//! indexes and the tombstone check), and one that also appends its event to the outbox. Prints CPU and wall time per
//! transaction, and each against the empty one, from one run. A last step puts eight of the
//! last kind in one SQLite transaction, a savepoint each: what a group commit would cost per
//! CreatePost at most (this file's post ids are random, so the id index's leaf is not shared
//! as a time-ordered UUID's would be).
//!
//! ```text
//! cargo run --release -p tessera-posts --example write_cost [transactions per step]
//! ```
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tessera_posts::MIGRATIONS;
use tessera_store::Db;

#[derive(Clone, Copy, PartialEq)]
enum Step {
    Empty,
    Insert,
    InsertAndEvent,
    /// `InsertAndEvent` eight to a transaction, each in a savepoint.
    Grouped,
}

/// Members of a `Step::Grouped` transaction.
const GROUP: usize = 8;

/// User plus system CPU time of this process (the SQLite connection threads included).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// Numbers the posts across all steps and rounds (each a new key).
static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn run(db: &Db, step: Step, n: usize) -> (Duration, Duration) {
    let (wall, cpu) = (Instant::now(), cpu_time());
    let per_tx = if step == Step::Grouped { GROUP } else { 1 };
    for first in (0..n).step_by(per_tx) {
        let mut tx = db.begin().await.unwrap();
        for i in first..(first + per_tx).min(n) {
            if step == Step::Grouped {
                sqlx::query("SAVEPOINT member")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            if step != Step::Empty {
                let now = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as i64;
                sqlx::query(
                    "INSERT INTO posts (post_id, author_id, title, body, tags, create_time, \
                 update_time, etag) SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
                 WHERE NOT EXISTS (SELECT 1 FROM deleted_authors WHERE author_id = $2)",
                )
                .bind(format!(
                    "{:032x}",
                    (now as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ))
                .bind(format!("author-{}", i % 200))
                .bind(format!("Load post {i}"))
                .bind("Written by the benchmark's CreatePost run.")
                .bind(r#"["load"]"#)
                .bind(now)
                .bind(now)
                .bind("0123456789abcdef")
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            if matches!(step, Step::InsertAndEvent | Step::Grouped) {
                tx.append_event(&[7; 200]).await.unwrap();
            }
            if step == Step::Grouped {
                sqlx::query("RELEASE member")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
        }
        tx.commit().await.unwrap();
    }
    (wall.elapsed() / n as u32, (cpu_time() - cpu) / n as u32)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5000);
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("posts.db").to_str().unwrap(), MIGRATIONS)
        .await
        .unwrap();
    let steps = [
        ("BEGIN IMMEDIATE + COMMIT", Step::Empty),
        ("+ INSERT the post", Step::Insert),
        ("+ append its event", Step::InsertAndEvent),
        ("the same, 8 per COMMIT", Step::Grouped),
    ];
    // Warm up the statement caches and the file, then take the best of three rounds per step
    // (rounds interleaved, so a noisy spell hits every step alike).
    for (_, step) in steps {
        run(&db, step, n / 10 + 1).await;
    }
    let mut best = [(Duration::MAX, Duration::MAX); 4];
    for _ in 0..3 {
        for (i, (_, step)) in steps.iter().enumerate() {
            let (wall, cpu) = run(&db, *step, n).await;
            best[i] = (best[i].0.min(wall), best[i].1.min(cpu));
        }
    }
    println!(
        "{n} posts per step and round, best of 3 rounds, one SQLite file in WAL mode; \
         per transaction, or per post in the last row (eight to a transaction)"
    );
    println!("| transaction              | wall µs/tx | CPU µs/tx | CPU ÷ empty |");
    println!("| ------------------------ | ---------- | --------- | ----------- |");
    let empty = best[0].1.as_secs_f64().max(f64::EPSILON);
    for ((name, _), (wall, cpu)) in steps.iter().zip(best) {
        println!(
            "| {name:<24} | {:>10.1} | {:>9.1} | {:>10.2}x |",
            wall.as_secs_f64() * 1e6,
            cpu.as_secs_f64() * 1e6,
            cpu.as_secs_f64() / empty
        );
    }
    db.close().await;
}
