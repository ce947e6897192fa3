//! Health on the service and admin ports, readiness only once the workload can do its job,
//! and graceful shutdown: readiness off, liveness on, calls in flight finish, server streams
//! end with UNAVAILABLE.

use std::time::{Duration, Instant};

use tessera::posts::v1::GetPostRequest;
use tonic_health::{ServingStatus, pb::health_client::HealthClient};

use crate::support::{
    POSTS, SLOW, eventually, health_status, spawn_app, spawn_app_gated, test_options,
};

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
    eventually!(app.in_flight() == 1, "the slow call to reach its handler");

    app.shutdown();
    eventually!(
        health_status(&mut admin, "readiness").await.unwrap() == NOT_SERVING,
        "readiness to go NOT_SERVING"
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

#[tokio::test]
async fn readiness_waits_for_the_gate_while_calls_are_served() {
    let (open, gate) = tokio::sync::oneshot::channel::<()>();
    let gate = Box::pin(async move {
        let _ = gate.await;
    });
    let app = spawn_app_gated(test_options(), None, Some(gate)).await;
    let mut admin = app.admin_health().await;
    let mut internal = HealthClient::new(app.channel("gateway").await);
    assert_eq!(
        health_status(&mut admin, "liveness").await.unwrap(),
        SERVING
    );
    for name in ["readiness", ""] {
        assert_eq!(
            health_status(&mut admin, name).await.unwrap(),
            NOT_SERVING,
            "admin {name:?} before the gate"
        );
    }
    for name in ["", POSTS] {
        assert_eq!(
            health_status(&mut internal, name).await.unwrap(),
            NOT_SERVING,
            "service port {name:?} before the gate"
        );
    }
    // Not ready is advice to load balancers: a call that comes anyway is served.
    let mut client = app.client("gateway").await;
    let post = client
        .get_post(GetPostRequest {
            post_id: "p-1".into(),
        })
        .await
        .unwrap();
    assert_eq!(post.into_inner().post.unwrap().post_id, "p-1");

    open.send(()).unwrap();
    eventually!(
        health_status(&mut admin, "readiness").await.unwrap() == SERVING,
        "readiness to turn SERVING once the gate is through"
    );
    assert_eq!(health_status(&mut internal, POSTS).await.unwrap(), SERVING);
    assert_eq!(health_status(&mut internal, "").await.unwrap(), SERVING);
}

#[tokio::test]
async fn shutdown_ends_server_streams_with_unavailable_after_the_drain_delay() {
    // A long drain timeout: the workload must stop because its streams ended, not because
    // the timeout cut them.
    let options = tessera_mesh::server::ServerOptions {
        drain_timeout: Duration::from_secs(20),
        ..test_options()
    };
    let delay = options.drain_delay;
    let mut app = crate::support::spawn_app_with(options, None).await;
    // Health.Watch is a server stream that never ends by itself, like WatchEvents.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut watcher = HealthClient::new(app.channel("comments").await);
        let mut stream = watcher
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.status, SERVING);
        streams.push(stream);
    }

    let started = Instant::now();
    app.shutdown();
    for mut stream in streams {
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                Ok(Ok(Some(update))) => assert_eq!(update.status, NOT_SERVING),
                Ok(Ok(None)) => panic!("the stream ended without a status telling to reconnect"),
                Ok(Err(status)) => break status,
                Err(_) => panic!("the stream was not ended by the drain"),
            }
        };
        assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    }
    let ended_after = started.elapsed();
    assert!(
        ended_after >= delay,
        "streams ended before the drain delay ({ended_after:?})"
    );
    app.stopped().await.unwrap();
    let stopped_after = started.elapsed();
    println!(
        "drain delay {delay:?}: streams ended after {ended_after:?}, workload stopped after {stopped_after:?}"
    );
    assert!(
        stopped_after < delay + Duration::from_secs(2),
        "stopped after {stopped_after:?}"
    );
}

#[tokio::test]
async fn a_handshake_left_unfinished_does_not_hold_the_drain() {
    let options = tessera_mesh::server::ServerOptions {
        drain_timeout: Duration::from_secs(20),
        ..test_options()
    };
    let delay = options.drain_delay;
    let mut app = crate::support::spawn_app_with(options, None).await;
    // Connected over TCP, never a byte of TLS: a client that stalled mid-connect (the server
    // gives a handshake 10 s).
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(tokio::net::TcpStream::connect(app.grpc).await.unwrap());
    }
    // Let the server accept them before it stops.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    app.shutdown();
    app.stopped().await.unwrap();
    let stopped_after = started.elapsed();
    println!("drain delay {delay:?}: stopped after {stopped_after:?} with 3 unfinished handshakes");
    assert!(
        stopped_after < delay + Duration::from_secs(2),
        "stopped after {stopped_after:?}"
    );
    drop(stalled);
}
