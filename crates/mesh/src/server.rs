//! Serving a workload: the internal mTLS port, the plaintext admin port (the `admin` module)
//! and, for the gateway, a public server-TLS port; with graceful shutdown (readiness off, a
//! delay for endpoints to update, then a bounded drain). Reflection and health on the service
//! ports come from [`crate::reflection`].

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tonic::{body::Body, service::Routes};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::{Layer, Service, util::BoxCloneSyncService};

use crate::{
    admin::{self, AdminService},
    auth::TokenKeys,
    coalesce::Coalesce,
    identity::{SpiffeId, spiffe_id_from_der},
    metrics::Metrics,
    policy::Policy,
    reflection::with_health_and_reflection,
    shutdown::Shutdown,
    stack::{Authorizer, PeerInfo, RequestPath, RequestPathService},
    tls::TlsSource,
};

/// A boxed gRPC service, the unit every port serves.
pub type GrpcService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Wraps the public port's whole request path, outermost (the gateway's HTTP/JSON and
/// gRPC-Web front, which turns those calls into gRPC calls through that path).
pub type PublicEdge = Arc<dyn Fn(GrpcService) -> GrpcService + Send + Sync>;

/// Tunables of the request path and of shutdown.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Calls in a handler at once before new ones are refused.
    pub max_concurrency: usize,
    /// Upper bound on any call's deadline.
    pub deadline_cap: Duration,
    /// Largest incoming message, in bytes.
    pub max_message_size: usize,
    /// After readiness goes NOT_SERVING, how long to keep accepting while endpoints update.
    pub drain_delay: Duration,
    /// How long in-flight calls get to finish once listeners close.
    pub drain_timeout: Duration,
    /// Let the `operator` identity call every method (development).
    pub allow_operator: bool,
    /// Where server spans go ([`crate::telemetry::TelemetryGuard::tracer`]); without one,
    /// calls are not traced here (trace context is still passed on).
    pub tracer: Option<opentelemetry_sdk::trace::Tracer>,
    /// What one client may hold open on the gateway's public port.
    pub public: crate::edge::PublicLimits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_concurrency: 1024,
            deadline_cap: Duration::from_secs(30),
            max_message_size: 4 * 1024 * 1024,
            drain_delay: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(20),
            allow_operator: false,
            tracer: None,
            public: crate::edge::PublicLimits::default(),
        }
    }
}

/// The listeners a workload serves on; bind them first (port 0 in tests) so addresses are
/// known before anything starts.
pub struct Listeners {
    /// The internal mTLS port other workloads call.
    pub grpc: TcpListener,
    /// The plaintext port of health probes and metrics.
    pub admin: TcpListener,
    /// The gateway's public port.
    pub public: Option<TcpListener>,
}

/// One service's platform: identity, policy, metrics, health, and the servers.
#[derive(Clone)]
pub struct Workload {
    name: String,
    tls: TlsSource,
    policy: Arc<Policy>,
    keys: Option<TokenKeys>,
    options: ServerOptions,
    metrics: Metrics,
    health: HealthReporter,
    admin_health: HealthReporter,
    public_edge: Option<PublicEdge>,
    /// What must have happened before readiness says SERVING ([`Workload::ready_when`]).
    ready_gate: Option<ReadyGate>,
    /// Fired once the drain delay is over: server streams end (see [`RequestPath::drain`]).
    drain: Arc<tokio::sync::watch::Sender<bool>>,
}

/// A start-up condition readiness waits for; shared so the workload stays `Clone`.
type ReadyGate = futures::future::Shared<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>;

/// Service names reported on the admin port, for kubelet's probes.
pub const LIVENESS: &str = "liveness";
/// The admin port's service name for readiness: SERVING once started and ready, NOT_SERVING
/// again from the start of shutdown so endpoints stop sending calls.
pub const READINESS: &str = "readiness";

