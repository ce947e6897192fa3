//! One replica: an HTTP/2 connection (plaintext or mTLS) that is made when the balancer first
//! asks for it and made again when it drops.
//!
//! Why not `tonic::transport::Endpoint`: a tonic channel whose peer is gone stays "ready" and
//! fails each call at once, and fast failures look like low latency to peak-EWMA, so a dead
//! replica would attract traffic. Here a replica that cannot connect is *not ready* (it sits in
//! backoff), so power-of-two-choices never picks it, and every call costs one connection hop
//! instead of tonic's extra buffer task.

use std::{
    fmt,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::uri::{Authority, Scheme};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tessera_mesh::{coalesce::Coalesce, identity::SpiffeId, tls::ClientTls};
use tokio::net::TcpStream;
use tonic::body::Body;
use tower::Service;

use crate::Error;

/// How long a connection may sit idle before a PING checks the peer is still there, and how
/// long the PING may go unanswered.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff after failed connects only (a lost connection is redialled at once):
/// doubling from the first to the cap, jittered, reset by a successful connect. The cap is
/// low so a replica that comes back gets calls within about a second.
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_CAP: Duration = Duration::from_secs(1);

/// Plaintext (tests, benchmarks) or mTLS with the workload certificate.
#[derive(Clone)]
pub(crate) enum Security {
    Plaintext,
    Mtls(ClientTls),
}

/// Makes connections to the replicas of one target; shared by its endpoints.
#[derive(Clone)]
pub(crate) struct Connector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    security: Security,
    /// mTLS: the one server identity accepted (`None`: any of the trust domain).
    pin: Option<SpiffeId>,
    server_name: ServerName<'static>,
    connect_timeout: Duration,
    scheme: Scheme,
}

impl Connector {
    pub(crate) fn new(
        security: Security,
        pin: Option<SpiffeId>,
        server_name: &str,
        connect_timeout: Duration,
    ) -> Self {
        // Any valid name does: servers are verified by SPIFFE id, not by name.
        let server_name = ServerName::try_from(server_name.to_owned())
            .or_else(|_| ServerName::try_from("tessera.invalid"))
            .unwrap_or(ServerName::IpAddress(
                std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST).into(),
            ));
        let scheme = match security {
            Security::Plaintext => Scheme::HTTP,
            Security::Mtls(_) => Scheme::HTTPS,
        };
        Self {
            inner: Arc::new(ConnectorInner {
                security,
                pin,
                server_name,
                connect_timeout,
                scheme,
            }),
        }
    }

    /// TCP (no Nagle) → TLS 1.3 when configured → HTTP/2 handshake; the connection is driven
    /// by its own task until the peer or the last sender goes away.
    async fn connect(self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, Error> {
        let timeout = self.inner.connect_timeout;
        match tokio::time::timeout(timeout, self.connect_now(addr)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Connect {
                addr,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            }),
        }
    }

    async fn connect_now(&self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, Error> {
        let connect_error = |source| Error::Connect { addr, source };
        let tcp = TcpStream::connect(addr).await.map_err(connect_error)?;
        tcp.set_nodelay(true).map_err(connect_error)?;
        match &self.inner.security {
            Security::Plaintext => handshake(addr, TokioIo::new(tcp)).await,
            Security::Mtls(tls) => {
                // Pinned per handshake: the configuration is cached by the TLS source, so a
                // connect costs one map lookup more and a call nothing.
                let config = match &self.inner.pin {
                    Some(expected) => tls
                        .config_for(expected)
                        .map_err(|e| connect_error(std::io::Error::other(e)))?,
                    None => tls.config(),
                };
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(self.inner.server_name.clone(), tcp)
                    .await
                    .map_err(connect_error)?;
                handshake(addr, TokioIo::new(Coalesce::new(tls))).await
            }
        }
    }
}

async fn handshake<T>(addr: SocketAddr, io: T) -> Result<http2::SendRequest<Body>, Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (send, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .handshake(io)
        .await
        .map_err(|e| Error::Handshake {
            addr,
            source: e.into(),
        })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%addr, %error, "connection closed");
        }
    });
    Ok(send)
}

type Connecting = Pin<Box<dyn Future<Output = Result<http2::SendRequest<Body>, Error>> + Send>>;

