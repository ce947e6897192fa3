//! [`ClientBuilder`]: credentials and call policy, shared by every channel it builds.

use std::{sync::Arc, time::Duration};

use tessera_mesh::{
    identity::SpiffeId,
    tls::{ClientTls, TlsFiles},
};
use tower::{balance::p2c::Balance, retry::budget::TpsBudget};

use crate::{
    Channel, Clients, Error, Resolve, Targets,
    call::{Balanced, CallPolicy},
    discover::{self, EndpointFactory},
    endpoint::{Connector, Security},
    methods::MethodTable,
    target::Target,
};

/// How many retries a channel may add on top of its calls: `ratio` of the calls made in the
/// last `window`, plus `min_per_second` so a quiet channel can still retry. See
/// `tower::retry::budget::TpsBudget`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudget {
    /// Retries per call, 0.0 to 10.0 (0.2: one retry for every five calls).
    pub ratio: f32,
    /// Retries per second allowed regardless of traffic.
    pub min_per_second: u32,
    /// How far back calls count, 1 to 60 seconds.
    pub window: Duration,
}

impl Default for RetryBudget {
    /// 20% of recent calls plus 10 per second over a 10-second window (Linkerd's defaults).
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Builds [`Channel`]s and [`Clients`]: one balanced channel per target, all presenting the
/// same workload certificate and following the same call policy.
///
/// Defaults: 10 s deadline per unary call (server streams get none), targets re-resolved
/// every 5 s, 3 s connect timeout (also how long a call waits when no replica is ready), up
/// to 3 tries for idempotent methods (25 ms first backoff, 250 ms cap, jittered) under the
/// default [`RetryBudget`], requests up to 4 MiB replayable, peak-EWMA with a 1 ms initial
/// estimate (in-cluster latency; a new replica is tried soon) and a 2 s decay.
///
/// Channels spawn their resolver on the current Tokio runtime, so build them inside one.
#[derive(Clone)]
pub struct ClientBuilder {
    security: Security,
    timeout: Option<Duration>,
    refresh_interval: Duration,
    connect_timeout: Duration,
    max_attempts: u32,
    budget: RetryBudget,
    backoff: (Duration, Duration),
    ewma: (Duration, Duration),
    max_replay_bytes: usize,
}

impl ClientBuilder {
    /// Calls over mTLS, presenting the workload certificate in `tls` (which reloads itself
    /// when its files change) and verifying servers against its trust bundle.
    pub fn mtls(tls: ClientTls) -> Self {
        Self::new(Security::Mtls(tls))
    }

    /// [`ClientBuilder::mtls`] with the certificate, key and trust bundle read from `files` and
    /// re-read every `reload_interval`.
    pub fn mtls_files(files: TlsFiles, reload_interval: Duration) -> Result<Self, Error> {
        Ok(Self::mtls(ClientTls::load(files, reload_interval)?))
    }

    /// Calls over plaintext HTTP/2: for tests and benchmarks, never between workloads.
    pub fn plaintext() -> Self {
        Self::new(Security::Plaintext)
    }

    fn new(security: Security) -> Self {
        Self {
            security,
            timeout: Some(Duration::from_secs(10)),
            refresh_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            max_attempts: 3,
            budget: RetryBudget::default(),
            backoff: (Duration::from_millis(25), Duration::from_millis(250)),
            ewma: (Duration::from_millis(1), Duration::from_secs(2)),
            max_replay_bytes: 4 << 20,
        }
    }

    /// The deadline of unary calls that set none (`tonic::Request::set_timeout`); server
    /// streams get no default. Inside a handler the incoming call's remaining deadline caps
    /// every call either way.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How often targets are resolved again (a `dns:` headless Service follows pods coming
    /// and going at this pace).
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval;
        self
    }

