//! `tessera up`: the whole mesh in one process for development. Every service still has its
//! own ports, its own certificate and its own database, and speaks mTLS to the others.
//! `--replicas posts=2` runs several replicas of a service (on PostgreSQL, see
//! [`crate::databases`]), each on its own ports and a process of its own (see
//! [`crate::supervise`]), with every caller balancing over all of them.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;
use tessera_mesh::{
    config::{ConfigError, Settings},
    identity::{DEFAULT_NAMESPACE, DEFAULT_TRUST_DOMAIN, SpiffeId},
    server::{Listeners, bind},
    shutdown::{Shutdown, ShutdownTrigger},
};

use crate::{
    certs,
    databases::{self, ServerUrl},
    probe, wiring,
    workloads::{self, WorkloadSpec},
};

/// The most replicas of one service `--replicas` runs: replica r of service i listens on
/// BASE+10r+i, so ten would reach the admin ports at BASE+100.
pub const MAX_REPLICAS: usize = 9;

/// The command line of `tessera up`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Where certificates, databases and endpoints.json live.
    #[arg(long, default_value = ".tessera")]
    pub data_dir: PathBuf,
    /// Ports: service i (users=1 .. gateway=5) gets BASE+i, its admin port BASE+100+i; the
    /// gateway's public port is BASE+443. 0 picks free ports.
    #[arg(long, default_value_t = 7000)]
    pub port_base: u16,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, default_value = "warn")]
    pub log: String,
    /// Replicas per service, e.g. `posts=2,comments=2` (at most 9 each; the rest run one),
    /// each a `tessera serve` process, started again when it dies. Replica r of service i
    /// listens on BASE+10r+i, admin BASE+100+10r+i, and a gateway replica's public port is
    /// BASE+443+r. Needs DATABASE_URL: replicas share a database.
    #[arg(long, value_name = "SERVICE=N[,SERVICE=N]")]
    pub replicas: Option<String>,
    /// Async worker threads of each process of a service, e.g. `posts=1` (1 to 64; with
    /// `--replicas`, whose processes these are). Unset, a process starts one per CPU it may
    /// use: its cgroup's CPU quota when it starts inside one, as a container does. Name it for
    /// processes held to a quota after they start.
    #[arg(long, value_name = "SERVICE=N[,SERVICE=N]")]
    pub worker_threads: Option<String>,
    /// A PostgreSQL server: each service gets its own database there, `<db>_<service>` for
    /// the database `<db>` the URL names (`tessera` if none), created if missing. Unset:
    /// SQLite files under the data dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Workloads beyond the five to run beside them, e.g. `digest` (see `tessera_cli::workloads`);
    /// each on the ports of its place in that list.
    #[arg(long, value_name = "NAME[,NAME]")]
    pub with: Option<String>,
}

impl UpArgs {
    /// Checks `--replicas` and `DATABASE_URL` before anything starts; the error names the
    /// setting (the binary exits 64 with it).
    pub fn options(&self) -> Result<MeshOptions, ConfigError> {
        let database = self
            .database_url
            .as_deref()
            .filter(|url| !url.trim().is_empty())
            .map(|url| ServerUrl::parse(url).map_err(|e| ConfigError::new("DATABASE_URL", e)))
            .transpose()?;
        let replicas = match &self.replicas {
            Some(spec) => parse_counts("--replicas", "replicas", spec, MAX_REPLICAS)?,
            None => BTreeMap::new(),
        };
        let worker_threads = match &self.worker_threads {
            Some(_) if self.replicas.is_none() => {
                return Err(ConfigError::new(
                    "--worker-threads",
                    "needs --replicas: without it every service runs in this process, on one \
                     runtime",
                ));
            }
            Some(spec) => parse_counts(
                "--worker-threads",
                "worker threads",
                spec,
                MAX_WORKER_THREADS,
            )?,
            None => BTreeMap::new(),
        };
        let with = match &self.with {
            Some(spec) => parse_with(spec)?,
            None => Vec::new(),
        };
        if database.is_none()
            && let Some((name, n)) = replicas.iter().find(|(_, n)| **n > 1)
        {
            return Err(ConfigError::new(
                "--replicas",
                format!(
                    "{name}={n} needs DATABASE_URL=postgres://user:password@host:port/PREFIX: \
                     replicas share their service's database, and a SQLite file cannot be \
                     shared safely"
                ),
            ));
        }
        Ok(MeshOptions {
            replicas,
            worker_threads,
            database,
            with,
        })
    }
}

