//! Scenario B: the whole mesh end to end through the gateway's public port, on a seeded
//! dataset, with the services' resident memory.
//!
//! Seeding goes through the services' own libraries, in this process, straight into the
//! SQLite files `tessera up` will open: the same handlers and the same outbox events as the
//! public API, without TLS, and with a cheap argon2 cost for the seeded passwords (hashes
//! record their own parameters, so Login still verifies them; new sign-ups keep the
//! production cost). Then `tessera up` runs in a child process (all five services in one
//! process, so one RSS for all of them), and afterwards each service once more on its own
//! with `tessera serve <service>`, for per-service resident memory at idle.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::{StreamExt, TryStreamExt};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tessera::{
    comments::v1::{CreateCommentRequest, comment_service_server::CommentService},
    gateway::v1::{GetPostThreadRequest, feed_service_client::FeedServiceClient},
    posts::v1::{
        CreatePostRequest,
        post_service_client::PostServiceClient,
        post_service_server::{PostService, PostServiceServer},
    },
    users::v1::{
        CreateUserRequest, LoginRequest, user_service_client::UserServiceClient,
        user_service_server::UserService,
    },
};
use tessera_mesh::{
    config::SERVICES,
    token::{EndUser, UserClaims},
};
use tonic::Request;

use crate::{
    BenchError,
    client::{Conn, Pool, Security, loopback_sources},
    compare::{Comparison, Sample, compare},
    load::{CallFn, closed_loop},
    procfs::{self, CpuSample, MachineCpu},
    procs::{self, Proc},
    report::{mib, ms, table, us},
    stats::{Failure, Summary},
};

/// The password of every seeded user.
const PASSWORD: &str = "bench-password";

/// How scenario B runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// 1.0 = 1k users, 10k posts, 50k comments.
    pub scale: f64,
    /// Calls in flight for the throughput runs.
    pub concurrency: usize,
    /// Length of each run at `concurrency`.
    pub time: Duration,
    /// Length of each run at one call in flight.
    pub latency_time: Duration,
    /// The `tessera` binary.
    pub tessera: PathBuf,
    /// This benchmark's binary (`tessera-bench monolith`).
    pub bench_exe: PathBuf,
    /// Where both data dirs (`mesh`, `monolith`) and the servers' logs go.
    pub work_dir: PathBuf,
    /// taskset CPU lists for the servers and for the load generator.
    pub pin: Option<(String, String)>,
    /// Distinct loopback source addresses (and connections) the load comes from.
    pub sources: usize,
    /// Users that log in and create posts.
    pub writers: usize,
    /// Also run each service alone (`tessera serve`) for per-service memory.
    pub per_service: bool,
    /// The calls measured, in this order.
    pub calls: Vec<Call>,
}

/// A call scenario B measures through the public port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Call {
    /// FeedService.GetPostThread on a seeded post, anonymously.
    GetPostThread,
    /// PostService.CreatePost as one of the writers.
    CreatePost,
}

/// What was seeded.
pub struct Dataset {
    /// Each user's id and username (the password is the same for all).
    pub users: Vec<(String, String)>,
    /// The posts' ids, in creation order.
    pub posts: Vec<String>,
    /// Each post's author, as an index into `users`.
    pub post_authors: Vec<usize>,
    /// How many comments were created, on random posts by random users.
    pub comments: usize,
    /// How long seeding took.
    pub took: Duration,
}

/// One measured call type at one concurrency.
pub struct CallRun {
    /// The call: `GetPostThread` or `CreatePost`.
    pub name: &'static str,
    /// `mesh` or `monolith`.
    pub server: &'static str,
    /// Calls in flight.
    pub concurrency: usize,
    /// Latency, throughput and errors of the run.
    pub summary: Summary,
    /// The server's CPU during the run.
    pub cpu: CpuSample,
}

/// Resident memory of one process, idle and after load.
pub struct Memory {
    /// The process, as the report names it.
    pub name: String,
    /// Bytes resident once it settled after start; 0 when not measured.
    pub idle: u64,
    /// Bytes resident after the load, when measured.
    pub loaded: Option<u64>,
}

/// Everything scenario B measured, for the report.
pub struct Results {
    /// What was seeded before the mesh started.
    pub dataset: Dataset,
    /// Whether `scale` was not 1, so the numbers are not the standard dataset's.
    pub scaled: bool,
    /// From starting `tessera up` until its `endpoints.json` appeared (every service ready).
    pub startup: Duration,
    /// How long the consumers took to apply the seeded events.
    pub catch_up: CatchUp,
    /// The monolith's answers against the mesh's.
    pub comparison: Option<Comparison>,
    /// Every measured run, mesh and monolith interleaved.
    pub runs: Vec<CallRun>,
    /// Resident memory of each process measured.
    pub memory: Vec<Memory>,
    /// Remarks printed under the tables (how per-service memory was taken, or why not).
    pub notes: Vec<String>,
    /// Users whose tokens CreatePost rotates through.
    pub writers: usize,
    /// What else the machine was doing during the runs.
    pub machine: String,
}

