//! Chaos: replicas that die, stop, restart and change certificates under load lose no call.
//!
//! Each test starts its own multi-replica topology of real `tessera serve` processes on
//! PostgreSQL (fresh databases, dropped afterwards; see `chaos/topology.rs`): two posts
//! replicas behind `static:a,b`, one of every other service, the gateway in front. Clients
//! call the gateway's public port as end users do and retry as the README's client policy
//! says (idempotent methods on UNAVAILABLE, 3 tries, 25 ms backoff doubling to 250 ms);
//! writes are retried with the same `request_id`, and some are sent again at the end as a
//! client whose answer was lost would. Each test asserts 0 failed idempotent calls and
//! exactly-once effects, and prints the calls made and the longest latency.
//!
//! Skipped, with a printed reason, when `TESSERA_TEST_DATABASE_URL` is unset. The tests run
//! one at a time (each topology is seven processes on a 2-core machine).
//!
//! Beyond "no failed call": a fresh replica never rejects a valid token (its signing keys
//! are fetched before it is ready), and a stop with stream consumers attached ends within the
//! drain delay, never waiting for the drain timeout.

#[path = "chaos/topology.rs"]
mod topology;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tessera::{
    comments::v1::{
        CreateCommentRequest, ListCommentsRequest, comment_service_client::CommentServiceClient,
    },
    notifications::v1::{
        ListNotificationsRequest, notification_service_client::NotificationServiceClient,
    },
    posts::v1::{
        CreatePostRequest, GetPostRequest, ListPostsRequest, post_service_client::PostServiceClient,
    },
    users::v1::{CreateUserRequest, LoginRequest, user_service_client::UserServiceClient},
};
use tessera_tests::{bearer, eventually};
use tokio::task::JoinHandle;
use tonic::{Code, Status, transport::Channel};
use topology::{DRAIN_DELAY, DRAIN_TIMEOUT, Topology};

/// Readers and writers stop on their own after this many calls each, or this long.
const MAX_CALLS_PER_TASK: u64 = 50_000;
const LOAD_BOUND: Duration = Duration::from_secs(120);

/// How long the tests wait for load to make progress, a replica to come back, an event to
/// cross services.
const BOUND: Duration = Duration::from_secs(60);

/// One topology at a time: seven debug-build processes each on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The client retry policy of the README (and `tessera-client`'s default): idempotent calls
/// are tried up to 3 times on UNAVAILABLE, 25 ms before the second try, doubling, capped at
/// 250 ms.
const READ_TRIES: u32 = 3;
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(25u64 << attempt.min(4)).min(Duration::from_millis(250))
}

/// Writes carry a `request_id`, so they may be retried on any transient failure; each
/// stops after this many tries.
const WRITE_TRIES: u32 = 10;

/// What a group of load tasks did.
#[derive(Debug, Default)]
struct Tally {
    calls: u64,
    failed: u64,
    /// Calls that only succeeded after a retry.
    retried: u64,
    longest: Duration,
    /// The first few failures, for the assertion message.
    errors: Vec<String>,
    /// UNAUTHENTICATED answers to a valid token (never expected: they are not retried).
    token_rejections: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.calls += other.calls;
        self.failed += other.failed;
        self.retried += other.retried;
        self.longest = self.longest.max(other.longest);
        self.token_rejections += other.token_rejections;
        for e in other.errors {
            if self.errors.len() < 10 {
                self.errors.push(e);
            }
        }
    }

    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.errors.len() < 10 {
            self.errors.push(what);
        }
    }
}

/// Load running in the background until [`Load::stop`].
struct Load {
    stop: Arc<AtomicBool>,
    /// Successful calls so far, across tasks, to wait on progress.
    done: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Tally>>,
}

