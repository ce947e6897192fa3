//! TLS for tests: workload certificates from a test CA, and clients of a test server (the
//! handshake alone, or a gRPC channel over it), always as server name `localhost`.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tessera_mesh::{certs::Ca, identity::SpiffeId, tls::TlsFiles};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The trust domain of test certificates (the mesh's default).
pub const TRUST_DOMAIN: &str = "tessera.local";

/// The SPIFFE id of workload `service` in namespace `default`.
///
/// # Panics
///
/// When `service` cannot be part of a SPIFFE id: it is for tests only.
pub fn spiffe(service: &str) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, "default", service)
        .unwrap_or_else(|e| panic!("{service:?} cannot be a workload name: {e}"))
}

/// Issues `service`'s certificate from `ca` (its SPIFFE id, plus `localhost` and 127.0.0.1 so
/// it also serves) and writes it with the CA to `dir/service`.
///
/// # Panics
///
/// When the certificate cannot be issued or written: it is for tests only.
pub fn issue(ca: &Ca, service: &str, dir: &Path) -> TlsFiles {
    ca.issue(
        &spiffe(service),
        &["localhost"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )
    .and_then(|issued| issued.save(&dir.join(service)))
    .unwrap_or_else(|e| panic!("cannot issue {service}'s certificate: {e}"))
}

/// A client configuration trusting only the CA certificate(s) in `ca_pem` and presenting no
/// certificate (what an end user's client has), offering ALPN h2.
pub fn server_only_tls_pem(ca_pem: &[u8]) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert?)?;
    }
    let mut config = ClientConfig::builder_with_provider(tessera_mesh::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// [`server_only_tls_pem`] with the CA read from the file `ca_pem`.
pub fn server_only_tls(ca_pem: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let pem = std::fs::read(ca_pem).with_context(|| format!("reading {}", ca_pem.display()))?;
    server_only_tls_pem(&pem)
}

/// A TLS connection to `addr` as server name `localhost` with `config`: the transport only,
/// for tests about the handshake itself.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    handshake(tcp, config).await
}

/// [`tls_connect`] from the local address `from` (any of 127/8 on Linux), so a test can stand
/// for several clients that per-address limits tell apart.
pub async fn tls_connect_from(
    from: IpAddr,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    let tcp = socket.connect(addr).await?;
    handshake(tcp, config).await
}

async fn handshake(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// How long one connection attempt or call over [`connect_tls`] may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// A gRPC channel to `addr` over TLS with `config` (which must offer ALPN h2); connecting and
/// each call are bounded (20 s).
pub async fn connect_tls(addr: SocketAddr, config: Arc<ClientConfig>) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    channel_over(endpoint, move || tls_connect(addr, config.clone())).await
}

/// A gRPC channel on `endpoint` whose every (re)connection is `connect()`: for tests that
/// choose the local address or watch the handshakes. The endpoint's scheme only fills
/// `:scheme`; TLS is `connect`'s business.
pub async fn channel_over<F, Fut>(endpoint: Endpoint, connect: F) -> anyhow::Result<Channel>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = std::io::Result<TlsStream<TcpStream>>> + Send + 'static,
{
    let uri = endpoint.uri().clone();
    let connector = tower::service_fn(move |_: Uri| {
        let connect = connect.clone();
        async move { connect().await.map(TokioIo::new) }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting to {uri}"))
}
