//! Opening pools on database URLs, and the SQLite schema check every pool's first user runs.
//! (Which backend a URL names, and printing it without its password, are the configuration's:
//! `switchyard_config::url`, re-exported here.)

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, PgPool, SqlitePool};

/// Our own statements that run longer than [`SLOW_STATEMENT`] are logged at debug level, not
/// sqlx's default warning: the long ones are ours by design (a verification's or the lag
/// check's scan of a whole tenant, the bulk copy's batches, a writer waiting for SQLite's write
/// lock), each is timed where it matters (the cutover's `steps_ms`, the metrics), and a warning
/// with the statement's text in the middle of `demo`'s or an operator's output only hides what
/// they are there to read. `RUST_LOG=sqlx=debug` shows them.
const SLOW_STATEMENT: Duration = Duration::from_secs(1);

pub use switchyard_config::url::{StoreUrl, UrlError};

/// TCP keepalives every pool asks of the server for its connections (`tcp_keepalives_*`,
/// `tcp_user_timeout`): a client whose host or network died is noticed in about a minute and
/// its session ended, so a transaction it held (a tenant's fence) does not stay open for the
/// kernel's default two hours. sqlx 0.8 has no client-side keepalive option; the server's
/// side is the one that frees locks. (A process that is alive but frozen is ended by the fence
/// transaction's own idle timeout, see `FenceLock`.)
const SERVER_KEEPALIVES: [(&str, &str); 4] = [
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "60000"),
];

/// Opens a PostgreSQL pool. Connections are made lazily so a process can start (and report
/// itself unready) while a database is down.
///
/// TLS is what the URL's `sslmode=` and `sslrootcert=` say (the config writes its keys there,
/// see `switchyard_config::tls`); without `sslmode=` it is `prefer`, whatever the environment's
/// `PGSSLMODE` says, so the config alone decides.
pub fn pg_pool(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    pg_pool_planning(url, max_connections, Planning::Cached)
}

/// How a pool's sessions plan the statements they run again and again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planning {
    /// PostgreSQL's default: after five runs a session may settle on one generic plan per
    /// prepared statement, kept until the table's statistics change. The data plane's: an
    /// append planned afresh costs about 200 µs more (BENCHMARKS.md, `plan_cache_mode`).
    Cached,
    /// `plan_cache_mode = force_custom_plan`: every run planned for the tables as they are
    /// then. The control plane's (its copies, tails, verification and cutovers), whose
    /// statements run in long-lived sessions against stores that grow by orders of magnitude
    /// under them (a bulk copy, a reverse replication); a generic plan made on a nearly empty store read a stream's rows through
    /// the index on `aggregate_type` and tenant, every row of that type per stream, and where
    /// nothing analyzes the store (autovacuum off) nothing replaced it: one classifying
    /// statement of a tail batch ran for over 7 minutes. Their statements are batches, for
    /// which planning costs little.
    EachRun,
}

/// [`pg_pool`] with the sessions' [`Planning`].
pub fn pg_pool_planning(
    url: &str,
    max_connections: u32,
    planning: Planning,
) -> Result<PgPool, sqlx::Error> {
    let mut options = PgConnectOptions::from_str(url)?
        .application_name("switchyard")
        .options(SERVER_KEEPALIVES)
        .log_slow_statements(log::LevelFilter::Debug, SLOW_STATEMENT);
    if planning == Planning::EachRun {
        options = options.options([("plan_cache_mode", "force_custom_plan")]);
    }
    if !switchyard_config::tls::url_sets_mode(url) {
        options = options.ssl_mode(PgSslMode::Prefer);
    }
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(Some(Duration::from_secs(300)))
        .connect_lazy_with(options))
}

