//! Scenario A: one hop, the same echo RPC behind four servers, measured in interleaved rounds
//! (A1 A2 A3 A4 A1 A2 ...) so drift in the machine affects all of them alike.
//!
//! Per server and round: latency at one call in flight (closed loop), an open loop at a fixed
//! rate (p99 charged from due times; server CPU per request), and a closed loop at high
//! concurrency (peak throughput; server CPU per request at saturation).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tessera::posts::v1::{GetPostRequest, post_service_client::PostServiceClient};
use tessera_mesh::{certs::Ca, identity::SpiffeId};

use crate::{
    BenchError,
    client::{Pool, Security},
    envoy,
    load::{CallFn, closed_loop, open_loop},
    procfs::{self, CpuSample, MachineCpu},
    procs::{self, Proc},
    report::{table, us, with_ratio},
    stats::{Failure, Summary},
};

/// How scenario A runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// How many times every server is measured, interleaved.
    pub rounds: usize,
    /// Requests per second of the open loop.
    pub rate: f64,
    /// Calls in flight for the peak-throughput loop.
    pub peak_concurrency: usize,
    /// HTTP/2 connections per server.
    pub connections: usize,
    /// Unmeasured load on each server before the first round.
    pub warmup: Duration,
    /// Length of the one-in-flight latency loop, per server and round.
    pub latency_time: Duration,
    /// Length of the fixed-rate loop, per server and round.
    pub rate_time: Duration,
    /// Length of the peak-throughput loop, per server and round.
    pub peak_time: Duration,
    /// This binary, re-run as `server --mode ...`.
    pub self_exe: PathBuf,
    /// The Envoy binary, or why A4 is skipped.
    pub envoy: Result<PathBuf, String>,
    /// Where certificates and the servers' logs go.
    pub work_dir: PathBuf,
    /// taskset CPU lists for the servers and for the load generator.
    pub pin: Option<(String, String)>,
    /// Also run the mesh with less telemetry (no OTel layer; tracing off), to split its cost.
    pub diagnose: bool,
}

/// The four servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A1: bare tonic over plaintext HTTP/2, the floor.
    Plain,
    /// A2: bare tonic behind rustls mTLS.
    Mtls,
    /// A3: the same handler run by the mesh's workload stack.
    Mesh,
    /// A4: plaintext tonic behind an Envoy sidecar terminating mTLS.
    Envoy,
    /// A3 without the OpenTelemetry layer (`--diagnose`).
    MeshNoOtel,
    /// A3 with tracing off altogether (`--diagnose`).
    MeshNoSubscriber,
}

impl Target {
    /// The server's name in the report, led by its A1..A4 tag.
    pub fn label(self) -> &'static str {
        match self {
            Target::Plain => "A1 tonic, plaintext",
            Target::Mtls => "A2 tonic + rustls mTLS",
            Target::Mesh => "A3 Tessera Workload::run",
            Target::Envoy => "A4 Envoy sidecar + tonic",
            Target::MeshNoOtel => "A3' as A3, logs but no OTel layer",
            Target::MeshNoSubscriber => "A3'' as A3, tracing off",
        }
    }
}

/// A started server: its processes (all counted for CPU) and where to call it.
struct Running {
    target: Target,
    procs: Vec<Proc>,
    pids: Vec<u32>,
    pool: Pool,
    /// A connection presenting an identity the contract does not allow.
    intruder: Option<Pool>,
}

/// What one server measured over all rounds.
#[derive(Clone, Debug)]
pub struct Measured {
    /// The server measured.
    pub target: Target,
    /// The one-in-flight loops of every round, merged.
    pub latency: Summary,
    /// The fixed-rate loops, merged.
    pub rate: Summary,
    /// Server CPU during the fixed-rate loops.
    pub rate_cpu: CpuSample,
    /// The peak-throughput loops, merged.
    pub peak: Summary,
    /// Server CPU during the peak-throughput loops.
    pub peak_cpu: CpuSample,
    /// CPU over every measured window, both ways, to check the precise one.
    pub total_cpu: CpuSample,
    /// Spans the mesh server exported (A3), to show tracing was on.
    pub spans: Option<u64>,
    /// Each round's figures, for the spread and for same-round ratios.
    pub rounds: Vec<Round>,
}

