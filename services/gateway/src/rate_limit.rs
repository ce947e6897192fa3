//! Token buckets per key (end user, client address), in a map whose size is bounded.
//!
//! A bucket that has refilled completely is indistinguishable from a new one, so dropping it
//! loses nothing; when the map reaches its bound those are swept first. If it is still full
//! (many distinct keys all active at once, i.e. an attack from many addresses) a tenth of the
//! entries are dropped arbitrarily: those keys start again from a full bucket, which leaks a
//! little rate under attack instead of letting memory grow or locking out new callers. Each
//! sweep frees at least a tenth of the bound, so the cost is amortised over that many inserts.

use std::{collections::HashMap, hash::Hash, net::IpAddr, sync::Mutex, time::Instant};

/// A token bucket's shape: `burst` requests at once, refilled at `per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quota {
    /// Requests a full bucket allows at once; also the most it holds.
    pub burst: u32,
    /// Requests added back per second, fractions allowed.
    pub per_second: f64,
}

impl Quota {
    /// A quota of `burst` at once, refilled at `per_second`.
    pub const fn new(burst: u32, per_second: f64) -> Self {
        Self { burst, per_second }
    }
}

/// The gateway's rate limits.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimits {
    /// Per end user (the token's `sub`).
    pub per_user: Quota,
    /// Per client address (IPv6 addresses are grouped by /64, what one host usually holds).
    pub per_address: Quota,
    /// At most this many buckets of each kind are kept.
    pub max_tracked: usize,
}

impl Default for RateLimits {
    /// 50 at once then 20/s per user, 200 at once then 100/s per address.
    fn default() -> Self {
        Self::from(tessera_mesh::config::PublicRateLimits::default())
    }
}

/// The limits configured by `TESSERA_RATE_LIMIT_*`.
impl From<tessera_mesh::config::PublicRateLimits> for RateLimits {
    fn from(limits: tessera_mesh::config::PublicRateLimits) -> Self {
        Self {
            per_user: Quota::new(limits.user_burst, limits.user_per_second),
            per_address: Quota::new(limits.address_burst, limits.address_per_second),
            max_tracked: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn refill(&mut self, quota: Quota, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * quota.per_second).min(f64::from(quota.burst));
        self.updated = now;
    }

    fn is_full(&self, quota: Quota, now: Instant) -> bool {
        let mut b = *self;
        b.refill(quota, now);
        b.tokens >= f64::from(quota.burst)
    }
}

/// Token buckets keyed by `K`, at most `max` of them.
#[derive(Debug)]
pub(crate) struct Buckets<K> {
    quota: Quota,
    max: usize,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub(crate) fn new(quota: Quota, max: usize) -> Self {
        Self {
            quota,
            max: max.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; false when its bucket is empty.
    pub(crate) fn try_acquire(&self, key: &K) -> bool {
        self.try_acquire_at(key, Instant::now())
    }

    pub(crate) fn try_acquire_at(&self, key: &K, now: Instant) -> bool {
        // Held only for this synchronous section, never across an await.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(key) && map.len() >= self.max {
            self.sweep(&mut map, now);
        }
        let quota = self.quota;
        let bucket = map.entry(key.clone()).or_insert(Bucket {
            tokens: f64::from(quota.burst),
            updated: now,
        });
        bucket.refill(quota, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn sweep(&self, map: &mut HashMap<K, Bucket>, now: Instant) {
        let quota = self.quota;
        map.retain(|_, b| !b.is_full(quota, now));
        if map.len() >= self.max {
            let drop = (self.max / 10).max(1);
            let victims: Vec<K> = map.keys().take(drop).cloned().collect();
            for k in victims {
                map.remove(&k);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// The key an address is limited under: IPv4 as is, IPv6 by its /64 prefix.
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn limits_come_from_the_settings() {
        let limits = RateLimits::from(tessera_mesh::config::PublicRateLimits {
            user_per_second: 0.5,
            user_burst: 2,
            address_per_second: 7.0,
            address_burst: 9,
        });
        assert_eq!(limits.per_user, Quota::new(2, 0.5));
        assert_eq!(limits.per_address, Quota::new(9, 7.0));
        assert_eq!(RateLimits::default().per_user, Quota::new(50, 20.0));
        assert_eq!(RateLimits::default().per_address, Quota::new(200, 100.0));
    }

    #[test]
    fn bucket_allows_burst_then_refills() {
        let b = Buckets::new(Quota::new(3, 2.0), 10);
        let t0 = Instant::now();
        let k = "u1".to_owned();
        assert!(b.try_acquire_at(&k, t0));
        assert!(b.try_acquire_at(&k, t0));
        assert!(b.try_acquire_at(&k, t0));
        assert!(!b.try_acquire_at(&k, t0), "burst exhausted");
        // Another key has its own bucket.
        assert!(b.try_acquire_at(&"u2".to_owned(), t0));
        // Half a second at 2/s gives one token back, not two.
        let t1 = t0 + secs(0.5);
        assert!(b.try_acquire_at(&k, t1));
        assert!(!b.try_acquire_at(&k, t1));
        // Never more than the burst, however long it waited.
        let t2 = t1 + secs(3600.0);
        for _ in 0..3 {
            assert!(b.try_acquire_at(&k, t2));
        }
        assert!(!b.try_acquire_at(&k, t2));
    }

    #[test]
    fn map_stays_bounded_and_evicts_idle_first() {
        let b = Buckets::new(Quota::new(2, 1.0), 100);
        let t0 = Instant::now();
        // An active key that has spent its burst.
        let hot = 0u32;
        assert!(b.try_acquire_at(&hot, t0));
        assert!(b.try_acquire_at(&hot, t0));
        // Idle keys: one request each, refilled a second later.
        for k in 1..100u32 {
            assert!(b.try_acquire_at(&k, t0));
        }
        assert_eq!(b.len(), 100);
        // A second later the one-token keys are full again, the hot one is not.
        let t1 = t0 + secs(1.0);
        assert!(b.try_acquire_at(&1000, t1));
        assert!(b.len() <= 100);
        assert!(b.len() < 10, "idle buckets were swept, len = {}", b.len());
        // The hot key kept its (partly refilled) state: one token back, not two.
        assert!(b.try_acquire_at(&hot, t1));
        assert!(!b.try_acquire_at(&hot, t1));

        // All keys active and the map full: still bounded.
        let c = Buckets::new(Quota::new(1, 0.001), 50);
        for k in 0..1000u32 {
            c.try_acquire_at(&k, t0);
            assert!(c.len() <= 50);
        }
    }

    #[test]
    fn ipv6_is_grouped_by_prefix() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap_or(IpAddr::from([0; 4]));
        let b: IpAddr = "2001:db8:1:2:ffff::9"
            .parse()
            .unwrap_or(IpAddr::from([0; 4]));
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(IpAddr::from([0; 4]));
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let v4: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([0; 4]));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap_or(IpAddr::from([0; 16]));
        assert_eq!(address_key(mapped), v4);
    }
}
