//! What an outgoing call inherits from the incoming request being handled: the remaining
//! deadline, the end user's token and the trace context. The server stack sets it around each
//! handler; `tessera-client` reads it, so a handler's downstream calls carry it without any
//! code in the handler.

use std::{sync::Arc, time::Instant};

/// The part of an incoming request that flows on to downstream calls.
#[derive(Clone, Debug, Default)]
pub struct CallContext {
    /// When the incoming call's deadline passes.
    pub deadline: Option<Instant>,
    /// The end user's bearer token, verified on the way in.
    pub token: Option<Arc<str>>,
}

tokio::task_local! {
    static CURRENT: CallContext;
}

/// Runs `fut` with `ctx` as the current call context.
pub async fn scope<F: Future>(ctx: CallContext, fut: F) -> F::Output {
    CURRENT.scope(ctx, fut).await
}

/// The context of the request being handled on this task, if any.
pub fn current() -> Option<CallContext> {
    CURRENT.try_with(Clone::clone).ok()
}
