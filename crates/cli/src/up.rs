//! `tessera up`: the whole mesh in one process for development. Every service still has its
//! own ports, its own certificate and its own database, and speaks mTLS to the others.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;
use tessera_mesh::{
    config::{SERVICES, Settings},
    identity::{DEFAULT_TRUST_DOMAIN, SpiffeId},
    server::{Listeners, bind},
    shutdown::{Shutdown, ShutdownTrigger},
};

use crate::{certs, probe, wiring};

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
}

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
    pub data_dir: PathBuf,
    pub certs_dir: PathBuf,
    pub endpoints_path: PathBuf,
    /// service → (grpc, admin, public)
    pub addrs: BTreeMap<String, (SocketAddr, SocketAddr, Option<SocketAddr>)>,
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
    mut progress: impl FnMut(&str, bool),
) -> anyhow::Result<Mesh> {
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
    for name in SERVICES.iter().copied().chain(["operator"]) {
        let id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, "default", name)?;
        certs::ensure_workload_cert(&ca, &certs_dir, &id, fresh_ca)?;
        identities.insert(name.to_owned(), id);
    }

    // Bind everything before starting anything, so a taken port fails fast and clearly.
    let mut bound = Vec::new();
    for (i, name) in SERVICES.iter().enumerate() {
        let i = i as u16 + 1;
        let grpc = bind_local(port(port_base, i)?).await?;
        let admin = bind_local(port(port_base, 100 + i)?).await?;
        let public = if *name == "gateway" {
            Some(bind_local(port(port_base, 443)?).await?)
        } else {
            None
        };
        bound.push((*name, grpc, admin, public));
    }
    let mut addrs = BTreeMap::new();
    for (name, grpc, admin, public) in &bound {
        addrs.insert(
            (*name).to_owned(),
            (
                grpc.local_addr()?,
                admin.local_addr()?,
                public.as_ref().map(|p| p.local_addr()).transpose()?,
            ),
        );
    }

    let (trigger, shutdown) = Shutdown::new();
    let mut mesh = Mesh {
        endpoints_path,
        data_dir: data_dir.clone(),
        certs_dir: certs_dir.clone(),
        addrs: addrs.clone(),
        trigger,
        running: Vec::new(),
    };
    for (name, grpc, admin, public) in bound {
        progress(name, false);
        let started = async {
            let mut settings = settings_for(name, &data_dir, &certs_dir, &addrs)?;
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
            mesh.running.push((name.to_owned(), handle));
            wait_ready(&addrs[name].1.to_string(), Duration::from_secs(60)).await
        }
        .await
        .with_context(|| format!("starting {name}"));
        if let Err(err) = started {
            // Stop what did start before reporting.
            let _ = mesh.shutdown().await;
            return Err(err);
        }
        progress(name, true);
    }

    let endpoints = Endpoints {
        ca: certs_dir.join("ca.crt"),
        operator: OperatorFiles {
            cert: certs_dir.join("operator/tls.crt"),
            key: certs_dir.join("operator/tls.key"),
        },
        services: addrs
            .iter()
            .map(|(name, (grpc, admin, public))| {
                (
                    name.clone(),
                    ServiceEndpoints {
                        grpc: grpc.to_string(),
                        admin: admin.to_string(),
                        identity: identities[name].to_string(),
                        public: public.map(|p| p.to_string()),
                    },
                )
            })
            .collect(),
    };
    // Written aside and renamed into place, so a reader never sees half a file.
    let partial = mesh.endpoints_path.with_extension("json.partial");
    std::fs::write(&partial, serde_json::to_string_pretty(&endpoints)?)
        .and_then(|()| std::fs::rename(&partial, &mesh.endpoints_path))
        .with_context(|| format!("writing {}", mesh.endpoints_path.display()))?;
    Ok(mesh)
}

/// `tessera up`: start the mesh, print how to reach it, run until SIGTERM or Ctrl-C.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let telemetry = tessera_mesh::telemetry::init(
        "tessera",
        &args.log,
        tessera_mesh::telemetry::LogFormat::Pretty,
        std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().as_deref(),
    )?;
    use std::io::Write as _;
    let mesh = start_mesh(
        &args.data_dir,
        args.port_base,
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
    print_table(&mesh.addrs, &mesh.certs_dir, started.elapsed());
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
    data_dir: &Path,
    certs_dir: &Path,
    addrs: &BTreeMap<String, (SocketAddr, SocketAddr, Option<SocketAddr>)>,
) -> anyhow::Result<Settings> {
    let (grpc, admin, public) = addrs[name];
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
    // One SQLite file per service under the data dir: a shared DATABASE_URL would put every
    // service's tables into one database.
    env.insert("DATABASE_URL".into(), String::new());
    for (other, (grpc, _, _)) in addrs {
        env.insert(
            format!("TESSERA_{}_TARGET", other.to_ascii_uppercase()),
            format!("static:{grpc}"),
        );
    }
    // The users service seals its signing keys with the data dir's key unless one is given.
    if name == "users" && std::env::var_os("TESSERA_KEY_ENCRYPTION_KEY_FILE").is_none() {
        let file = crate::keys::data_dir_key_file(data_dir)?;
        env.insert(
            "TESSERA_KEY_ENCRYPTION_KEY_FILE".into(),
            file.display().to_string(),
        );
    }
    // The process environment still applies (DATABASE_URL, TESSERA_BOOTSTRAP_ADMIN, ...)
    // where `up` sets nothing itself.
    let lookup = |key: &str| env.get(key).cloned().or_else(|| std::env::var(key).ok());
    Ok(Settings::from_lookup(name, &lookup)?)
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

fn print_table(
    addrs: &BTreeMap<String, (SocketAddr, SocketAddr, Option<SocketAddr>)>,
    certs_dir: &Path,
    elapsed: Duration,
) {
    println!();
    println!("Tessera is up ({:.1}s)", elapsed.as_secs_f64());
    println!();
    println!(
        "{:<14} {:<18} {:<18} {:<18} HEALTH",
        "SERVICE", "GRPC (mTLS)", "ADMIN", "PUBLIC (TLS)"
    );
    for name in SERVICES {
        let (grpc, admin, public) = addrs[name];
        println!(
            "{:<14} {:<18} {:<18} {:<18} SERVING",
            name,
            grpc.to_string(),
            admin.to_string(),
            public.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    let ca = certs_dir.join("ca.crt");
    let op = certs_dir.join("operator");
    let (users, _, _) = addrs["users"];
    let public = addrs["gateway"]
        .2
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