/// One server's figures in one round.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    /// p50 at one call in flight.
    pub p50: Duration,
    /// p99 at the fixed rate.
    pub rate_p99: Duration,
    /// Successful calls per second at peak.
    pub peak: f64,
    /// Server CPU per successful request at the fixed rate.
    pub rate_cpu: Duration,
    /// Server CPU per successful request at peak.
    pub peak_cpu: Duration,
}

/// Scenario A's results.
pub struct Outcome {
    /// One entry per server that ran, in A1..A4 order.
    pub measured: Vec<Measured>,
    /// What else the machine was doing during the rounds.
    pub machine: String,
}

impl Measured {
    fn new(target: Target, latency: Summary, rate: Summary, peak: Summary) -> Self {
        Self {
            target,
            latency,
            rate,
            rate_cpu: CpuSample::default(),
            peak,
            peak_cpu: CpuSample::default(),
            total_cpu: CpuSample::default(),
            spans: None,
            rounds: Vec::new(),
        }
    }

    /// Server CPU per successful request in the fixed-rate windows.
    pub fn cpu_per_request_at_rate(&self) -> Duration {
        per_request(self.rate_cpu.sched, self.rate.ok)
    }

    /// Server CPU per successful request in the peak-throughput windows.
    pub fn cpu_per_request_at_peak(&self) -> Duration {
        per_request(self.peak_cpu.sched, self.peak.ok)
    }

    /// Peak throughput: successful calls per second averaged over the rounds.
    pub fn peak_throughput(&self) -> f64 {
        self.peak.throughput()
    }
}

fn per_request(cpu: Duration, requests: u64) -> Duration {
    if requests == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos((cpu.as_nanos() / u128::from(requests)) as u64)
}

