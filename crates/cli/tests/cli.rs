//! The `tessera` binary as a user meets it: started as a process, reached over real sockets,
//! stopped with SIGTERM, and fed bad input. grpcurl parts are skipped (with a printed reason)
//! when `grpcurl` is not on PATH; everything else always runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tessera::users::v1::{CreateUserRequest, LoginRequest, user_service_client::UserServiceClient};
use tessera_client::ClientBuilder;
use tessera_mesh::tls::TlsFiles;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const SERVICES: [&str; 5] = ["users", "posts", "comments", "notifications", "gateway"];
/// How long `up` may take to start (first run: a debug build generating keys, on 2 cores).
const START_BOUND: Duration = Duration::from_secs(60);
/// How long `up` may take to drain and exit after SIGTERM (the drain timeout is 5 s).
const STOP_BOUND: Duration = Duration::from_secs(10);

fn tessera() -> Command {
    Command::new(TESSERA)
}

/// Runs `cmd` to completion, killing it after `bound`.
fn run_bounded(mut cmd: Command, bound: Duration) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let status = match wait_bounded(&mut child, bound) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {bound:?}; stderr: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

fn wait_bounded(child: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts the process failed with one clear line on stderr, and returns that line.
fn assert_one_line_failure(out: &Output, code: Option<i32>) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected a failure, got {:?}; stderr: {stderr}",
        out.status
    );
    if let Some(code) = code {
        assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "a panic: {stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "a panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
    lines[0].to_owned()
}

fn grpcurl_available() -> bool {
    let found = Command::new("grpcurl")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipping the grpcurl checks: grpcurl is not on PATH");
    }
    found
}

/// `tessera up` running as a child process; killed if the test ends without stopping it.
struct Up {
    child: Option<Child>,
    data_dir: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    endpoints: Value,
}

impl Up {
    /// Starts `tessera up --port-base 0` on `data_dir` and waits (bounded) for
    /// endpoints.json. `logs` gets the child's stdout and stderr files.
    fn start(data_dir: &Path, logs: &Path, run: &str) -> Self {
        Self::start_with(data_dir, logs, run, &[])
    }

    /// [`Up::start`] with extra environment variables.
    fn start_with(data_dir: &Path, logs: &Path, run: &str, env: &[(&str, &str)]) -> Self {
        let path = data_dir.join("endpoints.json");
        // A previous run leaves its endpoints.json behind until this one replaces it.
        let stale = std::fs::read(&path).ok();
        let stdout = logs.join(format!("{run}.stdout"));
        let stderr = logs.join(format!("{run}.stderr"));
        let child = tessera()
            .arg("up")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--port-base", "0"])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut up = Self {
            child: Some(child),
            data_dir: data_dir.to_owned(),
            stdout,
            stderr,
            endpoints: Value::Null,
        };
        let deadline = Instant::now() + START_BOUND;
        loop {
            if let Some(status) = up.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tessera up exited early ({status}): {}", up.logs());
            }
            // The file may be half-written when first seen: parse until it is whole.
            let parsed = std::fs::read(&path)
                .ok()
                .filter(|bytes| Some(bytes) != stale.as_ref())
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
            if let Some(endpoints) = parsed {
                up.endpoints = endpoints;
                return up;
            }
            assert!(
                Instant::now() < deadline,
                "no endpoints.json within {START_BOUND:?}: {}",
                up.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        format!(
            "\n--- stdout\n{}\n--- stderr\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    fn addr(&self, service: &str, port: &str) -> String {
        self.endpoints["services"][service][port]
            .as_str()
            .unwrap_or_else(|| panic!("endpoints.json has no {service}.{port}: {}", self.endpoints))
            .to_owned()
    }

    fn path(&self, pointer: &str) -> PathBuf {
        PathBuf::from(
            self.endpoints
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("endpoints.json has no {pointer}: {}", self.endpoints)),
        )
    }

    fn certs(&self) -> PathBuf {
        self.data_dir.join("certs")
    }

    /// `grpcurl` with the dev CA and, when `operator`, the operator client certificate.
    fn grpcurl(&self, operator: bool, args: &[&str]) -> Output {
        let mut cmd = Command::new("grpcurl");
        cmd.arg("-cacert").arg(self.path("/ca"));
        if operator {
            cmd.arg("-cert")
                .arg(self.path("/operator/cert"))
                .arg("-key")
                .arg(self.path("/operator/key"));
        }
        cmd.args(args);
        run_bounded(cmd, Duration::from_secs(30))
    }

