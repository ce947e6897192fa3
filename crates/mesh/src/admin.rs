//! The plaintext admin port: gRPC health for kubelet's probes (`liveness`, `readiness`, "")
//! and `GET /metrics` for Prometheus, nothing else.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tonic::{Status, body::Body};
use tonic_health::server::HealthReporter;
use tower::Service;

use crate::{
    metrics::Metrics,
    server::{http2_builder, stopped},
};

/// The admin port: gRPC health over h2c and `GET /metrics` over HTTP/1.1, nothing else.
#[derive(Clone)]
pub(crate) struct AdminService {
    health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    metrics: Metrics,
}

pub(crate) async fn serve_admin(
    listener: TcpListener,
    admin: AdminService,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let builder = Arc::new(http2_builder());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let admin = admin.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

impl AdminService {
    /// Health from `health` (`liveness`, `readiness`, ""), metrics from `metrics`.
    pub(crate) fn new(health: &HealthReporter, metrics: &Metrics) -> Self {
        Self {
            health: tonic_health::pb::health_server::HealthServer::new(
                tonic_health::server::HealthService::from_health_reporter(health.clone()),
            ),
            metrics: metrics.clone(),
        }
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path();
        if path == "/metrics" && req.method() == http::Method::GET {
            let mut resp = Response::new(Body::new(http_body_util::Full::new(bytes::Bytes::from(
                self.metrics.render(),
            ))));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            return resp;
        }
        if path.starts_with("/grpc.health.v1.Health/") {
            let mut health = self.health.clone();
            return match health.call(req.map(Body::new)).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
        }
        if req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
        {
            return Status::unimplemented("the admin port serves only grpc.health.v1.Health")
                .into_http();
        }
        let mut resp = Response::new(Body::default());
        *resp.status_mut() = http::StatusCode::NOT_FOUND;
        resp
    }
}
