//! A sixth workload beside the five: `tessera up --with digest` runs examples/digest with its
//! own certificate, identity and ports, and grpcurl reaches it like any other service. The
//! README's "Add a service" guide ends with this test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tessera_testing::eventually_blocking;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
/// How long `up` may take to start (a debug build generating keys, on 2 cores).
const START_BOUND: Duration = Duration::from_secs(90);
/// How long a condition may take to hold (events flow between services).
const EVENTUALLY: Duration = Duration::from_secs(30);

/// `tessera up --with digest` as a child process, killed when dropped.
struct Up {
    child: Child,
    endpoints: Value,
    logs: (PathBuf, PathBuf),
}

impl Up {
    fn start(data_dir: &Path, logs: &Path) -> Self {
        let logs = (logs.join("up.stdout"), logs.join("up.stderr"));
        let mut child = Command::new(TESSERA)
            .arg("up")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--port-base", "0", "--with", "digest"])
            .stdin(Stdio::null())
            .stdout(File::create(&logs.0).unwrap())
            .stderr(File::create(&logs.1).unwrap())
            .spawn()
            .unwrap();
        let path = data_dir.join("endpoints.json");
        let deadline = Instant::now() + START_BOUND;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("tessera up exited early ({status}): {}", read_logs(&logs));
            }
            // The file is renamed into place whole; parse until it appears.
            if let Some(endpoints) = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            {
                return Self {
                    child,
                    endpoints,
                    logs,
                };
            }
            assert!(
                Instant::now() < deadline,
                "no endpoints.json within {START_BOUND:?}: {}",
                read_logs(&logs)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn at(&self, pointer: &str) -> String {
        self.endpoints
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("endpoints.json has no {pointer}: {}", self.endpoints))
            .to_owned()
    }

    /// grpcurl as the operator (the dev CA and the operator's client certificate), with the
    /// end user's token when given.
    fn grpcurl(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new("grpcurl");
        cmd.arg("-cacert")
            .arg(self.at("/ca"))
            .arg("-cert")
            .arg(self.at("/operator/cert"))
            .arg("-key")
            .arg(self.at("/operator/key"));
        if let Some(token) = token {
            cmd.arg("-H").arg(format!("authorization: Bearer {token}"));
        }
        cmd.args(args);
        run_bounded(cmd, Duration::from_secs(30))
    }