    /// SIGTERM, then the exit status within the drain bound.
    fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM failed");
        let started = Instant::now();
        match wait_bounded(&mut child, STOP_BOUND) {
            Some(status) => {
                eprintln!("tessera up stopped in {:?}", started.elapsed());
                status
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tessera up did not stop within {STOP_BOUND:?} of SIGTERM: {}",
                    self.logs()
                );
            }
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A UserService client on the users' internal port, as the operator (mTLS). Call it inside
/// the runtime: the certificate watcher is a task.
fn operator_users_client(up: &Up) -> UserServiceClient<tessera_client::Channel> {
    let builder = ClientBuilder::mtls_files(
        TlsFiles::in_dir(&up.certs().join("operator")),
        Duration::from_secs(60),
    )
    .unwrap();
    UserServiceClient::new(
        builder
            .channel(&format!("static:{}", up.addr("users", "grpc")))
            .unwrap(),
    )
}

#[test]
fn up_serves_every_port_stops_on_sigterm_and_keeps_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let rt = tokio::runtime::Runtime::new().unwrap();

    // First run: a fresh data dir.
    let up = Up::start(&data_dir, tmp.path(), "first");
    assert!(
        up.path("/ca").is_absolute(),
        "paths are absolute: {}",
        up.endpoints
    );
    for service in SERVICES {
        let identity = up.endpoints["services"][service]["identity"].as_str();
        assert_eq!(
            identity,
            Some(format!("spiffe://tessera.local/ns/tessera/sa/{service}").as_str())
        );
        let admin = up.addr(service, "admin");
        let probe = run_bounded(
            {
                let mut cmd = tessera();
                cmd.args(["probe", "--addr", &admin, "--service", "readiness"]);
                cmd
            },
            Duration::from_secs(30),
        );
        assert!(
            probe.status.success(),
            "{service} readiness on {admin}: {} {}",
            String::from_utf8_lossy(&probe.stdout),
            String::from_utf8_lossy(&probe.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), "SERVING");
    }
    let stdout = std::fs::read_to_string(&up.stdout).unwrap();
    assert!(
        stdout.contains("grpcurl -cacert"),
        "the table shows grpcurl: {stdout}"
    );

    if grpcurl_available() {
        for (service, full) in [
            ("users", "tessera.users.v1.UserService"),
            ("posts", "tessera.posts.v1.PostService"),
            ("comments", "tessera.comments.v1.CommentService"),
            (
                "notifications",
                "tessera.notifications.v1.NotificationService",
            ),
            ("gateway", "tessera.gateway.v1.FeedService"),
        ] {
            let grpc = up.addr(service, "grpc");
            let out = up.grpcurl(true, &[&grpc, "list"]);
            let listed = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "grpcurl list on {service} ({grpc}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                listed.lines().any(|l| l == full),
                "{service} lists {listed}"
            );
            assert!(
                listed.lines().any(|l| l == "grpc.health.v1.Health"),
                "{listed}"
            );
        }
        // Without a client certificate an internal port refuses the call.
        let out = up.grpcurl(false, &[&up.addr("users", "grpc"), "list"]);
        assert!(
            !out.status.success(),
            "internal port without a client certificate"
        );

