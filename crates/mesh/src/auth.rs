//! End-user authentication as seen by handlers: the verified [`EndUser`] in the request
//! extensions, and the key set that verifies tokens, refreshed from UserService.GetJwks when
//! a token names a key it does not know.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
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
    last_refresh: Arc<tokio::sync::Mutex<Option<Instant>>>,
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

    /// One refresh at a time: callers that arrive while one is in flight wait for it and then
    /// look again, rather than failing on the keys from before it (a page that logs in and
    /// makes two calls at once used to get UNAUTHENTICATED on the second).
    async fn try_refresh(&self, kid: &str) {
        let Some(refresh) = &self.refresh else { return };
        let mut last = self.last_refresh.lock().await;
        if self.current.load().knows(kid) {
            return;
        }
        if last.is_some_and(|t| t.elapsed() < MIN_REFRESH_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
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
    use crate::token::Signer;

    #[tokio::test]
    async fn concurrent_callers_share_one_refresh() {
        let signer = Arc::new(Signer::generate().unwrap());
        let fetches = Arc::new(AtomicUsize::new(0));
        let keys = {
            let signer = signer.clone();
            let fetches = fetches.clone();
            TokenKeys::fetched(move || {
                let signer = signer.clone();
                let fetches = fetches.clone();
                async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    // A slow JWKS call, so the other callers arrive while it is in flight.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let mut v = Verifier::new();
                    v.add_key(signer.kid(), signer.public_key());
                    Ok(v)
                }
            })
        };
        let (token, _) = signer.sign("u1", "USER", Duration::from_secs(60));
        let calls = (0..4).map(|_| {
            let keys = keys.clone();
            let token = token.clone();
            async move { keys.verify(&token).await }
        });
        for result in futures::future::join_all(calls).await {
            assert_eq!(result.unwrap().sub, "u1");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }
}
