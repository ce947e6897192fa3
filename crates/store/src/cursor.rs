//! Consumer cursors: how far each consumer of another service's events got, the producer
//! epoch it follows, and why it halted.

use crate::{db::Db, error::Result, tx::Tx};

/// Where a consumer stands; see [`Db::cursor_state`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CursorState {
    /// The cursor name (by convention `<producer>-events`).
    pub name: String,
    /// The last applied sequence.
    pub position: i64,
    /// The producer's outbox epoch the position belongs to; `None` until an event with one
    /// was applied (or after a reset).
    pub epoch: Option<String>,
    /// Why the consumer stopped applying events, until an operator resets the cursor.
    pub halted: Option<String>,
}

impl Db {
    /// The current committed cursor position of consumer `name` (0 if it never ran).
    pub async fn cursor(&self, name: &str) -> Result<i64> {
        let pos: Option<i64> =
            sqlx::query_scalar("SELECT position FROM tessera_cursors WHERE name = $1")
                .bind(name)
                .fetch_optional(self.pool())
                .await?;
        Ok(pos.unwrap_or(0))
    }

    /// Consumer `name`'s cursor: position, the producer epoch it follows (once it has seen
    /// one), and why it halted, if it did (see [`crate::run_consumer`]).
    pub async fn cursor_state(&self, name: &str) -> Result<CursorState> {
        let position = self.cursor(name).await?;
        let row: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT epoch, halted FROM tessera_cursor_epochs WHERE name = $1")
                .bind(name)
                .fetch_optional(self.pool())
                .await?;
        let (epoch, halted) = row.unwrap_or_default();
        Ok(CursorState {
            name: name.to_owned(),
            position,
            epoch,
            halted,
        })
    }

    /// Every consumer cursor in this database, by name.
    pub async fn cursor_states(&self) -> Result<Vec<CursorState>> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM tessera_cursors UNION SELECT name FROM tessera_cursor_epochs \
             ORDER BY 1",
        )
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.push(self.cursor_state(&name).await?);
        }
        Ok(out)
    }

    /// Records that consumer `name` halted, and why (kept until its cursor is reset or it
    /// applies an event again); `None` clears it.
    pub async fn set_halted(&self, name: &str, reason: Option<&str>) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO tessera_cursor_epochs (name, epoch, halted) VALUES ($1, NULL, $2) \
             ON CONFLICT (name) DO UPDATE SET halted = excluded.halted",
        )
        .bind(name)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// The operator's deliberate resynchronisation: sets consumer `name`'s cursor to
    /// `position` and forgets the producer epoch it followed and any halt, so the consumer
    /// resumes after `position` in whatever outbox the producer has now. Returns the state
    /// before the reset.
    pub async fn reset_cursor(&self, name: &str, position: i64) -> Result<CursorState> {
        let before = self.cursor_state(name).await?;
        let mut tx = self.begin().await?;
        tx.set_cursor(name, position).await?;
        sqlx::query("DELETE FROM tessera_cursor_epochs WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(before)
    }
}

impl Tx {
    /// Consumer `name`'s cursor as seen by this transaction (0 if it never ran).
    pub async fn cursor(&mut self, name: &str) -> Result<i64> {
        let pos: Option<i64> =
            sqlx::query_scalar("SELECT position FROM tessera_cursors WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut **self)
                .await?;
        Ok(pos.unwrap_or(0))
    }

    /// Moves consumer `name`'s cursor forward to `position`, returning `false` (and changing
    /// nothing) if it is already there or beyond, i.e. the event was applied before.
    ///
    /// Call it FIRST in the transaction that applies the event: on PostgreSQL the update
    /// locks the cursor row, so two replicas of a consumer applying the same event serialize
    /// here and the second sees `false` once the first commits.
    pub async fn advance_cursor(&mut self, name: &str, position: i64) -> Result<bool> {
        sqlx::query(
            "INSERT INTO tessera_cursors (name, position) VALUES ($1, 0) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .execute(&mut **self)
        .await?;
        let moved = sqlx::query(
            "UPDATE tessera_cursors SET position = $1 WHERE name = $2 AND position < $1",
        )
        .bind(position)
        .bind(name)
        .execute(&mut **self)
        .await?
        .rows_affected();
        Ok(moved == 1)
    }

    /// Records `epoch` as the producer epoch consumer `name` follows, unless it already
    /// follows one; returns the epoch it follows now (so a caller seeing another value than
    /// `epoch` knows the producer changed under it).
    pub async fn follow_epoch(&mut self, name: &str, epoch: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO tessera_cursor_epochs (name, epoch, halted) VALUES ($1, $2, NULL) \
             ON CONFLICT (name) DO UPDATE SET epoch = COALESCE(tessera_cursor_epochs.epoch, \
             excluded.epoch)",
        )
        .bind(name)
        .bind(epoch)
        .execute(&mut **self)
        .await?;
        let followed: Option<String> =
            sqlx::query_scalar("SELECT epoch FROM tessera_cursor_epochs WHERE name = $1")
                .bind(name)
                .fetch_one(&mut **self)
                .await?;
        Ok(followed.unwrap_or_else(|| epoch.to_owned()))
    }

    /// Sets consumer `name`'s cursor to `position` unconditionally (e.g. to rewind).
    pub async fn set_cursor(&mut self, name: &str, position: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO tessera_cursors (name, position) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        )
        .bind(name)
        .bind(position)
        .execute(&mut **self)
        .await?;
        Ok(())
    }
}
