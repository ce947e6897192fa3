//! Test replicas and helpers.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper_util::rt::{TokioExecutor, TokioIo};
use tessera::users::v1::{
    BatchGetUsersRequest, BatchGetUsersResponse, CreateUserRequest, CreateUserResponse,
    DeleteUserRequest, DeleteUserResponse, GetJwksRequest, GetJwksResponse, GetUserRequest,
    GetUserResponse, LoginRequest, LoginResponse, SetUserRoleRequest, SetUserRoleResponse, User,
    WatchEventsRequest, WatchEventsResponse,
    user_service_client::UserServiceClient,
    user_service_server::{UserService, UserServiceServer},
};
use tessera_client::{Channel, Resolve, ResolveFuture};
use tessera_mesh::context::{CallContext, scope};
use tokio::{net::TcpListener, task::JoinSet};
use tonic::{Request, Response, Status, body::Body, metadata::MetadataMap};
use tower::ServiceExt;

/// What a replica does and what it saw.
#[derive(Default)]
pub(crate) struct Behaviour {
    /// GetUser calls that reached the handler.
    pub gets: AtomicUsize,
    /// CreateUser calls that reached the handler.
    pub creates: AtomicUsize,
    /// Handler latency, in microseconds.
    pub delay_us: AtomicU64,
    /// Answer UNAVAILABLE to everything.
    pub unavailable: AtomicBool,
    /// The metadata of the last call.
    pub last_metadata: Mutex<Option<MetadataMap>>,
    /// The SPIFFE id of the client certificate of the last mTLS connection.
    pub peer_identity: Mutex<Option<String>>,
    /// When set, GetUser forwards to this channel the way a handler behind the mesh stack
    /// would: inside the call context built from the incoming deadline and token.
    pub forward_to: OnceLock<Channel>,
}

impl Behaviour {
    pub(crate) fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    pub(crate) fn creates(&self) -> usize {
        self.creates.load(Ordering::SeqCst)
    }

    pub(crate) fn set_delay(&self, delay: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    pub(crate) fn set_unavailable(&self, on: bool) {
        self.unavailable.store(on, Ordering::SeqCst);
    }

    pub(crate) fn last_header(&self, name: &str) -> Option<String> {
        let metadata = self.last_metadata.lock().unwrap();
        metadata
            .as_ref()?
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }

    async fn behave(&self, metadata: &MetadataMap) -> Result<(), Status> {
        *self.last_metadata.lock().unwrap() = Some(metadata.clone());
        let delay = self.delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(Status::unavailable("test replica is unavailable"));
        }
        Ok(())
    }
}

struct Handler(Arc<Behaviour>);

#[tonic::async_trait]
impl UserService for Handler {
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        self.0.creates.fetch_add(1, Ordering::SeqCst);
        self.0.behave(request.metadata()).await?;
        Ok(Response::new(CreateUserResponse { user: None }))
    }

    async fn login(&self, _: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        Err(Status::unimplemented("login"))
    }

    async fn refresh_token(
        &self,
        _: Request<tessera::users::v1::RefreshTokenRequest>,
    ) -> Result<Response<tessera::users::v1::RefreshTokenResponse>, Status> {
        Err(Status::unimplemented("refresh_token"))
    }

    async fn logout(
        &self,
        _: Request<tessera::users::v1::LogoutRequest>,
    ) -> Result<Response<tessera::users::v1::LogoutResponse>, Status> {
        Err(Status::unimplemented("logout"))
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        // What the server stack does around a handler, reduced to the two inputs.
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| {
                let v = http::HeaderValue::from_bytes(v.as_encoded_bytes()).ok()?;
                tessera_mesh::headers::parse_grpc_timeout(&v)
            })
            .map(|t| Instant::now() + t);
        self.0.gets.fetch_add(1, Ordering::SeqCst);
        self.0.behave(request.metadata()).await?;
        if let Some(channel) = self.0.forward_to.get() {
            let token = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()?.strip_prefix("Bearer ").map(Arc::from));
            let forwarded = GetUserRequest {
                user_id: request.get_ref().user_id.clone(),
            };
            let mut client = UserServiceClient::new(channel.clone());
            return scope(
                CallContext {
                    deadline,
                    token,
                    ..CallContext::default()
                },
                client.get_user(forwarded),
            )
            .await;
        }
        Ok(Response::new(GetUserResponse {
            user: Some(User {
                user_id: request.into_inner().user_id,
                ..User::default()
            }),
        }))
    }

    async fn batch_get_users(
        &self,
        _: Request<BatchGetUsersRequest>,
    ) -> Result<Response<BatchGetUsersResponse>, Status> {
        Err(Status::unimplemented("batch_get_users"))
    }

    async fn get_jwks(
        &self,
        _: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
        Err(Status::unimplemented("get_jwks"))
    }

    async fn set_user_role(
        &self,
        _: Request<SetUserRoleRequest>,
    ) -> Result<Response<SetUserRoleResponse>, Status> {
        Err(Status::unimplemented("set_user_role"))
    }

    async fn delete_user(
        &self,
        _: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        Err(Status::unimplemented("delete_user"))
    }

    type WatchEventsStream = futures::stream::Empty<Result<WatchEventsResponse, Status>>;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        *self.0.last_metadata.lock().unwrap() = Some(request.metadata().clone());
        Ok(Response::new(futures::stream::empty()))
    }
}

