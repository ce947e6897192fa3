//! Serving a workload: the internal mTLS port, the plaintext admin port (health for kubelet,
//! `/metrics` for Prometheus) and, for the gateway, a public server-TLS port; with graceful
//! shutdown (readiness off, a delay for endpoints to update, then a bounded drain).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tonic::{Status, body::Body, service::Routes};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::{Layer, Service, util::BoxCloneSyncService};

use crate::{
    auth::TokenKeys,
    identity::{SpiffeId, spiffe_id_from_der},
    metrics::Metrics,
    policy::Policy,
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
    pub grpc: TcpListener,
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
pub const READINESS: &str = "readiness";

impl Workload {
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

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn identity(&self) -> SpiffeId {
        self.tls.identity()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn options(&self) -> &ServerOptions {
        &self.options
    }

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

    /// The internal port's whole request path around `routes`, plus health and reflection.
    /// Exposed so tests can call it without sockets (insert a [`PeerInfo`] first).
    pub fn internal_service(&self, routes: Routes) -> GrpcService {
        self.internal_service_advertising(routes, None)
    }

    /// [`Workload::internal_service`] with reflection listing only `served` (plus health).
    pub fn internal_service_advertising(
        &self,
        routes: Routes,
        served: Option<&[String]>,
    ) -> GrpcService {
        BoxCloneSyncService::new(self.internal_path(routes, served))
    }

    fn internal_path(
        &self,
        routes: Routes,
        served: Option<&[String]>,
    ) -> RequestPathService<Routes> {
        let routes = with_health_and_reflection(routes, &self.health, served);
        let authorizer = Authorizer {
            policy: self.policy.clone(),
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
        let admin = tokio::spawn(serve_admin(
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
        AdminService {
            health: tonic_health::pb::health_server::HealthServer::new(
                tonic_health::server::HealthService::from_health_reporter(
                    self.admin_health.clone(),
                ),
            ),
            metrics: self.metrics.clone(),
        }
    }
}

/// The contracts' descriptors as the public port shows them: only the `advertise`d services,
/// each with only its public methods, so `describe` does not reveal internal methods. The
/// access rules (custom method options, dropped by this decoding) are not shown there either;
/// comments are kept, moved along with the services and methods they belong to.
fn public_descriptor_set(advertise: &[String]) -> Result<Vec<u8>, prost::DecodeError> {
    use prost::Message as _;
    // Field numbers in descriptor.proto: FileDescriptorProto.service = 6,
    // ServiceDescriptorProto.method = 2 (the first steps of a source-location path).
    const SERVICE: i32 = 6;
    const METHOD: i32 = 2;
    let policy = Policy::contracts();
    let mut set = prost_types::FileDescriptorSet::decode(tessera::FILE_DESCRIPTOR_SET)?;
    for file in &mut set.file {
        let package = file.package().to_owned();
        // Old index -> new index, per service and per method of each service.
        let mut services: Vec<Option<(i32, Vec<Option<i32>>)>> = Vec::new();
        let mut kept = 0;
        for service in &file.service {
            let full = format!("{package}.{}", service.name());
            if !advertise.contains(&full) {
                services.push(None);
                continue;
            }
            let mut next = 0;
            let methods = service
                .method
                .iter()
                .map(|m| {
                    let public = policy
                        .rule(&format!("/{full}/{}", m.name()))
                        .is_some_and(|rule| rule.public);
                    public.then(|| {
                        next += 1;
                        next - 1
                    })
                })
                .collect();
            services.push(Some((kept, methods)));
            kept += 1;
        }
        let mut index = 0;
        file.service.retain_mut(|service| {
            let slot = services.get(index).cloned().flatten();
            index += 1;
            let Some((_, methods)) = slot else {
                return false;
            };
            let mut m = 0;
            service.method.retain(|_| {
                m += 1;
                methods.get(m - 1).copied().flatten().is_some()
            });
            true
        });
        if let Some(info) = &mut file.source_code_info {
            info.location.retain_mut(|loc| {
                if loc.path.first() != Some(&SERVICE) {
                    return true;
                }
                let Some(old) = loc.path.get(1).and_then(|i| usize::try_from(*i).ok()) else {
                    return true;
                };
                let Some(Some((new, methods))) = services.get(old) else {
                    return false;
                };
                loc.path[1] = *new;
                if loc.path.get(2) == Some(&METHOD)
                    && let Some(old) = loc.path.get(3).and_then(|i| usize::try_from(*i).ok())
                {
                    match methods.get(old).copied().flatten() {
                        Some(new) => loc.path[3] = new,
                        None => return false,
                    }
                }
                true
            });
        }
    }
    Ok(set.encode_to_vec())
}

/// Adds gRPC health (this reporter) and reflection v1 and v1alpha to `routes`. With
/// `advertise`, reflection lists only those services.
pub fn with_health_and_reflection(
    routes: Routes,
    health: &HealthReporter,
    advertise: Option<&[String]>,
) -> Routes {
    health_and_reflection(routes, health, advertise, false)
}

/// [`with_health_and_reflection`] for the gateway's public port: reflection lists the
/// `advertise`d services and describes only their public methods.
pub fn with_health_and_public_reflection(
    routes: Routes,
    health: &HealthReporter,
    advertise: &[String],
) -> Routes {
    health_and_reflection(routes, health, Some(advertise), true)
}

fn health_and_reflection(
    routes: Routes,
    health: &HealthReporter,
    advertise: Option<&[String]>,
    public_only: bool,
) -> Routes {
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
    );
    let mut routes = routes.add_service(health);
    let contracts: std::borrow::Cow<'static, [u8]> = match advertise {
        Some(names) if public_only => match public_descriptor_set(names) {
            Ok(set) => set.into(),
            Err(err) => {
                // Compiled in: a failure here is a build defect. Describe nothing then.
                tracing::error!(error = %err, "cannot filter the contracts for public reflection");
                Vec::new().into()
            }
        },
        _ => tessera::FILE_DESCRIPTOR_SET.into(),
    };
    let configure = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(&contracts)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        if let Some(names) = advertise {
            for name in names {
                builder = builder.with_service_name(name.clone());
            }
            builder = builder.with_service_name("grpc.health.v1.Health");
        }
        builder
    };
    // The descriptor sets are compiled in; failing to build from them is a build defect.
    match configure().build_v1() {
        Ok(v1) => routes = routes.add_service(v1),
        Err(err) => tracing::error!(error = %err, "reflection v1 unavailable"),
    }
    match configure().build_v1alpha() {
        Ok(v1alpha) => routes = routes.add_service(v1alpha),
        Err(err) => tracing::error!(error = %err, "reflection v1alpha unavailable"),
    }
    routes
}

fn http2_builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
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
            let conn = builder.serve_connection(TokioIo::new(stream), hyper_service);
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

/// The admin port: gRPC health over h2c and `GET /metrics` over HTTP/1.1, nothing else.
#[derive(Clone)]
struct AdminService {
    health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    metrics: Metrics,
}

async fn serve_admin(
    listener: TcpListener,
    admin: AdminService,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let builder = Arc::new(http2_builder());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let admin = admin.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

impl AdminService {
    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path();
        if path == "/metrics" && req.method() == http::Method::GET {
            let mut resp = Response::new(Body::new(http_body_util::Full::new(bytes::Bytes::from(
                self.metrics.render(),
            ))));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            return resp;
        }
        if path.starts_with("/grpc.health.v1.Health/") {
            let mut health = self.health.clone();
            return match health.call(req.map(Body::new)).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
        }
        if req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
        {
            return Status::unimplemented("the admin port serves only grpc.health.v1.Health")
                .into_http();
        }
        let mut resp = Response::new(Body::default());
        *resp.status_mut() = http::StatusCode::NOT_FOUND;
        resp
    }
}

/// Binds `addr`, naming it in the error (so "port in use" says which).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use prost::Message as _;
    use prost_types::FileDescriptorSet;

    use super::*;

    /// `service/method` -> its leading comment, read through the source locations.
    fn method_comments(set: &FileDescriptorSet) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for file in &set.file {
            let Some(info) = &file.source_code_info else {
                continue;
            };
            for loc in &info.location {
                if let [6, s, 2, m] = loc.path[..] {
                    let service = &file.service[s as usize];
                    let method = &service.method[m as usize];
                    out.insert(
                        format!("{}/{}", service.name(), method.name()),
                        loc.leading_comments().to_owned(),
                    );
                }
            }
        }
        out
    }

    #[test]
    fn public_descriptors_keep_public_methods_with_their_own_comments() {
        let all = FileDescriptorSet::decode(tessera::FILE_DESCRIPTOR_SET).unwrap();
        let advertised = ["tessera.users.v1.UserService".to_owned()];
        let public =
            FileDescriptorSet::decode(&public_descriptor_set(&advertised).unwrap()[..]).unwrap();
        let services: Vec<&str> = public
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name()))
            .collect();
        assert_eq!(services, ["UserService"]);
        let before = method_comments(&all);
        let after = method_comments(&public);
        assert!(after.contains_key("UserService/Login"), "{after:?}");
        assert!(!after.contains_key("UserService/WatchEvents"), "{after:?}");
        for (method, comment) in &after {
            assert!(!comment.is_empty(), "{method} lost its comment");
            assert_eq!(Some(comment), before.get(method), "{method}");
        }
        let policy = Policy::contracts();
        let public_users = policy
            .methods()
            .filter(|r| r.service == "tessera.users.v1.UserService" && r.public)
            .count();
        assert_eq!(after.len(), public_users);
    }
}
