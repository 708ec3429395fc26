//! The reads a store client library needs beyond a stream's page and the tenant feed (issue
//! 18): a stream read bounded on both ends and in either direction, a stream's version, one
//! event by id, a category (aggregate type) across the tenant's streams ordered by when the
//! store persisted each event. The feed (of one aggregate type or all) and the tenant's current
//! position are in `feed.rs`. Every read is confined to one tenant, on PostgreSQL and SQLite
//! alike; an append that lands a stream only at `exists` is here too, as it is a read then a
//! write.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{postgres, sqlite, Backend, EventStore};
use crate::event::{format_timestamp, AppendError, Appended, NewEvent, StoreError, StoredEvent};
use crate::StreamRef;

/// How many times an append expecting an existing stream is retried when another writer
/// moved the stream on between reading its version and appending at it.
const MAX_EXISTS_RETRIES: usize = 16;

/// Which part of a stream to read, and in which order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamRange {
    /// The first version (inclusive, at least 1).
    pub from_version: i32,
    /// The last version (inclusive); `None` for the stream's end.
    pub to_version: Option<i32>,
    /// Newest first.
    pub backward: bool,
    pub limit: u32,
}

/// Where a category read starts: events persisted at or after `from`, and at exactly `from`
/// only those past `after_position` (the cursor of a previous page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CategoryStart {
    pub from: Option<DateTime<Utc>>,
    pub after_position: Option<i64>,
}

const PG_COLUMNS: &str = "global_position, event_id, aggregate_type, aggregate_id, tenant_id, \
     event_type, version, actor_id, timestamp, payload::text AS payload, created_at";
const SQLITE_COLUMNS: &str = "global_position, event_id, aggregate_type, aggregate_id, tenant_id, \
     event_type, version, actor_id, timestamp, payload, created_at";

impl EventStore {
    /// The stream's events in `range`, in version order (newest first when backward). Events
    /// of the same stream id under another tenant are not returned.
    pub async fn read_stream_range(
        &self,
        stream: StreamRef<'_>,
        range: StreamRange,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let order = if range.backward { "DESC" } else { "ASC" };
        let to = range.to_version.unwrap_or(i32::MAX);
        match &self.backend {
            Backend::Postgres(pool) => {
                let sql = format!(
                    "SELECT {PG_COLUMNS} FROM events
                      WHERE aggregate_id = $1 AND aggregate_type = $2 AND tenant_id = $3
                        AND version >= $4 AND version <= $5
                      ORDER BY version {order} LIMIT $6"
                );
                let rows = sqlx::query(&sql)
                    .bind(stream.aggregate_id)
                    .bind(stream.aggregate_type)
                    .bind(stream.tenant_id)
                    .bind(range.from_version)
                    .bind(to)
                    .bind(i64::from(range.limit))
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(postgres::decode).collect()
            }
            Backend::Sqlite(pool) => {
                let sql = format!(
                    "SELECT {SQLITE_COLUMNS} FROM events
                      WHERE aggregate_id = ?1 AND aggregate_type = ?2 AND tenant_id = ?3
                        AND version >= ?4 AND version <= ?5
                      ORDER BY version {order} LIMIT ?6"
                );
                let rows = sqlx::query(&sql)
                    .bind(stream.aggregate_id.to_string())
                    .bind(stream.aggregate_type)
                    .bind(stream.tenant_id.to_string())
                    .bind(range.from_version)
                    .bind(to)
                    .bind(i64::from(range.limit))
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(sqlite::decode).collect()
            }
        }
    }

    /// The stream's version under `stream.tenant_id`: its event count, 0 when it has none.
    pub async fn stream_version(&self, stream: StreamRef<'_>) -> Result<i32, StoreError> {
        let version: Option<i32> = match &self.backend {
            Backend::Postgres(pool) => {
                sqlx::query_scalar(
                    "SELECT max(version) FROM events
                      WHERE aggregate_id = $1 AND aggregate_type = $2 AND tenant_id = $3",
                )
                .bind(stream.aggregate_id)
                .bind(stream.aggregate_type)
                .bind(stream.tenant_id)
                .fetch_one(pool)
                .await?
            }
            Backend::Sqlite(pool) => {
                sqlx::query_scalar(
                    "SELECT max(version) FROM events
                      WHERE aggregate_id = ?1 AND aggregate_type = ?2 AND tenant_id = ?3",
                )
                .bind(stream.aggregate_id.to_string())
                .bind(stream.aggregate_type)
                .bind(stream.tenant_id.to_string())
                .fetch_one(pool)
                .await?
            }
        };
        Ok(version.unwrap_or(0))
    }

