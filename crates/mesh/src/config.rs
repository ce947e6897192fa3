//! Typed configuration of one workload, from `TESSERA_*` settings.
//!
//! Parsing takes a lookup function rather than reading the process environment, so tests
//! drive it with a map and the binary layers flags over the environment. A bad value is an
//! error naming the setting; the binary prints it and exits 64 (EX_USAGE).

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use crate::{identity::DEFAULT_TRUST_DOMAIN, server::ServerOptions, telemetry::LogFormat};

pub mod tokens;

/// The services Tessera is made of, in start order (dependencies first).
pub const SERVICES: [&str; 5] = ["users", "posts", "comments", "notifications", "gateway"];

/// Every workload Tessera's own contracts (`proto/`) define: [`SERVICES`] in start order, then
/// any other owner of a contract there, by name. A service that compiles its contract in its
/// own crate (`examples/digest`) is known to the binary that registers it instead
/// ([`Settings::from_lookup_among`]).
pub fn workloads() -> Vec<String> {
    let mut all: Vec<String> = SERVICES.iter().map(|s| (*s).to_owned()).collect();
    for owner in crate::policy::Policy::contracts().owners() {
        if !all.contains(&owner) {
            all.push(owner);
        }
    }
    all
}

/// A setting that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    /// The variable (or flag) at fault, e.g. `TESSERA_GRPC_ADDR`, so the user knows what to fix.
    pub setting: String,
    /// What was wrong with its value, and what was expected instead.
    pub message: String,
}

impl ConfigError {
    /// An error about `setting`, explained by `message`.
    pub fn new(setting: &str, message: impl Into<String>) -> Self {
        Self {
            setting: setting.to_owned(),
            message: message.into(),
        }
    }
}

/// The gateway's rate limits on proxied public methods: a token bucket per end user (the
/// token's subject) and one per client address, each a sustained rate and a burst.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PublicRateLimits {
    /// Sustained calls per second per user (`TESSERA_RATE_LIMIT_USER_PER_SEC`); finite, above 0.
    pub user_per_second: f64,
    /// Calls a user may make at once above the rate (`TESSERA_RATE_LIMIT_USER_BURST`); at least 1.
    pub user_burst: u32,
    /// Sustained calls per second per client address (`TESSERA_RATE_LIMIT_ADDR_PER_SEC`).
    pub address_per_second: f64,
    /// Calls an address may make at once above the rate (`TESSERA_RATE_LIMIT_ADDR_BURST`).
    pub address_burst: u32,
}

impl Default for PublicRateLimits {
    fn default() -> Self {
        Self {
            user_per_second: 20.0,
            user_burst: 50,
            address_per_second: 100.0,
            address_burst: 200,
        }
    }
}

/// The database pool: `TESSERA_DATABASE_POOL_SIZE`, `_ACQUIRE_TIMEOUT_MS`,
/// `_STATEMENT_TIMEOUT_MS` and `TESSERA_DATABASE_CA` (a PEM CA for `sslmode=verify-full`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseSettings {
    /// Connections per process; `None` keeps the store's default (10 for PostgreSQL).
    pub pool_size: Option<u32>,
    /// How long a query waits for a free connection before it fails; never zero.
    pub acquire_timeout: Duration,
    /// `None` (0 or unset) leaves the server's `statement_timeout`.
    pub statement_timeout: Option<Duration>,
    /// The CA that signs the PostgreSQL server's certificate; `None` keeps the URL's TLS mode.
    pub ca_file: Option<PathBuf>,
}

impl DatabaseSettings {
    fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let pool_size = match non_empty(lookup, "TESSERA_DATABASE_POOL_SIZE") {
            None => None,
            Some(_) => match parse(
                lookup,
                "TESSERA_DATABASE_POOL_SIZE",
                0u32,
                "a whole number of connections, at least 1",
            )? {
                0 => {
                    return Err(ConfigError::new(
                        "TESSERA_DATABASE_POOL_SIZE",
                        "must be at least 1",
                    ));
                }
                n => Some(n),
            },
        };
        let acquire_timeout = millis(
            lookup,
            "TESSERA_DATABASE_ACQUIRE_TIMEOUT_MS",
            Duration::from_secs(10),
        )?;
        if acquire_timeout.is_zero() {
            return Err(ConfigError::new(
                "TESSERA_DATABASE_ACQUIRE_TIMEOUT_MS",
                "must be at least 1",
            ));
        }
        let statement_timeout = Some(millis(
            lookup,
            "TESSERA_DATABASE_STATEMENT_TIMEOUT_MS",
            Duration::ZERO,
        )?)
        .filter(|t| !t.is_zero());
        Ok(Self {
            pool_size,
            acquire_timeout,
            statement_timeout,
            ca_file: non_empty(lookup, "TESSERA_DATABASE_CA").map(PathBuf::from),
        })
    }
}

