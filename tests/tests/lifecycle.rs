//! Replicas that start and stop while others call them: a fresh replica with users paused
//! serves its first calls (they wait for the signing keys instead of failing), and a replica
//! with a consumer attached to its event stream drains in the drain delay, not the drain
//! timeout, while the consumer moves to another replica.
//!
//! The services are the real ones (`tessera_cli::wiring::start`, what `tessera serve` runs),
//! each with its own ports and shutdown, on loopback with certificates from a fresh CA.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tessera::{
    comments::v1::{
        CreateCommentRequest, ListCommentsRequest, comment_service_client::CommentServiceClient,
    },
    posts::v1::{CreatePostRequest, DeletePostRequest, post_service_client::PostServiceClient},
    users::v1::{CreateUserRequest, LoginRequest, user_service_client::UserServiceClient},
};
use tessera_mesh::{
    config::Settings,
    identity::SpiffeId,
    server::Listeners,
    shutdown::{Shutdown, ShutdownTrigger},
    tls::{TlsFiles, TlsSource},
};
use tessera_tests::{BOUND, PASSWORD, bearer, connect_tls, eventually};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::Channel;

/// Short enough for a quick test, long enough to tell "ended by the drain" from "ended at
/// once"; the drain timeout is far longer, so a stream that holds the drain shows.
const DRAIN_DELAY: Duration = Duration::from_millis(500);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Certificates for every workload under a temporary directory, and the services started
/// from it.
struct Topology {
    dir: tempfile::TempDir,
    certs: PathBuf,
}

/// One running service.
struct Node {
    grpc: SocketAddr,
    admin: SocketAddr,
    trigger: ShutdownTrigger,
    task: JoinHandle<anyhow::Result<()>>,
}

/// A service's ports, bound before it starts (so others can be pointed at them).
struct Bound {
    grpc: TcpListener,
    admin: TcpListener,
}

async fn bind() -> Bound {
    Bound {
        grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    }
}

