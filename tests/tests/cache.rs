//! The gateway's cache of posts and profiles, end to end: once it serves a thread, a change
//! made behind the gateway's back (straight to PostService, as another gateway replica would)
//! reaches readers within a bound, a write through the gateway is read back at once, and
//! emails are shown to their owners only.
#![allow(clippy::unwrap_used)]

use tessera::{
    comments::v1::CreateCommentRequest,
    gateway::v1::{GetPostThreadRequest, GetPostThreadResponse},
    posts::v1::{
        CreatePostRequest, DeletePostRequest, Post, UpdatePostRequest,
        post_service_client::PostServiceClient,
    },
};
use tessera_tests::{TestMesh, TestUser, bearer, eventually, spawn_mesh};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, Status, transport::Channel};

async fn thread(
    mesh: &TestMesh,
    reader: Option<&TestUser>,
    post_id: &str,
) -> Result<GetPostThreadResponse, Status> {
    let message = GetPostThreadRequest {
        post_id: post_id.into(),
        comment_page_size: 0,
    };
    let request = match reader {
        Some(user) => bearer(&user.token, message),
        None => Request::new(message),
    };
    Ok(mesh.feed().get_post_thread(request).await?.into_inner())
}

async fn create_post(mesh: &TestMesh, author: &TestUser, title: &str, body: &str) -> Post {
    let request = CreatePostRequest {
        title: title.into(),
        body: body.into(),
        ..Default::default()
    };
    let created = mesh
        .posts()
        .create_post(bearer(&author.token, request))
        .await;
    created.unwrap().into_inner().post.unwrap()
}

async fn comment(mesh: &TestMesh, author: &TestUser, post_id: &str, body: &str) {
    let request = CreateCommentRequest {
        post_id: post_id.into(),
        body: body.into(),
        request_id: String::new(),
    };
    let created = mesh
        .comments()
        .create_comment(bearer(&author.token, request))
        .await;
    created.unwrap();
}

fn title(reply: &GetPostThreadResponse) -> &str {
    &reply.post.as_ref().unwrap().title
}

