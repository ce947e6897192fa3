//! The public port as `tessera_gateway::public_service` composes it (the same function the
//! binary serves), over fake upstreams: FeedService through the proxy, the edge's own size
//! limit, downstream codes kept, health and reflection beside the proxy, and streams whose
//! client stops reading cut off without holding their upstream.

use std::{
    collections::HashMap,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tessera::{
    comments::v1::comment_service_server::CommentServiceServer,
    gateway::v1::{GetPostThreadRequest, feed_service_client::FeedServiceClient},
    notifications::v1::{
        ListNotificationsRequest, ListNotificationsResponse, MarkNotificationsReadRequest,
        MarkNotificationsReadResponse, Notification, SubscribeNotificationsRequest,
        SubscribeNotificationsResponse,
        notification_service_client::NotificationServiceClient,
        notification_service_server::{NotificationService, NotificationServiceServer},
    },
    posts::v1::{
        CreatePostRequest, GetPostRequest, Post, post_service_client::PostServiceClient,
        post_service_server::PostServiceServer,
    },
    users::v1::user_service_server::UserServiceServer,
};
use tessera_client::Channel;
use tessera_gateway::{
    ClientAddr, EdgeLimits, Quota, RateLimits, SizeLimits, Upstreams, public_service,
};
use tessera_mesh::{
    auth::TokenKeys,
    token::{DEFAULT_TOKEN_TTL, Signer, Verifier},
};
use tonic::{Code, Request, Response, Status, body::Body};

use crate::fakes::{Calls, FakeComments, FakePosts, FakeUsers, comment, user};

/// The token each users call ran under (the call context downstream clients forward).
type SeenTokens = Arc<Mutex<Vec<Option<String>>>>;

/// Wraps a channel, recording the call context's token of each call.
fn recording(inner: Channel, seen: SeenTokens) -> Channel {
    Channel::from_service(tower::service_fn(move |req: http::Request<Body>| {
        let token = tessera_mesh::context::current()
            .and_then(|c| c.token)
            .map(|t| t.to_string());
        seen.lock().unwrap().push(token);
        let mut inner = inner.clone();
        async move { tower::Service::call(&mut inner, req).await }
    }))
}

struct Setup {
    public: Channel,
    /// The same service, for calls whose response bodies the test holds unread.
    service: tessera_mesh::server::GrpcService,
    calls: Arc<Calls>,
    /// When set, PostService answers every call with this code.
    posts_fail: Arc<Mutex<Option<Code>>>,
    user_tokens: SeenTokens,
    signer: Signer,
    stream_dropped: Arc<tokio::sync::Notify>,
}

fn setup(rates: RateLimits, sizes: SizeLimits) -> Setup {
    let calls = Arc::new(Calls::default());
    let posts = FakePosts {
        calls: calls.clone(),
        posts: Mutex::new(HashMap::from([
            (
                "p1".to_owned(),
                Post {
                    post_id: "p1".into(),
                    author_id: "alice".into(),
                    title: "hello".into(),
                    ..Default::default()
                },
            ),
            (
                "big".to_owned(),
                Post {
                    post_id: "big".into(),
                    author_id: "alice".into(),
                    body: "x".repeat(40_000),
                    ..Default::default()
                },
            ),
        ])),
        ..FakePosts::default()
    };
    // A switch in front of the fake, so a test can make posts answer with any code.
    let fail = Arc::new(Mutex::new(None::<Code>));
    let posts_server = PostServiceServer::new(posts);
    let switch = fail.clone();
    let posts_channel =
        Channel::from_service(tower::service_fn(move |req: http::Request<Body>| {
            let code = *switch.lock().unwrap();
            let mut server = posts_server.clone();
            async move {
                match code {
                    Some(code) => Ok(Status::new(code, "posts says no").into_http()),
                    None => tower::Service::call(&mut server, req).await,
                }
            }
        }));
    let comments = Channel::from_service(CommentServiceServer::new(FakeComments {
        calls: calls.clone(),
        comments: vec![comment(0, "p1", "bob")],
        ..FakeComments::default()
    }));
    let user_tokens = SeenTokens::default();
    let users = recording(
        Channel::from_service(UserServiceServer::new(FakeUsers {
            calls: calls.clone(),
            users: HashMap::from([("alice".into(), user("alice")), ("bob".into(), user("bob"))]),
            ..FakeUsers::default()
        })),
        user_tokens.clone(),
    );
    let stream_dropped = Arc::new(tokio::sync::Notify::new());
    let notifications = Channel::from_service(NotificationServiceServer::new(Endless {
        dropped: stream_dropped.clone(),
    }));
    let mut upstreams = Upstreams::new();
    upstreams.insert("posts", posts_channel.clone(), posts_channel);
    upstreams.insert("comments", comments.clone(), comments);
    upstreams.insert("users", users.clone(), users);
    upstreams.insert("notifications", notifications.clone(), notifications);

    let signer = Signer::generate().unwrap();
    let mut verifier = Verifier::new();
    verifier.add_key(signer.kid(), signer.public_key());
    let public = public_service(
        &upstreams,
        TokenKeys::fixed(verifier),
        EdgeLimits { rates, sizes },
    )
    .unwrap();
    Setup {
        public: Channel::from_service(public.clone()),
        service: public,
        calls,
        posts_fail: fail,
        user_tokens,
        signer,
        stream_dropped,
    }
}

fn generous() -> RateLimits {
    RateLimits {
        per_user: Quota::new(1000, 1000.0),
        per_address: Quota::new(1000, 1000.0),
        max_tracked: 100,
    }
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn thread() -> GetPostThreadRequest {
    GetPostThreadRequest {
        post_id: "p1".into(),
        comment_page_size: 0,
    }
}

#[tokio::test]
async fn the_feed_goes_through_the_proxy_with_the_readers_token() {
    let s = setup(generous(), SizeLimits::default());
    let mut feed = FeedServiceClient::new(s.public.clone());

    // Anonymous: served, and nothing is forwarded as a token.
    let reply = feed.get_post_thread(thread()).await.unwrap().into_inner();
    assert_eq!(reply.author.unwrap().user_id, "alice");
    assert_eq!(reply.comments.len(), 1);
    assert_eq!(s.user_tokens.lock().unwrap().last().cloned(), Some(None));

    // The reader's token reaches the downstream calls.
    let (token, _) = s.signer.sign("alice", "USER", DEFAULT_TOKEN_TTL);
    feed.get_post_thread(with_token(thread(), &token))
        .await
        .unwrap();
    assert_eq!(
        s.user_tokens.lock().unwrap().last().cloned(),
        Some(Some(token))
    );

    // A forged token is refused on the feed and on a plain read, before any upstream call.
    let forged = Signer::generate()
        .unwrap()
        .sign("alice", "ADMIN", DEFAULT_TOKEN_TTL)
        .0;
    let before = Calls::get(&s.calls.get_post);
    let err = feed
        .get_post_thread(with_token(thread(), &forged))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = PostServiceClient::new(s.public.clone())
        .get_post(with_token(
            GetPostRequest {
                post_id: "p1".into(),
            },
            &forged,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(Calls::get(&s.calls.get_post), before);
}

#[tokio::test]
async fn the_feed_is_rate_limited_per_address() {
    let s = setup(
        RateLimits {
            per_user: Quota::new(1000, 1000.0),
            per_address: Quota::new(3, 0.001),
            max_tracked: 100,
        },
        SizeLimits::default(),
    );
    let mut feed = FeedServiceClient::new(s.public.clone());
    let from = |ip: &str| {
        let mut req = Request::new(thread());
        req.extensions_mut()
            .insert(ClientAddr(ip.parse::<IpAddr>().unwrap()));
        req
    };
    for _ in 0..3 {
        feed.get_post_thread(from("192.0.2.1")).await.unwrap();
    }
    let err = feed.get_post_thread(from("192.0.2.1")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Another address has its own bucket.
    feed.get_post_thread(from("192.0.2.2")).await.unwrap();
}

#[tokio::test]
async fn requests_past_the_edge_limit_never_reach_upstream() {
    let s = setup(
        generous(),
        SizeLimits {
            max_request: 2048,
            ..SizeLimits::default()
        },
    );
    let (token, _) = s.signer.sign("alice", "USER", DEFAULT_TOKEN_TTL);
    let mut posts = PostServiceClient::new(s.public.clone());
    let err = posts
        .create_post(with_token(
            CreatePostRequest {
                title: "big".into(),
                body: "x".repeat(10_000),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(Calls::get(&s.calls.create_post), 0);
    // Under the limit it goes through.
    posts
        .create_post(with_token(
            CreatePostRequest {
                title: "small".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap();
    assert_eq!(Calls::get(&s.calls.create_post), 1);
}

#[tokio::test]
async fn downstream_codes_reach_the_client_as_they_are() {
    let s = setup(generous(), SizeLimits::default());
    let mut posts = PostServiceClient::new(s.public.clone());
    let get = |id: &str| GetPostRequest { post_id: id.into() };
    let err = posts.get_post(get("missing")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for code in [
        Code::InvalidArgument,
        Code::ResourceExhausted,
        Code::PermissionDenied,
        Code::Aborted,
    ] {
        *s.posts_fail.lock().unwrap() = Some(code);
        let err = posts.get_post(get("p1")).await.unwrap_err();
        assert_eq!(err.code(), code);
        assert_eq!(err.message(), "posts says no");
    }
}

#[tokio::test]
async fn health_and_reflection_are_served_beside_the_proxy() {
    let s = setup(generous(), SizeLimits::default());
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.public.clone());
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    // An unknown method goes through the proxy: UNIMPLEMENTED, not served by anyone.
    let err = health_unknown(&s.public).await;
    assert_eq!(err.code(), Code::Unimplemented);
}

async fn health_unknown(channel: &Channel) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<GetPostRequest, GetPostRequest>::default();
    grpc.unary(
        Request::new(GetPostRequest::default()),
        http::uri::PathAndQuery::from_static("/tessera.posts.v1.PostService/WatchEverything"),
        codec,
    )
    .await
    .unwrap_err()
}

#[tokio::test]
async fn a_stream_its_client_does_not_read_is_cut_off_and_its_upstream_dropped() {
    let s = setup(
        generous(),
        SizeLimits {
            stream_buffer: 4 * 1024,
            ..SizeLimits::default()
        },
    );
    let (token, _) = s.signer.sign("alice", "USER", DEFAULT_TOKEN_TTL);
    let mut client = NotificationServiceClient::new(s.public.clone());
    let mut stream = client
        .subscribe_notifications(with_token(SubscribeNotificationsRequest::default(), &token))
        .await
        .unwrap()
        .into_inner();
    // Not reading: the pump fills the buffer and lets the upstream go.
    tokio::time::timeout(Duration::from_secs(10), s.stream_dropped.notified())
        .await
        .expect("the upstream stream was not dropped");
    let mut received = 0;
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => break status,
        }
        assert!(received < 10_000, "the stream was never cut off");
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

/// SubscribeNotifications that never ends (a notification of 1 KiB at a time, as fast as it
/// is read) and says when its stream is dropped.
struct Endless {
    dropped: Arc<tokio::sync::Notify>,
}

struct EndlessStream {
    dropped: Arc<tokio::sync::Notify>,
    next: u64,
}

impl tokio_stream::Stream for EndlessStream {
    type Item = Result<SubscribeNotificationsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.next += 1;
        Poll::Ready(Some(Ok(SubscribeNotificationsResponse {
            notification: Some(Notification {
                notification_id: format!("n{}", self.next),
                post_id: "p".repeat(1024),
                ..Default::default()
            }),
        })))
    }
}

impl Drop for EndlessStream {
    fn drop(&mut self) {
        self.dropped.notify_one();
    }
}

#[tonic::async_trait]
impl NotificationService for Endless {
    async fn list_notifications(
        &self,
        _: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn mark_notifications_read(
        &self,
        _: Request<MarkNotificationsReadRequest>,
    ) -> Result<Response<MarkNotificationsReadResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    type SubscribeNotificationsStream = Pin<
        Box<dyn tokio_stream::Stream<Item = Result<SubscribeNotificationsResponse, Status>> + Send>,
    >;

    async fn subscribe_notifications(
        &self,
        _: Request<SubscribeNotificationsRequest>,
    ) -> Result<Response<Self::SubscribeNotificationsStream>, Status> {
        Ok(Response::new(Box::pin(EndlessStream {
            dropped: self.dropped.clone(),
            next: 0,
        })))
    }
}

/// A raw GetPost from `ip`: the response, its body not read.
async fn get_post_unread(s: &Setup, ip: &str, post_id: &str) -> http::Response<Body> {
    use prost::Message as _;
    let msg = GetPostRequest {
        post_id: post_id.into(),
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let mut req = http::Request::builder()
        .method("POST")
        .uri("/tessera.posts.v1.PostService/GetPost")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Body::new(http_body_util::Full::new(bytes::Bytes::from(
            framed,
        ))))
        .unwrap();
    req.extensions_mut()
        .insert(ClientAddr(ip.parse::<IpAddr>().unwrap()));
    tower::ServiceExt::oneshot(s.service.clone(), req)
        .await
        .unwrap()
}

fn grpc_status(resp: &http::Response<Body>) -> Option<&str> {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn unread_responses_are_bounded_per_address() {
    let s = setup(
        generous(),
        SizeLimits {
            unread_per_address: 100_000,
            ..SizeLimits::default()
        },
    );
    // Two 40 KB responses left unread fit in the address's 100 KB; a third does not.
    let first = get_post_unread(&s, "192.0.2.7", "big").await;
    let second = get_post_unread(&s, "192.0.2.7", "big").await;
    assert_eq!(grpc_status(&first), None, "a response with data follows");
    assert_eq!(grpc_status(&second), None);
    let third = get_post_unread(&s, "192.0.2.7", "big").await;
    assert_eq!(grpc_status(&third), Some("8"), "RESOURCE_EXHAUSTED");
    // Another address is not charged for them.
    let other = get_post_unread(&s, "192.0.2.8", "big").await;
    assert_eq!(grpc_status(&other), None);
    // Once the client reads (or drops) one, it may have another.
    let read = http_body_util::BodyExt::collect(first.into_body())
        .await
        .unwrap();
    assert!(read.to_bytes().len() > 40_000);
    let fourth = get_post_unread(&s, "192.0.2.7", "big").await;
    assert_eq!(grpc_status(&fourth), None);
    drop((second, fourth, other));
}
