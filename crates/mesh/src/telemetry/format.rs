//! How log lines look: each line written during a call carries the call (method, caller,
//! trace id), and span fields are written as one JSON object in the JSON format.

use std::fmt::{self, Write as _};

use opentelemetry::trace::TraceContextExt as _;
use tracing::{
    Subscriber,
    field::{Field, Visit},
    span,
};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, format::Writer},
    registry::LookupSpan,
};

/// Adds the call being handled (method, caller, trace id, from [`crate::context`]) to each
/// log line written while handling it. The request path opens no `tracing` span per call
/// (see `stack`), so this is how log lines and traces join up. Lines are buffered only
/// inside calls; there, terminal colours are lost.
pub(crate) struct WithCall<F> {
    pub(crate) inner: F,
    pub(crate) json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithCall<F>
where
    F: FormatEvent<S, N>,
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        if self.json && has_repeated_field(event) {
            // Strict JSON ingesters reject a key given twice. OpenTelemetry's internal
            // events carry a `message` field beside the (empty) format message; keep the
            // last value of each key, which is the explicit field. Rare, so it may be slow.
            let mut line = String::new();
            self.format_with_call(ctx, Writer::new(&mut line), event)?;
            return match serde_json::from_str::<serde_json::Value>(line.trim_end()) {
                Ok(value) => writeln!(writer, "{value}"),
                Err(_) => writer.write_str(&line),
            };
        }
        self.format_with_call(ctx, writer, event)
    }
}

/// Whether two of the event's fields have the same name (`message` and a format message).
fn has_repeated_field(event: &tracing::Event<'_>) -> bool {
    let fields = event.metadata().fields();
    fields
        .iter()
        .enumerate()
        .any(|(i, a)| fields.iter().skip(i + 1).any(|b| a.name() == b.name()))
}

impl<F> WithCall<F> {
    fn format_with_call<S, N>(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result
    where
        F: FormatEvent<S, N>,
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'w> FormatFields<'w> + 'static,
    {
        let Some(call) = crate::context::current().filter(|c| c.method.is_some()) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.trim_end_matches('\n');
        let (head, newline) = line.split_at(body.len());
        let span = call.trace.span();
        let trace = span.span_context();
        let trace_id = trace.is_valid().then(|| trace.trace_id().to_string());
        let method = call.method.as_deref().unwrap_or_default();
        let caller = call.caller.as_deref().unwrap_or_default();
        match head.strip_suffix('}') {
            Some(object) if self.json => {
                writer.write_str(object)?;
                writer.write_str(",\"call\":")?;
                let mut call_object = JsonObject::new(&mut writer, false);
                call_object.text("method", method);
                call_object.text("caller", caller);
                if let Some(id) = &trace_id {
                    call_object.text("trace_id", id);
                }
                call_object.close()?;
                writer.write_char('}')?;
            }
            _ => {
                writer.write_str(head)?;
                write!(writer, " method={method} caller={caller}")?;
                if let Some(id) = &trace_id {
                    write!(writer, " trace_id={id}")?;
                }
            }
        }
        writer.write_str(newline)
    }
}

/// Span fields as one JSON object, written straight into the span's buffer, for the JSON
/// log format. tracing-subscriber's own `JsonFields` builds a map of `serde_json::Value`s for
/// every span first, though most spans' fields are never logged.
/// `otel.*` fields only steer the OpenTelemetry layer and stay out of log lines.
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonSpanFields;

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        // Built in a reused buffer and written once: the span's own buffer starts empty and
        // would otherwise grow (reallocate) several times per span.
        let direct = |writer: &mut Writer<'w>| {
            let mut object = JsonObject::new(writer, false);
            fields.record(&mut object);
            object.close()
        };
        let buffered = SCRATCH.try_with(|cell| {
            // Busy only if a field's formatting opened a span; write directly then.
            let Ok(mut scratch) = cell.try_borrow_mut() else {
                return None;
            };
            scratch.clear();
            let mut object = JsonObject::new(&mut *scratch, false);
            fields.record(&mut object);
            Some(object.close().and_then(|()| writer.write_str(&scratch)))
        });
        match buffered {
            Ok(Some(result)) => result,
            _ => direct(&mut writer),
        }
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &span::Record<'_>,
    ) -> fmt::Result {
        // Reopen the object: drop its closing brace and go on after the last field.
        let reopened = current.fields.ends_with('}');
        let had_fields = reopened && current.fields.len() > 2;
        if reopened {
            current.fields.pop();
        }
        let mut writer = current.as_writer();
        let mut object = JsonObject::new(&mut writer, reopened);
        object.any = had_fields;
        fields.record(&mut object);
        object.close()
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Writes `"name":value` pairs of a JSON object as a visitor hands them over.
struct JsonObject<'a, W: fmt::Write> {
    out: &'a mut W,
    opened: bool,
    any: bool,
    result: fmt::Result,
}

