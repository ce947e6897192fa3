//! Group commit on SQLite: write transactions that queue for the writer connection share one
//! SQLite transaction, each in a savepoint of its own, and one COMMIT.
//!
//! A CreatePost writes five B-trees, four of them at their rightmost leaf (the time-ordered
//! indexes and the outbox), and its COMMIT appends each page it changed to the WAL. Several
//! posts in one transaction write those pages once: `cargo run --release -p tessera-posts
//! --example write_cost` measured 60-62 µs of CPU per post at eight to a transaction against
//! 90-100 at one.
//!
//! How a group forms: a write transaction releases its savepoint, then lets the other ready
//! tasks run once ([`tokio::task::yield_now`]) while still holding the write turn, so that
//! writers with a request in hand queue for the turn behind it. If one is waiting, it hands the
//! turn on with the SQLite transaction still open and waits for the group's outcome; the
//! writer that finds nobody waiting (or the group full) commits for all of them. Nobody is told
//! "committed" before the COMMIT succeeded, and a failed COMMIT fails every member.
//!
//! What leaves a group behind: a member's own failure rolls back its savepoint only, and then
//! commits the members before it at once, with nobody else to wait for: it may have seen
//! their rows (a unique key it collided with) and its caller may read them next outside the
//! transaction, as the services do after losing a `request_id` race. A writer cancelled after
//! its release still belongs to the group. A group whose next writer went away while queued
//! is committed by whoever takes the turn next: the handle's checkpoint task within a tick
//! (50 ms), a checkpoint that restarts the WAL, or [`crate::Db::close`]. A writer that
//! begins while a group is open joins it.
//!
//! Deferred constraints are checked at the COMMIT, where one member's violation would fail
//! the others, so a handle whose schema declares a `DEFERRABLE` constraint never groups
//! (and a transaction must not set `PRAGMA defer_foreign_keys` on a grouping handle).

use tokio::sync::watch;

use crate::{db::Inner, inline::SqliteFailure, outbox::Event};

/// The most write transactions in one group: bounds how long the first one waits.
pub(crate) const MAX_GROUP: usize = 32;

/// The savepoint each write transaction runs in.
pub(crate) const SAVEPOINT: &str = "SAVEPOINT tessera_tx";
pub(crate) const RELEASE: &str = "RELEASE tessera_tx";
pub(crate) const ROLLBACK_SAVEPOINT: &str = "ROLLBACK TO tessera_tx; RELEASE tessera_tx";

/// What a group's members learn when it ends: committed, or the COMMIT's error (its SQLite
/// code and message, as the committing member got it).
pub(crate) type Outcome = Result<(), (Option<i32>, String)>;

/// The write transactions released into the writer connection's open SQLite transaction.
pub(crate) struct Group {
    /// How many have released their savepoint into it.
    pub(crate) members: usize,
    /// Their events, in sequence order, for the handle's event streams once committed.
    events: Vec<Event>,
    /// The highest outbox sequence appended by a member.
    appended: Option<i64>,
    /// The oldest outbox sequence left after a member pruned the outbox.
    pruned_to: Option<i64>,
    /// Where members that handed the turn on wait; dropped unsent (the connection went with
    /// the transaction) it tells them the group failed.
    done: watch::Sender<Option<Outcome>>,
}

impl Group {
    pub(crate) fn new() -> Self {
        Group {
            members: 0,
            events: Vec::new(),
            appended: None,
            pruned_to: None,
            done: watch::Sender::new(None),
        }
    }

    /// Records a member that released its savepoint, with what it appended.
    pub(crate) fn join(
        &mut self,
        events: Vec<Event>,
        appended: Option<i64>,
        pruned_to: Option<i64>,
    ) {
        self.members += 1;
        self.events.extend(events);
        self.appended = self.appended.max(appended);
        if pruned_to.is_some() {
            self.pruned_to = pruned_to;
        }
    }

    /// Where a member that hands the turn on waits for the outcome.
    pub(crate) fn outcome(&self) -> watch::Receiver<Option<Outcome>> {
        self.done.subscribe()
    }

    /// After the COMMIT: tells the handle's event streams what committed (while the write turn
    /// is still held, so they get events in sequence order), then the members.
    pub(crate) fn committed(self, inner: &Inner) {
        inner
            .dirty
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if !self.events.is_empty() {
            let mut recent = inner
                .recent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            recent.push(self.events);
            if let Some(oldest) = self.pruned_to {
                recent.forget_before(oldest);
            }
        }
        if let Some(seq) = self.appended {
            inner.committed.send_if_modified(|latest| {
                if seq > *latest {
                    *latest = seq;
                    true
                } else {
                    false
                }
            });
        }
        self.done.send_replace(Some(Ok(())));
    }

    /// After a failed COMMIT: tells the members.
    pub(crate) fn failed(self, err: &sqlx::Error) {
        self.done.send_replace(Some(Err(SqliteFailure::parts(err))));
    }
}

/// Waits for the group a member handed the turn on to; its outcome as the member's result.
pub(crate) async fn wait(mut done: watch::Receiver<Option<Outcome>>) -> crate::Result<()> {
    let outcome = match done.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone(),
        Err(_) => Some(Err((
            None,
            "the writer connection closed before the group's COMMIT".to_owned(),
        ))),
    };
    match outcome {
        Some(Ok(())) => Ok(()),
        Some(Err((code, message))) => Err(SqliteFailure::rebuild(code, message).into()),
        None => unreachable!("waited for an outcome"),
    }
}
