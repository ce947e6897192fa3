//! Prometheus metrics for the request path: RED per method, code and caller.

use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// A label value shared with the request path, so counting a call clones pointers instead
/// of allocating strings.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(Arc<str>);

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, &self.0)
    }
}

/// The labels of `tessera_grpc_server_requests`: one counter per method, outcome and caller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The gRPC path, `/package.Service/Method` (`unknown` for paths nobody serves).
    pub method: Label,
    /// The status code as [`code_name`] spells it.
    pub code: &'static str,
    /// The calling workload's service name from its certificate, or `anonymous`.
    pub caller: Label,
}

/// The labels of `tessera_grpc_server_request_duration_seconds`: one histogram per method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// The gRPC path, `/package.Service/Method` (`unknown` for paths nobody serves).
    pub method: Label,
}

/// One workload's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with the request counter and latency histogram registered, under
    /// the `tessera_grpc_server` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera_grpc_server");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Completed gRPC calls by method, status code and caller identity",
            requests.clone(),
        );
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~13 s, doubling.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 18,
            ))
        });
        registry.register(
            "request_duration_seconds",
            "Time from receiving a call to its last response byte",
            latency.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            latency,
        }
    }

    /// Counts one finished call and its duration, looking its series up by label set; the
    /// request path uses [`Metrics::method`] handles instead.
    pub fn record(&self, method: &Arc<str>, code: tonic::Code, caller: &Arc<str>, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                method: Label(method.clone()),
                code: code_name(code),
                caller: Label(caller.clone()),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                method: Label(method.clone()),
            })
            .observe(seconds);
    }

    /// Handles for one method's series, so recording a call skips the label-set lookups.
    pub fn method(&self, method: Arc<str>) -> MethodMetrics {
        MethodMetrics {
            metrics: self.clone(),
            method,
            latency: OnceLock::new(),
            requests: Mutex::new(Vec::new()),
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// One method's series: the latency histogram and a counter per (code, caller) seen so far.
/// Each is created in the [`Metrics`] families on first use (so only called methods show up),
/// then kept here: a call then costs a short scan instead of hashing its label set twice.
pub struct MethodMetrics {
    metrics: Metrics,
    method: Arc<str>,
    latency: OnceLock<Histogram>,
    requests: Mutex<Vec<(tonic::Code, Arc<str>, Counter)>>,
}

impl MethodMetrics {
    /// Counts one finished call of this method and its duration in seconds.
    pub fn record(&self, code: tonic::Code, caller: &Arc<str>, seconds: f64) {
        let metrics = &self.metrics;
        self.latency
            .get_or_init(|| {
                metrics
                    .latency
                    .get_or_create(&MethodLabels {
                        method: Label(self.method.clone()),
                    })
                    .clone()
            })
            .observe(seconds);
        let mut requests = self
            .requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, _, counter)) = requests
            .iter()
            .find(|(c, who, _)| *c == code && **who == **caller)
        {
            counter.inc();
            return;
        }
        // Callers are workloads with certificates from our CA and codes are few, so this
        // stays short; past a bound, fall back to the family lookup.
        let counter = metrics
            .requests
            .get_or_create(&RequestLabels {
                method: Label(self.method.clone()),
                code: code_name(code),
                caller: Label(caller.clone()),
            })
            .clone();
        counter.inc();
        if requests.len() < 64 {
            requests.push((code, caller.clone(), counter));
        }
    }
}

/// gRPC code names as the gRPC specification spells them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
