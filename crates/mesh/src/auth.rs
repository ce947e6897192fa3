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
            self.try_refresh().await;
        }
        self.current.load().verify(token)
    }

    async fn try_refresh(&self) {
        let Some(refresh) = &self.refresh else { return };
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
