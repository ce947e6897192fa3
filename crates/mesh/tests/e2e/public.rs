//! The public port's connection limits (`tessera_mesh::edge`): connections per address,
//! the header, body and idle timeouts, and shedding permits taken only once the request
//! message is in. The port serves health here; what it serves does not matter.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tessera_mesh::{
    certs::Ca,
    edge::PublicLimits,
    policy::Policy,
    reflection::with_health_and_reflection,
    server::{GrpcService, Listeners, ServerOptions, Workload},
    shutdown::{Shutdown, ShutdownTrigger},
    tls::TlsSource,
};
use tokio::io::AsyncReadExt;
use tonic::{Status, body::Body, service::Routes};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::support::{
    Handshakes, RELOAD_INTERVAL, anonymous_client_config, eventually, issue_server_cert,
    test_options, tls_connect,
};

struct Public {
    addr: SocketAddr,
    ca: Ca,
    _dir: tempfile::TempDir,
    trigger: ShutdownTrigger,
}

impl Drop for Public {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

async fn spawn_public(limits: PublicLimits, max_concurrency: usize) -> Public {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("tessera test CA").unwrap();
    let files = issue_server_cert(&ca)
        .save(&dir.path().join("gateway"))
        .unwrap();
    let tls = TlsSource::watch(files, RELOAD_INTERVAL).unwrap();
    let options = ServerOptions {
        max_concurrency,
        public: limits,
        ..test_options()
    };
    let workload = Workload::new("gateway", tls, Arc::new(Policy::contracts()), None, options);
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = public.local_addr().unwrap();
    let listeners = Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        public: Some(public),
    };
    let health = tonic_health::server::HealthReporter::new();
    let service = GrpcService::new(
        with_health_and_reflection(
            Routes::default(),
            &health,
            None,
            tessera::FILE_DESCRIPTOR_SET,
        )
        .prepare(),
    );
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(workload.run(Routes::default(), &[], listeners, Some(service), shutdown));
    Public {
        addr,
        ca,
        _dir: dir,
        trigger,
    }
}

fn limits() -> PublicLimits {
    PublicLimits {
        max_streams_per_conn: 10,
        max_conns_per_addr: 10,
        header_timeout: Duration::from_secs(5),
        body_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
    }
}

/// An HTTP/2 connection; the handle of the task driving it ends when the connection does.
async fn h2(
    public: &Public,
) -> (
    hyper::client::conn::http2::SendRequest<Body>,
    tokio::task::JoinHandle<()>,
) {
    let tls = tls_connect(
        public.addr,
        anonymous_client_config(&public.ca),
        &Handshakes::default(),
    )
    .await
    .unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    (
        send,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

async fn health_check(send: &hyper::client::conn::http2::SendRequest<Body>) -> Result<(), Status> {
    let send = send.clone();
    let channel = tower::service_fn(move |req: http::Request<Body>| {
        let mut send = send.clone();
        async move { send.send_request(req).await }
    });
    HealthClient::with_origin(channel, http::Uri::from_static("http://localhost"))
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
}

#[tokio::test]
async fn connections_past_the_per_address_cap_are_closed_before_tls() {
    let public = spawn_public(
        PublicLimits {
            max_conns_per_addr: 2,
            ..limits()
        },
        64,
    )
    .await;
    let config = anonymous_client_config(&public.ca);
    let handshakes = Handshakes::default();
    let connect = || tls_connect(public.addr, config.clone(), &handshakes);
    let first = connect().await.unwrap();
    let _second = connect().await.unwrap();
    assert!(
        connect().await.is_err(),
        "a third connection from one address"
    );
    drop(first);
    eventually!(connect().await.is_ok(), "a freed slot to be reusable");
}

#[tokio::test]
async fn a_connection_that_sends_no_request_is_closed_after_the_header_timeout() {
    let public = spawn_public(
        PublicLimits {
            header_timeout: Duration::from_millis(300),
            ..limits()
        },
        64,
    )
    .await;
    let mut tls = tls_connect(
        public.addr,
        anonymous_client_config(&public.ca),
        &Handshakes::default(),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 256];
    // The server's HTTP/2 preface may come first; then the end.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection stayed open");
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_its_calls() {
    let public = spawn_public(
        PublicLimits {
            idle_timeout: Duration::from_millis(300),
            ..limits()
        },
        64,
    )
    .await;
    let (send, conn) = h2(&public).await;
    health_check(&send).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the idle connection was not closed")
        .unwrap();
}

#[tokio::test]
async fn streams_without_their_message_hold_no_shedding_permit() {
    let public = spawn_public(
        PublicLimits {
            body_timeout: Duration::from_millis(500),
            ..limits()
        },
        2,
    )
    .await;
    let (send, _conn) = h2(&public).await;
    // Three header-only calls: more than the two permits.
    let silent: Vec<_> = (0..3)
        .map(|_| {
            let mut send = send.clone();
            let never = futures::stream::pending::<Result<Frame<Bytes>, Status>>();
            let req = http::Request::builder()
                .method("POST")
                .uri("http://localhost/grpc.health.v1.Health/Check")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Body::new(http_body_util::StreamBody::new(never)))
                .unwrap();
            tokio::spawn(async move { send.send_request(req).await })
        })
        .collect();
    // A call that sends its message is served meanwhile.
    let (other, _other_conn) = h2(&public).await;
    health_check(&other).await.unwrap();
    // The silent ones are answered DEADLINE_EXCEEDED once the body timeout passes.
    for call in silent {
        let resp = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("no answer to a header-only call")
            .unwrap()
            .unwrap();
        let code = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        assert_eq!(code.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
    }
}
