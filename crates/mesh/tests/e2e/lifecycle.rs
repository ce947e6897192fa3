//! Health on the service and admin ports, and graceful shutdown: readiness off, liveness on,
//! calls in flight finish.

use std::time::{Duration, Instant};

use tessera::posts::v1::GetPostRequest;
use tonic_health::{ServingStatus, pb::health_client::HealthClient};

use crate::support::{POSTS, SLOW, eventually, health_status, spawn_app};

const SERVING: i32 = ServingStatus::Serving as i32;
const NOT_SERVING: i32 = ServingStatus::NotServing as i32;

#[tokio::test]
async fn health_is_served_on_both_ports() {
    let app = spawn_app().await;

    let mut internal = HealthClient::new(app.channel("gateway").await);
    assert_eq!(health_status(&mut internal, "").await.unwrap(), SERVING);
    assert_eq!(health_status(&mut internal, POSTS).await.unwrap(), SERVING);
    let unknown = health_status(&mut internal, "tessera.users.v1.UserService")
        .await
        .expect_err("a service this workload does not serve is unknown");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut admin = app.admin_health().await;
    for name in ["", "liveness", "readiness"] {
        assert_eq!(
            health_status(&mut admin, name).await.unwrap(),
            SERVING,
            "{name:?}"
        );
    }
}

#[tokio::test]
async fn shutdown_turns_readiness_off_keeps_liveness_and_drains_calls() {
    let mut app = spawn_app().await;
    let mut client = app.client("gateway").await;
    let mut admin = app.admin_health().await;

    let started = Instant::now();
    let in_flight = tokio::spawn(async move {
        client
            .get_post(GetPostRequest {
                post_id: "slow".into(),
            })
            .await
    });
    eventually!("the slow call to reach its handler", app.in_flight() == 1);

    app.shutdown();
    eventually!(
        "readiness to go NOT_SERVING",
        health_status(&mut admin, "readiness").await.unwrap() == NOT_SERVING
    );
    assert_eq!(
        health_status(&mut admin, "liveness").await.unwrap(),
        SERVING,
        "a draining pod must not look dead to kubelet"
    );
    assert!(
        !in_flight.is_finished(),
        "readiness went off only after the call ended; the test proves nothing"
    );

    // Nothing is waiting on the admin port any more; let it close at once.
    drop(admin);
    app.stopped().await.unwrap();
    assert_eq!(
        app.in_flight(),
        0,
        "the workload stopped while a call was still in its handler"
    );
    let finished = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the call in flight did not finish")
        .unwrap()
        .expect("the call started before shutdown failed");
    assert_eq!(finished.into_inner().post.unwrap().post_id, "slow");
    assert!(started.elapsed() >= SLOW);
    // The listener is closed: new connections are refused.
    assert!(tokio::net::TcpStream::connect(app.grpc).await.is_err());
}
