//! PostService over its handlers and in-process channels, on SQLite and (when
//! `TESSERA_TEST_DATABASE_URL` is set) PostgreSQL.

#![allow(clippy::unwrap_used)]

mod api;
mod race;
mod support;