impl Topology {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-lifecycle-")
            .tempdir()
            .unwrap();
        let certs = dir.path().join("certs");
        let (ca, fresh) = tessera_cli::certs::load_or_create_ca(&certs).unwrap();
        for name in ["users", "posts", "comments", "gateway"] {
            let id = SpiffeId::new(
                "tessera.local",
                tessera_mesh::identity::DEFAULT_NAMESPACE,
                name,
            )
            .unwrap();
            tessera_cli::certs::ensure_workload_cert(&ca, &certs, &id, fresh).unwrap();
        }
        Self { dir, certs }
    }

    /// Starts `name` on `bound` with `targets` as its upstreams; every service of one name
    /// shares a data dir, so replicas share their SQLite database.
    async fn start(&self, name: &str, bound: Bound, targets: &[(&str, String)]) -> Node {
        let (grpc, admin) = (
            bound.grpc.local_addr().unwrap(),
            bound.admin.local_addr().unwrap(),
        );
        let mut env = BTreeMap::from([
            ("TESSERA_GRPC_ADDR".to_owned(), grpc.to_string()),
            ("TESSERA_ADMIN_ADDR".to_owned(), admin.to_string()),
            (
                "TESSERA_DATA_DIR".to_owned(),
                self.dir.path().join("data").display().to_string(),
            ),
            (
                "TESSERA_TLS_DIR".to_owned(),
                self.certs.join(name).display().to_string(),
            ),
            (
                "TESSERA_DRAIN_DELAY_MS".to_owned(),
                DRAIN_DELAY.as_millis().to_string(),
            ),
            (
                "TESSERA_DRAIN_TIMEOUT_MS".to_owned(),
                DRAIN_TIMEOUT.as_millis().to_string(),
            ),
        ]);
        for (upstream, target) in targets {
            env.insert(
                format!("TESSERA_{}_TARGET", upstream.to_ascii_uppercase()),
                target.clone(),
            );
        }
        // Nothing from the process environment: this topology is the whole configuration.
        let settings = Settings::from_lookup(name, &|key| env.get(key).cloned()).unwrap();
        let (trigger, shutdown) = Shutdown::new();
        let listeners = Listeners {
            grpc: bound.grpc,
            admin: bound.admin,
            public: None,
        };
        let task = tessera_cli::wiring::start(settings, listeners, shutdown)
            .await
            .unwrap_or_else(|e| panic!("{name} did not start: {e:#}"));
        Node {
            grpc,
            admin,
            trigger,
            task,
        }
    }

    /// A channel to `addr` presenting `workload`'s certificate.
    async fn channel(&self, workload: &str, addr: SocketAddr) -> Channel {
        let tls = TlsSource::load(TlsFiles::in_dir(&self.certs.join(workload))).unwrap();
        connect_tls(addr, tls.client_config()).await.unwrap()
    }

    /// Signs up a user on `users` (as the gateway does) and returns its access token.
    async fn token(&self, users: SocketAddr, username: &str) -> String {
        let mut users = UserServiceClient::new(self.channel("gateway", users).await);
        users
            .create_user(CreateUserRequest {
                username: username.into(),
                email: format!("{username}@example.com"),
                password: PASSWORD.into(),
                display_name: username.into(),
                request_id: String::new(),
            })
            .await
            .unwrap();
        users
            .login(LoginRequest {
                username: username.into(),
                password: PASSWORD.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .access_token
    }
}

impl Node {
    async fn readiness(&self) -> String {
        tessera_cli::probe::probe(&self.admin.to_string(), "readiness", Duration::from_secs(2))
            .await
            .unwrap_or_else(|e| e)
    }

    /// Fires the shutdown and waits (under [`BOUND`]) for the service to stop; returns how
    /// long that took.
    async fn stop(self) -> Duration {
        let started = Instant::now();
        self.trigger.trigger();
        tokio::time::timeout(BOUND, self.task)
            .await
            .expect("the service did not stop")
            .unwrap()
            .unwrap();
        started.elapsed()
    }
}

/// A TCP forwarder that can be paused: while paused it accepts connections but forwards
/// nothing, so a service behind it looks like a stopped process (SIGSTOP).
struct Pausable {
    addr: SocketAddr,
    paused: watch::Sender<bool>,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Pausable {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let paused = watch::Sender::new(false);
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let paused = paused.clone();
            let accepted = accepted.clone();
            async move {
                // Aborting this task aborts every forwarded connection with it.
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((mut inbound, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let mut paused = paused.subscribe();
                    connections.spawn(async move {
                        if paused.wait_for(|p| !*p).await.is_err() {
                            return;
                        }
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await
                        else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                    while connections.try_join_next().is_some() {}
                }
            }
        });
        Self {
            addr,
            paused,
            accepted,
            task,
        }
    }

    fn pause(&self, on: bool) {
        self.paused.send_replace(on);
    }
}

impl Drop for Pausable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn create_post(token: &str, title: &str) -> tonic::Request<CreatePostRequest> {
    bearer(
        token,
        CreatePostRequest {
            title: title.into(),
            body: "body".into(),
            ..CreatePostRequest::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_replica_with_users_paused_serves_its_first_calls() {
    let topology = Topology::new();
    let users = topology.start("users", bind().await, &[]).await;
    let token = topology.token(users.grpc, "first_caller").await;
    let users_link = Pausable::start(users.grpc).await;

    // A new posts replica comes up while users does not answer: it cannot have the keys.
    users_link.pause(true);
    let posts = topology
        .start(
            "posts",
            bind().await,
            &[("users", format!("static:{}", users_link.addr))],
        )
        .await;
    assert_eq!(
        posts.readiness().await,
        "NOT_SERVING",
        "ready without signing keys"
    );

    // Its first 50 calls arrive at once (a load balancer that does not look at readiness).
    let client = PostServiceClient::new(topology.channel("gateway", posts.grpc).await);
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..50 {
        let mut client = client.clone();
        let request = create_post(&token, &format!("first call {i}"));
        calls.spawn(async move { client.create_post(request).await });
    }
    // The key fetch is held at the paused link; users stays stopped a while longer, with
    // every call waiting for that fetch.
    eventually(BOUND, async || {
        anyhow::ensure!(
            users_link.accepted.load(Ordering::SeqCst) > 0,
            "no fetch yet"
        );
        Ok(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        calls.try_join_next().is_none(),
        "a call finished while users was paused"
    );
    users_link.pause(false);

    let mut failed = Vec::new();
    let mut ok = 0;
    while let Some(result) = calls.join_next().await {
        match result.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => failed.push(status),
        }
    }
    println!(
        "50 first calls with users paused: {ok} ok, {} failed, the last after {:?}",
        failed.len(),
        started.elapsed()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(ok, 50);
    eventually(BOUND, async || {
        let status = posts.readiness().await;
        anyhow::ensure!(status == "SERVING", "readiness is {status}");
        Ok(())
    })
    .await;

    posts.stop().await;
    users.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_consumer_attached_drains_in_the_drain_delay() {
    let topology = Topology::new();
    let users = topology.start("users", bind().await, &[]).await;
    let token = topology.token(users.grpc, "commenter").await;
    let users_target = ("users", format!("static:{}", users.grpc));

    // Two posts replicas on one database; B's ports are bound now and it starts later, so
    // comments' event stream is first attached to A.
    let (bound_a, bound_b) = (bind().await, bind().await);
    let posts_target = (
        "posts",
        format!(
            "static:{},{}",
            bound_a.grpc.local_addr().unwrap(),
            bound_b.grpc.local_addr().unwrap()
        ),
    );
    let posts_a = topology
        .start("posts", bound_a, std::slice::from_ref(&users_target))
        .await;
    let comments = topology
        .start(
            "comments",
            bind().await,
            &[users_target.clone(), posts_target],
        )
        .await;
    let mut comments_client =
        CommentServiceClient::new(topology.channel("gateway", comments.grpc).await);

    // A post with a comment, deleted on A: the comment goes with it once comments' consumer
    // (attached to A's WatchEvents) applies the event.
    let mut cascade = async |posts: SocketAddr, title: &str| -> Duration {
        let mut posts = PostServiceClient::new(topology.channel("gateway", posts).await);
        let post = posts
            .create_post(create_post(&token, title))
            .await
            .unwrap()
            .into_inner()
            .post
            .unwrap();
        comments_client
            .create_comment(bearer(
                &token,
                CreateCommentRequest {
                    post_id: post.post_id.clone(),
                    body: "first".into(),
                    request_id: String::new(),
                },
            ))
            .await
            .unwrap();
        let deleted = Instant::now();
        posts
            .delete_post(bearer(
                &token,
                DeletePostRequest {
                    post_id: post.post_id.clone(),
                },
            ))
            .await
            .unwrap();
        let mut comments_client = comments_client.clone();
        eventually(BOUND, async || {
            let listed = comments_client
                .list_comments(ListCommentsRequest {
                    post_id: post.post_id.clone(),
                    ..ListCommentsRequest::default()
                })
                .await;
            match listed {
                Ok(page) if !page.get_ref().comments.is_empty() => {
                    anyhow::bail!("the comment is still there")
                }
                Ok(_) => Ok(()),
                Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
                Err(status) => anyhow::bail!("ListComments: {status:?}"),
            }
        })
        .await;
        deleted.elapsed()
    };
    let took = cascade(posts_a.grpc, "on A").await;
    println!("cascade through A: {took:?}");

    let posts_b = topology
        .start("posts", bound_b, std::slice::from_ref(&users_target))
        .await;
    let b = posts_b.grpc;
    eventually(BOUND, async || {
        let status = posts_b.readiness().await;
        anyhow::ensure!(status == "SERVING", "B's readiness is {status}");
        Ok(())
    })
    .await;

    // A stops with the consumer's stream open: the stream is ended after the drain delay,
    // so A is gone well before its drain timeout.
    let stopped = posts_a.stop().await;
    println!("posts A stopped {stopped:?} after its shutdown (drain delay {DRAIN_DELAY:?})");
    assert!(
        stopped < DRAIN_DELAY + Duration::from_secs(2),
        "a replica with a consumer attached took {stopped:?} to stop"
    );

    // The consumer follows B now: a post deleted there takes its comment with it.
    let took = cascade(b, "on B").await;
    println!("cascade through B after A drained: {took:?}");

    comments.stop().await;
    posts_b.stop().await;
    users.stop().await;
}
