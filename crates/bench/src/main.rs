//! `tessera-bench`: runs scenario A (one hop: bare tonic, tonic + mTLS, the Tessera stack,
//! an Envoy sidecar) and scenario B (the whole mesh through the gateway) and prints tables.
//! `tessera-bench server --mode ...` is the echo server scenario A starts in a process of
//! its own.

#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use tessera_bench::{
    BenchError, client, envoy, load, monolith, procs, scenario_a, scenario_b, scenario_c, server,
};

#[derive(Parser)]
#[command(name = "tessera-bench", about = "Tessera's benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmark and print the tables.
    Run(RunArgs),
    /// Serve the echo RPC of scenario A until stdin closes (started by `run`).
    Server {
        #[arg(long, value_enum)]
        mode: server::Mode,
        /// tls.crt, tls.key and ca.crt of the server.
        #[arg(long)]
        tls_dir: PathBuf,
    },
    /// Serve scenario B's monolith baseline on DIR's databases until stdin closes (started
    /// by `run`).
    Monolith {
        #[arg(long)]
        data_dir: PathBuf,
        /// tls.crt and tls.key of the public port (the mesh's gateway certificate).
        #[arg(long)]
        tls_dir: PathBuf,
    },
    /// Issue scenario A's certificates (a CA; posts, gateway and users) into DIR.
    Certs {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Drive one running echo server (`server`) with a closed loop and print what it got:
    /// for profiling a server under perf or callgrind, outside the full run.
    Load {
        /// The server's address, as it printed it.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// ca.crt, tls.crt, tls.key of the caller (mTLS); plaintext without it.
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    A,
    B,
    C,
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// Interleaved rounds of scenario A (the targets are judged on the median round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Requests per second of scenario A's open loop.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Calls in flight for scenario A's peak throughput.
    #[arg(long, default_value_t = 64)]
    peak_concurrency: usize,
    /// HTTP/2 connections per server in scenario A.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Seconds of each scenario A measurement: one call in flight, fixed rate, peak.
    #[arg(long, default_value_t = 1.0)]
    latency_secs: f64,
    #[arg(long, default_value_t = 1.5)]
    rate_secs: f64,
    #[arg(long, default_value_t = 1.0)]
    peak_secs: f64,
    /// Envoy binary for A4 (default: `envoy` on the PATH; A4 is skipped without one).
    #[arg(long)]
    envoy: Option<PathBuf>,
    /// Scenario B dataset scale: 1.0 is 1k users, 10k posts, 50k comments.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Calls in flight for scenario B's throughput runs.
    #[arg(long, default_value_t = 16)]
    b_concurrency: usize,
    /// Seconds of each scenario B throughput run (the one-in-flight runs take --latency-secs).
    #[arg(long, default_value_t = 4.0)]
    b_secs: f64,
    /// Scenario B's calls to measure (e.g. only `create-post`, to count what one costs with
    /// `perf stat` over its rounds).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "get-post-thread,create-post"
    )]
    b_calls: Vec<scenario_b::Call>,
    /// Scenario C: replica counts of posts and comments, in order (ratios are to the first).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    c_replicas: Vec<usize>,
    /// Scenario C: CPU quota of each posts and comments replica, in cores. Small enough that
    /// three replicas, the gateway, PostgreSQL and the load generator fit in two cores.
    #[arg(long, default_value_t = 0.1)]
    c_cores: f64,
    /// Scenario C: GetPost calls in flight per posts replica (N replicas get N times this).
    #[arg(long, default_value_t = 32)]
    c_concurrency: usize,
    /// Scenario C: seconds of each of a replica count's two windows.
    #[arg(long, default_value_t = 6.0)]
    c_secs: f64,
    /// Scenario C: posts seeded into PostgreSQL.
    #[arg(long, default_value_t = 2000)]
    c_posts: usize,
    /// Scenario C's PostgreSQL server (default: TESSERA_BENCH_DATABASE_URL, else
    /// TESSERA_TEST_DATABASE_URL); the bench creates and drops databases named after it + `_bc_*`.
    #[arg(long)]
    database_url: Option<String>,
    /// Skip running each service alone for per-service memory.
    #[arg(long)]
    no_per_service: bool,
    /// The `tessera` binary (default: next to this one).
    #[arg(long)]
    tessera: Option<PathBuf>,
    /// Keep logs, certificates and data here (default: a temporary directory, removed).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Do not pin servers and load generator to separate cores.
    #[arg(long)]
    no_pin: bool,
    /// Scenario A also runs the mesh with less telemetry (logs without OTel; no subscriber),
    /// to show where its cost goes.
    #[arg(long)]
    diagnose: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Server { mode, tls_dir } => block_on(true, server::run(mode, &tls_dir)),
        Command::Monolith { data_dir, tls_dir } => {
            block_on(true, monolith::run(&data_dir, &tls_dir))
        }
        Command::Certs { dir } => match scenario_a::issue_certs(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Load {
            addr,
            tls_dir,
            concurrency,
            secs,
        } => block_on(false, load(addr, tls_dir, concurrency, secs)),
        // One thread for the load generator: it gets a core to itself.
        Command::Run(args) => block_on(false, run(args)),
    }
}

