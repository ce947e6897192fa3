//! Failed-login throttling per username, so one account's password cannot be guessed at the
//! speed of the hashing pool.
//!
//! Each username that failed has a level: one per failure, draining at `per_minute` per
//! minute. While one more failure would take the level past `per_minute`, every login for that name is refused
//! with [`Error::Throttled`] (RESOURCE_EXHAUSTED with a retry hint) before any hashing, the
//! right password included: otherwise the guessing would just go on and the success would
//! tell the attacker when to stop. Unknown usernames are tracked the same way, so the answer
//! does not tell which names exist. A successful login forgets the name's failures.
//!
//! Memory is bounded: at most [`MAX_TRACKED`] names. When full, names whose level has drained
//! go first, then the one with the lowest level; a name under attack has the highest, so
//! spraying other names does not lift its throttle.
//!
//! The state is per replica (in memory): with R replicas a name gets R × `per_minute`
//! guesses a minute at most, still a bound, without a database write per failed login.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::Error;

/// The most usernames tracked at once (about 150 bytes each).
pub(crate) const MAX_TRACKED: usize = 10_000;

struct Level {
    failures: f64,
    at: Instant,
}

/// The failed-login levels of this process.
pub(crate) struct LoginThrottle {
    per_minute: f64,
    capacity: usize,
    names: Mutex<HashMap<String, Level>>,
}

impl LoginThrottle {
    /// `per_minute` is raised to at least one.
    pub(crate) fn new(per_minute: u32) -> Self {
        Self::with_capacity(per_minute, MAX_TRACKED)
    }

    fn with_capacity(per_minute: u32, capacity: usize) -> Self {
        Self {
            per_minute: f64::from(per_minute.max(1)),
            capacity: capacity.max(1),
            names: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Level>> {
        // Never held across an await; the map is consistent after any panic.
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The level of `level` at `now`, after draining.
    fn drained(&self, level: &Level, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(level.at).as_secs_f64();
        (level.failures - elapsed * self.per_minute / 60.0).max(0.0)
    }

    /// Fails with [`Error::Throttled`] while `username` may not try to log in.
    pub(crate) fn check(&self, username: &str) -> Result<(), Error> {
        self.check_at(username, Instant::now())
    }

    fn check_at(&self, username: &str, now: Instant) -> Result<(), Error> {
        let names = self.lock();
        let Some(level) = names.get(username) else {
            return Ok(());
        };
        // An attempt may go ahead when its failure would still fit: level + 1 <= per_minute
        // (with a little slack for floating point).
        let over = self.drained(level, now) + 1.0 - self.per_minute;
        if over <= 1e-9 {
            return Ok(());
        }
        let wait = over * 60.0 / self.per_minute;
        Err(Error::Throttled(Duration::from_secs_f64(wait.ceil())))
    }

    /// Records a failed login for `username`.
    pub(crate) fn failed(&self, username: &str) {
        self.failed_at(username, Instant::now());
    }

    fn failed_at(&self, username: &str, now: Instant) {
        let mut names = self.lock();
        if let Some(level) = names.get_mut(username) {
            let failures = self.drained(level, now) + 1.0;
            *level = Level { failures, at: now };
            return;
        }
        if names.len() >= self.capacity {
            self.make_room(&mut names, now);
        }
        names.insert(
            username.to_owned(),
            Level {
                failures: 1.0,
                at: now,
            },
        );
    }

    fn make_room(&self, names: &mut HashMap<String, Level>, now: Instant) {
        names.retain(|_, level| self.drained(level, now) > 0.0);
        if names.len() < self.capacity {
            return;
        }
        let lowest = names
            .iter()
            .min_by(|a, b| self.drained(a.1, now).total_cmp(&self.drained(b.1, now)))
            .map(|(name, _)| name.clone());
        if let Some(name) = lowest {
            names.remove(&name);
        }
    }

    /// A successful login: `username`'s failures are forgotten.
    pub(crate) fn succeeded(&self, username: &str) {
        self.lock().remove(username);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tonic::{Code, Status};

    use super::*;

    fn retry_after(result: Result<(), Error>) -> Duration {
        match result {
            Err(Error::Throttled(after)) => after,
            other => panic!("expected Throttled, got {other:?}"),
        }
    }

    #[test]
    fn past_the_limit_every_attempt_is_refused_until_it_drains() {
        let t = LoginThrottle::new(6); // one failure drains every 10 s
        let start = Instant::now();
        for _ in 0..6 {
            t.check_at("alice", start).unwrap();
            t.failed_at("alice", start);
        }
        let wait = retry_after(t.check_at("alice", start));
        assert_eq!(wait, Duration::from_secs(10));
        let status = Status::from(Error::Throttled(wait));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("10 s"), "{}", status.message());
        // Others are not affected.
        t.check_at("bob", start).unwrap();
        // Still refused just before one failure has drained, allowed after.
        let later = start + Duration::from_secs(9);
        assert_eq!(
            retry_after(t.check_at("alice", later)),
            Duration::from_secs(1)
        );
        t.check_at("alice", start + Duration::from_secs(10))
            .unwrap();
        // One more failure and it is throttled again: the level is still near the limit.
        t.failed_at("alice", start + Duration::from_secs(10));
        retry_after(t.check_at("alice", start + Duration::from_secs(10)));
        // After a minute of quiet everything has drained.
        t.check_at("alice", start + Duration::from_secs(80))
            .unwrap();
    }

    #[test]
    fn a_slow_guesser_stays_under_the_limit() {
        let t = LoginThrottle::new(6);
        let start = Instant::now();
        for i in 0..30 {
            let now = start + Duration::from_secs(11 * i);
            t.check_at("alice", now).unwrap();
            t.failed_at("alice", now);
        }
    }

    #[test]
    fn success_forgets_the_failures() {
        let t = LoginThrottle::new(3);
        let now = Instant::now();
        t.failed_at("alice", now);
        t.failed_at("alice", now);
        t.succeeded("alice");
        t.failed_at("alice", now);
        t.failed_at("alice", now);
        t.check_at("alice", now).unwrap();
        assert_eq!(t.tracked(), 1);
    }

    #[test]
    fn tracked_names_are_bounded_and_the_attacked_name_stays() {
        let t = LoginThrottle::with_capacity(5, 100);
        let now = Instant::now();
        for _ in 0..5 {
            t.failed_at("victim", now);
        }
        // Spraying many other names fills the table but evicts the least failed.
        for i in 0..1000 {
            t.failed_at(&format!("spray{i}"), now);
        }
        assert_eq!(t.tracked(), 100);
        retry_after(t.check_at("victim", now));
        // Drained names are the first to go.
        let later = now + Duration::from_secs(3600);
        t.failed_at("newcomer", later);
        assert_eq!(t.tracked(), 1);
    }
}