    /// How long one connect (TCP, TLS and HTTP/2 handshakes) may take. It is also how long a
    /// call waits for a ready replica when none is: after that, calls fail UNAVAILABLE at once
    /// until one is ready again.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Tries per call, the first included (1 turns retries off).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// How many retries the channel may add; see [`RetryBudget`].
    pub fn retry_budget(mut self, budget: RetryBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Wait before the first retry (doubling after, up to `cap`; each wait jittered to 50-100%).
    pub fn retry_backoff(mut self, first: Duration, cap: Duration) -> Self {
        self.backoff = (first, cap);
        self
    }

    /// The latency estimate of a replica before its first response, and how fast estimates
    /// forget a slow response. The 2 s default is shorter than the 10 s of Finagle and Linkerd:
    /// with millisecond latencies one scheduling hiccup on a healthy replica would otherwise
    /// keep it looking slower than a really slow one for tens of seconds, while a slow replica
    /// is measured again (and avoided again) on each call it is still sent.
    pub fn peak_ewma(mut self, default_rtt: Duration, decay: Duration) -> Self {
        self.ewma = (default_rtt, decay);
        self
    }

    /// Requests larger than this are sent once, never retried.
    pub fn max_replay_bytes(mut self, bytes: usize) -> Self {
        self.max_replay_bytes = bytes;
        self
    }

    /// A channel to `target`: `static:host:port[,host:port...]`, `dns:name:port` (re-resolved
    /// every refresh interval; a Kubernetes headless Service), or a bare `host:port`.
    ///
    /// Over mTLS it accepts any server of the workload's trust domain: for tools and tests.
    /// Mesh clients dial one service and pin it with [`ClientBuilder::channel_to`] (or
    /// [`ClientBuilder::clients`], which does).
    pub fn channel(&self, target: &str) -> Result<Channel, Error> {
        self.channel_pinned(None, target)
    }

    /// A channel to `target` that accepts only the server identity of `service`: the SPIFFE id
    /// with that service name in this workload's own trust domain and namespace. A replica
    /// presenting any other certificate (another workload's, or the `operator`'s) fails the
    /// handshake, logged with both ids, and gets no call.
    pub fn channel_to(&self, service: &str, target: &str) -> Result<Channel, Error> {
        let pin = match &self.security {
            Security::Mtls(tls) => {
                Some(
                    tls.identity()
                        .sibling(service)
                        .map_err(|_| Error::InvalidSetting {
                            setting: "channel_to",
                            reason: "the service is not a valid SPIFFE service-account name",
                        })?,
                )
            }
            Security::Plaintext => None,
        };
        self.channel_pinned(pin, target)
    }

    /// A channel to `target` that accepts only a server presenting exactly `server` (any trust
    /// domain or namespace); see [`ClientBuilder::channel_to`]. Plaintext channels ignore it.
    pub fn channel_for(&self, server: &SpiffeId, target: &str) -> Result<Channel, Error> {
        self.channel_pinned(Some(server.clone()), target)
    }

    fn channel_pinned(&self, pin: Option<SpiffeId>, target: &str) -> Result<Channel, Error> {
        let name = target;
        let target = Target::parse(target)?;
        let authority = target.authority();
        let server_name = target.server_name();
        self.build(
            name,
            Arc::new(target.into_resolver()),
            &server_name,
            authority,
            pin,
        )
    }

    /// A channel whose replicas come from `resolver`. `server_name` is what TLS is told (any
    /// valid name: servers are verified by SPIFFE id, here any of the trust domain, as with
    /// [`ClientBuilder::channel`]); each replica's address is its `:authority`.
    pub fn channel_with_resolver(
        &self,
        resolver: impl Resolve,
        server_name: &str,
    ) -> Result<Channel, Error> {
        self.build(server_name, Arc::new(resolver), server_name, None, None)
    }

    /// Typed clients for the services in `targets`, each channel pinned to its service's
    /// identity ([`ClientBuilder::channel_to`]).
    pub fn clients(&self, targets: &Targets) -> Result<Clients, Error> {
        let channel = |service: &str, target: &Option<String>| {
            target
                .as_deref()
                .map(|t| self.channel_to(service, t))
                .transpose()
        };
        Ok(Clients::from_channels(
            channel("users", &targets.users)?,
            channel("posts", &targets.posts)?,
            channel("comments", &targets.comments)?,
            channel("notifications", &targets.notifications)?,
        ))
    }

    fn build(
        &self,
        name: &str,
        resolver: Arc<dyn Resolve>,
        server_name: &str,
        authority: Option<String>,
        pin: Option<SpiffeId>,
    ) -> Result<Channel, Error> {
        self.validate()?;
        let methods = MethodTable::tessera()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        let authority = authority
            .map(|a| {
                http::uri::Authority::try_from(a).map_err(|_| Error::InvalidTarget {
                    target: server_name.to_owned(),
                    reason: "not a valid authority",
                })
            })
            .transpose()?;
        let factory = EndpointFactory {
            connector: Connector::new(
                self.security.clone(),
                pin,
                server_name,
                self.connect_timeout,
            ),
            authority,
            default_rtt: self.ewma.0,
            decay: self.ewma.1,
        };
        let discovered = discover::spawn(resolver, self.refresh_interval, factory);
        let budget = TpsBudget::new(
            self.budget.window,
            self.budget.min_per_second,
            self.budget.ratio,
        );
        let policy = CallPolicy {
            timeout: self.timeout,
            max_attempts: self.max_attempts,
            backoff_first: self.backoff.0,
            backoff_cap: self.backoff.1,
            max_replay_bytes: self.max_replay_bytes,
            fail_fast_after: self.connect_timeout,
        };
        Ok(Channel::balanced(Balanced::new(
            name,
            Balance::new(discovered),
            methods,
            budget,
            policy,
        )))
    }

    /// Ranges the underlying tower types assert on, checked here so bad settings are an
    /// error, not a panic.
    fn validate(&self) -> Result<(), Error> {
        let invalid = |setting, reason| Err(Error::InvalidSetting { setting, reason });
        let budget = &self.budget;
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&budget.window) {
            return invalid("retry_budget", "the window is from 1 to 60 seconds");
        }
        if !(0.0..=10.0).contains(&budget.ratio) {
            return invalid("retry_budget", "the ratio is from 0.0 to 10.0");
        }
        if budget.min_per_second > 1_000_000 {
            return invalid("retry_budget", "min_per_second is at most 1000000");
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts", "at least 1");
        }
        if self.refresh_interval.is_zero() {
            return invalid("refresh_interval", "more than zero");
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout", "more than zero");
        }
        if self.ewma.1.is_zero() {
            return invalid("peak_ewma", "the decay is more than zero");
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return invalid("timeout", "more than zero");
        }
        Ok(())
    }
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field(
                "security",
                &match self.security {
                    Security::Plaintext => "plaintext",
                    Security::Mtls(_) => "mtls",
                },
            )
            .field("timeout", &self.timeout)
            .field("refresh_interval", &self.refresh_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("budget", &self.budget)
            .field("backoff", &self.backoff)
            .field("ewma", &self.ewma)
            .field("max_replay_bytes", &self.max_replay_bytes)
            .finish()
    }
}
