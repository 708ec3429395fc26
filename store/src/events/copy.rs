//! What the migration engine asks of stores: stable horizons, a tenant's events in a pass
//! window, the target-order insert, counts, and the tenant's fence.
//!
//! **Stable horizon.** On PostgreSQL a pass copies the rows whose inserting transaction is
//! below `pg_snapshot_xmin(pg_current_snapshot())` taken at the pass start: every such
//! transaction has finished, so those rows are final, whatever their positions. The next pass
//! starts where this one ended. Rows with a NULL `txid` predate the column and belong to the
//! first pass. On SQLite writers are serialised, so positions commit in order and the horizon
//! is simply the highest position.
//!
//! **Target order.** [`EventStore::insert_copied`] lands a stream's version `v` only when
//! `v = 1` or `v - 1` is already in the target (or lands just before it in the same call), so
//! the target never has a gap; rows that cannot land yet are reported and retried later.

use std::collections::HashMap;

use chrono::Utc;
use sqlx::{PgPool, SqlitePool};
use uuid::Uuid;

use super::{Backend, EventStore};
use crate::event::{format_timestamp, StoreError, StoredEvent};

/// The rows one pass copies: PostgreSQL `from <= txid < to` (and NULL txids when `from` is
/// `None`); SQLite `from < global_position <= to` (`None` = from the start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PassWindow {
    pub from: Option<i64>,
    pub to: i64,
}

impl PassWindow {
    /// The first pass: everything up to `horizon`.
    pub fn first(horizon: i64) -> Self {
        Self {
            from: None,
            to: horizon,
        }
    }

    /// The pass after this one, up to `horizon`.
    pub fn next(self, horizon: i64) -> Self {
        Self {
            from: Some(self.to),
            to: horizon.max(self.to),
        }
    }

    pub fn is_empty(self) -> bool {
        self.from == Some(self.to)
    }
}

pub(super) const PG_WINDOW: &str = "tenant_id = $1 AND global_position > $2
    AND ($3::text IS NULL AND (txid IS NULL OR txid < $4::text::xid8)
         OR txid >= $3::text::xid8 AND txid < $4::text::xid8)";
pub(super) const SQLITE_WINDOW: &str = "tenant_id = ?1 AND global_position > ?2
    AND global_position > coalesce(?3, 0) AND global_position <= ?4";

const PG_COLUMNS: &str = "global_position, event_id, aggregate_type, aggregate_id, tenant_id, \
     event_type, version, actor_id, timestamp, payload::text AS payload, created_at";
const SQLITE_COLUMNS: &str = "global_position, event_id, aggregate_type, aggregate_id, tenant_id, \
     event_type, version, actor_id, timestamp, payload, created_at";

/// Inserts a batch under the target-order rule and answers `(event_id, global_position)` of
/// the rows it inserted; rows already there or waiting for their predecessor are looked up
/// after (see [`insert_copied_pg`]). `heads` is materialised so each stream's head is looked
/// up once. Returning only the inserted rows (rather than joining every batch row back to
/// the insert and to `events`) matters: with a generic plan PostgreSQL estimates `unnest` of
/// a parameter at 10 rows and such a join turned into a batch² nested loop (measured: 3.4 s
/// against 0.46 s per 5,000-event batch; BENCHMARKS.md).
const PG_INSERT_COPIED: &str = "
WITH batch AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::uuid[], $6::text[],
                         $7::int4[], $8::timestamptz[], $9::text[], $10::timestamptz[])
           WITH ORDINALITY AS b(event_id, aggregate_id, aggregate_type, event_type, tenant_id,
                                actor_id, version, ts, payload, created_at, ord)
), heads AS MATERIALIZED (
    SELECT s.aggregate_id, s.aggregate_type,
           coalesce((SELECT max(e.version) FROM events e
                      WHERE e.aggregate_id = s.aggregate_id
                        AND e.aggregate_type = s.aggregate_type), 0) AS head
      FROM (SELECT DISTINCT aggregate_id, aggregate_type FROM batch) s
), landing AS (
    SELECT b.*, h.head,
           row_number() OVER (PARTITION BY b.aggregate_id, b.aggregate_type ORDER BY b.version) AS rn
      FROM batch b JOIN heads h USING (aggregate_id, aggregate_type)
     WHERE b.version > h.head
)
INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, actor_id,
                    version, timestamp, payload, created_at)
