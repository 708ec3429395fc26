//! The reads a store client library needs beyond a stream's page and the tenant feed (issue
//! 18): a stream read bounded on both ends and in either direction, a stream's version, one
//! event by id, a category (aggregate type) across the tenant's streams ordered by when the
//! store persisted each event. The feed (of one aggregate type or all) and the tenant's current
//! position are in `feed.rs`. Every read is confined to one tenant, on PostgreSQL and SQLite
//! alike; an append that lands a stream only at `exists` is here too, as it is a read then a
//! write.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::EventStore;
use crate::dialect::{on_backend, Lite, Pg};
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

impl Pg {
    /// An optional instant bound as `param`, typed so that `param IS NULL` is valid SQL.
    fn instant(self, t: Option<&DateTime<Utc>>, param: &str) -> (Option<DateTime<Utc>>, String) {
        (t.copied(), format!("{param}::timestamptz"))
    }
}

impl Lite {
    /// [`Pg::instant`] as the fixed-width UTC text the events' timestamps are stored as.
    fn instant(self, t: Option<&DateTime<Utc>>, param: &str) -> (Option<String>, String) {
        (t.map(format_timestamp), param.to_owned())
    }
}

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
        on_backend!(self, |pool, d| {
            let sql = format!(
                "SELECT {} FROM events
                  WHERE aggregate_id = $1 AND aggregate_type = $2 AND tenant_id = $3
                    AND version >= $4 AND version <= $5
                  ORDER BY version {order} LIMIT $6",
                d.event_columns()
            );
            let rows = sqlx::query(&sql)
                .bind(d.id(stream.aggregate_id))
                .bind(stream.aggregate_type)
                .bind(d.id(stream.tenant_id))
                .bind(range.from_version)
                .bind(to)
                .bind(i64::from(range.limit))
                .fetch_all(pool)
                .await?;
            rows.iter().map(|row| d.decode_event(row)).collect()
        })
    }

    /// The stream's version under `stream.tenant_id`: its event count, 0 when it has none.
    pub async fn stream_version(&self, stream: StreamRef<'_>) -> Result<i32, StoreError> {
        let version: Option<i32> = on_backend!(self, |pool, d| {
            sqlx::query_scalar(
                "SELECT max(version) FROM events
                  WHERE aggregate_id = $1 AND aggregate_type = $2 AND tenant_id = $3",
            )
            .bind(d.id(stream.aggregate_id))
            .bind(stream.aggregate_type)
            .bind(d.id(stream.tenant_id))
            .fetch_one(pool)
            .await?
        });
        Ok(version.unwrap_or(0))
    }

    /// The tenant's event with `event_id`, if the tenant has one.
    pub async fn find_event(
        &self,
        tenant_id: Uuid,
        event_id: Uuid,
    ) -> Result<Option<StoredEvent>, StoreError> {
        on_backend!(self, |pool, d| {
            let sql = format!(
                "SELECT {} FROM events WHERE event_id = $1 AND tenant_id = $2",
                d.event_columns()
            );
            let row = sqlx::query(&sql)
                .bind(d.id(event_id))
                .bind(d.id(tenant_id))
                .fetch_optional(pool)
                .await?;
            row.as_ref().map(|row| d.decode_event(row)).transpose()
        })
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
        // The arms differ in how the start instant is bound: a `timestamptz` on PostgreSQL,
        // fixed-width UTC text on SQLite (so text order is instant order).
        on_backend!(self, |pool, d| {
            let (from, from_param) = d.instant(start.from.as_ref(), "$3");
            let sql = format!(
                "SELECT {} FROM events
                  WHERE tenant_id = $1 AND aggregate_type = $2
                    AND ({from_param} IS NULL OR created_at > $3
                         OR (created_at = $3 AND global_position > $4))
                  ORDER BY created_at, global_position LIMIT $5",
                d.event_columns()
            );
            let rows = sqlx::query(&sql)
                .bind(d.id(tenant_id))
                .bind(aggregate_type)
                .bind(from)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?;
            rows.iter().map(|row| d.decode_event(row)).collect()
        })
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