enum State {
    Idle,
    Connecting(Connecting),
    Connected(http2::SendRequest<Body>),
    Backoff(Pin<Box<tokio::time::Sleep>>),
}

/// One replica as a tower service. `poll_ready` connects (and reconnects, with backoff) and is
/// only ready with a live connection; it never fails, so the balancer never drops a replica
/// that discovery still lists.
pub(crate) struct Endpoint {
    addr: SocketAddr,
    authority: Authority,
    connector: Connector,
    state: State,
    failures: u32,
    /// Successful connects so far: a change tells the load estimate a new connection (often
    /// a new process at the same address) has replaced the old one.
    connects: u64,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    pub(crate) fn new(addr: SocketAddr, authority: Authority, connector: Connector) -> Self {
        Self {
            addr,
            authority,
            connector,
            state: State::Idle,
            failures: 0,
            connects: 0,
        }
    }

    /// How many times this replica has been connected.
    pub(crate) fn connects(&self) -> u64 {
        self.connects
    }

    /// The connection this replica had is gone (the process died or drained) and nothing has
    /// polled it since: it must be polled to notice and reconnect.
    pub(crate) fn is_lost(&self) -> bool {
        matches!(&self.state, State::Connected(send) if send.is_closed())
    }
}

/// What an endpoint's call resolves to.
pub(crate) type EndpointFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Error>> + Send>>;

impl Service<http::Request<Body>> for Endpoint {
    type Response = http::Response<Body>;
    type Error = Error;
    type Future = EndpointFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            match &mut self.state {
                State::Connected(send) => match send.poll_ready(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => {
                        tracing::debug!(addr = %self.addr, "connection lost; reconnecting");
                        self.state = State::Idle;
                    }
                },
                State::Idle => {
                    let connect = self.connector.clone().connect(self.addr);
                    self.state = State::Connecting(Box::pin(connect));
                }
                State::Connecting(connecting) => match ready!(connecting.as_mut().poll(cx)) {
                    Ok(send) => {
                        if self.failures > 0 {
                            tracing::info!(addr = %self.addr, "reconnected");
                        }
                        self.failures = 0;
                        self.connects += 1;
                        self.state = State::Connected(send);
                    }
                    Err(error) => {
                        self.failures = self.failures.saturating_add(1);
                        let wait = reconnect_backoff(self.failures);
                        if self.failures == 1 {
                            tracing::warn!(addr = %self.addr, error = %tessera_mesh::errors::ErrorChain(&error), "connect failed; retrying in the background");
                        } else {
                            tracing::debug!(addr = %self.addr, error = %tessera_mesh::errors::ErrorChain(&error), ?wait, "connect failed");
                        }
                        self.state = State::Backoff(Box::pin(tokio::time::sleep(wait)));
                    }
                },
                State::Backoff(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    self.state = State::Idle;
                }
            }
        }
    }

    fn call(&mut self, mut request: http::Request<Body>) -> EndpointFuture {
        let addr = self.addr;
        let State::Connected(send) = &mut self.state else {
            return Box::pin(std::future::ready(Err(Error::Transport {
                addr,
                sent: false,
                source: "called before ready".into(),
            })));
        };
        // tonic's generated clients send a path only; HTTP/2 wants scheme and authority too.
        let mut uri = std::mem::take(request.uri_mut()).into_parts();
        uri.scheme = Some(self.connector.inner.scheme.clone());
        uri.authority = Some(self.authority.clone());
        match http::Uri::from_parts(uri) {
            Ok(uri) => *request.uri_mut() = uri,
            Err(e) => {
                return Box::pin(std::future::ready(Err(Error::Transport {
                    addr,
                    sent: false,
                    source: e.into(),
                })));
            }
        }
        let response = send.try_send_request(request);
        Box::pin(async move {
            match response.await {
                Ok(response) => Ok(response.map(Body::new)),
                Err(mut e) => Err(Error::Transport {
                    addr,
                    // The request came back untouched: it never reached the connection.
                    sent: e.take_message().is_none(),
                    source: e.into_error().into(),
                }),
            }
        })
    }
}

fn reconnect_backoff(failures: u32) -> Duration {
    let exp = RECONNECT_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16));
    crate::call::jitter(exp.min(RECONNECT_CAP))
}
