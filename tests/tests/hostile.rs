//! The public edge against hostile clients: a real `tessera up` (the `tessera-under-test`
//! binary as a child process) attacked through its public port with a raw HTTP/2 client (the
//! `h2` crate over tokio-rustls), the way issue #12's table describes, while a well-behaved
//! client on another loopback address keeps calling. Each row asserts that the honest calls
//! all succeeded; the suite asserts that the process's descriptors and memory stayed bounded,
//! and prints the figures (honest calls served, peak RSS, descriptors).
//!
//! Attackers come from 127.0.0.1x addresses, one per row, so each row meets fresh per-address
//! limits; the honest client comes from 127.0.0.2 (Linux routes all of 127/8 to loopback).
#![allow(clippy::unwrap_used)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use rustls::ClientConfig;
use tessera::{
    gateway::v1::{GetPostThreadRequest, feed_service_client::FeedServiceClient},
    notifications::v1::{
        ListNotificationsRequest, SubscribeNotificationsRequest,
        notification_service_client::NotificationServiceClient,
    },
    posts::v1::{CreatePostRequest, GetPostRequest, post_service_client::PostServiceClient},
    users::v1::{CreateUserRequest, LoginRequest, user_service_client::UserServiceClient},
};
use tessera_testing::tls::{channel_over, tls_connect_from};
use tessera_tests::{bearer, eventually, server_only_tls};
use tonic::transport::{Channel, Endpoint};

/// Short public-port timeouts, so the rows that wait on them finish quickly.
const HEADER_TIMEOUT_MS: u64 = 2000;
const BODY_TIMEOUT_MS: u64 = 2000;
const IDLE_TIMEOUT_MS: u64 = 3000;
/// The defaults the suite relies on (and sets explicitly, so it says what it tests).
const MAX_STREAMS_PER_CONN: usize = 100;
const MAX_CONNS_PER_ADDR: usize = 100;
/// Honest calls per row (each must succeed).
const HONEST_CALLS: u64 = 30;
/// One honest call's bound: past it, the call counts as failed.
const HONEST_CALL_TIMEOUT: Duration = Duration::from_secs(5);

const GET_POST: &str = "/tessera.posts.v1.PostService/GetPost";
const CREATE_POST: &str = "/tessera.posts.v1.PostService/CreatePost";
const GET_POST_THREAD: &str = "/tessera.gateway.v1.FeedService/GetPostThread";
const SUBSCRIBE: &str = "/tessera.notifications.v1.NotificationService/SubscribeNotifications";

fn attacker(row: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + row))
}

const HONEST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

// ---------------------------------------------------------------------------------------
// The process under attack
// ---------------------------------------------------------------------------------------

/// `tessera up` as a child process over a temporary data dir; killed (by its own pid) and
/// reaped when dropped.
struct Up {
    child: Child,
    dir: tempfile::TempDir,
    public: SocketAddr,
    ca: PathBuf,
}

