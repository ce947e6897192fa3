//! `tessera serve` pins the identity of each upstream it dials: a `posts` whose users target
//! points at a running `notifications` (same CA, valid certificate, wrong workload) refuses
//! the handshake and logs both ids, instead of following that server's events or keys.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs::File,
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

/// A child process killed when the test is done with it, whatever happens.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tessera serve service` with its own certificate, on loopback, logging to `log`.
fn serve(service: &str, dir: &Path, grpc: &str, env: &[(&str, &str)], log: &Path) -> Killed {
    let child = Command::new(TESSERA)
        .args(["serve", service])
        .env_remove("DATABASE_URL")
        .env("TESSERA_TLS_DIR", dir.join("certs").join(service))
        .env("TESSERA_DATA_DIR", dir.join("data"))
        .env("TESSERA_GRPC_ADDR", grpc)
        .env("TESSERA_ADMIN_ADDR", "127.0.0.1:0")
        .env("TESSERA_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(File::create(log.with_extension("out")).unwrap())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap();
    Killed(child)
}

/// Waits (at most 60 s: a debug build on a busy machine) until `log` has a line matching.
fn wait_for_line(
    log: &Path,
    child: &mut Killed,
    what: &str,
    matches: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| matches(l)) {
            return line.to_owned();
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("the process exited ({status}) before {what}:\n{text}");
        }
        assert!(Instant::now() < deadline, "no {what} within 60 s:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn serve_refuses_an_upstream_presenting_another_workloads_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Command::new(TESSERA)
        .args(["certs", "--dir"])
        .arg(dir.path().join("certs"))
        .output()
        .unwrap();
    assert!(certs.status.success(), "{certs:?}");

    // The impostor: a real notifications workload (its own upstreams unreachable).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let impostor_addr = format!("127.0.0.1:{port}");
    let impostor_log = dir.path().join("notifications.log");
    let mut impostor = serve(
        "notifications",
        dir.path(),
        &impostor_addr,
        &[
            ("TESSERA_COMMENTS_TARGET", "static:127.0.0.1:9"),
            ("TESSERA_USERS_TARGET", "static:127.0.0.1:9"),
        ],
        &impostor_log,
    );
    wait_for_line(&impostor_log, &mut impostor, "the impostor serving", |l| {
        l.contains(&impostor_addr)
    });

    // posts follows UserService.WatchEvents from the start, so it dials "users" at once.
    let users_target = format!("static:{impostor_addr}");
    let posts_log = dir.path().join("posts.log");
    let mut posts = serve(
        "posts",
        dir.path(),
        "127.0.0.1:0",
        &[("TESSERA_USERS_TARGET", users_target.as_str())],
        &posts_log,
    );
    let line = wait_for_line(&posts_log, &mut posts, "a refusal naming both ids", |l| {
        l.contains("another identity")
            && l.contains("spiffe://tessera.local/ns/tessera/sa/users")
            && l.contains("spiffe://tessera.local/ns/tessera/sa/notifications")
    });
    println!("{line}");
    // The refusal is on the client side: the impostor never served posts a call.
    let served = std::fs::read_to_string(&impostor_log).unwrap();
    assert!(
        !served.contains("sa/posts"),
        "the impostor saw posts as a caller:\n{served}"
    );
}
