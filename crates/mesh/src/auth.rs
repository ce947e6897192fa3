//! End-user authentication as seen by handlers: the verified [`EndUser`] in the request
//! extensions, and the key set that verifies tokens, refreshed from UserService.GetJwks when
//! a token names a key it does not know.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tonic::{Request, Status};

pub use crate::token::{EndUser, UserClaims};
use crate::token::{TokenError, Verifier};

/// The verified end user of a request, or UNAUTHENTICATED.
pub fn end_user<T>(req: &Request<T>) -> Result<&EndUser, Status> {
    req.extensions()
        .get::<EndUser>()
        .ok_or_else(|| Status::unauthenticated("an access token is required"))
}

/// The verified end user of a request, if it carried a token.
pub fn maybe_end_user<T>(req: &Request<T>) -> Option<&EndUser> {
    req.extensions().get::<EndUser>()
}

type Refresh =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = anyhow::Result<Verifier>> + Send>> + Send + Sync>;

/// The public keys a service verifies tokens with.
#[derive(Clone)]
pub struct TokenKeys {
    current: Arc<ArcSwap<Verifier>>,
    refresh: Option<Refresh>,
    last_refresh: Arc<Mutex<Option<Instant>>>,
    /// One refresh at a time; callers that wait for it then verify with its keys (without
    /// it, a burst of first tokens on a fresh service saw "unknown key" while the first
    /// fetch was still on its way).
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

/// Unknown key ids trigger at most one refresh per this interval, so forged tokens with
/// random key ids cannot turn into a flood of GetJwks calls.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

impl TokenKeys {
    /// A fixed key set (the users service knows its own keys).
    pub fn fixed(verifier: Verifier) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(verifier)),
            refresh: None,
            last_refresh: Arc::default(),
            refreshing: Arc::default(),
        }
    }

    /// A key set fetched by `refresh` (typically UserService.GetJwks) on first use and
    /// whenever a token names an unknown key.
    pub fn fetched<F, Fut>(refresh: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Verifier>> + Send + 'static,
    {
        Self {
            current: Arc::new(ArcSwap::from_pointee(Verifier::new())),
            refresh: Some(Arc::new(move || Box::pin(refresh()))),
            last_refresh: Arc::default(),
            refreshing: Arc::default(),
        }
    }

    /// Replaces the key set.
    pub fn set(&self, verifier: Verifier) {
        self.current.store(Arc::new(verifier));
    }

    /// Verifies a token, refreshing the keys once if it names an unknown key.
    pub async fn verify(&self, token: &str) -> Result<UserClaims, TokenError> {
        let kid = Verifier::peek_kid(token)?;
        if !self.current.load().knows(&kid) {
            self.try_refresh(&kid).await;
        }
        self.current.load().verify(token)
    }

    async fn try_refresh(&self, kid: &str) {
        let Some(refresh) = &self.refresh else { return };
        let _turn = self.refreshing.lock().await;
        if self.current.load().knows(kid) {
            // Fetched by the refresh this call waited for.
            return;
        }
        {
            let mut last = self
                .last_refresh
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if last.is_some_and(|t| t.elapsed() < MIN_REFRESH_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        match refresh().await {
            Ok(v) => self.set(v),
            Err(err) => tracing::warn!(error = %err, "refreshing token keys failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::token::{DEFAULT_TOKEN_TTL, Signer};

    #[tokio::test]
    async fn a_burst_of_first_tokens_waits_for_one_refresh() {
        let signer = Arc::new(Signer::generate().unwrap());
        let fetches = Arc::new(AtomicUsize::new(0));
        let (s, f) = (signer.clone(), fetches.clone());
        let keys = TokenKeys::fetched(move || {
            let (s, f) = (s.clone(), f.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                // The fetch takes a while: every other caller arrives meanwhile.
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
                let mut v = Verifier::new();
                v.add_key(s.kid(), s.public_key());
                Ok(v)
            }
        });
        let (token, _) = signer.sign("alice", "USER", DEFAULT_TOKEN_TTL);
        let calls = (0..50).map(|_| {
            let keys = keys.clone();
            let token = token.clone();
            tokio::spawn(async move { keys.verify(&token).await })
        });
        for call in calls.collect::<Vec<_>>() {
            assert_eq!(call.await.unwrap().unwrap().sub, "alice");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }
}
