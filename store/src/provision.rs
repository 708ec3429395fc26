//! Creating and dropping whole PostgreSQL databases, for `switchyard-control demo
//! --store-url`: the demo makes its own databases on a server it is pointed at and drops them
//! when it is done.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::event::StoreError;

/// The URL of database `name` on the server of `server_url` (same user, host, port, options).
/// The URL is parsed, not pattern-matched: a password holding `/` or `@` (percent-encoded) stays
/// where it is.
pub fn database_url(server_url: &str, name: &str) -> Result<String, StoreError> {
    check_name(name)?;
    PgConnectOptions::from_str(server_url).map_err(StoreError::Query)?;
    let mut url = url::Url::parse(server_url)
        .map_err(|e| StoreError::Url(crate::url::UrlError::Unparseable(e)))?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

/// Creates database `name` (an identifier of `[a-z0-9_]` only) on the server of `server_url`.
pub async fn create_database(server_url: &str, name: &str) -> Result<(), StoreError> {
    check_name(name)?;
    let mut conn = admin_connection(server_url).await?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(())
}

/// Drops database `name` and the connections still open on it.
pub async fn drop_database(server_url: &str, name: &str) -> Result<(), StoreError> {
    check_name(name)?;
    let mut conn = admin_connection(server_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(())
}

/// A connection to the server's database, quiet about slow statements: creating and dropping
/// databases take a second or two, and that is not worth a warning.
async fn admin_connection(server_url: &str) -> Result<sqlx::PgConnection, StoreError> {
    PgConnectOptions::from_str(server_url)
        .map_err(StoreError::Query)?
        .log_slow_statements(log::LevelFilter::Off, std::time::Duration::from_secs(3600))
        .connect()
        .await
        .map_err(StoreError::Unavailable)
}

fn check_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(StoreError::Corrupt(format!(
            "database name {name:?} must be 1 to 63 characters of [a-z0-9_]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_another_database_on_the_same_server() {
        let url = |s: &str| database_url(s, "sy_demo").ok();
        assert_eq!(
            url("postgres://u:pw@h:5432/postgres?sslmode=disable").as_deref(),
            Some("postgres://u:pw@h:5432/sy_demo?sslmode=disable")
        );
        assert_eq!(url("postgres://h").as_deref(), Some("postgres://h/sy_demo"));
        assert!(database_url("postgres://h/db", "Bad-Name").is_err());
        assert_eq!(
            url("postgres://u:p%2Fw%40x@h/postgres").as_deref(),
            Some("postgres://u:p%2Fw%40x@h/sy_demo")
        );
    }
}
