//! One PostgreSQL database per service on the server a `DATABASE_URL` names: what `tessera up`
//! uses when `DATABASE_URL` is set (replicas of a service share its database; services never
//! share one, because their tables have the same names), and what the chaos tests create and
//! drop around each run.
//!
//! The database in the URL is only a prefix: with `postgres://u:p@host/tessera` the services
//! use `tessera_users`, `tessera_posts`, `tessera_comments` and `tessera_notifications`
//! (`tessera` when the URL names none). Each is created when missing, through the server's
//! `postgres` maintenance database, as `createdb` does.

use anyhow::Context;
use sqlx::{Postgres, migrate::MigrateDatabase};

/// The services that own a database (the gateway keeps no data).
pub const OWNERS: [&str; 4] = ["users", "posts", "comments", "notifications"];

/// The prefix used when the URL names no database.
pub const DEFAULT_PREFIX: &str = "tessera";

/// PostgreSQL's limit on identifiers, in bytes.
const MAX_NAME: usize = 63;

/// A PostgreSQL server URL split around its database name, so the same server (user, host,
/// port, `sslmode` and other parameters) can be named with another database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerUrl {
    /// `postgres://user:password@host:port`
    base: String,
    /// The database named in the URL, or [`DEFAULT_PREFIX`].
    prefix: String,
    /// `?sslmode=...` or empty.
    query: String,
}

impl ServerUrl {
    /// Reads a `postgres://` or `postgresql://` URL. The error says what is wrong, without
    /// repeating the URL (it may hold a password).
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err("expected a postgres://user:password@host:port/prefix URL".into());
        };
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(format!(
                "expected a postgres:// URL (one database per service on a PostgreSQL server), got a {scheme}:// URL"
            ));
        }
        let (before_query, query) = match rest.find('?') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let prefix = if path.is_empty() {
            DEFAULT_PREFIX
        } else {
            path
        };
        // Services' database names are `<prefix>_<service>`: keep them plain identifiers
        // within PostgreSQL's length limit, so they need no quoting anywhere.
        let longest = "_notifications".len();
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || prefix.len() + longest > MAX_NAME
        {
            return Err(format!(
                "the database name {prefix:?} is a prefix for one database per service: letters, digits and _ only, at most {} characters",
                MAX_NAME - longest
            ));
        }
        Ok(Self {
            base: format!("{scheme}://{authority}"),
            prefix: prefix.to_owned(),
            query: query.to_owned(),
        })
    }

    /// The same server with another prefix (checked as [`ServerUrl::parse`] does).
    pub fn with_prefix(&self, prefix: &str) -> Result<Self, String> {
        Self::parse(&self.url_of(prefix))
    }

    /// The prefix of every service's database name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>_<service>`.
    pub fn database_name(&self, service: &str) -> String {
        format!("{}_{service}", self.prefix)
    }

    /// The URL of `service`'s database on this server.
    pub fn service_url(&self, service: &str) -> String {
        self.url_of(&self.database_name(service))
    }

    /// The URL of database `name` on this server.
    pub fn url_of(&self, name: &str) -> String {
        format!("{}/{name}{}", self.base, self.query)
    }
}

/// Creates the database `url` names unless it exists; true when it was created.
pub async fn ensure_database(url: &str) -> anyhow::Result<bool> {
    if Postgres::database_exists(url).await? {
        return Ok(false);
    }
    match Postgres::create_database(url).await {
        Ok(()) => Ok(true),
        // Someone else created it between the check and the create: what was wanted.
        Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42P04") => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// Drops the database `url` names, ending the sessions still connected to it first (a killed
/// process's connections can outlive it briefly on the server).
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    Postgres::force_drop_database(url)
        .await
        .context("dropping a database")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_one_database_per_service_on_the_same_server() {
        let url = ServerUrl::parse("postgres://u:p@db:5432/shop?sslmode=require").unwrap();
        assert_eq!(url.prefix(), "shop");
        assert_eq!(
            url.service_url("posts"),
            "postgres://u:p@db:5432/shop_posts?sslmode=require"
        );
        let url = ServerUrl::parse("postgresql://u@db").unwrap();
        assert_eq!(url.service_url("users"), "postgresql://u@db/tessera_users");
        let url = ServerUrl::parse("postgres://u@db/?connect_timeout=3").unwrap();
        assert_eq!(
            url.service_url("users"),
            "postgres://u@db/tessera_users?connect_timeout=3"
        );
    }

    #[test]
    fn refuses_what_cannot_name_a_database_per_service() {
        for bad in [
            "sqlite://x.db",
            "db.example:5432",
            "postgres://h/with-dash",
            "postgres://h/a\"b",
            &format!("postgres://h/{}", "a".repeat(50)),
        ] {
            let err = ServerUrl::parse(bad).unwrap_err();
            assert!(!err.contains("u:p"), "{err}");
        }
    }
}