SELECT event_id, aggregate_id, aggregate_type, event_type, tenant_id, actor_id,
       version, ts, payload::jsonb, created_at
  FROM landing WHERE version = head + rn
 ORDER BY ord
ON CONFLICT DO NOTHING
RETURNING event_id, global_position";

impl EventStore {
    /// The current stable horizon (see the module docs).
    pub async fn horizon(&self) -> Result<i64, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let text: String =
                    sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
                        .fetch_one(pool)
                        .await?;
                text.parse()
                    .map_err(|e| StoreError::Corrupt(format!("snapshot xmin {text:?}: {e}")))
            }
            Backend::Sqlite(pool) => Ok(sqlx::query_scalar(
                "SELECT coalesce(max(global_position), 0) FROM events",
            )
            .fetch_one(pool)
            .await?),
        }
    }

    /// A horizon every transaction that has committed by now is below: once a pass reaches it,
    /// everything committed before this call has been seen. PostgreSQL: the snapshot's xmax;
    /// SQLite: the highest position.
    pub async fn horizon_ceiling(&self) -> Result<i64, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let text: String =
                    sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
                        .fetch_one(pool)
                        .await?;
                text.parse()
                    .map_err(|e| StoreError::Corrupt(format!("snapshot xmax {text:?}: {e}")))
            }
            Backend::Sqlite(_) => self.horizon().await,
        }
    }

    /// The tenant's events in `window` after `after_position`, at most `limit`, in position
    /// order.
    pub async fn read_window(
        &self,
        tenant: Uuid,
        window: PassWindow,
        after_position: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let sql = format!(
                    "SELECT {PG_COLUMNS} FROM events WHERE {PG_WINDOW} ORDER BY global_position LIMIT $5"
                );
                let rows = sqlx::query(&sql)
                    .bind(tenant)
                    .bind(after_position)
                    .bind(window.from.map(|f| f.to_string()))
                    .bind(window.to.to_string())
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(super::postgres::decode).collect()
            }
            Backend::Sqlite(pool) => {
                let sql = format!(
                    "SELECT {SQLITE_COLUMNS} FROM events WHERE {SQLITE_WINDOW} ORDER BY global_position LIMIT ?5"
                );
                let rows = sqlx::query(&sql)
                    .bind(tenant.to_string())
                    .bind(after_position)
                    .bind(window.from)
                    .bind(window.to)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(super::sqlite::decode).collect()
            }
        }
    }

    /// How many of the tenant's events `window` holds.
    pub async fn count_window(&self, tenant: Uuid, window: PassWindow) -> Result<i64, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let sql = format!("SELECT count(*) FROM events WHERE {PG_WINDOW}");
                Ok(sqlx::query_scalar(&sql)
                    .bind(tenant)
                    .bind(0i64)
                    .bind(window.from.map(|f| f.to_string()))
                    .bind(window.to.to_string())
                    .fetch_one(pool)
                    .await?)
            }
            Backend::Sqlite(pool) => {
                let sql = format!("SELECT count(*) FROM events WHERE {SQLITE_WINDOW}");
                Ok(sqlx::query_scalar(&sql)
                    .bind(tenant.to_string())
                    .bind(0i64)
                    .bind(window.from)
                    .bind(window.to)
                    .fetch_one(pool)
                    .await?)
            }
        }
    }

    /// Ids of the tenant's events in `window` that were written at least `settled` ago (by
    /// the store's clock), at most `limit`: what a lag measurement checks against the target.
    pub async fn settled_ids(
        &self,
        tenant: Uuid,
        window: PassWindow,
        settled: std::time::Duration,
        limit: u32,
    ) -> Result<Vec<Uuid>, StoreError> {
        let millis = i64::try_from(settled.as_millis()).unwrap_or(i64::MAX);
        match &self.backend {
            Backend::Postgres(pool) => {
                let sql = format!(
                    "SELECT event_id FROM events WHERE {PG_WINDOW}
                        AND created_at < clock_timestamp() - make_interval(secs => $5::float8 / 1000)
                      LIMIT $6"
                );
                Ok(sqlx::query_scalar(&sql)
                    .bind(tenant)
                    .bind(0i64)
                    .bind(window.from.map(|f| f.to_string()))
                    .bind(window.to.to_string())
                    .bind(millis)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?)
            }
            Backend::Sqlite(pool) => {
                let cutoff =
                    format_timestamp(&(Utc::now() - chrono::Duration::milliseconds(millis)));
                let sql = format!(
                    "SELECT event_id FROM events WHERE {SQLITE_WINDOW} AND created_at < ?5 LIMIT ?6"
                );
                let ids: Vec<String> = sqlx::query_scalar(&sql)
                    .bind(tenant.to_string())
                    .bind(0i64)
                    .bind(window.from)
                    .bind(window.to)
                    .bind(cutoff)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?;
                ids.iter()
                    .map(|id| {
                        Uuid::parse_str(id)
                            .map_err(|e| StoreError::Corrupt(format!("event_id {id:?}: {e}")))
                    })
                    .collect()
            }
        }
    }

    /// Where each of `ids` that is here sits: event id → global position.
    pub async fn positions_of(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, i64>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        match &self.backend {
            Backend::Postgres(pool) => {
                let rows: Vec<(Uuid, i64)> = sqlx::query_as(
                    "SELECT event_id, global_position FROM events WHERE event_id = ANY ($1)",
                )
                .bind(ids)
                .fetch_all(pool)
                .await?;
                Ok(rows.into_iter().collect())
            }
            Backend::Sqlite(pool) => {
                let json =
                    serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT event_id, global_position FROM events WHERE event_id IN (SELECT value FROM json_each(?1))",
                )
                .bind(json)
                .fetch_all(pool)
                .await?;
                rows.into_iter()
                    .map(|(id, p)| {
                        Uuid::parse_str(&id)
                            .map(|id| (id, p))
                            .map_err(|e| StoreError::Corrupt(format!("event_id {id:?}: {e}")))
                    })
                    .collect()
            }
        }
    }

    /// How many of `ids` are here.
    pub async fn count_present(&self, ids: &[Uuid]) -> Result<i64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        match &self.backend {
            Backend::Postgres(pool) => Ok(sqlx::query_scalar(
                "SELECT count(*) FROM events WHERE event_id = ANY ($1)",
            )
            .bind(ids)
            .fetch_one(pool)
            .await?),
            Backend::Sqlite(pool) => {
                let json =
                    serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id IN (SELECT value FROM json_each(?1))")
                    .bind(json)
                    .fetch_one(pool)
                    .await?)
            }
        }
    }

    /// How many events the tenant has here.
    pub async fn count_tenant(&self, tenant: Uuid) -> Result<i64, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => Ok(sqlx::query_scalar(
                "SELECT count(*) FROM events WHERE tenant_id = $1",
            )
            .bind(tenant)
            .fetch_one(pool)
            .await?),
            Backend::Sqlite(pool) => Ok(sqlx::query_scalar(
                "SELECT count(*) FROM events WHERE tenant_id = ?1",
            )
            .bind(tenant.to_string())
            .fetch_one(pool)
            .await?),
        }
    }

    /// Deletes the tenant's events here (a migration target being reset). Returns the count.
    pub async fn delete_tenant(&self, tenant: Uuid) -> Result<u64, StoreError> {
        Ok(match &self.backend {
            Backend::Postgres(pool) => sqlx::query("DELETE FROM events WHERE tenant_id = $1")
                .bind(tenant)
                .execute(pool)
                .await?
                .rows_affected(),
            Backend::Sqlite(pool) => sqlx::query("DELETE FROM events WHERE tenant_id = ?1")
                .bind(tenant.to_string())
                .execute(pool)
                .await?
                .rows_affected(),
        })
    }

    /// Copies `events` (from another store) in, under the target-order rule, keeping ids,
    /// streams, versions, types, payloads, actors and timestamps. Idempotent by `event_id`.
    /// Answers each input's position here, or `None` where it cannot land yet.
    pub async fn insert_copied(
        &self,
        events: &[StoredEvent],
    ) -> Result<Vec<Option<i64>>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Every copier inserts in source position order: the tail, the final delta and the
        // mirrors of several proxies may insert the same events at once, and inserting them
        // in different orders made PostgreSQL deadlock (each waiting on a row the other had
        // inserted) until `deadlock_timeout` (1 s) ended it. One order for everyone has no
        // cycle. The mirror batches in arrival order, which is not position order.
        if events.is_sorted_by_key(|e| e.global_position) {
            return self.insert_copied_in_order(events).await;
        }
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by_key(|&i| events[i].global_position);
        let sorted: Vec<StoredEvent> = order.iter().map(|&i| events[i].clone()).collect();
        let landed = self.insert_copied_in_order(&sorted).await?;
        let mut answers = vec![None; events.len()];
        for (&i, position) in order.iter().zip(landed) {
            answers[i] = position;
        }
        Ok(answers)
    }

    async fn insert_copied_in_order(
        &self,
        events: &[StoredEvent],
    ) -> Result<Vec<Option<i64>>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => insert_copied_pg(pool, events).await,
            Backend::Sqlite(pool) => insert_copied_sqlite(pool, events).await,
        }
    }

    /// Makes sure the tenant's fence here exists and is open (a store the tenant once left
    /// still carries a moved fence). `epoch` records which migration opened it.
    pub async fn open_fence(&self, tenant: Uuid, epoch: i64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO switchyard_fences (tenant_id, state, epoch, moved_to, updated_at)
                     VALUES ($1, 'open', $2, NULL, now())
                     ON CONFLICT (tenant_id) DO UPDATE
                        SET state = 'open', epoch = EXCLUDED.epoch, moved_to = NULL, updated_at = now()
                      WHERE switchyard_fences.state <> 'open'",
                )
                .bind(tenant)
                .bind(epoch)
                .execute(pool)
                .await?;
            }
            Backend::Sqlite(pool) => {
                sqlx::query(
                    "INSERT INTO switchyard_fences (tenant_id, state, epoch, moved_to, updated_at)
                     VALUES (?1, 'open', ?2, NULL, ?3)
                     ON CONFLICT (tenant_id) DO UPDATE
                        SET state = 'open', epoch = excluded.epoch, moved_to = NULL, updated_at = excluded.updated_at
                      WHERE switchyard_fences.state <> 'open'",
                )
                .bind(tenant.to_string())
                .bind(epoch)
                .bind(format_timestamp(&Utc::now()))
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// The tenant's fence here: `(state, moved_to)`, or `None` when it has none.
    pub async fn fence(
        &self,
        tenant: Uuid,
    ) -> Result<Option<(String, Option<String>)>, StoreError> {
        Ok(match &self.backend {
            Backend::Postgres(pool) => {
                sqlx::query_as("SELECT state, moved_to FROM switchyard_fences WHERE tenant_id = $1")
                    .bind(tenant)
                    .fetch_optional(pool)
                    .await?
            }
            Backend::Sqlite(pool) => {
                sqlx::query_as("SELECT state, moved_to FROM switchyard_fences WHERE tenant_id = ?1")
                    .bind(tenant.to_string())
                    .fetch_optional(pool)
                    .await?
            }
        })
    }
}

