//! The public port's connection handling: what the internet may hold open.
//!
//! The internal port trusts its peers' behaviour as far as their certificates go; the public
//! port must not. Here each client address gets at most so many connections, each connection
//! so many concurrent streams; a connection must finish its TLS handshake and send a request's
//! headers within a deadline, and one with no call in flight for the idle timeout is closed
//! (HTTP/2 GOAWAY, or a close between HTTP/1.1 requests, so a well-behaved client reconnects
//! without losing a call). The request path
//! then waits for each call's request message under its own deadline before the call takes a
//! load-shedding permit (see [`crate::stack::RequestPath::message_deadline`]).
//!
//! Not for: what a request may do (rate limits and tokens are the gateway's), nor the internal
//! mTLS port, whose per-call cost is benchmarked and stays as it is.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpListener, time::Instant};
use tonic::{Status, body::Body};
use tower::Service;

use crate::{stack::PeerInfo, tls::TlsSource};

/// Limits on what one client may hold open on the public port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicLimits {
    /// Concurrent streams per connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_conn: u32,
    /// Open connections per client address (IPv6: per /64); past it new ones are closed at
    /// once, before any TLS work.
    pub max_conns_per_addr: usize,
    /// From accepting a connection to its first request's headers (TLS handshake included).
    pub header_timeout: Duration,
    /// From a call's headers to its whole first request message.
    pub body_timeout: Duration,
    /// A connection with no call in flight this long is closed.
    pub idle_timeout: Duration,
}

impl Default for PublicLimits {
    fn default() -> Self {
        Self {
            max_streams_per_conn: 100,
            max_conns_per_addr: 100,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Connections counted per client address.
#[derive(Default)]
struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// IPv6 clients usually hold a /64; counting single addresses would let one host open a
/// cap's worth of connections from each of its 2^64 addresses.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl PerAddress {
    /// A slot for one more connection from `ip`, or `None` past `max`.
    fn try_open(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let key = address_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            key,
        })
    }
}

/// Held for a connection's life; gives its slot back when dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    key: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // The map holds only addresses with connections open, so it cannot grow
                // beyond the descriptors the process has.
                open.remove(&self.key);
            }
        }
    }
}

/// What the watchdog of one connection needs to know about its calls.
struct Activity {
    /// Calls whose response has not finished (or been dropped).
    in_flight: AtomicUsize,
    /// A request's headers have arrived on this connection.
    seen_request: AtomicBool,
    /// Woken whenever the count drops to zero or a request arrives, so the watchdog rearms.
    changed: tokio::sync::Notify,
}

/// One call in flight; dropped with the response body (or the call's future).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.seen_request.store(true, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_one();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call counted as in flight until it ends or is dropped.
    struct Counted {
        #[pin]
        inner: Body,
        _call: InFlight,
    }
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How long a connection gets to close after GOAWAY before it is dropped: a client that does
/// not read would otherwise keep even the GOAWAY unsent.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Accepts server-only TLS connections on the public port and serves `service` on them under
/// `limits`, until `stop` turns true; then stops accepting and gives open connections `drain`
/// to finish their calls.
pub async fn serve_public<S>(
    listener: TcpListener,
    tls: TlsSource,
    service: S,
    limits: PublicLimits,
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
    // HTTP/2 for gRPC; HTTP/1.1 too, for whatever the port serves over it (an HTTP/JSON
    // front), with hyper's own header-read timeout for each request on a kept-alive
    // connection.
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_conn)
        .max_header_list_size(64 * 1024);
    let builder = Arc::new(builder);
    let per_address = Arc::new(PerAddress::default());
    let limits = Arc::new(limits);
    // Every connection task holds a sender; once all are gone, `recv` returns None.
    let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
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
            _ = crate::server::stopped(&mut stop) => break,
        };
        let Some(slot) = per_address.try_open(remote_addr.ip(), limits.max_conns_per_addr) else {
            tracing::debug!(peer = %remote_addr, "too many connections from this address; closed");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        crate::server::keepalive(&tcp);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.public_server_config());
        let service = service.clone();
        let builder = builder.clone();
        let limits = limits.clone();
        let mut stop = stop.clone();
        let alive = alive_tx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _alive = alive;
            let accepted = Instant::now();
            let first_request_by = accepted + limits.header_timeout;
            // Dropped when the server stops: a handshake has no call to finish.
            let handshake = tokio::time::timeout_at(first_request_by, acceptor.accept(tcp));
            let handshake = tokio::select! {
                done = handshake => done,
                _ = crate::server::stopped(&mut stop) => return,
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
            let activity = Arc::new(Activity {
                in_flight: AtomicUsize::new(0),
                seen_request: AtomicBool::new(false),
                changed: tokio::sync::Notify::new(),
            });
            let peer = PeerInfo {
                remote_addr,
                identity: None,
            };
            let counting = activity.clone();
            let hyper_service =
                hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let call = InFlight::start(&counting);
                    let mut req = req.map(Body::new);
                    req.extensions_mut().insert(peer.clone());
                    let mut service = service.clone();
                    async move {
                        let resp = service.call(req).await?;
                        Ok::<_, Infallible>(
                            resp.map(|inner| Body::new(Counted { inner, _call: call })),
                        )
                    }
                });
            let conn = builder
                .serve_connection(TokioIo::new(stream), hyper_service)
                .into_owned();
            let watch = Watch {
                activity: &activity,
                limits: &limits,
                first_request_by,
                drain,
                remote_addr,
            };
            watch_connection(conn, |c| c.graceful_shutdown(), watch, stop).await;
        });
    }
    drop(listener);
    drop(alive_tx);
    if tokio::time::timeout(drain, alive_rx.recv()).await.is_err() {
        tracing::warn!("drain timeout passed with public calls still in flight; closing them");
    }
    Ok(())
}