/// `NAME[,NAME]` into the optional workloads to run.
fn parse_with(spec: &str) -> Result<Vec<String>, ConfigError> {
    let mut with = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match workloads::find(name) {
            Some(w) if w.optional => {
                if !with.iter().any(|n| n == name) {
                    with.push(name.to_owned());
                }
            }
            Some(_) => {
                return Err(ConfigError::new(
                    "--with",
                    format!("{name} always runs; --with names the optional workloads"),
                ));
            }
            None => {
                let optional: Vec<&str> = workloads::WORKLOADS
                    .iter()
                    .filter(|w| w.optional)
                    .map(|w| w.name)
                    .collect();
                return Err(ConfigError::new(
                    "--with",
                    format!(
                        "unknown workload {name:?}; expected one of {}",
                        optional.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(with)
}

/// The most worker threads `--worker-threads` gives a process.
const MAX_WORKER_THREADS: usize = 64;

/// `SERVICE=N[,SERVICE=N]` (the value of `flag`) into a count per service, each 1 to `max`.
fn parse_counts(
    flag: &str,
    what: &str,
    spec: &str,
    max: usize,
) -> Result<BTreeMap<String, usize>, ConfigError> {
    let bad = |message: String| Err(ConfigError::new(flag, message));
    let mut counts = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, count)) = part.split_once('=') else {
            return bad(format!("expected SERVICE=N, got {part:?}"));
        };
        let name = name.trim();
        if workloads::find(name).is_none() {
            let names: Vec<&str> = workloads::names().collect();
            return bad(format!(
                "unknown service {name:?}; expected one of {}",
                names.join(", ")
            ));
        }
        let count: usize = match count.trim().parse() {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                return bad(format!(
                    "{name}: expected a number of {what} from 1 to {max}, got {count:?}"
                ));
            }
        };
        if counts.insert(name.to_owned(), count).is_some() {
            return bad(format!("{name} is given twice"));
        }
    }
    Ok(counts)
}

/// What `tessera up` runs beyond the ports: replicas per service and where data lives.
#[derive(Clone, Debug, Default)]
pub struct MeshOptions {
    /// Replicas per service; a service not named runs one.
    pub replicas: BTreeMap<String, usize>,
    /// Worker threads of each process of a service (`TOKIO_WORKER_THREADS`); not named: the
    /// runtime's default.
    pub worker_threads: BTreeMap<String, usize>,
    /// One database per service on this PostgreSQL server; SQLite files when `None`.
    pub database: Option<ServerUrl>,
    /// Optional workloads (`--with`) that run beside the five.
    pub with: Vec<String>,
}

impl MeshOptions {
    /// The workloads this run starts, in start order: every one that is not optional, and
    /// the optional ones named by `--with`.
    pub fn workloads(&self) -> impl Iterator<Item = &'static WorkloadSpec> + '_ {
        workloads::WORKLOADS
            .iter()
            .filter(|w| !w.optional || self.with.iter().any(|n| n == w.name))
    }

    fn replicas_of(&self, service: &str) -> usize {
        self.replicas.get(service).copied().unwrap_or(1).max(1)
    }
}

/// One replica's addresses: (grpc, admin, public).
pub type ReplicaAddrs = (SocketAddr, SocketAddr, Option<SocketAddr>);

#[derive(Serialize)]
struct Endpoints {
    ca: PathBuf,
    operator: OperatorFiles,
    services: BTreeMap<String, ServiceEndpoints>,
}

#[derive(Serialize)]
struct OperatorFiles {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Serialize)]
struct ServiceEndpoints {
    grpc: String,
    admin: String,
    identity: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    public: Option<String>,
    /// Every replica, the first one (whose addresses are above) included.
    replicas: Vec<ReplicaEndpoints>,
}

#[derive(Serialize)]
struct ReplicaEndpoints {
    grpc: String,
    admin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    public: Option<String>,
    /// With `--replicas` each replica is a process of its own: `kill -9` it to watch failover.
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
}