async fn insert_copied_pg(
    pool: &PgPool,
    events: &[StoredEvent],
) -> Result<Vec<Option<i64>>, StoreError> {
    let n = events.len();
    let mut ids = Vec::with_capacity(n);
    let mut aggregate_ids = Vec::with_capacity(n);
    let mut aggregate_types = Vec::with_capacity(n);
    let mut event_types = Vec::with_capacity(n);
    let mut tenants = Vec::with_capacity(n);
    let mut actors = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut timestamps = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    for e in events {
        ids.push(e.event_id);
        aggregate_ids.push(e.aggregate_id);
        aggregate_types.push(e.aggregate_type.as_str());
        event_types.push(e.event_type.as_str());
        tenants.push(e.tenant_id);
        actors.push(e.actor_id.as_deref());
        versions.push(e.version);
        timestamps.push(e.timestamp);
        payloads.push(e.payload.get());
        created.push(e.created_at);
    }
    let inserted: Vec<(Uuid, i64)> = sqlx::query_as(PG_INSERT_COPIED)
        .bind(&ids)
        .bind(&aggregate_ids)
        .bind(&aggregate_types)
        .bind(&event_types)
        .bind(&tenants)
        .bind(&actors)
        .bind(&versions)
        .bind(&timestamps)
        .bind(&payloads)
        .bind(&created)
        .fetch_all(pool)
        .await?;
    let complete = inserted.len() == n;
    let mut by_id: HashMap<Uuid, i64> = inserted.into_iter().collect();
    if !complete {
        // Already there (a retry, the mirror) or not landed (its predecessor is missing).
        let missing: Vec<Uuid> = ids
            .iter()
            .filter(|id| !by_id.contains_key(*id))
            .copied()
            .collect();
        let present: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT event_id, global_position FROM events WHERE event_id = ANY($1)")
                .bind(&missing)
                .fetch_all(pool)
                .await?;
        by_id.extend(present);
    }
    Ok(ids.iter().map(|id| by_id.get(id).copied()).collect())
}

