//! The request path's limits: deadlines, load shedding, message size, and panics.

use std::time::{Duration, Instant};

use tessera::posts::v1::{GetPostRequest, GetPostResponse};
use tessera_mesh::server::ServerOptions;
use tonic::{Code, Request, Response, Status};

use crate::support::{RawH2, SLOW, eventually, spawn_app, spawn_app_with, test_options};

fn get(id: &str) -> GetPostRequest {
    GetPostRequest { post_id: id.into() }
}

fn post_id(result: Result<Response<GetPostResponse>, Status>) -> String {
    result.unwrap().into_inner().post.unwrap().post_id
}

#[tokio::test]
async fn the_server_enforces_the_callers_deadline() {
    let app = spawn_app().await;
    // tonic's channel would give up on its own at the deadline (as CANCELLED); this client
    // does not, so what comes back is the server's answer.
    let mut client = RawH2::connect(app.grpc, app.client_config("gateway"))
        .await
        .posts();
    let mut request = Request::new(get("slow"));
    request.set_timeout(Duration::from_millis(50));
    let started = Instant::now();
    let status = client
        .get_post(request)
        .await
        .expect_err("a 1 s handler finished within a 50 ms deadline");
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(took >= Duration::from_millis(50), "{took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    // The handler was cancelled, not left running.
    eventually!(app.in_flight() == 0, "the handler to be dropped");
}

#[tokio::test]
async fn past_the_concurrency_limit_calls_are_refused_at_once() {
    let app = spawn_app_with(
        ServerOptions {
            max_concurrency: 2,
            ..test_options()
        },
        None,
    )
    .await;
    let client = app.client("gateway").await;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.get_post(get("slow")).await })
        })
        .collect();
    eventually!(app.in_flight() == 2, "two slow calls in their handlers");

    let started = Instant::now();
    let refused = client
        .clone()
        .get_post(get("slow"))
        .await
        .expect_err("a third call was admitted past the limit of 2");
    let took = started.elapsed();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(took < SLOW / 4, "refused only after {took:?}: it queued");

    for call in slow {
        assert_eq!(post_id(call.await.unwrap()), "slow");
    }
    // Capacity is back once the slow calls are done.
    assert_eq!(post_id(client.clone().get_post(get("p1")).await), "p1");
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_the_server_stays_healthy() {
    let app = spawn_app_with(
        ServerOptions {
            max_message_size: 64 * 1024,
            ..test_options()
        },
        None,
    )
    .await;
    let mut client = app.client("gateway").await;
    let status = client
        .get_post(get(&"x".repeat(100 * 1024)))
        .await
        .expect_err("a 100 KiB message passed a 64 KiB limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // A message just under the limit is fine, on the same connection and on a new one.
    assert_eq!(
        post_id(client.get_post(get(&"y".repeat(60 * 1024))).await).len(),
        60 * 1024
    );
    let mut fresh = app.client("gateway").await;
    assert_eq!(post_id(fresh.get_post(get("p1")).await), "p1");
}

#[tokio::test]
async fn a_panicking_handler_gives_internal_and_the_server_keeps_serving() {
    let app = spawn_app().await;
    let mut client = app.client("gateway").await;
    let status = client
        .get_post(get("panic"))
        .await
        .expect_err("a panicking handler returned a post");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        !status.message().contains("on purpose"),
        "the panic message leaked to the caller: {status:?}"
    );
    assert_eq!(post_id(client.get_post(get("p1")).await), "p1");
    assert!(!app.done.is_finished());
}
