//! Stores created by eventsource-py's own DDL (vendored from eventsource-py 0.15.1 in
//! store/sql/eventsource-py/) work through Switchyard: `init` adds only Switchyard's objects,
//! idempotently and without rewriting `events`, and the library's existing rows read and
//! extend through the proxy.

use http::StatusCode;
use serde_json::json;
use sqlx::{Connection, Row};
use switchyard_tests::{
    events_body, feed_url, for_each_backend, stream_url, Backend, Env, Http, Result,
};
use uuid::Uuid;

const PG_DDL: &str = include_str!("../../../store/sql/eventsource-py/events-postgresql.sql");
const SQLITE_DDL: &str = include_str!("../../../store/sql/eventsource-py/events-sqlite.sql");

/// Creates the library's table and two events the way the library writes them.
async fn make_foreign_store(
    backend: Backend,
    url: &str,
    tenant: Uuid,
    aggregate: Uuid,
    legacy_without_txid: bool,
) -> Result<()> {
    let ids = [Uuid::new_v4(), Uuid::new_v4()];
    match backend {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            sqlx::raw_sql(PG_DDL).execute(&mut conn).await?;
            if legacy_without_txid {
                // A store from before the txid fragment.
                sqlx::query("ALTER TABLE events DROP COLUMN txid")
                    .execute(&mut conn)
                    .await?;
            }
            for (i, id) in ids.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, actor_id, version, timestamp, payload)
                     VALUES ($1, $2, 'Order', $3, $4, 'py', $5, now(), $6::jsonb)",
                )
                .bind(id)
                .bind(aggregate)
                .bind(format!("Legacy{i}"))
                .bind(tenant)
                .bind(i32::try_from(i + 1)?)
                .bind(json!({"from": "eventsource-py", "i": i}).to_string())
                .execute(&mut conn)
                .await?;
            }
        }
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc")).await?;
            sqlx::raw_sql(SQLITE_DDL).execute(&mut conn).await?;
            for (i, id) in ids.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, actor_id, version, timestamp, payload)
                     VALUES (?1, ?2, 'Order', ?3, ?4, 'py', ?5, '2024-01-15T10:30:00.123456+00:00', ?6)",
                )
                .bind(id.to_string())
                .bind(aggregate.to_string())
                .bind(format!("Legacy{i}"))
                .bind(tenant.to_string())
                .bind(i32::try_from(i + 1)?)
                .bind(json!({"from": "eventsource-py", "i": i}).to_string())
                .execute(&mut conn)
                .await?;
            }
        }
    }
    Ok(())
}

async fn relfilenode(url: &str) -> Result<i64> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    Ok(
        sqlx::query_scalar("SELECT relfilenode::bigint FROM pg_class WHERE relname = 'events'")
            .fetch_one(&mut conn)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_eventsource_py_made_works_through_the_proxy() -> Result<()> {
    for_each_backend(|backend| async move {
        for legacy in [false, true] {
            if legacy && backend == Backend::Sqlite {
                continue; // SQLite stores never had a txid column.
            }
            let env = Env::new(backend, &["shared"], "").await?;
            let (tenant, aggregate) = (Uuid::new_v4(), Uuid::new_v4());
            make_foreign_store(backend, env.store_url("shared"), tenant, aggregate, legacy).await?;

            let check = env.control(&["stores", "check"])?;
            assert_eq!(check.code, 1, "a store without Switchyard's objects is not ready: {}", check.stdout);
            assert!(check.stdout.contains("run init"), "{}", check.stdout);

            let before = if backend == Backend::Postgres { Some(relfilenode(env.store_url("shared")).await?) } else { None };
            env.control_json(&["init"])?;
            env.control_json(&["init"])?; // idempotent
            if let Some(before) = before {
                assert_eq!(relfilenode(env.store_url("shared")).await?, before, "init never rewrites events");
            }
            let check = env.control_json(&["stores", "check"])?;
            assert_eq!(check[0]["schema"], "ready");

            let proxy = env.proxy(&[])?;
            let http = Http::new();
            proxy.wait_ready(&http).await?;
            let url = stream_url(&proxy.data, tenant, "Order", aggregate);
            let read = http.get(&url).await?;
            let types: Vec<&str> = read.json["events"].as_array().expect("events").iter().filter_map(|e| e["event_type"].as_str()).collect();
            assert_eq!(types, vec!["Legacy0", "Legacy1"]);
            assert_eq!(read.json["events"][1]["payload"], json!({"from": "eventsource-py", "i": 1}));
            let appended = http.post(&url, &events_body(Some(2), 1, "FromProxy")).await?;
            assert_eq!(appended.status, StatusCode::CREATED, "{:?}", appended.json);
            assert_eq!(appended.json["first_version"], 3);
            let feed = http.get(&feed_url(&proxy.data, tenant)).await?;
            assert_eq!(feed.json["events"].as_array().map(Vec::len), Some(3));

            if backend == Backend::Postgres {
                let mut conn = sqlx::PgConnection::connect(env.store_url("shared")).await?;
                let rows = sqlx::query("SELECT version, txid IS NULL AS no_txid, created_at IS NOT NULL AS has_created FROM events ORDER BY version")
                    .fetch_all(&mut conn)
                    .await?;
                let no_txid: Vec<bool> = rows.iter().map(|r| r.get("no_txid")).collect();
                // Rows from before the column have NULL txid; the proxy's row gets one.
                assert_eq!(no_txid, vec![legacy, legacy, false]);
                assert!(rows.iter().all(|r| r.get::<bool, _>("has_created")));
            }
        }
        Ok(())
    })
    .await
}