/// Everything `tessera serve <service>` needs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Which workload this is; always one of [`workloads`].
    pub service: String,
    /// The mTLS gRPC port other workloads call (`TESSERA_GRPC_ADDR`, default `0.0.0.0:8443`).
    pub grpc_addr: SocketAddr,
    /// The plaintext health and metrics port (`TESSERA_ADMIN_ADDR`, default `0.0.0.0:9090`).
    pub admin_addr: SocketAddr,
    /// The gateway's public port.
    pub public_addr: SocketAddr,
    /// Where local state lives (`TESSERA_DATA_DIR`): the SQLite database and the
    /// key-encryption key when no `DATABASE_URL` is set.
    pub data_dir: PathBuf,
    /// `tls.crt`, `tls.key`, `ca.crt`.
    pub tls_dir: PathBuf,
    /// How often the certificate files are re-read, so a rotated certificate is served
    /// without a restart (`TESSERA_TLS_RELOAD_MS`); never zero.
    pub tls_reload_interval: Duration,
    /// The gateway's public certificate (`tls.crt`, `tls.key`); the mesh one when unset.
    pub public_tls_dir: Option<PathBuf>,
    /// The SPIFFE trust domain of every workload identity (`TESSERA_TRUST_DOMAIN`).
    pub trust_domain: String,
    /// The namespace part of the SPIFFE ids (`TESSERA_NAMESPACE`); with `trust_domain` and
    /// `service` it is checked to make a valid id.
    pub namespace: String,
    /// JSON lines or human-readable logs (`TESSERA_LOG_FORMAT`).
    pub log_format: LogFormat,
    /// A `tracing` env-filter directive (`TESSERA_LOG`, default `info`).
    pub log_filter: String,
    /// PostgreSQL when set; SQLite under `data_dir` otherwise.
    pub database_url: Option<String>,
    /// The database pool and its PostgreSQL connection (`TESSERA_DATABASE_*`).
    pub database: DatabaseSettings,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
    /// Upstream targets by service (`TESSERA_<SERVICE>_TARGET`), e.g. `dns:posts:8443`.
    pub targets: BTreeMap<String, String>,
    /// The username that becomes ADMIN when it signs up (users service).
    pub bootstrap_admin: Option<String>,
    /// The gateway's rate limits (`TESSERA_RATE_LIMIT_*`).
    pub rate_limits: PublicRateLimits,
    /// Password hashing, login throttling and subscription limits (users, notifications).
    pub service_limits: crate::service_limits::ServiceLimits,
    /// Browser origins allowed to call the public port cross-origin (`TESSERA_CORS_ORIGINS`).
    pub cors_origins: Vec<String>,
    /// Token lifetimes and signing keys (users service; `config/tokens.rs`).
    pub tokens: tokens::TokenSettings,
    /// The server stack's limits: concurrency, deadline cap, message size, draining.
    pub server: ServerOptions,
}

fn parse<T: FromStr>(
    lookup: &dyn Fn(&str) -> Option<String>,
    key: &str,
    default: T,
    what: &str,
) -> Result<T, ConfigError> {
    match lookup(key) {
        None => Ok(default),
        Some(v) if v.trim().is_empty() => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| ConfigError::new(key, format!("expected {what}, got {v:?}"))),
    }
}

/// Requests per second: a finite number above zero (fractions allowed, e.g. 0.5).
fn per_second(
    lookup: &dyn Fn(&str) -> Option<String>,
    key: &str,
    default: f64,
) -> Result<f64, ConfigError> {
    let what = "requests per second, a number above 0";
    let rate: f64 = parse(lookup, key, default, what)?;
    if rate.is_finite() && rate > 0.0 {
        Ok(rate)
    } else {
        Err(ConfigError::new(
            key,
            format!("expected {what}, got {rate}"),
        ))
    }
}

