//! The SQLite writer connection, run on the calling task.
//!
//! sqlx's SQLite driver gives each connection a thread of its own and sends it every
//! statement: a round trip with two thread switches, on a core that the requests share. A
//! write transaction is a handful of short statements (tens of microseconds each, no fsync
//! with `synchronous = NORMAL`), so the writer connection runs them in place instead, in the
//! task that holds the write turn. It speaks sqlx's `Any` types (arguments in, rows and
//! results out, mapped as sqlx's SQLite driver maps them) so that the services' queries run on
//! it unchanged: `sqlx::query(..).execute(&mut *tx)`.
//!
//! Nothing here waits on another process: the connection's busy timeout is 0, and a `BEGIN
//! IMMEDIATE` refused because another process writes the file is retried by the caller with
//! async sleeps ([`crate::tx::WriterTx::begin`]).

use std::{borrow::Cow, path::Path, sync::Arc};

use futures::{StreamExt, future::BoxFuture, stream::BoxStream};
use rusqlite::types::{ToSqlOutput, ValueRef};
use sqlx::{Any, Describe, Either, Execute, Executor, error::ErrorKind};
use sqlx_core::{
    any::{
        AnyArguments, AnyColumn, AnyQueryResult, AnyRow, AnyStatement, AnyTypeInfo,
        AnyTypeInfoKind, AnyValue, AnyValueKind,
    },
    ext::ustr::UStr,
};

/// Prepared statements kept per connection: more than the distinct write statements of any
/// one service.
const STATEMENT_CACHE: usize = 64;

/// Statements whose parameter numbers are kept ([`InlineConn::numbers`]); past this the
/// map starts empty again.
const NUMBERS_CACHE: usize = 256;

/// A SQLite connection whose statements run on the calling thread.
pub(crate) struct InlineConn {
    conn: rusqlite::Connection,
    /// For each single statement run, the argument number each of its parameters takes.
    /// SQLite finds a parameter's name by walking a list from its start, so asking for every
    /// name costs the square of the parameter count: a 64-row INSERT of seven columns walked
    /// 100k entries on each run, 6% of a catch-up's CPU. Asked once per statement text here.
    numbers: std::collections::HashMap<String, Arc<[Option<usize>]>>,
}

impl std::fmt::Debug for InlineConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineConn").finish_non_exhaustive()
    }
}

impl InlineConn {
    /// Opens `path` (creating it if missing) and runs each of `pragmas` on it.
    pub(crate) fn open(path: &Path, pragmas: &[String]) -> Result<Self, sqlx::Error> {
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
            | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = rusqlite::Connection::open_with_flags(path, flags).map_err(map_error)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let mut conn = InlineConn {
            conn,
            numbers: std::collections::HashMap::new(),
        };
        for pragma in pragmas {
            // Some PRAGMAs answer with a row (`journal_mode`), which a batch refuses.
            conn.run(pragma, None, None)?;
        }
        Ok(conn)
    }