    /// A call that must succeed; its JSON answer.
    fn call(&self, service: &str, token: Option<&str>, method: &str, body: &str) -> Value {
        let addr = self.at(&format!("/services/{service}/grpc"));
        let out = self.grpcurl(token, &["-d", body, &addr, method]);
        assert!(
            out.status.success(),
            "{method} on {service}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A call that must fail; grpcurl's report of the status.
    fn fails(&self, service: &str, token: Option<&str>, method: &str, body: &str) -> String {
        let addr = self.at(&format!("/services/{service}/grpc"));
        let out = self.grpcurl(token, &["-d", body, &addr, method]);
        assert!(!out.status.success(), "{method} on {service} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_logs(logs: &(PathBuf, PathBuf)) -> String {
    format!(
        "\n--- stdout\n{}\n--- stderr\n{}",
        std::fs::read_to_string(&logs.0).unwrap_or_default(),
        std::fs::read_to_string(&logs.1).unwrap_or_default()
    )
}

fn run_bounded(mut cmd: Command, bound: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + bound;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn grpcurl_available() -> bool {
    let found = Command::new("grpcurl")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipped: grpcurl is not on PATH");
    }
    found
}

/// A user signed up on users' internal port; (user id, access token).
fn sign_up(up: &Up, name: &str) -> (String, String) {
    let created = up.call(
        "users",
        None,
        "tessera.users.v1.UserService/CreateUser",
        &format!(
            r#"{{"username":"{name}","email":"{name}@example.com","password":"correct horse battery","display_name":"{name}"}}"#
        ),
    );
    let login = up.call(
        "users",
        None,
        "tessera.users.v1.UserService/Login",
        &format!(r#"{{"username":"{name}","password":"correct horse battery"}}"#),
    );
    let id = created["user"]["userId"].as_str().unwrap().to_owned();
    let token = login["accessToken"].as_str().unwrap().to_owned();
    (id, token)
}

#[test]
fn up_with_digest_runs_it_beside_the_five_and_grpcurl_reaches_it() {
    if !grpcurl_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let up = Up::start(&data, tmp.path());

    // Its own identity and certificate, and its row in the table.
    assert_eq!(
        up.at("/services/digest/identity"),
        "spiffe://tessera.local/ns/tessera/sa/digest"
    );
    assert!(data.join("certs/digest/tls.crt").is_file());
    let table = std::fs::read_to_string(&up.logs.0).unwrap();
    assert!(table.contains("\ndigest "), "{table}");

    // Reflection on its port lists its service (and not the others').
    let digest = up.at("/services/digest/grpc");
    let out = up.grpcurl(None, &[&digest, "list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("tessera.digest.v1.DigestService"),
        "{listed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!listed.contains("tessera.posts.v1.PostService"), "{listed}");
    // Its contract is compiled in its own crate; reflection describes it with the platform
    // message it returns (PostService's Post, from the platform's contracts).
    let out = up.grpcurl(
        None,
        &[&digest, "describe", "tessera.digest.v1.GetDigestResponse"],
    );
    let described = String::from_utf8_lossy(&out.stdout);
    assert!(
        described.contains("repeated .tessera.posts.v1.Post posts = 1;"),
        "{described}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Its access rule wants an end user; bad input names the field.
    let anonymous = up.fails(
        "digest",
        None,
        "tessera.digest.v1.DigestService/GetDigest",
        "{}",
    );
    assert!(anonymous.contains("Unauthenticated"), "{anonymous}");
    let (_, alice_token) = sign_up(&up, "alice");
    let (bob, bob_token) = sign_up(&up, "bob");
    let bad = up.fails(
        "digest",
        Some(&alice_token),
        "tessera.digest.v1.DigestService/FollowAuthor",
        r#"{"author_id":""}"#,
    );
    assert!(
        bad.contains("InvalidArgument") && bad.contains("author_id"),
        "{bad}"
    );

    // Bob posts; Alice follows him; his post reaches her digest through posts' events and
    // PostService.GetPost.
    let post = up.call(
        "posts",
        Some(&bob_token),
        "tessera.posts.v1.PostService/CreatePost",
        r#"{"title":"Hello","body":"From bob"}"#,
    );
    let post_id = post["post"]["postId"].as_str().unwrap().to_owned();
    up.call(
        "digest",
        Some(&alice_token),
        "tessera.digest.v1.DigestService/FollowAuthor",
        &format!(r#"{{"author_id":"{bob}"}}"#),
    );
    // Alice posts and Bob comments, so she has an unread notification for the digest to count
    // (NotificationService.ListNotifications, called with her token).
    let hers = up.call(
        "posts",
        Some(&alice_token),
        "tessera.posts.v1.PostService/CreatePost",
        r#"{"title":"Mine","body":"From alice"}"#,
    );
    let hers = hers["post"]["postId"].as_str().unwrap().to_owned();
    up.call(
        "comments",
        Some(&bob_token),
        "tessera.comments.v1.CommentService/CreateComment",
        &format!(r#"{{"post_id":"{hers}","body":"Hi alice"}}"#),
    );
    let mut last = Value::Null;
    eventually_blocking(EVENTUALLY, || {
        last = up.call(
            "digest",
            Some(&alice_token),
            "tessera.digest.v1.DigestService/GetDigest",
            "{}",
        );
        let posts: Vec<&str> = last["posts"]
            .as_array()
            .map(|p| p.iter().filter_map(|p| p["postId"].as_str()).collect())
            .unwrap_or_default();
        // int64 is a JSON string.
        anyhow::ensure!(
            posts == [post_id.as_str()] && last["unreadNotifications"] == "1",
            "bob's post and alice's notification in her digest"
        );
        Ok(())
    });
    drop(up);
}

#[test]
fn digest_settings_and_with_mistakes_exit_64_naming_the_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(TESSERA);
        cmd.args(args)
            .env_remove("TESSERA_POSTS_TARGET")
            .env_remove("DATABASE_URL")
            .current_dir(tmp.path());
        run_bounded(cmd, Duration::from_secs(30))
    };
    // `serve digest` knows its upstreams from the registration.
    let out = run(&["serve", "digest", "--tls-dir", "/nonexistent"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("TESSERA_POSTS_TARGET"), "{stderr}");
    for (with, says) in [("users", "always runs"), ("nope", "unknown workload")] {
        let out = run(&["up", "--port-base", "0", "--with", with]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "--with {with}: {stderr}");
        assert!(
            stderr.contains("--with") && stderr.contains(says),
            "{stderr}"
        );
    }
}
