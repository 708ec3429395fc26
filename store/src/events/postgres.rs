//! The PostgreSQL event store: schema, one-round-trip append through `switchyard_append`,
//! reads.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::postgres::{PgDatabaseError, PgRow};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{Attempt, SchemaStatus};
use crate::event::{AppendError, Appended, NewEvent, StoreError, StoredEvent, StreamRef};

const EVENTSOURCE_DDL: &str = include_str!("../../sql/eventsource-py/events-postgresql.sql");
const SWITCHYARD_DDL: &str = include_str!("../../sql/store-postgresql.sql");
/// Serialises concurrent `init`s of one database (any constant of ours would do).
const SCHEMA_LOCK: i64 = 0x5359_5244_0001;

pub(super) async fn ensure_schema(pool: &PgPool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    // Never queue behind a long transaction on `events` for ever; report it instead.
    sqlx::query("SET LOCAL lock_timeout = '30s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SCHEMA_LOCK)
        .execute(&mut *tx)
        .await?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('events') IS NOT NULL")
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        sqlx::raw_sql(EVENTSOURCE_DDL).execute(&mut *tx).await?;
    }
    sqlx::raw_sql(SWITCHYARD_DDL).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn schema_status(pool: &PgPool) -> Result<SchemaStatus, StoreError> {
    let (events, ours): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('events') IS NOT NULL,
                EXISTS (SELECT 1 FROM pg_proc
                         WHERE oid = to_regprocedure('switchyard_append(uuid,text,uuid,integer,uuid[],text[],jsonb[],text[],timestamptz[])')
                           -- the current result type (a store initialised by an older
                           -- version needs `init` again)
                           AND 'out_event_id' = ANY (proargnames))",
    )
    .fetch_one(pool)
    .await?;
    Ok(match (events, ours) {
        (false, _) => SchemaStatus::Empty,
        (true, false) => SchemaStatus::NeedsInit,
        (true, true) => SchemaStatus::Ready,
    })
}

pub(super) async fn append(
    pool: &PgPool,
    stream: StreamRef<'_>,
    expected_version: Option<i32>,
    events: &[NewEvent],
) -> Result<Appended, Attempt> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let payloads: Vec<&str> = events.iter().map(|e| e.payload.get()).collect();
    let actors: Vec<Option<&str>> = events.iter().map(|e| e.actor_id.as_deref()).collect();
    let timestamps: Vec<Option<DateTime<Utc>>> = events.iter().map(|e| e.timestamp).collect();
    let rows = sqlx::query(
        "SELECT out_position, out_version, out_timestamp, out_created_at, out_event_id
           FROM switchyard_append($1, $2, $3, $4, $5, $6, $7::text[]::jsonb[], $8, $9)",
    )
    .bind(stream.tenant_id)
    .bind(stream.aggregate_type)
    .bind(stream.aggregate_id)
    .bind(expected_version)
    .bind(&ids)
    .bind(&types)
    .bind(&payloads)
    .bind(&actors)
    .bind(&timestamps)
    .fetch_all(pool)
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => return Err(classify(e, expected_version)),
    };
    let mut rows_out = Vec::with_capacity(rows.len());
    for row in &rows {
        rows_out.push(AppendedRow {
            version: row.try_get(1)?,
            position: row.try_get(0)?,
            timestamp: row.try_get(2)?,
            created_at: row.try_get(3)?,
            event_id: row.try_get(4)?,
        });
    }
    appended(rows_out, events.len()).map_err(Attempt::from)
}

/// One stored event of an append, as the store reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct AppendedRow {
    pub version: i32,
    pub position: i64,
    pub timestamp: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub event_id: Uuid,
}

