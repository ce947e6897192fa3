//! The harness: a posts workload on real sockets (127.0.0.1:0) with real certificates from a
//! fresh CA in a temporary directory, clients that present a chosen SPIFFE identity, and the
//! shutdown trigger.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ClientConfig,
    pki_types::{CertificateDer, pem::PemObject},
};
use tessera::posts::v1::{
    CreatePostRequest, CreatePostResponse, DeletePostRequest, DeletePostResponse, GetPostRequest,
    GetPostResponse, ListPostsRequest, ListPostsResponse, Post, UpdatePostRequest,
    UpdatePostResponse, WatchEventsRequest, WatchEventsResponse,
    post_service_client::PostServiceClient,
    post_service_server::{PostService, PostServiceServer},
};
use tessera_mesh::{
    auth::{TokenKeys, maybe_end_user},
    certs::{Ca, Issued},
    policy::Policy,
    server::{Listeners, ServerOptions, Workload},
    shutdown::{Shutdown, ShutdownTrigger},
    tls::{TlsFiles, TlsSource},
};
use tokio::{net::TcpStream, task::JoinHandle};
use tonic::{Request, Response, Status, body::Body, service::Routes, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

pub(crate) const POSTS: &str = "tessera.posts.v1.PostService";
pub(crate) const GET_POST: &str = "/tessera.posts.v1.PostService/GetPost";
/// How long the `slow` post takes.
pub(crate) const SLOW: Duration = Duration::from_secs(1);
/// How long the server's certificate watcher waits between looks at the files.
pub(crate) const RELOAD_INTERVAL: Duration = Duration::from_millis(50);

use tessera_testing::tls;
pub(crate) use tessera_testing::{eventually, tls::spiffe};

/// Counts handlers running right now; the guard leaves on drop, also when a call is cut off.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The service under test: GetPost echoes the id (`slow` takes [`SLOW`], `panic` panics);
/// CreatePost puts the verified end user's id in the title; the rest is unimplemented.
pub(crate) struct TestPosts {
    in_flight: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl PostService for TestPosts {
    async fn create_post(
        &self,
        request: Request<CreatePostRequest>,
    ) -> Result<Response<CreatePostResponse>, Status> {
        // Trusts the platform to have required the token, so a call that slips through
        // without one shows up as an "anonymous" post instead of being caught here.
        let sub = maybe_end_user(&request).map_or("anonymous", |u| u.claims.sub.as_str());
        Ok(Response::new(CreatePostResponse {
            post: Some(Post {
                author_id: sub.to_owned(),
                title: format!("by {sub}"),
                ..Post::default()
            }),
        }))
    }

    async fn get_post(
        &self,
        request: Request<GetPostRequest>,
    ) -> Result<Response<GetPostResponse>, Status> {
        let _in_flight = InFlight::enter(&self.in_flight);
        let post_id = request.into_inner().post_id;
        match post_id.as_str() {
            "slow" => tokio::time::sleep(SLOW).await,
            "panic" => panic!("the test handler panics on purpose"),
            // A span the handler opens itself, as service code does with `tracing`.
            "traced" => {
                tracing::info_span!("handler.work").in_scope(|| tracing::info!("working"));
            }
            _ => {}
        }
        Ok(Response::new(GetPostResponse {
            post: Some(Post {
                post_id,
                ..Post::default()
            }),
        }))
    }

    async fn list_posts(
        &self,
        _: Request<ListPostsRequest>,
    ) -> Result<Response<ListPostsResponse>, Status> {
        Err(Status::unimplemented("ListPosts"))
    }

    async fn update_post(
        &self,
        _: Request<UpdatePostRequest>,
    ) -> Result<Response<UpdatePostResponse>, Status> {
        Err(Status::unimplemented("UpdatePost"))
    }

    async fn delete_post(
        &self,
        _: Request<DeletePostRequest>,
    ) -> Result<Response<DeletePostResponse>, Status> {
        Err(Status::unimplemented("DeletePost"))
    }

    type WatchEventsStream = tokio_stream::Empty<Result<WatchEventsResponse, Status>>;

    async fn watch_events(
        &self,
        _: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(Status::unimplemented("WatchEvents"))
    }
}

/// Options for tests: a short drain so shutdown tests finish quickly.
pub(crate) fn test_options() -> ServerOptions {
    ServerOptions {
        deadline_cap: Duration::from_secs(10),
        drain_delay: Duration::from_millis(300),
        drain_timeout: Duration::from_secs(5),
        ..ServerOptions::default()
    }
}

/// A running posts workload.
pub(crate) struct App {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub ca: Ca,
    /// The server's certificate directory (`tls.crt`, `tls.key`, `ca.crt`).
    pub server_dir: PathBuf,
    /// The server's certificate as issued, to compare with what clients see.
    pub server_cert: Issued,
    pub dir: tempfile::TempDir,
    pub done: JoinHandle<std::io::Result<()>>,
    in_flight: Arc<AtomicUsize>,
    trigger: ShutdownTrigger,
}

pub(crate) async fn spawn_app() -> App {
    spawn_app_with(test_options(), None).await
}

pub(crate) async fn spawn_app_with(options: ServerOptions, keys: Option<TokenKeys>) -> App {
    spawn_app_gated(options, keys, None).await
}

/// [`spawn_app_with`] whose readiness waits for `gate` ([`Workload::ready_when`]).
pub(crate) async fn spawn_app_gated(
    options: ServerOptions,
    keys: Option<TokenKeys>,
    gate: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
) -> App {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("tessera test CA").unwrap();
    let server_dir = dir.path().join("posts");
    let server_cert = issue_server_cert(&ca);
    let files = server_cert.save(&server_dir).unwrap();
    let tls = TlsSource::watch(files, RELOAD_INTERVAL).unwrap();
    let mut workload = Workload::new("posts", tls, Arc::new(Policy::contracts()), keys, options);
    if let Some(gate) = gate {
        workload = workload.ready_when(gate);
    }
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, admin_addr) = (grpc.local_addr().unwrap(), admin.local_addr().unwrap());
    let in_flight = Arc::new(AtomicUsize::new(0));
    let routes = Routes::new(PostServiceServer::new(TestPosts {
        in_flight: in_flight.clone(),
    }));
    let (trigger, shutdown) = Shutdown::new();
    let listeners = Listeners {
        grpc,
        admin,
        public: None,
    };
    let done = tokio::spawn(workload.run(routes, &[POSTS], listeners, None, shutdown));
    App {
        grpc: grpc_addr,
        admin: admin_addr,
        ca,
        server_dir,
        server_cert,
        dir,
        done,
        in_flight,
        trigger,
    }
}

/// A server certificate as `tessera up` issues it: SPIFFE id plus `localhost` and 127.0.0.1
/// (not yet written: tests compare its serial with what clients see).
pub(crate) fn issue_server_cert(ca: &Ca) -> Issued {
    ca.issue(
        &spiffe("posts"),
        &["localhost"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )
    .unwrap()
}

impl App {
    /// Fires the shutdown trigger.
    pub(crate) fn shutdown(&self) {
        self.trigger.trigger();
    }

    /// Waits (at most 5 s) for the workload's `run` to return, and returns its result.
    pub(crate) async fn stopped(&mut self) -> std::io::Result<()> {
        tokio::time::timeout(Duration::from_secs(5), &mut self.done)
            .await
            .expect("the workload did not stop")
            .unwrap()
    }

    /// Handlers of GetPost running right now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Issues a certificate for `service` from the app's CA and writes it to its own directory.
    pub(crate) fn client_files(&self, service: &str) -> TlsFiles {
        tls::issue(&self.ca, service, self.dir.path())
    }

    /// The client TLS configuration of workload `service`.
    pub(crate) fn client_config(&self, service: &str) -> Arc<ClientConfig> {
        TlsSource::load(self.client_files(service))
            .unwrap()
            .client_config()
    }

    /// An mTLS channel to the internal port as `service`.
    pub(crate) async fn channel(&self, service: &str) -> Channel {
        connect(
            self.grpc,
            self.client_config(service),
            &Handshakes::default(),
        )
        .await
        .unwrap()
    }

    /// A PostService client calling as `service`.
    pub(crate) async fn client(&self, service: &str) -> PostServiceClient<Channel> {
        PostServiceClient::new(self.channel(service).await)
    }

    /// A health client on the admin port (plaintext h2c).
    pub(crate) async fn admin_health(&self) -> HealthClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.admin))
            .unwrap()
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
    }
}

