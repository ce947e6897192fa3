//! Discovery: a task asks the target's [`Resolve`] every refresh interval and turns the
//! differences into `tower::discover` changes for the balancer.

use std::{
    collections::HashSet,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::uri::Authority;
use tokio::sync::mpsc;
use tower::discover::Change;

use crate::{
    Resolve,
    endpoint::{Connector, Endpoint},
    load::Weighed,
};

/// The changes the resolver task sends, as the `Discover` stream the balancer polls.
pub(crate) struct Discovered {
    rx: mpsc::UnboundedReceiver<Change<SocketAddr, Weighed>>,
}

impl futures::Stream for Discovered {
    type Item = Result<Change<SocketAddr, Weighed>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|change| change.map(Ok))
    }
}

/// What a new replica is built from.
pub(crate) struct EndpointFactory {
    pub(crate) connector: Connector,
    /// The `:authority` for every replica (`dns:` targets), or each replica's address.
    pub(crate) authority: Option<Authority>,
    pub(crate) default_rtt: Duration,
    pub(crate) decay: Duration,
}

impl EndpointFactory {
    fn make(&self, addr: SocketAddr) -> Option<Weighed> {
        let authority = match &self.authority {
            Some(authority) => authority.clone(),
            None => Authority::try_from(addr.to_string()).ok()?,
        };
        Some(Weighed::new(
            Endpoint::new(addr, authority, self.connector.clone()),
            self.default_rtt,
            self.decay,
        ))
    }
}

/// Starts the resolver task on the current runtime. It resolves at once, then every
/// `interval`, and ends when the balancer (the stream's receiver) is dropped.
pub(crate) fn spawn(
    resolver: Arc<dyn Resolve>,
    interval: Duration,
    factory: EndpointFactory,
) -> Discovered {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut current: HashSet<SocketAddr> = HashSet::new();
        loop {
            let answer = tokio::select! {
                _ = tx.closed() => return,
                answer = resolver.resolve() => answer,
            };
            match answer {
                Ok(addrs) => {
                    let next: HashSet<SocketAddr> = addrs.into_iter().collect();
                    // Removals first: once a new replica serves, a removed one gets nothing.
                    for gone in current.difference(&next) {
                        tracing::debug!(addr = %gone, "replica gone");
                        if tx.send(Change::Remove(*gone)).is_err() {
                            return;
                        }
                    }
                    for new in next.difference(&current) {
                        tracing::debug!(addr = %new, "replica found");
                        let Some(endpoint) = factory.make(*new) else {
                            tracing::warn!(addr = %new, "unusable replica address");
                            continue;
                        };
                        if tx.send(Change::Insert(*new, endpoint)).is_err() {
                            return;
                        }
                    }
                    current = next;
                }
                Err(error) => {
                    tracing::warn!(%error, replicas = current.len(), "resolving the target failed; keeping the last answer");
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
    Discovered { rx }
}
