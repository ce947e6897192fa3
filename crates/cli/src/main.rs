//! `tessera`: one binary, many roles. `serve <service>` runs one workload (the container
//! entrypoint); `up` runs the whole mesh on this machine; `certs`, `probe` and `policy` are
//! the tools around it.
//!
//! Start-up reads like a table of contents: parse the command line, read config (no port
//! bound yet; bad config exits 64 naming the setting), install telemetry, bind, start,
//! wait for a signal, drain under a bound.

#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use tessera_cli::{certs, cursor, database, keys, probe, up, wiring};
use tessera_mesh::{config::Settings, identity::SpiffeId};

/// EX_USAGE from sysexits.h: the command was used incorrectly.
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Tessera: a Rust gRPC microservice mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole mesh on this machine: every service on loopback, mTLS between them.
    Up(up::UpArgs),
    /// Run one service (the container entrypoint); configured by flags and TESSERA_* variables.
    Serve(ServeArgs),
    /// Create a development CA and workload certificates.
    Certs(CertsArgs),
    /// Check a gRPC health endpoint (plaintext); exit 0 when SERVING.
    Probe(ProbeArgs),
    /// Print the access matrix read from the contracts.
    Policy(PolicyArgs),
    /// Print the OpenAPI 3 document of the public HTTP/JSON API (as served at /openapi.json).
    Openapi,
    /// Show or reset the event consumers' cursors in a service's database (DATABASE_URL, or
    /// the SQLite file under --data-dir).
    #[command(subcommand)]
    Cursor(cursor::CursorCommand),
    /// Token signing keys: `keys rotate` makes a new one now.
    Keys(keys::KeysArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// users, posts, comments, notifications or gateway.
    service: String,
    /// Internal mTLS port [env: TESSERA_GRPC_ADDR, default 0.0.0.0:8443].
    #[arg(long)]
    grpc_addr: Option<String>,
    /// Plaintext admin port: health and /metrics [env: TESSERA_ADMIN_ADDR, default 0.0.0.0:9090].
    #[arg(long)]
    admin_addr: Option<String>,
    /// The gateway's public port [env: TESSERA_PUBLIC_ADDR, default 0.0.0.0:8080].
    #[arg(long)]
    public_addr: Option<String>,
    /// Where SQLite files live [env: TESSERA_DATA_DIR, default ./data].
    #[arg(long)]
    data_dir: Option<String>,
    /// Directory with tls.crt, tls.key, ca.crt [env: TESSERA_TLS_DIR].
    #[arg(long)]
    tls_dir: Option<String>,
}