    /// The tenant's event with `event_id`, if the tenant has one.
    pub async fn find_event(
        &self,
        tenant_id: Uuid,
        event_id: Uuid,
    ) -> Result<Option<StoredEvent>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let sql = format!(
                    "SELECT {PG_COLUMNS} FROM events WHERE event_id = $1 AND tenant_id = $2"
                );
                let row = sqlx::query(&sql)
                    .bind(event_id)
                    .bind(tenant_id)
                    .fetch_optional(pool)
                    .await?;
                row.as_ref().map(postgres::decode).transpose()
            }
            Backend::Sqlite(pool) => {
                let sql = format!(
                    "SELECT {SQLITE_COLUMNS} FROM events WHERE event_id = ?1 AND tenant_id = ?2"
                );
                let row = sqlx::query(&sql)
                    .bind(event_id.to_string())
                    .bind(tenant_id.to_string())
                    .fetch_optional(pool)
                    .await?;
                row.as_ref().map(sqlite::decode).transpose()
            }
        }
    }

    /// The tenant's events of `aggregate_type` across its streams from `start`, at most
    /// `limit`, ordered by when the store persisted them (`created_at`, an instant), ties (one
    /// append's events) by global position, which is their version order.
    pub async fn read_category(
        &self,
        tenant_id: Uuid,
        aggregate_type: &str,
        start: CategoryStart,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let after = start.after_position.unwrap_or(-1);
        match &self.backend {
            Backend::Postgres(pool) => {
                let sql = format!(
                    "SELECT {PG_COLUMNS} FROM events
                      WHERE tenant_id = $1 AND aggregate_type = $2
                        AND ($3::timestamptz IS NULL OR created_at > $3
                             OR (created_at = $3 AND global_position > $4))
                      ORDER BY created_at, global_position LIMIT $5"
                );
                let rows = sqlx::query(&sql)
                    .bind(tenant_id)
                    .bind(aggregate_type)
                    .bind(start.from)
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(postgres::decode).collect()
            }
            Backend::Sqlite(pool) => {
                // Timestamps are fixed-width UTC text here, so text order is instant order.
                let sql = format!(
                    "SELECT {SQLITE_COLUMNS} FROM events
                      WHERE tenant_id = ?1 AND aggregate_type = ?2
                        AND (?3 IS NULL OR created_at > ?3
                             OR (created_at = ?3 AND global_position > ?4))
                      ORDER BY created_at, global_position LIMIT ?5"
                );
                let rows = sqlx::query(&sql)
                    .bind(tenant_id.to_string())
                    .bind(aggregate_type)
                    .bind(start.from.as_ref().map(format_timestamp))
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(sqlite::decode).collect()
            }
        }
    }

    /// Appends `events` to a stream that must already hold at least one event of the tenant
    /// (`expected_version: "stream_exists"`): at the version the stream has, re-read when
    /// another writer moves it on in between. A stream without events is a version conflict
    /// (expected none, actual 0). Idempotent by event id like [`EventStore::append`].
    pub async fn append_to_existing(
        &self,
        stream: StreamRef<'_>,
        events: &[NewEvent],
    ) -> Result<Appended, AppendError> {
        let mut attempt = 0;
        loop {
            let current = self.stream_version(stream).await?;
            // A retry of such an append that committed finds the stream at 1 or more, and the
            // store answers it by event id: refusing at 0 never refuses a retry.
            if current == 0 {
                return Err(AppendError::VersionConflict {
                    expected: None,
                    actual: 0,
                });
            }
            match self.append(stream, Some(current), events).await {
                Err(AppendError::VersionConflict { actual, .. })
                    if actual > 0 && attempt < MAX_EXISTS_RETRIES =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}