/// A bucket's burst: at least one request.
fn burst(
    lookup: &dyn Fn(&str) -> Option<String>,
    key: &str,
    default: u32,
) -> Result<u32, ConfigError> {
    let what = "a whole number of requests, at least 1";
    match parse(lookup, key, default, what)? {
        0 => Err(ConfigError::new(key, format!("expected {what}, got 0"))),
        n => Ok(n),
    }
}

/// A duration in milliseconds that may be zero (a wait that can be skipped).
fn millis(
    lookup: &dyn Fn(&str) -> Option<String>,
    key: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    parse(
        lookup,
        key,
        default.as_millis() as u64,
        "a whole number of milliseconds",
    )
    .map(Duration::from_millis)
}

/// A duration in milliseconds above zero: an interval, bound or timeout, where zero would spin,
/// panic or refuse everything. Negative values fail to parse, so they are refused too.
fn positive_millis(
    lookup: &dyn Fn(&str) -> Option<String>,
    key: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let what = "a whole number of milliseconds above 0";
    match parse(lookup, key, default.as_millis() as u64, what)? {
        0 => Err(ConfigError::new(key, format!("expected {what}, got 0"))),
        ms => Ok(Duration::from_millis(ms)),
    }
}

/// A count or duration that must be at least 1.
fn positive<T: FromStr + PartialEq + From<u8>>(
    lookup: &dyn Fn(&str) -> Option<String>,
    key: &str,
    default: T,
    what: &str,
) -> Result<T, ConfigError> {
    let what = format!("{what}, at least 1");
    let value = parse(lookup, key, default, &what)?;
    if value == T::from(0) {
        return Err(ConfigError::new(key, format!("expected {what}, got 0")));
    }
    Ok(value)
}