fn setup(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

pub(crate) fn as_user(user_id: &str) -> EndUser {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    EndUser {
        claims: UserClaims {
            sub: user_id.to_owned(),
            role: "USER".into(),
            exp: now + 3600,
            iat: now,
        },
        token: Arc::from("seeded"),
    }
}

fn db(dir: &Path, service: &str) -> String {
    dir.join(format!("{service}.db")).display().to_string()
}

/// Seeds `users`, `posts` and `comments` into the SQLite files under `dir`.
pub async fn seed(
    dir: &Path,
    users: usize,
    posts: usize,
    comments: usize,
) -> Result<Dataset, BenchError> {
    let started = Instant::now();
    std::fs::create_dir_all(dir).map_err(|source| BenchError::Io {
        what: dir.display().to_string(),
        source,
    })?;
    let params = argon2::Params::new(argon2::Params::MIN_M_COST, 1, 1, None)
        .map_err(|e| setup("argon2 params")(e.to_string()))?;
    let user_service = tessera_users::Users::open(
        &db(dir, "users"),
        tessera_users::UsersConfig {
            password_params: params,
            // The one `tessera up` generates and uses in the same data dir.
            key_encryption_key: Some(
                tessera_users::Kek::load_or_create(&dir.join(tessera_users::keys::DATA_DIR_KEK))
                    .map_err(|e| setup("key-encryption key")(e.to_string()))?,
            ),
            ..Default::default()
        },
    )
    .await
    .map_err(|e| setup("users.db")(e.to_string()))?;
    let post_service = tessera_posts::Posts::open(&db(dir, "posts"))
        .await
        .map_err(|e| setup("posts.db")(e.to_string()))?;
    let in_process =
        tessera_client::Channel::from_service(PostServiceServer::new(post_service.clone()));
    let comment_service =
        tessera_comments::Comments::open(&db(dir, "comments"), PostServiceClient::new(in_process))
            .await
            .map_err(|e| setup("comments.db")(e.to_string()))?;

    // Writers to one SQLite file queue on its lock anyway; a few in flight keep it busy.
    const IN_FLIGHT: usize = 8;
    let seeded_users: Vec<(String, String)> = futures::stream::iter(0..users)
        .map(|i| {
            let service = user_service.clone();
            async move {
                let username = format!("bench_user_{i:05}");
                let created = service
                    .create_user(Request::new(CreateUserRequest {
                        username: username.clone(),
                        email: format!("{username}@bench.invalid"),
                        password: PASSWORD.into(),
                        display_name: format!("Bench User {i}"),
                        request_id: String::new(),
                    }))
                    .await
                    .map_err(BenchError::call("seeding CreateUser"))?
                    .into_inner();
                let user = created
                    .user
                    .ok_or_else(|| BenchError::Setup("CreateUser answered no user".into()))?;
                Ok::<_, BenchError>((user.user_id, username))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect()
        .await?;

    let mut rng = StdRng::seed_from_u64(7);
    let authors: Vec<usize> = (0..posts)
        .map(|_| rng.random_range(0..seeded_users.len().max(1)))
        .collect();
    let post_authors = authors.clone();
    let author_ids: Vec<String> = authors
        .iter()
        .map(|a| {
            seeded_users
                .get(*a)
                .map(|u| u.0.clone())
                .unwrap_or_default()
        })
        .collect();
    let seeded_posts = seed_posts(&post_service, author_ids).await?;

    let picks: Vec<(usize, usize)> = (0..comments)
        .map(|_| {
            (
                rng.random_range(0..seeded_posts.len().max(1)),
                rng.random_range(0..seeded_users.len().max(1)),
            )
        })
        .collect();
    futures::stream::iter(picks.into_iter().enumerate())
        .map(|(i, (post, author))| {
            let service = comment_service.clone();
            let post_id = seeded_posts.get(post).cloned().unwrap_or_default();
            let author = seeded_users
                .get(author)
                .map(|u| u.0.clone())
                .unwrap_or_default();
            async move {
                let mut req = Request::new(CreateCommentRequest {
                    post_id,
                    body: format!("Comment {i}: a reasonable remark about the post above."),
                    request_id: String::new(),
                });
                req.extensions_mut().insert(as_user(&author));
                service
                    .create_comment(req)
                    .await
                    .map_err(BenchError::call("seeding CreateComment"))?;
                Ok::<_, BenchError>(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await?;

    comment_service.db().close().await;
    post_service.db().close().await;
    user_service.db().close().await;
    Ok(Dataset {
        users: seeded_users,
        posts: seeded_posts,
        post_authors,
        comments,
        took: started.elapsed(),
    })
}

/// Creates a post by each of `authors` through the posts handler; the ids in that order.
pub(crate) async fn seed_posts(
    service: &tessera_posts::Posts,
    authors: Vec<String>,
) -> Result<Vec<String>, BenchError> {
    // Writers to one database queue on its lock anyway; a few in flight keep it busy.
    futures::stream::iter(authors.into_iter().enumerate())
        .map(|(i, author)| {
            let service = service.clone();
            async move {
                let mut req = Request::new(CreatePostRequest {
                    title: format!("Benchmark post {i}"),
                    body: format!(
                        "Post {i} of the benchmark dataset. Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua."
                    ),
                    tags: vec!["bench".into(), format!("t{}", i % 50)],
                    request_id: String::new(),
                });
                req.extensions_mut().insert(as_user(&author));
                let post = service
                    .create_post(req)
                    .await
                    .map_err(BenchError::call("seeding CreatePost"))?
                    .into_inner()
                    .post
                    .ok_or_else(|| BenchError::Setup("CreatePost answered no post".into()))?;
                Ok::<_, BenchError>(post.post_id)
            }
        })
        // In order, so the i-th id is the i-th author's post.
        .buffered(8)
        .try_collect()
        .await
}

/// Waits until `pids` use less than 2% of a core over two consecutive 250 ms windows (event
/// consumers have caught up), at most `bound`. Returns how long that took.
pub(crate) async fn settle(pids: &[u32], bound: Duration) -> Result<Duration, BenchError> {
    let started = Instant::now();
    let window = Duration::from_millis(250);
    let mut quiet = 0;
    let mut last = CpuSample::of(pids)?;
    while started.elapsed() < bound {
        tokio::time::sleep(window).await;
        let now = CpuSample::of(pids)?;
        let used = now.since(&last).sched;
        last = now;
        if used < window / 50 {
            quiet += 1;
            if quiet >= 2 {
                return Ok(started.elapsed());
            }
        } else {
            quiet = 0;
        }
    }
    Err(BenchError::Setup(format!(
        "the mesh was still busy after {bound:?}"
    )))
}

/// The gateway's public address and the CA from `endpoints.json`.
pub(crate) fn read_endpoints(path: &Path) -> Option<(SocketAddr, PathBuf)> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let public = v["services"]["gateway"]["public"].as_str()?.parse().ok()?;
    let ca = PathBuf::from(v["ca"].as_str()?);
    Some((public, ca))
}

/// A well-spread index in `0..len` for request `i` (splitmix64).
pub(crate) fn spread(i: u64, len: usize) -> usize {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % len.max(1) as u64) as usize
}

/// Call `i` runs `read` on post `spread(i)` over the connection for `i`.
pub(crate) fn per_post_call<F, Fut>(pool: Pool, posts: Arc<Vec<String>>, read: F) -> CallFn
where
    F: Fn(Conn, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Failure>> + Send + 'static,
{
    Arc::new(move |i| {
        let conn = pool.get(i).clone();
        let post_id = posts
            .get(spread(i, posts.len()))
            .cloned()
            .unwrap_or_default();
        Box::pin(read(conn, post_id))
    })
}

fn thread_call(pool: Pool, posts: Arc<Vec<String>>) -> CallFn {
    per_post_call(pool, posts, |conn, post_id| async move {
        let origin = conn.origin();
        let thread = FeedServiceClient::with_origin(conn, origin)
            .get_post_thread(GetPostThreadRequest {
                post_id: post_id.clone(),
                comment_page_size: 0,
            })
            .await?
            .into_inner();
        match (&thread.post, &thread.author) {
            (Some(post), Some(_)) if post.post_id == post_id => Ok(()),
            _ => Err(Failure::Mismatch),
        }
    })
}

fn create_post_call(pool: Pool, tokens: Arc<Vec<String>>) -> CallFn {
    Arc::new(move |i| {
        let conn = pool.get(i).clone();
        let token = tokens.get(i as usize % tokens.len().max(1)).cloned();
        Box::pin(async move {
            let token = token.ok_or(Failure::Status(tonic::Code::Unauthenticated))?;
            let title = format!("Load post {i}");
            let mut req = Request::new(CreatePostRequest {
                title: title.clone(),
                body: "Written by the benchmark's CreatePost run.".into(),
                tags: vec!["load".into()],
                request_id: String::new(),
            });
            let bearer = format!("Bearer {token}")
                .parse()
                .map_err(|_| Failure::Status(tonic::Code::Unauthenticated))?;
            req.metadata_mut().insert("authorization", bearer);
            let origin = conn.origin();
            let created = PostServiceClient::with_origin(conn, origin)
                .create_post(req)
                .await?
                .into_inner();
            match created.post {
                Some(post) if post.title == title => Ok(()),
                _ => Err(Failure::Mismatch),
            }
        })
    })
}

/// Logs each of `users` in through `pool` with the seeded password; their access tokens, in
/// the order the logins finished.
pub async fn login_all(pool: &Pool, users: &[(String, String)]) -> Result<Vec<String>, BenchError> {
    futures::stream::iter(users.iter().enumerate())
        .map(|(i, (_, username))| {
            let conn = pool.get(i as u64).clone();
            async move {
                let origin = conn.origin();
                let answer = UserServiceClient::with_origin(conn, origin)
                    .login(LoginRequest {
                        username: username.clone(),
                        password: PASSWORD.into(),
                    })
                    .await
                    .map_err(BenchError::call(format!("Login as {username}")))?
                    .into_inner();
                Ok::<_, BenchError>(answer.access_token)
            }
        })
        .buffer_unordered(8)
        .try_collect()
        .await
}

/// Starts `tessera up` on `data` and waits for `endpoints.json`.
async fn start_up(opts: &Options, data: &Path) -> Result<(Proc, SocketAddr, PathBuf), BenchError> {
    let mut cmd = procs::command(&opts.tessera, opts.pin.as_ref().map(|p| p.0.as_str()));
    cmd.arg("up")
        .arg("--data-dir")
        .arg(data)
        .args(["--port-base", "0", "--log", "warn"]);
    let up = Proc::spawn("tessera up", cmd, opts.work_dir.join("b-up.log"), false)?;
    until_up(up, data).await
}

/// Waits for a started `tessera up` to write `data/endpoints.json`: the gateway's public
/// address and the CA.
pub(crate) async fn until_up(
    mut up: Proc,
    data: &Path,
) -> Result<(Proc, SocketAddr, PathBuf), BenchError> {
    let endpoints = data.join("endpoints.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((public, ca)) = read_endpoints(&endpoints) {
            return Ok((up, public, ca));
        }
        if !up.running() || Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "tessera up did not come up (see {})",
                up.log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Alternating rounds of mesh and monolith per call and concurrency (see [`run`]).
const B_ROUNDS: u32 = 4;

async fn measure(
    name: &'static str,
    server: &'static str,
    call: CallFn,
    concurrency: usize,
    time: Duration,
    pids: &[u32],
) -> Result<CallRun, BenchError> {
    let before = CpuSample::of(pids)?;
    let summary = closed_loop(call, concurrency, time).await;
    let cpu = CpuSample::of(pids)?.since(&before);
    Ok(CallRun {
        name,
        server,
        concurrency,
        summary,
        cpu,
    })
}

/// Each service alone (`tessera serve`), for per-service memory: idle once settled, then
/// after a short GetPostThread load through its gateway.
async fn per_service(
    opts: &Options,
    data: &Path,
    posts: Arc<Vec<String>>,
) -> Result<(Vec<Memory>, String), BenchError> {
    let mut ports: BTreeMap<&str, (u16, u16)> = BTreeMap::new();
    for name in SERVICES {
        ports.insert(name, (procs::free_port()?, procs::free_port()?));
    }
    let public_port = procs::free_port()?;
    let mut running: Vec<(String, Proc)> = Vec::new();
    for name in SERVICES {
        let (grpc, admin) = ports[name];
        let mut cmd = procs::command(&opts.tessera, opts.pin.as_ref().map(|p| p.0.as_str()));
        cmd.args(["serve", name])
            .env("TESSERA_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
            .env("TESSERA_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
            .env("TESSERA_PUBLIC_ADDR", format!("127.0.0.1:{public_port}"))
            .env("TESSERA_DATA_DIR", data)
            .env("TESSERA_TLS_DIR", data.join("certs").join(name))
            .env("TESSERA_ALLOW_OPERATOR", "true")
            .env("TESSERA_DRAIN_DELAY_MS", "0")
            .env("TESSERA_LOG", "warn")
            .env("DATABASE_URL", "");
        for (other, (other_grpc, _)) in &ports {
            cmd.env(
                format!("TESSERA_{}_TARGET", other.to_ascii_uppercase()),
                format!("static:127.0.0.1:{other_grpc}"),
            );
        }
        let log = opts.work_dir.join(format!("b-serve-{name}.log"));
        running.push((
            name.to_owned(),
            Proc::spawn(&format!("tessera serve {name}"), cmd, log, false)?,
        ));
    }
    for (name, proc) in &mut running {
        let admin = format!("127.0.0.1:{}", ports[name.as_str()].1);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match tessera_cli::probe::probe(&admin, "readiness", Duration::from_secs(1)).await {
                Ok(status) if status == "SERVING" => break,
                _ if Instant::now() < deadline && proc.running() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => {
                    return Err(BenchError::Setup(format!(
                        "tessera serve {name} did not become ready (see {})",
                        proc.log.display()
                    )));
                }
            }
        }
    }
    let pids = running
        .iter()
        .map(|(_, p)| p.pid())
        .collect::<Result<Vec<_>, _>>()?;
    settle(&pids, Duration::from_secs(60)).await?;
    let mut memory = Vec::new();
    for ((name, _), pid) in running.iter().zip(&pids) {
        memory.push(Memory {
            name: format!("{name} (tessera serve)"),
            idle: procfs::rss(*pid)?,
            loaded: None,
        });
    }
    let ca = data.join("certs").join("ca.crt");
    let public = SocketAddr::from(([127, 0, 0, 1], public_port));
    let sources = loopback_sources(opts.sources);
    let pool = Pool::connect(public, &Security::server_only(&ca)?, opts.sources, &sources).await?;
    let load = closed_loop(
        thread_call(pool, posts),
        opts.concurrency,
        opts.latency_time,
    )
    .await;
    for (m, pid) in memory.iter_mut().zip(&pids) {
        m.loaded = Some(procfs::rss(*pid)?);
    }
    // Dependents first, so nobody logs its upstream going away.
    for (_, proc) in running.iter_mut().rev() {
        proc.terminate(Duration::from_secs(10)).await;
    }
    let note = format!(
        "Separate processes: \"after load\" follows {:.1}s of GetPostThread at {} in flight through their gateway ({:.0} req/s, errors: {}).",
        load.elapsed.as_secs_f64(),
        opts.concurrency,
        load.throughput(),
        load.errors_text()
    );
    Ok((memory, note))
}

/// How long the event consumers took to apply what seeding left in the producers' outboxes.
#[derive(Clone, Debug, Default)]
pub struct CatchUp {
    /// Events in the producers' outboxes when the mesh started.
    pub events: i64,
    /// Those events times the consumers that follow each producer.
    pub deliveries: i64,
    /// From starting `tessera up` until every consumer cursor reached its producer's last
    /// event.
    pub took: Duration,
}

impl CatchUp {
    fn rate(&self, n: i64) -> f64 {
        n as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

/// Consumer cursor name → producer (`comments-events` → `comments`), for every workload
/// `tessera up` runs.
fn consumer_cursors() -> Vec<(&'static str, &'static str, &'static str)> {
    tessera_cli::workloads::WORKLOADS
        .iter()
        .filter(|w| !w.optional)
        .flat_map(|w| {
            w.cursors.iter().filter_map(move |cursor| {
                cursor
                    .strip_suffix("-events")
                    .map(|producer| (w.name, *cursor, producer))
            })
        })
        .collect()
}

async fn open_db(dir: &Path, service: &str) -> Result<tessera_store::Db, BenchError> {
    // Only the store's own tables (outbox, cursors), which the service has already.
    tessera_store::Db::open(&db(dir, service), &[])
        .await
        .map_err(|e| setup(service)(tessera_mesh::errors::error_chain(&e)))
}

/// Each producer's last event sequence (before the mesh starts).
async fn last_events(dir: &Path) -> Result<BTreeMap<&'static str, i64>, BenchError> {
    let mut last = BTreeMap::new();
    for (_, _, producer) in consumer_cursors() {
        if last.contains_key(producer) {
            continue;
        }
        let db = open_db(dir, producer).await?;
        let seq = db
            .last_sequence()
            .await
            .map_err(|e| setup(producer)(tessera_mesh::errors::error_chain(&e)))?;
        db.close().await;
        last.insert(producer, seq);
    }
    Ok(last)
}

/// Polls the consumers' cursors in the running mesh's databases until each has reached its
/// producer's last event in `last`, at most `bound` after `started`.
async fn wait_caught_up(
    dir: &Path,
    last: &BTreeMap<&'static str, i64>,
    started: Instant,
    bound: Duration,
) -> Result<CatchUp, BenchError> {
    let cursors = consumer_cursors();
    let mut dbs: BTreeMap<&str, tessera_store::Db> = BTreeMap::new();
    for (service, _, _) in &cursors {
        if !dbs.contains_key(service) {
            dbs.insert(service, open_db(dir, service).await?);
        }
    }
    let result = loop {
        let mut behind = Vec::new();
        for (service, cursor, producer) in &cursors {
            let position = dbs[service]
                .cursor(cursor)
                .await
                .map_err(|e| setup(service)(tessera_mesh::errors::error_chain(&e)))?;
            if position < last[producer] {
                behind.push(format!(
                    "{service} {cursor} at {position} of {}",
                    last[producer]
                ));
            }
        }
        if behind.is_empty() {
            break Ok(started.elapsed());
        }
        if started.elapsed() > bound {
            break Err(BenchError::Setup(format!(
                "event consumers still behind after {bound:?}: {}",
                behind.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for db in dbs.values() {
        db.close().await;
    }
    Ok(CatchUp {
        events: last.values().sum(),
        deliveries: cursors.iter().map(|(_, _, p)| last[p]).sum(),
        took: result?,
    })
}

/// Copies the regular files of `from` (databases, key-encryption key) into `to`.
pub fn copy_files(from: &Path, to: &Path) -> Result<(), BenchError> {
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |source| BenchError::Io { what, source }
    };
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        if entry.file_type().map_err(io(from))?.is_file() {
            let target = to.join(entry.file_name());
            std::fs::copy(entry.path(), &target).map_err(io(&target))?;
        }
    }
    Ok(())
}

/// Starts `tessera-bench monolith` on `data` with the mesh's gateway certificate.
async fn start_monolith(
    opts: &Options,
    data: &Path,
    tls_dir: &Path,
) -> Result<(Proc, SocketAddr), BenchError> {
    let mut cmd = procs::command(&opts.bench_exe, opts.pin.as_ref().map(|p| p.0.as_str()));
    cmd.arg("monolith")
        .arg("--data-dir")
        .arg(data)
        .arg("--tls-dir")
        .arg(tls_dir);
    let mut proc = Proc::spawn("monolith", cmd, opts.work_dir.join("b-monolith.log"), true)?;
    let addr = proc
        .expect_line("listening ", Duration::from_secs(60))
        .await?
        .parse()
        .map_err(|e| BenchError::Setup(format!("monolith address: {e}")))?;
    Ok((proc, addr))
}

/// The requests both servers answer for the comparison: threads read anonymously, threads
/// read by their own author (who sees their email), and a CreatePost per writer.
pub fn sample(dataset: &Dataset, tokens: &[String], n: usize) -> Sample {
    let posts = &dataset.posts;
    let mut threads: Vec<(String, Option<String>)> = (0..n as u64)
        .filter_map(|i| posts.get(spread(i, posts.len())).cloned())
        .map(|post| (post, None))
        .collect();
    threads.extend(
        posts
            .iter()
            .zip(&dataset.post_authors)
            .filter_map(|(post, author)| Some((post.clone(), Some(tokens.get(*author)?.clone()))))
            .take(n),
    );
    Sample {
        threads,
        creates: tokens.iter().take(n / 4 + 1).cloned().collect(),
    }
}

/// Runs scenario B.
pub async fn run(opts: &Options) -> Result<Results, BenchError> {
    let data = opts.work_dir.join("mesh");
    let mono_data = opts.work_dir.join("monolith");
    let scale = opts.scale.clamp(0.001, 10.0);
    let count = |n: f64| ((n * scale).round() as usize).max(1);
    let (n_users, n_posts, n_comments) = (count(1000.0), count(10_000.0), count(50_000.0));
    let mut notes = Vec::new();

    // Seeding is not measured: let it use both cores.
    if opts.pin.is_some() {
        procs::pin_self("0-1")?;
    }
    let dataset = seed(&data, n_users, n_posts, n_comments).await?;
    // The monolith starts from the same bytes.
    copy_files(&data, &mono_data)?;
    let last = last_events(&data).await?;
    if let Some((_, client)) = &opts.pin {
        procs::pin_self(client)?;
    }
    println!(
        "seeded {} users, {} posts, {} comments in {:.1}s",
        dataset.users.len(),
        dataset.posts.len(),
        dataset.comments,
        dataset.took.as_secs_f64()
    );

    let started = Instant::now();
    let (mut up, public, ca) = start_up(opts, &data).await?;
    let startup = started.elapsed();
    let pid = up.pid()?;
    let catch_up = wait_caught_up(&data, &last, started, Duration::from_secs(300)).await?;
    settle(&[pid], Duration::from_secs(90)).await?;
    let idle = procfs::rss(pid)?;

    let (mut mono, mono_addr) =
        start_monolith(opts, &mono_data, &data.join("certs").join("gateway")).await?;
    let mono_pid = mono.pid()?;

    let sources = loopback_sources(opts.sources);
    let security = Security::server_only(&ca)?;
    let pool = Pool::connect(public, &security, opts.sources, &sources).await?;
    let mono_pool = Pool::connect(mono_addr, &security, opts.sources, &sources).await?;
    let writers: Vec<(String, String)> = dataset
        .users
        .iter()
        .take(opts.writers.max(1))
        .cloned()
        .collect();
    let posts = Arc::new(dataset.posts.clone());
    // The public port closes a connection whose first request is late (10 s): use each one
    // at once.
    for p in [&pool, &mono_pool] {
        let call = thread_call(p.clone(), posts.clone());
        futures::future::join_all((0..opts.sources as u64).map(|i| call(i))).await;
    }
    let tokens = Arc::new(login_all(&pool, &writers).await?);

    let comparison = compare(&pool, &mono_pool, &sample(&dataset, &tokens, 100)).await;

    let servers = [("mesh", &pool, pid), ("monolith", &mono_pool, mono_pid)];
    // Warm the connections and caches (JWKS, pools) without measuring.
    for (_, p, _) in &servers {
        let warm = thread_call((*p).clone(), posts.clone());
        closed_loop(warm, opts.concurrency, Duration::from_millis(500)).await;
    }
    let mut runs = Vec::new();
    let machine_before = MachineCpu::now()?;
    let ours_before = procfs::stat_cpu(pid)?
        + procfs::stat_cpu(mono_pid)?
        + procfs::stat_cpu(std::process::id())?;
    type MakeCall = fn(Pool, Arc<Vec<String>>) -> CallFn;
    let calls = opts
        .calls
        .iter()
        .map(|call| -> (&'static str, MakeCall, &Arc<Vec<String>>) {
            match call {
                Call::GetPostThread => ("GetPostThread", thread_call, &posts),
                Call::CreatePost => ("CreatePost", create_post_call, &tokens),
            }
        });
    // Interleaved: at each concurrency, B_ROUNDS alternating rounds of mesh and monolith,
    // each a share of the time, merged per server. The VM's speed drifts within seconds (the
    // monolith once went from 3150 to 2250 CreatePosts/s between the halves of one 4 s run),
    // and short alternating rounds put the same drift on both sides of the ratio.
    for (name, make, arg) in calls {
        for (concurrency, time) in [(1, opts.latency_time), (opts.concurrency, opts.time)] {
            let mut merged: Vec<Option<CallRun>> = servers.iter().map(|_| None).collect();
            for _ in 0..B_ROUNDS {
                for ((server, p, server_pid), into) in servers.iter().zip(&mut merged) {
                    let call = make((*p).clone(), (*arg).clone());
                    let round = time / B_ROUNDS;
                    let run =
                        measure(name, server, call, concurrency, round, &[*server_pid]).await?;
                    match into {
                        Some(total) => {
                            total.summary.merge(&run.summary);
                            total.cpu += run.cpu;
                        }
                        None => *into = Some(run),
                    }
                }
            }
            runs.extend(merged.into_iter().flatten());
        }
    }
    let ours = (procfs::stat_cpu(pid)?
        + procfs::stat_cpu(mono_pid)?
        + procfs::stat_cpu(std::process::id())?)
    .saturating_sub(ours_before);
    let machine = MachineCpu::now()?.since(&machine_before).describe(ours);
    let loaded = procfs::rss(pid)?;
    let mono_rss = procfs::rss(mono_pid)?;
    mono.close_stdin_and_wait(Duration::from_secs(10)).await;
    up.terminate(Duration::from_secs(15)).await;

    let mut memory = vec![
        Memory {
            name: "tessera up (all five services, one process)".into(),
            idle,
            loaded: Some(loaded),
        },
        Memory {
            name: "monolith (users, posts, comments handlers)".into(),
            idle: 0,
            loaded: Some(mono_rss),
        },
    ];
    if opts.per_service {
        match per_service(opts, &data, posts).await {
            Ok((m, note)) => {
                memory.extend(m);
                notes.push(note);
            }
            Err(e) => notes.push(format!("per-service memory not measured: {e}")),
        }
    }
    Ok(Results {
        dataset,
        scaled: (scale - 1.0).abs() > f64::EPSILON,
        startup,
        catch_up,
        comparison: Some(comparison),
        runs,
        memory,
        notes,
        writers: tokens.len(),
        machine,
    })
}

fn cpu_per_request(run: &CallRun) -> Duration {
    if run.summary.ok > 0 {
        Duration::from_nanos((run.cpu.sched.as_nanos() / u128::from(run.summary.ok)) as u64)
    } else {
        Duration::ZERO
    }
}

/// `a ÷ b` with two decimals, or `-` when `b` is zero.
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

/// The scenario B tables.
pub fn render(r: &Results, opts: &Options) -> String {
    let mut out = String::new();
    let c = &r.catch_up;
    out.push_str(&format!(
        "Dataset: {} users, {} posts, {} comments{} (seeded in {:.1}s). `tessera up` ready in {:.1}s.\n\
         Event consumers: {} events in the producers' outboxes ({} deliveries to consumers) applied {:.1}s after start: {:.0} events/s ({:.0} deliveries/s).\n\n",
        r.dataset.users.len(),
        r.dataset.posts.len(),
        r.dataset.comments,
        if r.scaled {
            format!(" (SCALED DOWN: --scale {})", opts.scale)
        } else {
            String::new()
        },
        r.dataset.took.as_secs_f64(),
        r.startup.as_secs_f64(),
        c.events,
        c.deliveries,
        c.took.as_secs_f64(),
        c.rate(c.events),
        c.rate(c.deliveries),
    ));
    let mismatches = |name: &str| {
        r.comparison.as_ref().map_or(0, |cmp| match name {
            "GetPostThread" => cmp.thread.mismatches,
            _ => cmp.create.mismatches,
        })
    };
    let rows: Vec<Vec<String>> = r
        .runs
        .iter()
        .map(|run| {
            let s = &run.summary;
            // A different answer from the monolith is an error of the monolith's row.
            let errors = if run.server == "monolith" && run.concurrency == 1 {
                match mismatches(run.name) {
                    0 => s.errors_text(),
                    n => format!("{} + {n} WRONG_ANSWER vs mesh", s.errors_text()),
                }
            } else {
                s.errors_text()
            };
            vec![
                run.name.to_owned(),
                run.concurrency.to_string(),
                run.server.to_owned(),
                format!("{:.0}", s.throughput()),
                ms(s.percentile(50.0)),
                ms(s.percentile(99.0)),
                us(cpu_per_request(run)),
                errors,
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "call (public port)",
            "in flight",
            "server",
            "req/s",
            "p50 ms",
            "p99 ms",
            "server CPU µs/req",
            "errors",
        ],
        &rows,
    ));
    out.push('\n');
    let pairs: Vec<Vec<String>> = r
        .runs
        .chunks(2)
        .filter_map(|pair| match pair {
            [mesh, mono] if mesh.server == "mesh" && mono.server == "monolith" => Some(vec![
                mesh.name.to_owned(),
                mesh.concurrency.to_string(),
                ratio(
                    cpu_per_request(mesh).as_secs_f64(),
                    cpu_per_request(mono).as_secs_f64(),
                ),
                ratio(mesh.summary.throughput(), mono.summary.throughput()),
                ratio(
                    mesh.summary.percentile(99.0).as_secs_f64(),
                    mono.summary.percentile(99.0).as_secs_f64(),
                ),
            ]),
            _ => None,
        })
        .collect();
    out.push_str(&table(
        &[
            "mesh ÷ monolith",
            "in flight",
            "CPU per request",
            "throughput",
            "p99",
        ],
        &pairs,
    ));
    if let Some(cmp) = &r.comparison {
        out.push_str(&format!(
            "\nSame answers: {} GetPostThread answers (anonymous, and read by the post's author) compared byte for byte, {} differed; {} CreatePost answers compared with the generated id, times and etag blanked, {} differed.\n",
            cmp.thread.compared, cmp.thread.mismatches, cmp.create.compared, cmp.create.mismatches
        ));
        for example in cmp.thread.examples.iter().chain(&cmp.create.examples) {
            out.push_str(&format!("  differs: {example}\n"));
        }
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = r
        .memory
        .iter()
        .map(|m| {
            let single = m.name.contains("(tessera serve)");
            vec![
                m.name.clone(),
                if m.idle > 0 { mib(m.idle) } else { "-".into() },
                m.loaded.map(mib).unwrap_or_else(|| "-".into()),
                if single {
                    if m.idle < 30 * 1024 * 1024 {
                        "met".into()
                    } else {
                        "MISSED".into()
                    }
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "process",
            "idle RSS MiB",
            "RSS after load MiB",
            "< 30 MiB idle",
        ],
        &rows,
    ));
    out.push_str(&format!(
        "\nLoad comes from {} connections on distinct loopback source addresses, CreatePost as {} users: the gateway rate-limits proxied methods per client address (100/s) and per user (20/s), and this measures the mesh, not the limiter.\n",
        opts.sources, r.writers
    ));
    out.push_str(&format!(
        "The monolith is one process calling the users, posts and comments handlers directly (no internal hops, no mTLS between parts), behind one TLS port served as the gateway serves its public port (same certificate, same per-client limits) with the bearer token checked once per call through the same cache of verified tokens as the mesh's services; it has no rate limiter and runs no event consumers. Both are pinned to the same core and measured in {B_ROUNDS} alternating rounds per row, merged.\n"
    ));
    out.push_str(
        "`tessera up` runs here without an OTLP endpoint, so calls are not traced (trace context is still passed on): scenario A's A3 is the stack with tracing on.\n",
    );
    out.push_str(&format!("During the runs {}.\n", r.machine));
    for note in &r.notes {
        out.push_str(&format!("{note}\n"));
    }
    out
}
