//! Retries: idempotent methods only, on UNAVAILABLE or a lost connection, under the budget.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tessera::users::v1::{
    CreateUserRequest, GetUserRequest, user_service_client::UserServiceClient,
};
use tessera_client::{ClientBuilder, RetryBudget};
use tokio::task::JoinSet;
use tonic::Code;

use tessera_testing::eventually;

use crate::support::{Replica, get_users, serial, target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_fails_no_idempotent_call() {
    let _serial = serial().await;
    let replicas = [
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    for replica in &replicas {
        // Calls in flight when the replica dies.
        replica.behaviour.set_delay(Duration::from_millis(2));
    }
    let channel = ClientBuilder::plaintext()
        .channel(&target(&replicas.iter().collect::<Vec<_>>()))
        .unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..8 {
        let mut client = UserServiceClient::new(channel.clone());
        let (done, calls) = (done.clone(), calls.clone());
        workers.spawn(async move {
            let mut failures = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let request = GetUserRequest {
                    user_id: "u".into(),
                };
                if let Err(status) = client.get_user(request).await {
                    failures.push(status);
                }
                calls.fetch_add(1, Ordering::SeqCst);
            }
            failures
        });
    }

    eventually!(replicas[0].behaviour.gets() > 100, Duration::from_secs(10));
    replicas[0].kill();
    let killed_at = calls.load(Ordering::SeqCst);
    eventually!(
        calls.load(Ordering::SeqCst) > killed_at + 1500,
        Duration::from_secs(20)
    );
    let dead_count = replicas[0].behaviour.gets();
    let before = calls.load(Ordering::SeqCst);
    eventually!(
        calls.load(Ordering::SeqCst) > before + 300,
        Duration::from_secs(20)
    );
    done.store(true, Ordering::SeqCst);

    let mut failures = Vec::new();
    while let Some(result) = workers.join_next().await {
        failures.extend(result.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(
        replicas[0].behaviour.gets(),
        dead_count,
        "a dead replica got calls"
    );
    assert!(replicas[1].behaviour.gets() > 300 && replicas[2].behaviour.gets() > 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_replica_is_retried_around_for_idempotent_methods_only() {
    let _serial = serial().await;
    let replicas = [
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    replicas[0].behaviour.set_unavailable(true);
    let channel = ClientBuilder::plaintext()
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(2))
        .channel(&target(&replicas.iter().collect::<Vec<_>>()))
        .unwrap();

    // GetUser (NO_SIDE_EFFECTS): every call succeeds somewhere.
    let failures = get_users(&channel, 300, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        replicas[0].behaviour.gets() > 0,
        "the failing replica was never tried"
    );

    // CreateUser (no idempotency level), every replica refusing: each call reaches exactly one
    // replica, once, and its caller sees the refusal.
    for replica in &replicas {
        replica.behaviour.set_unavailable(true);
    }
    let mut client = UserServiceClient::new(channel.clone());
    for _ in 0..150 {
        let status = client
            .create_user(CreateUserRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let creates: usize = replicas.iter().map(|r| r.behaviour.creates()).sum();
    assert_eq!(creates, 150, "a non-idempotent call was retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget() {
    let _serial = serial().await;
    let replicas = [
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    for replica in &replicas {
        replica.behaviour.set_unavailable(true);
    }
    // One retry per five calls, plus a reserve of 1/s over 10 s: at most 300 / 5 + 10.
    let budget = RetryBudget {
        ratio: 0.2,
        min_per_second: 1,
        window: Duration::from_secs(10),
    };
    let channel = ClientBuilder::plaintext()
        .retry_budget(budget)
        .max_attempts(3)
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(2))
        .channel(&target(&replicas.iter().collect::<Vec<_>>()))
        .unwrap();

    let failures = get_users(&channel, 300, 4).await;

    assert_eq!(failures.len(), 300);
    assert!(
        failures.iter().all(|s| s.code() == Code::Unavailable),
        "{:?}",
        failures[0]
    );
    let served: usize = replicas.iter().map(|r| r.behaviour.gets()).sum();
    let retries = served - 300;
    assert!(retries <= 70, "{retries} retries exceed the budget of 70");
    // Without a budget there would be 600 (three tries each); the budget was spent, not ignored.
    assert!(
        retries >= 60,
        "only {retries} retries: the budget was not used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_replay_limit_are_sent_once() {
    let _serial = serial().await;
    let replica = Replica::start().await;
    replica.behaviour.set_unavailable(true);
    let channel = ClientBuilder::plaintext()
        .max_replay_bytes(64)
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(2))
        .channel(&target(&[&replica]))
        .unwrap();
    let mut client = UserServiceClient::new(channel);

    let small = GetUserRequest {
        user_id: "u".into(),
    };
    let status = client.get_user(small).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        replica.behaviour.gets(),
        3,
        "a small idempotent call gets three tries"
    );

    let large = GetUserRequest {
        user_id: "u".repeat(1000),
    };
    let status = client.get_user(large).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        replica.behaviour.gets(),
        4,
        "a large one is streamed through once"
    );

    // And it arrives whole.
    replica.behaviour.set_unavailable(false);
    let large = GetUserRequest {
        user_id: "u".repeat(1000),
    };
    let user = client
        .get_user(large)
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.user_id.len(), 1000);
}

/// A replica that answers every call with a response's headers and then sends none of its
/// body: after `cut_after`, it closes the connection (a process that died mid-response); without,
/// it stays silent. Counts the calls it got.
struct CutsAfterHeaders {
    addr: std::net::SocketAddr,
    calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CutsAfterHeaders {
    async fn start(cut_after: Option<Duration>) -> Self {
        use http_body_util::StreamBody;
        use hyper_util::rt::{TokioExecutor, TokioIo};

        type Never = futures::stream::Pending<
            Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let cut = Arc::new(tokio::sync::Notify::new());
                    let cut_later = cut.clone();
                    let service = hyper::service::service_fn(move |_request| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        if let Some(after) = cut_after {
                            let cut = cut_later.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(after).await;
                                cut.notify_one();
                            });
                        }
                        let response = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(StreamBody::new(futures::stream::pending() as Never))
                            .unwrap();
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service);
                    // Dropping the connection closes the socket.
                    tokio::select! {
                        _ = connection => {}
                        () = cut.notified() => {}
                    }
                });
            }
        });
        CutsAfterHeaders { addr, calls, task }
    }
}