impl Load {
    fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            done: Arc::new(AtomicU64::new(0)),
            tasks: Vec::new(),
        }
    }

    /// Waits until `more` further calls have succeeded.
    async fn progress(&self, more: u64) {
        let target = self.done.load(Ordering::Relaxed) + more;
        let done = self.done.clone();
        eventually(BOUND, async || {
            let now = done.load(Ordering::Relaxed);
            if now >= target {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{now} of {target} calls done"))
            }
        })
        .await;
    }

    async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut tally = Tally::default();
        for task in self.tasks {
            match task.await {
                Ok(t) => tally.add(t),
                Err(e) => panic!("a load task panicked: {e}"),
            }
        }
        tally
    }

    /// `readers` tasks calling GetPost (through the gateway) on `posts` round-robin.
    fn read_posts(&mut self, channel: &Channel, readers: usize, posts: &[String]) {
        let posts = Arc::new(posts.to_vec());
        for reader in 0..readers {
            let mut client = PostServiceClient::new(channel.clone());
            let (stop, done, posts) = (self.stop.clone(), self.done.clone(), posts.clone());
            self.tasks.push(tokio::spawn(async move {
                let mut tally = Tally::default();
                let started = Instant::now();
                let mut n = reader;
                while !stop.load(Ordering::Relaxed)
                    && tally.calls < MAX_CALLS_PER_TASK
                    && started.elapsed() < LOAD_BOUND
                {
                    let id = &posts[n % posts.len()];
                    n += 1;
                    let call = Instant::now();
                    let mut attempt = 0;
                    let result = loop {
                        let request = GetPostRequest {
                            post_id: id.clone(),
                        };
                        match client.get_post(request).await {
                            Err(s) if s.code() == Code::Unavailable && attempt + 1 < READ_TRIES => {
                                tokio::time::sleep(backoff(attempt)).await;
                                attempt += 1;
                            }
                            other => break other,
                        }
                    };
                    tally.calls += 1;
                    tally.longest = tally.longest.max(call.elapsed());
                    match result {
                        Ok(response) => {
                            let got = response.into_inner().post.map(|p| p.post_id);
                            if got.as_deref() == Some(id.as_str()) {
                                done.fetch_add(1, Ordering::Relaxed);
                                tally.retried += u64::from(attempt > 0);
                            } else {
                                tally.fail(format!("GetPost {id} answered with {got:?}"));
                            }
                        }
                        Err(s) => tally.fail(format!("GetPost {id}: {s:?}")),
                    }
                }
                tally
            }));
        }
    }

    /// A task creating posts as `user`, each with its own `request_id` (`<tag>-<n>`, also
    /// the title), retried with the same id until acknowledged. Acknowledged request ids and
    /// post ids go into `acked`.
    fn write_posts(
        &mut self,
        channel: &Channel,
        user: &User,
        tag: &str,
        acked: Arc<tokio::sync::Mutex<BTreeMap<String, String>>>,
    ) {
        let client = PostServiceClient::new(channel.clone());
        let (stop, done) = (self.stop.clone(), self.done.clone());
        let (token, tag) = (user.token.clone(), tag.to_owned());
        self.tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let started = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed)
                && tally.calls < MAX_CALLS_PER_TASK
                && started.elapsed() < LOAD_BOUND
            {
                let request_id = format!("{tag}-{n}");
                n += 1;
                let call = Instant::now();
                let result = retry_write(&mut tally, || {
                    let mut client = client.clone();
                    let request = bearer(
                        &token,
                        CreatePostRequest {
                            title: request_id.clone(),
                            body: WRITTEN_BODY.into(),
                            tags: vec![],
                            request_id: request_id.clone(),
                        },
                    );
                    async move {
                        client
                            .create_post(request)
                            .await
                            .map(|r| r.into_inner().post.map(|p| p.post_id).unwrap_or_default())
                    }
                })
                .await;
                tally.calls += 1;
                tally.longest = tally.longest.max(call.elapsed());
                match result {
                    Ok(post_id) => {
                        acked.lock().await.insert(request_id, post_id);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => tally.fail(format!("CreatePost {request_id}: {s:?}")),
                }
            }
            tally
        }));
    }
}

