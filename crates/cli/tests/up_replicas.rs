//! `tessera up --replicas`: bad combinations are usage errors naming the setting; on
//! PostgreSQL (when `TESSERA_TEST_DATABASE_URL` is set, else skipped with a printed reason)
//! every replica is its own process, callers balance over all of them, and a replica killed
//! with -9 is started again while calls keep succeeding.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs::File,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use tessera::{
    gateway::v1::{GetPostThreadRequest, feed_service_client::FeedServiceClient},
    posts::v1::{CreatePostRequest, post_service_client::PostServiceClient},
    users::v1::{CreateUserRequest, LoginRequest, user_service_client::UserServiceClient},
};
use tessera_cli::databases::{self, ServerUrl};
use tessera_client::ClientBuilder;
use tessera_mesh::tls::TlsFiles;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const BOUND: Duration = Duration::from_secs(60);

fn wait_bounded(child: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tessera up` with `args` and `database_url` (removed from the environment when `None`),
/// expected to fail at once: its exit code and stderr.
fn up_fails(args: &[&str], database_url: Option<&str>) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(TESSERA);
    cmd.arg("up")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--port-base", "0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(dir.path().join("stderr")).unwrap());
    match database_url {
        Some(url) => cmd.env("DATABASE_URL", url),
        None => cmd.env_remove("DATABASE_URL"),
    };
    let mut child = cmd.spawn().unwrap();
    let status = wait_bounded(&mut child, Duration::from_secs(30)).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tessera up {args:?} did not exit");
    });
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "one line: {stderr}"
    );
    (status.code(), stderr)
}

#[test]
fn replicas_need_a_postgres_database_url_and_a_sane_count() {
    let (code, stderr) = up_fails(&["--replicas", "posts=2"], None);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("--replicas") && stderr.contains("DATABASE_URL"),
        "{stderr}"
    );
    let (code, stderr) = up_fails(&["--replicas", "posts=2"], Some("sqlite://posts.db"));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    for bad in ["posts=many", "posts=0", "blog=2", "posts"] {
        let (code, stderr) = up_fails(&["--replicas", bad], Some("postgres://u@127.0.0.1:1/x"));
        assert_eq!(code, Some(64), "{bad}: {stderr}");
        assert!(stderr.contains("--replicas"), "{bad}: {stderr}");
    }
}

/// Drops the test's databases however the test ends.
struct Databases(Vec<String>);

impl Drop for Databases {
    fn drop(&mut self) {
        let urls = std::mem::take(&mut self.0);
        // May run inside the test's runtime: drop from a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for url in urls {
                    if let Err(e) = databases::drop_database(&url).await {
                        eprintln!("could not drop a test database: {e:#}");
                    }
                }
            });
        })
        .join();
    }
}

/// `tessera up` running; SIGKILLed if the test ends without stopping it.
struct Up(Option<Child>);

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_endpoints(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn posts_pids(endpoints: &Value) -> Vec<u64> {
    endpoints["services"]["posts"]["replicas"]
        .as_array()
        .map(|list| list.iter().filter_map(|r| r["pid"].as_u64()).collect())
        .unwrap_or_default()
}

/// GetPost calls the gateway made to the replica with admin port `admin` (its `/metrics`).
async fn get_posts_from_gateway(admin: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await else {
        return 0;
    };
    let request = b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    let mut body = String::new();
    let read = async {
        stream.write_all(request).await?;
        stream.read_to_string(&mut body).await
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return 0;
    }
    body.lines()
        .filter(|l| {
            l.starts_with("tessera_grpc_server_requests_total{")
                && l.contains("/GetPost\"")
                && l.contains("caller=\"gateway\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn process_exists(pid: u64) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_processes_balanced_over_and_restarted_when_killed() {
    let Ok(url) = std::env::var("TESSERA_TEST_DATABASE_URL") else {
        println!("skipped: TESSERA_TEST_DATABASE_URL not set");
        return;
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let prefix = format!("upreplicas_{}_{nanos}", std::process::id());
    let server = ServerUrl::parse(&url)
        .unwrap()
        .with_prefix(&prefix)
        .unwrap();
    let _databases = Databases(
        databases::OWNERS
            .iter()
            .map(|s| server.service_url(s))
            .collect(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let stdout = tmp.path().join("stdout");
    let child = Command::new(TESSERA)
        .arg("up")
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--port-base", "0", "--replicas", "posts=2"])
        .env("DATABASE_URL", server.url_of(&prefix))
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(tmp.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut up = Up(Some(child));
    let logs = || {
        format!(
            "\n--- stdout\n{}\n--- stderr\n{}",
            std::fs::read_to_string(&stdout).unwrap_or_default(),
            std::fs::read_to_string(tmp.path().join("stderr")).unwrap_or_default()
        )
    };
    let path = data_dir.join("endpoints.json");
    let started = Instant::now();
    let endpoints = loop {
        if let Some(endpoints) = read_endpoints(&path) {
            break endpoints;
        }
        if let Some(status) = up.0.as_mut().unwrap().try_wait().unwrap() {
            panic!("tessera up exited ({status}):{}", logs());
        }
        assert!(started.elapsed() < BOUND, "no endpoints.json:{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Every replica listed, the first one also in the old shape; one process each.
    let posts = &endpoints["services"]["posts"];
    let replicas = posts["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2, "{endpoints}");
    assert_eq!(replicas[0]["grpc"], posts["grpc"]);
    assert_ne!(replicas[0]["grpc"], replicas[1]["grpc"]);
    assert_ne!(replicas[0]["admin"], replicas[1]["admin"]);
    let pids = posts_pids(&endpoints);
    assert_eq!(pids.len(), 2, "{endpoints}");
    assert!(pids.iter().all(|pid| process_exists(*pid)), "{endpoints}");
    let table = std::fs::read_to_string(&stdout).unwrap();
    for shown in ["posts[0]", "posts[1]", &server.database_name("posts")] {
        assert!(table.contains(shown), "the table shows {shown}:{}", logs());
    }
    for service in databases::OWNERS {
        // Created by up: nothing left to create.
        let created = databases::ensure_database(&server.service_url(service))
            .await
            .unwrap();
        assert!(!created, "up created {}", server.database_name(service));
    }

    // A post, written through both replicas' shared database.
    let grpc = |service: &str| endpoints["services"][service]["grpc"].as_str().unwrap();
    let builder = ClientBuilder::mtls_files(
        TlsFiles::in_dir(&data_dir.join("certs/operator")),
        Duration::from_secs(60),
    )
    .unwrap();
    let channel = |target: String| builder.channel(&target).unwrap();
    let mut users = UserServiceClient::new(channel(format!("static:{}", grpc("users"))));
    users
        .create_user(CreateUserRequest {
            username: "failover".into(),
            email: "failover@example.com".into(),
            password: "correct horse battery".into(),
            display_name: "Failover".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let token = users
        .login(LoginRequest {
            username: "failover".into(),
            password: "correct horse battery".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    let both: Vec<&str> = replicas
        .iter()
        .map(|r| r["grpc"].as_str().unwrap())
        .collect();
    let mut posts_client = PostServiceClient::new(channel(format!("static:{}", both.join(","))));
    // The gateway caches posts, so every read below is of a post it has not read yet: only
    // then does its GetPost reach a posts replica.
    let mut create = async |i: usize| -> String {
        let mut request = tonic::Request::new(CreatePostRequest {
            title: format!("watch failover {i}"),
            body: "kill -9 a replica".into(),
            tags: vec![],
            request_id: format!("failover-{i}"),
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        posts_client
            .create_post(request)
            .await
            .unwrap()
            .into_inner()
            .post
            .unwrap()
            .post_id
    };

    // The gateway reads them through posts; kill -9 one posts replica and it still does.
    let mut feed = FeedServiceClient::new(channel(format!("static:{}", grpc("gateway"))));
    let thread = async |feed: &mut FeedServiceClient<tessera_client::Channel>, post_id: &str| {
        feed.get_post_thread(GetPostThreadRequest {
            post_id: post_id.to_owned(),
            comment_page_size: 10,
        })
        .await
    };
    // The gateway balances over both replicas.
    let admins: Vec<&str> = replicas
        .iter()
        .map(|r| r["admin"].as_str().unwrap())
        .collect();
    let mut calls = 0;
    loop {
        let post_id = create(calls).await;
        thread(&mut feed, &post_id).await.unwrap();
        calls += 1;
        if calls % 10 == 0 {
            let mut served = Vec::new();
            for admin in &admins {
                served.push(get_posts_from_gateway(admin).await);
            }
            if served.iter().all(|n| *n > 0) {
                break;
            }
            assert!(
                calls < 500,
                "after {calls} calls the replicas served {served:?}"
            );
        }
    }
    // Written while both replicas run, read after one is gone.
    let mut unread = Vec::new();
    for i in 0..20 {
        unread.push(create(calls + i).await);
    }
    let killed = Command::new("kill")
        .args(["-9", &pids[1].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for (i, post_id) in unread.iter().enumerate() {
        thread(&mut feed, post_id)
            .await
            .unwrap_or_else(|s| panic!("GetPostThread {i} after kill -9 of posts[1]: {s:?}"));
    }

    // up starts it again: a new process on the same ports, ready.
    let restarted = Instant::now();
    loop {
        let now = read_endpoints(&path).map(|e| posts_pids(&e));
        let table = std::fs::read_to_string(&stdout).unwrap();
        if let Some(now) = &now
            && now.len() == 2
            && now[0] == pids[0]
            && now[1] != pids[1]
            && table.contains("posts[1] ready again")
        {
            break;
        }
        assert!(
            restarted.elapsed() < BOUND,
            "posts[1] not restarted ({now:?}):{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let admin = replicas[1]["admin"].as_str().unwrap();
    let status = tessera_cli::probe::probe(admin, "readiness", Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(status, "SERVING");
    let post_id = create(calls + unread.len()).await;
    thread(&mut feed, &post_id).await.unwrap();
    let pids = posts_pids(&read_endpoints(&path).unwrap());

    // SIGTERM stops up and every replica.
    let mut child = up.0.take().unwrap();
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = wait_bounded(&mut child, Duration::from_secs(30)).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tessera up did not stop:{}", logs());
    });
    assert!(status.success(), "{status}:{}", logs());
    for pid in pids {
        assert!(!process_exists(pid), "replica {pid} outlived up");
    }
}
