//! End-user authentication as seen by handlers: the verified [`EndUser`] in the request
//! extensions, and the key set that verifies tokens, refreshed from UserService.GetJwks when
//! a token names a key it does not know (one fetch at a time; calls wait for it).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tonic::{Request, Status};

pub use crate::token::{EndUser, UserClaims};
use crate::{
    token::{TokenError, Verifier, now_secs},
    token_cache::{DEFAULT_CAPACITY, TokenCache},
};

/// The verified end user of a request, or UNAUTHENTICATED.
///
/// The server stack puts the [`EndUser`] into the request after verifying the bearer token
/// (for methods whose rule has `user: true`), so a handler only reads it:
///
/// ```
/// use tessera_mesh::auth::{EndUser, UserClaims, end_user};
/// use tonic::{Code, Request};
///
/// let anonymous = Request::new(());
/// assert_eq!(end_user(&anonymous).unwrap_err().code(), Code::Unauthenticated);
///
/// // What the stack leaves for the handler after checking a token of user "u-1".
/// let mut verified = Request::new(());
/// verified.extensions_mut().insert(EndUser {
///     claims: UserClaims { sub: "u-1".into(), role: "USER".into(), exp: u64::MAX, iat: 0 },
///     token: "the bearer token".into(),
/// });
/// assert_eq!(end_user(&verified).unwrap().claims.sub, "u-1");
/// ```
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
///
/// Fetched keys come from one fetch at a time (single-flight): a call that needs keys while a
/// fetch is in flight waits for that fetch instead of checking against the old set. Before
/// the first successful fetch, calls wait (up to [`KEY_WAIT`]) for the keys to arrive; after
/// it, an unknown key id starts at most one fetch per `MIN_REFRESH_INTERVAL` (5 s).
///
/// Verified tokens are remembered ([`crate::token_cache`]), so each token's signature is
/// checked once, not on every call; expiry and the current key set are checked on every call.
#[derive(Clone)]
pub struct TokenKeys {
    current: Arc<ArcSwap<Verifier>>,
    refresh: Option<Refresh>,
    fetches: Arc<Fetches>,
    verified: Arc<TokenCache>,
}

/// The bookkeeping of fetches, touched only when a token names a key not in the set (never
/// on the path of a call whose key is known).
struct Fetches {
    state: Mutex<FetchState>,
    /// Counts finished fetches (successful or not); waiters watch it.
    finished: watch::Sender<u64>,
    /// Some fetch has succeeded (always true for fixed keys).
    loaded: AtomicBool,
}

#[derive(Default)]
struct FetchState {
    in_flight: bool,
    last_start: Option<Instant>,
}

/// Unknown key ids trigger at most one refresh per this interval, so forged tokens with
/// random key ids cannot turn into a flood of GetJwks calls.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Until the first fetch succeeds, fetches are retried this often (by waiting calls and by
/// [`TokenKeys::until_loaded`]).
const STARTUP_RETRY: Duration = Duration::from_millis(250);
/// The longest a call waits for keys before it is checked against what is there.
pub const KEY_WAIT: Duration = Duration::from_secs(5);
/// One fetch may take this long; past it, it counts as failed.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

