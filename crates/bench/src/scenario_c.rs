//! Scenario C: scale-out. posts and comments run as 1, 2 and 3 replicas on PostgreSQL
//! (`tessera up --replicas`), each replica a process held to the same CPU quota by a cgroup
//! of its own, and GetPost is driven through the gateway's public port. The table shows
//! throughput and p99 per replica count against one replica; the CPU each process used in
//! the same window, the replicas' throttling and the machine's load say where the time went
//! when the scaling falls short.
//!
//! Skipped, with the reason printed, when no PostgreSQL is reachable or cgroups cannot be
//! written.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tessera::posts::v1::{GetPostRequest, post_service_client::PostServiceClient};
use tessera_cli::databases::{ServerUrl, drop_database, ensure_database};

use crate::{
    BenchError,
    cgroup::{Cage, Root, Throttling},
    client::{Pool, Security, loopback_sources},
    load::{CallFn, closed_loop},
    procfs::{CpuSample, MachineCpu},
    procs::{self, Proc},
    report::{ms, table, us},
    scenario_b::{per_post_call, seed_posts as seed_with, settle, until_up},
    stats::{Failure, Summary},
};

/// How scenario C runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// A PostgreSQL server URL (its database name becomes the prefix of the bench's own
    /// databases, with `_bc` added); none: C is skipped.
    pub database_url: Option<String>,
    /// Replica counts to run, in order; ratios are to the first.
    pub replicas: Vec<usize>,
    /// CPU quota of each posts and comments replica, in cores.
    pub cores: f64,
    /// Calls in flight per posts replica: N replicas are offered N times the load of one, so
    /// each replica count is measured at the same queue per replica (its capacity), not with
    /// one fixed load spread thinner as replicas are added.
    pub per_replica: usize,
    /// Length of each measured window (each replica count gets two).
    pub time: Duration,
    /// Posts seeded (GetPost reads them).
    pub posts: usize,
    /// The `tessera` binary.
    pub tessera: PathBuf,
    /// Where the data dir (`c`) and each round's log go.
    pub work_dir: PathBuf,
    /// Distinct loopback source addresses (and connections) the load comes from.
    pub sources: usize,
}

/// Processes a round measured, grouped.
const GROUPS: [&str; 6] = [
    "gateway",
    "posts",
    "comments",
    "users",
    "notifications",
    "load generator",
];

/// One replica count's measurement.
pub struct Round {
    /// Replicas of posts and of comments in this round.
    pub replicas: usize,
    /// GetPost through the gateway over the measured window.
    pub summary: Summary,
    /// CPU per group of processes over the measured window.
    pub cpu: BTreeMap<&'static str, Duration>,
    /// The posts replicas' cgroups over the window, summed.
    pub throttling: Throttling,
    /// The whole machine's CPU over the window.
    pub machine: MachineCpu,
}

impl Round {
    /// Adds a second window of the same replica count.
    fn absorb(&mut self, other: Round) {
        self.summary.merge(&other.summary);
        for (group, cpu) in other.cpu {
            *self.cpu.entry(group).or_default() += cpu;
        }
        self.throttling.add(&other.throttling);
        self.machine.busy += other.machine.busy;
        self.machine.steal += other.machine.steal;
        self.machine.total += other.machine.total;
    }
}

/// Scenario C's result: measured, or skipped and why.
pub enum Outcome {
    /// No PostgreSQL, or no CPU quotas on this machine: the reason.
    Skipped(String),
    /// Every replica count was measured.
    Ran {
        /// One per replica count, in the order asked.
        rounds: Vec<Round>,
        /// Which cgroup interface set the quotas, and where.
        cgroups: String,
        /// How many posts were seeded.
        seeded: usize,
    },
}