fn port(base: u16, offset: u16) -> anyhow::Result<u16> {
    if base == 0 {
        return Ok(0);
    }
    base.checked_add(offset)
        .with_context(|| format!("--port-base {base} leaves no room for port offset {offset}"))
}

async fn bind_local(port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    Ok(bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?)
}

/// A running mesh: where everything listens, and how to stop it.
pub struct Mesh {
    /// The data dir, canonical and absolute: the services' SQLite files live here.
    pub data_dir: PathBuf,
    /// The dev CA and one directory per workload with its certificate and key.
    pub certs_dir: PathBuf,
    /// `endpoints.json`, written once every service is ready.
    pub endpoints_path: PathBuf,
    /// service → (grpc, admin, public) of its first replica
    pub addrs: BTreeMap<String, ReplicaAddrs>,
    /// service → every replica's addresses, the first one first
    pub replicas: BTreeMap<String, Vec<ReplicaAddrs>>,
    trigger: ShutdownTrigger,
    running: Vec<(String, tokio::task::JoinHandle<anyhow::Result<()>>)>,
}

impl Mesh {
    /// Triggers shutdown and waits for every service to drain and stop.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.trigger.trigger();
        let mut failed = None;
        for (name, handle) in self.running {
            match handle.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => failed = Some(err.context(format!("{name} failed"))),
                Err(err) => failed = Some(anyhow::anyhow!("{name} panicked: {err}")),
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Creates (or reuses) certificates under `data_dir`, binds every port, starts the five
/// services in dependency order, waits for each to be ready and writes `endpoints.json`.
/// `progress` is told each service's name as it starts and when it is ready. With `tracer`,
/// every service's calls are traced into it.
pub async fn start_mesh(
    data_dir: &Path,
    port_base: u16,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
    progress: impl FnMut(&str, bool),
) -> anyhow::Result<Mesh> {
    start_mesh_with(
        data_dir,
        port_base,
        &MeshOptions::default(),
        tracer,
        progress,
    )
    .await
}

/// [`start_mesh`] with replicas and databases from `options`, every replica in this process
/// (`tessera up --replicas` runs them as processes instead). Each service's database is
/// created (when missing) before anything starts; `progress` names replicas `posts[1]`.
pub async fn start_mesh_with(
    data_dir: &Path,
    port_base: u16,
    options: &MeshOptions,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
    mut progress: impl FnMut(&str, bool),
) -> anyhow::Result<Mesh> {
    let Prepared {
        data_dir,
        certs_dir,
        endpoints_path,
        identities,
    } = prepare(data_dir, options).await?;
    let bound = bind_all(port_base, options).await?;
    let replicas = addrs_of(&bound)?;
    let addrs: BTreeMap<String, ReplicaAddrs> = replicas
        .iter()
        .filter_map(|(name, list)| Some((name.clone(), *list.first()?)))
        .collect();

    let (trigger, shutdown) = Shutdown::new();
    let mut mesh = Mesh {
        endpoints_path,
        data_dir: data_dir.clone(),
        certs_dir: certs_dir.clone(),
        addrs: addrs.clone(),
        replicas: replicas.clone(),
        trigger,
        running: Vec::new(),
    };
    for Bound {
        name,
        replica,
        label,
        grpc,
        admin,
        public,
    } in bound
    {
        progress(&label, false);
        let started = async {
            let mut settings = settings_for(
                name,
                replica,
                &data_dir,
                &certs_dir,
                &replicas,
                options.database.as_ref(),
            )?;
            settings.server.tracer = tracer.clone();
            let handle = wiring::start(
                settings,
                Listeners {
                    grpc,
                    admin,
                    public,
                },
                shutdown.clone(),
            )
            .await?;
            mesh.running.push((label.clone(), handle));
            wait_ready(
                &replicas[name][replica].1.to_string(),
                Duration::from_secs(60),
            )
            .await
        }
        .await
        .with_context(|| format!("starting {label}"));
        if let Err(err) = started {
            // Stop what did start before reporting.
            let _ = mesh.shutdown().await;
            return Err(err);
        }
        progress(&label, true);
    }
    write_endpoints(
        &mesh.endpoints_path,
        &certs_dir,
        &identities,
        &replicas,
        None,
    )?;
    Ok(mesh)
}

/// A data dir made ready for a run.
pub(crate) struct Prepared {
    pub(crate) data_dir: PathBuf,
    pub(crate) certs_dir: PathBuf,
    pub(crate) endpoints_path: PathBuf,
    pub(crate) identities: BTreeMap<String, SpiffeId>,
}

/// Creates the data dir, removes a previous run's endpoints.json, creates (or reuses) the
/// certificates and, on PostgreSQL, each service's database.
pub(crate) async fn prepare(data_dir: &Path, options: &MeshOptions) -> anyhow::Result<Prepared> {
    // Owner-only: it holds the CA key, the databases and the key-encryption key.
    tessera_mesh::private::secure_dir(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let data_dir = std::fs::canonicalize(data_dir)
        .with_context(|| format!("cannot resolve data dir {}", data_dir.display()))?;
    // A previous run's endpoints.json names ports nobody listens on any more; scripts wait
    // for the file to appear, so it must not exist until this run is ready.
    let endpoints_path = data_dir.join("endpoints.json");
    match std::fs::remove_file(&endpoints_path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(err).with_context(|| format!("removing {}", endpoints_path.display()));
        }
        _ => {}
    }

    // Certificates: created on first run, reused afterwards.
    let certs_dir = certs::certs_dir(&data_dir);
    let (ca, fresh_ca) = certs::load_or_create_ca(&certs_dir)?;
    let mut identities = BTreeMap::new();
    for name in options.workloads().map(|w| w.name).chain(["operator"]) {
        let id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, DEFAULT_NAMESPACE, name)?;
        certs::ensure_workload_cert(&ca, &certs_dir, &id, fresh_ca)?;
        identities.insert(name.to_owned(), id);
    }

    if std::env::var_os("TESSERA_KEY_ENCRYPTION_KEY_FILE").is_none() {
        crate::keys::data_dir_key_file(&data_dir)?;
    }

    if let Some(server) = &options.database {
        for name in options.workloads().filter(|w| w.database).map(|w| w.name) {
            databases::ensure_database(&server.service_url(name))
                .await
                .with_context(|| {
                    format!(
                        "DATABASE_URL: cannot create or reach database {}",
                        server.database_name(name)
                    )
                })?;
        }
    }

    Ok(Prepared {
        data_dir,
        certs_dir,
        endpoints_path,
        identities,
    })
}

/// One replica's listeners, bound before anything starts.
pub(crate) struct Bound {
    pub(crate) name: &'static str,
    pub(crate) replica: usize,
    /// `posts` or, with several replicas, `posts[1]`.
    pub(crate) label: String,
    pub(crate) grpc: tokio::net::TcpListener,
    pub(crate) admin: tokio::net::TcpListener,
    pub(crate) public: Option<tokio::net::TcpListener>,
}

/// Binds every replica's ports, so a taken port fails fast and clearly.
pub(crate) async fn bind_all(port_base: u16, options: &MeshOptions) -> anyhow::Result<Vec<Bound>> {
    let mut bound = Vec::new();
    for spec in options.workloads() {
        let name = spec.name;
        let i = workloads::port_offset(name).unwrap_or_default();
        let count = options.replicas_of(name);
        for replica in 0..count {
            let r = replica as u16;
            let grpc = bind_local(port(port_base, 10 * r + i)?).await?;
            let admin = bind_local(port(port_base, 100 + 10 * r + i)?).await?;
            let public = if spec.public {
                Some(bind_local(port(port_base, 443 + r)?).await?)
            } else {
                None
            };
            let label = if count > 1 {
                format!("{name}[{replica}]")
            } else {
                name.to_owned()
            };
            bound.push(Bound {
                name,
                replica,
                label,
                grpc,
                admin,
                public,
            });
        }
    }
    Ok(bound)
}

/// Every replica's addresses by service, in replica order.
pub(crate) fn addrs_of(bound: &[Bound]) -> anyhow::Result<BTreeMap<String, Vec<ReplicaAddrs>>> {
    let mut replicas: BTreeMap<String, Vec<ReplicaAddrs>> = BTreeMap::new();
    for b in bound {
        replicas.entry(b.name.to_owned()).or_default().push((
            b.grpc.local_addr()?,
            b.admin.local_addr()?,
            b.public.as_ref().map(|p| p.local_addr()).transpose()?,
        ));
    }
    Ok(replicas)
}
/// Writes `endpoints.json`: replica 0 of each service in the original shape, every replica
/// (with its process id when it is a process of its own) in `replicas`.
pub(crate) fn write_endpoints(
    path: &Path,
    certs_dir: &Path,
    identities: &BTreeMap<String, SpiffeId>,
    replicas: &BTreeMap<String, Vec<ReplicaAddrs>>,
    pids: Option<&BTreeMap<String, Vec<u32>>>,
) -> anyhow::Result<()> {
    let endpoints = Endpoints {
        ca: certs_dir.join("ca.crt"),
        operator: OperatorFiles {
            cert: certs_dir.join("operator/tls.crt"),
            key: certs_dir.join("operator/tls.key"),
        },
        services: replicas
            .iter()
            .filter_map(|(name, list)| {
                let (grpc, admin, public) = list.first()?;
                let pids = pids.and_then(|p| p.get(name));
                Some((
                    name.clone(),
                    ServiceEndpoints {
                        grpc: grpc.to_string(),
                        admin: admin.to_string(),
                        identity: identities.get(name)?.to_string(),
                        public: public.map(|p| p.to_string()),
                        replicas: list
                            .iter()
                            .enumerate()
                            .map(|(i, (grpc, admin, public))| ReplicaEndpoints {
                                grpc: grpc.to_string(),
                                admin: admin.to_string(),
                                public: public.map(|p| p.to_string()),
                                pid: pids.and_then(|p| p.get(i).copied()),
                            })
                            .collect(),
                    },
                ))
            })
            .collect(),
    };
    // Written aside and renamed into place, so a reader never sees half a file.
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, serde_json::to_string_pretty(&endpoints)?)
        .and_then(|()| std::fs::rename(&partial, path))
        .with_context(|| format!("writing {}", path.display()))
}