impl Up {
    async fn start() -> Up {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tessera-under-test"))
            .arg("up")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--port-base", "0", "--log", "warn"])
            .env(
                "TESSERA_PUBLIC_HEADER_TIMEOUT_MS",
                HEADER_TIMEOUT_MS.to_string(),
            )
            .env(
                "TESSERA_PUBLIC_BODY_TIMEOUT_MS",
                BODY_TIMEOUT_MS.to_string(),
            )
            .env(
                "TESSERA_PUBLIC_IDLE_TIMEOUT_MS",
                IDLE_TIMEOUT_MS.to_string(),
            )
            .env(
                "TESSERA_PUBLIC_MAX_STREAMS_PER_CONN",
                MAX_STREAMS_PER_CONN.to_string(),
            )
            .env(
                "TESSERA_PUBLIC_MAX_CONNS_PER_ADDR",
                MAX_CONNS_PER_ADDR.to_string(),
            )
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut up = Up {
            child,
            public: SocketAddr::from(([127, 0, 0, 1], 0)),
            ca: PathBuf::new(),
            dir,
        };
        let endpoints = up.dir.path().join("data/endpoints.json");
        let json: serde_json::Value = eventually(Duration::from_secs(90), async || {
            if let Ok(Some(status)) = up.child.try_wait() {
                panic!("tessera up exited early ({status}):\n{}", up.log());
            }
            let text = std::fs::read_to_string(&endpoints).context("no endpoints.json yet")?;
            Ok(serde_json::from_str(&text)?)
        })
        .await;
        up.public = json["services"]["gateway"]["public"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        up.ca = PathBuf::from(json["ca"].as_str().unwrap());
        up
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    fn tls(&self) -> Arc<ClientConfig> {
        server_only_tls(&self.ca).unwrap()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open descriptors of `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// What the descriptors of `pid` are, counted by kind (sockets, files by extension, ...).
fn fd_kinds(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        let kind = match target.split_once(':') {
            Some((kind, _)) => kind.to_owned(),
            None => target.rsplit('.').next().unwrap_or("file").to_owned(),
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

/// A `VmRSS`/`VmHWM`-style line of `/proc/pid/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples the process's descriptors and RSS every 50 ms, keeping the peaks.
struct Sampler {
    peak_fds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let peak_fds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak_fds.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(fds(pid) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Sampler {
            peak_fds,
            stop,
            task,
        }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak_fds.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// A tonic channel from the honest client's address.
async fn honest_channel(up: &Up) -> Channel {
    let (addr, config) = (up.public, up.tls());
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(HONEST_CALL_TIMEOUT);
    channel_over(endpoint, move || {
        tls_connect_from(HONEST, addr, config.clone())
    })
    .await
    .unwrap()
}

/// The well-behaved client: reads a 64 KB post and its thread, anonymously, one call at a
/// time.
struct Honest {
    channel: Channel,
    post_id: String,
    served: AtomicU64,
}

impl Honest {
    /// Makes `n` calls (GetPost and GetPostThread in turn); returns the failures.
    async fn calls(&self, n: u64) -> Vec<String> {
        let mut failures = Vec::new();
        for i in 0..n {
            let started = Instant::now();
            let result = if i % 2 == 0 {
                PostServiceClient::new(self.channel.clone())
                    .get_post(GetPostRequest {
                        post_id: self.post_id.clone(),
                    })
                    .await
                    .map(|r| r.into_inner().post.map_or(0, |p| p.body.len()))
            } else {
                FeedServiceClient::new(self.channel.clone())
                    .get_post_thread(GetPostThreadRequest {
                        post_id: self.post_id.clone(),
                        comment_page_size: 0,
                    })
                    .await
                    .map(|r| r.into_inner().post.map_or(0, |p| p.body.len()))
            };
            match result {
                Ok(len) if len >= 60_000 => {
                    self.served.fetch_add(1, Ordering::Relaxed);
                }
                Ok(len) => failures.push(format!("call {i}: a body of {len} bytes")),
                Err(status) => failures.push(format!(
                    "call {i} after {:?}: {:?} {}",
                    started.elapsed(),
                    status.code(),
                    status.message()
                )),
            }
        }
        failures
    }

    /// Runs `n` honest calls and asserts they all succeeded.
    async fn must_be_served(&self, row: &str, n: u64) {
        let started = Instant::now();
        let failures = self.calls(n).await;
        println!(
            "  {row}: honest client {}/{n} calls served in {:.1}s",
            n as usize - failures.len(),
            started.elapsed().as_secs_f64()
        );
        assert!(
            failures.is_empty(),
            "{row}: honest calls failed: {failures:#?}"
        );
    }
}

/// A raw HTTP/2 connection from `from`; `window` sets SETTINGS_INITIAL_WINDOW_SIZE. The
/// connection's task ends when the server or the last handle closes it.
async fn raw(
    from: IpAddr,
    up: &Up,
    window: Option<u32>,
) -> anyhow::Result<(h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>)> {
    let tls = tls_connect_from(from, up.public, up.tls()).await?;
    let mut builder = h2::client::Builder::new();
    if let Some(window) = window {
        builder.initial_window_size(window);
    }
    let (send, conn) = builder.handshake(tls).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    // Wait for the server's SETTINGS (until then the client assumes no stream limit).
    let settled = Instant::now();
    while send.current_max_send_streams() == usize::MAX {
        anyhow::ensure!(
            settled.elapsed() < Duration::from_secs(5),
            "no SETTINGS from the server"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((send, task))
}

fn grpc_request(path: &str, token: Option<&str>) -> http::Request<()> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.body(()).unwrap()
}

/// A gRPC length-prefixed message.
fn framed(msg: &impl Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.freeze()
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Opens a stream (waiting for a stream slot at most `wait`).
async fn open(
    send: &h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    wait: Duration,
) -> anyhow::Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>)> {
    let mut ready = tokio::time::timeout(wait, send.clone().ready())
        .await
        .context("no stream slot")??;
    Ok(ready.send_request(req, false)?)
}

/// The gRPC status of a whole response, reading (and releasing) its body.
async fn status_of(resp: h2::client::ResponseFuture) -> anyhow::Result<i32> {
    let resp = resp.await?;
    if let Some(code) = grpc_status(resp.headers()) {
        return Ok(code);
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.remaining());
    }
    let trailers = body.trailers().await?.context("no trailers")?;
    grpc_status(&trailers).context("no grpc-status")
}

/// One unary call on a raw connection; its gRPC status.
async fn raw_unary(
    send: &h2::client::SendRequest<Bytes>,
    path: &str,
    msg: Bytes,
    token: Option<&str>,
) -> anyhow::Result<i32> {
    let (resp, mut stream) = open(send, grpc_request(path, token), Duration::from_secs(10)).await?;
    stream.send_data(msg, true)?;
    tokio::time::timeout(Duration::from_secs(20), status_of(resp))
        .await
        .context("no answer")?
}

// ---------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------

async fn sign_up(channel: &Channel, name: &str) -> (String, String) {
    let mut users = UserServiceClient::new(channel.clone());
    let user = users
        .create_user(CreateUserRequest {
            username: name.into(),
            email: format!("{name}@example.com"),
            password: "correct horse battery staple".into(),
            display_name: name.into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let token = users
        .login(LoginRequest {
            username: name.into(),
            password: "correct horse battery staple".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    (user.user_id, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_edge_holds_against_hostile_clients() {
    let suite = Instant::now();
    let up = Up::start().await;
    let pid = up.pid();
    let channel = honest_channel(&up).await;
    let (_, token) = sign_up(&channel, "honest").await;
    let (_, mallory) = sign_up(&channel, "mallory").await;
    let post = PostServiceClient::new(channel.clone())
        .create_post(bearer(
            &token,
            CreatePostRequest {
                title: "a long read".into(),
                body: "x".repeat(64_000),
                tags: vec![],
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .post
        .unwrap();
    let honest = Honest {
        channel: channel.clone(),
        post_id: post.post_id.clone(),
        served: AtomicU64::new(0),
    };
    honest.must_be_served("warm-up", 4).await;
    let baseline_fds = fds(pid);
    let baseline_kinds = fd_kinds(pid);
    let sampler = Sampler::start(pid);
    println!(
        "tessera up pid {pid}: {baseline_fds} descriptors, {} KiB RSS before the attacks",
        status_kib(pid, "VmRSS:")
    );

    zero_window_never_reading(&up, &honest, &post.post_id).await;
    header_only_streams(&up, &honest).await;
    feed_flood_and_forged_token(&up, &honest, &post.post_id, &token).await;
    subscription_flood(&up, &honest, &token).await;
    idle_connections(&up, &honest).await;
    huge_create_post(&up, &honest, &mallory).await;

    let peak_fds = sampler.finish().await;
    // Every attacker is gone: the process holds the sockets it held before. (Its database
    // pools may have grown under the load, by a few files each, up to their size.)
    let sockets = |kinds: &std::collections::BTreeMap<String, usize>| {
        kinds.get("socket").copied().unwrap_or(0)
    };
    let after = eventually(Duration::from_secs(20), async || {
        let now = fd_kinds(pid);
        anyhow::ensure!(
            sockets(&now) <= sockets(&baseline_kinds) + 8,
            "descriptors now {now:?}, before {baseline_kinds:?}"
        );
        Ok(fds(pid))
    })
    .await;
    let peak_rss = status_kib(pid, "VmHWM:");
    println!(
        "honest calls served: {}; peak RSS {} MiB; descriptors {baseline_fds} before, peak {peak_fds}, {after} after; {:.1}s in all",
        honest.served.load(Ordering::Relaxed),
        peak_rss / 1024,
        suite.elapsed().as_secs_f64()
    );
    // The per-address cap holds descriptors to what the attackers' few addresses may open.
    assert!(
        peak_fds <= (baseline_fds + 3 * MAX_CONNS_PER_ADDR + 64) as u64,
        "peak of {peak_fds} descriptors"
    );
    assert!(peak_rss < 1024 * 1024, "peak RSS of {peak_rss} KiB");
    assert!(up.child.id() == pid, "the process is still ours");
}

/// Row 1: one connection with SETTINGS_INITIAL_WINDOW_SIZE=0 asks for the 64 KB post 150
/// times and never reads. The server's stream limit admits 100 of them; other callers'
/// GetPost calls go on (the gateway reads each upstream response whole, so nothing waits in
/// its shared connection to posts).
async fn zero_window_never_reading(up: &Up, honest: &Honest, post_id: &str) {
    let (send, conn) = raw(attacker(1), up, Some(0)).await.unwrap();
    assert_eq!(send.current_max_send_streams(), MAX_STREAMS_PER_CONN);
    let msg = framed(&GetPostRequest {
        post_id: post_id.into(),
    });
    let mut held = Vec::new();
    for _ in 0..150 {
        let Ok((resp, mut stream)) = open(
            &send,
            grpc_request(GET_POST, None),
            Duration::from_millis(500),
        )
        .await
        else {
            break;
        };
        stream.send_data(msg.clone(), true).unwrap();
        held.push((resp, stream));
    }
    // h2 queues streams past the server's limit on the client side: only that many are
    // answered (response headers need no window), the rest wait for a slot.
    let requested = held.len();
    let held = futures::future::join_all(held.into_iter().map(|(resp, stream)| async move {
        let answered = tokio::time::timeout(Duration::from_secs(3), resp).await;
        (answered.ok().and_then(Result::ok), stream)
    }))
    .await;
    let answered = held.iter().filter(|(r, _)| r.is_some()).count();
    println!(
        "row 1, zero window: {requested} GetPost calls sent, {answered} streams admitted and answered, none read"
    );
    assert_eq!(
        answered, MAX_STREAMS_PER_CONN,
        "streams admitted on one connection"
    );
    honest.must_be_served("row 1", HONEST_CALLS).await;
    drop(held);
    drop(send);
    conn.abort();
}

/// Row 3: 12 connections x 100 `GetPostThread` streams that send headers and nothing else
/// (1200, more than the 1024 calls the request path admits at once). They hold no shedding
/// permit: other callers go on, and each gets DEADLINE_EXCEEDED once the body timeout passes.
async fn header_only_streams(up: &Up, honest: &Honest) {
    let mut conns = Vec::new();
    let mut held = Vec::new();
    for _ in 0..12 {
        let (send, task) = raw(attacker(2), up, None).await.unwrap();
        for _ in 0..MAX_STREAMS_PER_CONN {
            let (resp, stream) = open(
                &send,
                grpc_request(GET_POST_THREAD, None),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            held.push((resp, stream));
        }
        conns.push((send, task));
    }
    let opened = Instant::now();
    println!("row 3, header-only: {} streams open", held.len());
    honest.must_be_served("row 3", HONEST_CALLS).await;
    let answers = futures::future::join_all(held.into_iter().map(|(resp, stream)| async move {
        let code = status_of(resp).await;
        drop(stream);
        code
    }))
    .await;
    let deadline_exceeded = answers.iter().filter(|c| matches!(c, Ok(4))).count();
    println!(
        "  row 3: {deadline_exceeded}/{} header-only streams answered DEADLINE_EXCEEDED within {:.1}s",
        answers.len(),
        opened.elapsed().as_secs_f64()
    );
    assert_eq!(deadline_exceeded, answers.len(), "{answers:?}");
    for (_, task) in conns {
        task.abort();
    }
}

/// Row 4: 600 `GetPostThread` calls at once from one address, then the same with a forged
/// token. The feed is rate-limited like every other public method and the forged token is
/// refused; an owner reading their own thread sees their email (their token went downstream).
async fn feed_flood_and_forged_token(up: &Up, honest: &Honest, post_id: &str, owner: &str) {
    let mut conns = Vec::new();
    for _ in 0..6 {
        conns.push(raw(attacker(3), up, None).await.unwrap());
    }
    let msg = framed(&GetPostThreadRequest {
        post_id: post_id.into(),
        comment_page_size: 0,
    });
    let started = Instant::now();
    let flood = futures::future::join_all((0..600).map(|i| {
        let send = conns[i % conns.len()].0.clone();
        let msg = msg.clone();
        async move { raw_unary(&send, GET_POST_THREAD, msg, None).await }
    }));
    let (codes, ()) = tokio::join!(flood, async {
        honest.must_be_served("row 4", HONEST_CALLS).await;
    });
    let elapsed = started.elapsed().as_secs_f64();
    let ok = codes.iter().filter(|c| matches!(c, Ok(0))).count();
    let limited = codes.iter().filter(|c| matches!(c, Ok(8))).count();
    println!(
        "row 4, feed flood: 600 GetPostThread in {elapsed:.1}s: {ok} served, {limited} RESOURCE_EXHAUSTED"
    );
    assert_eq!(ok + limited, 600, "other answers: {codes:?}");
    // Burst 200, then 100/s: at most this many can pass.
    let allowed = 200.0 + 100.0 * elapsed + 10.0;
    assert!((ok as f64) <= allowed, "{ok} served in {elapsed:.1}s");

    let forged = tessera_mesh::token::Signer::generate()
        .unwrap()
        .sign("mallory", "ADMIN", Duration::from_secs(600))
        .0;
    // A fresh address, so the flood's empty bucket does not answer first.
    let (fresh, task) = raw(attacker(4), up, None).await.unwrap();
    for path in [GET_POST_THREAD, GET_POST] {
        let msg = if path == GET_POST {
            framed(&GetPostRequest {
                post_id: post_id.into(),
            })
        } else {
            msg.clone()
        };
        let code = raw_unary(&fresh, path, msg, Some(&forged)).await.unwrap();
        assert_eq!(code, 16, "{path} with a forged token");
    }
    println!("  row 4: a forged token is UNAUTHENTICATED on GetPostThread and GetPost");
    task.abort();
    for (_, task) in conns {
        task.abort();
    }

    // The owner sees their own email in the thread; an anonymous reader does not.
    let mut feed = FeedServiceClient::new(honest.channel.clone());
    let request = GetPostThreadRequest {
        post_id: post_id.into(),
        comment_page_size: 0,
    };
    let mine = feed
        .get_post_thread(bearer(owner, request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.author.unwrap().email, "honest@example.com");
    let anonymous = feed.get_post_thread(request).await.unwrap().into_inner();
    assert_eq!(anonymous.author.unwrap().email, "");
}

/// Row 5: 1080 `SubscribeNotifications` streams from 25 accounts (more than the 1024 streams
/// one upstream connection carries), spread over six addresses so the per-address rate limit
/// lets them in. Streams travel on upstream connections of their own: other users'
/// ListNotifications calls go on. (Subscriptions refused by a per-user cap or shed by the
/// gateway, RESOURCE_EXHAUSTED, or by a per-replica cap, UNAVAILABLE, are counted, not
/// failed: that the honest calls go on is the point.)
async fn subscription_flood(up: &Up, honest: &Honest, honest_token: &str) {
    let started = Instant::now();
    let mut tokens = Vec::new();
    for i in 0..25 {
        tokens.push(sign_up(&honest.channel, &format!("subscriber{i}")).await.1);
    }
    println!(
        "row 5, subscriptions: 25 accounts signed up in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let mut conns = Vec::new();
    for row in 8..14 {
        for _ in 0..2 {
            conns.push(raw(attacker(row), up, None).await.unwrap());
        }
    }
    let msg = framed(&SubscribeNotificationsRequest {});
    let mut held = Vec::new();
    for i in 0..1080 {
        let (send, _) = &conns[i % conns.len()];
        let token = &tokens[i % tokens.len()];
        let (resp, mut stream) = open(
            send,
            grpc_request(SUBSCRIBE, Some(token)),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        stream.send_data(msg.clone(), true).unwrap();
        held.push((resp, stream));
    }
    // Wait for each stream's answer: headers of an open stream, or a trailers-only refusal.
    // (Streams the upstream queues past its limit answer later; they stay held as they are.)
    let answers = futures::future::join_all(held.into_iter().map(|(resp, stream)| async move {
        let answer = tokio::time::timeout(Duration::from_secs(5), resp).await;
        (answer, stream)
    }))
    .await;
    let mut open_streams = 0;
    let mut refused = 0;
    let mut unavailable = 0;
    let mut waiting = 0;
    let mut other = Vec::new();
    for (answer, _) in &answers {
        match answer {
            Ok(Ok(resp)) => match grpc_status(resp.headers()) {
                None => open_streams += 1,
                Some(8) => {
                    if refused == 0 {
                        println!(
                            "  row 5: refused with {:?}",
                            resp.headers().get("grpc-message")
                        );
                    }
                    refused += 1;
                }
                Some(14) => unavailable += 1,
                Some(code) => {
                    other.push(format!("{code} {:?}", resp.headers().get("grpc-message")))
                }
            },
            Ok(Err(err)) => other.push(err.to_string()),
            Err(_) => waiting += 1,
        }
    }
    println!(
        "  row 5: 1080 subscriptions: {open_streams} open, {refused} RESOURCE_EXHAUSTED, {unavailable} UNAVAILABLE, {waiting} not yet answered"
    );
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    let mut notifications = NotificationServiceClient::new(honest.channel.clone());
    let mut failures = Vec::new();
    for _ in 0..HONEST_CALLS {
        match notifications
            .list_notifications(bearer(honest_token, ListNotificationsRequest::default()))
            .await
        {
            Ok(_) => {
                honest.served.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => failures.push(format!("{:?} {}", status.code(), status.message())),
        }
    }
    println!(
        "  row 5: honest client {}/{HONEST_CALLS} ListNotifications served",
        HONEST_CALLS as usize - failures.len()
    );
    assert!(failures.is_empty(), "row 5: {failures:#?}");
    drop(answers);
    for (_, task) in conns {
        task.abort();
    }
}

/// Row 6: 3000 TLS connections from one address that never send a request. Past the
/// per-address cap they are closed before any TLS work; the rest are closed when the header
/// timeout passes. A connection that made a call and went quiet is closed after the idle
/// timeout.
async fn idle_connections(up: &Up, honest: &Honest) {
    // Sockets, not all descriptors: the database pools may grow meanwhile.
    let sockets = || fd_kinds(up.pid()).get("socket").copied().unwrap_or(0);
    let before = sockets();
    let from = attacker(5);
    let started = Instant::now();
    let config = up.tls();
    let addr = up.public;
    // 200 handshakes at a time, each bounded, so the test's own descriptors stay modest.
    let mut established = Vec::new();
    let mut refused = 0;
    let mut peak = 0;
    for _ in 0..15 {
        let attempts = futures::future::join_all((0..200).map(|_| {
            let config = config.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), tls_connect_from(from, addr, config))
                    .await
            }
        }))
        .await;
        for attempt in attempts {
            match attempt {
                Ok(Ok(tls)) => established.push(tls),
                _ => refused += 1,
            }
        }
        peak = peak.max(sockets());
    }
    // Silent connections are closed after the header timeout, which frees their slots for
    // later batches: more than the cap complete over the run, never more than it at once.
    println!(
        "row 6, idle TLS: 3000 connections in {:.1}s: {} completed the handshake, {refused} closed at once; at most {peak} sockets open (was {before})",
        started.elapsed().as_secs_f64(),
        established.len(),
    );
    // At most the cap at once; each silent one frees its slot after the header timeout.
    let rounds = started.elapsed().as_millis() as usize / HEADER_TIMEOUT_MS as usize + 2;
    assert!(
        established.len() <= MAX_CONNS_PER_ADDR * rounds,
        "{} handshakes completed ({refused} refused)",
        established.len()
    );
    assert!(
        peak <= before + MAX_CONNS_PER_ADDR + 16,
        "{peak} sockets open (was {before})"
    );
    honest.must_be_served("row 6", HONEST_CALLS).await;
    // The silent ones are closed by the server once the header timeout has passed.
    let silent_since = Instant::now();
    let mut open = established;
    eventually(Duration::from_secs(15), async || {
        let mut still = Vec::new();
        for mut tls in std::mem::take(&mut open) {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(10), tls.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {}
                Ok(Ok(_)) | Err(_) => still.push(tls),
            }
        }
        let n = still.len();
        open = still;
        anyhow::ensure!(n == 0, "{n} silent connections still open");
        Ok(())
    })
    .await;
    println!(
        "  row 6: every silent connection closed by the server {:.1}s later",
        silent_since.elapsed().as_secs_f64()
    );

    // A connection that made a call and then idles is closed (GOAWAY) after the idle timeout.
    let (send, conn) = raw(attacker(6), up, None).await.unwrap();
    let code = raw_unary(
        &send,
        GET_POST,
        framed(&GetPostRequest {
            post_id: honest.post_id.clone(),
        }),
        None,
    )
    .await
    .unwrap();
    assert_eq!(code, 0);
    let idle_since = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), conn)
        .await
        .expect("the idle connection was not closed")
        .unwrap();
    println!(
        "  row 6: an idle connection was closed after {:.1}s",
        idle_since.elapsed().as_secs_f64()
    );
    drop(send);
}

/// Row 7: a 10 MiB CreatePost is refused at the edge as RESOURCE_EXHAUSTED (not forwarded,
/// and not UNAVAILABLE, which tells clients to retry).
async fn huge_create_post(up: &Up, honest: &Honest, token: &str) {
    let (send, conn) = raw(attacker(7), up, None).await.unwrap();
    let huge = framed(&CreatePostRequest {
        title: "huge".into(),
        body: "x".repeat(10 * 1024 * 1024),
        tags: vec![],
        request_id: String::new(),
    });
    let (code, ()) = tokio::join!(
        raw_unary(&send, CREATE_POST, huge, Some(token)),
        honest.must_be_served("row 7", HONEST_CALLS / 3)
    );
    let code = code.unwrap();
    println!("row 7, 10 MiB CreatePost: grpc-status {code}");
    assert_eq!(code, 8, "RESOURCE_EXHAUSTED");
    drop(send);
    conn.abort();
}