/// Tries a write until it succeeds, fails for good, or [`WRITE_TRIES`] are spent. Transient
/// failures are retried (the caller reuses its `request_id`, so a retry of a write that did
/// happen answers with the first result). UNAUTHENTICATED to a valid token is counted and
/// not retried: a replica must not be ready before it can verify tokens.
async fn retry_write<T, F: Future<Output = Result<T, Status>>>(
    tally: &mut Tally,
    mut call: impl FnMut() -> F,
) -> Result<T, Status> {
    let mut attempt = 0;
    loop {
        let status = match call().await {
            Ok(value) => {
                tally.retried += u64::from(attempt > 0);
                return Ok(value);
            }
            Err(status) => status,
        };
        let transient = match status.code() {
            Code::Unavailable | Code::DeadlineExceeded => true,
            Code::Unauthenticated => {
                tally.token_rejections += 1;
                false
            }
            _ => false,
        };
        attempt += 1;
        if !transient || attempt >= WRITE_TRIES {
            return Err(status);
        }
        tokio::time::sleep(backoff(attempt - 1)).await;
    }
}

/// A signed-up, logged-in end user.
struct User {
    user_id: String,
    token: String,
}

async fn sign_up(channel: &Channel, username: &str) -> User {
    let mut users = UserServiceClient::new(channel.clone());
    let created = users
        .create_user(CreateUserRequest {
            username: username.into(),
            email: format!("{username}@example.com"),
            password: tessera_tests::PASSWORD.into(),
            display_name: username.into(),
            request_id: String::new(),
        })
        .await
        .unwrap_or_else(|s| panic!("CreateUser {username}: {s:?}"))
        .into_inner()
        .user
        .unwrap_or_else(|| panic!("CreateUser {username} returned no user"));
    let login = users
        .login(LoginRequest {
            username: username.into(),
            password: tessera_tests::PASSWORD.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("Login {username}: {s:?}"))
        .into_inner();
    User {
        user_id: created.user_id,
        token: login.access_token,
    }
}

async fn create_posts(channel: &Channel, user: &User, n: usize) -> Vec<String> {
    let mut posts = PostServiceClient::new(channel.clone());
    let mut ids = Vec::new();
    for i in 0..n {
        let post = posts
            .create_post(bearer(
                &user.token,
                CreatePostRequest {
                    title: format!("seed {i}"),
                    body: "read under chaos".into(),
                    tags: vec![],
                    request_id: format!("seed-{i}"),
                },
            ))
            .await
            .unwrap_or_else(|s| panic!("CreatePost seed {i}: {s:?}"))
            .into_inner()
            .post
            .unwrap_or_else(|| panic!("CreatePost seed {i} returned no post"));
        ids.push(post.post_id);
    }
    ids
}

/// Every post of `author` (title → post ids), paged through ListPosts.
async fn stored_posts(channel: &Channel, author: &str) -> BTreeMap<String, Vec<String>> {
    let mut posts = PostServiceClient::new(channel.clone());
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut page_token = String::new();
    for _ in 0..1000 {
        let page = posts
            .list_posts(ListPostsRequest {
                author_id: author.into(),
                page_size: 100,
                page_token: page_token.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("ListPosts: {s:?}"))
            .into_inner();
        for post in page.posts {
            out.entry(post.title).or_default().push(post.post_id);
        }
        if page.next_page_token.is_empty() {
            return out;
        }
        page_token = page.next_page_token;
    }
    panic!("ListPosts did not end within 1000 pages");
}

/// How long after it reported ready replica `name` answered its first GetPost from the
/// gateway (printed, not asserted: timings are not asserted in tests).
async fn first_call(mesh: &Topology, name: &str) -> String {
    let ready = Instant::now();
    let deadline = ready + BOUND;
    while Instant::now() < deadline {
        if mesh
            .served(name, "GetPost", "gateway")
            .await
            .is_ok_and(|n| n > 0)
        {
            return format!(
                "first call {:.2}s after ready",
                ready.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    format!("no call within {BOUND:?} of ready")
}

fn report(test: &str, what: &str, tally: &Tally, elapsed: Duration) {
    println!(
        "chaos {test}: {what}: {} calls in {:.1}s, {} failed, {} retried, longest {:.0} ms",
        tally.calls,
        elapsed.as_secs_f64(),
        tally.failed,
        tally.retried,
        tally.longest.as_secs_f64() * 1000.0
    );
}

fn assert_none_failed(test: &str, what: &str, tally: &Tally) {
    assert!(tally.calls > 0, "{test}: no {what} were made");
    assert_eq!(
        tally.failed, 0,
        "{test}: {what} failed: {:#?}",
        tally.errors
    );
}

/// The body of every post the writers create.
const WRITTEN_BODY: &str = "written under chaos";

/// Sends up to `n` acknowledged writes again, as a client whose acknowledgement was lost
/// would: each must answer with the post it first created.
async fn replay_writes(
    test: &str,
    channel: &Channel,
    token: &str,
    acked: &BTreeMap<String, String>,
    n: usize,
) {
    let mut posts = PostServiceClient::new(channel.clone());
    for (request_id, post_id) in acked.iter().take(n) {
        let again = posts
            .create_post(bearer(
                token,
                CreatePostRequest {
                    title: request_id.clone(),
                    body: WRITTEN_BODY.into(),
                    tags: vec![],
                    request_id: request_id.clone(),
                },
            ))
            .await
            .unwrap_or_else(|s| panic!("{test}: CreatePost {request_id} again: {s:?}"))
            .into_inner()
            .post
            .map(|p| p.post_id);
        assert_eq!(
            again.as_deref(),
            Some(post_id.as_str()),
            "{test}: {request_id} sent again created another post"
        );
    }
}

/// Exactly once: every acknowledged write is stored once, under the post id it was
/// acknowledged with, and nothing else was stored for these writers beyond the `failed`
/// writes (which may or may not have happened).
async fn assert_exactly_once(
    test: &str,
    channel: &Channel,
    author: &str,
    acked: &BTreeMap<String, String>,
    failed: u64,
    tags: &[&str],
) {
    let stored = stored_posts(channel, author).await;
    for (request_id, post_id) in acked {
        let ids = stored.get(request_id).cloned().unwrap_or_default();
        assert_eq!(
            ids,
            vec![post_id.clone()],
            "{test}: the write {request_id} was acknowledged as {post_id} and stored as {ids:?}"
        );
    }
    let ours = stored
        .iter()
        .filter(|(title, _)| tags.iter().any(|t| title.starts_with(&format!("{t}-"))))
        .count();
    // Any surplus beyond the failed writes is a duplicate or a write nobody asked for.
    assert!(
        ours >= acked.len() && ours as u64 <= acked.len() as u64 + failed,
        "{test}: {} writes acknowledged, {failed} failed, {ours} stored",
        acked.len()
    );
    println!(
        "chaos {test}: {} writes acknowledged, {ours} stored, none twice",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_posts_replica_under_load_fails_no_read_and_duplicates_no_write() {
    let Some(server) = topology::test_server("kill") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let mut mesh = Topology::start(server, 2).await;
    let channel = mesh.public_channel().await;
    let author = sign_up(&channel, "kill_author").await;
    let writer = sign_up(&channel, "kill_writer").await;
    let posts = create_posts(&channel, &author, 20).await;

    let started = Instant::now();
    let mut load = Load::new();
    for _ in 0..4 {
        // Four connections, two readers each: eight clients.
        let channel = mesh.public_channel().await;
        load.read_posts(&channel, 2, &posts);
    }
    // Writes too: one in flight on the killed replica may have committed without an answer,
    // and its retry (same request_id, on the other replica) must not create it twice.
    let acked = Arc::new(tokio::sync::Mutex::new(BTreeMap::new()));
    let mut writes = Load::new();
    for tag in ["k0", "k1"] {
        writes.write_posts(&channel, &writer, tag, acked.clone());
    }
    load.progress(300).await;
    writes.progress(20).await;
    // The reads reach both replicas, so the kill hits calls in flight.
    for name in mesh.replicas_of("posts") {
        let mesh = &mesh;
        eventually(BOUND, async || {
            let served = mesh.served(&name, "GetPost", "gateway").await?;
            anyhow::ensure!(served > 0, "{name} has answered no GetPost");
            Ok(())
        })
        .await;
    }
    mesh.kill9("posts-1");
    println!("chaos kill: posts-1 killed (-9)");
    load.progress(1000).await;
    mesh.spawn("posts-1");
    let ready = mesh.wait_ready("posts-1").await;
    println!(
        "chaos kill: posts-1 ready again {:.1}s after start, {}",
        ready.as_secs_f64(),
        first_call(&mesh, "posts-1").await
    );
    load.progress(1000).await;
    writes.progress(20).await;
    let reads = load.stop().await;
    let write_tally = writes.stop().await;
    report("kill", "GetPost", &reads, started.elapsed());
    report("kill", "CreatePost", &write_tally, started.elapsed());
    println!(
        "chaos kill: UNAUTHENTICATED answers to valid tokens: {}",
        write_tally.token_rejections
    );
    assert_none_failed("kill", "reads", &reads);
    assert_none_failed("kill", "writes", &write_tally);
    // The restarted replica has its token keys before it is ready.
    assert_eq!(
        write_tally.token_rejections, 0,
        "a fresh replica rejected valid tokens"
    );
    let acked = acked.lock().await.clone();
    replay_writes("kill", &channel, &writer.token, &acked, 20).await;
    assert_exactly_once(
        "kill",
        &channel,
        &writer.user_id,
        &acked,
        write_tally.failed,
        &["k0", "k1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_posts_under_read_and_write_load_loses_nothing() {
    let Some(server) = topology::test_server("roll") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let mut mesh = Topology::start(server, 2).await;
    let channel = mesh.public_channel().await;
    let reader = sign_up(&channel, "roll_author").await;
    let writer = sign_up(&channel, "roll_writer").await;
    let posts = create_posts(&channel, &reader, 20).await;

    let started = Instant::now();
    let mut reads = Load::new();
    for _ in 0..4 {
        let channel = mesh.public_channel().await;
        reads.read_posts(&channel, 2, &posts);
    }
    let acked = Arc::new(tokio::sync::Mutex::new(BTreeMap::new()));
    let mut writes = Load::new();
    for tag in ["w0", "w1"] {
        writes.write_posts(&channel, &writer, tag, acked.clone());
    }
    reads.progress(300).await;
    writes.progress(20).await;

    for name in mesh.replicas_of("posts") {
        let (stopped, status) = mesh.terminate(&name).await;
        let drain_timeout = mesh.log(&name).contains("drain timeout");
        println!(
            "chaos roll: {name} stopped {:.2}s after SIGTERM ({status}; drain delay {:.1}s, timeout {:.1}s){}",
            stopped.as_secs_f64(),
            DRAIN_DELAY.as_secs_f64(),
            DRAIN_TIMEOUT.as_secs_f64(),
            if drain_timeout {
                ", after the drain timeout"
            } else {
                ""
            }
        );
        assert!(status.success(), "{name} exited with {status} on SIGTERM");
        // Streams (comments' WatchEvents on posts) end on drain, so the stop takes the
        // drain delay (printed above), not the drain timeout.
        assert!(!drain_timeout, "{name} waited for the drain timeout");
        assert!(
            stopped < DRAIN_DELAY + Duration::from_secs(2),
            "{name} took {stopped:?} to stop (drain delay {DRAIN_DELAY:?})"
        );
        mesh.spawn(&name);
        let ready = mesh.wait_ready(&name).await;
        println!(
            "chaos roll: {name} ready again {:.1}s after start, {}",
            ready.as_secs_f64(),
            first_call(&mesh, &name).await
        );
        reads.progress(500).await;
        writes.progress(20).await;
    }
    let read_tally = reads.stop().await;
    let write_tally = writes.stop().await;
    report("roll", "GetPost", &read_tally, started.elapsed());
    report("roll", "CreatePost", &write_tally, started.elapsed());
    println!(
        "chaos roll: UNAUTHENTICATED answers to valid tokens: {}",
        write_tally.token_rejections
    );
    assert_none_failed("roll", "reads", &read_tally);
    assert_none_failed("roll", "writes", &write_tally);
    // A fresh replica has its token keys before it is ready.
    assert_eq!(
        write_tally.token_rejections, 0,
        "a fresh replica rejected valid tokens"
    );
    let acked = acked.lock().await.clone();
    replay_writes("roll", &channel, &writer.token, &acked, 20).await;
    assert_exactly_once(
        "roll",
        &channel,
        &writer.user_id,
        &acked,
        write_tally.failed,
        &["w0", "w1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_fails_no_call() {
    let Some(server) = topology::test_server("rotate") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let mesh = Topology::start(server, 2).await;
    let channel = mesh.public_channel().await;
    let author = sign_up(&channel, "rotate_author").await;
    let posts = create_posts(&channel, &author, 20).await;
    let watched: Vec<String> = topology::SERVICES
        .iter()
        .flat_map(|s| mesh.replicas_of(s))
        .collect();
    let mut before = BTreeMap::new();
    for name in &watched {
        let served = mesh
            .served_cert(mesh.grpc_addr(name))
            .await
            .unwrap_or_else(|e| panic!("{name}'s certificate: {e:#}"));
        before.insert(name.clone(), served);
    }

    let started = Instant::now();
    let mut load = Load::new();
    for _ in 0..4 {
        let channel = mesh.public_channel().await;
        load.read_posts(&channel, 2, &posts);
    }
    load.progress(300).await;
    mesh.rotate_certs();
    let rotated = Instant::now();
    for name in &watched {
        let service = name.rsplit_once('-').map_or(name.as_str(), |(s, _)| s);
        let new = mesh.cert_on_disk(service);
        assert_ne!(
            before[name], new,
            "tessera certs issued the same certificate"
        );
        let addr = mesh.grpc_addr(name);
        eventually(BOUND, async || {
            let served = mesh.served_cert(addr).await?;
            anyhow::ensure!(served == new, "{name} still serves its old certificate");
            Ok(())
        })
        .await;
    }
    // The gateway's public port too (the gateway's workload certificate).
    let new = mesh.cert_on_disk("gateway");
    eventually(BOUND, async || {
        let served = mesh.served_public_cert().await?;
        anyhow::ensure!(
            served == new,
            "the public port still serves the old certificate"
        );
        Ok(())
    })
    .await;
    println!(
        "chaos rotate: every port served its new certificate {:.1}s after the rewrite",
        rotated.elapsed().as_secs_f64()
    );
    // Calls keep flowing over connections made with the new certificates too.
    load.progress(1000).await;
    let reads = load.stop().await;
    report("rotate", "GetPost", &reads, started.elapsed());
    assert_none_failed("rotate", "reads", &reads);
    // A fresh client (new connection, new handshakes all the way down) still gets through.
    let fresh = mesh.public_channel().await;
    PostServiceClient::new(fresh)
        .get_post(GetPostRequest {
            post_id: posts[0].clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("GetPost on a new connection after rotation: {s:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_killed_with_events_pending_delivers_each_event_once() {
    let Some(server) = topology::test_server("notify") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let mut mesh = Topology::start(server, 2).await;
    let channel = mesh.public_channel().await;
    let author = sign_up(&channel, "notify_author").await;
    let commenter = sign_up(&channel, "notify_commenter").await;
    let posts = create_posts(&channel, &author, 5).await;

    let started = Instant::now();
    let mut reads = Load::new();
    reads.read_posts(&mesh.public_channel().await, 4, &posts);
    let comments = CommentServiceClient::new(channel.clone());
    let mut writes = Tally::default();
    let mut made = BTreeSet::new();
    let comment = async |n: usize, tally: &mut Tally| -> Option<String> {
        let request_id = format!("c-{n}");
        let call = Instant::now();
        let result = retry_write(tally, || {
            let mut comments = comments.clone();
            let request = bearer(
                &commenter.token,
                CreateCommentRequest {
                    post_id: posts[n % posts.len()].clone(),
                    body: format!("comment {n}"),
                    request_id: request_id.clone(),
                },
            );
            async move {
                comments
                    .create_comment(request)
                    .await
                    .map(|r| r.into_inner().comment.map(|c| c.comment_id))
            }
        })
        .await;
        tally.calls += 1;
        tally.longest = tally.longest.max(call.elapsed());
        match result {
            Ok(Some(id)) => Some(id),
            Ok(None) => {
                tally.fail(format!("CreateComment {request_id} returned no comment"));
                None
            }
            Err(s) => {
                tally.fail(format!("CreateComment {request_id}: {s:?}"));
                None
            }
        }
    };

    // Comments before, during (events pending in comments' outbox) and after the kill.
    let mut n = 0;
    for _ in 0..20 {
        made.extend(comment(n, &mut writes).await);
        n += 1;
    }
    mesh.kill9("notifications-0");
    println!("chaos notify: notifications-0 killed (-9) after {n} comments");
    for _ in 0..20 {
        made.extend(comment(n, &mut writes).await);
        n += 1;
    }
    mesh.spawn("notifications-0");
    mesh.wait_ready("notifications-0").await;
    for _ in 0..20 {
        made.extend(comment(n, &mut writes).await);
        n += 1;
    }
    report("notify", "CreateComment", &writes, started.elapsed());
    assert_none_failed("notify", "comment writes", &writes);
    assert_eq!(made.len(), n, "comments acknowledged with distinct ids");
    // Exactly once in comments too: each acknowledged comment stored, none twice.
    let mut stored = Vec::new();
    let mut lister = CommentServiceClient::new(channel.clone());
    for post in &posts {
        let mut page_token = String::new();
        for _ in 0..100 {
            let page = lister
                .list_comments(ListCommentsRequest {
                    post_id: post.clone(),
                    page_size: 100,
                    page_token: page_token.clone(),
                })
                .await
                .unwrap_or_else(|s| panic!("ListComments {post}: {s:?}"))
                .into_inner();
            stored.extend(page.comments.into_iter().map(|c| c.comment_id));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
    }
    assert_eq!(stored.len(), made.len(), "comments stored for {n} made");
    assert_eq!(
        stored.into_iter().collect::<BTreeSet<_>>(),
        made,
        "the comments stored are the ones acknowledged"
    );

    let mut notifications = NotificationServiceClient::new(channel.clone());
    let unread = async |client: &mut NotificationServiceClient<Channel>| {
        client
            .list_notifications(bearer(
                &author.token,
                ListNotificationsRequest {
                    page_size: 100,
                    page_token: String::new(),
                    unread_only: false,
                },
            ))
            .await
            .map(|r| r.into_inner().unread_count)
    };
    let expected = made.len() as i64;
    eventually(BOUND, async || {
        let count = unread(&mut notifications).await?;
        anyhow::ensure!(count >= expected, "{count} of {expected} notifications");
        Ok(())
    })
    .await;
    // One more comment: its notification comes after every earlier event's, so once it is
    // there any duplicate of an earlier one would be too.
    made.extend(comment(n, &mut writes).await);
    let expected = made.len() as i64;
    let count = eventually(BOUND, async || {
        let count = unread(&mut notifications).await?;
        anyhow::ensure!(count >= expected, "{count} of {expected} notifications");
        Ok(count)
    })
    .await;
    assert_eq!(
        count, expected,
        "notifications delivered for {expected} comments"
    );
    // And they are one per comment, not a duplicate standing in for a lost one.
    let mut seen = BTreeSet::new();
    let mut page_token = String::new();
    for _ in 0..100 {
        let page = notifications
            .list_notifications(bearer(
                &author.token,
                ListNotificationsRequest {
                    page_size: 100,
                    page_token: page_token.clone(),
                    unread_only: false,
                },
            ))
            .await
            .unwrap_or_else(|s| panic!("ListNotifications: {s:?}"))
            .into_inner();
        seen.extend(page.notifications.into_iter().map(|n| n.comment_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, made, "one notification per comment made");
    println!("chaos notify: {count} comments, {count} notifications, each once");

    let read_tally = reads.stop().await;
    report("notify", "GetPost", &read_tally, started.elapsed());
    assert_none_failed("notify", "reads", &read_tally);
}