/// `tessera up`: start the mesh, print how to reach it, run until SIGTERM or Ctrl-C.
/// With `--replicas`, every replica is a process of its own (see [`crate::supervise`]).
pub async fn run(args: UpArgs, options: MeshOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let telemetry = tessera_mesh::telemetry::init(
        "tessera",
        &args.log,
        tessera_mesh::telemetry::LogFormat::Pretty,
        std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().as_deref(),
    )?;
    if args.replicas.is_some() {
        return crate::supervise::run(&args, &options).await;
    }
    use std::io::Write as _;
    let mesh = start_mesh_with(
        &args.data_dir,
        args.port_base,
        &options,
        telemetry.tracer(),
        |name, ready| {
            if ready {
                println!(" ready");
            } else {
                print!("starting {name:<14}");
                let _ = std::io::stdout().flush();
            }
        },
    )
    .await?;
    print_table(
        &mesh.replicas,
        &mesh.certs_dir,
        options.database.as_ref(),
        started.elapsed(),
        None,
    );
    println!("endpoints: {}", mesh.endpoints_path.display());
    println!("Ctrl-C stops the mesh.");
    tessera_mesh::shutdown::signal().await;
    println!("shutting down...");
    mesh.shutdown().await?;
    println!("stopped.");
    Ok(())
}

