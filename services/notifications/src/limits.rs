//! Bounds on SubscribeNotifications streams: how many one user may hold, how many a replica
//! serves, and how long one lives.
//!
//! A stream is cheap to open and holds an HTTP/2 stream (on the gateway's shared connection
//! too) for as long as the client likes, so without bounds a few accounts can take every
//! stream a connection allows and starve everyone's unary calls. Here:
//!
//! - past `per_user` open streams of one user: RESOURCE_EXHAUSTED (the user's own quota;
//!   retrying does not help until they close one);
//! - past `per_replica` open streams: UNAVAILABLE. The replica is full, not the caller over
//!   its quota: UNAVAILABLE is the code clients and balancers treat as "try again, maybe
//!   elsewhere", and another replica may well have room;
//! - after `max_lifetime` (less up to a tenth, so streams opened together do not all end
//!   together) the stream ends with UNAVAILABLE, which tells the client to resubscribe; that
//!   also moves long-lived streams onto replicas added since. A stream also ends when the
//!   access token it was opened with expires (UNAUTHENTICATED): the token authorised it.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{Stream, StreamExt};
use tessera::notifications::v1::SubscribeNotificationsResponse;
use tokio::time::{Instant, Sleep};
use tonic::Status;

use crate::{Error, hub::Subscription};

/// The bounds; the defaults are those of `tessera_mesh::service_limits::ServiceLimits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriptionLimits {
    /// Open streams one user may hold on this replica.
    pub per_user: usize,
    /// Open streams on this replica.
    pub per_replica: usize,
    /// The longest a stream lives before the client must resubscribe.
    pub max_lifetime: Duration,
}

impl Default for SubscriptionLimits {
    fn default() -> Self {
        let d = tessera_mesh::service_limits::ServiceLimits::default();
        Self {
            per_user: d.subscriptions_per_user,
            per_replica: d.subscriptions_per_replica,
            max_lifetime: d.subscription_max_lifetime,
        }
    }
}

#[derive(Default)]
struct Open {
    total: usize,
    per_user: HashMap<String, usize>,
}

/// The open streams of this replica, counted against the limits.
pub(crate) struct Admission {
    limits: SubscriptionLimits,
    open: Mutex<Open>,
}