/// Runs `work` on a multi-threaded runtime (servers) or a current-thread one (load).
fn block_on(multi_thread: bool, work: impl Future<Output = Result<(), BenchError>>) -> ExitCode {
    let built = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => return fail(&BenchError::Setup(format!("runtime: {e}"))),
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

async fn load(
    addr: std::net::SocketAddr,
    tls_dir: Option<PathBuf>,
    concurrency: usize,
    secs: f64,
) -> Result<(), BenchError> {
    let security = match &tls_dir {
        Some(dir) => client::Security::mtls(
            &dir.join("ca.crt"),
            &dir.join("tls.crt"),
            &dir.join("tls.key"),
        )?,
        None => client::Security::Plaintext,
    };
    let pool = client::Pool::connect(addr, &security, 2, &[]).await?;
    let summary = load::closed_loop(
        scenario_a::echo_call(pool),
        concurrency.max(1),
        Duration::from_secs_f64(secs),
    )
    .await;
    println!(
        "calls {} errors {} p50 {:?} p99 {:?} throughput {:.0}/s",
        summary.ok,
        summary.errors_text(),
        summary.percentile(50.0),
        summary.percentile(99.0),
        summary.throughput()
    );
    Ok(())
}

fn fail(e: &BenchError) -> ExitCode {
    eprintln!("tessera-bench: {e}");
    ExitCode::FAILURE
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

async fn run(args: RunArgs) -> Result<(), BenchError> {
    let self_exe = std::env::current_exe().map_err(|source| BenchError::Io {
        what: "finding this binary".into(),
        source,
    })?;
    let tessera = args
        .tessera
        .clone()
        .unwrap_or_else(|| self_exe.with_file_name("tessera"));
    let (_temp, work_dir) = match &args.work_dir {
        Some(dir) => {
            // A fresh dataset each run: remove what a previous run left.
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir).map_err(|source| BenchError::Io {
                what: dir.display().to_string(),
                source,
            })?;
            (None, dir.clone())
        }
        None => {
            let temp = tempfile::tempdir().map_err(|source| BenchError::Io {
                what: "creating a temporary directory".into(),
                source,
            })?;
            let path = temp.path().to_path_buf();
            (Some(temp), path)
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = if args.no_pin {
        None
    } else if cores < 2 {
        println!("not pinning: only one CPU available");
        None
    } else if !procs::have_taskset() {
        println!("not pinning: taskset (util-linux) not found");
        None
    } else {
        Some(("0".to_owned(), "1".to_owned()))
    };
    println!("machine: {} x {}", cores, cpu_model());
    match &pin {
        Some((server, client)) => {
            println!("servers pinned to CPU {server}, load generator to CPU {client} (taskset)")
        }
        None => println!("servers and load generator NOT pinned"),
    }
    if let Some((_, client)) = &pin {
        procs::pin_self(client)?;
    }
    let secs = Duration::from_secs_f64;

    if matches!(args.scenario, Scenario::All | Scenario::A) {
        let envoy_bin = envoy::locate(args.envoy.as_deref());
        if let Ok(bin) = &envoy_bin {
            println!("envoy: {} ({})", envoy::version(bin)?, bin.display());
        }
        let opts = scenario_a::Options {
            rounds: args.rounds.max(1),
            rate: args.rate,
            peak_concurrency: args.peak_concurrency.max(1),
            connections: args.connections.max(1),
            warmup: Duration::from_secs(1),
            latency_time: secs(args.latency_secs),
            rate_time: secs(args.rate_secs),
            peak_time: secs(args.peak_secs),
            self_exe: self_exe.clone(),
            envoy: envoy_bin,
            work_dir: work_dir.clone(),
            pin: pin.clone(),
            diagnose: args.diagnose,
        };
        println!("\n== Scenario A: one hop, GetPost echo ==");
        let outcome = scenario_a::run(&opts).await?;
        let table = scenario_a::render(&outcome, &opts);
        println!("\n{table}");
    }
    if matches!(args.scenario, Scenario::All | Scenario::B | Scenario::C) && !tessera.is_file() {
        return Err(BenchError::Setup(format!(
            "{} not found: build it (cargo build --release -p tessera-cli) or pass --tessera",
            tessera.display()
        )));
    }
    if matches!(args.scenario, Scenario::All | Scenario::B) {
        let opts = scenario_b::Options {
            scale: args.scale,
            concurrency: args.b_concurrency.max(1),
            time: secs(args.b_secs),
            latency_time: secs(args.latency_secs),
            tessera: tessera.clone(),
            bench_exe: self_exe.clone(),
            work_dir: work_dir.clone(),
            pin: pin.clone(),
            sources: 64,
            writers: 200,
            per_service: !args.no_per_service,
            calls: args.b_calls.clone(),
        };
        println!("\n== Scenario B: end to end through the gateway ==");
        let results = scenario_b::run(&opts).await?;
        let table = scenario_b::render(&results, &opts);
        println!("\n{table}");
    }
    if matches!(args.scenario, Scenario::All | Scenario::C) {
        let database_url = args.database_url.clone().or_else(|| {
            ["TESSERA_BENCH_DATABASE_URL", "TESSERA_TEST_DATABASE_URL"]
                .iter()
                .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        });
        let opts = scenario_c::Options {
            database_url,
            replicas: args.c_replicas.clone(),
            cores: args.c_cores.clamp(0.01, 64.0),
            per_replica: args.c_concurrency.max(1),
            time: secs(args.c_secs),
            posts: args.c_posts.max(1),
            tessera,
            work_dir: work_dir.clone(),
            sources: 64,
        };
        println!("\n== Scenario C: scale-out, posts and comments replicas on PostgreSQL ==");
        // Replicas spread over both cores (their cgroups hold them to the quota).
        if pin.is_some() {
            procs::pin_self("0-1")?;
        }
        let outcome = scenario_c::run(&opts).await?;
        println!("\n{}", scenario_c::render(&outcome, &opts));
    }
    if args.work_dir.is_some() {
        println!("logs and data kept in {}", work_dir.display());
    }
    Ok(())
}
