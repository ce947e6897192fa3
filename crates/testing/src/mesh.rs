//! The whole mesh for a test, in the zero-to-production `spawn_app()` style: started
//! in-process (`tessera up` without the command line) on free loopback ports over a fresh
//! temporary data dir, with typed clients for the gateway's public port (server-only TLS,
//! verified against the dev CA as `localhost`), clients with a workload's certificate for the
//! internal ports, and [`TestMesh::restart`] on the same data dir.
//!
//! Set `TESSERA_TEST_LOG` (an EnvFilter, e.g. `info,tessera_gateway=debug`) to see the mesh's
//! logs in a failing test's output.

use std::{net::SocketAddr, path::Path};

use anyhow::Context as _;
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
use tonic::{Status, transport::Channel};

use crate::tls::{connect_tls, server_only_tls};

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
    /// The id CreateUser gave the user.
    pub user_id: String,
    /// The name the user logs in with.
    pub username: String,
    /// The name shown for the user, as given to CreateUser.
    pub display_name: String,
    /// Always [`PASSWORD`], kept here so a test can log in again.
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

    /// The dev CA (`ca.crt`) and one directory per workload with its certificate and key.
    pub fn certs_dir(&self) -> &Path {
        &self.mesh().certs_dir
    }

    /// The `endpoints.json` the mesh wrote once every service was ready.
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

    /// A UserService client through the gateway's public port.
    pub fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.public.clone())
    }

    /// A PostService client through the gateway's public port.
    pub fn posts(&self) -> PostServiceClient<Channel> {
        PostServiceClient::new(self.public.clone())
    }

    /// A CommentService client through the gateway's public port.
    pub fn comments(&self) -> CommentServiceClient<Channel> {
        CommentServiceClient::new(self.public.clone())
    }

    /// A NotificationService client through the gateway's public port.
    pub fn notifications(&self) -> NotificationServiceClient<Channel> {
        NotificationServiceClient::new(self.public.clone())
    }

    /// A FeedService client through the gateway's public port.
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

    /// Login through the public port, its failure returned for the test to check.
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

fn init_logs() {
    if let Ok(filter) = std::env::var("TESSERA_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}
