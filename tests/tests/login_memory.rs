//! Expensive unauthenticated work is bounded: 200 concurrent wrong-password logins at a real
//! users process (`tessera serve users`, production argon2 cost, as many hashing slots as
//! the Deployment's CPU limit gives it) leave its peak RSS under the users Deployment's
//! memory limit, read from `k8s/base/users.yaml`. Figures are printed.
//!
//! Before the hashing bound, 150 such logins grew the process to 2.9 GiB (19 MiB per
//! concurrent argon2 hash).
#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_norway::Value;
use tessera::users::v1::{LoginRequest, user_service_client::UserServiceClient};
use tessera_mesh::tls::{TlsFiles, TlsSource};
use tessera_tests::{BOUND, connect_tls, eventually};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_tessera-under-test");
const LOGINS: usize = 200;

/// The users Deployment's `limits.memory` in bytes and `limits.cpu` in whole CPUs (rounded
/// up, at least one).
fn deployment_limits() -> (u64, usize) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/base/users.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    for document in serde_norway::Deserializer::from_str(&text) {
        let doc = Value::deserialize(document).unwrap();
        if doc["kind"].as_str() != Some("Deployment") {
            continue;
        }
        let containers = doc["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap();
        let limits = &containers[0]["resources"]["limits"];
        let memory = quantity_bytes(limits["memory"].as_str().unwrap());
        let cpu = match &limits["cpu"] {
            Value::String(s) => s.clone(),
            other => other.as_u64().unwrap().to_string(),
        };
        let cpus = match cpu.strip_suffix('m') {
            Some(milli) => milli.parse::<usize>().unwrap().div_ceil(1000),
            None => cpu.parse::<f64>().unwrap().ceil() as usize,
        };
        return (memory, cpus.max(1));
    }
    panic!("no Deployment in {}", path.display());
}

/// A Kubernetes memory quantity (`256Mi`, `1Gi`, `300M`, `1000000`) in bytes.
fn quantity_bytes(q: &str) -> u64 {
    let units: [(&str, u64); 6] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap() * factor;
        }
    }
    q.parse().unwrap()
}

/// `field` (e.g. `VmHWM`, the peak resident set) of `/proc/<pid>/status`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().unwrap();
    kib * 1024
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The child we started, killed (by its own PID) and reaped however the test ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_logins_stay_under_the_users_deployment_memory_limit() {
    let (memory_limit, cpus) = deployment_limits();
    let dir = tempfile::Builder::new()
        .prefix("tessera-login-memory-")
        .tempdir()
        .unwrap();
    let certs = dir.path().join("certs");
    let issued = Command::new(BIN)
        .arg("certs")
        .arg("--dir")
        .arg(&certs)
        .args(["--service", "users", "--service", "gateway"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(issued.success(), "tessera certs: {issued}");

    let grpc = free_port();
    let admin = free_port();
    let log = std::fs::File::create(dir.path().join("users.log")).unwrap();
    let child = Command::new(BIN)
        .args(["serve", "users"])
        .arg("--grpc-addr")
        .arg(grpc.to_string())
        .arg("--admin-addr")
        .arg(admin.to_string())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--tls-dir")
        .arg(certs.join("users"))
        .env_remove("DATABASE_URL")
        // What the Deployment's CPU limit gives the process (available_parallelism reads
        // the cgroup quota); the machine running the test may have more CPUs.
        .env("TESSERA_PASSWORD_HASH_CONCURRENCY", cpus.to_string())
        .env("TESSERA_LOG", "warn")
        .env("TESSERA_DRAIN_DELAY_MS", "0")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let child = Killed(child);
    let pid = child.0.id();

    // Login's access rule admits the gateway: call as the gateway does.
    let tls = TlsSource::load(TlsFiles::in_dir(&certs.join("gateway"))).unwrap();
    let channel = eventually(BOUND, async || {
        let channel = connect_tls(grpc, tls.client_config()).await?;
        let probe = UserServiceClient::new(channel.clone())
            .login(LoginRequest {
                username: "probe".into(),
                password: "not the password".into(),
            })
            .await;
        match probe {
            Err(status) if status.code() == Code::Unauthenticated => Ok(channel),
            other => Err(anyhow::anyhow!("not ready: {other:?}")),
        }
    })
    .await;
    let idle = proc_status_bytes(pid, "VmRSS");

    // Distinct unknown names: no per-name throttle applies, every call wants a hash.
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..LOGINS {
        let mut client = UserServiceClient::new(channel.clone());
        calls.spawn(async move {
            let call = client.login(LoginRequest {
                username: format!("hostile{i}"),
                password: format!("wrong password {i}"),
            });
            match tokio::time::timeout(Duration::from_secs(60), call).await {
                Ok(Ok(_)) => Code::Ok,
                Ok(Err(status)) => status.code(),
                Err(_) => Code::DeadlineExceeded,
            }
        });
    }
    let codes: Vec<Code> = calls.join_all().await;
    let elapsed = started.elapsed();
    let peak = proc_status_bytes(pid, "VmHWM");
    let after = proc_status_bytes(pid, "VmRSS");

    let count = |code: Code| codes.iter().filter(|c| **c == code).count();
    let checked = count(Code::Unauthenticated);
    let refused = count(Code::ResourceExhausted);
    println!(
        "{LOGINS} concurrent wrong-password logins at users ({cpus} hashing slot(s)) in \
         {elapsed:.2?}: {checked} checked (UNAUTHENTICATED), {refused} refused \
         (RESOURCE_EXHAUSTED)"
    );
    println!(
        "users RSS: idle {:.1} MiB, peak (VmHWM) {:.1} MiB, after {:.1} MiB; the Deployment's \
         limit {:.0} MiB",
        mib(idle),
        mib(peak),
        mib(after),
        mib(memory_limit)
    );
    assert_eq!(
        checked + refused,
        LOGINS,
        "every login is either checked or refused at once: {codes:?}"
    );
    assert!(
        checked >= cpus,
        "at least one round of hashes ran: {codes:?}"
    );
    assert!(
        peak < memory_limit,
        "peak RSS {:.1} MiB is past the Deployment's limit of {:.0} MiB",
        mib(peak),
        mib(memory_limit)
    );
    drop(child);
}