fn setup(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

/// The bench's own databases on the server: a fresh set each run.
async fn fresh_databases(server: &ServerUrl) -> Result<(), String> {
    for service in tessera_cli::workloads::names() {
        if tessera_cli::workloads::find(service).is_some_and(|w| w.database && !w.optional) {
            drop_database(&server.service_url(service))
                .await
                .map_err(|e| format!("{e:#}"))?;
        }
    }
    ensure_database(&server.service_url("posts"))
        .await
        .map_err(|e| format!("{e:#}"))?;
    Ok(())
}

async fn seed_posts_into(server: &ServerUrl, n: usize) -> Result<Vec<String>, BenchError> {
    let posts = tessera_posts::Posts::open(&server.service_url("posts"))
        .await
        .map_err(|e| setup("posts database")(e.to_string()))?;
    let authors = (0..n).map(|i| format!("author-{}", i % 100)).collect();
    let ids = seed_with(&posts, authors).await;
    posts.db().close().await;
    ids
}

fn get_post_call(pool: Pool, posts: Arc<Vec<String>>) -> CallFn {
    per_post_call(pool, posts, |conn, post_id| async move {
        let origin = conn.origin();
        let post = PostServiceClient::with_origin(conn, origin)
            .get_post(GetPostRequest {
                post_id: post_id.clone(),
            })
            .await?
            .into_inner()
            .post;
        match post {
            Some(post) if post.post_id == post_id => Ok(()),
            _ => Err(Failure::Mismatch),
        }
    })
}

/// Every replica's pid by service, from `endpoints.json`.
fn replica_pids(data: &Path) -> BTreeMap<String, Vec<u32>> {
    let text = std::fs::read_to_string(data.join("endpoints.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let mut out = BTreeMap::new();
    if let Some(services) = v["services"].as_object() {
        for (name, service) in services {
            let pids = service["replicas"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .filter_map(|r| r["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
                        .collect()
                })
                .unwrap_or_default();
            out.insert(name.clone(), pids);
        }
    }
    out
}

/// CPU of each group of processes now.
fn sample(groups: &BTreeMap<&'static str, Vec<u32>>) -> BTreeMap<&'static str, CpuSample> {
    groups
        .iter()
        .map(|(name, pids)| (*name, CpuSample::of(pids).unwrap_or_default()))
        .collect()
}

async fn round(
    opts: &Options,
    root: &Root,
    server: &ServerUrl,
    posts: &Arc<Vec<String>>,
    replicas: usize,
) -> Result<Round, BenchError> {
    // One data dir for every round: its key-encryption key seals the users' signing keys,
    // which stay in PostgreSQL from round to round.
    let data = opts.work_dir.join("c");
    // The last round's file would pass for this round's until `up` removes it.
    let _ = std::fs::remove_file(data.join("endpoints.json"));
    let mut cmd = procs::command(&opts.tessera, None);
    cmd.arg("up")
        .arg("--data-dir")
        .arg(&data)
        .args(["--port-base", "0", "--log", "warn", "--replicas"])
        .arg(format!("posts={replicas},comments={replicas}"))
        // The replicas go into their cgroups after they start, so their runtimes would size
        // themselves to the machine's cores; a container started under the same quota gets
        // one worker per (whole or part) core of it.
        .arg("--worker-threads")
        .arg({
            let threads = worker_threads(opts.cores);
            format!("posts={threads},comments={threads}")
        })
        .env("DATABASE_URL", server.url_of(server.prefix()))
        // One client address would meet the per-address limit; this measures the replicas.
        .env("TESSERA_RATE_LIMIT_ADDR_PER_SEC", "1000000")
        .env("TESSERA_RATE_LIMIT_ADDR_BURST", "1000000");
    let log = opts.work_dir.join(format!("c-up-{replicas}.log"));
    let up = Proc::spawn("tessera up --replicas", cmd, log, false)?;
    let (mut up, public, ca) = until_up(up, &data).await?;
    let measured = async {
        let pids = replica_pids(&data);
        let mut cages = Vec::new();
        for service in ["posts", "comments"] {
            for (i, pid) in pids.get(service).into_iter().flatten().enumerate() {
                let name = format!("tessera-bench-{}-{service}-{i}", std::process::id());
                let cage = Cage::create(root, &name, opts.cores).map_err(BenchError::Setup)?;
                cage.add(*pid).map_err(BenchError::Setup)?;
                cages.push((service, cage));
            }
        }
        let mut groups: BTreeMap<&'static str, Vec<u32>> = BTreeMap::new();
        for group in GROUPS {
            let list = match group {
                "load generator" => vec![std::process::id()],
                name => pids.get(name).cloned().unwrap_or_default(),
            };
            groups.insert(group, list);
        }
        let all: Vec<u32> = groups.values().flatten().copied().collect();
        // Comments catches up on the seeded posts' events first.
        settle(&all, Duration::from_secs(120)).await?;
        let pool = Pool::connect(
            public,
            &Security::server_only(&ca)?,
            opts.sources,
            &loopback_sources(opts.sources),
        )
        .await?;
        let call = get_post_call(pool, posts.clone());
        let concurrency = in_flight(opts, replicas);
        closed_loop(call.clone(), concurrency, Duration::from_secs(1)).await;

        let cpu_before = sample(&groups);
        let throttled_before: Vec<Throttling> = cages.iter().map(|(_, c)| c.throttling()).collect();
        let machine_before = MachineCpu::now()?;
        let summary = closed_loop(call, concurrency, opts.time).await;
        let machine = MachineCpu::now()?.since(&machine_before);
        let cpu_after = sample(&groups);
        let mut throttling = Throttling::default();
        for ((service, cage), before) in cages.iter().zip(&throttled_before) {
            if *service == "posts" {
                throttling.add(&cage.throttling().since(before));
            }
        }
        let cpu = cpu_after
            .iter()
            .map(|(name, after)| (*name, after.since(&cpu_before[name]).sched))
            .collect();
        Ok::<_, BenchError>((
            Round {
                replicas,
                summary,
                cpu,
                throttling,
                machine,
            },
            cages,
        ))
    }
    .await;
    // Replicas first stop, then their cgroups go (dropping a cage moves stragglers out).
    up.terminate(Duration::from_secs(30)).await;
    let (result, cages) = match measured {
        Ok((round, cages)) => (Ok(round), cages),
        Err(e) => (Err(e), Vec::new()),
    };
    drop(cages);
    result
}

/// Runs scenario C, or says why it cannot.
pub async fn run(opts: &Options) -> Result<Outcome, BenchError> {
    let Some(url) = &opts.database_url else {
        return Ok(Outcome::Skipped(
            "no PostgreSQL: set TESSERA_BENCH_DATABASE_URL (or TESSERA_TEST_DATABASE_URL) to a server the bench may create databases on".into(),
        ));
    };
    let server = match ServerUrl::parse(url).and_then(|s| {
        let prefix = format!("{}_bc", s.prefix());
        s.with_prefix(&prefix)
    }) {
        Ok(server) => server,
        Err(e) => return Ok(Outcome::Skipped(format!("the database URL: {e}"))),
    };
    let root = match Root::detect() {
        Ok(root) => root,
        Err(e) => return Ok(Outcome::Skipped(format!("no CPU quotas: {e}"))),
    };
    if let Err(e) = fresh_databases(&server).await {
        return Ok(Outcome::Skipped(format!(
            "PostgreSQL not reachable or not writable: {e}"
        )));
    }
    let started = Instant::now();
    let posts = Arc::new(seed_posts_into(&server, opts.posts).await?);
    println!(
        "seeded {} posts into PostgreSQL in {:.1}s",
        posts.len(),
        started.elapsed().as_secs_f64()
    );
    let mut rounds: Vec<Round> = Vec::new();
    let order = measurement_order(&opts.replicas);
    for (i, &(n, slot)) in order.iter().enumerate() {
        let measured = round(opts, &root, &server, &posts, n).await?;
        match rounds.get_mut(slot) {
            Some(first) => first.absorb(measured),
            None => rounds.push(measured),
        }
        println!("{n} replica(s) done ({}/{})", i + 1, order.len());
    }
    Ok(Outcome::Ran {
        rounds,
        cgroups: root.describe(),
        seeded: posts.len(),
    })
}

fn cores(cpu: Duration, wall: Duration) -> String {
    format!("{:.2}", cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9))
}

/// The worker threads a runtime started under a quota of `cores` gets (what
/// `std::thread::available_parallelism` reads from the cgroup): one per whole or part core.
fn worker_threads(cores: f64) -> usize {
    // Saturating float-to-int: a quota is a small positive number of cores.
    (cores.ceil() as usize).max(1)
}

/// Calls in flight at `replicas` replicas.
fn in_flight(opts: &Options, replicas: usize) -> usize {
    opts.per_replica * replicas
}

/// A ratio for a verdict, as the table rounds it, except that a ratio short of its goal is cut
/// to two decimals where rounding would reach the goal: 1.7975 printed as "1.80x, short of
/// the 1.8x goal" read as a contradiction.
fn ratio(gain: f64, goal: f64) -> String {
    let two = format!("{gain:.2}");
    match two.parse::<f64>() {
        Ok(rounded) if gain < goal && rounded >= goal => format!("{:.2}x", rounded - 0.01),
        _ => format!("{two}x"),
    }
}

/// Each replica count twice, in mirrored order (1, 2, 3, 3, 2, 1), with the slot of the
/// result its windows add up in. The VM's speed drifts over minutes (its steal moved 1-10%
/// between runs of one build), and a drift steady over the run then weighs on every count
/// alike instead of on the last one.
fn measurement_order(replicas: &[usize]) -> Vec<(usize, usize)> {
    let asked = replicas.iter().map(|n| (*n).max(1)).enumerate();
    asked
        .clone()
        .chain(asked.rev())
        .map(|(slot, n)| (n, slot))
        .collect()
}

/// [`measurement_order`]'s replica counts, for the report.
fn mirrored(replicas: &[usize]) -> String {
    measurement_order(replicas)
        .iter()
        .map(|(n, _)| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The scenario C tables and, where scaling falls short, where the time went.
pub fn render(outcome: &Outcome, opts: &Options) -> String {
    let (rounds, cgroups, seeded) = match outcome {
        Outcome::Skipped(why) => return format!("Scenario C skipped: {why}\n"),
        Outcome::Ran {
            rounds,
            cgroups,
            seeded,
        } => (rounds, cgroups, seeded),
    };
    let Some(base) = rounds.first() else {
        return "Scenario C ran no rounds.\n".into();
    };
    let base_rate = base.summary.throughput();
    let base_p99 = base.summary.percentile(99.0).as_secs_f64();
    let mut out = format!(
        "GetPost through the gateway, {} in flight per posts replica, two windows of {:.1}s per replica count in the order {}; {seeded} posts on PostgreSQL; each posts and comments replica limited to {:.2} core ({cgroups}) with {} async worker thread(s).\n\n",
        opts.per_replica,
        opts.time.as_secs_f64(),
        mirrored(&opts.replicas),
        opts.cores,
        worker_threads(opts.cores),
    );
    let target = |n: usize| match n {
        2 => " (goal 1.8x)",
        3 => " (goal 2.5x)",
        _ => "",
    };
    let rows: Vec<Vec<String>> = rounds
        .iter()
        .map(|r| {
            let s = &r.summary;
            let throttled = if r.throttling.periods > 0 {
                format!(
                    "{:.0}%",
                    100.0 * r.throttling.throttled as f64 / r.throttling.periods as f64
                )
            } else {
                "-".into()
            };
            vec![
                r.replicas.to_string(),
                in_flight(opts, r.replicas).to_string(),
                format!("{:.0}", s.throughput()),
                format!(
                    "{:.2}x{}",
                    s.throughput() / base_rate.max(1e-9),
                    target(r.replicas)
                ),
                ms(s.percentile(50.0)),
                ms(s.percentile(99.0)),
                format!(
                    "{:.2}x",
                    s.percentile(99.0).as_secs_f64() / base_p99.max(1e-9)
                ),
                throttled,
                s.errors_text(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "posts replicas",
            "in flight",
            "req/s",
            "÷ 1 replica",
            "p50 ms",
            "p99 ms",
            "p99 ÷ 1 replica",
            "posts periods throttled",
            "errors",
        ],
        &rows,
    ));
    out.push_str("\nWhere the CPU went (cores used over the window, and µs per request):\n\n");
    let rows: Vec<Vec<String>> = rounds
        .iter()
        .map(|r| {
            let wall = r.summary.elapsed;
            let ok = r.summary.ok.max(1);
            let mut row = vec![r.replicas.to_string()];
            for group in GROUPS {
                let cpu = r.cpu.get(group).copied().unwrap_or_default();
                row.push(format!(
                    "{} / {}",
                    cores(cpu, wall),
                    us(cpu / u32::try_from(ok).unwrap_or(u32::MAX))
                ));
            }
            let ours: Duration = r.cpu.values().sum();
            let busy = r.machine.busy;
            row.push(cores(busy.saturating_sub(ours), r.machine.total / 2));
            row.push(format!(
                "{:.0}%",
                100.0 * busy.as_secs_f64() / r.machine.total.as_secs_f64().max(1e-9)
            ));
            row.push(format!(
                "{:.1}%",
                100.0 * r.machine.steal.as_secs_f64() / r.machine.total.as_secs_f64().max(1e-9)
            ));
            row
        })
        .collect();
    let mut header = vec!["replicas"];
    header.extend(GROUPS);
    header.extend([
        "everything else (PostgreSQL, other users)",
        "machine busy",
        "steal",
    ]);
    out.push_str(&table(&header, &rows));
    // The verdict and its reason, from the same figures.
    for r in rounds.iter().skip(1) {
        let gain = r.summary.throughput() / base_rate.max(1e-9);
        let goal = match r.replicas {
            2 => 1.8,
            3 => 2.5,
            n => n as f64 * 0.8,
        };
        if gain >= goal {
            out.push_str(&format!(
                "\n{} replicas: {}, goal {goal}x met.",
                r.replicas,
                ratio(gain, goal)
            ));
            continue;
        }
        let wall = r.summary.elapsed.as_secs_f64().max(1e-9);
        let posts_cores = r.cpu.get("posts").map_or(0.0, |d| d.as_secs_f64()) / wall;
        let quota = opts.cores * r.replicas as f64;
        let busy = r.machine.busy.as_secs_f64() / r.machine.total.as_secs_f64().max(1e-9);
        let (heaviest, heaviest_cpu) = r
            .cpu
            .iter()
            .filter(|(name, _)| **name != "posts")
            .max_by_key(|(_, d)| **d)
            .map(|(n, d)| (*n, d.as_secs_f64() / wall))
            .unwrap_or(("nothing", 0.0));
        let reason = if busy > 0.9 {
            format!(
                "the machine was {:.0}% busy: the posts replicas used {posts_cores:.2} of their {quota:.2} cores of quota, and {heaviest} alone {heaviest_cpu:.2} cores, so the replicas' quota was not what limited throughput",
                busy * 100.0
            )
        } else if posts_cores > 0.9 * quota {
            format!(
                "the posts replicas used {posts_cores:.2} of their {quota:.2} cores of quota: they were the limit, and each request cost them more than with one replica"
            )
        } else {
            format!(
                "the posts replicas used only {posts_cores:.2} of their {quota:.2} cores with the machine {:.0}% busy: the limit was in front of them ({heaviest} {heaviest_cpu:.2} cores)",
                busy * 100.0
            )
        };
        out.push_str(&format!(
            "\n{} replicas: {}, short of the {goal}x goal; {reason}.",
            r.replicas,
            ratio(gain, goal)
        ));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_count_is_measured_twice_in_mirrored_order_into_its_own_slot() {
        assert_eq!(
            measurement_order(&[1, 2, 3]),
            vec![(1, 0), (2, 1), (3, 2), (3, 2), (2, 1), (1, 0)]
        );
        assert_eq!(mirrored(&[1, 3]), "1, 3, 3, 1");
        assert_eq!(measurement_order(&[0]), vec![(1, 0), (1, 0)]);
    }

    #[test]
    fn a_ratio_just_short_of_a_goal_does_not_print_as_the_goal() {
        assert_eq!(ratio(1.7975, 1.8), "1.79x");
        assert_eq!(ratio(1.7949, 1.8), "1.79x");
        assert_eq!(ratio(2.5, 2.5), "2.50x");
        // Elsewhere as the table rounds it.
        assert_eq!(ratio(1.9388, 1.8), "1.94x");
        assert_eq!(ratio(2.691, 2.5), "2.69x");
    }
}
