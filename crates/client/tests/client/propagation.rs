//! Deadlines, end-user tokens and trace context flow from the call being handled into the
//! calls it makes.

use std::time::{Duration, Instant};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use tessera::users::v1::{
    GetUserRequest, WatchEventsRequest, user_service_client::UserServiceClient,
};
use tessera_client::ClientBuilder;
use tonic::{Code, Request};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use crate::support::{Replica, serial, target};

fn grpc_timeout(value: &str) -> Duration {
    tessera_mesh::headers::parse_grpc_timeout(&value.parse().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remaining_deadline_and_the_token_reach_the_next_hop() {
    let _serial = serial().await;
    let b = Replica::start().await;
    let a = Replica::start().await;
    let builder = ClientBuilder::plaintext();
    let to_b = builder.channel(&target(&[&b])).unwrap();
    a.behaviour.forward_to.set(to_b).unwrap();
    // A takes a while before it calls B.
    a.behaviour.set_delay(Duration::from_millis(30));

    let mut client = UserServiceClient::new(builder.channel(&target(&[&a])).unwrap());
    let mut request = Request::new(GetUserRequest {
        user_id: "u".into(),
    });
    request.set_timeout(Duration::from_millis(200));
    request
        .metadata_mut()
        .insert("authorization", "Bearer t0k".parse().unwrap());
    client.get_user(request).await.unwrap();

    let at_a = grpc_timeout(&a.behaviour.last_header("grpc-timeout").unwrap());
    let at_b = grpc_timeout(&b.behaviour.last_header("grpc-timeout").unwrap());
    assert!(at_a <= Duration::from_millis(200), "A saw {at_a:?}");
    assert!(
        at_b < Duration::from_millis(170),
        "B saw {at_b:?} after A spent 30 ms"
    );
    assert!(at_b > Duration::ZERO);
    assert_eq!(
        b.behaviour.last_header("authorization").as_deref(),
        Some("Bearer t0k")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_get_the_default_deadline_and_end_when_it_passes() {
    let _serial = serial().await;
    let replica = Replica::start().await;
    let channel = ClientBuilder::plaintext()
        .timeout(Duration::from_millis(300))
        .channel(&target(&[&replica]))
        .unwrap();
    let mut client = UserServiceClient::new(channel);
    client
        .get_user(GetUserRequest {
            user_id: "u".into(),
        })
        .await
        .unwrap();
    let seen = grpc_timeout(&replica.behaviour.last_header("grpc-timeout").unwrap());
    assert!(
        seen <= Duration::from_millis(300) && seen > Duration::from_millis(200),
        "{seen:?}"
    );
    // Nothing forwarded outside a handler.
    assert_eq!(replica.behaviour.last_header("authorization"), None);
    // A server stream may outlive any default: it gets none.
    client
        .watch_events(WatchEventsRequest::default())
        .await
        .unwrap();
    assert_eq!(replica.behaviour.last_header("grpc-timeout"), None);

    replica.behaviour.set_delay(Duration::from_secs(5));
    let start = Instant::now();
    let mut request = Request::new(GetUserRequest {
        user_id: "u".into(),
    });
    request.set_timeout(Duration::from_millis(100));
    let status = client.get_user(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // An incoming deadline that already passed: no call at all.
    let gets = replica.behaviour.gets();
    let context = tessera_mesh::context::CallContext {
        deadline: Some(Instant::now()),
        ..Default::default()
    };
    let status = tessera_mesh::context::scope(
        context,
        client.get_user(GetUserRequest {
            user_id: "u".into(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(replica.behaviour.gets(), gets);
}

#[tokio::test]
async fn calls_carry_the_trace_context_of_the_current_span() {
    let _serial = serial().await;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let replica = Replica::start().await;
    let channel = ClientBuilder::plaintext()
        .channel(&target(&[&replica]))
        .unwrap();
    let mut client = UserServiceClient::new(channel);

    let span = tracing::info_span!("handler");
    let trace_id = span.context().span().span_context().trace_id();
    client
        .get_user(GetUserRequest {
            user_id: "u".into(),
        })
        .instrument(span)
        .await
        .unwrap();

    let traceparent = replica.behaviour.last_header("traceparent").unwrap();
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    assert_eq!(fields[1], trace_id.to_string(), "{traceparent}");
    assert_ne!(trace_id, opentelemetry::trace::TraceId::INVALID);
}