async fn insert_copied_sqlite(
    pool: &SqlitePool,
    events: &[StoredEvent],
) -> Result<Vec<Option<i64>>, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut heads: HashMap<(Uuid, &str), i32> = HashMap::new();
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let existing: Option<i64> =
            sqlx::query_scalar("SELECT global_position FROM events WHERE event_id = ?1")
                .bind(e.event_id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        if existing.is_some() {
            out.push(existing);
            continue;
        }
        let key = (e.aggregate_id, e.aggregate_type.as_str());
        let head = match heads.get(&key) {
            Some(head) => *head,
            None => {
                let head: i32 = sqlx::query_scalar(
                    "SELECT coalesce(max(version), 0) FROM events WHERE aggregate_id = ?1 AND aggregate_type = ?2",
                )
                .bind(e.aggregate_id.to_string())
                .bind(&e.aggregate_type)
                .fetch_one(&mut *tx)
                .await?;
                heads.insert(key, head);
                head
            }
        };
        if e.version != head + 1 {
            out.push(None);
            continue;
        }
        let position: Option<i64> = sqlx::query_scalar(
            "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id,
                                 actor_id, version, timestamp, payload, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT DO NOTHING RETURNING global_position",
        )
        .bind(e.event_id.to_string())
        .bind(e.aggregate_id.to_string())
        .bind(&e.aggregate_type)
        .bind(&e.event_type)
        .bind(e.tenant_id.map(|t| t.to_string()))
        .bind(e.actor_id.as_deref())
        .bind(e.version)
        .bind(format_timestamp(&e.timestamp))
        .bind(e.payload.get())
        .bind(format_timestamp(&e.created_at))
        .fetch_optional(&mut *tx)
        .await?;
        if position.is_some() {
            heads.insert(key, e.version);
        }
        out.push(position);
    }
    tx.commit().await?;
    Ok(out)
}
