//! Targets follow their resolver.

use std::time::{Duration, Instant};

use tessera::users::v1::{GetUserRequest, user_service_client::UserServiceClient};
use tessera_client::ClientBuilder;

use crate::support::{Replica, TestResolver, get_users, serial};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_follow_the_resolvers_answer() {
    let _serial = serial().await;
    let [a, b, c] = [
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    let resolver = TestResolver::default();
    resolver.set(&[a.addr, b.addr]);
    let refresh = Duration::from_millis(100);
    let channel = ClientBuilder::plaintext()
        .refresh_interval(refresh)
        .channel_with_resolver(resolver.clone(), "users.test")
        .unwrap();
    assert!(get_users(&channel, 200, 4).await.is_empty());
    assert!(a.behaviour.gets() > 0 && b.behaviour.gets() > 0);
    assert_eq!(c.behaviour.gets(), 0);

    // One added, one removed: C serves within the refresh interval (plus a connect).
    resolver.set(&[b.addr, c.addr]);
    let changed = Instant::now();
    let mut client = UserServiceClient::new(channel.clone());
    while c.behaviour.gets() == 0 {
        assert!(
            changed.elapsed() < refresh * 5,
            "the new replica got no call within {:?}",
            changed.elapsed()
        );
        client
            .get_user(GetUserRequest {
                user_id: "u".into(),
            })
            .await
            .unwrap();
    }
    assert!(changed.elapsed() < refresh * 3, "{:?}", changed.elapsed());

    // From then on, the removed replica gets nothing.
    let a_before = a.behaviour.gets();
    let (b_before, c_before) = (b.behaviour.gets(), c.behaviour.gets());
    assert!(get_users(&channel, 300, 4).await.is_empty());
    assert_eq!(a.behaviour.gets(), a_before, "a removed replica was called");
    assert_eq!(
        b.behaviour.gets() + c.behaviour.gets(),
        b_before + c_before + 300
    );
}

#[tokio::test]
async fn a_bad_target_is_an_error() {
    let _serial = serial().await;
    let builder = ClientBuilder::plaintext();
    for bad in [
        "dns:",
        "static:",
        "nohostport",
        "dns:a:1,b:2",
        "static:[::1:80",
    ] {
        assert!(builder.channel(bad).is_err(), "{bad}");
    }
    assert!(
        builder
            .clone()
            .max_attempts(0)
            .channel("static:127.0.0.1:1")
            .is_err()
    );
    let budget = tessera_client::RetryBudget {
        window: Duration::from_millis(10),
        ..Default::default()
    };
    assert!(
        builder
            .retry_budget(budget)
            .channel("static:127.0.0.1:1")
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_replica_fails_fast_with_unavailable() {
    let _serial = serial().await;
    // A port with nothing behind it.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let channel = ClientBuilder::plaintext()
        .connect_timeout(Duration::from_secs(1))
        .channel(&format!("static:{addr}"))
        .unwrap();
    let mut client = UserServiceClient::new(channel);
    let start = Instant::now();
    let status = client
        .get_user(GetUserRequest {
            user_id: "u".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // Then at once, until a replica is ready again.
    let start = Instant::now();
    let status = client
        .get_user(GetUserRequest {
            user_id: "u".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_comes_back_gets_calls_within_a_second() {
    let _serial = serial().await;
    let a = Replica::start().await;
    let b = Replica::start().await;
    let channel = ClientBuilder::plaintext()
        .channel(&crate::support::target(&[&a, &b]))
        .unwrap();
    assert!(get_users(&channel, 100, 4).await.is_empty());
    assert!(b.behaviour.gets() > 0, "both replicas serve");

    // B goes away long enough for a doubling backoff to grow past any small cap; calls go on
    // (to A) all the while, which is what drives B's reconnect attempts.
    let b_addr = b.addr;
    b.kill();
    drop(b);
    let down = Instant::now();
    let mut failed = 0;
    while down.elapsed() < Duration::from_secs(6) {
        failed += get_users(&channel, 10, 2).await.len();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        failed, 0,
        "idempotent calls failed while a replica was down"
    );

    let b = Replica::start_at(b_addr).await;
    let back = Instant::now();
    while b.behaviour.gets() == 0 {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "the replica got no call 10 s after it came back"
        );
        assert!(get_users(&channel, 4, 2).await.is_empty());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = back.elapsed();
    println!("the replica that came back got a call after {took:?}");
    // Expected within the 1 s reconnect cap; the bound is loose for a busy CI machine but still
    // catches a longer backoff or a replica shunned for its predecessor's failures (seconds).
    assert!(
        took < Duration::from_secs(3),
        "a replica that came back waited {took:?} for calls"
    );
}