#[derive(clap::Args)]
struct CertsArgs {
    /// Where the CA and the certificates go (one directory per workload).
    #[arg(long, default_value = ".tessera/certs")]
    dir: PathBuf,
    /// Workloads to issue for; default: every service and `operator`.
    #[arg(long = "service", value_name = "NAME")]
    services: Vec<String>,
    #[arg(long, default_value = tessera_mesh::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The namespace in the SPIFFE ids: by default the one the manifests in k8s/ deploy into.
    #[arg(long, default_value = tessera_mesh::identity::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Also print Kubernetes Secret manifests on stdout: the CA as `tessera-ca` (what the
    /// manifests' Issuer signs with) and each certificate as `<name>-tls`.
    #[arg(long)]
    k8s: bool,
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// host:port of a plaintext gRPC health endpoint (the admin port).
    #[arg(long)]
    addr: String,
    /// The health service name to check ("" for the whole server).
    #[arg(long, default_value = "")]
    service: String,
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

#[derive(clap::Args)]
struct PolicyArgs {
    /// Print the Kubernetes NetworkPolicies derived from the contracts instead.
    #[arg(long)]
    netpol: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = err.print();
                return ExitCode::SUCCESS;
            }
            // One line, not clap's usage block: scripts and people both read it.
            let rendered = err.render().to_string();
            let line = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid usage")
                .trim_start_matches("error: ");
            eprintln!("tessera: {line} (see tessera --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Policy(args) => {
            let policy = match tessera_cli::workloads::policy() {
                Ok(policy) => policy,
                Err(err) => return fail(&err),
            };
            if args.netpol {
                print!("{}", tessera_mesh::netpol::network_policies(&policy));
            } else {
                print!("{}", policy.matrix());
            }
            ExitCode::SUCCESS
        }
        Command::Openapi => match tessera_cli::openapi::document() {
            Ok(doc) => {
                println!("{doc}");
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        },
        Command::Certs(args) => match run_certs(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => fail(&err),
        },
        Command::Probe(args) => runtime().block_on(async {
            match probe::probe(
                &args.addr,
                &args.service,
                Duration::from_millis(args.timeout_ms),
            )
            .await
            {
                Ok(status) => {
                    println!("{status}");
                    if status == "SERVING" {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(err) => {
                    eprintln!("tessera: probe failed: {err}");
                    ExitCode::from(1)
                }
            }
        }),
        Command::Serve(args) => {
            let flags = [
                ("TESSERA_GRPC_ADDR", args.grpc_addr),
                ("TESSERA_ADMIN_ADDR", args.admin_addr),
                ("TESSERA_PUBLIC_ADDR", args.public_addr),
                ("TESSERA_DATA_DIR", args.data_dir),
                ("TESSERA_TLS_DIR", args.tls_dir),
            ];
            // Flags win over the environment.
            let lookup = |key: &str| {
                flags
                    .iter()
                    .find(|(k, _)| *k == key)
                    .and_then(|(_, v)| v.clone())
                    .or_else(|| std::env::var(key).ok())
            };
            let known: Vec<&str> = tessera_cli::workloads::names().collect();
            let settings = match Settings::from_lookup_among(&args.service, &known, &lookup) {
                Ok(s) => s,
                Err(err) => {
                    eprintln!("tessera: {err}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            for upstream in wiring::required_targets(&settings.service) {
                if settings.target(upstream).is_none() {
                    eprintln!(
                        "tessera: TESSERA_{}_TARGET: required by {} (e.g. dns:{upstream}:8443)",
                        upstream.to_ascii_uppercase(),
                        settings.service
                    );
                    return ExitCode::from(EXIT_USAGE);
                }
            }
            // So is the key that unseals the signing keys.
            if settings.service == "users"
                && let Err(err) = keys::key_encryption_key(&settings)
            {
                eprintln!("tessera: {err:#}");
                return ExitCode::from(EXIT_USAGE);
            }
            // Certificates are configuration too: check them before any port is bound.
            let files = tessera_mesh::tls::TlsFiles::in_dir(&settings.tls_dir);
            if let Err(err) = tessera_mesh::tls::TlsSource::load(files) {
                eprintln!(
                    "tessera: TESSERA_TLS_DIR: {}: {}",
                    settings.tls_dir.display(),
                    anyhow::Error::from(err)
                        .chain()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join(": ")
                );
                return ExitCode::from(EXIT_USAGE);
            }
            if let Err(err) = database::apply(&settings.database) {
                eprintln!("tessera: {err}");
                return ExitCode::from(EXIT_USAGE);
            }
            if let Some(dir) = &settings.public_tls_dir {
                let files = tessera_mesh::public_tls::PublicTlsFiles::in_dir(dir);
                if let Err(err) = tessera_mesh::public_tls::PublicTls::load(files) {
                    eprintln!(
                        "tessera: TESSERA_PUBLIC_TLS_DIR: {}: {}",
                        dir.display(),
                        anyhow::Error::from(err)
                            .chain()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join(": ")
                    );
                    return ExitCode::from(EXIT_USAGE);
                }
            }
            runtime().block_on(async {
                match wiring::serve_one(settings).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => fail(&err),
                }
            })
        }
        Command::Keys(keys::KeysArgs {
            command: keys::KeysCommand::Rotate { data_dir },
        }) => {
            let settings = match keys::users_settings(&data_dir) {
                Ok(s) => s,
                Err(err) => {
                    eprintln!("tessera: {err}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            runtime().block_on(async {
                match keys::rotate(&settings).await {
                    Ok(kid) => {
                        println!("{kid}");
                        eprintln!(
                            "new signing key {kid}: running users replicas publish it within 5 s and sign with it from 10 s on"
                        );
                        ExitCode::SUCCESS
                    }
                    Err(err) => fail(&err),
                }
            })
        }
        Command::Up(args) => {
            let options = match args.options() {
                Ok(options) => options,
                Err(err) => {
                    eprintln!("tessera: {err}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            runtime().block_on(async {
                match up::run(args, options).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => fail(&err),
                }
            })
        }
        Command::Cursor(command) => {
            let database_url = std::env::var("DATABASE_URL")
                .ok()
                .filter(|url| !url.trim().is_empty());
            if let Err(err) = cursor::check(&command, database_url.as_deref()) {
                eprintln!("tessera: {err}");
                return ExitCode::from(EXIT_USAGE);
            }
            runtime().block_on(async {
                match cursor::run(command, database_url.as_deref()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => fail(&err),
                }
            })
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("tessera: cannot start the async runtime: {err}");
            std::process::exit(1);
        }
    }
}

/// One line with the whole cause chain; never a backtrace. A bad setting anywhere in the
/// chain (`tessera up` reads one per service) is a usage error, 64.
fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!("tessera: {err:#}");
    if err
        .chain()
        .any(|e| e.is::<tessera_mesh::config::ConfigError>())
    {
        return ExitCode::from(EXIT_USAGE);
    }
    ExitCode::from(1)
}

fn run_certs(args: CertsArgs) -> anyhow::Result<()> {
    let (ca, fresh) = certs::load_or_create_ca(&args.dir)?;
    if args.k8s {
        print!("{}", certs::ca_secret_manifest(&args.dir, &args.namespace)?);
    }
    let names: Vec<String> = if args.services.is_empty() {
        // The workloads `up` always runs; an optional one's with `--service NAME`.
        tessera_cli::workloads::WORKLOADS
            .iter()
            .filter(|w| !w.optional)
            .map(|w| w.name.to_owned())
            .chain(["operator".to_owned()])
            .collect()
    } else {
        args.services
    };
    for name in names {
        let id = SpiffeId::new(&args.trust_domain, &args.namespace, &name)
            .map_err(|e| anyhow::anyhow!("--service {name}: {e}"))?;
        let issued = certs::issue_dev(&ca, &id)?;
        let files = issued.save(&args.dir.join(&name))?;
        eprintln!("issued {id} -> {}", files.cert.display());
        if args.k8s {
            print!(
                "{}",
                certs::secret_manifest(&issued, &name, &args.namespace)
            );
        }
    }
    if fresh {
        eprintln!("created CA {}", args.dir.join("ca.crt").display());
    }
    Ok(())
}
