//! The end-to-end test crate: tests of Tessera as deployed, across services and processes, and
//! of its deployment artefacts (`tests/k8s.rs`: the shape of the Kubernetes manifests). The
//! tests live under `tests/`; this library holds only what they share, and nothing here is
//! for use outside the tests.
//!
//! The shared part is a [`spawn_mesh`] in the zero-to-production `spawn_app()` style: the
//! whole mesh started in-process (`tessera up` without the command line) on free loopback
//! ports over a fresh temporary data dir, with typed clients for the gateway's public port
//! (server-only TLS, verified against the dev CA as `localhost`), clients with a workload's
//! certificate for the internal ports, [`TestMesh::restart`] on the same data dir, and
//! [`eventually()`] / [`eventually!`] to wait for a condition under a bound instead of sleeping.
//!
//! Set `TESSERA_TEST_LOG` (an EnvFilter, e.g. `info,tessera_gateway=debug`) to see the mesh's
//! logs in a failing test's output.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

#[doc(hidden)]
pub use anyhow;
use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tessera::{
    comments::v1::comment_service_client::CommentServiceClient,
    gateway::v1::feed_service_client::FeedServiceClient,
    notifications::v1::notification_service_client::NotificationServiceClient,
    posts::v1::post_service_client::PostServiceClient,
    users::v1::{
        CreateUserRequest, LoginRequest, LoginResponse, user_service_client::UserServiceClient,
    },
};
use tessera_cli::up::{Mesh, start_mesh};
use tessera_mesh::tls::{TlsFiles, TlsSource};
use tonic::{
    Request, Status,
    transport::{Channel, Endpoint, Uri},
};

/// How long a test waits for something eventually consistent (an event crossing services).
/// Generous: debug builds on a busy 2-core machine.
pub const BOUND: Duration = Duration::from_secs(20);

/// How long one connection attempt or one call may take before the test gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The password every [`TestMesh::sign_up`] user gets.
pub const PASSWORD: &str = "correct horse battery staple";

/// A running mesh over a temporary data dir, with clients for its public port.
pub struct TestMesh {
    /// `None` only between the two halves of [`TestMesh::restart`].
    mesh: Option<Mesh>,
    public: Channel,
    /// Dropped last: the services' databases live here.
    dir: tempfile::TempDir,
}

/// A user created and logged in through the public port.
#[derive(Clone, Debug)]
pub struct TestUser {
    pub user_id: String,
    pub username: String,
    pub display_name: String,
    pub password: String,
    /// The access token from Login.
    pub token: String,
}

/// Starts the whole mesh on free ports over a fresh temporary data dir and connects to the
/// gateway's public port. Panics (failing the test) when anything does not come up.
pub async fn spawn_mesh() -> TestMesh {
    init_logs();
    let dir = tempfile::Builder::new()
        .prefix("tessera-e2e-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary data dir: {e}"));
    let (mesh, public) = start(dir.path()).await;
    TestMesh {
        mesh: Some(mesh),
        public,
        dir,
    }
}

async fn start(data_dir: &Path) -> (Mesh, Channel) {
    let mesh = start_mesh(data_dir, 0, None, |_, _| {})
        .await
        .unwrap_or_else(|e| panic!("the mesh did not start: {e:#}"));
    let public = connect_public(&mesh)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the gateway's public port: {e:#}"));
    (mesh, public)
}

async fn connect_public(mesh: &Mesh) -> anyhow::Result<Channel> {
    let addr = mesh
        .addrs
        .get("gateway")
        .and_then(|(_, _, public)| *public)
        .context("the gateway has no public port")?;
    let config = server_only_tls(&mesh.certs_dir.join("ca.crt"))?;
    connect_tls(addr, config).await
}

/// A TLS client configuration trusting only the CA in `ca_pem` and presenting no
/// certificate: what an end user's client has.
pub fn server_only_tls(ca_pem: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem)
        .with_context(|| format!("reading {}", ca_pem.display()))?
    {
        roots.add(cert?)?;
    }
    let mut config = ClientConfig::builder_with_provider(tessera_mesh::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Opens a TLS connection to `addr` as server name `localhost` with `config`: the transport
/// only, for tests about the handshake itself.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let server_name = ServerName::try_from("localhost")
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
}

/// A gRPC channel to `addr` over TLS with `config` (which must offer ALPN h2).
pub async fn connect_tls(addr: SocketAddr, config: Arc<ClientConfig>) -> anyhow::Result<Channel> {
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        async move { tls_connect(addr, config).await.map(TokioIo::new) }
    });
    // The scheme only fills `:scheme`; TLS is the connector's business.
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(channel)
}

/// `message` with `authorization: Bearer <token>`.
pub fn bearer<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    let value = format!("Bearer {token}")
        .parse()
        .unwrap_or_else(|e| panic!("{token:?} cannot be a header value: {e}"));
    request.metadata_mut().insert("authorization", value);
    request
}

impl TestMesh {
    fn mesh(&self) -> &Mesh {
        match &self.mesh {
            Some(mesh) => mesh,
            None => panic!("the mesh is not running"),
        }
    }

    /// The data dir (canonical, absolute).
    pub fn data_dir(&self) -> &Path {
        &self.mesh().data_dir
    }

    pub fn certs_dir(&self) -> &Path {
        &self.mesh().certs_dir
    }

    pub fn endpoints_path(&self) -> &Path {
        &self.mesh().endpoints_path
    }

    /// The names of the services, in start order.
    pub fn services(&self) -> Vec<String> {
        self.mesh().addrs.keys().cloned().collect()
    }

