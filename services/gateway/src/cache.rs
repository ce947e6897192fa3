//! The gateway's cache of posts and profiles, so a GetPostThread on a popular post costs one
//! downstream call (ListComments) instead of three.
//!
//! What it holds is what every reader may see: posts (no field of a post depends on the
//! reader) and the public view of users (without the email). A reader's own profile and
//! every profile an ADMIN reads are always fetched, since those carry the email (see
//! [`crate::Feed`]).
//!
//! How it stays fresh:
//! - the owners' events ([`follow`]): a follower per owner (users, posts) subscribes to its
//!   `WatchEvents` from now, with no cursor, and drops the key each event names. The cache
//!   of an owner is used only while its follower's stream is open: when the stream breaks,
//!   that part is emptied and bypassed until a new stream is open, since events may have been
//!   missed in between. A change made anywhere (another gateway replica, a cascade) is thus
//!   seen within the event delivery time;
//! - the write path ([`writes`]): an UpdatePost, DeletePost, SetUserRole or DeleteUser passing
//!   through this gateway drops its key before the answer goes back, so the writer's next
//!   read here sees the write without waiting for the event;
//! - an age bound ([`CacheLimits::max_age`]), a backstop should a stream stall unnoticed.
//!
//! Events only invalidate, they never fill: an event can arrive after a fresher copy was
//! fetched (the write path drops the key before its own event comes), and putting its older
//! state back would undo a reader's own write. A fill takes a lease at the miss ([`Lease`]),
//! and any invalidation of the key (or emptying) meanwhile voids it, so a fetch that raced
//! with a change never stores what it read before the change.
//!
//! Bounded by bytes: two generations, each at most half the budget. Entries go into the newer
//! one; when it is full it becomes the older one and the previous older one is dropped; a hit
//! in the older generation moves the entry back to the newer one. That keeps what is read
//! and drops what is not, at the cost of two map lookups on a miss.

pub mod follow;
pub mod writes;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tessera::{posts::v1::Post, users::v1::User};

pub use follow::{follow_post_events, follow_user_events};
pub use writes::invalidating;

/// Bookkeeping counted per entry on top of its encoded size: the key, the map slot, the
/// strings' headers.
const ENTRY_OVERHEAD: usize = 160;

/// How much the cache may hold and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLimits {
    /// Bytes of posts held at most (encoded size plus bookkeeping).
    pub post_bytes: usize,
    /// Bytes of profiles held at most.
    pub user_bytes: usize,
    /// The oldest an entry may be when it is served, whatever the events said.
    pub max_age: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            // About 30 000 posts of a kilobyte; a body is at most 64 KiB.
            post_bytes: 32 * 1024 * 1024,
            user_bytes: 8 * 1024 * 1024,
            max_age: Duration::from_secs(60),
        }
    }
}

/// Hits and misses so far (tests and the benchmark read them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Post lookups served from the cache.
    pub post_hits: u64,
    /// Post lookups that had to fetch, bypassed ones included.
    pub post_misses: u64,
    /// Profile lookups served from the cache.
    pub user_hits: u64,
    /// Profile lookups that had to fetch, bypassed ones included.
    pub user_misses: u64,
}

/// Posts and public profiles, shared by every clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    posts: Part<Post>,
    users: Part<User>,
}

impl Cache {
    /// An empty cache, bypassed until its followers have opened their streams.
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                posts: Part::new(limits.post_bytes, limits.max_age),
                users: Part::new(limits.user_bytes, limits.max_age),
            }),
        }
    }

    /// The post, or a miss (with a lease to fill it when the cache may take it).
    pub fn post(&self, post_id: &str) -> Lookup<'_, Post> {
        self.inner.posts.get(post_id)
    }

    /// The public view of a user, or a miss.
    pub fn user(&self, user_id: &str) -> Lookup<'_, User> {
        self.inner.users.get(user_id)
    }

    /// Drops the post and voids any lease on it (a write path call, before it answers).
    pub fn invalidate_post(&self, post_id: &str) {
        self.inner.posts.invalidate(post_id);
    }

    /// Drops the profile and voids any lease on it.
    pub fn invalidate_user(&self, user_id: &str) {
        self.inner.users.invalidate(user_id);
    }

    /// Whether posts are being cached (their follower's stream is open).
    pub fn posts_live(&self) -> bool {
        self.inner.posts.is_live()
    }

    /// Whether profiles are being cached.
    pub fn users_live(&self) -> bool {
        self.inner.users.is_live()
    }

    /// The hit and miss counts since the cache was made.
    pub fn stats(&self) -> CacheStats {
        let (post_hits, post_misses) = self.inner.posts.counts();
        let (user_hits, user_misses) = self.inner.users.counts();
        CacheStats {
            post_hits,
            post_misses,
            user_hits,
            user_misses,
        }
    }

    pub(crate) fn posts_part(&self) -> &Part<Post> {
        &self.inner.posts
    }

    pub(crate) fn users_part(&self) -> &Part<User> {
        &self.inner.users
    }
}