/// A UserService replica on 127.0.0.1:0. Dropping or killing it aborts the accept loop and
/// every connection at once, like a crashed process.
pub(crate) struct Replica {
    pub addr: SocketAddr,
    pub behaviour: Arc<Behaviour>,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    pub(crate) async fn start() -> Self {
        Self::serve(None).await
    }

    /// A replica on `addr`: one that was killed, coming back.
    pub(crate) async fn start_at(addr: SocketAddr) -> Self {
        Self::serve_at(None, addr).await
    }

    /// Requires a client certificate chaining to the trust bundle of `tls`.
    pub(crate) async fn start_mtls(tls: Arc<rustls::ServerConfig>) -> Self {
        Self::serve(Some(tls)).await
    }

    async fn serve(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        Self::serve_at(tls, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    async fn serve_at(tls: Option<Arc<rustls::ServerConfig>>, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let behaviour = Arc::new(Behaviour::default());
        let routes =
            tonic::service::Routes::new(UserServiceServer::new(Handler(behaviour.clone())));
        let seen = behaviour.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                tcp.set_nodelay(true).unwrap();
                let routes = routes.clone();
                let tls = tls.clone();
                let seen = seen.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            routes.clone().oneshot(request.map(Body::new))
                        },
                    );
                    let http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    let _: Result<(), Infallible> = match tls {
                        None => {
                            let _ = http2.serve_connection(TokioIo::new(tcp), service).await;
                            Ok(())
                        }
                        Some(config) => {
                            let Ok(stream) =
                                tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                            else {
                                return;
                            };
                            let peer = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first().cloned());
                            if let Some(cert) = peer {
                                let id = tessera_mesh::identity::spiffe_id_from_der(&cert).ok();
                                *seen.peer_identity.lock().unwrap() = id.map(|id| id.to_string());
                            }
                            let _ = http2.serve_connection(TokioIo::new(stream), service).await;
                            Ok(())
                        }
                    };
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            behaviour,
            task,
        }
    }

    /// Aborts the server and its connections.
    pub(crate) fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `static:` target of the replicas.
pub(crate) fn target(replicas: &[&Replica]) -> String {
    let list: Vec<String> = replicas.iter().map(|r| r.addr.to_string()).collect();
    format!("static:{}", list.join(","))
}

/// A resolver the test changes at will.
#[derive(Clone, Default)]
pub(crate) struct TestResolver {
    answer: Arc<Mutex<Vec<SocketAddr>>>,
    pub asked: Arc<AtomicUsize>,
}

impl TestResolver {
    pub(crate) fn set(&self, addrs: &[SocketAddr]) {
        *self.answer.lock().unwrap() = addrs.to_vec();
    }
}

impl Resolve for TestResolver {
    fn resolve(&self) -> ResolveFuture<'_> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let answer = self.answer.lock().unwrap().clone();
        Box::pin(std::future::ready(Ok(answer)))
    }
}

/// Runs `total` GetUser calls from `workers` concurrent tasks; returns how many failed.
pub(crate) async fn get_users(channel: &Channel, total: usize, workers: usize) -> Vec<Status> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let next = next.clone();
        let mut client = UserServiceClient::new(channel.clone());
        tasks.spawn(async move {
            let mut failures = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < total {
                let request = GetUserRequest {
                    user_id: "u-1".into(),
                };
                if let Err(status) = client.get_user(request).await {
                    failures.push(status);
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        failures.extend(result.unwrap());
    }
    failures
}

/// Tests here measure latency and count calls, so they run one at a time: a test making
/// thousands of calls would otherwise be the noise another test measures.
pub(crate) async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}