/// The public port's connection limits (`TESSERA_PUBLIC_*`).
fn public_limits(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<crate::edge::PublicLimits, ConfigError> {
    let d = crate::edge::PublicLimits::default();
    let ms = |key: &str, default: Duration| {
        positive(lookup, key, default.as_millis() as u64, "milliseconds").map(Duration::from_millis)
    };
    Ok(crate::edge::PublicLimits {
        max_streams_per_conn: positive(
            lookup,
            "TESSERA_PUBLIC_MAX_STREAMS_PER_CONN",
            d.max_streams_per_conn,
            "a whole number of streams",
        )?,
        max_conns_per_addr: positive(
            lookup,
            "TESSERA_PUBLIC_MAX_CONNS_PER_ADDR",
            d.max_conns_per_addr,
            "a whole number of connections",
        )?,
        header_timeout: ms("TESSERA_PUBLIC_HEADER_TIMEOUT_MS", d.header_timeout)?,
        body_timeout: ms("TESSERA_PUBLIC_BODY_TIMEOUT_MS", d.body_timeout)?,
        idle_timeout: ms("TESSERA_PUBLIC_IDLE_TIMEOUT_MS", d.idle_timeout)?,
    })
}

fn non_empty(lookup: &dyn Fn(&str) -> Option<String>, key: &str) -> Option<String> {
    lookup(key).filter(|v| !v.trim().is_empty())
}

/// `TESSERA_CORS_ORIGINS`: comma-separated exact origins (`https://app.example.com`); none by
/// default. No wildcard: the API takes bearer tokens, so each origin is named on purpose.
fn cors_origins(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Vec<String>, ConfigError> {
    const KEY: &str = "TESSERA_CORS_ORIGINS";
    let mut out = Vec::new();
    for origin in non_empty(lookup, KEY).unwrap_or_default().split(',') {
        let origin = origin.trim();
        if origin.is_empty() {
            continue;
        }
        let host = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        match host {
            Some(h) if !h.is_empty() && !h.contains(['/', '*', ' ', '?', '#']) => {
                out.push(origin.to_owned());
            }
            _ => {
                return Err(ConfigError::new(
                    KEY,
                    format!("expected origins such as https://app.example.com, got {origin:?}"),
                ));
            }
        }
    }
    Ok(out)
}

impl Settings {
    /// Reads the settings of `service` through `lookup` (an environment-like map).
    ///
    /// The known workloads are the owners of Tessera's own contracts ([`workloads`]); a
    /// binary that also runs services compiled in their own crates names them all with
    /// [`Settings::from_lookup_among`].
    pub fn from_lookup(
        service: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let known = workloads();
        let known: Vec<&str> = known.iter().map(String::as_str).collect();
        Self::from_lookup_among(service, &known, lookup)
    }

    /// [`Settings::from_lookup`] for a mesh of the workloads `known`: `service` must be one
    /// of them, and `TESSERA_<NAME>_TARGET` is read for each.
    pub fn from_lookup_among(
        service: &str,
        known: &[&str],
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        if !known.contains(&service) {
            return Err(ConfigError::new(
                "service",
                format!(
                    "unknown service {service:?}; expected one of {}",
                    known.join(", ")
                ),
            ));
        }
        let defaults = ServerOptions::default();
        let addr = |key: &str, default: &str| -> Result<SocketAddr, ConfigError> {
            let default: SocketAddr = default
                .parse()
                .map_err(|_| ConfigError::new(key, "bad built-in default"))?;
            parse(
                lookup,
                key,
                default,
                "a socket address such as 0.0.0.0:8443",
            )
        };
        let mut targets = BTreeMap::new();
        for s in known {
            let key = format!("TESSERA_{}_TARGET", s.to_ascii_uppercase());
            if let Some(t) = non_empty(lookup, &key) {
                if !(t.starts_with("static:") || t.starts_with("dns:")) {
                    return Err(ConfigError::new(
                        &key,
                        format!(
                            "expected static:host:port[,host:port] or dns:name:port, got {t:?}"
                        ),
                    ));
                }
                targets.insert((*s).to_owned(), t);
            }
        }
        let trust_domain = non_empty(lookup, "TESSERA_TRUST_DOMAIN")
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
        let namespace = non_empty(lookup, "TESSERA_NAMESPACE")
            .unwrap_or_else(|| crate::identity::DEFAULT_NAMESPACE.to_owned());
        crate::identity::SpiffeId::new(&trust_domain, &namespace, service).map_err(|e| {
            ConfigError::new("TESSERA_TRUST_DOMAIN/TESSERA_NAMESPACE", e.to_string())
        })?;
        let settings = Self {
            service: service.to_owned(),
            grpc_addr: addr("TESSERA_GRPC_ADDR", "0.0.0.0:8443")?,
            admin_addr: addr("TESSERA_ADMIN_ADDR", "0.0.0.0:9090")?,
            public_addr: addr("TESSERA_PUBLIC_ADDR", "0.0.0.0:8080")?,
            data_dir: non_empty(lookup, "TESSERA_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("./data")),
            tls_dir: non_empty(lookup, "TESSERA_TLS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/run/tessera/tls")),
            tls_reload_interval: positive_millis(
                lookup,
                "TESSERA_TLS_RELOAD_MS",
                Duration::from_secs(10),
            )?,
            public_tls_dir: non_empty(lookup, "TESSERA_PUBLIC_TLS_DIR").map(PathBuf::from),
            trust_domain,
            namespace,
            log_format: parse(
                lookup,
                "TESSERA_LOG_FORMAT",
                LogFormat::Pretty,
                "json or pretty",
            )?,
            log_filter: non_empty(lookup, "TESSERA_LOG").unwrap_or_else(|| "info".to_owned()),
            database_url: non_empty(lookup, "DATABASE_URL"),
            database: DatabaseSettings::from_lookup(lookup)?,
            otlp_endpoint: non_empty(lookup, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            targets,
            bootstrap_admin: non_empty(lookup, "TESSERA_BOOTSTRAP_ADMIN"),
            rate_limits: {
                let d = PublicRateLimits::default();
                PublicRateLimits {
                    user_per_second: per_second(
                        lookup,
                        "TESSERA_RATE_LIMIT_USER_PER_SEC",
                        d.user_per_second,
                    )?,
                    user_burst: burst(lookup, "TESSERA_RATE_LIMIT_USER_BURST", d.user_burst)?,
                    address_per_second: per_second(
                        lookup,
                        "TESSERA_RATE_LIMIT_ADDR_PER_SEC",
                        d.address_per_second,
                    )?,
                    address_burst: burst(lookup, "TESSERA_RATE_LIMIT_ADDR_BURST", d.address_burst)?,
                }
            },
            service_limits: crate::service_limits::ServiceLimits::from_lookup(lookup)?,
            cors_origins: cors_origins(lookup)?,
            tokens: tokens::TokenSettings::from_lookup(lookup)?,
            server: ServerOptions {
                max_concurrency: parse(
                    lookup,
                    "TESSERA_MAX_CONCURRENCY",
                    defaults.max_concurrency,
                    "a positive integer",
                )?,
                deadline_cap: positive_millis(
                    lookup,
                    "TESSERA_DEADLINE_CAP_MS",
                    defaults.deadline_cap,
                )?,
                max_message_size: parse(
                    lookup,
                    "TESSERA_MAX_MESSAGE_BYTES",
                    defaults.max_message_size,
                    "a byte count",
                )?,
                drain_delay: millis(lookup, "TESSERA_DRAIN_DELAY_MS", defaults.drain_delay)?,
                drain_timeout: positive_millis(
                    lookup,
                    "TESSERA_DRAIN_TIMEOUT_MS",
                    defaults.drain_timeout,
                )?,
                allow_operator: parse(lookup, "TESSERA_ALLOW_OPERATOR", false, "true or false")?,
                // Comes from the telemetry set up with these settings, not from a variable.
                tracer: None,
                public: public_limits(lookup)?,
            },
        };
        if settings.server.max_concurrency == 0 {
            return Err(ConfigError::new(
                "TESSERA_MAX_CONCURRENCY",
                "must be at least 1",
            ));
        }
        if settings.server.max_message_size < 1024 {
            return Err(ConfigError::new(
                "TESSERA_MAX_MESSAGE_BYTES",
                "must be at least 1024",
            ));
        }
        Ok(settings)
    }

    /// The upstream target of `service`, if configured.
    pub fn target(&self, service: &str) -> Option<&str> {
        self.targets.get(service).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_and_overrides() {
        let s = Settings::from_lookup("posts", &lookup(&[])).unwrap();
        assert_eq!(s.grpc_addr.port(), 8443);
        assert_eq!(s.trust_domain, "tessera.local");
        assert!(!s.server.allow_operator);
        let s = Settings::from_lookup(
            "gateway",
            &lookup(&[
                ("TESSERA_GRPC_ADDR", "127.0.0.1:1234"),
                ("TESSERA_POSTS_TARGET", "dns:posts.tessera.svc:8443"),
                ("TESSERA_LOG_FORMAT", "json"),
                ("TESSERA_DRAIN_DELAY_MS", "0"),
                ("TESSERA_RATE_LIMIT_USER_PER_SEC", "0.5"),
                ("TESSERA_RATE_LIMIT_ADDR_BURST", "1000"),
            ]),
        )
        .unwrap();
        assert_eq!(s.rate_limits.user_per_second, 0.5);
        assert_eq!(s.rate_limits.address_burst, 1000);
        assert_eq!(
            s.rate_limits.user_burst,
            PublicRateLimits::default().user_burst
        );
        assert_eq!(s.grpc_addr.port(), 1234);
        assert_eq!(s.target("posts"), Some("dns:posts.tessera.svc:8443"));
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.server.drain_delay, Duration::ZERO);

        let d = Settings::from_lookup("posts", &lookup(&[]))
            .unwrap()
            .database;
        assert_eq!(d.pool_size, None);
        assert_eq!(d.statement_timeout, None);
        let d = Settings::from_lookup(
            "posts",
            &lookup(&[
                ("TESSERA_DATABASE_POOL_SIZE", "4"),
                ("TESSERA_DATABASE_ACQUIRE_TIMEOUT_MS", "2500"),
                ("TESSERA_DATABASE_STATEMENT_TIMEOUT_MS", "30000"),
                ("TESSERA_DATABASE_CA", "/var/run/tessera/db/ca.crt"),
            ]),
        )
        .unwrap()
        .database;
        assert_eq!(d.pool_size, Some(4));
        assert_eq!(d.acquire_timeout, Duration::from_millis(2500));
        assert_eq!(d.statement_timeout, Some(Duration::from_secs(30)));
        assert_eq!(
            d.ca_file.as_deref(),
            Some(std::path::Path::new("/var/run/tessera/db/ca.crt"))
        );
        assert_eq!(s.server.public, crate::edge::PublicLimits::default());
        let s = Settings::from_lookup(
            "gateway",
            &lookup(&[
                ("TESSERA_PUBLIC_MAX_STREAMS_PER_CONN", "8"),
                ("TESSERA_PUBLIC_MAX_CONNS_PER_ADDR", "4"),
                ("TESSERA_PUBLIC_HEADER_TIMEOUT_MS", "1500"),
                ("TESSERA_PUBLIC_BODY_TIMEOUT_MS", "2500"),
                ("TESSERA_PUBLIC_IDLE_TIMEOUT_MS", "3500"),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.server.public,
            crate::edge::PublicLimits {
                max_streams_per_conn: 8,
                max_conns_per_addr: 4,
                header_timeout: Duration::from_millis(1500),
                body_timeout: Duration::from_millis(2500),
                idle_timeout: Duration::from_millis(3500),
            }
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (key, value) in [
            ("TESSERA_GRPC_ADDR", "nope"),
            ("TESSERA_MAX_CONCURRENCY", "0"),
            ("TESSERA_LOG_FORMAT", "xml"),
            ("TESSERA_POSTS_TARGET", "http://x"),
            ("TESSERA_ALLOW_OPERATOR", "maybe"),
            ("TESSERA_RATE_LIMIT_USER_PER_SEC", "0"),
            ("TESSERA_RATE_LIMIT_USER_PER_SEC", "-3"),
            ("TESSERA_RATE_LIMIT_ADDR_PER_SEC", "inf"),
            ("TESSERA_RATE_LIMIT_ADDR_PER_SEC", "NaN"),
            ("TESSERA_RATE_LIMIT_USER_BURST", "0"),
            ("TESSERA_RATE_LIMIT_ADDR_BURST", "1.5"),
            ("TESSERA_TLS_RELOAD_MS", "0"),
            ("TESSERA_TLS_RELOAD_MS", "-1"),
            ("TESSERA_DEADLINE_CAP_MS", "0"),
            ("TESSERA_DEADLINE_CAP_MS", "-30000"),
            ("TESSERA_DRAIN_TIMEOUT_MS", "0"),
            ("TESSERA_DRAIN_TIMEOUT_MS", "-5"),
            ("TESSERA_DRAIN_DELAY_MS", "-1"),
            ("TESSERA_DRAIN_DELAY_MS", "1.5"),
            ("TESSERA_DATABASE_POOL_SIZE", "0"),
            ("TESSERA_DATABASE_POOL_SIZE", "many"),
            ("TESSERA_DATABASE_ACQUIRE_TIMEOUT_MS", "0"),
            ("TESSERA_DATABASE_STATEMENT_TIMEOUT_MS", "-5"),
            ("TESSERA_PUBLIC_MAX_STREAMS_PER_CONN", "0"),
            ("TESSERA_PUBLIC_MAX_STREAMS_PER_CONN", "-1"),
            ("TESSERA_PUBLIC_MAX_CONNS_PER_ADDR", "0"),
            ("TESSERA_PUBLIC_MAX_CONNS_PER_ADDR", "lots"),
            ("TESSERA_PUBLIC_HEADER_TIMEOUT_MS", "0"),
            ("TESSERA_PUBLIC_HEADER_TIMEOUT_MS", "-5"),
            ("TESSERA_PUBLIC_BODY_TIMEOUT_MS", "0"),
            ("TESSERA_PUBLIC_BODY_TIMEOUT_MS", "1s"),
            ("TESSERA_PUBLIC_IDLE_TIMEOUT_MS", "0"),
            ("TESSERA_PUBLIC_IDLE_TIMEOUT_MS", "2.5"),
        ] {
            let err = Settings::from_lookup("posts", &lookup(&[(key, value)])).unwrap_err();
            assert_eq!(err.setting, key, "{err}");
        }
        let err = Settings::from_lookup("nope", &lookup(&[])).unwrap_err();
        assert_eq!(err.setting, "service");
    }

    #[test]
    fn cors_origins_are_exact_origins() {
        let s = Settings::from_lookup("gateway", &lookup(&[])).unwrap();
        assert!(s.cors_origins.is_empty());
        let s = Settings::from_lookup(
            "gateway",
            &lookup(&[(
                "TESSERA_CORS_ORIGINS",
                "https://a.example, http://localhost:3000",
            )]),
        )
        .unwrap();
        assert_eq!(
            s.cors_origins,
            ["https://a.example", "http://localhost:3000"]
        );
        for bad in ["*", "a.example", "https://a.example/path", "ftp://x"] {
            let err = Settings::from_lookup("gateway", &lookup(&[("TESSERA_CORS_ORIGINS", bad)]))
                .unwrap_err();
            assert_eq!(err.setting, "TESSERA_CORS_ORIGINS", "{bad}");
        }
    }
}