/// The serials of the server certificates seen by a connector's handshakes, in order.
#[derive(Clone, Default)]
pub(crate) struct Handshakes(Arc<Mutex<Vec<Vec<u8>>>>);

impl Handshakes {
    pub(crate) fn serials(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().clone()
    }
}

/// The serial number of a DER certificate.
pub(crate) fn serial_of_der(der: &[u8]) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.tbs_certificate.raw_serial().to_vec()
}

/// The serial number of an issued certificate.
pub(crate) fn serial_of(issued: &Issued) -> Vec<u8> {
    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    serial_of_der(&der)
}

/// TCP + TLS to `addr` with `config`, recording the server certificate's serial.
pub(crate) async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    handshakes: &Handshakes,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tls = tls::tls_connect(addr, config).await?;
    if let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        handshakes.0.lock().unwrap().push(serial_of_der(leaf));
    }
    Ok(tls)
}

/// A tonic channel whose connections are TLS with `config`; each (re)connect is recorded in
/// `handshakes`.
pub(crate) async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    handshakes: &Handshakes,
) -> anyhow::Result<Channel> {
    let handshakes = handshakes.clone();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
    tls::channel_over(endpoint, move || {
        let (config, handshakes) = (config.clone(), handshakes.clone());
        async move { tls_connect(addr, config, &handshakes).await }
    })
    .await
}

/// A client configuration that trusts `ca` but presents no certificate.
pub(crate) fn anonymous_client_config(ca: &Ca) -> Arc<ClientConfig> {
    tls::server_only_tls_pem(ca.cert_pem().as_bytes()).unwrap()
}

/// One HTTP/2 connection driven by hyper directly: unlike tonic's channel it enforces no
/// client-side timeout, so a test sees the server's own answer to `grpc-timeout`.
#[derive(Clone)]
pub(crate) struct RawH2(hyper::client::conn::http2::SendRequest<Body>);

impl RawH2 {
    pub(crate) async fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> Self {
        let tls = tls_connect(addr, config, &Handshakes::default())
            .await
            .unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        Self(send)
    }

    pub(crate) fn posts(self) -> PostServiceClient<Self> {
        PostServiceClient::with_origin(self, http::Uri::from_static("http://localhost"))
    }
}

type RawFuture = Pin<
    Box<dyn Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send>,
>;

impl tower::Service<http::Request<Body>> for RawH2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = RawFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> RawFuture {
        Box::pin(self.0.send_request(req))
    }
}

/// The status of `service` in a health check, or the gRPC error.
pub(crate) async fn health_status(
    client: &mut HealthClient<Channel>,
    service: &str,
) -> Result<i32, Status> {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

/// `GET /metrics` on the admin port over plain HTTP/1.1; the whole response.
pub(crate) async fn scrape(admin: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}