fn settings_for(
    name: &str,
    replica: usize,
    data_dir: &Path,
    certs_dir: &Path,
    replicas: &BTreeMap<String, Vec<ReplicaAddrs>>,
    database: Option<&ServerUrl>,
) -> anyhow::Result<Settings> {
    let env = env_for(name, replica, data_dir, certs_dir, replicas, database);
    // The process environment still applies (TESSERA_BOOTSTRAP_ADMIN, ...) where `up` sets
    // nothing itself.
    let lookup = |key: &str| env.get(key).cloned().or_else(|| std::env::var(key).ok());
    let known: Vec<&str> = crate::workloads::names().collect();
    Ok(Settings::from_lookup_among(name, &known, &lookup)?)
}

/// The `TESSERA_*` settings `up` gives replica `replica` of `name`: its ports, certificates,
/// database and every upstream's replicas.
pub(crate) fn env_for(
    name: &str,
    replica: usize,
    data_dir: &Path,
    certs_dir: &Path,
    replicas: &BTreeMap<String, Vec<ReplicaAddrs>>,
    database: Option<&ServerUrl>,
) -> BTreeMap<String, String> {
    let (grpc, admin, public) = replicas[name][replica];
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("TESSERA_GRPC_ADDR".into(), grpc.to_string());
    env.insert("TESSERA_ADMIN_ADDR".into(), admin.to_string());
    if let Some(public) = public {
        env.insert("TESSERA_PUBLIC_ADDR".into(), public.to_string());
    }
    env.insert("TESSERA_DATA_DIR".into(), data_dir.display().to_string());
    env.insert(
        "TESSERA_TLS_DIR".into(),
        certs_dir.join(name).display().to_string(),
    );
    // Development: grpcurl with the operator certificate may call anything, and there are
    // no load balancers whose endpoints need time to update on shutdown.
    env.insert("TESSERA_ALLOW_OPERATOR".into(), "true".into());
    env.insert("TESSERA_DRAIN_DELAY_MS".into(), "0".into());
    env.insert("TESSERA_DRAIN_TIMEOUT_MS".into(), "5000".into());
    // One database per service (its replicas share it): on PostgreSQL its own database on
    // the server, else its own SQLite file under the data dir. Never DATABASE_URL itself, which
    // would put every service's tables into one database.
    let url = match database {
        Some(server) if workloads::find(name).is_some_and(|w| w.database) => {
            server.service_url(name)
        }
        _ => String::new(),
    };
    env.insert("DATABASE_URL".into(), url);
    // Callers balance over every replica.
    for (other, list) in replicas {
        let grpcs: Vec<String> = list.iter().map(|(grpc, _, _)| grpc.to_string()).collect();
        env.insert(
            format!("TESSERA_{}_TARGET", other.to_ascii_uppercase()),
            format!("static:{}", grpcs.join(",")),
        );
    }
    // The users service seals its signing keys with the data dir's key unless one is given
    // (`prepare` creates the file).
    if name == "users" && std::env::var_os("TESSERA_KEY_ENCRYPTION_KEY_FILE").is_none() {
        env.insert(
            "TESSERA_KEY_ENCRYPTION_KEY_FILE".into(),
            data_dir
                .join(tessera_users::keys::DATA_DIR_KEK)
                .display()
                .to_string(),
        );
    }
    env
}