/// Certificates for the run: a CA, the server's (posts), the caller's (gateway, allowed to
/// call GetPost) and an intruder's (users, not allowed).
pub fn issue_certs(dir: &Path) -> Result<(), BenchError> {
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(format!("certificates: {e}"));
    let ca = Ca::generate("tessera-bench CA").map_err(|e| setup(&e))?;
    for (name, server) in [("posts", true), ("gateway", false), ("users", false)] {
        let id = SpiffeId::new("tessera.local", "default", name).map_err(|e| setup(&e))?;
        let (dns, ips): (&[&str], &[IpAddr]) = if server {
            (&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
        } else {
            (&[], &[])
        };
        ca.issue(&id, dns, ips)
            .map_err(|e| setup(&e))?
            .save(&dir.join(name))
            .map_err(|e| setup(&e))?;
    }
    Ok(())
}

fn client_security(certs: &Path, who: &str) -> Result<Security, BenchError> {
    let dir = certs.join(who);
    Security::mtls(
        &dir.join("ca.crt"),
        &dir.join("tls.crt"),
        &dir.join("tls.key"),
    )
}

async fn start_echo(
    opts: &Options,
    mode: &str,
    tls_dir: &Path,
    log: PathBuf,
) -> Result<(Proc, SocketAddr), BenchError> {
    let mut cmd = procs::command(&opts.self_exe, opts.pin.as_ref().map(|p| p.0.as_str()));
    cmd.args(["server", "--mode", mode, "--tls-dir"])
        .arg(tls_dir);
    let mut proc = Proc::spawn(&format!("server --mode {mode}"), cmd, log, true)?;
    let addr = proc
        .expect_line("listening ", Duration::from_secs(20))
        .await?
        .parse()
        .map_err(|e| {
            BenchError::Setup(format!("server --mode {mode} printed a bad address: {e}"))
        })?;
    Ok((proc, addr))
}

async fn start(opts: &Options, target: Target, certs: &Path) -> Result<Running, BenchError> {
    let logs = &opts.work_dir;
    let server_tls = certs.join("posts");
    let mtls = client_security(certs, "gateway")?;
    let intruder = client_security(certs, "users")?;
    let (procs, addr, security, intruder) = match target {
        Target::Plain => {
            let (p, addr) = start_echo(opts, "plain", &server_tls, logs.join("a1.log")).await?;
            (vec![p], addr, Security::Plaintext, None)
        }
        Target::Mtls => {
            let (p, addr) = start_echo(opts, "mtls", &server_tls, logs.join("a2.log")).await?;
            (vec![p], addr, mtls, None)
        }
        Target::Mesh | Target::MeshNoOtel | Target::MeshNoSubscriber => {
            let mode = match target {
                Target::MeshNoOtel => "mesh-no-otel",
                Target::MeshNoSubscriber => "mesh-no-subscriber",
                _ => "mesh",
            };
            let log = logs.join(format!("a3-{mode}.log"));
            let (p, addr) = start_echo(opts, mode, &server_tls, log).await?;
            (vec![p], addr, mtls, Some(intruder))
        }
        Target::Envoy => {
            let envoy_bin = opts
                .envoy
                .as_ref()
                .map_err(|why| BenchError::Setup(why.clone()))?;
            let (app, app_addr) =
                start_echo(opts, "plain", &server_tls, logs.join("a4-app.log")).await?;
            let port = procs::free_port()?;
            let config_path = logs.join("envoy.yaml");
            std::fs::write(
                &config_path,
                envoy::config(port, app_addr.port(), &server_tls),
            )
            .map_err(|source| BenchError::Io {
                what: config_path.display().to_string(),
                source,
            })?;
            let mut cmd = procs::command(envoy_bin, opts.pin.as_ref().map(|p| p.0.as_str()));
            cmd.arg("-c").arg(&config_path).args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warn",
            ]);
            let proxy = Proc::spawn("envoy", cmd, logs.join("a4-envoy.log"), false)?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            (vec![app, proxy], addr, mtls, Some(intruder))
        }
    };
    let pids = procs.iter().map(Proc::pid).collect::<Result<Vec<_>, _>>()?;
    // Envoy needs a moment after exec before it listens: retry the connection, bounded.
    let mut attempt = 0;
    let pool = loop {
        match Pool::connect(addr, &security, opts.connections, &[]).await {
            Ok(pool) => break pool,
            Err(_) if attempt < 150 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(BenchError::Setup(format!(
                    "{}: cannot connect: {e}",
                    target.label()
                )));
            }
        }
    };
    let intruder = match intruder {
        Some(security) => Some(Pool::connect(addr, &security, 1, &[]).await?),
        None => None,
    };
    Ok(Running {
        target,
        procs,
        pids,
        pool,
        intruder,
    })
}

/// GetPost asking for `p<i>` and checking the echo.
pub fn echo_call(pool: Pool) -> CallFn {
    Arc::new(move |i| {
        let conn = pool.get(i).clone();
        Box::pin(async move {
            let origin = conn.origin();
            let mut client = PostServiceClient::with_origin(conn, origin);
            let post_id = format!("p{i}");
            let answer = client
                .get_post(GetPostRequest {
                    post_id: post_id.clone(),
                })
                .await?
                .into_inner();
            match answer.post {
                Some(post) if post.post_id == post_id => Ok(()),
                _ => Err(Failure::Mismatch),
            }
        })
    })
}

/// One call must succeed; an intruder's must be refused with PERMISSION_DENIED.
async fn check(running: &Running) -> Result<(), BenchError> {
    let label = running.target.label();
    if let Err(failure) = echo_call(running.pool.clone())(0).await {
        return Err(BenchError::Setup(format!(
            "{label}: the first call failed: {failure}"
        )));
    }
    if let Some(intruder) = &running.intruder {
        match echo_call(intruder.clone())(0).await {
            Err(Failure::Status(tonic::Code::PermissionDenied)) => {}
            other => {
                return Err(BenchError::Setup(format!(
                    "{label}: a caller the contract does not allow got {other:?}, expected PERMISSION_DENIED"
                )));
            }
        }
    }
    Ok(())
}

fn cpu(running: &Running) -> Result<CpuSample, BenchError> {
    CpuSample::of(&running.pids)
}

