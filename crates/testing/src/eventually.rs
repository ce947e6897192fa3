//! Waiting for something eventually consistent (an event crossing services, a handler
//! finishing, a certificate reloaded) under a bound, instead of sleeping for a guessed time.

use std::time::{Duration, Instant};

/// How long a test waits by default. Generous: debug builds on a busy 2-core machine; a
/// passing test never waits this long.
pub const BOUND: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Ok`, and returns that value; panics with the last error
/// once `bound` has passed (a check still running at the bound counts as failed).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// let mut polls = 0;
/// let seen = tessera_testing::eventually(Duration::from_secs(5), async || {
///     polls += 1;
///     anyhow::ensure!(polls == 3, "polled {polls} times");
///     Ok(polls)
/// })
/// .await;
/// assert_eq!(seen, 3);
/// # }
/// ```
pub async fn eventually<T>(
    bound: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<T>,
) -> T {
    let deadline = Instant::now() + bound;
    let mut pause = Duration::from_millis(5);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let last = match tokio::time::timeout(remaining, check()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(err)) => err,
            Err(_) => anyhow::anyhow!("the check was still running"),
        };
        if Instant::now() >= deadline {
            panic!("not so within {bound:?}: {last:#}");
        }
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        // Back off a little: a check through the gateway counts against its rate limits.
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Waits until the boolean `condition` holds; it may `.await` and use `?`.
///
/// `eventually!(condition)` waits up to [`BOUND`]; `eventually!(condition, "what")` names what
/// is awaited in the failure (a format string: `"{cursor} reaches {sequence}"`);
/// `eventually!(condition, bound)` waits up to `bound`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// let polls = AtomicUsize::new(0);
/// tessera_testing::eventually!(polls.fetch_add(1, Ordering::SeqCst) == 2, "a third poll");
/// assert_eq!(polls.load(Ordering::SeqCst), 3);
/// # }
/// ```
#[macro_export]
macro_rules! eventually {
    ($cond:expr $(,)?) => {
        $crate::eventually!($cond, $crate::BOUND)
    };
    ($cond:expr, $what:literal $(,)?) => {
        $crate::eventually($crate::BOUND, async || -> $crate::anyhow::Result<()> {
            $crate::anyhow::ensure!($cond, $what);
            Ok(())
        })
        .await
    };
    ($cond:expr, $bound:expr $(,)?) => {
        $crate::eventually($bound, async || -> $crate::anyhow::Result<()> {
            $crate::anyhow::ensure!($cond, "`{}` is false", stringify!($cond));
            Ok(())
        })
        .await
    };
}

/// [`eventually()`] for tests without an async runtime (they drive child processes): polls
/// the blocking `check` the same way, on a runtime of its own.
///
/// # Panics
///
/// Also when called from inside an async runtime: use [`eventually()`] there.
pub fn eventually_blocking<T>(bound: Duration, mut check: impl FnMut() -> anyhow::Result<T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap_or_else(|e| panic!("cannot build a runtime to poll on: {e}"))
        .block_on(eventually(bound, async || check()))
}
