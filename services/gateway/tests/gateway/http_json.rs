//! The HTTP/JSON edge around a recording gRPC service: what gRPC request a JSON call becomes,
//! how answers and statuses come back, gRPC-Web translation and CORS.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use tessera::posts::v1::{GetPostRequest, GetPostResponse, Post};
use tessera_gateway::HttpJson;
use tessera_mesh::server::GrpcService;
use tonic::{Status, body::Body};
use tower::ServiceExt;

/// What the inner service saw.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Bytes,
    marker: Option<Marker>,
}

#[derive(Clone, Debug, PartialEq)]
struct Marker(u32);

fn frame(message: &impl Message) -> Bytes {
    let bytes = message.encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&bytes);
    out.into()
}

/// A gRPC service that records each request and answers GetPost for post "p1" (NOT_FOUND,
/// trailers-only, for anything else).
fn recording() -> (GrpcService, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let svc = tower::service_fn(move |req: Request<Body>| {
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let request = GetPostRequest::decode(body.slice(5..)).unwrap_or_default();
            log.lock().unwrap().push(Seen {
                path: parts.uri.path().to_owned(),
                headers: parts.headers.clone(),
                body,
                marker: parts.extensions.get::<Marker>().cloned(),
            });
            if request.post_id != "p1" {
                return Ok::<_, Infallible>(Status::not_found("post not found").into_http());
            }
            let answer = GetPostResponse {
                post: Some(Post {
                    post_id: "p1".into(),
                    title: "Hello".into(),
                    tags: vec!["a".into()],
                    ..Default::default()
                }),
            };
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let frames = futures::stream::iter([
                Ok::<_, Status>(Frame::data(frame(&answer))),
                Ok(Frame::trailers(trailers)),
            ]);
            let mut resp = Response::new(Body::new(http_body_util::StreamBody::new(frames)));
            resp.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            Ok(resp)
        }
    });
    (GrpcService::new(svc), seen)
}

fn full(bytes: Bytes) -> Body {
    Body::new(http_body_util::Full::new(bytes))
}