    /// Runs statements without parameters, possibly several (`COMMIT`, `ROLLBACK`, a script).
    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        self.conn.execute_batch(sql).map_err(map_error)
    }

    /// Runs `PRAGMA wal_checkpoint(PASSIVE)`; returns how many frames the WAL holds.
    pub(crate) fn checkpoint(&mut self) -> Result<i64, sqlx::Error> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))
            .map_err(map_error)
    }

    /// Whether no transaction is open on the connection.
    pub(crate) fn is_autocommit(&self) -> bool {
        self.conn.is_autocommit()
    }

    /// Runs `sql` with `args` bound as sqlx's SQLite driver binds them (`$N` and `?N` by
    /// number, `?` in order across the statements), and returns each statement's rows (at most
    /// `limit` in all) followed by its result.
    fn run(
        &mut self,
        sql: &str,
        args: Option<AnyArguments<'_>>,
        limit: Option<usize>,
    ) -> Result<Vec<Either<AnyQueryResult, AnyRow>>, sqlx::Error> {
        let values = args.map(|args| args.values.0).unwrap_or_default();
        let mut out = Vec::new();
        let mut anonymous = 0;
        // One statement (the common case) is prepared once and cached. Several are prepared
        // one at a time, each after the one before ran (a script's later statements may use
        // tables its earlier ones create); a `;` in a literal only takes this slower way.
        let conn = &self.conn;
        // Runs one statement; true once `limit` rows are out.
        let mut step = |stmt: &mut rusqlite::Statement<'_>, numbers: &[Option<usize>]| {
            run_statement(
                conn,
                stmt,
                numbers,
                &values,
                &mut anonymous,
                limit,
                &mut out,
            )?;
            Ok::<_, sqlx::Error>(limit.is_some_and(|limit| rows(&out) >= limit))
        };
        if !sql.trim_end().trim_end_matches(';').contains(';') {
            let mut stmt = conn.prepare_cached(sql).map_err(map_error)?;
            let numbers = match self.numbers.get(sql) {
                Some(numbers) => numbers.clone(),
                None => {
                    let numbers: Arc<[Option<usize>]> = parameter_numbers(&stmt)?.into();
                    if self.numbers.len() >= NUMBERS_CACHE {
                        self.numbers.clear();
                    }
                    self.numbers.insert(sql.to_owned(), numbers.clone());
                    numbers
                }
            };
            step(&mut stmt, &numbers)?;
        } else {
            let mut batch = rusqlite::Batch::new(conn, sql);
            while let Some(mut stmt) = batch.next().map_err(map_error)? {
                let numbers = parameter_numbers(&stmt)?;
                if step(&mut stmt, &numbers)? {
                    break;
                }
            }
        }
        Ok(out)
    }
}

fn rows(out: &[Either<AnyQueryResult, AnyRow>]) -> usize {
    out.iter().filter(|r| r.is_right()).count()
}

/// Runs one prepared statement, appending its rows (while fewer than `limit` are out) and
/// then its result to `out`.
fn run_statement(
    conn: &rusqlite::Connection,
    stmt: &mut rusqlite::Statement<'_>,
    numbers: &[Option<usize>],
    values: &[AnyValueKind<'_>],
    anonymous: &mut usize,
    limit: Option<usize>,
    out: &mut Vec<Either<AnyQueryResult, AnyRow>>,
) -> Result<(), sqlx::Error> {
    bind(stmt, numbers, values, anonymous)?;
    let names: Vec<UStr> = stmt.column_names().into_iter().map(UStr::new).collect();
    let column_names: Arc<sqlx_core::HashMap<UStr, usize>> = Arc::new(
        names
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), i))
            .collect(),
    );
    let mut taken = rows(out);
    let mut rows = stmt.raw_query();
    // Stopping early resets the statement, as sqlx does for `fetch_optional`: a RETURNING
    // statement has made all its changes by its first row.
    while limit.is_none_or(|limit| taken < limit) {
        let Some(row) = rows.next().map_err(map_error)? else {
            break;
        };
        let mut columns = Vec::with_capacity(names.len());
        let mut values = Vec::with_capacity(names.len());
        for (ordinal, name) in names.iter().enumerate() {
            let kind = value_kind(row.get_ref(ordinal).map_err(map_error)?)?;
            columns.push(AnyColumn {
                ordinal,
                name: name.clone(),
                type_info: AnyTypeInfo {
                    kind: type_kind(&kind),
                },
            });
            values.push(AnyValue { kind });
        }
        out.push(Either::Right(AnyRow {
            column_names: column_names.clone(),
            columns,
            values,
        }));
        taken += 1;
    }
    drop(rows);
    // As sqlx reports it: SQLite's count for the last INSERT, UPDATE or DELETE.
    out.push(Either::Left(AnyQueryResult {
        rows_affected: conn.changes(),
        last_insert_id: None,
    }));
    Ok(())
}

