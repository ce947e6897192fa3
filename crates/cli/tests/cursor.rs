//! `tessera cursor show|reset`: an operator resynchronises a halted consumer deliberately, on
//! SQLite (the data dir) and on PostgreSQL (`DATABASE_URL`, when `TESSERA_TEST_DATABASE_URL`
//! is set: a database of its own, dropped afterwards).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tessera_store::Db;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

/// Runs `tessera args...` with `env` (and no inherited database settings), killed after 30 s.
fn tessera(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = Command::new(TESSERA);
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("TESSERA_DATA_DIR")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tessera {args:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A comments database whose posts consumer halted at 7 on another epoch.
async fn halted_consumer(target: &str) -> Db {
    let db = Db::open(target, tessera_comments::MIGRATIONS)
        .await
        .unwrap();
    let mut tx = db.begin().await.unwrap();
    tx.set_cursor("posts-events", 7).await.unwrap();
    tx.set_cursor("users-events", 4).await.unwrap();
    assert_eq!(
        tx.follow_epoch("posts-events", "epoch-old").await.unwrap(),
        "epoch-old"
    );
    tx.commit().await.unwrap();
    db.set_halted(
        "posts-events",
        Some("posts sent event 8 from outbox epoch epoch-new"),
    )
    .await
    .unwrap();
    db
}

/// Show, then reset with the default and with `--to`, through the binary.
async fn show_and_reset(db: &Db, location: &[&str], env: &[(&str, &str)]) {
    let show = [&["cursor", "show", "--service", "comments"], location].concat();
    let out = tessera(&show, env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("posts-events at 7 (epoch epoch-old; HALTED: posts sent event 8"),
        "{shown}"
    );
    assert!(shown.contains("users-events at 4"), "{shown}");

    let reset = [
        &[
            "cursor",
            "reset",
            "--service",
            "comments",
            "--producer",
            "posts",
        ],
        location,
    ]
    .concat();
    let out = tessera(&reset, env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("reset posts-events to 0; it was posts-events at 7"),
        "{said}"
    );
    let state = db.cursor_state("posts-events").await.unwrap();
    assert_eq!(
        (state.position, state.epoch, state.halted),
        (0, None, None),
        "the reset forgets the epoch and the halt"
    );
    assert_eq!(
        db.cursor("users-events").await.unwrap(),
        4,
        "other cursors stay"
    );

    let to = [&reset[..], &["--to", "5"]].concat();
    let out = tessera(&to, env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(db.cursor("posts-events").await.unwrap(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_resynchronises_a_halted_consumer_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let db = halted_consumer(&format!("{data}/comments.db")).await;
    show_and_reset(&db, &["--data-dir", data], &[]).await;
    // The data dir can come from the environment, as for `serve`.
    let out = tessera(
        &["cursor", "show", "--service", "comments"],
        &[("TESSERA_DATA_DIR", data)],
    );
    assert!(text(&out.stdout).contains("posts-events at 5"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_resynchronises_a_halted_consumer_on_postgres() {
    let Ok(url) = std::env::var("TESSERA_TEST_DATABASE_URL") else {
        println!("skipped: TESSERA_TEST_DATABASE_URL not set");
        return;
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!("tessera_cursor_{}_{nanos}", std::process::id());
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let (base, query) = url.split_once('?').unwrap_or((&url, ""));
    let base = base.rsplit_once('/').map_or(base, |(server, _)| server);
    let own = if query.is_empty() {
        format!("{base}/{name}")
    } else {
        format!("{base}/{name}?{query}")
    };
    let db = halted_consumer(&own).await;
    show_and_reset(&db, &[], &[("DATABASE_URL", own.as_str())]).await;
    db.close().await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}

#[test]
fn mistakes_exit_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    std::fs::write(dir.path().join("comments.db"), b"").unwrap();
    for (args, flag) in [
        (
            vec!["--service", "comments", "--producer", "gateway"],
            "--producer",
        ),
        (
            vec!["--service", "gateway", "--producer", "posts"],
            "--service",
        ),
        (
            vec!["--service", "posts", "--producer", "posts"],
            "--producer",
        ),
        (
            vec!["--service", "notifications", "--producer", "users"],
            "--data-dir",
        ),
        (
            vec!["--service", "comments", "--producer", "posts", "--to", "-1"],
            "--to",
        ),
    ] {
        let all = [&["cursor", "reset", "--data-dir", data], &args[..]].concat();
        let out = tessera(&all, &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{all:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{all:?}: {stderr}");
        assert!(stderr.contains(flag), "{all:?}: {stderr}");
    }
}