impl Workload {
    /// The platform of service `name`, serving the certificate from `tls`. `keys` verify
    /// end-user tokens on the internal port; without them a call there carrying a token is
    /// refused (UNAUTHENTICATED).
    pub fn new(
        name: &str,
        tls: TlsSource,
        policy: Arc<Policy>,
        keys: Option<TokenKeys>,
        options: ServerOptions,
    ) -> Self {
        Self {
            name: name.to_owned(),
            tls,
            policy,
            keys,
            options,
            metrics: Metrics::new(),
            health: HealthReporter::new(),
            admin_health: HealthReporter::new(),
            public_edge: None,
            ready_gate: None,
            drain: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Puts `edge` in front of the public port's request path.
    pub fn with_public_edge(mut self, edge: PublicEdge) -> Self {
        self.public_edge = Some(edge);
        self
    }

    /// Readiness (admin `readiness` and "", and the service port's health) stays NOT_SERVING
    /// until `gate` completes, e.g. until signing keys are fetched and upstream connections
    /// were attempted. Liveness is SERVING from the start; the ports serve calls either way.
    pub fn ready_when(mut self, gate: impl Future<Output = ()> + Send + 'static) -> Self {
        let gate: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(gate);
        self.ready_gate = Some(futures::FutureExt::shared(gate));
        self
    }

    /// The service name this workload was created with, as it appears in logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SPIFFE id of the certificate served now (it follows rotation).
    pub fn identity(&self) -> SpiffeId {
        self.tls.identity()
    }

    /// The metrics every port records into, rendered on the admin port.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The request-path and shutdown tunables this workload was created with.
    pub fn options(&self) -> &ServerOptions {
        &self.options
    }

    /// The access rules the internal port enforces.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// The health reporter of the service port (service names are the full gRPC names).
    pub fn health(&self) -> &HealthReporter {
        &self.health
    }

    /// The health reporter of the admin port (`liveness`, `readiness`, "").
    pub fn admin_health(&self) -> &HealthReporter {
        &self.admin_health
    }

    /// The internal port's whole request path around `routes`, plus health and reflection
    /// listing only `served` (all of the contracts without it).
    fn internal_path(
        &self,
        routes: Routes,
        served: Option<&[String]>,
    ) -> RequestPathService<Routes> {
        let routes =
            with_health_and_reflection(routes, &self.health, served, self.policy.descriptor_set());
        let authorizer = Authorizer {
            me: self.tls.identity(),
            allow_operator: self.options.allow_operator,
            keys: self.keys.clone(),
        };
        self.request_path(Some(authorizer))
            .layer()
            .layer(routes.prepare())
    }

    fn request_path(&self, authorizer: Option<Authorizer>) -> RequestPath {
        // Only the public port (no authorizer) waits for the message before shedding.
        let message_deadline = authorizer
            .is_none()
            .then_some(self.options.public.body_timeout);
        RequestPath {
            message_deadline,
            metrics: self.metrics.clone(),
            policy: self.policy.clone(),
            authorizer,
            deadline_cap: self.options.deadline_cap,
            max_in_flight: self.options.max_concurrency,
            max_message_size: self.options.max_message_size,
            tracer: self.options.tracer.clone(),
            drain: Some(self.drain.subscribe()),
        }
    }

    /// The gateway's public request path: no client certificate, so no caller identity or
    /// access check here; `service` itself routes only public methods and checks tokens.
    /// The public edge ([`Workload::with_public_edge`]), if any, goes in front of it.
    pub fn public_service(&self, service: GrpcService) -> GrpcService {
        let path = BoxCloneSyncService::new(self.request_path(None).layer().layer(service));
        match &self.public_edge {
            Some(edge) => edge(path),
            None => path,
        }
    }

    /// Serves until `shutdown` fires, then drains: readiness NOT_SERVING (liveness stays
    /// SERVING, so kubelet does not restart a draining pod), `drain_delay`, listeners close
    /// (GOAWAY on open connections), server streams end with UNAVAILABLE, and in-flight calls
    /// get `drain_timeout`. Readiness turns SERVING once the [`Workload::ready_when`] gate is
    /// through.
    pub async fn run(
        self,
        routes: Routes,
        served: &[&str],
        listeners: Listeners,
        public: Option<GrpcService>,
        mut shutdown: Shutdown,
    ) -> std::io::Result<()> {
        self.admin_health
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        let initially = if self.ready_gate.is_some() {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        self.set_readiness(served, initially).await;
        // Whether the drain has begun; the gate may not turn readiness back on after it.
        let draining = Arc::new(tokio::sync::Mutex::new(false));
        let gate = self.ready_gate.clone().map(|gate| {
            let workload = self.clone();
            let served: Vec<String> = served.iter().map(|s| (*s).to_owned()).collect();
            let draining = draining.clone();
            tokio::spawn(async move {
                gate.await;
                let draining = draining.lock().await;
                if !*draining {
                    let served: Vec<&str> = served.iter().map(String::as_str).collect();
                    workload
                        .set_readiness(&served, ServingStatus::Serving)
                        .await;
                    tracing::info!(workload = %workload.name, "ready");
                }
            })
        });

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let advertised: Vec<String> = served.iter().map(|s| (*s).to_owned()).collect();
        let internal = self.internal_path(routes, Some(&advertised));
        let mut tasks = tokio::task::JoinSet::new();
        let grpc_addr = listeners.grpc.local_addr()?;
        tasks.spawn(serve_tls(
            listeners.grpc,
            self.tls.clone(),
            true,
            internal,
            stop_rx.clone(),
            self.options.drain_timeout,
        ));
        if let (Some(listener), Some(public)) = (listeners.public, public) {
            tasks.spawn(crate::edge::serve_public(
                listener,
                self.tls.clone(),
                self.public_service(public),
                self.options.public.clone(),
                stop_rx.clone(),
                self.options.drain_timeout,
            ));
        }
        let (admin_stop_tx, admin_stop_rx) = tokio::sync::watch::channel(false);
        let admin = tokio::spawn(admin::serve_admin(
            listeners.admin,
            self.admin_service(),
            admin_stop_rx,
        ));
        tracing::info!(workload = %self.name, grpc = %grpc_addr, "serving");

        shutdown.wait().await;
        tracing::info!(workload = %self.name, "shutting down: readiness off");
        {
            let mut draining = draining.lock().await;
            *draining = true;
            if let Some(gate) = &gate {
                gate.abort();
            }
            self.set_readiness(served, ServingStatus::NotServing).await;
        }
        tokio::time::sleep(self.options.drain_delay).await;
        // Listeners close and open connections get GOAWAY; then server streams end, so their
        // consumers reconnect (to another replica) instead of holding the drain.
        let _ = stop_tx.send(true);
        self.drain.send_replace(true);
        let mut result = Ok(());
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Err(err)) => result = Err(err),
                Err(err) => result = Err(std::io::Error::other(err)),
                Ok(Ok(())) => {}
            }
        }
        let _ = admin_stop_tx.send(true);
        let _ = admin.await;
        tracing::info!(workload = %self.name, "stopped");
        result
    }

