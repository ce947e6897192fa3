//! The public proxy: forwarding (unary and streaming), routing, tokens and rate limits.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tessera::{
    notifications::v1::{
        SubscribeNotificationsRequest, notification_service_client::NotificationServiceClient,
        notification_service_server::NotificationServiceServer,
    },
    posts::v1::{
        CreatePostRequest, GetPostRequest, Post, WatchEventsRequest,
        post_service_client::PostServiceClient, post_service_server::PostServiceServer,
    },
};
use tessera_client::Channel;
use tessera_gateway::{ClientAddr, PublicProxy, Quota, RateLimits};
use tessera_mesh::{
    auth::TokenKeys,
    token::{DEFAULT_TOKEN_TTL, Signer, UserClaims, Verifier},
};
use tokio_stream::StreamExt;
use tonic::{Code, Request, body::Body};
use tower::ServiceExt;

use crate::fakes::{Calls, FakeNotifications, FakePosts};

const GET_POST: &str = "/tessera.posts.v1.PostService/GetPost";
const CREATE_POST: &str = "/tessera.posts.v1.PostService/CreatePost";
const SUBSCRIBE: &str = "/tessera.notifications.v1.NotificationService/SubscribeNotifications";

struct Setup {
    proxy: PublicProxy,
    calls: Arc<Calls>,
    signer: Signer,
}

fn setup(limits: RateLimits) -> Setup {
    let calls = Arc::new(Calls::default());
    let posts = Channel::from_service(PostServiceServer::new(FakePosts {
        calls: calls.clone(),
        posts: Mutex::new(HashMap::from([(
            "p1".to_owned(),
            Post {
                post_id: "p1".into(),
                title: "hello".into(),
                ..Default::default()
            },
        )])),
        ..FakePosts::default()
    }));
    let notifications = Channel::from_service(NotificationServiceServer::new(FakeNotifications {
        count: 3,
    }));
    let routes = HashMap::from([
        (GET_POST.to_owned(), posts.clone()),
        (CREATE_POST.to_owned(), posts),
        (SUBSCRIBE.to_owned(), notifications),
    ]);
    let signer = Signer::generate().unwrap();
    let mut verifier = Verifier::new();
    verifier.add_key(signer.kid(), signer.public_key());
    let proxy = PublicProxy::new(routes, TokenKeys::fixed(verifier), limits).unwrap();
    Setup {
        proxy,
        calls,
        signer,
    }
}

fn generous() -> RateLimits {
    RateLimits {
        per_user: Quota::new(1000, 1000.0),
        per_address: Quota::new(1000, 1000.0),
        max_tracked: 100,
    }
}

