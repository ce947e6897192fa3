//! The events a [`crate::Db`] handle committed lately, kept in memory so that its
//! [`crate::Db::events`] streams take a new event from here instead of each reading the outbox
//! back: one read per follower per commit (a round trip to the SQLite connection's thread, or to
//! PostgreSQL) for events the handle had in hand when it committed them.
//!
//! Only a cache: the outbox stays the record. A stream takes events from here only when the
//! one right after its cursor is here, so what it gets is what a read would have returned.
//! Events are pushed after their commit, in sequence order, without holes; a push that does
//! not follow the newest kept event (another replica's events between, or a commit whose
//! outcome was unknown) starts the run again, and streams behind it read the outbox.

use std::collections::VecDeque;

use crate::outbox::Event;

/// How many events are kept at most.
const KEPT_EVENTS: usize = 512;
/// How many payload bytes are kept at most (a post's event carries its body).
const KEPT_BYTES: usize = 1 << 20;

/// A run of committed events with consecutive sequences.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    events: VecDeque<Event>,
    bytes: usize,
}

impl Recent {
    /// Adds events that just committed, in sequence order.
    pub(crate) fn push(&mut self, committed: Vec<Event>) {
        for event in committed {
            if self
                .events
                .back()
                .is_some_and(|last| last.sequence + 1 != event.sequence)
            {
                self.events.clear();
                self.bytes = 0;
            }
            self.bytes += event.payload.len();
            self.events.push_back(event);
            while self.events.len() > KEPT_EVENTS || self.bytes > KEPT_BYTES {
                let Some(old) = self.events.pop_front() else {
                    break;
                };
                self.bytes -= old.payload.len();
            }
        }
    }

    /// Drops the events before `oldest`: the outbox pruned them, and a stream whose cursor is
    /// behind them must hear so.
    pub(crate) fn forget_before(&mut self, oldest: i64) {
        while let Some(first) = self.events.front().filter(|e| e.sequence < oldest) {
            self.bytes -= first.payload.len();
            self.events.pop_front();
        }
    }

    /// Up to `limit` events right after `after`, or `None` when the next one is not kept
    /// (the caller reads the outbox).
    pub(crate) fn after(&self, after: i64, limit: usize) -> Option<Vec<Event>> {
        let first = self.events.front()?.sequence;
        let skip = usize::try_from(after.checked_add(1)?.checked_sub(first)?).ok()?;
        if skip >= self.events.len() {
            return None;
        }
        Some(self.events.iter().skip(skip).take(limit).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: i64, size: usize) -> Event {
        Event {
            sequence,
            create_time: sequence * 10,
            payload: vec![b'x'; size],
        }
    }

    fn sequences(events: Option<Vec<Event>>) -> Option<Vec<i64>> {
        events.map(|e| e.into_iter().map(|e| e.sequence).collect())
    }

    #[test]
    fn serves_only_runs_that_start_right_after_the_cursor() {
        let mut recent = Recent::default();
        assert_eq!(sequences(recent.after(0, 10)), None);
        recent.push(vec![event(5, 1), event(6, 1), event(7, 1)]);
        assert_eq!(sequences(recent.after(4, 10)), Some(vec![5, 6, 7]));
        assert_eq!(sequences(recent.after(5, 1)), Some(vec![6]));
        // Event 4 is not kept: the stream must read the outbox, not skip it.
        assert_eq!(sequences(recent.after(3, 10)), None);
        // Caught up: nothing kept after the cursor.
        assert_eq!(sequences(recent.after(7, 10)), None);
        assert_eq!(sequences(recent.after(100, 10)), None);
        assert_eq!(sequences(recent.after(i64::MAX, 10)), None);
    }

    #[test]
    fn a_hole_starts_the_run_again() {
        let mut recent = Recent::default();
        recent.push(vec![event(1, 1), event(2, 1)]);
        // 3 was committed elsewhere (another replica) or its outcome was unknown.
        recent.push(vec![event(4, 1)]);
        assert_eq!(sequences(recent.after(2, 10)), None);
        assert_eq!(sequences(recent.after(3, 10)), Some(vec![4]));
        // A late push of an older event does not reorder anything either.
        recent.push(vec![event(3, 1)]);
        assert_eq!(sequences(recent.after(3, 10)), None);
        assert_eq!(sequences(recent.after(2, 10)), Some(vec![3]));
    }

    #[test]
    fn keeps_a_bounded_number_of_events_and_bytes() {
        let mut recent = Recent::default();
        recent.push((1..=KEPT_EVENTS as i64 + 10).map(|s| event(s, 1)).collect());
        assert_eq!(recent.events.len(), KEPT_EVENTS);
        // 1 to 10 went: 11 is the oldest kept.
        assert_eq!(sequences(recent.after(9, 1)), None);
        assert_eq!(sequences(recent.after(10, 1)), Some(vec![11]));

        let mut recent = Recent::default();
        let big = KEPT_BYTES / 4;
        recent.push((1..=6).map(|s| event(s, big)).collect());
        assert!(recent.bytes <= KEPT_BYTES);
        assert_eq!(recent.events.len(), 4);
        assert_eq!(sequences(recent.after(2, 10)), Some(vec![3, 4, 5, 6]));

        recent.forget_before(5);
        assert_eq!(sequences(recent.after(3, 10)), None);
        assert_eq!(sequences(recent.after(4, 10)), Some(vec![5, 6]));
        assert_eq!(recent.bytes, 2 * big);
    }
}
