//! A multi-replica topology of real `tessera serve` processes on loopback, as production runs
//! it: PostgreSQL (a fresh database per service, dropped afterwards), certificates from
//! `tessera certs`, every caller given `static:` lists of all replicas of its upstreams. Each
//! replica can be killed (-9), stopped (SIGTERM) and started again on the same ports.
//!
//! Only processes this module started are ever signalled, by their own PIDs; dropping the
//! [`Topology`] kills what is still running and drops the databases.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use tessera_cli::databases::{self, ServerUrl};
use tessera_mesh::tls::{TlsFiles, TlsSource};
use tonic::transport::Channel;

/// The real binary: the `tessera` main built again by this crate.
const BIN: &str = env!("CARGO_BIN_EXE_tessera-under-test");

/// The services in start order (dependencies first).
pub(crate) const SERVICES: [&str; 5] = ["users", "posts", "comments", "notifications", "gateway"];

/// A short drain delay keeps the tests quick; the drain timeout is long enough that a stop
/// held by an open stream (comments' WatchEvents on posts) would show, as the tests check.
pub(crate) const DRAIN_DELAY: Duration = Duration::from_millis(300);
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_millis(10_000);

/// How long a replica may take to report ready (debug build, 2 busy cores).
const READY_BOUND: Duration = Duration::from_secs(60);

/// How long a stop may take beyond the drain bounds before the test gives up on it.
const STOP_SLACK: Duration = Duration::from_secs(8);

/// One process of the topology.
struct Replica {
    service: &'static str,
    grpc: SocketAddr,
    admin: SocketAddr,
    public: Option<SocketAddr>,
    child: Option<Child>,
    log: PathBuf,
}

/// The running topology. Replicas are named `<service>-<i>`.
pub(crate) struct Topology {
    replicas: BTreeMap<String, Replica>,
    server: ServerUrl,
    certs: PathBuf,
    data: PathBuf,
    /// Dropped last (after the processes): certificates, logs, data dir.
    _dir: tempfile::TempDir,
}

/// A PostgreSQL server for this run, or `None` (and a printed reason) when
/// `TESSERA_TEST_DATABASE_URL` is unset.
pub(crate) fn test_server(label: &str) -> Option<ServerUrl> {
    let Ok(url) = std::env::var("TESSERA_TEST_DATABASE_URL") else {
        println!("skipped: TESSERA_TEST_DATABASE_URL not set (the chaos tests run on PostgreSQL)");
        return None;
    };
    let server =
        ServerUrl::parse(&url).unwrap_or_else(|e| panic!("TESSERA_TEST_DATABASE_URL: {e}"));
    // Unique per test and run, so parallel runs and leftovers never collide.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let prefix = format!(
        "chaos_{label}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    Some(
        server
            .with_prefix(&prefix)
            .unwrap_or_else(|e| panic!("database prefix {prefix}: {e}")),
    )
}

/// Free loopback ports, all held until every one is chosen so none is handed out twice.
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("a free port: {e}")))
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .unwrap_or_else(|e| panic!("a bound port's address: {e}"))
        })
        .collect()
}

