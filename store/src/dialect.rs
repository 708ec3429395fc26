//! The one way this crate writes a query for both backends.
//!
//! A database handle ([`crate::ControlDb`], [`crate::EventStore`]) holds a [`Backend`]: the
//! PostgreSQL or the SQLite pool. [`on_backend!`] runs a body against it with the pool and the
//! backend's dialect ([`Pg`] or [`Lite`]); the body is compiled once per backend, so the same
//! SQL text binds natively typed values on each, and the dialect spells what differs: the
//! clock (`now`, `now_plus`), UUIDs (native on PostgreSQL, TEXT on SQLite), write transactions
//! (`BEGIN IMMEDIATE` on SQLite), pass-window bounds, and reading rows ([`Columns`]). Both
//! backends take `$N` placeholders.
//!
//! Why this cut rather than a query builder or `Sql { pg, sqlite }` pairs: most queries are the
//! same text on both backends and differ only in what is bound and how rows decode, which is
//! exactly what a per-backend compile of one body gives for free; a pair would duplicate that
//! text. Queries that are different algorithms on each backend (PostgreSQL `unnest` of
//! arrays against SQLite `json_each` or a loop, server-side digests, `pg_stat_activity`) keep
//! one `match` on [`Backend`] with both arms side by side.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{PgPool, Postgres, Row, Sqlite, SqlitePool, Transaction};
use uuid::Uuid;

use crate::control::MigrationState;
use crate::event::{parse_timestamp, StoreError};
use crate::url::{pg_pool_planning, sqlite_pool, Planning, StoreUrl};

/// A database's pool, on whichever backend its URL names.
#[derive(Clone, Debug)]
pub(crate) enum Backend {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Backend {
    /// Opens a lazily connecting pool on `url`.
    pub(crate) fn connect(
        url: &str,
        max_connections: u32,
        planning: Planning,
    ) -> Result<Self, StoreError> {
        Ok(match StoreUrl::parse(url)? {
            StoreUrl::Postgres(url) => {
                Self::Postgres(pg_pool_planning(&url, max_connections, planning)?)
            }
            StoreUrl::Sqlite(path) => Self::Sqlite(sqlite_pool(&path, max_connections)?),
        })
    }

    pub(crate) fn is_sqlite(&self) -> bool {
        matches!(self, Self::Sqlite(_))
    }

    /// One cheap round trip, for readiness.
    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        on_backend!(self, |pool, _d| {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub(crate) async fn close(&self) {
        on_backend!(self, |pool, _d| pool.close().await);
    }
}

/// Runs `$body` against `$db`'s backend — `$db` is a [`Backend`] or anything with a `backend`
/// field holding one — with `$pool` its pool and `$d` its dialect ([`Pg`] or [`Lite`]).
macro_rules! on_backend {
    ($db:expr, |$pool:ident, $d:ident| $body:expr) => {
        match $crate::dialect::AsBackend::as_backend(&$db) {
            $crate::dialect::Backend::Postgres($pool) => {
                let $d = $crate::dialect::Pg;
                $body
            }
            $crate::dialect::Backend::Sqlite($pool) => {
                let $d = $crate::dialect::Lite;
                $body
            }
        }
    };
}
pub(crate) use on_backend;

/// What [`on_backend!`] dispatches on.
pub(crate) trait AsBackend {
    fn as_backend(&self) -> &Backend;
}

impl AsBackend for Backend {
    fn as_backend(&self) -> &Backend {
        self
    }
}

impl<T: AsBackend> AsBackend for &T {
    fn as_backend(&self) -> &Backend {
        (**self).as_backend()
    }
}

/// PostgreSQL's spelling of what differs between the backends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pg;

/// SQLite's: UUIDs are TEXT, timestamps TEXT in one sortable format, writers `BEGIN IMMEDIATE`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lite;

impl Pg {
    pub(crate) fn now(self) -> &'static str {
        "NOW()"
    }

    /// The time `seconds_param` (a float8 parameter) from now.
    pub(crate) fn now_plus(self, seconds_param: &str) -> String {
        format!("(NOW() + make_interval(secs => {seconds_param}))")
    }

    pub(crate) fn id(self, id: Uuid) -> Uuid {
        id
    }

    pub(crate) async fn begin(
        self,
        pool: &PgPool,
    ) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        pool.begin().await
    }

    /// A pass window's bounds as the event store's window condition binds them (`$3`, `$4`):
    /// transaction ids, as text cast to `xid8`.
    pub(crate) fn window_bounds(self, window: crate::PassWindow) -> (Option<String>, String) {
        (window.from.map(|f| f.to_string()), window.to.to_string())
    }
}

impl Lite {
    pub(crate) fn now(self) -> &'static str {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    }