/// What a lookup found.
pub enum Lookup<'a, V: CacheValue> {
    /// A copy of the stored value, fresh by the events and the age bound.
    Hit(V),
    /// Fetch it; store it with the lease if there is one (there is none while the cache is
    /// bypassed, or while another call already holds the key's lease).
    Miss(Option<Lease<'a, V>>),
}

/// The right to store what a fetch started after the miss returns. Void once the key is
/// invalidated or the cache emptied; dropped unfilled (the fetch failed), it frees the key.
pub struct Lease<'a, V: CacheValue> {
    part: &'a Part<V>,
    key: String,
    id: u64,
}

impl<V: CacheValue> Lease<'_, V> {
    /// The key the lease is for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stores `value` if the lease still holds; returns whether it did.
    pub fn fill(self, value: V) -> bool {
        self.part.fill(&self.key, self.id, value)
    }
}

impl<V: CacheValue> Drop for Lease<'_, V> {
    fn drop(&mut self) {
        // After a fill the slot is Ready, which this leaves alone.
        self.part.release(&self.key, self.id);
    }
}

/// What the cache can hold: its size is needed for the budget.
pub trait CacheValue: Clone {
    /// What the value counts against the byte budget.
    fn size(&self) -> usize;
}

impl CacheValue for Post {
    fn size(&self) -> usize {
        prost::Message::encoded_len(self)
    }
}

impl CacheValue for User {
    fn size(&self) -> usize {
        prost::Message::encoded_len(self)
    }
}

enum Slot<V> {
    /// A fetch holds the lease with this id.
    Pending(u64),
    Ready {
        value: V,
        at: Instant,
        bytes: usize,
    },
}

/// One owner's entries: all used or all bypassed together, as one follower keeps them.
pub(crate) struct Part<V> {
    state: Mutex<State<V>>,
    /// Each generation's share of the budget.
    half: usize,
    max_age: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct State<V> {
    /// Whether the follower's stream is open, i.e. whether entries may be served and stored.
    live: bool,
    newer: HashMap<String, Slot<V>>,
    newer_bytes: usize,
    older: HashMap<String, Slot<V>>,
    next_lease: u64,
}

impl<V: CacheValue> Part<V> {
    fn new(budget: usize, max_age: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                live: false,
                newer: HashMap::new(),
                newer_bytes: 0,
                older: HashMap::new(),
                next_lease: 0,
            }),
            half: budget / 2,
            max_age,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<V>> {
        // The state is consistent between statements; a panic elsewhere must not stop reads.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    fn get(&self, key: &str) -> Lookup<'_, V> {
        let found = self.lookup(key);
        let counter = match found {
            Lookup::Hit(_) => &self.hits,
            Lookup::Miss(_) => &self.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    fn lookup(&self, key: &str) -> Lookup<'_, V> {
        let mut st = self.lock();
        if !st.live {
            return Lookup::Miss(None);
        }
        let fresh = |at: &Instant| at.elapsed() <= self.max_age;
        match st.newer.get(key) {
            Some(Slot::Ready { value, at, .. }) if fresh(at) => return Lookup::Hit(value.clone()),
            Some(Slot::Pending(_)) => return Lookup::Miss(None),
            Some(Slot::Ready { .. }) => {
                st.remove(key);
            }
            None => {}
        }
        match st.older.remove(key) {
            Some(Slot::Ready { value, at, bytes }) if fresh(&at) => {
                let hit = value.clone();
                st.insert_ready(key, value, at, bytes, self.half);
                return Lookup::Hit(hit);
            }
            Some(Slot::Pending(id)) => {
                st.older.insert(key.to_owned(), Slot::Pending(id));
                return Lookup::Miss(None);
            }
            _ => {}
        }
        st.next_lease += 1;
        let id = st.next_lease;
        st.newer.insert(key.to_owned(), Slot::Pending(id));
        Lookup::Miss(Some(Lease {
            part: self,
            key: key.to_owned(),
            id,
        }))
    }

    fn fill(&self, key: &str, id: u64, value: V) -> bool {
        let bytes = value.size() + key.len() + ENTRY_OVERHEAD;
        let mut st = self.lock();
        if !st.take_lease(key, id) {
            return false;
        }
        if bytes > self.half {
            return false;
        }
        st.insert_ready(key, value, Instant::now(), bytes, self.half);
        true
    }

    /// Frees the key if lease `id` still holds it unfilled.
    fn release(&self, key: &str, id: u64) {
        self.lock().take_lease(key, id);
    }

    pub(crate) fn invalidate(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Drops every entry and every lease; `live` says whether to cache from now on.
    pub(crate) fn reset(&self, live: bool) {
        let mut st = self.lock();
        st.clear();
        st.live = live;
    }

    /// Drops every entry and every lease.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    pub(crate) fn is_live(&self) -> bool {
        self.lock().live
    }
}

impl<V> State<V> {
    fn clear(&mut self) {
        self.newer.clear();
        self.older.clear();
        self.newer_bytes = 0;
    }