impl Fetches {
    fn new(loaded: bool) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            finished: watch::Sender::new(0),
            loaded: AtomicBool::new(loaded),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FetchState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl TokenKeys {
    /// A fixed key set (the users service knows its own keys).
    pub fn fixed(verifier: Verifier) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(verifier)),
            refresh: None,
            fetches: Fetches::new(true),
            verified: Arc::new(TokenCache::new(DEFAULT_CAPACITY)),
        }
    }

    /// A key set fetched by `refresh` (typically UserService.GetJwks): at start-up
    /// ([`TokenKeys::until_loaded`]), on first use, and whenever a token names an unknown key.
    pub fn fetched<F, Fut>(refresh: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Verifier>> + Send + 'static,
    {
        Self {
            current: Arc::new(ArcSwap::from_pointee(Verifier::new())),
            refresh: Some(Arc::new(move || Box::pin(refresh()))),
            fetches: Fetches::new(false),
            verified: Arc::new(TokenCache::new(DEFAULT_CAPACITY)),
        }
    }

    /// Replaces the key set.
    pub fn set(&self, verifier: Verifier) {
        self.current.store(Arc::new(verifier));
        self.fetches.loaded.store(true, Ordering::Release);
    }

    /// Whether keys are there to verify with: fixed, or fetched at least once.
    pub fn loaded(&self) -> bool {
        self.fetches.loaded.load(Ordering::Acquire)
    }

    /// Fetches until a fetch succeeds (at once if keys are already loaded), retrying every
    /// `STARTUP_RETRY`; each failure is logged. Readiness waits on this.
    pub async fn until_loaded(&self) {
        let mut failures = 0u32;
        while !self.loaded() {
            let mut finished = self.fetches.finished.subscribe();
            let seen = *finished.borrow_and_update();
            if self.start_fetch(STARTUP_RETRY) || self.fetches.lock().in_flight {
                // Wait for this fetch (ours or one a call started) to finish.
                let _ = finished.wait_for(|n| *n != seen).await;
            }
            if self.loaded() {
                break;
            }
            failures = failures.saturating_add(1);
            tokio::time::sleep(STARTUP_RETRY.saturating_mul(failures.min(4))).await;
        }
    }

    /// Verifies a token, refreshing the keys (once, shared with concurrent calls) if it names
    /// an unknown key. A token verified before is answered from the cache while it has not
    /// expired and its key is still in the set.
    pub async fn verify(&self, token: &str) -> Result<UserClaims, TokenError> {
        if let Some(known) = self.verified.get(token, &self.current.load(), now_secs()) {
            return known;
        }
        let kid = Verifier::peek_kid(token)?;
        if !self.current.load().knows(&kid) {
            self.wait_for_key(&kid).await;
        }
        // One snapshot of the key set for the check and the cache entry.
        let verifier = self.current.load();
        let claims = verifier.verify(token)?;
        self.verified.insert(token, &claims, &kid, &verifier);
        Ok(claims)
    }

    /// Returns once `kid` is known, or once nothing more can be learned: the fetch that was
    /// in flight (or that this call started) finished with keys loaded, a fresh fetch is
    /// rate-limited, or [`KEY_WAIT`] passed.
    async fn wait_for_key(&self, kid: &str) {
        if self.refresh.is_none() {
            return;
        }
        let deadline = tokio::time::Instant::now() + KEY_WAIT;
        let mut finished = self.fetches.finished.subscribe();
        loop {
            let seen = *finished.borrow_and_update();
            let interval = if self.loaded() {
                MIN_REFRESH_INTERVAL
            } else {
                STARTUP_RETRY
            };
            let started = self.start_fetch(interval);
            let in_flight = started || self.fetches.lock().in_flight;
            if self.current.load().knows(kid) {
                return;
            }
            if in_flight {
                let finished = tokio::time::timeout_at(deadline, finished.wait_for(|n| *n != seen));
                if !matches!(finished.await, Ok(Ok(_))) {
                    return;
                }
                if self.loaded() {
                    // The fetch this call waited for is the answer, known key or not.
                    return;
                }
            } else if self.loaded() {
                // Rate-limited: the key set is as fresh as it may be.
                return;
            } else {
                // No keys yet and the last fetch failed a moment ago: wait for the next try.
                let retry = tokio::time::Instant::now() + STARTUP_RETRY;
                if retry >= deadline {
                    return;
                }
                let _ = tokio::time::timeout_at(retry, finished.changed()).await;
            }
        }
    }

    /// Starts a fetch in the background unless one is in flight or one started less than
    /// `interval` ago; true if it started one.
    fn start_fetch(&self, interval: Duration) -> bool {
        let Some(refresh) = &self.refresh else {
            return false;
        };
        {
            let mut state = self.fetches.lock();
            if state.in_flight || state.last_start.is_some_and(|t| t.elapsed() < interval) {
                return false;
            }
            state.in_flight = true;
            state.last_start = Some(Instant::now());
        }
        // Its own task: a caller that gives up must not cancel the fetch others wait for.
        let fetch = refresh();
        let keys = self.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
                Ok(Ok(verifier)) => keys.set(verifier),
                Ok(Err(err)) => tracing::warn!(error = %err, "fetching token keys failed"),
                Err(_) => tracing::warn!(
                    timeout = ?FETCH_TIMEOUT,
                    "fetching token keys failed: no answer in time"
                ),
            }
            keys.fetches.lock().in_flight = false;
            keys.fetches
                .finished
                .send_modify(|n| *n = n.wrapping_add(1));
        });
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::token::{DEFAULT_TOKEN_TTL, Signer};

    /// Keys fetched by a stand-in for GetJwks that counts its calls, takes `delay`, and
    /// fails while `failing` is set.
    fn slow_keys(
        signer: &Signer,
        delay: Duration,
        fetches: Arc<AtomicUsize>,
        failing: Arc<AtomicBool>,
    ) -> TokenKeys {
        let (kid, x) = (signer.kid().to_owned(), signer.public_key_b64());
        TokenKeys::fetched(move || {
            let (kid, x) = (kid.clone(), x.clone());
            let fetches = fetches.clone();
            let failing = failing.clone();
            async move {
                fetches.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                if failing.load(Ordering::SeqCst) {
                    anyhow::bail!("users is unreachable");
                }
                let mut verifier = Verifier::new();
                verifier.add_jwk(&kid, &x)?;
                Ok(verifier)
            }
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_calls_wait_for_one_fetch() {
        let signer = Signer::generate().unwrap();
        let fetches = Arc::new(AtomicUsize::new(0));
        let keys = slow_keys(
            &signer,
            Duration::from_millis(500),
            fetches.clone(),
            Arc::default(),
        );
        let (token, claims) = signer.sign("u-1", "USER", DEFAULT_TOKEN_TTL);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (keys, token) = (keys.clone(), token.clone());
            calls.spawn(async move { keys.verify(&token).await });
        }
        let mut ok = 0;
        while let Some(result) = calls.join_next().await {
            assert_eq!(result.unwrap(), Ok(claims.clone()));
            ok += 1;
        }
        assert_eq!(ok, 50);
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "one fetch for all");
        assert!(keys.loaded());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_key_ids_fetch_at_most_once_per_interval() {
        let signer = Signer::generate().unwrap();
        let fetches = Arc::new(AtomicUsize::new(0));
        let keys = slow_keys(
            &signer,
            Duration::from_millis(50),
            fetches.clone(),
            Arc::default(),
        );
        keys.until_loaded().await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // Forged tokens with new key ids, many at once and one after another: the last fetch
        // was just now, so none of them fetches, and each is refused at once.
        let stranger = Signer::generate().unwrap();
        let (forged, _) = stranger.sign("u-1", "ADMIN", DEFAULT_TOKEN_TTL);
        let started = Instant::now();
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (keys, forged) = (keys.clone(), forged.clone());
            calls.spawn(async move { keys.verify(&forged).await });
        }
        while let Some(result) = calls.join_next().await {
            assert_eq!(result.unwrap(), Err(TokenError::UnknownKey));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        println!("20 forged tokens refused in {:?}", started.elapsed());
        // The genuine key still verifies without a fetch.
        let (token, _) = signer.sign("u-1", "USER", DEFAULT_TOKEN_TTL);
        assert!(keys.verify(&token).await.is_ok());
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_wait_while_users_is_unreachable_and_go_through_when_it_answers() {
        let signer = Signer::generate().unwrap();
        let fetches = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicBool::new(true));
        let keys = slow_keys(
            &signer,
            Duration::from_millis(20),
            fetches.clone(),
            failing.clone(),
        );
        let background = tokio::spawn({
            let keys = keys.clone();
            async move { keys.until_loaded().await }
        });
        let (token, claims) = signer.sign("u-1", "USER", DEFAULT_TOKEN_TTL);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (keys, token) = (keys.clone(), token.clone());
            calls.spawn(async move { keys.verify(&token).await });
        }
        // Several failed fetches, none loaded, every call still waiting.
        let until = Instant::now() + Duration::from_secs(5);
        while fetches.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < until, "fetches are not retried");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!keys.loaded());
        assert_eq!(calls.len(), 10);
        assert!(calls.try_join_next().is_none(), "a call gave up early");
        failing.store(false, Ordering::SeqCst);
        while let Some(result) = calls.join_next().await {
            assert_eq!(result.unwrap(), Ok(claims.clone()));
        }
        tokio::time::timeout(Duration::from_secs(5), background)
            .await
            .unwrap()
            .unwrap();
        assert!(keys.loaded());
        println!(
            "fetches until users answered: {}",
            fetches.load(Ordering::SeqCst)
        );
    }

    #[tokio::test]
    async fn cached_tokens_still_expire_and_still_need_a_known_key() {
        let signer = Signer::generate().unwrap();
        let mut verifier = Verifier::new();
        verifier.add_key(signer.kid(), signer.public_key());
        let keys = TokenKeys::fixed(verifier);
        // Valid for about a second: verified (and cached), then refused once it expires.
        let (short, claims) = signer.sign("u-1", "USER", Duration::from_secs(1));
        assert_eq!(keys.verify(&short).await, Ok(claims.clone()));
        assert_eq!(keys.verify(&short).await, Ok(claims.clone()));
        assert_eq!(keys.verified.len(), 1, "verified once, then from the cache");
        let until = Instant::now() + Duration::from_secs(5);
        while crate::token::now_secs() < claims.exp {
            assert!(Instant::now() < until, "the clock does not move");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(keys.verify(&short).await, Err(TokenError::Expired));

        // A cached token whose key is revoked (a key set without it) is refused.
        let (token, claims) = signer.sign("u-2", "USER", DEFAULT_TOKEN_TTL);
        assert_eq!(keys.verify(&token).await, Ok(claims));
        keys.set(Verifier::new());
        assert_eq!(keys.verify(&token).await, Err(TokenError::UnknownKey));
        // And a token of a key never seen is refused, cache or not.
        let stranger = Signer::generate().unwrap();
        let (forged, _) = stranger.sign("u-2", "ADMIN", DEFAULT_TOKEN_TTL);
        assert_eq!(keys.verify(&forged).await, Err(TokenError::UnknownKey));
    }

    #[tokio::test]
    async fn a_call_waits_no_longer_than_the_key_wait() {
        let signer = Signer::generate().unwrap();
        let failing = Arc::new(AtomicBool::new(true));
        let keys = slow_keys(&signer, Duration::ZERO, Arc::default(), failing);
        let (token, _) = signer.sign("u-1", "USER", DEFAULT_TOKEN_TTL);
        let started = Instant::now();
        assert_eq!(keys.verify(&token).await, Err(TokenError::UnknownKey));
        let waited = started.elapsed();
        assert!(
            waited >= KEY_WAIT - Duration::from_millis(300),
            "{waited:?}"
        );
        assert!(waited < KEY_WAIT + Duration::from_secs(2), "{waited:?}");
    }
}
