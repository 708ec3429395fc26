//! Verdicts about what the stores hold, read with the harness's own SQL (never through
//! `switchyard_store`'s functions, so a bug there cannot hide itself): event counts, a tenant's
//! events with a digest of every field a migration must keep, and every acknowledged append
//! present exactly once.

use serde_json::Value;
use sqlx::Connection;
use uuid::Uuid;

use crate::*;

/// Counts the rows of `events` in a store (any backend), optionally for one tenant.
pub async fn count_events(url: &str, tenant: Option<Uuid>) -> Result<i64> {
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        let n = match tenant {
            Some(t) => {
                sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant_id = ?1")
                    .bind(t.to_string())
                    .fetch_one(&mut conn)
                    .await?
            }
            None => {
                sqlx::query_scalar("SELECT count(*) FROM events")
                    .fetch_one(&mut conn)
                    .await?
            }
        };
        Ok(n)
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let n = match tenant {
            Some(t) => {
                sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant_id = $1")
                    .bind(t)
                    .fetch_one(&mut conn)
                    .await?
            }
            None => {
                sqlx::query_scalar("SELECT count(*) FROM events")
                    .fetch_one(&mut conn)
                    .await?
            }
        };
        Ok(n)
    }
}

/// One event of a tenant as [`tenant_events`] lists it; rows sort by stream and version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventRow {
    pub aggregate_id: Uuid,
    pub version: i32,
    pub event_id: Uuid,
    /// Everything else a migration must keep: `type|event type|actor|timestamp|payload`.
    pub digest: String,
}

/// A tenant's events in a store, sorted by stream and version.
pub async fn tenant_events(url: &str, tenant: Uuid) -> Result<Vec<EventRow>> {
    let store = switchyard_store::EventStore::connect("check", url, 2)?;
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_tenant(tenant, after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = last.global_position;
        for e in &page {
            let payload: Value = serde_json::from_str(e.payload.get())?;
            let digest = format!(
                "{}|{}|{:?}|{}|{}",
                e.aggregate_type,
                e.event_type,
                e.actor_id,
                e.timestamp.to_rfc3339(),
                payload
            );
            out.push(EventRow {
                aggregate_id: e.aggregate_id,
                version: e.version,
                event_id: e.event_id,
                digest,
            });
        }
    }
    store.close().await;
    out.sort();
    Ok(out)
}

/// Every acknowledged append is in `events` (as [`tenant_events`] lists them) exactly once, at
/// its acknowledged stream and versions.
pub fn assert_all_acked(acked: &[Acked], events: &[EventRow]) {
    let by_id: std::collections::HashMap<Uuid, (Uuid, i32)> = events
        .iter()
        .map(|e| (e.event_id, (e.aggregate_id, e.version)))
        .collect();
    assert_eq!(by_id.len(), events.len(), "an event id appears twice");
    for append in acked {
        for (i, id) in append.event_ids.iter().enumerate() {
            let version =
                i32::try_from(append.first_version).unwrap_or(-1) + i32::try_from(i).unwrap_or(0);
            assert_eq!(
                by_id.get(id),
                Some(&(append.aggregate_id, version)),
                "acknowledged event {id} lost or moved"
            );
        }
    }
}

/// Waits until `target` holds exactly the tenant's events of `source` (the tail and mirror
/// converge; a lag of 0 alone does not count writes younger than the settle time); answers them.
pub async fn converged(source: &str, target: &str, tenant: Uuid) -> Result<Vec<EventRow>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (s, t) = (
            tenant_events(source, tenant).await?,
            tenant_events(target, tenant).await?,
        );
        if s == t {
            return Ok(t);
        }
        if std::time::Instant::now() > deadline {
            let missing = s.iter().filter(|e| t.binary_search(e).is_err()).count();
            let extra = t.iter().filter(|e| s.binary_search(e).is_err()).count();
            anyhow::bail!(
                "the target never converged: source {}, target {}, {missing} missing, {extra} extra",
                s.len(),
                t.len()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// The tenant's fence state in a store (`open`, `moved`), if it has a fence row.
pub async fn fence(url: &str, tenant: Uuid) -> Result<Option<String>> {
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        let state = sqlx::query_scalar("SELECT state FROM switchyard_fences WHERE tenant_id = ?1")
            .bind(tenant.to_string())
            .fetch_optional(&mut conn)
            .await?;
        conn.close().await?;
        return Ok(state);
    }
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let state = sqlx::query_scalar("SELECT state FROM switchyard_fences WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_optional(&mut conn)
        .await?;
    conn.close().await?;
    Ok(state)
}
