//! The notification service over in-process channels, on SQLite and (when
//! `TESSERA_TEST_DATABASE_URL` is set) PostgreSQL.

#![allow(clippy::unwrap_used)]

mod api;
mod catch_up;
mod consumers;
mod limits;
mod subscribe;
mod support;