    pub(crate) fn now_plus(self, seconds_param: &str) -> String {
        format!("strftime('%Y-%m-%dT%H:%M:%fZ', julianday('now') + {seconds_param} / 86400.0)")
    }

    pub(crate) fn id(self, id: Uuid) -> String {
        id.to_string()
    }

    /// A write transaction that holds the write lock from its start, so a read-then-write
    /// inside it cannot fail to upgrade.
    pub(crate) async fn begin(
        self,
        pool: &SqlitePool,
    ) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        begin_immediate(pool).await
    }

    /// A pass window's bounds as the event store's window condition binds them (`$3`, `$4`):
    /// global positions.
    pub(crate) fn window_bounds(self, window: crate::PassWindow) -> (Option<i64>, i64) {
        (window.from, window.to)
    }
}

/// Typed column reads that differ between the backends' rows.
pub(crate) trait Columns {
    fn text(&self, column: &str) -> Result<String, StoreError>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, column: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError>;
    fn opt_uuid(&self, column: &str) -> Result<Option<Uuid>, StoreError>;
    fn opt_time(&self, column: &str) -> Result<Option<DateTime<Utc>>, StoreError>;
    fn opt_json(&self, column: &str) -> Result<Option<Value>, StoreError>;

    fn uuid(&self, column: &str) -> Result<Uuid, StoreError> {
        self.opt_uuid(column)?
            .ok_or_else(|| StoreError::Corrupt(format!("{column} is NULL")))
    }

    fn time(&self, column: &str) -> Result<DateTime<Utc>, StoreError> {
        self.opt_time(column)?
            .ok_or_else(|| StoreError::Corrupt(format!("{column} is NULL")))
    }

    fn opt_state(&self, column: &str) -> Result<Option<MigrationState>, StoreError> {
        self.opt_text(column)?
            .map(|s| {
                s.parse()
                    .map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
            })
            .transpose()
    }

    fn state(&self, column: &str) -> Result<MigrationState, StoreError> {
        self.opt_state(column)?
            .ok_or_else(|| StoreError::Corrupt(format!("{column} is NULL")))
    }
}

/// The reads both backends type alike (text and integers).
macro_rules! natively_typed_columns {
    () => {
        fn text(&self, column: &str) -> Result<String, StoreError> {
            Ok(self.try_get(column)?)
        }
        fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
            Ok(self.try_get(column)?)
        }
        fn int(&self, column: &str) -> Result<i64, StoreError> {
            Ok(self.try_get(column)?)
        }
        fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
            Ok(self.try_get(column)?)
        }
    };
}

impl Columns for PgRow {
    natively_typed_columns!();
    fn opt_uuid(&self, column: &str) -> Result<Option<Uuid>, StoreError> {
        Ok(self.try_get(column)?)
    }
    fn opt_time(&self, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self.try_get(column)?)
    }
    fn opt_json(&self, column: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.try_get(column)?)
    }
}

impl Columns for SqliteRow {
    natively_typed_columns!();
    fn opt_uuid(&self, column: &str) -> Result<Option<Uuid>, StoreError> {
        self.opt_text(column)?
            .map(|t| {
                Uuid::parse_str(&t).map_err(|e| StoreError::Corrupt(format!("{column} {t:?}: {e}")))
            })
            .transpose()
    }
    fn opt_time(&self, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.opt_text(column)?
            .map(|t| parse_timestamp(&t))
            .transpose()
    }
    fn opt_json(&self, column: &str) -> Result<Option<Value>, StoreError> {
        self.opt_text(column)?
            .map(|t| {
                serde_json::from_str(&t)
                    .map_err(|e| StoreError::Corrupt(format!("{column} is not JSON: {e}")))
            })
            .transpose()
    }
}

/// SQLite's `BEGIN IMMEDIATE`, safe to cancel. sqlx runs the `BEGIN` on the connection's
/// worker thread; a caller dropped while it waits (for the write lock, up to the busy timeout:
/// a client that hung up, a timeout around the call) never receives the transaction whose drop
/// would roll it back, so the connection went back to the pool inside a transaction nobody
/// ends, and every later writer on it failed ("attempted to call begin_with at non-zero
/// transaction depth", "database is locked"). Spawned, the begin always completes into a
/// transaction; when the caller is gone, the task's dropped result rolls it back.
pub(crate) async fn begin_immediate(
    pool: &SqlitePool,
) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.begin_with("BEGIN IMMEDIATE").await })
        .await
        .map_err(|_| sqlx::Error::WorkerCrashed)?
}
