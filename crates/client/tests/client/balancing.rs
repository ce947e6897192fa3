//! Power of two choices over peak-EWMA latency.

use std::time::Duration;

use tessera_client::ClientBuilder;

use crate::support::{Replica, get_users, target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_calls() {
    let replicas = [Replica::start().await, Replica::start().await, Replica::start().await];
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
    let replicas = [Replica::start().await, Replica::start().await, Replica::start().await];
    replicas[2].behaviour.set_delay(Duration::from_millis(20));
    let decay: u64 = std::env::var("XDECAY").unwrap().parse().unwrap();
    let workers: usize = std::env::var("XWORKERS").unwrap().parse().unwrap();
    let channel = ClientBuilder::plaintext().peak_ewma(Duration::from_millis(1), Duration::from_millis(decay))
        .channel(&target(&replicas.iter().collect::<Vec<_>>()))
        .unwrap();

    let failures = get_users(&channel, 3000, workers).await;

    assert!(failures.is_empty(), "{failures:?}");
    let counts: Vec<usize> = replicas.iter().map(|r| r.behaviour.gets()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 3000);
    eprintln!("counts {counts:?}");
    assert!(counts[2] < 300, "the slow replica got {} of 3000: {counts:?}", counts[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xlatency() {
    let replicas = [Replica::start().await, Replica::start().await];
    let channel = ClientBuilder::plaintext()
        .channel(&target(&replicas.iter().collect::<Vec<_>>()))
        .unwrap();
    let workers: usize = std::env::var("XWORKERS").unwrap().parse().unwrap();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let mut client = tessera::users::v1::user_service_client::UserServiceClient::new(channel.clone());
        set.spawn(async move {
            let mut v = Vec::new();
            for _ in 0..500 {
                let t = std::time::Instant::now();
                client.get_user(tessera::users::v1::GetUserRequest { user_id: "u".into() }).await.unwrap();
                v.push(t.elapsed().as_micros() as u64);
            }
            v
        });
    }
    let mut all = Vec::new();
    while let Some(v) = set.join_next().await { all.extend(v.unwrap()); }
    all.sort();
    let p = |q: f64| all[((all.len() as f64) * q) as usize];
    eprintln!("p50 {} p90 {} p99 {} p999 {} max {}", p(0.5), p(0.9), p(0.99), p(0.999), all.last().unwrap());
}
