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
    client::{Pool, Security, loopback_sources},
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
    pub time: Duration,
    pub latency_time: Duration,
    /// The `tessera` binary.
    pub tessera: PathBuf,
    pub work_dir: PathBuf,
    /// taskset CPU lists for the servers and for the load generator.
    pub pin: Option<(String, String)>,
    /// Distinct loopback source addresses (and connections) the load comes from.
    pub sources: usize,
    /// Users that log in and create posts.
    pub writers: usize,
    /// Also run each service alone (`tessera serve`) for per-service memory.
    pub per_service: bool,
}

/// What was seeded.
pub struct Dataset {
    pub users: Vec<(String, String)>,
    pub posts: Vec<String>,
    pub comments: usize,
    pub took: Duration,
}

/// One measured call type at one concurrency.
pub struct CallRun {
    pub name: &'static str,
    pub concurrency: usize,
    pub summary: Summary,
    pub cpu: CpuSample,
}

/// Resident memory of one process, idle and after load.
pub struct Memory {
    pub name: String,
    pub idle: u64,
    pub loaded: Option<u64>,
}

pub struct Results {
    pub dataset: Dataset,
    pub scaled: bool,
    pub startup: Duration,
    pub catch_up: Duration,
    pub runs: Vec<CallRun>,
    pub memory: Vec<Memory>,
    pub notes: Vec<String>,
    /// Users whose tokens CreatePost rotates through.
    pub writers: usize,
    /// What else the machine was doing during the runs.
    pub machine: String,
}

fn setup(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

fn as_user(user_id: &str) -> EndUser {
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
    let seeded_posts: Vec<String> = futures::stream::iter(authors.into_iter().enumerate())
        .map(|(i, author)| {
            let service = post_service.clone();
            let author = seeded_users.get(author).map(|u| u.0.clone()).unwrap_or_default();
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
        .buffer_unordered(IN_FLIGHT)
        .try_collect()
        .await?;

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
        comments,
        took: started.elapsed(),
    })
}

/// Waits until `pids` use less than 2% of a core over two consecutive 250 ms windows (event
/// consumers have caught up), at most `bound`. Returns how long that took.
async fn settle(pids: &[u32], bound: Duration) -> Result<Duration, BenchError> {
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
fn read_endpoints(path: &Path) -> Option<(SocketAddr, PathBuf)> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let public = v["services"]["gateway"]["public"].as_str()?.parse().ok()?;
    let ca = PathBuf::from(v["ca"].as_str()?);
    Some((public, ca))
}

/// A well-spread index in `0..len` for request `i` (splitmix64).
fn spread(i: u64, len: usize) -> usize {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % len.max(1) as u64) as usize
}

fn thread_call(pool: Pool, posts: Arc<Vec<String>>) -> CallFn {
    Arc::new(move |i| {
        let conn = pool.get(i).clone();
        let post_id = posts
            .get(spread(i, posts.len()))
            .cloned()
            .unwrap_or_default();
        Box::pin(async move {
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

async fn login_all(pool: &Pool, users: &[(String, String)]) -> Result<Vec<String>, BenchError> {
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
    let mut up = Proc::spawn("tessera up", cmd, opts.work_dir.join("b-up.log"), false)?;
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

async fn measure(
    name: &'static str,
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

/// Runs scenario B.
pub async fn run(opts: &Options) -> Result<Results, BenchError> {
    let data = opts.work_dir.join("mesh");
    let scale = opts.scale.clamp(0.001, 10.0);
    let count = |n: f64| ((n * scale).round() as usize).max(1);
    let (n_users, n_posts, n_comments) = (count(1000.0), count(10_000.0), count(50_000.0));
    let mut notes = Vec::new();

    // Seeding is not measured: let it use both cores.
    if opts.pin.is_some() {
        procs::pin_self("0-1")?;
    }
    let dataset = seed(&data, n_users, n_posts, n_comments).await?;
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
    let catch_up = settle(&[pid], Duration::from_secs(90)).await?;
    let idle = procfs::rss(pid)?;

    let sources = loopback_sources(opts.sources);
    let pool = Pool::connect(public, &Security::server_only(&ca)?, opts.sources, &sources).await?;
    let writers: Vec<(String, String)> = dataset
        .users
        .iter()
        .take(opts.writers.max(1))
        .cloned()
        .collect();
    let tokens = Arc::new(login_all(&pool, &writers).await?);
    let posts = Arc::new(dataset.posts.clone());

    let thread = thread_call(pool.clone(), posts.clone());
    let create = create_post_call(pool.clone(), tokens.clone());
    // Warm the connections and caches (JWKS, pools) without measuring.
    closed_loop(thread.clone(), opts.concurrency, Duration::from_millis(500)).await;
    let mut runs = Vec::new();
    let machine_before = MachineCpu::now()?;
    let ours_before = procfs::stat_cpu(pid)? + procfs::stat_cpu(std::process::id())?;
    for (name, call) in [("GetPostThread", thread), ("CreatePost", create)] {
        runs.push(measure(name, call.clone(), 1, opts.latency_time, &[pid]).await?);
        runs.push(measure(name, call, opts.concurrency, opts.time, &[pid]).await?);
    }
    let ours = (procfs::stat_cpu(pid)? + procfs::stat_cpu(std::process::id())?)
        .saturating_sub(ours_before);
    let machine = MachineCpu::now()?.since(&machine_before).describe(ours);
    let loaded = procfs::rss(pid)?;
    up.terminate(Duration::from_secs(15)).await;

    let mut memory = vec![Memory {
        name: "tessera up (all five services, one process)".into(),
        idle,
        loaded: Some(loaded),
    }];
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
        runs,
        memory,
        notes,
        writers: tokens.len(),
        machine,
    })
}

/// The scenario B tables.
pub fn render(r: &Results, opts: &Options) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Dataset: {} users, {} posts, {} comments{} (seeded in {:.1}s). `tessera up` ready in {:.1}s; event consumers caught up {:.1}s later.\n\n",
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
        r.catch_up.as_secs_f64(),
    ));
    let rows: Vec<Vec<String>> = r
        .runs
        .iter()
        .map(|run| {
            let s = &run.summary;
            let cpu = if s.ok > 0 {
                Duration::from_nanos((run.cpu.sched.as_nanos() / u128::from(s.ok)) as u64)
            } else {
                Duration::ZERO
            };
            vec![
                run.name.to_owned(),
                run.concurrency.to_string(),
                format!("{:.0}", s.throughput()),
                ms(s.percentile(50.0)),
                ms(s.percentile(99.0)),
                us(cpu),
                s.errors_text(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "call (public port, through the gateway)",
            "in flight",
            "req/s",
            "p50 ms",
            "p99 ms",
            "mesh CPU µs/req",
            "errors",
        ],
        &rows,
    ));
    out.push('\n');
    let rows: Vec<Vec<String>> = r
        .memory
        .iter()
        .map(|m| {
            let single = !m.name.starts_with("tessera up");
            vec![
                m.name.clone(),
                mib(m.idle),
                m.loaded.map(mib).unwrap_or_else(|| "-".into()),
                if single {
                    if m.idle < 30 * 1024 * 1024 {
                        "met".into()
                    } else {
                        "MISSED".into()
                    }
                } else {
                    "(five services)".into()
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
    out.push_str(
        "`tessera up` runs here without an OTLP endpoint, so calls are not traced (trace context is still passed on): scenario A's A3 is the stack with tracing on.\n",
    );
    out.push_str(&format!("During the runs {}.\n", r.machine));
    for note in &r.notes {
        out.push_str(&format!("{note}\n"));
    }
    out
}
