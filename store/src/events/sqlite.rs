//! The SQLite event store. Writers are serialised by `BEGIN IMMEDIATE`, so an append is a
//! short write transaction of a few statements and can never lose a race half-way. UUIDs and
//! timestamps are TEXT, as eventsource-py writes them.

use chrono::{SubsecRound, Utc};
use serde_json::value::RawValue;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool};
use uuid::Uuid;

use super::postgres::{appended, AppendedRow};
use super::{Attempt, SchemaStatus};
use crate::event::{
    format_timestamp, parse_timestamp, AppendError, Appended, NewEvent, StoreError, StoredEvent,
    StreamRef,
};

const EVENTSOURCE_DDL: &str = include_str!("../../sql/eventsource-py/events-sqlite.sql");
const SWITCHYARD_DDL: &str = include_str!("../../sql/store-sqlite.sql");

/// The `switchyard_schema` version `store-sqlite.sql` records; raise both together.
const SCHEMA_VERSION: i64 = 3;

pub(super) async fn ensure_schema(pool: &SqlitePool) -> Result<(), StoreError> {
    crate::url::ensure_sqlite_schema(
        pool,
        "store",
        SCHEMA_VERSION,
        &[EVENTSOURCE_DDL, SWITCHYARD_DDL],
        &[],
    )
    .await?;
    Ok(())
}

pub(super) async fn schema_status(pool: &SqlitePool) -> Result<SchemaStatus, StoreError> {
    let (events, ours): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'events'),
                (SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'switchyard_fences')",
    )
    .fetch_one(pool)
    .await?;
    Ok(match (events > 0, ours > 0) {
        (false, _) => SchemaStatus::Empty,
        (true, false) => SchemaStatus::NeedsInit,
        (true, true) => SchemaStatus::Ready,
    })
}

pub(super) async fn append(
    pool: &SqlitePool,
    stream: StreamRef<'_>,
    expected_version: Option<i32>,
    events: &[NewEvent],
) -> Result<Appended, Attempt> {
    let tenant = stream.tenant_id.to_string();
    let aggregate_id = stream.aggregate_id.to_string();
    let mut tx = crate::dialect::begin_immediate(pool).await?;

    let fence: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT state, moved_to FROM switchyard_fences WHERE tenant_id = ?1")
            .bind(&tenant)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((state, moved_to)) = fence {
        // An append is never a copier's: a copiers-only fence refuses it as a moved one.
        if super::FenceState::refuses_writers(&state) {
            return Err(Attempt::Failed(AppendError::Fenced {
                moved_to: moved_to.unwrap_or_default(),
            }));
        }
    }

    let ids = serde_json::to_string(&events.iter().map(|e| e.event_id).collect::<Vec<_>>())
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE event_id IN (SELECT value FROM json_each(?1))"
    );
    let existing = sqlx::query(&sql).bind(&ids).fetch_all(&mut *tx).await?;
    if !existing.is_empty() {
        let existing: Vec<StoredEvent> = existing
            .iter()
            .map(decode)
            .collect::<Result<_, StoreError>>()?;
        let all_match = existing.len() == events.len()
            && events.iter().all(|new| {
                existing
                    .iter()
                    .any(|old| old.event_id == new.event_id && same_event(old, new, stream))
            });
        if !all_match {
            return Err(Attempt::Failed(AppendError::EventIdReused));
        }
        // Keyed by event id: request event i must sit at the first version plus i, or the
        // retry is another append (see SWI02 in store-postgresql.sql).
        let by_id: std::collections::HashMap<Uuid, &StoredEvent> =
            existing.iter().map(|e| (e.event_id, e)).collect();
        let in_request_order: Vec<&StoredEvent> = events
            .iter()
            .filter_map(|new| by_id.get(&new.event_id).copied())
            .collect();
        let first = in_request_order.first().map_or(0, |e| e.version);
        let in_order = in_request_order.len() == events.len()
            && in_request_order
                .iter()
                .zip(0..)
                .all(|(e, i)| e.version == first + i);
        if !in_order {
            return Err(Attempt::Failed(AppendError::RetryReordered));
        }
        let rows = in_request_order
            .iter()
            .map(|e| AppendedRow {
                version: e.version,
                position: e.global_position,
                timestamp: e.timestamp,
                created_at: e.created_at,
                event_id: e.event_id,
            })
            .collect();
        return appended(rows, events.len()).map_err(Attempt::from);
    }

    let head: Option<(i32, Option<String>)> = sqlx::query_as(
        "SELECT version, tenant_id FROM events
          WHERE aggregate_id = ?1 AND aggregate_type = ?2 ORDER BY version DESC LIMIT 1",
    )
    .bind(&aggregate_id)
    .bind(stream.aggregate_type)
    .fetch_optional(&mut *tx)
    .await?;
    let current = match head {
        Some((_, owner)) if owner.as_deref() != Some(tenant.as_str()) => {
            return Err(Attempt::Failed(AppendError::StreamOfOtherTenant))
        }
        Some((version, _)) => version,
        None => 0,
    };
    if let Some(expected) = expected_version {
        if expected != current {
            return Err(Attempt::Failed(AppendError::VersionConflict {
                expected: expected_version,
                actual: current,
            }));
        }
    }

    let now = Utc::now().trunc_subsecs(6);
    let mut rows = Vec::with_capacity(events.len());
    for (version, event) in (current + 1..).zip(events) {
        let timestamp = event.timestamp.unwrap_or(now);
        let position: i64 = sqlx::query_scalar(
            "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id,
                                 actor_id, version, timestamp, payload, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) RETURNING global_position",
        )
        .bind(event.event_id.to_string())
        .bind(&aggregate_id)
        .bind(stream.aggregate_type)
        .bind(&event.event_type)
        .bind(&tenant)
        .bind(event.actor_id.as_deref())
        .bind(version)
        .bind(format_timestamp(&timestamp))
        .bind(event.payload.get())
        .bind(format_timestamp(&now))
        .fetch_one(&mut *tx)
        .await?;
        rows.push(AppendedRow {
            version,
            position,
            timestamp,
            created_at: now,
            event_id: event.event_id,
        });
    }
    tx.commit().await?;
    appended(rows, events.len()).map_err(Attempt::from)
}

