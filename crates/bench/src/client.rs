//! The load generator's side of the wire: plain HTTP/2 connections (hyper), over TCP or
//! TLS, with tonic's generated clients on top.
//!
//! Deliberately thinner than `tessera-client` (no balancing, retries or buffering): the
//! benchmark compares servers, so the client must be the same cheap thing for all of them.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use hyper::{body::Incoming, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::net::TcpSocket;
use tonic::body::Body;

use crate::BenchError;

/// How a connection is secured.
#[derive(Clone)]
pub enum Security {
    /// h2c: HTTP/2 over plain TCP, as to a bare tonic server or an admin port.
    Plaintext,
    /// TLS to a server whose certificate names `server_name`.
    Tls {
        /// Roots, client certificate if any, and ALPN h2.
        config: Arc<ClientConfig>,
        /// The name the server's certificate must carry.
        server_name: ServerName<'static>,
    },
}

fn tls_err(what: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(format!("{}: {e}", what.display()))
}

fn roots(ca: &Path) -> Result<RootCertStore, BenchError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| tls_err(ca, e))? {
        roots
            .add(cert.map_err(|e| tls_err(ca, e))?)
            .map_err(|e| tls_err(ca, e))?;
    }
    Ok(roots)
}

impl Security {
    /// TLS 1.3 presenting `cert`/`key`, trusting `ca`, ALPN h2: what a workload sends.
    pub fn mtls(ca: &Path, cert: &Path, key: &Path) -> Result<Self, BenchError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| tls_err(cert, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| tls_err(cert, e))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e))?;
        let mut config = ClientConfig::builder_with_provider(tessera_mesh::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| BenchError::Setup(e.to_string()))?
            .with_root_certificates(roots(ca)?)
            .with_client_auth_cert(chain, key)
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self::tls(config))
    }

    /// TLS trusting `ca`, no client certificate: what an end user's client does.
    pub fn server_only(ca: &Path) -> Result<Self, BenchError> {
        let mut config = ClientConfig::builder_with_provider(tessera_mesh::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| BenchError::Setup(e.to_string()))?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self::tls(config))
    }

    fn tls(config: ClientConfig) -> Self {
        // Development certificates name localhost and 127.0.0.1.
        Security::Tls {
            config: Arc::new(config),
            server_name: ServerName::try_from("localhost").expect("a valid DNS name"),
        }
    }

    /// The origin tonic puts on requests (scheme and `:authority`).
    fn origin(&self, addr: SocketAddr) -> http::Uri {
        let scheme = match self {
            Security::Plaintext => "http",
            Security::Tls { .. } => "https",
        };
        format!("{scheme}://localhost:{}", addr.port())
            .parse()
            .unwrap_or_default()
    }
}

/// One HTTP/2 connection; a tower service tonic clients run over. Cloning shares it.
#[derive(Clone)]
pub struct Conn {
    send: SendRequest<Body>,
    origin: http::Uri,
}

impl Conn {
    /// Connects to `addr`, from `source` if given (distinct loopback source addresses let a
    /// benchmark look like many clients to per-address limits).
    pub async fn connect(
        addr: SocketAddr,
        security: &Security,
        source: Option<IpAddr>,
    ) -> Result<Self, BenchError> {
        let io_err = |source| BenchError::Io {
            what: format!("connecting to {addr}"),
            source,
        };
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(io_err)?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0)).map_err(io_err)?;
        }
        let tcp = socket.connect(addr).await.map_err(io_err)?;
        tcp.set_nodelay(true).map_err(io_err)?;
        let builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        let send =
            match security {
                Security::Plaintext => {
                    let (send, conn) = builder.handshake(TokioIo::new(tcp)).await.map_err(|e| {
                        BenchError::Setup(format!("HTTP/2 handshake with {addr}: {e}"))
                    })?;
                    tokio::spawn(conn);
                    send
                }
                Security::Tls {
                    config,
                    server_name,
                } => {
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(server_name.clone(), tcp)
                        .await
                        .map_err(|source| BenchError::Io {
                            what: format!("TLS handshake with {addr}"),
                            source,
                        })?;
                    let (send, conn) = builder.handshake(TokioIo::new(tls)).await.map_err(|e| {
                        BenchError::Setup(format!("HTTP/2 handshake with {addr}: {e}"))
                    })?;
                    tokio::spawn(conn);
                    send
                }
            };
        Ok(Self {
            send,
            origin: security.origin(addr),
        })
    }

    /// The origin to give tonic's `with_origin`.
    pub fn origin(&self) -> http::Uri {
        self.origin.clone()
    }
}

impl tower::Service<http::Request<Body>> for Conn {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}

/// A few connections to one server, handed out round robin.
#[derive(Clone)]
pub struct Pool {
    conns: Arc<[Conn]>,
}

impl Pool {
    /// `n` connections to `addr`; with `sources`, connection `i` comes from `sources[i % len]`.
    pub async fn connect(
        addr: SocketAddr,
        security: &Security,
        n: usize,
        sources: &[IpAddr],
    ) -> Result<Self, BenchError> {
        let mut conns = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
            conns.push(Conn::connect(addr, security, source).await?);
        }
        Ok(Self {
            conns: conns.into(),
        })
    }

    /// The connection for request number `i`.
    pub fn get(&self, i: u64) -> &Conn {
        &self.conns[(i % self.conns.len() as u64) as usize]
    }
}

/// `n` distinct loopback source addresses (127.0.1.1, 127.0.1.2, ...).
pub fn loopback_sources(n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::from([127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8]))
        .collect()
}