/// GetPost calls the gateway made to PostService so far, from PostService's `/metrics`.
async fn get_posts_by_gateway(mesh: &TestMesh) -> u64 {
    let mut admin = tokio::net::TcpStream::connect(mesh.admin_addr("posts"))
        .await
        .unwrap();
    admin
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    admin.read_to_string(&mut text).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("tessera_grpc_server_requests_total{"))
        .filter(|l| l.contains("PostService/GetPost\"") && l.contains("caller=\"gateway\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Retitles `post` as `user` through `posts` (the gateway's public port or PostService
/// itself); returns the post as updated.
async fn update(
    posts: &mut PostServiceClient<Channel>,
    user: &TestUser,
    post: &Post,
    title: &str,
) -> Post {
    let request = UpdatePostRequest {
        post: Some(Post {
            title: title.into(),
            ..post.clone()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["title".into()],
        }),
        etag: post.etag.clone(),
    };
    posts
        .update_post(bearer(&user.token, request))
        .await
        .unwrap()
        .into_inner()
        .post
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_cache_follows_changes_and_keeps_emails_private() {
    let mesh = spawn_mesh().await;
    let alice = mesh.sign_up("alice", "Alice").await;
    let bob = mesh.sign_up("bob", "Bob").await;
    let post = create_post(&mesh, &alice, "First", "Hello.").await;
    comment(&mesh, &bob, &post.post_id, "Hi Alice").await;

    // The cache serves threads once the gateway follows the owners' events: two reads cost
    // at most one GetPost.
    eventually!({
        let before = get_posts_by_gateway(&mesh).await;
        thread(&mesh, None, &post.post_id).await?;
        thread(&mesh, None, &post.post_id).await?;
        get_posts_by_gateway(&mesh).await - before < 2
    });

    // Emails: each reader sees their own and nobody else's, whatever the cache holds.
    for _ in 0..2 {
        let anonymous = thread(&mesh, None, &post.post_id).await.unwrap();
        assert_eq!(anonymous.author.as_ref().unwrap().email, "");
        assert_eq!(anonymous.comments[0].author.as_ref().unwrap().email, "");
        let as_bob = thread(&mesh, Some(&bob), &post.post_id).await.unwrap();
        assert_eq!(as_bob.author.as_ref().unwrap().email, "");
        assert_eq!(
            as_bob.comments[0].author.as_ref().unwrap().email,
            "bob@example.com"
        );
        let as_alice = thread(&mesh, Some(&alice), &post.post_id).await.unwrap();
        assert_eq!(as_alice.author.as_ref().unwrap().email, "alice@example.com");
        assert_eq!(as_alice.comments[0].author.as_ref().unwrap().email, "");
    }

    // An edit made straight at PostService (as through another gateway replica) reaches
    // the gateway's readers through its event.
    let mut internal =
        PostServiceClient::new(mesh.internal_channel("gateway", "posts").await.unwrap());
    let edited = update(&mut internal, &alice, &post, "Edited elsewhere").await;
    eventually!(title(&thread(&mesh, None, &post.post_id).await?) == "Edited elsewhere");

    // A write through the gateway is read back by the writer at once.
    assert_eq!(
        title(&thread(&mesh, Some(&alice), &post.post_id).await.unwrap()),
        "Edited elsewhere"
    );
    let mut public = mesh.posts();
    update(&mut public, &alice, &edited, "Edited here").await;
    assert_eq!(
        title(&thread(&mesh, Some(&alice), &post.post_id).await.unwrap()),
        "Edited here"
    );

    // A deletion made elsewhere, likewise.
    internal
        .delete_post(bearer(
            &alice.token,
            DeletePostRequest {
                post_id: post.post_id.clone(),
            },
        ))
        .await
        .unwrap();
    eventually!(
        thread(&mesh, None, &post.post_id)
            .await
            .is_err_and(|s| s.code() == Code::NotFound)
    );
    mesh.shutdown().await;
}

/// The process's CPU time so far (every thread: here, the whole mesh and the client).
fn cpu_time() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    std::time::Duration::from_millis(ticks * 10)
}

/// Not a check: the mesh's CPU per GetPostThread (a post with ten comments by two authors),
/// FeedService without and with the cache, alternating in one process that runs the whole
/// mesh, so both see the same machine. Run by hand:
/// `cargo test -p tessera-tests --test cache -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn measure_get_post_thread_cpu() {
    use tessera::{
        comments::v1::comment_service_client::CommentServiceClient,
        gateway::v1::{
            feed_service_client::FeedServiceClient, feed_service_server::FeedServiceServer,
        },
        users::v1::user_service_client::UserServiceClient,
    };
    use tessera_gateway::{Cache, Feed, cache};
    use tessera_mesh::tls::{ClientTls, TlsFiles, TlsSource};

    const CALLS: u32 = 300;
    let mesh = spawn_mesh().await;
    let alice = mesh.sign_up("alice", "Alice").await;
    let bob = mesh.sign_up("bob", "Bob").await;
    let carol = mesh.sign_up("carol", "Carol").await;
    let post = create_post(&mesh, &alice, "Measured", &"x".repeat(500)).await;
    for i in 0..10 {
        let author = if i % 2 == 0 { &bob } else { &carol };
        comment(&mesh, author, &post.post_id, &format!("comment {i}")).await;
    }

    // FeedService as the gateway runs it, over mTLS to the internal ports.
    let tls = TlsSource::load(TlsFiles::in_dir(&mesh.certs_dir().join("gateway"))).unwrap();
    let builder = tessera_client::ClientBuilder::mtls(ClientTls::from(tls));
    let channel = |service: &str| {
        builder
            .channel_to(service, &format!("static:{}", mesh.grpc_addr(service)))
            .unwrap()
    };
    let plain = Feed::new(
        PostServiceClient::new(channel("posts")),
        CommentServiceClient::new(channel("comments")),
        UserServiceClient::new(channel("users")),
    );
    let cache = Cache::new(Default::default());
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(cache::follow_post_events(
        cache.clone(),
        PostServiceClient::new(channel("posts")),
        stopped.clone(),
    ));
    tokio::spawn(cache::follow_user_events(
        cache.clone(),
        UserServiceClient::new(channel("users")),
        stopped,
    ));
    let cached = plain.clone().with_cache(cache.clone());
    eventually!(cache.posts_live() && cache.users_live());
    let client = |feed: Feed| {
        FeedServiceClient::new(tessera_client::Channel::from_service(
            FeedServiceServer::new(feed),
        ))
    };
    let feeds = [
        ("without cache", client(plain)),
        ("with cache", client(cached)),
    ];
    let request = || GetPostThreadRequest {
        post_id: post.post_id.clone(),
        comment_page_size: 0,
    };

    let mut totals = [std::time::Duration::ZERO; 2];
    for round in 0..5 {
        for (i, (name, feed)) in feeds.iter().enumerate() {
            let mut feed = feed.clone();
            let (cpu, wall) = (cpu_time(), std::time::Instant::now());
            for _ in 0..CALLS {
                let reply = feed.get_post_thread(request()).await.unwrap().into_inner();
                assert_eq!(reply.comments.len(), 10);
            }
            let cpu = cpu_time() - cpu;
            // The first round warms connections and the cache up.
            if round > 0 {
                totals[i] += cpu;
            }
            println!(
                "round {round} {name}: {:.0} µs CPU/call, {:.0} µs wall/call",
                cpu.as_micros() as f64 / f64::from(CALLS),
                wall.elapsed().as_micros() as f64 / f64::from(CALLS)
            );
        }
    }
    println!(
        "CPU per call, rounds 1-4: without {:.0} µs, with {:.0} µs, ratio {:.2}; {:?}",
        totals[0].as_micros() as f64 / f64::from(4 * CALLS),
        totals[1].as_micros() as f64 / f64::from(4 * CALLS),
        totals[1].as_secs_f64() / totals[0].as_secs_f64(),
        cache.stats()
    );
    mesh.shutdown().await;
}