async fn body_json(resp: Response<Body>) -> serde_json::Value {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn a_json_call_becomes_a_grpc_call_with_the_callers_headers() {
    let (inner, seen) = recording();
    let edge = HttpJson::new(&[], 1 << 20).unwrap().wrap(inner);
    let mut req = Request::get("/v1/posts/p1")
        .header("authorization", "Bearer abc")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("cookie", "not=forwarded")
        .body(Body::default())
        .unwrap();
    req.extensions_mut().insert(Marker(7));
    let resp = edge.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(
        body_json(resp).await,
        serde_json::json!({"post": {"postId": "p1", "title": "Hello", "tags": ["a"]}})
    );
    let seen = seen.lock().unwrap().pop().unwrap();
    assert_eq!(seen.path, "/tessera.posts.v1.PostService/GetPost");
    assert_eq!(seen.headers["content-type"], "application/grpc");
    assert_eq!(seen.headers["te"], "trailers");
    assert_eq!(seen.headers["authorization"], "Bearer abc");
    assert!(seen.headers.contains_key("traceparent"));
    assert!(!seen.headers.contains_key("cookie"));
    // The connection's extensions (peer address for the rate limits) go along.
    assert_eq!(seen.marker, Some(Marker(7)));
    assert_eq!(
        GetPostRequest::decode(seen.body.slice(5..))
            .unwrap()
            .post_id,
        "p1"
    );

    let resp = edge
        .oneshot(Request::get("/v1/posts/p2").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        body_json(resp).await,
        serde_json::json!({"code": 5, "message": "post not found", "details": []})
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_any_call() {
    let (inner, seen) = recording();
    let edge = HttpJson::new(&[], 1024).unwrap().wrap(inner);
    let big = format!("{{\"title\": \"{}\"}}", "x".repeat(2048));
    let resp = edge
        .oneshot(Request::post("/v1/posts").body(full(big.into())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body_json(resp).await["code"], 8);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_refused_before_any_call() {
    let (inner, seen) = recording();
    let edge = HttpJson::new(&[], 1 << 20)
        .unwrap()
        .with_body_timeout(std::time::Duration::from_millis(200))
        .wrap(inner);
    // Half a JSON body, then nothing: a slow sender.
    let half = futures::stream::iter([Ok::<_, Infallible>(Frame::data(Bytes::from_static(
        b"{\"title\": ",
    )))]);
    let body = http_body_util::StreamBody::new(futures::StreamExt::chain(
        half,
        futures::stream::pending(),
    ));
    let started = std::time::Instant::now();
    let resp = edge
        .oneshot(Request::post("/v1/posts").body(Body::new(body)).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(body_json(resp).await["code"], 4);
    assert!(seen.lock().unwrap().is_empty());
    println!("refused after {:?}", started.elapsed());
}

#[tokio::test]
async fn grpc_and_grpc_web_reach_the_inner_service_as_grpc() {
    let (inner, seen) = recording();
    let edge = HttpJson::new(&[], 1 << 20).unwrap().wrap(inner);
    let body = frame(&GetPostRequest {
        post_id: "p1".into(),
    });
    let web = Request::post("/tessera.posts.v1.PostService/GetPost")
        .header("content-type", "application/grpc-web+proto")
        .body(full(body.clone()))
        .unwrap();
    let resp = edge.clone().oneshot(web).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc-web")
    );
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    // The message frame, then the trailers as a frame flagged 0x80.
    assert_eq!(bytes[0], 0);
    let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
    let trailer = &bytes[5 + len..];
    assert_eq!(trailer[0], 0x80);
    assert!(String::from_utf8_lossy(&trailer[5..]).contains("grpc-status:0"));
    assert_eq!(
        seen.lock().unwrap().pop().unwrap().headers["content-type"],
        "application/grpc"
    );

    let native = Request::post("/tessera.posts.v1.PostService/GetPost")
        .header("content-type", "application/grpc")
        .body(full(body.clone()))
        .unwrap();
    let resp = edge.oneshot(native).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(seen.lock().unwrap().pop().unwrap().body, body);
}

#[tokio::test]
async fn cors_answers_only_the_configured_origins() {
    let (inner, _) = recording();
    let edge = HttpJson::new(&["https://app.example".to_owned()], 1 << 20)
        .unwrap()
        .wrap(inner);
    let preflight = |origin: &str| {
        Request::options("/v1/posts")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .body(Body::default())
            .unwrap()
    };
    let resp = edge
        .clone()
        .oneshot(preflight("https://app.example"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        resp.headers()["access-control-allow-headers"],
        "authorization, content-type"
    );
    let resp = edge
        .clone()
        .oneshot(preflight("https://evil.example"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(!resp.headers().contains_key("access-control-allow-origin"));

    for (origin, allowed) in [
        ("https://app.example", true),
        ("https://evil.example", false),
    ] {
        let resp = edge
            .clone()
            .oneshot(
                Request::get("/v1/posts/p1")
                    .header("origin", origin)
                    .body(Body::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers().contains_key("access-control-allow-origin"),
            allowed,
            "{origin}"
        );
    }
}

#[tokio::test]
async fn openapi_and_the_front_end_are_served_without_a_call() {
    let (inner, seen) = recording();
    let edge = HttpJson::new(&[], 1 << 20).unwrap().wrap(inner);
    let resp = edge
        .clone()
        .oneshot(Request::get("/openapi.json").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_json(resp).await["openapi"], "3.0.3");
    for path in ["/", "/app.js", "/style.css"] {
        let resp = edge
            .clone()
            .oneshot(Request::get(path).body(Body::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert!(resp.headers().contains_key("content-security-policy"));
    }
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_server_stream_becomes_newline_delimited_json_ending_with_its_error() {
    use tessera::notifications::v1::{Notification, SubscribeNotificationsResponse};
    let svc = tower::service_fn(|req: Request<Body>| async move {
        assert_eq!(
            req.uri().path(),
            "/tessera.notifications.v1.NotificationService/SubscribeNotifications"
        );
        let item = |id: &str| SubscribeNotificationsResponse {
            notification: Some(Notification {
                notification_id: id.into(),
                ..Default::default()
            }),
        };
        // Two messages in one chunk and a third split across two, then a failing status.
        let mut first = frame(&item("n1")).to_vec();
        first.extend_from_slice(&frame(&item("n2")));
        let third = frame(&item("n3"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        trailers.insert("grpc-message", "going away".parse().unwrap());
        let frames = futures::stream::iter([
            Ok::<_, Status>(Frame::data(Bytes::from(first))),
            Ok(Frame::data(third.slice(..3))),
            Ok(Frame::data(third.slice(3..))),
            Ok(Frame::trailers(trailers)),
        ]);
        Ok::<_, Infallible>(Response::new(Body::new(http_body_util::StreamBody::new(
            frames,
        ))))
    });
    let edge = HttpJson::new(&[], 1 << 20)
        .unwrap()
        .wrap(GrpcService::new(svc));
    let resp = edge
        .oneshot(
            Request::get("/v1/notifications:subscribe")
                .body(Body::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    let lines: Vec<serde_json::Value> = std::str::from_utf8(&text)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    for (line, id) in lines.iter().zip(["n1", "n2", "n3"]) {
        assert_eq!(line["notification"]["notificationId"], id);
    }
    assert_eq!(lines[3]["error"]["code"], 14);
    assert_eq!(lines[3]["error"]["message"], "going away");
}
