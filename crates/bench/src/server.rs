//! The servers of scenario A: one echo RPC (`PostService.GetPost` answering with the post id
//! it was asked for) behind three stacks, each run as `tessera-bench server --mode ...` in a
//! process of its own so its CPU time can be read from `/proc`.
//!
//! A server prints `listening <addr>` once it accepts connections and exits when its
//! standard input closes (so it never outlives the benchmark), printing `spans <n>` first if
//! it was exporting traces.

use std::{
    io::{BufRead, Write},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tessera::posts::v1::{
    CreatePostRequest, CreatePostResponse, DeletePostRequest, DeletePostResponse, GetPostRequest,
    GetPostResponse, ListPostsRequest, ListPostsResponse, Post, UpdatePostRequest,
    UpdatePostResponse, WatchEventsRequest, WatchEventsResponse,
    post_service_server::{PostService, PostServiceServer},
};
use tessera_mesh::{
    policy::Policy,
    server::{Listeners, ServerOptions, Workload, bind},
    shutdown::Shutdown,
    telemetry::{LogFormat, get_subscriber},
    tls::{TlsFiles, TlsSource},
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, service::Routes};

use crate::BenchError;

/// The gRPC name the echo is served under.
pub const ECHO_SERVICE: &str = "tessera.posts.v1.PostService";

/// Which server stack to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// tonic's own server, plaintext HTTP/2.
    Plain,
    /// tokio-rustls acceptor (mTLS, TLS 1.3) + hyper + the tonic service, nothing else.
    Mtls,
    /// `tessera_mesh::server::Workload::run`: mTLS, identity, access rule, metrics, tracing
    /// into an OpenTelemetry SDK pipeline, deadline, load shedding, message limits.
    Mesh,
    /// `Mesh` with a log subscriber but no OpenTelemetry layer (to split the cost).
    MeshNoOtel,
    /// `Mesh` with a subscriber that wants nothing (spans are never built).
    MeshNoSubscriber,
}

/// GetPost answers with the id it was asked for; everything else is UNIMPLEMENTED.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

type EventStream = Pin<Box<dyn Stream<Item = Result<WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PostService for Echo {
    async fn get_post(
        &self,
        request: Request<GetPostRequest>,
    ) -> Result<Response<GetPostResponse>, Status> {
        let post_id = request.into_inner().post_id;
        Ok(Response::new(GetPostResponse {
            post: Some(Post {
                post_id,
                ..Post::default()
            }),
        }))
    }

    async fn create_post(
        &self,
        _: Request<CreatePostRequest>,
    ) -> Result<Response<CreatePostResponse>, Status> {
        Err(Status::unimplemented("echo serves GetPost only"))
    }

    async fn list_posts(
        &self,
        _: Request<ListPostsRequest>,
    ) -> Result<Response<ListPostsResponse>, Status> {
        Err(Status::unimplemented("echo serves GetPost only"))
    }

    async fn update_post(
        &self,
        _: Request<UpdatePostRequest>,
    ) -> Result<Response<UpdatePostResponse>, Status> {
        Err(Status::unimplemented("echo serves GetPost only"))
    }

    async fn delete_post(
        &self,
        _: Request<DeletePostRequest>,
    ) -> Result<Response<DeletePostResponse>, Status> {
        Err(Status::unimplemented("echo serves GetPost only"))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(Status::unimplemented("echo serves GetPost only"))
    }
}

/// A span exporter that counts and drops: the whole SDK pipeline (span building, batching,
/// the export thread) runs, without a collector to send to.
#[derive(Debug, Clone, Default)]
pub struct CountingExporter(Arc<AtomicU64>);

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

pub(crate) fn announce(addr: SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening {addr}");
    let _ = out.flush();
}

/// Resolves when standard input reaches end of file (the benchmark closed it or died).
pub(crate) async fn stdin_closed() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut lines = std::io::stdin().lock().lines();
        while let Some(Ok(_)) = lines.next() {}
        let _ = tx.send(());
    });
    let _ = rx.await;
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Installs a subscriber that is interested in nothing. Without any subscriber, `tracing`
/// forwards spans to the `log` crate, because sqlx (linked into this binary, not into a bare
/// tonic app) enables its `log` feature; that costs a bare server several percent of its CPU
/// (`Span::record_all`, `Span::log` in a profile) and would flatter the comparison.
pub(crate) fn no_tracing() {
    let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
}

