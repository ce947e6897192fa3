//! `/metrics` on the admin port counts calls by method, code and caller.

use tessera::posts::v1::GetPostRequest;
use tonic::Code;

use tessera_testing::BOUND;

use crate::support::{GET_POST, eventually, scrape, spawn_app};

#[tokio::test]
async fn metrics_count_calls_by_method_code_and_caller() {
    let app = spawn_app().await;
    let mut gateway = app.client("gateway").await;
    for i in 0..3 {
        gateway
            .get_post(GetPostRequest {
                post_id: format!("p{i}"),
            })
            .await
            .unwrap();
    }
    let denied = app
        .client("users")
        .await
        .get_post(GetPostRequest {
            post_id: "p1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let ok = format!(
        r#"tessera_grpc_server_requests_total{{method="{GET_POST}",code="OK",caller="gateway"}} 3"#
    );
    let refused = format!(
        r#"tessera_grpc_server_requests_total{{method="{GET_POST}",code="PERMISSION_DENIED",caller="users"}} 1"#
    );
    let latency =
        format!(r#"tessera_grpc_server_request_duration_seconds_count{{method="{GET_POST}"}} 4"#);
    // Calls are recorded when the server finishes the response body, a moment after the
    // client has its answer.
    let metrics = eventually(BOUND, async || {
        let metrics = scrape(app.admin).await;
        let all = metrics.contains(&ok) && metrics.contains(&refused) && metrics.contains(&latency);
        anyhow::ensure!(all, "the calls to show up in /metrics:\n{metrics}");
        Ok(metrics)
    })
    .await;
    assert!(
        metrics.contains("application/openmetrics-text"),
        "{metrics}"
    );
}

#[tokio::test]
async fn invented_method_names_share_one_label() {
    let app = spawn_app().await;
    let mut grpc = tonic::client::Grpc::new(app.channel("gateway").await);
    for name in ["Invented1", "Invented2"] {
        grpc.ready().await.unwrap();
        let path = format!("/tessera.posts.v1.PostService/{name}");
        let refused = grpc
            .unary(
                tonic::Request::new(GetPostRequest::default()),
                path.parse().unwrap(),
                tonic_prost::ProstCodec::<GetPostRequest, GetPostRequest>::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
    }
    let unknown = r#"tessera_grpc_server_requests_total{method="unknown",code="PERMISSION_DENIED",caller="gateway"} 2"#;
    let metrics = eventually(BOUND, async || {
        let metrics = scrape(app.admin).await;
        anyhow::ensure!(
            metrics.contains(unknown),
            "both calls under one label:\n{metrics}"
        );
        Ok(metrics)
    })
    .await;
    assert!(!metrics.contains("Invented"), "{metrics}");
}
