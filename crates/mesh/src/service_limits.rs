//! Limits the services enforce on work an anonymous or hostile client can make them do:
//! password hashing (users) and live notification streams (notifications).
//!
//! Not for: limits of the public port itself (connections, streams per connection, rate
//! limits); the gateway owns those. Parsed from `TESSERA_*` settings like the rest of
//! [`crate::config::Settings`], with the same rule: a bad value names the setting.

use std::{num::NonZeroUsize, time::Duration};

use crate::config::ConfigError;

/// The settings, with their defaults in [`ServiceLimits::default`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceLimits {
    /// argon2 hashes computed at once (`TESSERA_PASSWORD_HASH_CONCURRENCY`). Each holds its
    /// memory cost (19 MiB by default) while it runs, so this bounds the users process's
    /// memory as well as its CPU.
    pub password_hash_concurrency: usize,
    /// Hashes that may wait for a turn (`TESSERA_PASSWORD_HASH_QUEUE`); past it,
    /// RESOURCE_EXHAUSTED at once.
    pub password_hash_queue: usize,
    /// Failed logins one username may take per minute on a replica before further attempts,
    /// right or wrong, are refused until the count decays (`TESSERA_LOGIN_FAILURES_PER_MIN`).
    pub login_failures_per_minute: u32,
    /// Open SubscribeNotifications streams one user may hold on a replica
    /// (`TESSERA_SUBSCRIPTIONS_PER_USER`).
    pub subscriptions_per_user: usize,
    /// Open SubscribeNotifications streams on a replica (`TESSERA_SUBSCRIPTIONS_PER_REPLICA`).
    pub subscriptions_per_replica: usize,
    /// How long a SubscribeNotifications stream lives before it is ended with UNAVAILABLE
    /// and the client resubscribes (`TESSERA_SUBSCRIPTION_MAX_LIFETIME_S`).
    pub subscription_max_lifetime: Duration,
}

/// The CPUs this process may use: `available_parallelism` honours a cgroup CPU quota (a
/// Kubernetes CPU limit), so the default follows the Deployment's `limits.cpu`.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

impl Default for ServiceLimits {
    fn default() -> Self {
        Self {
            password_hash_concurrency: cpus(),
            password_hash_queue: 16,
            login_failures_per_minute: 10,
            subscriptions_per_user: 5,
            // Half of the HTTP/2 stream limit of one connection (1024): a gateway whose one
            // connection reaches a full replica still has room on it for unary calls.
            subscriptions_per_replica: 512,
            subscription_max_lifetime: Duration::from_secs(900),
        }
    }
}

/// `key` as a whole number of at least `min` (unset or blank: `default`).
fn count(
    lookup: &dyn Fn(&str) -> Option<String>,
    key: &str,
    default: u64,
    min: u64,
) -> Result<u64, ConfigError> {
    let Some(value) = lookup(key).filter(|v| !v.trim().is_empty()) else {
        return Ok(default);
    };
    match value.trim().parse::<u64>() {
        Ok(n) if n >= min && n <= u64::from(u32::MAX) => Ok(n),
        _ => Err(ConfigError::new(
            key,
            format!(
                "expected a whole number from {min} to {}, got {value:?}",
                u32::MAX
            ),
        )),
    }
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl ServiceLimits {
    /// Reads the settings through `lookup` (an environment-like map).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            password_hash_concurrency: usize_of(count(
                lookup,
                "TESSERA_PASSWORD_HASH_CONCURRENCY",
                d.password_hash_concurrency as u64,
                1,
            )?),
            password_hash_queue: usize_of(count(
                lookup,
                "TESSERA_PASSWORD_HASH_QUEUE",
                d.password_hash_queue as u64,
                0,
            )?),
            login_failures_per_minute: u32::try_from(count(
                lookup,
                "TESSERA_LOGIN_FAILURES_PER_MIN",
                u64::from(d.login_failures_per_minute),
                1,
            )?)
            .unwrap_or(u32::MAX),
            subscriptions_per_user: usize_of(count(
                lookup,
                "TESSERA_SUBSCRIPTIONS_PER_USER",
                d.subscriptions_per_user as u64,
                1,
            )?),
            subscriptions_per_replica: usize_of(count(
                lookup,
                "TESSERA_SUBSCRIPTIONS_PER_REPLICA",
                d.subscriptions_per_replica as u64,
                1,
            )?),
            subscription_max_lifetime: Duration::from_secs(count(
                lookup,
                "TESSERA_SUBSCRIPTION_MAX_LIFETIME_S",
                d.subscription_max_lifetime.as_secs(),
                1,
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn defaults_and_overrides() {
        let d = ServiceLimits::from_lookup(&lookup(&[])).unwrap();
        assert_eq!(d, ServiceLimits::default());
        assert!(d.password_hash_concurrency >= 1);
        let s = ServiceLimits::from_lookup(&lookup(&[
            ("TESSERA_PASSWORD_HASH_CONCURRENCY", "3"),
            ("TESSERA_PASSWORD_HASH_QUEUE", "0"),
            ("TESSERA_LOGIN_FAILURES_PER_MIN", " 7 "),
            ("TESSERA_SUBSCRIPTIONS_PER_USER", "2"),
            ("TESSERA_SUBSCRIPTIONS_PER_REPLICA", "100"),
            ("TESSERA_SUBSCRIPTION_MAX_LIFETIME_S", "60"),
        ]))
        .unwrap();
        assert_eq!(s.password_hash_concurrency, 3);
        assert_eq!(s.password_hash_queue, 0);
        assert_eq!(s.login_failures_per_minute, 7);
        assert_eq!(s.subscriptions_per_user, 2);
        assert_eq!(s.subscriptions_per_replica, 100);
        assert_eq!(s.subscription_max_lifetime, Duration::from_secs(60));
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (key, value) in [
            ("TESSERA_PASSWORD_HASH_CONCURRENCY", "0"),
            ("TESSERA_PASSWORD_HASH_CONCURRENCY", "two"),
            ("TESSERA_PASSWORD_HASH_QUEUE", "-1"),
            ("TESSERA_LOGIN_FAILURES_PER_MIN", "0"),
            ("TESSERA_LOGIN_FAILURES_PER_MIN", "1.5"),
            ("TESSERA_SUBSCRIPTIONS_PER_USER", "0"),
            ("TESSERA_SUBSCRIPTIONS_PER_REPLICA", "99999999999"),
            ("TESSERA_SUBSCRIPTION_MAX_LIFETIME_S", "0"),
            ("TESSERA_SUBSCRIPTION_MAX_LIFETIME_S", "10m"),
        ] {
            let pairs = [(key, value)];
            let err = ServiceLimits::from_lookup(&lookup(&pairs)).unwrap_err();
            assert_eq!(err.setting, key, "{err}");
        }
    }
}