/// The argument number of each of `stmt`'s parameters, as sqlx's SQLite driver reads their
/// names (`$N` and `?N` by number); `None` for an anonymous `?`, which takes the next one.
fn parameter_numbers(stmt: &rusqlite::Statement<'_>) -> Result<Vec<Option<usize>>, sqlx::Error> {
    (1..=stmt.parameter_count())
        .map(|index| match stmt.parameter_name(index) {
            None => Ok(None),
            Some(name) => name
                .strip_prefix('$')
                .or_else(|| name.strip_prefix('?'))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .map(Some)
                .ok_or_else(|| {
                    sqlx::Error::Protocol(format!("unsupported SQL parameter format: {name}"))
                }),
        })
        .collect()
}

/// Binds `values` to `stmt`'s parameters the way sqlx's SQLite driver does, parameter
/// `index` (from 1) taking argument `numbers[index - 1]`.
fn bind(
    stmt: &mut rusqlite::Statement<'_>,
    numbers: &[Option<usize>],
    values: &[AnyValueKind<'_>],
    anonymous: &mut usize,
) -> Result<(), sqlx::Error> {
    for (index, number) in (1..).zip(numbers) {
        let n = number.unwrap_or_else(|| {
            *anonymous += 1;
            *anonymous
        });
        // Unbound parameters are NULL, as in sqlx.
        let Some(value) = values.get(n - 1) else {
            break;
        };
        let value = match value {
            AnyValueKind::Null(_) => ValueRef::Null,
            AnyValueKind::Bool(b) => ValueRef::Integer(i64::from(*b)),
            AnyValueKind::SmallInt(i) => ValueRef::Integer(i64::from(*i)),
            AnyValueKind::Integer(i) => ValueRef::Integer(i64::from(*i)),
            AnyValueKind::BigInt(i) => ValueRef::Integer(*i),
            AnyValueKind::Real(r) => ValueRef::Real(f64::from(*r)),
            AnyValueKind::Double(d) => ValueRef::Real(*d),
            AnyValueKind::Text(t) => ValueRef::Text(t.as_bytes()),
            AnyValueKind::Blob(b) => ValueRef::Blob(b),
            other => {
                return Err(sqlx::Error::Protocol(format!(
                    "no SQLite mapping for the argument {other:?}"
                )));
            }
        };
        stmt.raw_bind_parameter(index, ToSqlOutput::Borrowed(value))
            .map_err(map_error)?;
    }
    Ok(())
}

/// A column value as sqlx's SQLite driver maps it for `Any`: by the value's own type.
fn value_kind(value: ValueRef<'_>) -> Result<AnyValueKind<'static>, sqlx::Error> {
    Ok(match value {
        ValueRef::Null => AnyValueKind::Null(AnyTypeInfoKind::Null),
        ValueRef::Integer(i) => AnyValueKind::BigInt(i),
        ValueRef::Real(r) => AnyValueKind::Double(r),
        ValueRef::Text(t) => AnyValueKind::Text(Cow::Owned(
            String::from_utf8(t.to_vec()).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        )),
        ValueRef::Blob(b) => AnyValueKind::Blob(Cow::Owned(b.to_vec())),
    })
}

fn type_kind(value: &AnyValueKind<'_>) -> AnyTypeInfoKind {
    match value {
        AnyValueKind::BigInt(_) => AnyTypeInfoKind::BigInt,
        AnyValueKind::Double(_) => AnyTypeInfoKind::Double,
        AnyValueKind::Text(_) => AnyTypeInfoKind::Text,
        AnyValueKind::Blob(_) => AnyTypeInfoKind::Blob,
        _ => AnyTypeInfoKind::Null,
    }
}

/// SQLite's own errors become database errors with the extended result code, as sqlx reports
/// them (so unique violations and busy errors read the same); the rest are decode or protocol
/// errors.
fn map_error(err: rusqlite::Error) -> sqlx::Error {
    match err {
        rusqlite::Error::SqliteFailure(failure, message) => {
            sqlx::Error::Database(Box::new(SqliteFailure {
                code: failure.extended_code,
                message: message.unwrap_or_else(|| failure.to_string()),
            }))
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(_)
        | rusqlite::Error::InvalidColumnType(..) => sqlx::Error::Decode(Box::new(err)),
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

/// An error SQLite returned.
#[derive(Debug)]
pub(crate) struct SqliteFailure {
    /// The extended result code.
    code: i32,
    message: String,
}

impl SqliteFailure {
    /// `SQLITE_BUSY` or one of its extended codes: another connection holds the lock.
    pub(crate) fn is_busy(err: &sqlx::Error) -> bool {
        matches!(err, sqlx::Error::Database(db)
            if db.try_downcast_ref::<SqliteFailure>()
                .is_some_and(|f| f.code & 0xff == rusqlite::ffi::SQLITE_BUSY))
    }

    /// The SQLite code (if SQLite's) and message of `err`, to hand to others as an error of
    /// their own ([`SqliteFailure::rebuild`]).
    pub(crate) fn parts(err: &sqlx::Error) -> (Option<i32>, String) {
        match err {
            sqlx::Error::Database(db) => match db.try_downcast_ref::<SqliteFailure>() {
                Some(failure) => (Some(failure.code), failure.message.clone()),
                None => (None, db.message().to_owned()),
            },
            other => (None, other.to_string()),
        }
    }

    /// An error from [`SqliteFailure::parts`].
    pub(crate) fn rebuild(code: Option<i32>, message: String) -> sqlx::Error {
        match code {
            Some(code) => sqlx::Error::Database(Box::new(SqliteFailure { code, message })),
            None => sqlx::Error::Protocol(message),
        }
    }
}

impl std::fmt::Display for SqliteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for SqliteFailure {}

impl sqlx::error::DatabaseError for SqliteFailure {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(self.code.to_string().into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        use rusqlite::ffi;
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

/// The arguments of `query`, or the error of encoding them.
fn arguments<'q, E: Execute<'q, Any>>(
    query: &mut E,
) -> Result<Option<AnyArguments<'q>>, sqlx::Error> {
    query.take_arguments().map_err(sqlx::Error::Encode)
}

impl<'c> Executor<'c> for &'c mut InlineConn {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        mut query: E,
    ) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        // Run when first polled, as a query on any connection is.
        futures::stream::once(async move {
            let args = arguments(&mut query)?;
            self.run(query.sql(), args, None)
        })
        .map(|results| match results {
            Ok(results) => futures::stream::iter(results.into_iter().map(Ok)).left_stream(),
            Err(err) => futures::stream::iter([Err(err)]).right_stream(),
        })
        .flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        mut query: E,
    ) -> BoxFuture<'e, Result<Option<AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        Box::pin(async move {
            let args = arguments(&mut query)?;
            let results = self.run(query.sql(), args, Some(1))?;
            Ok(results.into_iter().find_map(|result| match result {
                Either::Right(row) => Some(row),
                Either::Left(_) => None,
            }))
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        _sql: &'q str,
        _parameters: &'e [AnyTypeInfo],
    ) -> BoxFuture<'e, Result<AnyStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        Box::pin(async { Err(unsupported("preparing a statement")) })
    }

    fn describe<'e, 'q: 'e>(
        self,
        _sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Any>, sqlx::Error>>
    where
        'c: 'e,
    {
        Box::pin(async { Err(unsupported("describing a statement")) })
    }
}

fn unsupported(what: &str) -> sqlx::Error {
    sqlx::Error::Protocol(format!(
        "{what} is not supported inside a SQLite write transaction; use Db::pool"
    ))
}