impl Drop for CutsAfterHeaders {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_call_cut_after_its_headers_goes_again_elsewhere() {
    let _serial = serial().await;
    // Long enough for the headers to arrive first, on any loaded machine.
    let cutter = CutsAfterHeaders::start(Some(Duration::from_millis(50))).await;

    // Alone, the cut shows as a lost connection (UNAVAILABLE), after every try.
    let alone = ClientBuilder::plaintext()
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(2))
        .channel(&format!("static:{}", cutter.addr))
        .unwrap();
    let status = UserServiceClient::new(alone.clone())
        .get_user(GetUserRequest {
            user_id: "u".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("while a response was read"),
        "{status:?}"
    );
    assert_eq!(cutter.calls.load(Ordering::SeqCst), 3, "three tries");
    // A call with no idempotency level sees the same status, after one try.
    let status = UserServiceClient::new(alone.clone())
        .create_user(CreateUserRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        cutter.calls.load(Ordering::SeqCst),
        4,
        "a create is not retried"
    );

    // Beside a healthy replica, every GetUser the cut one took is answered by the other.
    let healthy = Replica::start().await;
    let channel = ClientBuilder::plaintext()
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(2))
        .channel(&format!("static:{},{}", cutter.addr, healthy.addr))
        .unwrap();
    let mut client = UserServiceClient::new(channel);
    let before = cutter.calls.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    let mut calls = 0;
    while cutter.calls.load(Ordering::SeqCst) < before + 3 {
        assert!(
            calls < 2000 && started.elapsed() < Duration::from_secs(30),
            "the cut replica got {} of {calls} calls",
            cutter.calls.load(Ordering::SeqCst) - before
        );
        let reply = client
            .get_user(GetUserRequest {
                user_id: "u".into(),
            })
            .await;
        assert!(reply.is_ok(), "call {calls}: {reply:?}");
        calls += 1;
    }
    // The cut replica answers nothing, so every reply came from the healthy one. (Not "at
    // least three": one call may be cut twice before its third try reaches the healthy one.)
    assert_eq!(healthy.behaviour.gets(), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_replica_silent_after_its_headers_ends_at_its_deadline() {
    let _serial = serial().await;
    let silent = CutsAfterHeaders::start(None).await;
    let channel = ClientBuilder::plaintext()
        .timeout(Duration::from_millis(300))
        .channel(&format!("static:{}", silent.addr))
        .unwrap();
    let started = std::time::Instant::now();
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        UserServiceClient::new(channel.clone()).get_user(GetUserRequest {
            user_id: "u".into(),
        }),
    )
    .await
    .expect("the call's deadline bounds a body that never comes")
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The same for a call with no idempotency level, sent once.
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        UserServiceClient::new(channel).create_user(CreateUserRequest::default()),
    )
    .await
    .expect("the call's deadline bounds a body that never comes")
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(silent.calls.load(Ordering::SeqCst), 2);
}