    /// Removes lease `id`'s slot for `key` (in either generation); false if it is void.
    fn take_lease(&mut self, key: &str, id: u64) -> bool {
        for map in [&mut self.newer, &mut self.older] {
            if matches!(map.get(key), Some(Slot::Pending(p)) if *p == id) {
                map.remove(key);
                return true;
            }
        }
        false
    }

    fn remove(&mut self, key: &str) {
        if let Some(Slot::Ready { bytes, .. }) = self.newer.remove(key) {
            self.newer_bytes -= bytes;
        }
        self.older.remove(key);
    }

    fn insert_ready(&mut self, key: &str, value: V, at: Instant, bytes: usize, half: usize) {
        if self.newer_bytes + bytes > half {
            // The newer generation is full: it becomes the older one, and what was older
            // (read by nobody since it was demoted) goes. Leases in the newer one stay valid.
            self.older = std::mem::take(&mut self.newer);
            self.newer_bytes = 0;
        }
        self.newer_bytes += bytes;
        self.newer
            .insert(key.to_owned(), Slot::Ready { value, at, bytes });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn post(id: &str, title: &str) -> Post {
        Post {
            post_id: id.into(),
            title: title.into(),
            ..Default::default()
        }
    }

    fn live(limits: CacheLimits) -> Cache {
        let cache = Cache::new(limits);
        cache.posts_part().reset(true);
        cache.users_part().reset(true);
        cache
    }

    fn fill(cache: &Cache, p: Post) -> bool {
        match cache.post(&p.post_id) {
            Lookup::Miss(Some(lease)) => lease.fill(p),
            _ => false,
        }
    }

    fn cached(cache: &Cache, id: &str) -> Option<Post> {
        match cache.posts_part().lookup(id) {
            Lookup::Hit(p) => Some(p),
            Lookup::Miss(_) => None,
        }
    }

    #[test]
    fn a_filled_lease_is_served_until_invalidated() {
        let cache = live(CacheLimits::default());
        assert!(fill(&cache, post("p1", "one")));
        assert_eq!(cached(&cache, "p1").unwrap().title, "one");
        cache.invalidate_post("p1");
        assert!(cached(&cache, "p1").is_none());
        let stats = cache.stats();
        assert_eq!((stats.post_hits, stats.post_misses), (0, 1));
    }

    #[test]
    fn not_live_means_bypassed() {
        let cache = Cache::new(CacheLimits::default());
        assert!(matches!(cache.post("p1"), Lookup::Miss(None)));
        let cache = live(CacheLimits::default());
        assert!(fill(&cache, post("p1", "one")));
        cache.posts_part().reset(false);
        assert!(matches!(cache.post("p1"), Lookup::Miss(None)));
    }

    #[test]
    fn an_invalidation_during_the_fetch_voids_the_lease() {
        let cache = live(CacheLimits::default());
        let Lookup::Miss(Some(lease)) = cache.post("p1") else {
            panic!("expected a lease")
        };
        // A concurrent miss fetches too but may not store.
        assert!(matches!(cache.post("p1"), Lookup::Miss(None)));
        cache.invalidate_post("p1");
        assert!(!lease.fill(post("p1", "read before the edit")));
        assert!(cached(&cache, "p1").is_none());

        // Emptying the cache voids leases as well.
        let Lookup::Miss(Some(lease)) = cache.post("p1") else {
            panic!("expected a lease")
        };
        cache.posts_part().reset(true);
        assert!(!lease.fill(post("p1", "stale")));
        assert!(cached(&cache, "p1").is_none());
    }

    #[test]
    fn a_dropped_lease_frees_the_key() {
        let cache = live(CacheLimits::default());
        let Lookup::Miss(Some(lease)) = cache.post("p1") else {
            panic!("expected a lease")
        };
        drop(lease);
        assert!(fill(&cache, post("p1", "one")));
    }

    #[test]
    fn old_entries_are_refetched() {
        let cache = live(CacheLimits {
            max_age: Duration::ZERO,
            ..CacheLimits::default()
        });
        assert!(fill(&cache, post("p1", "one")));
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(cache.post("p1"), Lookup::Miss(Some(_))));
    }

    #[test]
    fn the_byte_budget_holds_and_read_entries_survive() {
        let entry = post("p0000", "x").size() + 5 + ENTRY_OVERHEAD;
        // Room for 10 entries per generation.
        let cache = live(CacheLimits {
            post_bytes: 20 * entry,
            ..CacheLimits::default()
        });
        assert!(fill(&cache, post("p0000", "x")));
        for i in 1..100 {
            assert!(fill(&cache, post(&format!("p{i:04}"), "x")));
            // Read the first one all along: it stays.
            assert!(cached(&cache, "p0000").is_some(), "after {i}");
        }
        let st = cache.posts_part().lock();
        assert!(st.newer.len() + st.older.len() <= 20);
        assert!(st.newer_bytes <= 10 * entry);
        drop(st);
        assert!(cached(&cache, "p0001").is_none(), "unread entries go");
        assert!(cached(&cache, "p0099").is_some());

        // Larger than a generation: never stored.
        let big = post("big", &"x".repeat(20 * entry));
        assert!(!fill(&cache, big));
        assert!(cached(&cache, "big").is_none());
    }
}
