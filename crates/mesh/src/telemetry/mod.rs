//! Logs, traces and the W3C trace context.
//!
//! [`get_subscriber`] builds a subscriber from explicit inputs, so tests can build one without
//! touching global state; [`init`] installs it once for the process, with an OTLP exporter
//! only when an endpoint is configured. How a log line looks is [`mod@format`]'s; how the trace
//! context crosses a hop is [`propagation`]'s.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{SdkTracerProvider, Tracer},
};
use tracing::Subscriber;
use tracing_subscriber::{EnvFilter, Layer, Registry, layer::SubscriberExt};

pub mod format;
pub mod propagation;

use self::format::{JsonSpanFields, WithCall};
pub use self::propagation::{TRACEPARENT, extract_context, inject_context};

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (containers).
    Json,
    /// Human-readable (terminals).
    Pretty,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Self::Json),
            "pretty" | "text" => Ok(Self::Pretty),
            other => Err(format!("expected json or pretty, got {other:?}")),
        }
    }
}

/// A subscriber writing to `sink` in `format`, filtered by `filter` (an `EnvFilter`
/// directive such as `info,tessera=debug`), exporting spans to `tracer` when given.
pub fn get_subscriber<W>(
    filter: &str,
    format: LogFormat,
    sink: W,
    tracer: Option<Tracer>,
) -> impl Subscriber + Send + Sync
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(JsonSpanFields)
            .map_event_format(|inner| WithCall { inner, json: true })
            .with_writer(sink)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_target(false)
            .map_event_format(|inner| WithCall { inner, json: false })
            .with_writer(sink)
            .boxed(),
    };
    // Each of these costs on every call and nobody reads it: busy/idle time (clock reads on
    // every poll), the source location and thread of the span (five attributes per span),
    // and making the span the thread's current OpenTelemetry context on every poll (clients
    // take the trace context from the current tracing span instead).
    let otel = tracer.map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t)
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_threads(false)
            .with_context_activation(false)
    });
    Registry::default().with(filter).with(fmt).with(otel)
}

/// Keeps the OTLP pipeline alive; flushes pending spans when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    tracer: Option<Tracer>,
}

impl TelemetryGuard {
    /// The tracer for server spans ([`crate::server::ServerOptions::tracer`]), when traces
    /// are exported.
    pub fn tracer(&self) -> Option<Tracer> {
        self.tracer.clone()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Why [`init`] could not set up telemetry; the process should not start half-observed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built for the endpoint given (the message says why).
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: {0}")]
    Otlp(String),
    /// [`init`] ran twice, or something else set the process's subscriber first.
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Installs the process-wide subscriber and the W3C trace-context propagator. With
/// `otlp_endpoint`, spans are also exported over OTLP/gRPC, batched.
pub fn init(
    service_name: &str,
    filter: &str,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = match otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.to_owned())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let tracer = provider.as_ref().map(|p| p.tracer(service_name.to_owned()));
    let subscriber = get_subscriber(filter, format, std::io::stderr, tracer.clone());
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    Ok(TelemetryGuard { provider, tracer })
}