    /// `service`'s internal mTLS port.
    pub fn grpc_addr(&self, service: &str) -> SocketAddr {
        self.addrs(service).0
    }

    /// `service`'s plaintext admin port.
    pub fn admin_addr(&self, service: &str) -> SocketAddr {
        self.addrs(service).1
    }

    /// The gateway's public (server-only TLS) port.
    pub fn public_addr(&self) -> SocketAddr {
        match self.addrs("gateway").2 {
            Some(addr) => addr,
            None => panic!("the gateway has no public port"),
        }
    }

    fn addrs(&self, service: &str) -> (SocketAddr, SocketAddr, Option<SocketAddr>) {
        match self.mesh().addrs.get(service) {
            Some(addrs) => *addrs,
            None => panic!("no service {service:?} in the mesh"),
        }
    }

    /// The channel to the public port; every typed client below runs over it.
    pub fn public_channel(&self) -> Channel {
        self.public.clone()
    }

    pub fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.public.clone())
    }

    pub fn posts(&self) -> PostServiceClient<Channel> {
        PostServiceClient::new(self.public.clone())
    }

    pub fn comments(&self) -> CommentServiceClient<Channel> {
        CommentServiceClient::new(self.public.clone())
    }

    pub fn notifications(&self) -> NotificationServiceClient<Channel> {
        NotificationServiceClient::new(self.public.clone())
    }

    pub fn feed(&self) -> FeedServiceClient<Channel> {
        FeedServiceClient::new(self.public.clone())
    }

    /// A channel to `service`'s internal port presenting `workload`'s certificate (any name
    /// under the certs dir: a service or `operator`).
    pub async fn internal_channel(&self, workload: &str, service: &str) -> anyhow::Result<Channel> {
        let tls = TlsSource::load(TlsFiles::in_dir(&self.certs_dir().join(workload)))
            .with_context(|| format!("loading the {workload} certificate"))?;
        connect_tls(self.grpc_addr(service), tls.client_config()).await
    }

    /// Creates `username` (password [`PASSWORD`]) through the public port and logs in.
    pub async fn sign_up(&self, username: &str, display_name: &str) -> TestUser {
        let created = self
            .users()
            .create_user(CreateUserRequest {
                username: username.into(),
                email: format!("{username}@example.com"),
                password: PASSWORD.into(),
                display_name: display_name.into(),
                request_id: String::new(),
            })
            .await
            .unwrap_or_else(|s| panic!("CreateUser {username}: {s:?}"))
            .into_inner()
            .user
            .unwrap_or_else(|| panic!("CreateUser {username} returned no user"));
        let login = self
            .log_in(username, PASSWORD)
            .await
            .unwrap_or_else(|s| panic!("Login {username}: {s:?}"));
        assert_eq!(
            login.user.as_ref().map(|u| u.user_id.as_str()),
            Some(created.user_id.as_str()),
            "Login returned another user than CreateUser"
        );
        TestUser {
            user_id: created.user_id,
            username: username.into(),
            display_name: display_name.into(),
            password: PASSWORD.into(),
            token: login.access_token,
        }
    }

    pub async fn log_in(&self, username: &str, password: &str) -> Result<LoginResponse, Status> {
        Ok(self
            .users()
            .login(LoginRequest {
                username: username.into(),
                password: password.into(),
            })
            .await?
            .into_inner())
    }

    /// Stops every service (draining them) and starts the mesh again on the same data dir.
    /// Ports change; clients taken from this handle before the restart are dead.
    pub async fn restart(&mut self) {
        if let Some(mesh) = self.mesh.take() {
            mesh.shutdown()
                .await
                .unwrap_or_else(|e| panic!("the mesh did not shut down cleanly: {e:#}"));
        }
        let (mesh, public) = start(self.dir.path()).await;
        self.mesh = Some(mesh);
        self.public = public;
    }

    /// Stops every service; panics if one fails to drain and stop cleanly.
    pub async fn shutdown(mut self) {
        if let Some(mesh) = self.mesh.take() {
            mesh.shutdown()
                .await
                .unwrap_or_else(|e| panic!("the mesh did not shut down cleanly: {e:#}"));
        }
    }
}

/// Polls `check` until it returns `Ok`, and returns that value; panics with the last error
/// once `bound` has passed (a check still running at the bound counts as failed).
pub async fn eventually<T>(
    bound: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<T>,
) -> T {
    let deadline = Instant::now() + bound;
    let mut pause = Duration::from_millis(20);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let last = match tokio::time::timeout(remaining, check()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(err)) => err,
            Err(_) => anyhow::anyhow!("the check was still running"),
        };
        if Instant::now() >= deadline {
            panic!("not so within {bound:?}: {last:#}");
        }
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        // Back off a little: polling through the gateway counts against its rate limits.
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// `eventually!(condition)` or `eventually!(condition, bound)`: waits until the (async,
/// `?`-capable) boolean `condition` holds, up to `bound` (default [`BOUND`]).
#[macro_export]
macro_rules! eventually {
    ($cond:expr $(,)?) => {
        $crate::eventually!($cond, $crate::BOUND)
    };
    ($cond:expr, $bound:expr $(,)?) => {
        $crate::eventually($bound, async || -> $crate::anyhow::Result<()> {
            if $cond {
                Ok(())
            } else {
                Err($crate::anyhow::anyhow!("`{}` is false", stringify!($cond)))
            }
        })
        .await
    };
}

fn init_logs() {
    if let Ok(filter) = std::env::var("TESSERA_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}