/// Whether a stored event is the one a retry re-sends (payloads compared as JSON values).
fn same_event(old: &StoredEvent, new: &NewEvent, stream: StreamRef<'_>) -> bool {
    let same_payload = match (
        serde_json::from_str::<serde_json::Value>(old.payload.get()),
        serde_json::from_str::<serde_json::Value>(new.payload.get()),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    old.tenant_id == Some(stream.tenant_id)
        && old.aggregate_type == stream.aggregate_type
        && old.aggregate_id == stream.aggregate_id
        && old.event_type == new.event_type
        && old.actor_id == new.actor_id
        && new.timestamp.is_none_or(|t| t == old.timestamp)
        && same_payload
}

pub(super) const EVENT_COLUMNS: &str =
    "global_position, event_id, aggregate_type, aggregate_id, tenant_id, \
     event_type, version, actor_id, timestamp, payload, created_at";

pub(super) async fn read_stream(
    pool: &SqlitePool,
    stream: StreamRef<'_>,
    from_version: i32,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events
          WHERE aggregate_id = ?1 AND aggregate_type = ?2 AND tenant_id = ?3 AND version >= ?4
          ORDER BY version LIMIT ?5"
    );
    let rows = sqlx::query(&sql)
        .bind(stream.aggregate_id.to_string())
        .bind(stream.aggregate_type)
        .bind(stream.tenant_id.to_string())
        .bind(from_version)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

pub(super) async fn read_tenant(
    pool: &SqlitePool,
    tenant_id: Uuid,
    after_position: i64,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events
          WHERE tenant_id = ?1 AND global_position > ?2
          ORDER BY global_position LIMIT ?3"
    );
    let rows = sqlx::query(&sql)
        .bind(tenant_id.to_string())
        .bind(after_position)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

fn parse_uuid(text: &str, column: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| StoreError::Corrupt(format!("{column} {text:?}: {e}")))
}

pub(crate) fn decode(row: &SqliteRow) -> Result<StoredEvent, StoreError> {
    let event_id: String = row.try_get("event_id")?;
    let aggregate_id: String = row.try_get("aggregate_id")?;
    let tenant_id: Option<String> = row.try_get("tenant_id")?;
    let timestamp: String = row.try_get("timestamp")?;
    let payload: String = row.try_get("payload")?;
    let created_at: String = row.try_get("created_at")?;
    Ok(StoredEvent {
        global_position: row.try_get("global_position")?,
        event_id: parse_uuid(&event_id, "event_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: parse_uuid(&aggregate_id, "aggregate_id")?,
        tenant_id: tenant_id
            .as_deref()
            .map(|t| parse_uuid(t, "tenant_id"))
            .transpose()?,
        event_type: row.try_get("event_type")?,
        version: row.try_get("version")?,
        actor_id: row.try_get("actor_id")?,
        timestamp: parse_timestamp(&timestamp)?,
        created_at: parse_timestamp(&created_at)?,
        payload: RawValue::from_string(payload)
            .map_err(|e| StoreError::Corrupt(format!("payload is not JSON: {e}")))?,
    })
}