fn posts(proxy: &PublicProxy) -> PostServiceClient<Channel> {
    PostServiceClient::new(Channel::from_service(proxy.clone()))
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn get_post() -> GetPostRequest {
    GetPostRequest {
        post_id: "p1".into(),
    }
}

#[tokio::test]
async fn forwards_a_unary_call_with_its_headers() {
    let s = setup(generous());
    let (token, _) = s.signer.sign("u1", "USER", DEFAULT_TOKEN_TTL);
    let mut req = with_token(get_post(), &token);
    req.set_timeout(Duration::from_secs(7));
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    req.metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    req.metadata_mut()
        .insert("x-custom", "kept".parse().unwrap());

    let reply = posts(&s.proxy).get_post(req).await.unwrap().into_inner();
    assert_eq!(reply.post.unwrap().title, "hello");
    assert_eq!(Calls::get(&s.calls.get_post), 1);
    assert_eq!(
        s.calls.header("authorization"),
        Some(format!("Bearer {token}"))
    );
    assert_eq!(s.calls.header("traceparent").as_deref(), Some(traceparent));
    assert_eq!(s.calls.header("x-custom").as_deref(), Some("kept"));
    assert!(s.calls.header("grpc-timeout").is_some());

    // Downstream statuses come back as they are.
    let err = posts(&s.proxy)
        .get_post(GetPostRequest {
            post_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn forwards_a_server_stream() {
    let s = setup(generous());
    let (token, _) = s.signer.sign("u1", "USER", DEFAULT_TOKEN_TTL);
    let mut client = NotificationServiceClient::new(Channel::from_service(s.proxy.clone()));
    let mut stream = client
        .subscribe_notifications(with_token(SubscribeNotificationsRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(item) = stream.next().await {
        ids.push(item.unwrap().notification.unwrap().notification_id);
    }
    assert_eq!(ids, ["n0", "n1", "n2"]);

    // The same method without a token never reaches the service.
    let err = client
        .subscribe_notifications(SubscribeNotificationsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn unknown_and_internal_methods_are_unimplemented() {
    let s = setup(generous());
    // Not public: the event stream is for services only.
    let err = posts(&s.proxy)
        .watch_events(WatchEventsRequest {
            after_sequence: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    // Any other path, as raw HTTP: a trailers-only gRPC response.
    for path in [
        "/nope.Service/Method",
        "/",
        "/tessera.posts.v1.PostService/getpost",
    ] {
        let req = http::Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/grpc")
            .body(Body::default())
            .unwrap();
        let resp = s.proxy.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), http::StatusCode::OK, "{path}");
        assert_eq!(resp.headers()["grpc-status"], "12", "{path}");
        assert_eq!(resp.headers()["content-type"], "application/grpc");
    }
    assert_eq!(Calls::get(&s.calls.get_post), 0);
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated() {
    let s = setup(generous());
    let (good, claims) = s.signer.sign("u1", "USER", DEFAULT_TOKEN_TTL);
    let expired = s.signer.sign_claims(&UserClaims {
        exp: 1,
        ..claims.clone()
    });
    // Signed by another key that claims our key id.
    let other = Signer::generate().unwrap();
    let forged_sig = other.sign_claims(&claims);
    let forged = format!(
        "{}.{}",
        good.rsplit_once('.').unwrap().0,
        forged_sig.rsplit_once('.').unwrap().1
    );
    let unknown_key = other.sign_claims(&claims);

    for (name, token) in [
        ("expired", expired.as_str()),
        ("forged", forged.as_str()),
        ("unknown key", unknown_key.as_str()),
        ("garbage", "not.a.token"),
    ] {
        // Rejected on a method that needs no token, too.
        let err = posts(&s.proxy)
            .get_post(with_token(get_post(), token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{name}");
        let err = posts(&s.proxy)
            .create_post(with_token(CreatePostRequest::default(), token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{name}");
    }

    let mut req = Request::new(get_post());
    req.metadata_mut()
        .insert("authorization", "Basic dTE6cHc=".parse().unwrap());
    let err = posts(&s.proxy).get_post(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // A user method without a token.
    let err = posts(&s.proxy)
        .create_post(CreatePostRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(Calls::get(&s.calls.get_post), 0);
    assert_eq!(Calls::get(&s.calls.create_post), 0);

    // The good token passes.
    let reply = posts(&s.proxy)
        .create_post(with_token(
            CreatePostRequest {
                title: "t".into(),
                ..Default::default()
            },
            &good,
        ))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().post.unwrap().title, "t");
    assert_eq!(Calls::get(&s.calls.create_post), 1);
}

fn from(ip: &str) -> Request<GetPostRequest> {
    let mut req = Request::new(get_post());
    req.extensions_mut()
        .insert(ClientAddr(ip.parse::<IpAddr>().unwrap()));
    req
}

#[tokio::test]
async fn rate_limits_per_address() {
    let s = setup(RateLimits {
        per_user: Quota::new(1000, 1000.0),
        per_address: Quota::new(3, 0.001),
        max_tracked: 100,
    });
    let mut client = posts(&s.proxy);
    for _ in 0..3 {
        client.get_post(from("192.0.2.1")).await.unwrap();
    }
    let err = client.get_post(from("192.0.2.1")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Another address is unaffected.
    client.get_post(from("192.0.2.2")).await.unwrap();
    assert_eq!(Calls::get(&s.calls.get_post), 4);
}

#[tokio::test]
async fn rate_limits_per_user() {
    let s = setup(RateLimits {
        per_user: Quota::new(2, 0.001),
        per_address: Quota::new(1000, 1000.0),
        max_tracked: 100,
    });
    let (alice, _) = s.signer.sign("alice", "USER", DEFAULT_TOKEN_TTL);
    let (bob, _) = s.signer.sign("bob", "USER", DEFAULT_TOKEN_TTL);
    let mut client = posts(&s.proxy);
    for _ in 0..2 {
        client
            .get_post(with_token(get_post(), &alice))
            .await
            .unwrap();
    }
    let err = client
        .get_post(with_token(get_post(), &alice))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // A fresh token for the same user shares the bucket; another user does not.
    let (alice2, _) = s.signer.sign("alice", "USER", Duration::from_secs(60));
    let err = client
        .get_post(with_token(get_post(), &alice2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    client.get_post(with_token(get_post(), &bob)).await.unwrap();
    // Anonymous calls are limited by address only.
    client.get_post(get_post()).await.unwrap();
}

#[tokio::test]
async fn a_failing_downstream_is_unavailable() {
    let broken = Channel::from_service(tower::service_fn(|_req: http::Request<Body>| async {
        Err::<http::Response<Body>, _>(std::io::Error::other("connection refused"))
    }));
    let proxy = PublicProxy::new(
        HashMap::from([(GET_POST.to_owned(), broken)]),
        TokenKeys::fixed(Verifier::new()),
        generous(),
    )
    .unwrap();
    let err = posts(&proxy).get_post(get_post()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        !err.message().contains("refused"),
        "the cause stays in the log"
    );
}