impl<'a, W: fmt::Write> JsonObject<'a, W> {
    fn new(out: &'a mut W, opened: bool) -> Self {
        Self {
            out,
            opened,
            any: false,
            result: Ok(()),
        }
    }

    /// Writes the key; false if the field is skipped or writing failed.
    fn key(&mut self, field: &Field) -> bool {
        self.name(field.name())
    }

    fn name(&mut self, name: &str) -> bool {
        if self.result.is_err() || name.starts_with("otel.") {
            return false;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let lead = match (self.opened, self.any) {
            (false, _) => "{\"",
            (true, false) => "\"",
            (true, true) => ",\"",
        };
        self.opened = true;
        self.any = true;
        self.result = self
            .out
            .write_str(lead)
            .and_then(|()| JsonEscaped(&mut *self.out).write_str(name))
            .and_then(|()| self.out.write_str("\":"));
        self.result.is_ok()
    }

    fn value(&mut self, field: &Field, raw: impl fmt::Display) {
        if self.key(field) {
            self.result = write!(self.out, "{raw}");
        }
    }

    /// A `"name":"text"` pair.
    fn text(&mut self, name: &str, text: &str) {
        if self.name(name) {
            let out = &mut *self.out;
            self.result = out
                .write_char('"')
                .and_then(|()| JsonEscaped(&mut *out).write_str(text))
                .and_then(|()| out.write_char('"'));
        }
    }

    /// A string value: `text` as it is, or else `value`'s `Debug` (a `Display` for `%x`).
    fn string(&mut self, field: &Field, value: impl fmt::Debug, text: Option<&str>) {
        if self.key(field) {
            let out = &mut *self.out;
            self.result = out
                .write_char('"')
                .and_then(|()| {
                    let mut escaped = JsonEscaped(&mut *out);
                    match text {
                        Some(s) => escaped.write_str(s),
                        None => write!(escaped, "{value:?}"),
                    }
                })
                .and_then(|()| out.write_char('"'));
        }
    }

    fn close(self) -> fmt::Result {
        self.result?;
        match self.opened {
            true => self.out.write_char('}'),
            false => self.out.write_str("{}"),
        }
    }
}

impl<W: fmt::Write> Visit for JsonObject<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.string(field, (), Some(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.value(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.value(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.value(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinities.
        if value.is_finite() {
            self.value(field, value);
        } else {
            self.string(field, value, None);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.string(field, value, None);
    }
}

/// Escapes what passes through for the inside of a JSON string.
struct JsonEscaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for JsonEscaped<'_, W> {
    fn write_str(&mut self, mut s: &str) -> fmt::Result {
        // Most values need no escaping: one scan, one write.
        while let Some(i) = s.bytes().position(|b| b < 0x20 || b == b'"' || b == b'\\') {
            self.0.write_str(&s[..i])?;
            match s.as_bytes()[i] {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                b => write!(self.0, "\\u{b:04x}")?,
            }
            s = &s[i + 1..];
        }
        self.0.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use super::*;
    use crate::telemetry::{LogFormat, get_subscriber};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn raw_json_lines(f: impl FnOnce()) -> Vec<String> {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = get_subscriber("info", LogFormat::Json, move || sink.clone(), None);
        tracing::subscriber::with_default(subscriber, f);
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn json_lines(f: impl FnOnce()) -> Vec<serde_json::Value> {
        raw_json_lines(f)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn an_event_with_a_message_field_and_a_format_message_has_one_message_key() {
        // The shape of OpenTelemetry's internal events (otel_info! and friends).
        let call = crate::context::CallContext {
            method: Some("/tessera.posts.v1.PostService/GetPost".into()),
            ..Default::default()
        };
        let lines = raw_json_lines(|| {
            tracing::info!(name: "TracerProvider.GlobalSet", name = "TracerProvider.GlobalSet", message = "set", "");
            crate::context::sync_scope(call, || tracing::info!(message = "inside", ""));
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        for line in &lines {
            assert_eq!(line.matches("\"message\":").count(), 1, "{line}");
        }
        assert_eq!(lines[0].matches("\"name\":").count(), 1, "{}", lines[0]);
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["fields"]["message"], "set");
        let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["fields"]["message"], "inside");
        assert_eq!(
            second["call"]["method"],
            "/tessera.posts.v1.PostService/GetPost"
        );
    }

    #[test]
    fn span_fields_are_valid_escaped_json_without_otel_fields() {
        let tricky = "quote \" backslash \\ newline \n tab \t bell \u{7} é";
        let lines = json_lines(|| {
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = "ignored",
                method = tricky,
                count = 3u64,
                ratio = f64::NAN,
                ok = true,
                shown = %"display",
                late = tracing::field::Empty,
            );
            span.record("late", 7i64);
            let _entered = span.enter();
            tracing::info!("inside");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let span = &lines[0]["span"];
        assert_eq!(span["method"], tricky);
        assert_eq!(span["count"], 3);
        assert_eq!(span["ratio"], "NaN");
        assert_eq!(span["ok"], true);
        assert_eq!(span["shown"], "display");
        assert_eq!(span["late"], 7);
        assert_eq!(span["name"], "grpc.server");
        assert!(span.get("otel.name").is_none(), "{span}");
        assert_eq!(lines[0]["fields"]["message"], "inside");
    }

    #[test]
    fn a_span_without_fields_and_a_field_recorded_later() {
        let lines = json_lines(|| {
            let span = tracing::info_span!("bare", later = tracing::field::Empty);
            let _entered = span.enter();
            tracing::info!("first");
            span.record("later", "now");
            tracing::info!("second");
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["span"]["name"], "bare");
        assert!(lines[0]["span"].get("later").is_none());
        assert_eq!(lines[1]["span"]["later"], "now");
    }

    #[test]
    fn log_lines_inside_a_call_carry_its_method_caller_and_trace_id() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let remote = SpanContext::new(
            trace_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let call = crate::context::CallContext {
            method: Some("/tessera.posts.v1.PostService/GetPost".into()),
            caller: Some("gate\"way".into()),
            trace: opentelemetry::Context::new().with_remote_span_context(remote),
            ..Default::default()
        };
        let lines = json_lines(|| {
            tracing::info!("outside");
            crate::context::sync_scope(call, || tracing::warn!(n = 1, "inside"));
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].get("call").is_none(), "{}", lines[0]);
        let inside = &lines[1];
        assert_eq!(inside["fields"]["message"], "inside");
        assert_eq!(inside["fields"]["n"], 1);
        assert_eq!(
            inside["call"]["method"],
            "/tessera.posts.v1.PostService/GetPost"
        );
        assert_eq!(inside["call"]["caller"], "gate\"way");
        assert_eq!(inside["call"]["trace_id"], trace_id.to_string());
    }
}