impl Admission {
    pub(crate) fn new(limits: SubscriptionLimits) -> Self {
        Self {
            limits,
            open: Mutex::new(Open::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // Never held across an await; the counts are consistent after any panic.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new stream of `user_id`, or refuses it.
    pub(crate) fn admit(self: &Arc<Self>, user_id: &str) -> Result<Ticket, Error> {
        let mut open = self.lock();
        let mine = open.per_user.get(user_id).copied().unwrap_or(0);
        if mine >= self.limits.per_user {
            return Err(Error::TooManySubscriptions(self.limits.per_user));
        }
        if open.total >= self.limits.per_replica {
            return Err(Error::ReplicaFull(self.limits.per_replica));
        }
        open.total += 1;
        *open.per_user.entry(user_id.to_owned()).or_insert(0) += 1;
        Ok(Ticket {
            admission: Arc::clone(self),
            user_id: user_id.to_owned(),
        })
    }

    /// Open streams on this replica.
    pub(crate) fn total(&self) -> usize {
        self.lock().total
    }

    /// When a stream admitted now must end: the lifetime less up to a tenth, and never
    /// after its token expires (`token_exp`, seconds since the epoch).
    fn deadline(&self, token_exp: u64) -> (Instant, End) {
        let max = self.limits.max_lifetime;
        // A random fraction in [0, 1) without a dependency: the std hasher's random keys.
        let random = std::collections::hash_map::RandomState::new().hash_one(token_exp);
        let fraction = (random >> 11) as f64 / (1_u64 << 53) as f64;
        let lifetime = max.saturating_sub(max.mul_f64(fraction / 10.0));
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let token_left = Duration::from_secs_f64((token_exp as f64 - now_s).clamp(0.0, 1e9));
        if token_left < lifetime {
            (Instant::now() + token_left, End::TokenExpired)
        } else {
            (Instant::now() + lifetime, End::Lifetime(max))
        }
    }

    /// `inner` under this admission's ticket and lifetime.
    pub(crate) fn bound(
        &self,
        inner: Subscription,
        ticket: Ticket,
        token_exp: u64,
    ) -> BoundedSubscription {
        let (at, end) = self.deadline(token_exp);
        BoundedSubscription {
            live: Some((inner, ticket)),
            ends: Box::pin(tokio::time::sleep_until(at)),
            end,
        }
    }
}

/// One admitted stream; dropping it gives the place back.
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    user_id: String,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_user.get_mut(&self.user_id) {
            *n -= 1;
            if *n == 0 {
                open.per_user.remove(&self.user_id);
            }
        }
    }
}

/// Why a stream ends by itself.
#[derive(Clone, Copy, Debug)]
enum End {
    Lifetime(Duration),
    TokenExpired,
}

impl End {
    fn status(self) -> Status {
        match self {
            End::Lifetime(max) => Status::unavailable(format!(
                "the subscription reached its maximum lifetime ({} s); list notifications \
                 and subscribe again",
                max.as_secs()
            )),
            End::TokenExpired => Status::unauthenticated(
                "the access token this subscription was opened with expired; refresh it and \
                 subscribe again",
            ),
        }
    }
}

/// The SubscribeNotifications response stream: the live notifications of one user until the
/// client goes away, the stream reaches its lifetime, or the hub ends it.
pub struct BoundedSubscription {
    /// Dropped as soon as the stream ends, not when the response body is dropped (which may
    /// be later): the hub's channel and the admitted place are given back at once.
    /// The subscription is dropped before its ticket (tuple fields drop in order).
    live: Option<(Subscription, Ticket)>,
    ends: Pin<Box<Sleep>>,
    end: End,
}

impl Stream for BoundedSubscription {
    type Item = Result<SubscribeNotificationsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.live.is_none() {
            return Poll::Ready(None);
        }
        if self.ends.as_mut().poll(cx).is_ready() {
            self.live = None;
            return Poll::Ready(Some(Err(self.end.status())));
        }
        let Some((inner, _)) = self.live.as_mut() else {
            return Poll::Ready(None);
        };
        match inner.poll_next_unpin(cx) {
            Poll::Ready(None) => {
                self.live = None;
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn admission(per_user: usize, per_replica: usize) -> Arc<Admission> {
        Arc::new(Admission::new(SubscriptionLimits {
            per_user,
            per_replica,
            max_lifetime: Duration::from_secs(100),
        }))
    }

    #[test]
    fn per_user_and_per_replica_caps() {
        let a = admission(2, 3);
        let a1 = a.admit("alice").unwrap();
        let _a2 = a.admit("alice").unwrap();
        let err = Status::from(a.admit("alice").err().unwrap());
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        let _b1 = a.admit("bob").unwrap();
        let err = Status::from(a.admit("carol").err().unwrap());
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert_eq!(a.total(), 3);
        // A closed stream gives its place back, to its user and to the replica.
        drop(a1);
        assert_eq!(a.total(), 2);
        let _c1 = a.admit("carol").unwrap();
        let err = Status::from(a.admit("alice").err().unwrap());
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    }

    #[tokio::test]
    async fn the_lifetime_is_jittered_down_and_capped_by_the_token() {
        let a = admission(1, 1);
        let far = u64::MAX / 2;
        for _ in 0..20 {
            let (at, end) = a.deadline(far);
            let left = at - Instant::now();
            assert!(matches!(end, End::Lifetime(_)));
            assert!(
                left <= Duration::from_secs(100) && left >= Duration::from_secs(89),
                "{left:?}"
            );
        }
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (at, end) = a.deadline(now_s + 10);
        assert!(matches!(end, End::TokenExpired));
        assert!(at - Instant::now() <= Duration::from_secs(10));
        assert_eq!(end.status().code(), tonic::Code::Unauthenticated);
        assert_eq!(
            End::Lifetime(Duration::from_secs(1)).status().code(),
            tonic::Code::Unavailable
        );
    }
}