/// Runs the binary with `args` to completion (bounded), panicking with its output on failure.
fn run_tool(args: &[&str]) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {BIN} {args:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{BIN} {args:?} did not finish within 60 s");
            }
        }
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{BIN} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{BIN} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Topology {
    /// Creates the databases and certificates, then starts users, `posts` replicas of posts
    /// and one of every other service, each as its own `tessera serve` process, and waits
    /// until every one is ready.
    pub(crate) async fn start(server: ServerUrl, posts: usize) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-chaos-")
            .tempdir()
            .unwrap_or_else(|e| panic!("a temporary dir: {e}"));
        let certs = dir.path().join("certs");
        let data = dir.path().join("data");

        let counts: Vec<(&'static str, usize)> = SERVICES
            .iter()
            .map(|s| (*s, if *s == "posts" { posts } else { 1 }))
            .collect();
        let ports = counts.iter().map(|(_, n)| n * 2).sum::<usize>() + 1;
        let mut addrs = free_addrs(ports).into_iter();
        let mut next = || {
            addrs
                .next()
                .unwrap_or_else(|| panic!("fewer free ports than asked for"))
        };
        let mut replicas = BTreeMap::new();
        for (service, n) in counts {
            for i in 0..n {
                let replica = Replica {
                    service,
                    grpc: next(),
                    admin: next(),
                    public: (service == "gateway").then(&mut next),
                    child: None,
                    log: dir.path().join(format!("{service}-{i}.log")),
                };
                replicas.insert(format!("{service}-{i}"), replica);
            }
        }
        // From here on a panic drops the topology: its processes and databases go with it.
        let mut topology = Self {
            replicas,
            server,
            certs,
            data,
            _dir: dir,
        };
        for service in databases::OWNERS {
            let url = topology.server.service_url(service);
            databases::ensure_database(&url).await.unwrap_or_else(|e| {
                panic!("creating {}: {e:#}", topology.server.database_name(service))
            });
        }
        run_tool(&["certs", "--dir", path_str(&topology.certs)]);
        // Every users replica must unseal the same signing keys: one key-encryption key,
        // owner-only as a mounted Secret would be.
        write_owner_only(&topology.key_file(), b"chaos-test-key-encryption-key-32");
        // Users first: every other service fetches its token keys from it.
        topology.spawn("users-0");
        topology.wait_ready("users-0").await;
        let rest: Vec<String> = topology
            .replicas
            .keys()
            .filter(|k| *k != "users-0")
            .cloned()
            .collect();
        for name in &rest {
            topology.spawn(name);
        }
        for name in &rest {
            topology.wait_ready(name).await;
        }
        topology
    }

    fn replica(&self, name: &str) -> &Replica {
        self.replicas
            .get(name)
            .unwrap_or_else(|| panic!("no replica {name} in the topology"))
    }

    fn replica_mut(&mut self, name: &str) -> &mut Replica {
        self.replicas
            .get_mut(name)
            .unwrap_or_else(|| panic!("no replica {name} in the topology"))
    }

    /// `static:` over every replica of `service`.
    fn target(&self, service: &str) -> String {
        let addrs: Vec<String> = self
            .replicas
            .values()
            .filter(|r| r.service == service)
            .map(|r| r.grpc.to_string())
            .collect();
        format!("static:{}", addrs.join(","))
    }

    fn env_of(&self, name: &str) -> Vec<(String, String)> {
        let r = self.replica(name);
        let mut env: Vec<(String, String)> = vec![
            ("TESSERA_GRPC_ADDR".into(), r.grpc.to_string()),
            ("TESSERA_ADMIN_ADDR".into(), r.admin.to_string()),
            (
                "TESSERA_TLS_DIR".into(),
                path_str(&self.certs.join(r.service)).into(),
            ),
            // Rotation is picked up quickly, as a mounted Secret's update would be.
            ("TESSERA_TLS_RELOAD_MS".into(), "200".into()),
            ("TESSERA_DATA_DIR".into(), path_str(&self.data).into()),
            (
                "TESSERA_DRAIN_DELAY_MS".into(),
                DRAIN_DELAY.as_millis().to_string(),
            ),
            (
                "TESSERA_DRAIN_TIMEOUT_MS".into(),
                DRAIN_TIMEOUT.as_millis().to_string(),
            ),
            // The load comes from one address and a few users: the gateway's limits would
            // measure themselves, not the mesh.
            ("TESSERA_RATE_LIMIT_USER_PER_SEC".into(), "100000".into()),
            ("TESSERA_RATE_LIMIT_USER_BURST".into(), "100000".into()),
            ("TESSERA_RATE_LIMIT_ADDR_PER_SEC".into(), "100000".into()),
            ("TESSERA_RATE_LIMIT_ADDR_BURST".into(), "100000".into()),
            ("TESSERA_LOG".into(), "info".into()),
            ("NO_COLOR".into(), "1".into()),
        ];
        if let Some(public) = r.public {
            env.push(("TESSERA_PUBLIC_ADDR".into(), public.to_string()));
        }
        if databases::OWNERS.contains(&r.service) {
            env.push(("DATABASE_URL".into(), self.server.service_url(r.service)));
        }
        if r.service == "users" {
            env.push((
                "TESSERA_KEY_ENCRYPTION_KEY_FILE".into(),
                path_str(&self.key_file()).into(),
            ));
        }
        for upstream in ["users", "posts", "comments", "notifications"] {
            env.push((
                format!("TESSERA_{}_TARGET", upstream.to_ascii_uppercase()),
                self.target(upstream),
            ));
        }
        env
    }

    /// The users service's key-encryption key, beside the certificates.
    fn key_file(&self) -> PathBuf {
        self.certs.with_file_name("key-encryption.key")
    }

    /// Starts replica `name` (which must not be running), its output appended to its log.
    pub(crate) fn spawn(&mut self, name: &str) {
        let env = self.env_of(name);
        let replica = self.replica_mut(name);
        assert!(replica.child.is_none(), "{name} is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&replica.log)
            .unwrap_or_else(|e| panic!("{}: {e}", replica.log.display()));
        let err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("{}: {e}", replica.log.display()));
        let child = Command::new(BIN)
            .args(["serve", replica.service])
            // Only what is set here: a developer's TESSERA_* or DATABASE_URL must not leak in.
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        replica.child = Some(child);
    }

    /// Waits until `name` reports SERVING on readiness; panics with its log if it exits or
    /// does not within the bound.
    pub(crate) async fn wait_ready(&mut self, name: &str) -> Duration {
        let started = Instant::now();
        let admin = self.replica(name).admin.to_string();
        loop {
            if let Some(status) = self.exited(name) {
                panic!(
                    "{name} exited ({status}) while starting:\n{}",
                    self.log(name)
                );
            }
            match tessera_cli::probe::probe(&admin, "readiness", Duration::from_secs(1)).await {
                Ok(status) if status == "SERVING" => return started.elapsed(),
                _ if started.elapsed() < READY_BOUND => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                other => panic!(
                    "{name} not ready within {READY_BOUND:?} ({other:?}):\n{}",
                    self.log(name)
                ),
            }
        }
    }

    fn exited(&mut self, name: &str) -> Option<ExitStatus> {
        let child = self.replica_mut(name).child.as_mut()?;
        child.try_wait().ok().flatten()
    }

    /// kill -9 of replica `name`.
    pub(crate) fn kill9(&mut self, name: &str) {
        let replica = self.replica_mut(name);
        let mut child = replica
            .child
            .take()
            .unwrap_or_else(|| panic!("{name} is not running"));
        // `Child::kill` is SIGKILL on Unix, sent to this child's own PID.
        child
            .kill()
            .unwrap_or_else(|e| panic!("kill -9 {name}: {e}"));
        let _ = child.wait();
    }

    /// SIGTERM to replica `name`, then waits (bounded) for it to exit; returns how long the
    /// stop took and the exit status.
    pub(crate) async fn terminate(&mut self, name: &str) -> (Duration, ExitStatus) {
        let pid = {
            let replica = self.replica(name);
            let child = replica
                .child
                .as_ref()
                .unwrap_or_else(|| panic!("{name} is not running"));
            child.id()
        };
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill -TERM {name}: {e}"));
        assert!(sent.success(), "kill -TERM {pid} ({name}) failed");
        let started = Instant::now();
        let bound = DRAIN_DELAY + DRAIN_TIMEOUT + STOP_SLACK;
        loop {
            if let Some(status) = self.exited(name) {
                self.replica_mut(name).child = None;
                return (started.elapsed(), status);
            }
            if started.elapsed() > bound {
                panic!(
                    "{name} did not stop within {bound:?} of SIGTERM:\n{}",
                    self.log(name)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The replica's log so far (every start of it).
    pub(crate) fn log(&self, name: &str) -> String {
        std::fs::read_to_string(&self.replica(name).log).unwrap_or_default()
    }

    /// The gateway's public (server-only TLS) port.
    pub(crate) fn public_addr(&self) -> SocketAddr {
        self.replica("gateway-0")
            .public
            .unwrap_or_else(|| panic!("the gateway has no public port"))
    }

    pub(crate) fn grpc_addr(&self, name: &str) -> SocketAddr {
        self.replica(name).grpc
    }

    /// Replica names of `service`.
    pub(crate) fn replicas_of(&self, service: &str) -> Vec<String> {
        self.replicas
            .iter()
            .filter(|(_, r)| r.service == service)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// A channel to the gateway's public port, verified against the dev CA.
    pub(crate) async fn public_channel(&self) -> Channel {
        let tls = tessera_tests::server_only_tls(&self.certs.join("ca.crt"))
            .unwrap_or_else(|e| panic!("the dev CA: {e:#}"));
        tessera_tests::connect_tls(self.public_addr(), tls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the gateway's public port: {e:#}"))
    }

    /// New certificates for every workload from `tessera certs` (same CA), written over the
    /// files the running processes read, as a Secret update does.
    pub(crate) fn rotate_certs(&self) {
        run_tool(&["certs", "--dir", path_str(&self.certs)]);
    }

    /// The certificate (DER) in `service`'s `tls.crt` now.
    pub(crate) fn cert_on_disk(&self, service: &str) -> Vec<u8> {
        let path = self.certs.join(service).join("tls.crt");
        let first = CertificateDer::pem_file_iter(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .next()
            .unwrap_or_else(|| panic!("{} holds no certificate", path.display()))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        first.as_ref().to_vec()
    }

    /// How many `method` calls replica `name` (this process of it) has answered with OK to
    /// `caller`, from its `/metrics`.
    pub(crate) async fn served(
        &self,
        name: &str,
        method: &str,
        caller: &str,
    ) -> anyhow::Result<u64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let admin = self.replica(name).admin;
        let mut stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(admin),
        )
        .await??;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body)).await??;
        let caller = format!("caller=\"{caller}\"");
        let method = format!("/{method}\"");
        let mut total = 0;
        for line in body.lines() {
            if line.starts_with("tessera_grpc_server_requests_total{")
                && line.contains(&method)
                && line.contains("code=\"OK\"")
                && line.contains(&caller)
                && let Some(value) = line.rsplit(' ').next()
            {
                total += value.parse::<u64>()?;
            }
        }
        Ok(total)
    }

    /// The certificate the gateway's public port presents to an end user's client.
    pub(crate) async fn served_public_cert(&self) -> anyhow::Result<Vec<u8>> {
        let tls = tessera_tests::server_only_tls(&self.certs.join("ca.crt"))?;
        let stream = tessera_tests::tls_connect(self.public_addr(), tls).await?;
        let (_, conn) = stream.get_ref();
        let cert = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or_else(|| anyhow::anyhow!("the public port presented no certificate"))?;
        Ok(cert.as_ref().to_vec())
    }

    /// The certificate `addr` presents in a handshake, as the operator (mTLS).
    pub(crate) async fn served_cert(&self, addr: SocketAddr) -> anyhow::Result<Vec<u8>> {
        let operator = TlsSource::load(TlsFiles::in_dir(&self.certs.join("operator")))?;
        let stream = tessera_tests::tls_connect(addr, operator.client_config()).await?;
        let (_, conn) = stream.get_ref();
        let cert = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or_else(|| anyhow::anyhow!("{addr} presented no certificate"))?;
        Ok(cert.as_ref().to_vec())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for replica in self.replicas.values_mut() {
            if let Some(mut child) = replica.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Drop may run inside the test's runtime (even while panicking): the databases are
        // dropped from a thread with a runtime of its own.
        let urls: Vec<String> = databases::OWNERS
            .iter()
            .map(|s| self.server.service_url(s))
            .collect();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                for url in urls {
                    tokio::time::timeout(Duration::from_secs(30), databases::drop_database(&url))
                        .await
                        .map_err(|_| "dropping a database took over 30 s".to_owned())?
                        .map_err(|e| format!("{e:#}"))?;
                }
                Ok::<(), String>(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("chaos: could not drop the test databases: {e}"),
            Err(_) => eprintln!("chaos: dropping the test databases panicked"),
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
}

/// Writes `contents` to a new file only its owner may read.
fn write_owner_only(path: &Path, contents: &[u8]) {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.write_all(contents)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