        // The public port: server-only TLS; reflection lists exactly what is public.
        let public = up.addr("gateway", "public");
        let out = up.grpcurl(false, &[&public, "list"]);
        assert!(
            out.status.success(),
            "grpcurl list on the public port: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            listed,
            [
                "grpc.health.v1.Health",
                "tessera.comments.v1.CommentService",
                "tessera.gateway.v1.FeedService",
                "tessera.notifications.v1.NotificationService",
                "tessera.posts.v1.PostService",
                "tessera.users.v1.UserService",
            ]
        );
        // `describe` there shows the public methods only; the internal port shows them all.
        let described = |out: Output| {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let users = "tessera.users.v1.UserService";
        let public_view = described(up.grpcurl(false, &[&public, "describe", users]));
        let internal = up.addr("users", "grpc");
        let internal_view = described(up.grpcurl(true, &[&internal, "describe", users]));
        for method in ["rpc Login", "rpc GetUser", "rpc GetJwks"] {
            assert!(public_view.contains(method), "{public_view}");
        }
        // WatchEvents is for the other services only (no `public` in its access rule).
        assert!(!public_view.contains("rpc WatchEvents"), "{public_view}");
        assert!(internal_view.contains("rpc WatchEvents"), "{internal_view}");
        // The operator certificate is accepted there too (it is simply not asked for).
        let out = up.grpcurl(true, &[&public, "list"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // State to find again after a restart: a user, created over mTLS as the operator.
    let created = rt
        .block_on(async {
            let request = CreateUserRequest {
                username: "persistent".into(),
                email: "persistent@example.com".into(),
                password: "correct horse battery".into(),
                display_name: "Persistent".into(),
                request_id: String::new(),
            };
            operator_users_client(&up).create_user(request).await
        })
        .unwrap_or_else(|s| panic!("CreateUser: {s:?}{}", up.logs()))
        .into_inner()
        .user
        .unwrap();

    let ca_before = std::fs::read(up.path("/ca")).unwrap();
    let users_cert_before = std::fs::read(up.certs().join("users/tls.crt")).unwrap();
    let status = up.terminate();
    assert!(
        status.success(),
        "tessera up exits 0 after SIGTERM, got {status}"
    );

    // Second run on the same data dir: same certificates, same data, fresh endpoints.
    let up = Up::start(&data_dir, tmp.path(), "second");
    assert_eq!(
        std::fs::read(up.path("/ca")).unwrap(),
        ca_before,
        "the CA is reused"
    );
    assert_eq!(
        std::fs::read(up.certs().join("users/tls.crt")).unwrap(),
        users_cert_before,
        "workload certificates are reused"
    );
    for service in SERVICES {
        let admin = up.addr(service, "admin");
        let probe = run_bounded(
            {
                let mut cmd = tessera();
                cmd.args(["probe", "--addr", &admin, "--service", "readiness"]);
                cmd
            },
            Duration::from_secs(30),
        );
        assert!(
            probe.status.success(),
            "second run: {service} readiness on {admin} (a stale endpoints.json?)"
        );
    }
    let login = rt
        .block_on(async {
            let request = LoginRequest {
                username: "persistent".into(),
                password: "correct horse battery".into(),
            };
            operator_users_client(&up).login(request).await
        })
        .unwrap_or_else(|s| panic!("Login after a restart: {s:?}{}", up.logs()))
        .into_inner();
    assert!(!login.access_token.is_empty());
    assert_eq!(login.user.unwrap().user_id, created.user_id);
    let status = up.terminate();
    assert!(
        status.success(),
        "second run exits 0 after SIGTERM, got {status}"
    );
}

/// `TESSERA_RATE_LIMIT_*` reach the gateway of a real `tessera up`: with a burst of 3 per
/// address and a trickle of refill, the fourth proxied call from one address is refused.
#[test]
fn up_applies_the_gateway_rate_limit_settings() {
    if !grpcurl_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let up = Up::start_with(
        &tmp.path().join("data"),
        tmp.path(),
        "limits",
        &[
            ("TESSERA_RATE_LIMIT_ADDR_BURST", "3"),
            ("TESSERA_RATE_LIMIT_ADDR_PER_SEC", "0.01"),
        ],
    );
    let public = up.addr("gateway", "public");
    let mut answers = Vec::new();
    for _ in 0..4 {
        let out = up.grpcurl(
            false,
            &[
                "-d",
                r#"{"username":"nobody","password":"not-the-password"}"#,
                &public,
                "tessera.users.v1.UserService/Login",
            ],
        );
        answers.push(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    for answer in &answers[..3] {
        assert!(answer.contains("Code: Unauthenticated"), "{answers:#?}");
    }
    assert!(
        answers[3].contains("Code: ResourceExhausted") && answers[3].contains("address"),
        "{answers:#?}"
    );
    assert!(up.terminate().success());
}

#[test]
fn unknown_service_is_a_usage_error_naming_it() {
    let mut cmd = tessera();
    cmd.args(["serve", "nope"]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    let line = assert_one_line_failure(&out, Some(64));
    assert!(line.contains("\"nope\""), "{line}");
}

#[test]
fn a_missing_upstream_target_is_a_usage_error_naming_it() {
    let mut cmd = tessera();
    cmd.args(["serve", "comments"])
        .env_remove("TESSERA_POSTS_TARGET")
        .env("TESSERA_USERS_TARGET", "static:127.0.0.1:1");
    let out = run_bounded(cmd, Duration::from_secs(30));
    let line = assert_one_line_failure(&out, Some(64));
    assert!(line.contains("TESSERA_POSTS_TARGET"), "{line}");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let mut cmd = tessera();
    cmd.args(["up", "--nope"]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    let line = assert_one_line_failure(&out, Some(64));
    assert!(line.contains("--nope"), "{line}");
}

#[test]
fn a_bad_setting_in_the_environment_exits_64_naming_it() {
    for (service, key, value) in [
        ("users", "TESSERA_MAX_CONCURRENCY", "0"),
        ("gateway", "TESSERA_RATE_LIMIT_USER_PER_SEC", "-1"),
        ("users", "TESSERA_PASSWORD_HASH_CONCURRENCY", "0"),
        ("users", "TESSERA_LOGIN_FAILURES_PER_MIN", "many"),
        ("notifications", "TESSERA_SUBSCRIPTION_MAX_LIFETIME_S", "0"),
        ("gateway", "TESSERA_CORS_ORIGINS", "*"),
        ("users", "TESSERA_TLS_RELOAD_MS", "0"),
        ("posts", "TESSERA_DEADLINE_CAP_MS", "0"),
        ("comments", "TESSERA_DRAIN_TIMEOUT_MS", "-1"),
        ("gateway", "TESSERA_PUBLIC_MAX_STREAMS_PER_CONN", "0"),
        ("gateway", "TESSERA_PUBLIC_MAX_CONNS_PER_ADDR", "-2"),
        ("gateway", "TESSERA_PUBLIC_HEADER_TIMEOUT_MS", "soon"),
        ("gateway", "TESSERA_PUBLIC_BODY_TIMEOUT_MS", "0"),
        ("gateway", "TESSERA_PUBLIC_IDLE_TIMEOUT_MS", "-1"),
    ] {
        let mut cmd = tessera();
        cmd.args(["serve", service]).env(key, value);
        let out = run_bounded(cmd, Duration::from_secs(30));
        let line = assert_one_line_failure(&out, Some(64));
        assert!(line.contains(key), "{line}");
    }
}

#[test]
fn a_bad_setting_under_up_exits_64_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = tessera();
    cmd.args(["up", "--port-base", "0", "--data-dir"])
        .arg(tmp.path())
        .env("TESSERA_PUBLIC_IDLE_TIMEOUT_MS", "0");
    let out = run_bounded(cmd, Duration::from_secs(60));
    let line = assert_one_line_failure(&out, Some(64));
    assert!(line.contains("TESSERA_PUBLIC_IDLE_TIMEOUT_MS"), "{line}");
}

#[test]
fn a_missing_certificate_dir_is_one_clear_line() {
    let mut cmd = tessera();
    cmd.args([
        "serve",
        "users",
        "--tls-dir",
        "/nonexistent/tessera-certs",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    cmd.arg("--data-dir").arg(tmp.path());
    let out = run_bounded(cmd, Duration::from_secs(30));
    let line = assert_one_line_failure(&out, None);
    assert!(line.contains("/nonexistent/tessera-certs"), "{line}");
}

#[test]
fn up_on_a_taken_port_is_one_clear_line() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    // A previous run's file: scripts waiting for endpoints.json must not be fooled by it.
    std::fs::write(tmp.path().join("endpoints.json"), "{}").unwrap();
    let mut cmd = tessera();
    // users listens on BASE+1: exactly the taken port.
    cmd.arg("up")
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["--port-base", &(port - 1).to_string()]);
    let out = run_bounded(cmd, Duration::from_secs(60));
    let line = assert_one_line_failure(&out, None);
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(
        !tmp.path().join("endpoints.json").exists(),
        "no endpoints.json (not even a stale one) for a mesh that did not start"
    );
}

#[test]
fn serve_on_a_taken_port_is_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let mut cmd = tessera();
    cmd.arg("certs")
        .arg("--dir")
        .arg(&certs)
        .args(["--service", "users"]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut cmd = tessera();
    cmd.args([
        "serve",
        "users",
        "--grpc-addr",
        &addr,
        "--admin-addr",
        "127.0.0.1:0",
    ])
    .arg("--tls-dir")
    .arg(certs.join("users"))
    .arg("--data-dir")
    .arg(tmp.path().join("data"));
    let out = run_bounded(cmd, Duration::from_secs(30));
    let line = assert_one_line_failure(&out, None);
    assert!(line.contains(&addr), "{line}");
}

#[test]
fn policy_prints_the_matrix_and_the_generated_network_policies() {
    let mut cmd = tessera();
    cmd.arg("policy");
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(out.status.success());
    let matrix = String::from_utf8(out.stdout).unwrap();
    assert!(
        matrix.contains("/tessera.posts.v1.PostService/CreatePost"),
        "{matrix}"
    );

    let mut cmd = tessera();
    cmd.args(["policy", "--netpol"]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(out.status.success());
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../k8s/base/networkpolicies-generated.yaml"
    ))
    .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), committed);
}

#[test]
fn certs_writes_files_and_prints_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let mut cmd = tessera();
    cmd.arg("certs").arg("--dir").arg(&dir).arg("--k8s");
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("ca.crt").is_file() && dir.join("ca.key").is_file());
    let stdout = String::from_utf8(out.stdout).unwrap();
    for name in SERVICES.iter().chain(&["operator"]) {
        for file in ["tls.crt", "tls.key", "ca.crt"] {
            assert!(dir.join(name).join(file).is_file(), "{name}/{file}");
        }
        assert!(
            stdout.contains(&format!("  name: {name}-tls\n")),
            "a Secret for {name}"
        );
    }
    assert_eq!(stdout.matches("kind: Secret\n").count(), 7, "{stdout}");
    assert_eq!(stdout.matches("type: kubernetes.io/tls\n").count(), 7);
    // The CA the manifests' Issuer signs with, for the namespace they deploy into.
    assert!(
        stdout.contains("  name: tessera-ca\n  namespace: tessera\n"),
        "{stdout}"
    );
    let ca_key = std::fs::read_to_string(dir.join("ca.key")).unwrap();
    assert!(stdout.contains(ca_key.lines().nth(1).unwrap()));
    let users_pem = std::fs::read_to_string(dir.join("users/tls.crt")).unwrap();
    let identity =
        tessera_mesh::tls::TlsSource::load(tessera_mesh::tls::TlsFiles::in_dir(&dir.join("users")))
            .unwrap()
            .identity();
    assert_eq!(
        identity.to_string(),
        "spiffe://tessera.local/ns/tessera/sa/users"
    );
    assert!(!tessera_mesh::certs::expires_within(
        &users_pem,
        std::time::Duration::from_secs(7 * 24 * 3600)
    ));
    let users_cert = std::fs::read_to_string(dir.join("users/tls.crt")).unwrap();
    assert!(
        stdout.contains(users_cert.lines().nth(1).unwrap()),
        "the Secret holds the written certificate"
    );
}

#[test]
fn probe_of_a_closed_port_exits_1() {
    let mut cmd = tessera();
    cmd.args(["probe", "--addr", "127.0.0.1:1", "--timeout-ms", "2000"]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    let line = assert_one_line_failure(&out, Some(1));
    assert!(line.contains("127.0.0.1:1"), "{line}");
}

#[test]
fn unusable_database_ca_and_public_certificate_exit_64_naming_the_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let mut cmd = tessera();
    cmd.arg("certs").arg("--dir").arg(&certs).args([
        "--namespace",
        "default",
        "--service",
        "users",
        "--service",
        "gateway",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let serve = |service: &str, key: &str, value: &str| {
        let mut cmd = tessera();
        cmd.args([
            "serve",
            service,
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .arg("--tls-dir")
        .arg(certs.join(service))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .env(key, value);
        for upstream in ["USERS", "POSTS", "COMMENTS", "NOTIFICATIONS"] {
            cmd.env(format!("TESSERA_{upstream}_TARGET"), "static:127.0.0.1:1");
        }
        run_bounded(cmd, Duration::from_secs(30))
    };
    for (service, key, value) in [
        (
            "users",
            "TESSERA_DATABASE_CA",
            "/nonexistent/database-ca.crt",
        ),
        ("users", "TESSERA_DATABASE_POOL_SIZE", "0"),
        (
            "gateway",
            "TESSERA_PUBLIC_TLS_DIR",
            "/nonexistent/public-tls",
        ),
    ] {
        let out = serve(service, key, value);
        let line = assert_one_line_failure(&out, Some(64));
        assert!(line.contains(key), "{line}");
    }
    // Files that are there but do not belong together are refused as well.
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(certs.join("gateway/tls.crt"), mixed.join("tls.crt")).unwrap();
    std::fs::copy(certs.join("users/tls.key"), mixed.join("tls.key")).unwrap();
    let out = serve("gateway", "TESSERA_PUBLIC_TLS_DIR", mixed.to_str().unwrap());
    let line = assert_one_line_failure(&out, Some(64));
    assert!(line.contains("TESSERA_PUBLIC_TLS_DIR"), "{line}");
}
