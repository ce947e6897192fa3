//! Power of two choices over peak-EWMA latency.

use std::time::Duration;

use tessera_client::ClientBuilder;

use crate::support::{Replica, get_users, serial, target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_calls() {
    let _serial = serial().await;
    let replicas = [
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    let channel = ClientBuilder::plaintext()
        .channel(&target(&replicas.iter().collect::<Vec<_>>()))
        .unwrap();

    let failures = get_users(&channel, 3000, 16).await;

    assert!(failures.is_empty(), "{failures:?}");
    let counts: Vec<usize> = replicas.iter().map(|r| r.behaviour.gets()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 3000);
    assert!(counts.iter().all(|&n| n > 600), "unfair split: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replica_gets_few_calls() {
    let _serial = serial().await;
    let replicas = [
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    replicas[2].behaviour.set_delay(Duration::from_millis(20));
    let channel = ClientBuilder::plaintext()
        .channel(&target(&replicas.iter().collect::<Vec<_>>()))
        .unwrap();

    // A steady stream of one call at a time. (With many calls in flight, peak-EWMA rightly
    // sends the slow replica a share whenever the fast ones look queued: its cost is latency ×
    // (calls in flight + 1), and a debug build on a busy machine has fast-call peaks near 20 ms.)
    let failures = get_users(&channel, 3000, 1).await;

    assert!(failures.is_empty(), "{failures:?}");
    let counts: Vec<usize> = replicas.iter().map(|r| r.behaviour.gets()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 3000);
    assert!(
        counts[2] < 300,
        "the slow replica got {} of 3000: {counts:?}",
        counts[2]
    );
}