/// Builds the reply from the stored rows, in version order.
pub(super) fn appended(
    mut rows: Vec<AppendedRow>,
    expected_len: usize,
) -> Result<Appended, StoreError> {
    rows.sort_unstable();
    match (rows.first(), rows.last()) {
        (Some(first), Some(last)) if rows.len() == expected_len => Ok(Appended {
            first_version: first.version,
            last_version: last.version,
            global_positions: rows.iter().map(|r| r.position).collect(),
            timestamps: rows.iter().map(|r| r.timestamp).collect(),
            created_at: rows.iter().map(|r| r.created_at).collect(),
            event_ids: rows.iter().map(|r| r.event_id).collect(),
            versions: rows.iter().map(|r| r.version).collect(),
        }),
        _ => Err(StoreError::Corrupt(format!(
            "append returned {} rows for {expected_len} events",
            rows.len()
        ))),
    }
}

/// Turns our SQLSTATEs into append outcomes.
fn classify(e: sqlx::Error, expected: Option<i32>) -> Attempt {
    let sqlx::Error::Database(db) = &e else {
        return e.into();
    };
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    let detail = db
        .try_downcast_ref::<PgDatabaseError>()
        .and_then(PgDatabaseError::detail)
        .unwrap_or_default()
        .to_owned();
    let actual = || detail.parse::<i32>().unwrap_or_default();
    match code.as_str() {
        "SWF01" => Attempt::Failed(AppendError::Fenced { moved_to: detail }),
        "SWI01" => Attempt::Failed(AppendError::EventIdReused),
        "SWI02" => Attempt::Failed(AppendError::RetryReordered),
        "SWS01" => Attempt::Failed(AppendError::StreamOfOtherTenant),
        "SWV01" => Attempt::Failed(AppendError::VersionConflict {
            expected,
            actual: actual(),
        }),
        "SWV02" => Attempt::LostRace { actual: actual() },
        _ => e.into(),
    }
}

const EVENT_COLUMNS: &str = "global_position, event_id, aggregate_type, aggregate_id, tenant_id, \
     event_type, version, actor_id, timestamp, payload::text AS payload, created_at";

pub(super) async fn read_stream(
    pool: &PgPool,
    stream: StreamRef<'_>,
    from_version: i32,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events
          WHERE aggregate_id = $1 AND aggregate_type = $2 AND tenant_id = $3 AND version >= $4
          ORDER BY version LIMIT $5"
    );
    let rows = sqlx::query(&sql)
        .bind(stream.aggregate_id)
        .bind(stream.aggregate_type)
        .bind(stream.tenant_id)
        .bind(from_version)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

pub(super) async fn read_tenant(
    pool: &PgPool,
    tenant_id: Uuid,
    after_position: i64,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events
          WHERE tenant_id = $1 AND global_position > $2
          ORDER BY global_position LIMIT $3"
    );
    let rows = sqlx::query(&sql)
        .bind(tenant_id)
        .bind(after_position)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

pub(crate) fn decode(row: &PgRow) -> Result<StoredEvent, StoreError> {
    let payload: String = row.try_get("payload")?;
    Ok(StoredEvent {
        global_position: row.try_get("global_position")?,
        event_id: row.try_get("event_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        tenant_id: row.try_get("tenant_id")?,
        event_type: row.try_get("event_type")?,
        version: row.try_get("version")?,
        actor_id: row.try_get("actor_id")?,
        timestamp: row.try_get("timestamp")?,
        created_at: row.try_get("created_at")?,
        payload: RawValue::from_string(payload)
            .map_err(|e| StoreError::Corrupt(format!("payload is not JSON: {e}")))?,
    })
}

#[cfg(test)]
mod tests {
    /// A store may be a database in any server encoding eventsource-py accepts (LATIN1, say):
    /// the schema we send it must convert to every one of them, so it is ASCII only.
    #[test]
    fn the_store_schema_is_ascii_so_any_database_encoding_takes_it() {
        for (name, ddl) in [
            ("eventsource-py", super::EVENTSOURCE_DDL),
            ("switchyard", super::SWITCHYARD_DDL),
        ] {
            if let Some((line, text)) = ddl.lines().enumerate().find(|(_, l)| !l.is_ascii()) {
                panic!("{name} DDL line {}: non-ASCII text: {text}", line + 1);
            }
        }
    }
}
