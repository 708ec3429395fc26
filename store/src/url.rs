//! Database URLs: which backend a URL names, how to open a pool on it, and how to print it
//! without its password.

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

/// A parsed database URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Postgres(String),
    /// The path of the database file.
    Sqlite(String),
}

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// The scheme only: the rest of a URL that is not one of ours may hold a password in a
    /// place no redaction knows (`postgres:/u:pw@h/db` parses with the password in its path).
    #[error("unsupported database URL scheme {0}: expected postgres://… or sqlite://PATH")]
    Scheme(String),
    /// Not shown: its query may hold a password.
    #[error("sqlite URL names no file")]
    EmptyPath,
    /// The parser's reason only: an unparseable URL cannot be shown without its password.
    #[error("postgres URL does not parse: {0}")]
    Unparseable(url::ParseError),
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url::Url::parse(url).map_err(UrlError::Unparseable)?;
            return Ok(Self::Postgres(url.to_owned()));
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| UrlError::Scheme(scheme_of(url)))?;
        // Options after '?' are ours to set; keep only the path.
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() {
            return Err(UrlError::EmptyPath);
        }
        Ok(Self::Sqlite(path.to_owned()))
    }
}

/// A URL's scheme for an error message (`"mysql:"`), or a note that it has none.
fn scheme_of(url: &str) -> String {
    match url.split_once(':') {
        Some((scheme, _))
            if scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            format!("{scheme:?}")
        }
        _ => "(none)".to_owned(),
    }
}

/// Query parameters that carry a secret (libpq's and sqlx's names).
const SECRET_PARAMS: &[&str] = &["password", "sslpassword"];

/// The URL with its secrets replaced by `***`: the password of its userinfo and the values of
/// `password`-like query parameters. The URL is parsed as the drivers parse it (the WHATWG
/// rules of the `url` crate, which sqlx uses: the userinfo ends at the authority's last `@`),
/// never pattern-matched; a URL that does not parse is not shown at all.
pub fn redact(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return "<unparseable URL>".to_owned();
    };
    if url.password().is_some() && url.set_password(Some("***")).is_err() {
        return "<unparseable URL>".to_owned();
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let secret = SECRET_PARAMS.iter().any(|p| key.eq_ignore_ascii_case(p));
                let value = if secret { "***".into() } else { value };
                (key.into_owned(), value.into_owned())
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

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
/// see [`crate::tls`]); without `sslmode=` it is `prefer`, whatever the environment's
/// `PGSSLMODE` says, so the config alone decides.
pub fn pg_pool(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let mut options = PgConnectOptions::from_str(url)?
        .application_name("switchyard")
        .options(SERVER_KEEPALIVES)
        .log_slow_statements(log::LevelFilter::Debug, SLOW_STATEMENT);
    if !crate::tls::url_sets_mode(url) {
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
pub(crate) async fn ensure_sqlite_schema(
    pool: &SqlitePool,
    component: &str,
    version: i64,
    ddl: &[&str],
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
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    for statements in ddl {
        sqlx::raw_sql(statements).execute(&mut *tx).await?;
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
        for (name, version) in [("store.db", 2), ("control.db", 2)] {
            let mut c = sqlx::SqliteConnection::connect(&url(name)).await?;
            let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM switchyard_schema")
                .fetch_all(&mut c)
                .await?;
            assert_eq!(versions, vec![version], "{name}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn parses_both_backends_and_refuses_others() {
        assert!(matches!(
            StoreUrl::parse("postgres://u@h/db"),
            Ok(StoreUrl::Postgres(_))
        ));
        assert!(matches!(
            StoreUrl::parse("postgresql://u@h/db"),
            Ok(StoreUrl::Postgres(_))
        ));
        assert_eq!(
            StoreUrl::parse("sqlite://data/x.db?mode=rwc").ok(),
            Some(StoreUrl::Sqlite("data/x.db".to_owned()))
        );
        assert!(StoreUrl::parse("sqlite://").is_err());
        let err = StoreUrl::parse("mysql://root:pw@h/db").expect_err("unsupported");
        assert!(!err.to_string().contains("pw"), "{err}");
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://a/b.db"), "sqlite://a/b.db");
        // What a pattern missed: a password in the query, a password holding '@' or ':'.
        for (url, secret) in [
            (
                "postgres://u@h/db?sslmode=require&password=s3cr3t",
                "s3cr3t",
            ),
            ("postgres://h/db?PassWord=s3cr3t&user=u", "s3cr3t"),
            ("postgres://u:p@ss@h:5432/db", "p@ss"),
            ("postgres://u:p%40ss@h:5432/db", "p%40ss"),
            ("postgres://u:a:b@h/db", "a:b"),
            ("postgresql://u:pw@[::1]:5432/db?sslpassword=k3y", "k3y"),
            ("not a url u:s3cr3t@h", "s3cr3t"),
        ] {
            let shown = redact(url);
            assert!(!shown.contains(secret), "{url} → {shown}");
        }
        assert_eq!(
            redact("postgres://u:p@ss@h:5432/db?password=x&sslmode=require"),
            "postgres://u:***@h:5432/db?password=***&sslmode=require"
        );
    }
}
