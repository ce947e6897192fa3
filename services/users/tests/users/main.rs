//! UserService through its handlers, on SQLite and (when `TESSERA_TEST_DATABASE_URL` is set)
//! PostgreSQL.

#![allow(clippy::unwrap_used)]

mod api;
mod keys;
mod login_limits;
mod sessions;
mod support;