/// What [`watch_connection`] holds one connection to.
struct Watch<'a> {
    activity: &'a Activity,
    limits: &'a PublicLimits,
    first_request_by: Instant,
    /// How long calls get once the server stops.
    drain: Duration,
    remote_addr: std::net::SocketAddr,
}

/// Drives one connection, closing it (GOAWAY, then a hard bound) when it sends no request by
/// `first_request_by`, when it has idled `limits.idle_timeout` with no call in flight, or when
/// the server stops.
async fn watch_connection<C, E>(
    conn: C,
    goaway: impl Fn(Pin<&mut C>),
    watch: Watch<'_>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let Watch {
        activity,
        limits,
        first_request_by,
        drain,
        remote_addr,
    } = watch;
    tokio::pin!(conn);
    let mut idle_since = Instant::now();
    let why = loop {
        let deadline = if activity.seen_request.load(Ordering::Relaxed) {
            idle_since + limits.idle_timeout
        } else {
            first_request_by
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(peer = %remote_addr, error = %err, "connection ended with an error");
                }
                return;
            }
            () = activity.changed.notified() => {
                // A call finished with none left: the idle clock starts now.
                idle_since = Instant::now();
            }
            () = tokio::time::sleep_until(deadline) => {
                if activity.in_flight.load(Ordering::Acquire) > 0 {
                    // Busy: look again one idle period after now at the earliest.
                    idle_since = Instant::now();
                    continue;
                }
                if !activity.seen_request.load(Ordering::Relaxed) {
                    break "no request headers within the header timeout";
                }
                break "idle";
            }
            _ = crate::server::stopped(&mut stop) => break "server stopping",
        }
    };
    tracing::debug!(peer = %remote_addr, reason = why, "closing public connection");
    goaway(conn.as_mut());
    // Draining calls get the server's drain; an idle or silent peer only a short grace.
    let grace = if why == "server stopping" {
        drain
    } else {
        CLOSE_GRACE
    };
    if tokio::time::timeout(grace, conn.as_mut()).await.is_err() {
        tracing::debug!(peer = %remote_addr, "connection did not close after GOAWAY; dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_per_address_are_capped_and_given_back() {
        let table = Arc::new(PerAddress::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([10, 0, 0, 1]));
        let b: IpAddr = IpAddr::from([10, 0, 0, 2]);
        let first = table.try_open(a, 2);
        let second = table.try_open(a, 2);
        assert!(first.is_some() && second.is_some());
        assert!(table.try_open(a, 2).is_none(), "a third from one address");
        assert!(
            table.try_open(b, 2).is_some(),
            "another address is not charged"
        );
        drop(first);
        assert!(
            table.try_open(a, 2).is_some(),
            "a closed connection frees its slot"
        );
        drop(second);
        assert!(
            table
                .open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&b)
                .is_none(),
            "addresses without connections are forgotten"
        );
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let one: IpAddr = IpAddr::from([0x2001, 0xdb8, 1, 2, 3, 4, 5, 6]);
        let other: IpAddr = IpAddr::from([0x2001, 0xdb8, 1, 2, 9, 9, 9, 9]);
        assert_eq!(address_key(one), address_key(other));
        let mapped: IpAddr = IpAddr::from(std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(address_key(mapped), IpAddr::from([192, 0, 2, 1]));
    }
}
