//! A call carrying W3C trace context produces a server span in the caller's trace.
//!
//! A binary of its own: it installs the process-wide subscriber. A thread-local one
//! (`set_default`) in the shared e2e binary was flaky, because tracing caches each callsite's
//! interest globally and tests running at the same time on other threads, with no
//! subscriber, could register the server's span callsite as never-enabled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code, unused_imports, unused_macros)]
#[path = "e2e/support.rs"]
mod support;

use opentelemetry::{
    KeyValue, Value,
    trace::{SpanId, SpanKind, TraceId, TracerProvider as _},
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tessera::posts::v1::GetPostRequest;
use tessera_mesh::telemetry::{LogFormat, get_subscriber};
use tonic::Request;

use support::{GET_POST, eventually, spawn_app_with, test_options};
use tessera_mesh::server::ServerOptions;

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_makes_the_server_span_a_child_of_the_callers_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = get_subscriber(
        "info",
        LogFormat::Pretty,
        tracing_subscriber::fmt::TestWriter::new(),
        Some(provider.tracer("e2e")),
    );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let app = spawn_app_with(
        ServerOptions {
            tracer: Some(provider.tracer("e2e")),
            ..test_options()
        },
        None,
    )
    .await;
    let mut client = app.client("gateway").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut request = Request::new(GetPostRequest {
        post_id: "traced".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    client.get_post(request).await.unwrap();

    let server_span = || {
        exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .find(|s| s.name == GET_POST)
    };
    eventually!(server_span().is_some(), "the server span to be exported");
    let span = server_span().unwrap();
    assert_eq!(
        span.span_context.trace_id(),
        TraceId::from_hex(trace_id).unwrap()
    );
    assert_eq!(span.parent_span_id, SpanId::from_hex(parent_id).unwrap());
    assert!(span.parent_span_is_remote);
    assert_eq!(span.span_kind, SpanKind::Server);
    assert_eq!(
        attribute(&span.attributes, "caller").map(|v| v.as_str().into_owned()),
        Some("gateway".into())
    );
    assert_eq!(
        attribute(&span.attributes, "rpc.grpc.status_code"),
        Some(&Value::I64(0))
    );
    assert_eq!(
        attribute(&span.attributes, "rpc.service").map(|v| v.as_str().into_owned()),
        Some("tessera.posts.v1.PostService".into())
    );
    assert_eq!(
        attribute(&span.attributes, "rpc.method").map(|v| v.as_str().into_owned()),
        Some("GetPost".into())
    );

    // A span the handler opens with `tracing` is a child of the server span.
    let child = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .find(|s| s.name == "handler.work")
        .expect("the handler's own span is exported");
    assert_eq!(child.span_context.trace_id(), span.span_context.trace_id());
    assert_eq!(child.parent_span_id, span.span_context.span_id());
}