    /// Readiness on the admin port (`readiness` and "") and the service port's health.
    async fn set_readiness(&self, served: &[&str], status: ServingStatus) {
        for name in [READINESS, ""] {
            self.admin_health.set_service_status(name, status).await;
        }
        for name in served.iter().copied().chain([""]) {
            self.health.set_service_status(name, status).await;
        }
    }

    fn admin_service(&self) -> AdminService {
        AdminService::new(&self.admin_health, &self.metrics)
    }
}

pub(crate) fn http2_builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .max_header_list_size(64 * 1024);
    builder
}

/// Dead peers are found by TCP keepalive (idle 30 s, then 3 probes 10 s apart) rather than
/// HTTP/2 PINGs: hyper's PING keepalive does bookkeeping on every frame of every call, which
/// showed in the per-call CPU profile; the kernel's probes cost nothing until a link idles.
pub(crate) fn keepalive(tcp: &tokio::net::TcpStream) {
    let probes = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(err) = socket2::SockRef::from(tcp).set_tcp_keepalive(&probes) {
        tracing::debug!(error = %err, "cannot enable TCP keepalive");
    }
}

pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it here rather than across a select.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TLS connections (client certificates required when `mutual`) and serves HTTP/2
/// gRPC on them until `stop` turns true; then stops accepting and gives open connections
/// `drain` to finish their calls.
pub async fn serve_tls<S>(
    listener: TcpListener,
    tls: TlsSource,
    mutual: bool,
    service: S,
    mut stop: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) -> std::io::Result<()>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // The public port also speaks HTTP/1.1 (JSON API, gRPC-Web, the web front end).
    let builder = Arc::new(if mutual {
        http2_builder().http2_only()
    } else {
        let mut builder = http2_builder();
        // hyper's HTTP/1.1 header-read timeout (30 s) only works with a timer.
        builder.http1().timer(TokioTimer::new());
        builder
    });
    let trust_domain = tls.identity().trust_domain().to_owned();
    loop {
        let (tcp, remote_addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = tcp.set_nodelay(true);
        keepalive(&tcp);
        let config = if mutual {
            tls.mtls_server_config()
        } else {
            tls.public_server_config()
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let trust_domain = trust_domain.clone();
        let mut stopping = stop.clone();
        tokio::spawn(async move {
            // A handshake still under way when the server stops is dropped: it has no call
            // to finish, and waiting for it would hold the drain for up to its timeout.
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let handshake = tokio::select! {
                done = handshake => done,
                _ = stopped(&mut stopping) => {
                    tracing::debug!(peer = %remote_addr, "TLS handshake dropped: the server is stopping");
                    return;
                }
            };
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(peer = %remote_addr, error = %err, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %remote_addr, "TLS handshake timed out");
                    return;
                }
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|leaf| spiffe_id_from_der(leaf).ok())
                .filter(|id| id.trust_domain() == trust_domain)
                .map(Arc::new);
            if mutual && identity.is_none() {
                tracing::warn!(peer = %remote_addr, "client certificate has no SPIFFE id in our trust domain");
                return;
            }
            let peer = PeerInfo {
                remote_addr,
                identity,
            };
            let hyper_service =
                hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let mut req = req.map(Body::new);
                    req.extensions_mut().insert(peer.clone());
                    let mut service = service.clone();
                    async move { service.call(req).await }
                });
            // Internal connections carry many calls at once; the public port's carry a
            // client's few (see `coalesce`).
            let io = if mutual {
                Coalesce::new(stream)
            } else {
                Coalesce::off(stream)
            };
            let conn = builder.serve_connection(TokioIo::new(io), hyper_service);
            if let Err(err) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(peer = %remote_addr, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed with calls still in flight; closing them");
    }
    Ok(())
}

/// Binds `addr`, naming it in the error (so "port in use" says which).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