async fn wait_ready(admin: &str, bound: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + bound;
    loop {
        match probe::probe(admin, "readiness", Duration::from_secs(2)).await {
            Ok(status) if status == "SERVING" => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(status) => anyhow::bail!("readiness is {status}"),
            Err(err) => anyhow::bail!(err),
        }
    }
}

/// The table of addresses (and, when replicas are processes, their PIDs) and how to try it.
pub(crate) fn print_table(
    replicas: &BTreeMap<String, Vec<ReplicaAddrs>>,
    certs_dir: &Path,
    database: Option<&ServerUrl>,
    elapsed: Duration,
    pids: Option<&BTreeMap<String, Vec<u32>>>,
) {
    println!();
    println!("Tessera is up ({:.1}s)", elapsed.as_secs_f64());
    println!();
    let pid_header = if pids.is_some() { "   PID" } else { "" };
    println!(
        "{:<14} {:<18} {:<18} {:<18} HEALTH{pid_header}",
        "SERVICE", "GRPC (mTLS)", "ADMIN", "PUBLIC (TLS)"
    );
    for name in workloads::names() {
        let list = replicas.get(name).map(Vec::as_slice).unwrap_or_default();
        for (replica, (grpc, admin, public)) in list.iter().enumerate() {
            let label = if list.len() > 1 {
                format!("{name}[{replica}]")
            } else {
                name.to_owned()
            };
            let pid = pids
                .and_then(|p| p.get(name)?.get(replica))
                .map(|pid| format!("  {pid}"))
                .unwrap_or_default();
            println!(
                "{:<14} {:<18} {:<18} {:<18} SERVING{pid}",
                label,
                grpc.to_string(),
                admin.to_string(),
                public.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
            );
        }
    }
    if let Some(server) = database {
        let names: Vec<String> = workloads::database_owners()
            .filter(|s| replicas.contains_key(*s))
            .map(|s| server.database_name(s))
            .collect();
        println!();
        println!("PostgreSQL databases: {}", names.join(", "));
    }
    let first = |name: &str| replicas.get(name).and_then(|list| list.first().copied());
    let ca = certs_dir.join("ca.crt");
    let op = certs_dir.join("operator");
    let users = first("users")
        .map(|(grpc, _, _)| grpc.to_string())
        .unwrap_or_default();
    let public = first("gateway")
        .and_then(|(_, _, public)| public)
        .map(|p| p.to_string())
        .unwrap_or_default();
    println!();
    println!("Try it (grpcurl):");
    println!(
        "  grpcurl -cacert {ca} -cert {op}/tls.crt -key {op}/tls.key {users} list",
        ca = ca.display(),
        op = op.display()
    );
    println!("  grpcurl -cacert {} {public} list", ca.display());
    println!(
        "  grpcurl -cacert {} -d '{{\"username\":\"alice\",\"email\":\"alice@example.com\",\"password\":\"correct horse\",\"display_name\":\"Alice\"}}' {public} tessera.users.v1.UserService/CreateUser",
        ca.display()
    );
    println!();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(replicas: Option<&str>, database_url: Option<&str>) -> UpArgs {
        UpArgs {
            data_dir: ".tessera".into(),
            port_base: 7000,
            log: "warn".into(),
            replicas: replicas.map(str::to_owned),
            worker_threads: None,
            database_url: database_url.map(str::to_owned),
            with: None,
        }
    }

    #[test]
    fn replicas_per_service_on_postgres() {
        let options = args(Some("posts=2, comments=3"), Some("postgres://u@h/shop"))
            .options()
            .unwrap();
        assert_eq!(options.replicas_of("posts"), 2);
        assert_eq!(options.replicas_of("comments"), 3);
        assert_eq!(options.replicas_of("users"), 1);
        assert_eq!(options.database.unwrap().prefix(), "shop");
        // One replica each needs no PostgreSQL.
        let options = args(Some("posts=1"), None).options().unwrap();
        assert!(options.database.is_none());
        assert!(args(None, Some("")).options().unwrap().database.is_none());
    }

    #[test]
    fn bad_replicas_name_the_setting() {
        for (replicas, url, setting) in [
            (Some("posts=2"), None, "--replicas"),
            (Some("posts=0"), Some("postgres://h/x"), "--replicas"),
            (Some("posts=10"), Some("postgres://h/x"), "--replicas"),
            (Some("posts"), Some("postgres://h/x"), "--replicas"),
            (Some("blog=2"), Some("postgres://h/x"), "--replicas"),
            (
                Some("posts=2,posts=3"),
                Some("postgres://h/x"),
                "--replicas",
            ),
            (Some("posts=2"), Some("sqlite://x.db"), "DATABASE_URL"),
        ] {
            let err = args(replicas, url).options().unwrap_err();
            assert_eq!(err.setting, setting, "{replicas:?} {url:?}: {err}");
        }
    }

    #[test]
    fn worker_threads_per_service_of_replica_processes() {
        let with = |replicas: Option<&str>, threads: &str| UpArgs {
            worker_threads: Some(threads.to_owned()),
            ..args(replicas, Some("postgres://u@h/shop"))
        };
        let options = with(Some("posts=2"), "posts=1,gateway=2")
            .options()
            .unwrap();
        assert_eq!(options.worker_threads.get("posts"), Some(&1));
        assert_eq!(options.worker_threads.get("gateway"), Some(&2));
        assert_eq!(options.worker_threads.get("users"), None);
        for (replicas, threads, message) in [
            // Without --replicas every service shares this process's runtime.
            (None, "posts=1", "needs --replicas"),
            (Some("posts=2"), "posts=0", "from 1 to 64"),
            (Some("posts=2"), "posts=65", "from 1 to 64"),
            (Some("posts=2"), "blog=1", "unknown service"),
            (Some("posts=2"), "posts=1,posts=2", "given twice"),
        ] {
            let err = with(replicas, threads).options().unwrap_err();
            assert_eq!(err.setting, "--worker-threads", "{threads}: {err}");
            assert!(err.message.contains(message), "{threads}: {err}");
        }
    }
}