/// Runs scenario A and returns what each server measured (A4 absent when skipped).
pub async fn run(opts: &Options) -> Result<Outcome, BenchError> {
    let certs = opts.work_dir.join("certs-a");
    issue_certs(&certs)?;
    let mut targets = vec![Target::Plain, Target::Mtls, Target::Mesh];
    match &opts.envoy {
        Ok(_) => targets.push(Target::Envoy),
        Err(why) => println!("A4 (Envoy sidecar) skipped: {why}"),
    }
    if opts.diagnose {
        targets.extend([Target::MeshNoOtel, Target::MeshNoSubscriber]);
    }
    let mut running = Vec::new();
    for target in targets {
        match start(opts, target, &certs).await {
            Ok(r) => running.push(r),
            Err(e) if target == Target::Envoy => {
                println!("A4 (Envoy sidecar) skipped: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    for r in &running {
        check(r).await?;
    }
    println!(
        "access rule enforced: a `users` client certificate gets PERMISSION_DENIED from {}",
        running
            .iter()
            .filter(|r| r.intruder.is_some())
            .map(|r| r.target.label().split(' ').next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for r in &running {
        closed_loop(
            echo_call(r.pool.clone()),
            opts.peak_concurrency,
            opts.warmup,
        )
        .await;
    }

    let all_pids: Vec<u32> = running.iter().flat_map(|r| r.pids.clone()).collect();
    let me = std::process::id();
    let machine_before = MachineCpu::now()?;
    let servers_before = CpuSample::of(&all_pids)?;
    let me_before = procfs::stat_cpu(me)?;
    let mut measured: Vec<Option<Measured>> = vec![None; running.len()];
    for round in 0..opts.rounds {
        for (r, slot) in running.iter().zip(measured.iter_mut()) {
            let call = echo_call(r.pool.clone());
            let latency = closed_loop(call.clone(), 1, opts.latency_time).await;

            let before = cpu(r)?;
            let rate = open_loop(call.clone(), opts.rate, opts.rate_time).await;
            let rate_cpu = cpu(r)?.since(&before);

            let before = cpu(r)?;
            let peak = closed_loop(call, opts.peak_concurrency, opts.peak_time).await;
            let peak_cpu = cpu(r)?.since(&before);

            let m = slot.get_or_insert_with(|| {
                Measured::new(
                    r.target,
                    Summary::empty(),
                    Summary::empty(),
                    Summary::empty(),
                )
            });
            m.rounds.push(Round {
                p50: latency.percentile(50.0),
                rate_p99: rate.percentile(99.0),
                peak: peak.throughput(),
                rate_cpu: per_request(rate_cpu.sched, rate.ok),
                peak_cpu: per_request(peak_cpu.sched, peak.ok),
            });
            m.latency.merge(&latency);
            m.rate.merge(&rate);
            m.peak.merge(&peak);
            m.rate_cpu += rate_cpu;
            m.peak_cpu += peak_cpu;
            m.total_cpu += rate_cpu;
            m.total_cpu += peak_cpu;
        }
        println!("round {}/{} done", round + 1, opts.rounds);
    }
    let ours = CpuSample::of(&all_pids)?.since(&servers_before).stat
        + procfs::stat_cpu(me)?.saturating_sub(me_before);
    let machine = MachineCpu::now()?.since(&machine_before).describe(ours);

    let mut results: Vec<Measured> = measured.into_iter().flatten().collect();
    for r in &mut running {
        for p in &mut r.procs {
            if r.target == Target::Mesh {
                // The mesh server prints how many spans it exported as it exits.
                p.close_stdin();
                let spans = p.expect_line("spans ", Duration::from_secs(5)).await.ok();
                p.close_stdin_and_wait(Duration::from_secs(5)).await;
                if let Some(m) = results.iter_mut().find(|m| m.target == Target::Mesh) {
                    m.spans = spans.and_then(|s| s.parse().ok());
                }
            } else {
                p.close_stdin_and_wait(Duration::from_secs(5)).await;
            }
        }
    }
    Ok(Outcome {
        measured: results,
        machine,
    })
}

/// The scenario A table and the checks against the targets.
pub fn render(outcome: &Outcome, opts: &Options) -> String {
    let results = &outcome.measured;
    let Some(base) = results.iter().find(|m| m.target == Target::Plain) else {
        return "no baseline measured\n".into();
    };
    let base_cpu = base.cpu_per_request_at_rate().as_secs_f64();
    let base_peak_cpu = base.cpu_per_request_at_peak().as_secs_f64();
    let base_p50 = base.latency.percentile(50.0);
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|m| {
            let cpu = m.cpu_per_request_at_rate();
            let peak_cpu = m.cpu_per_request_at_peak();
            let p50 = m.latency.percentile(50.0);
            let p99 = m.latency.percentile(99.0);
            let rate_p99 = m.rate.percentile(99.0);
            let errors = m.latency.error_count() + m.rate.error_count() + m.peak.error_count();
            let error_text = if errors == 0 {
                "0".to_owned()
            } else {
                let mut all = m.latency.clone();
                all.merge(&m.rate);
                all.merge(&m.peak);
                all.errors_text()
            };
            vec![
                m.target.label().to_owned(),
                with_ratio(us(cpu), cpu.as_secs_f64(), base_cpu),
                with_ratio(us(peak_cpu), peak_cpu.as_secs_f64(), base_peak_cpu),
                with_ratio(
                    us(p50),
                    p50.as_secs_f64(),
                    base.latency.percentile(50.0).as_secs_f64(),
                ),
                format!("{:+.1}", (p50.as_secs_f64() - base_p50.as_secs_f64()) * 1e6),
                with_ratio(
                    us(p99),
                    p99.as_secs_f64(),
                    base.latency.percentile(99.0).as_secs_f64(),
                ),
                with_ratio(
                    us(rate_p99),
                    rate_p99.as_secs_f64(),
                    base.rate.percentile(99.0).as_secs_f64(),
                ),
                with_ratio(
                    format!("{:.0}", m.peak_throughput()),
                    m.peak_throughput(),
                    base.peak_throughput(),
                ),
                error_text,
            ]
        })
        .collect();
    let rate_col = format!("p99 @{:.0}/s µs", opts.rate);
    let mut out = table(
        &[
            "server",
            &format!("CPU µs/req @{:.0}/s", opts.rate),
            "CPU µs/req @peak",
            "p50 c=1 µs",
            "Δp50 µs",
            "p99 c=1 µs",
            &rate_col,
            &format!("peak req/s (c={})", opts.peak_concurrency),
            "errors",
        ],
        &rows,
    );
    let requests: u64 = results
        .iter()
        .map(|m| m.latency.ok + m.rate.ok + m.peak.ok + m.latency.error_count())
        .sum();
    out.push_str(&format!(
        "\n{} rounds, {} calls checked (status and echoed id); ratios are to A1 in the same run.\n",
        opts.rounds, requests
    ));
    if opts.rounds > 1 {
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|m| {
                let each = |f: &dyn Fn(&Round) -> String| {
                    m.rounds.iter().map(f).collect::<Vec<_>>().join(" / ")
                };
                vec![
                    m.target
                        .label()
                        .split(' ')
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                    each(&|r| us(r.rate_cpu)),
                    each(&|r| us(r.peak_cpu)),
                    each(&|r| us(r.p50)),
                    each(&|r| us(r.rate_p99)),
                    each(&|r| format!("{:.0}", r.peak)),
                ]
            })
            .collect();
        out.push_str("\nRound by round (the spread is the noise):\n\n");
        out.push_str(&table(
            &[
                "server",
                &format!("CPU µs/req @{:.0}/s", opts.rate),
                "CPU µs/req @peak",
                "p50 c=1 µs",
                &rate_col,
                "peak req/s",
            ],
            &rows,
        ));
    }
    out.push_str(&format!("During the rounds {}.\n", outcome.machine));
    if results.iter().any(|m| m.target == Target::Envoy) {
        out.push_str("A4 has one sidecar, the server's, sharing its core with the app as in a pod; a sidecar mesh puts one at each end of a hop.\n");
    }
    if let Some(mesh) = results.iter().find(|m| m.target == Target::Mesh) {
        if let Some(spans) = mesh.spans {
            out.push_str(&format!(
                "A3 exported {spans} spans through the OpenTelemetry SDK batch pipeline (every call is traced).\n"
            ));
        }
        out.push('\n');
        out.push_str(&targets(base, mesh, results));
    }
    let worst = results
        .iter()
        .map(|m| {
            let (s, t) = (
                m.total_cpu.sched.as_secs_f64(),
                m.total_cpu.stat.as_secs_f64(),
            );
            if t > 0.0 { (s - t).abs() / t } else { 0.0 }
        })
        .fold(0.0, f64::max);
    out.push_str(&format!(
        "CPU from /proc/<pid>/task/*/schedstat (ns); /proc/<pid>/stat utime+stime agrees within {:.1}% over the measured windows.\n",
        worst * 100.0
    ));
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Each target is judged on the median over rounds of the ratio (or difference) between
/// two servers measured in the same round, minutes apart at most: on a shared VM the
/// neighbours' load drifts between rounds, and a pooled figure lets one bad round of one
/// server decide. The pooled ratio is shown beside it.
fn targets(base: &Measured, mesh: &Measured, results: &[Measured]) -> String {
    let mut out = String::from("Targets (median of the same-round ratios; pooled in brackets):\n");
    let both = |what: &str, other: &Measured, limit: f64| {
        let at_rate = same_round_median(mesh, other, |r| r.rate_cpu);
        let at_peak = same_round_median(mesh, other, |r| r.peak_cpu);
        let pooled_rate = ratio(
            mesh.cpu_per_request_at_rate(),
            other.cpu_per_request_at_rate(),
        );
        let pooled_peak = ratio(
            mesh.cpu_per_request_at_peak(),
            other.cpu_per_request_at_peak(),
        );
        format!(
            "- {what}: {at_rate:.2}x at the fixed rate ({}) [{pooled_rate:.2}x], {at_peak:.2}x at peak ({}) [{pooled_peak:.2}x]\n",
            verdict(at_rate <= limit),
            verdict(at_peak <= limit)
        )
    };
    out.push_str(&both(
        "full stack CPU per request at most 1.3x bare plaintext",
        base,
        1.3,
    ));
    let added = median(
        mesh.rounds
            .iter()
            .zip(&base.rounds)
            .map(|(m, b)| (m.p50.as_secs_f64() - b.p50.as_secs_f64()) * 1e6)
            .collect(),
    );
    let pooled =
        mesh.latency.percentile(50.0).as_secs_f64() - base.latency.percentile(50.0).as_secs_f64();
    out.push_str(&format!(
        "- added p50 per hop at most 30 µs: {added:+.1} µs over plaintext ({}) [{:+.1} µs]\n",
        verdict(added <= 30.0),
        pooled * 1e6
    ));
    match results.iter().find(|m| m.target == Target::Envoy) {
        Some(envoy) => {
            out.push_str(&both(
                "at most 0.3x the Envoy sidecar's CPU per request",
                envoy,
                0.3,
            ));
            // At a modest fixed rate every call wakes an idle server from scratch, a cost
            // bare tonic pays too: its own ratio to Envoy is the floor for any in-process stack.
            let floor = same_round_median(base, envoy, |r| r.rate_cpu);
            out.push_str(&format!(
                "  (bare plaintext tonic alone is {floor:.2}x the Envoy sidecar at the fixed rate)\n"
            ));
        }
        None => out.push_str(
            "- at most 0.3x the Envoy sidecar's CPU per request: not measured (A4 skipped)\n",
        ),
    }
    out
}

/// The median over rounds of `a`'s figure over `b`'s from the same round.
fn same_round_median(a: &Measured, b: &Measured, figure: fn(&Round) -> Duration) -> f64 {
    median(
        a.rounds
            .iter()
            .zip(&b.rounds)
            .map(|(x, y)| ratio(figure(x), figure(y)))
            .collect(),
    )
}

/// The median (the mean of the middle two for an even count); NaN for none.
fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| !v.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        f64::NAN
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![f64::NAN, 5.0]), 5.0);
        assert!(median(Vec::new()).is_nan());
    }
}