/// Opens a SQLite pool on a file, creating it and its folder if missing. WAL lets readers run
/// beside the one writer; writers wait up to the busy timeout for the write lock.
pub fn sqlite_pool(path: &str, max_connections: u32) -> Result<SqlitePool, sqlx::Error> {
    if let Some(parent) = std::path::Path::new(path).parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(sqlx::Error::Io)?;
        }
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
        .log_slow_statements(log::LevelFilter::Debug, SLOW_STATEMENT);
    Ok(SqlitePoolOptions::new()
        .max_connections(max_connections.clamp(1, 8))
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

/// Runs idempotent DDL on a SQLite database unless `switchyard_schema` already records
/// `component` at `version` or later (the DDL's own last statement writes that row).
///
/// The check is a read, so a database whose schema is current never waits for the write lock:
/// every command of the embedded default ensures its schemas at start, and an append, a fence
/// or an operator's `BEGIN IMMEDIATE` elsewhere would otherwise hold it for up to the busy
/// timeout and then fail it with "database is locked".
///
/// `columns` (`(table, column, declaration)`) are added after the DDL to tables that lack them:
/// SQLite's `ALTER TABLE … ADD COLUMN` has no IF NOT EXISTS, and the DDL runs again whenever
/// the recorded version is older.
pub(crate) async fn ensure_sqlite_schema(
    pool: &SqlitePool,
    component: &str,
    version: i64,
    ddl: &[&str],
    columns: &[(&str, &str, &str)],
) -> Result<(), sqlx::Error> {
    let recorded =
        sqlx::query_scalar::<_, i64>("SELECT version FROM switchyard_schema WHERE component = ?1")
            .bind(component)
            .fetch_optional(pool)
            .await;
    match recorded {
        Ok(Some(found)) if found >= version => return Ok(()),
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.message().contains("no such table") => {}
        Err(e) => return Err(e),
    }
    let mut tx = crate::dialect::begin_immediate(pool).await?;
    // Again under the write lock: another process may have upgraded since.
    let recorded =
        sqlx::query_scalar::<_, i64>("SELECT version FROM switchyard_schema WHERE component = ?1")
            .bind(component)
            .fetch_optional(&mut *tx)
            .await;
    match recorded {
        Ok(Some(found)) if found >= version => return tx.commit().await,
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.message().contains("no such table") => {}
        Err(e) => return Err(e),
    }
    for statements in ddl {
        sqlx::raw_sql(statements).execute(&mut *tx).await?;
    }
    for (table, column, declaration) in columns {
        let present: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2")
                .bind(table)
                .bind(column)
                .fetch_one(&mut *tx)
                .await?;
        if present == 0 {
            sqlx::raw_sql(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
            ))
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command of the embedded default ensures its schemas at start: on a current
    /// database that must not wait for the write lock an append or a fence holds.
    #[tokio::test]
    async fn a_current_sqlite_schema_is_checked_without_the_write_lock() -> anyhow::Result<()> {
        use sqlx::Connection;
        let dir = std::env::temp_dir().join(format!("switchyard-schema-{}", uuid::Uuid::new_v4()));
        let url = |name: &str| format!("sqlite://{}", dir.join(name).display());
        let store = crate::EventStore::connect("s", &url("store.db"), 2)?;
        let control = crate::ControlDb::connect(&url("control.db"), 2)?;
        store.ensure_schema().await?;
        control.ensure_schema().await?;

        let mut holders = Vec::new();
        for name in ["store.db", "control.db"] {
            let mut holder = sqlx::SqliteConnection::connect(&url(name)).await?;
            sqlx::query("BEGIN IMMEDIATE").execute(&mut holder).await?;
            holders.push(holder);
        }
        let quick = Duration::from_secs(3);
        let other = crate::EventStore::connect("s", &url("store.db"), 2)?;
        tokio::time::timeout(quick, other.ensure_schema()).await??;
        let other = crate::ControlDb::connect(&url("control.db"), 2)?;
        tokio::time::timeout(quick, other.ensure_schema()).await??;

        // An older recorded version runs the DDL again, under the write lock.
        for mut holder in holders {
            sqlx::query("UPDATE switchyard_schema SET version = 0")
                .execute(&mut holder)
                .await?;
            sqlx::query("COMMIT").execute(&mut holder).await?;
        }
        store.ensure_schema().await?;
        control.ensure_schema().await?;
        for (name, version) in [("store.db", 3), ("control.db", 3)] {
            let mut c = sqlx::SqliteConnection::connect(&url(name)).await?;
            let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM switchyard_schema")
                .fetch_all(&mut c)
                .await?;
            assert_eq!(versions, vec![version], "{name}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
