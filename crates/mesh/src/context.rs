//! What an outgoing call inherits from the incoming request being handled: the remaining
//! deadline, the end user's token and the trace context. The server stack sets it around each
//! handler; `tessera-client` reads it, so a handler's downstream calls carry it without any
//! code in the handler.

use std::{sync::Arc, time::Instant};

/// The part of an incoming request that flows on to downstream calls, and that log lines
/// written while handling it carry.
#[derive(Clone, Debug, Default)]
pub struct CallContext {
    /// When the incoming call's deadline passes.
    pub deadline: Option<Instant>,
    /// The end user's bearer token, verified on the way in.
    pub token: Option<Arc<str>>,
    /// The gRPC path being served (`/tessera.posts.v1.PostService/GetPost`).
    pub method: Option<Arc<str>>,
    /// The calling workload, from its certificate.
    pub caller: Option<Arc<str>>,
    /// The call's trace: its server span when tracing is on, else the caller's context.
    pub trace: opentelemetry::Context,
}

tokio::task_local! {
    static CURRENT: CallContext;
}

/// `fut` with `ctx` as the current call context while it runs.
pub type Scoped<F> = tokio::task::futures::TaskLocalFuture<CallContext, F>;

/// Runs `fut` with `ctx` as the current call context.
pub fn scope<F: Future>(ctx: CallContext, fut: F) -> Scoped<F> {
    CURRENT.scope(ctx, fut)
}

/// Runs `f` with `ctx` as the current call context.
pub fn sync_scope<R>(ctx: CallContext, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(ctx, f)
}

/// The context of the request being handled on this task, if any.
pub fn current() -> Option<CallContext> {
    CURRENT.try_with(Clone::clone).ok()
}