/// `tessera-bench server --mode MODE --tls-dir DIR`: serves until stdin closes.
pub async fn run(mode: Mode, tls_dir: &Path) -> Result<(), BenchError> {
    if matches!(mode, Mode::Plain | Mode::Mtls | Mode::MeshNoSubscriber) {
        no_tracing();
    }
    match mode {
        Mode::Plain => {
            let incoming = tonic::transport::server::TcpIncoming::bind(local(0))
                .map_err(|e| BenchError::Setup(format!("binding: {e}")))?
                .with_nodelay(Some(true));
            let addr = incoming
                .local_addr()
                .map_err(|e| BenchError::Setup(e.to_string()))?;
            announce(addr);
            tonic::transport::Server::builder()
                .add_service(PostServiceServer::new(Echo))
                .serve_with_incoming_shutdown(incoming, stdin_closed())
                .await
                .map_err(|e| BenchError::Setup(format!("serving: {e}")))
        }
        Mode::Mtls => serve_bare_mtls(tls_dir).await,
        Mode::Mesh => serve_mesh(tls_dir, Telemetry::Otel).await,
        Mode::MeshNoOtel => serve_mesh(tls_dir, Telemetry::LogsOnly).await,
        Mode::MeshNoSubscriber => serve_mesh(tls_dir, Telemetry::Off).await,
    }
}

fn server_tls_config(tls_dir: &Path) -> Result<Arc<ServerConfig>, BenchError> {
    let files = TlsFiles::in_dir(tls_dir);
    let setup = |what: &Path, e: &dyn std::fmt::Display| {
        BenchError::Setup(format!("{}: {e}", what.display()))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| setup(&files.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| setup(&files.cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| setup(&files.key, &e))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&files.ca).map_err(|e| setup(&files.ca, &e))? {
        roots
            .add(ca.map_err(|e| setup(&files.ca, &e))?)
            .map_err(|e| setup(&files.ca, &e))?;
    }
    let provider = tessera_mesh::tls::provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| BenchError::Setup(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Mode 2: what a team writes by hand to get mTLS in front of tonic, and nothing more.
async fn serve_bare_mtls(tls_dir: &Path) -> Result<(), BenchError> {
    let config = server_tls_config(tls_dir)?;
    let listener = TcpListener::bind(local(0))
        .await
        .map_err(|e| BenchError::Setup(format!("binding: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let service = Routes::new(PostServiceServer::new(Echo)).prepare();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    announce(addr);
    let accept = async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let service = service.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let hyper_service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let mut service = service.clone();
                        async move {
                            tower::Service::call(&mut service, req.map(tonic::body::Body::new))
                                .await
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(TokioIo::new(tls), hyper_service)
                    .await;
            });
        }
    };
    tokio::select! {
        () = accept => Ok(()),
        () = stdin_closed() => Ok(()),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Telemetry {
    Otel,
    LogsOnly,
    Off,
}

/// Mode 3: the whole Tessera server stack, as a service runs it, with tracing exported
/// through an OpenTelemetry SDK batch pipeline (or less telemetry, for diagnosis).
async fn serve_mesh(tls_dir: &Path, telemetry: Telemetry) -> Result<(), BenchError> {
    let exported = CountingExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exported.clone())
        .build();
    let tracer = (telemetry == Telemetry::Otel).then(|| provider.tracer("tessera-bench"));
    if telemetry != Telemetry::Off {
        let subscriber = get_subscriber("info", LogFormat::Json, std::io::stderr, tracer.clone());
        tracing::subscriber::set_global_default(subscriber)
            .map_err(|e| BenchError::Setup(format!("installing the subscriber: {e}")))?;
    }
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );

    let tls = TlsSource::watch(TlsFiles::in_dir(tls_dir), Duration::from_secs(10))
        .map_err(|e| BenchError::Setup(format!("{}: {e}", tls_dir.display())))?;
    let workload = Workload::new(
        "posts",
        tls,
        Arc::new(Policy::contracts()),
        None,
        ServerOptions {
            drain_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(1),
            tracer,
            ..ServerOptions::default()
        },
    );
    let listeners = Listeners {
        grpc: bind(local(0))
            .await
            .map_err(|e| BenchError::Setup(e.to_string()))?,
        admin: bind(local(0))
            .await
            .map_err(|e| BenchError::Setup(e.to_string()))?,
        public: None,
    };
    let addr = listeners
        .grpc
        .local_addr()
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let (trigger, shutdown) = Shutdown::new();
    let served = workload.run(
        Routes::new(PostServiceServer::new(Echo)),
        &[ECHO_SERVICE],
        listeners,
        None,
        shutdown,
    );
    announce(addr);
    let stop = async {
        stdin_closed().await;
        trigger.trigger();
    };
    let (result, ()) = tokio::join!(served, stop);
    let _ = provider.force_flush();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "spans {}", exported.0.load(Ordering::Relaxed));
    let _ = out.flush();
    let _ = provider.shutdown();
    result.map_err(|e| BenchError::Setup(format!("serving: {e}")))
}
