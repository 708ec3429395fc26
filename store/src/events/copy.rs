//! What the migration engine asks of stores: stable horizons, a tenant's events in a pass
//! window, the target-order insert, counts, and the tenant's fence.
//!
//! **Stable horizon.** On PostgreSQL a pass copies the rows whose inserting transaction is
//! below the oldest transaction of this database still running at the pass start
//! ([`PG_HORIZON`]): every such transaction has finished, so those rows are final, whatever
//! their positions. The next pass
//! starts where this one ended. Rows with a NULL `txid` predate the column and belong to the
//! first pass; every row inserted since carries its own transaction's id whatever the writer
//! set (the `switchyard_txid` trigger), so a restore or an `INSERT … SELECT` of every column
//! still lands in a later window. On SQLite writers are serialised, so positions commit in
//! order and the horizon is simply the highest position.
//!
//! **Target order.** [`EventStore::copy_in`] lands a stream's version `v` only when `v = 1` or
//! `v - 1` is already in the target (or lands just before it in the same call), so the target
//! never has a gap; rows that cannot land yet are reported and retried later.
//!
//! **Identity.** An event has landed only where the same tenant, stream, version, event id and
//! content are (DESIGN.md invariant 7). A row the target holds under the same event id with
//! anything else, another event at the same stream version, or a stream that holds another
//! tenant's events is a [`Divergence`]: it can never land, and is reported as such rather than
//! as copied or as waiting.

use std::collections::HashMap;

use chrono::{SubsecRound, Utc};
use sqlx::{PgPool, SqlitePool};
use uuid::Uuid;

use super::verify::{Digesting, StreamDigest, StreamKey};
use super::{Backend, EventStore, FenceState};
use crate::dialect::{on_backend, Lite, Pg};
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
/// The first position of a pass window with a lower bound (`$2`, `$3` its txid bounds): by the
/// tenant's txid index, whatever the positions of the rows before it.
const PG_WINDOW_START: &str = "SELECT min(global_position) FROM events
    WHERE tenant_id = $1 AND txid >= $2::text::xid8 AND txid < $3::text::xid8";
pub(super) const SQLITE_WINDOW: &str = "tenant_id = ?1 AND global_position > ?2
    AND global_position > coalesce(?3, 0) AND global_position <= ?4";

const PG_COLUMNS: &str = "global_position, event_id, aggregate_type, aggregate_id, tenant_id, \
     event_type, version, actor_id, timestamp, payload::text AS payload, created_at";
const SQLITE_COLUMNS: &str = "global_position, event_id, aggregate_type, aggregate_id, tenant_id, \
     event_type, version, actor_id, timestamp, payload, created_at";

impl Pg {
    /// The event store's pass-window condition on `tenant_id = $1`, `global_position > $2` and
    /// the bounds `$3`, `$4` ([`Pg::window_bounds`]).
    pub(super) fn window(self) -> &'static str {
        PG_WINDOW
    }

    /// The `events` columns [`Pg::decode_event`] reads.
    pub(super) fn event_columns(self) -> &'static str {
        PG_COLUMNS
    }

    pub(super) fn decode_event(
        self,
        row: &sqlx::postgres::PgRow,
    ) -> Result<StoredEvent, StoreError> {
        super::postgres::decode(row)
    }

    /// A `created_at` bound `millis` before the store's clock, with what `param` binds.
    pub(super) fn settled_before(self, param: &str, millis: i64) -> (String, i64) {
        (
            format!("clock_timestamp() - make_interval(secs => {param}::float8 / 1000)"),
            millis,
        )
    }
}

impl Lite {
    /// [`Pg::window`] over global positions.
    pub(super) fn window(self) -> &'static str {
        SQLITE_WINDOW
    }

    pub(super) fn event_columns(self) -> &'static str {
        SQLITE_COLUMNS
    }

    pub(super) fn decode_event(
        self,
        row: &sqlx::sqlite::SqliteRow,
    ) -> Result<StoredEvent, StoreError> {
        super::sqlite::decode(row)
    }

    /// [`Pg::settled_before`] by this process's clock: the cutoff is bound as a timestamp.
    pub(super) fn settled_before(self, param: &str, millis: i64) -> (String, String) {
        let cutoff = Utc::now() - chrono::Duration::milliseconds(millis);
        (param.to_owned(), format_timestamp(&cutoff))
    }
}

/// The `batch` CTE over the ten bound column arrays, in batch order (`ord`).
macro_rules! pg_batch_cte {
    () => {
        "
WITH batch AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::uuid[], $6::text[],
                         $7::int4[], $8::timestamptz[], $9::text[], $10::timestamptz[])
           WITH ORDINALITY AS b(event_id, aggregate_id, aggregate_type, event_type, tenant_id,
                                actor_id, version, ts, payload, created_at, ord)
), "
    };
}

/// What the target holds for batch row `b` with `e` its row under the same event id (left
/// joined) and `s` its stream's row of a per-stream CTE with `foreign_stream` ([`pg_streams_join`]):
/// whether it is the same event, whether the stream holds another tenant's events, whether the
/// version holds another event ([`seen_landing`]'s arguments after the position).
macro_rules! pg_seen_columns {
    () => {
        "       coalesce(e.tenant_id IS NOT DISTINCT FROM b.tenant_id
                AND e.aggregate_id = b.aggregate_id AND e.aggregate_type = b.aggregate_type
                AND e.version = b.version AND e.event_type = b.event_type
                AND e.actor_id IS NOT DISTINCT FROM b.actor_id AND e.timestamp = b.ts
                AND e.payload = b.payload::jsonb, false) AS same,
       s.foreign_stream,
       EXISTS (SELECT 1 FROM events v
                WHERE v.aggregate_id = b.aggregate_id AND v.aggregate_type = b.aggregate_type
                  AND v.version = b.version AND v.event_id <> b.event_id) AS version_taken"
    };
}

/// Joins batch row `b` to its stream's row `s` of a per-stream CTE (`heads`, or `streams` in
/// [`PG_CLASSIFY`]). Whether a stream holds another tenant's events is a walk over all its
/// versions, so it is asked once per stream of the batch, not once per row: a batch of a few
/// thousand events of a few long streams (a busy account) made that thousands of walks of
/// thousands of versions each, seconds per batch, and a copier that fell behind never caught up.
macro_rules! pg_streams_join {
    ($cte:literal) => {
        concat!(
            "  JOIN ",
            $cte,
            " s ON s.aggregate_id = b.aggregate_id AND s.aggregate_type = b.aggregate_type
              AND s.tenant_id IS NOT DISTINCT FROM b.tenant_id"
        )
    };
}

/// [`PG_INSERT_COPIED`] after its `batch` CTE: the heads, the landing rule, the insert. A macro
/// so the statement stays one `&'static str` and [`pg_insert_copied_from`] can reuse it.
macro_rules! pg_land_batch {
    () => {
        concat!(pg_land_ctes!(), "\n", pg_land_insert!())
    };
}

/// [`pg_land_batch`]'s `copier`, `heads` and `landing` CTEs (after `batch`). Without
/// arguments each stream's foreign check walks all its versions; with `owned` (a join giving
/// `k.owned`, the version through which the stream is known to hold only the tenant's rows,
/// [`EventStore::owned_heads`]) it walks only the versions past that.
macro_rules! pg_land_ctes {
    () => {
        pg_land_ctes!(floor = "0", join = "")
    };
    (owned) => {
        pg_land_ctes!(
            floor = "coalesce(k.owned, 0)",
            join = "
      LEFT JOIN unnest($16::text[], $17::uuid[], $18::int4[]) AS k(aggregate_type, aggregate_id, owned)
             ON k.aggregate_type = s.aggregate_type AND k.aggregate_id = s.aggregate_id"
        )
    };
    (floor = $floor:literal, join = $join:literal) => {
        concat!("copier AS MATERIALIZED (
    -- This statement is a copier: a fence that admits copiers only lets its rows in if it is
    -- still the row version this statement's snapshot saw (the heads below come from that
    -- snapshot). The fence trigger reads the setting, 'tenant@xmin,' per fence row;
    -- transaction-local, so it ends with the transaction.
    SELECT set_config('switchyard.copier',
                      coalesce((SELECT string_agg(f.tenant_id::text || '@' || f.xmin::text || ',', '')
                                  FROM switchyard_fences f
                                 WHERE f.tenant_id IN (SELECT tenant_id FROM batch)), ''),
                      true) AS copier
), heads AS MATERIALIZED (
    SELECT s.aggregate_id, s.aggregate_type, s.tenant_id,
           coalesce((SELECT max(e.version) FROM events e
                      WHERE e.aggregate_id = s.aggregate_id
                        AND e.aggregate_type = s.aggregate_type), 0) AS head,
           EXISTS (SELECT 1 FROM events e
                    WHERE e.aggregate_id = s.aggregate_id
                      AND e.aggregate_type = s.aggregate_type
                      AND e.version > ", $floor, "
                      AND e.tenant_id IS DISTINCT FROM s.tenant_id) AS foreign_stream
      FROM (SELECT DISTINCT aggregate_id, aggregate_type, tenant_id FROM batch) s", $join, "
), landing AS (
    -- A row whose event id the target already uses never lands (present or diverged), and
    -- a stream holding another tenant's events takes none of ours.
    SELECT b.*, h.head,
           row_number() OVER (PARTITION BY b.aggregate_id, b.aggregate_type ORDER BY b.version) AS rn
      FROM batch b JOIN heads h USING (aggregate_id, aggregate_type, tenant_id)
           CROSS JOIN copier c
     WHERE b.version > h.head AND c.copier IS NOT NULL AND NOT h.foreign_stream
       AND NOT EXISTS (SELECT 1 FROM events x WHERE x.event_id = b.event_id)
)")
    };
}

/// [`pg_land_batch`]'s insert, from `landing`.
macro_rules! pg_land_insert {
    () => {
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, actor_id,
                    version, timestamp, payload, created_at)
SELECT event_id, aggregate_id, aggregate_type, event_type, tenant_id, actor_id,
       version, ts, payload::jsonb, created_at
  FROM landing WHERE version = head + rn
 ORDER BY ord
ON CONFLICT DO NOTHING
RETURNING event_id, global_position"
    };
}

/// Inserts a batch under the target-order rule and answers `(event_id, global_position)` of
/// the rows it inserted; rows already there, diverged or waiting for their predecessor are
/// classified after ([`PG_CLASSIFY`]). `heads` is materialised so each stream's head is looked
/// up once. Returning only the inserted rows (rather than joining every batch row back to
/// the insert and to `events`) matters: with a generic plan PostgreSQL estimates `unnest` of
/// a parameter at 10 rows and such a join turned into a batch² nested loop (measured: 3.4 s
/// against 0.46 s per 5,000-event batch; BENCHMARKS.md).
const PG_INSERT_COPIED: &str = concat!(pg_batch_cte!(), pg_land_batch!());

/// [`PG_INSERT_COPIED`] reading its batch from `batch_query` instead of bound arrays: a query
/// giving the columns `event_id, aggregate_id, aggregate_type, event_type, tenant_id, actor_id,
/// version, ts, payload, created_at, ord` (`payload` as text, `ord` the batch order). For the
/// copy benchmark's prototypes of other ways to ship a batch (`benches/src/bin/copy.rs`
/// `staged`), so they measure the store's insert rather than a copy of it.
pub fn pg_insert_copied_from(batch_query: &str) -> String {
    format!("WITH batch AS ({batch_query}), {}", pg_land_batch!())
}

/// [`PG_INSERT_COPIED`] that also classifies every batch row and counts the listed version
/// ranges, in one round trip (the cutover's final delta: issue 17). Rows of three kinds:
/// `0` a row inserted now (`event_id`, position); `1` every batch row as the statement's
/// snapshot saw it, before the insert ([`PG_CLASSIFY`]'s columns); `2` per listed range
/// (`$11` types, `$12` ids, `$13` lows, `$14` highs) of tenant `$15`, its count and last
/// version in that snapshot (the caller adds the rows inserted now). Nothing joins the batch
/// back to the insert: the three parts are independent scans, so no plan is batch². Each
/// stream's foreign check walks only its versions past the one it is known to hold only the
/// tenant's rows through (`$16` types, `$17` ids, `$18` versions: [`EventStore::owned_heads`],
/// asked before the pause), so the pause does not grow with the streams' length.
const PG_LAND_AND_COUNT: &str = concat!(
    pg_batch_cte!(),
    pg_land_ctes!(owned),
    ", ins AS (",
    pg_land_insert!(),
    ")
SELECT 0 AS kind, event_id, global_position, true AS same, false AS foreign_stream,
       false AS version_taken, NULL::text AS aggregate_type, NULL::uuid AS aggregate_id,
       0::int8 AS count, 0::int4 AS last_version
  FROM ins
UNION ALL
SELECT 1, b.event_id, e.global_position,
",
    pg_seen_columns!(),
    ",
       NULL, NULL, 0, 0
  FROM batch b
  LEFT JOIN events e ON e.event_id = b.event_id
",
    pg_streams_join!("heads"),
    "
UNION ALL
SELECT 2, NULL, NULL, false, false, false, r.aggregate_type, r.aggregate_id,
       count(e.event_id), coalesce(max(e.version), 0)
  FROM unnest($11::text[], $12::uuid[], $13::int4[], $14::int4[])
       AS r(aggregate_type, aggregate_id, lo, hi)
  LEFT JOIN events e ON e.aggregate_id = r.aggregate_id AND e.aggregate_type = r.aggregate_type
                    AND e.version BETWEEN r.lo AND r.hi AND e.tenant_id = $15
 GROUP BY r.aggregate_type, r.aggregate_id"
);

/// [`EventStore::owned_heads`]: per listed stream (`$1` types, `$2` ids), its last version
/// when every version up to it is here and the tenant's (`$3`), in one snapshot.
const PG_OWNED_HEADS: &str = "
SELECT k.aggregate_type, k.aggregate_id, w.head
  FROM unnest($1::text[], $2::uuid[]) AS k(aggregate_type, aggregate_id)
  CROSS JOIN LATERAL (
       SELECT max(e.version) AS head, count(*) AS n,
              bool_or(e.tenant_id IS DISTINCT FROM $3) AS foreign_row
         FROM events e
        WHERE e.aggregate_id = k.aggregate_id AND e.aggregate_type = k.aggregate_type) w
 WHERE w.head IS NOT NULL AND w.n = w.head AND NOT w.foreign_row";

/// For each given event, what the target holds for it: the row with its event id (position,
/// and whether tenant, stream, version and content are the same), whether its stream version
/// holds another event, and whether its stream holds another tenant's events.
const PG_CLASSIFY: &str = concat!(
    "
WITH b AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::uuid[], $6::text[],
                         $7::int4[], $8::timestamptz[], $9::text[])
           AS b(event_id, aggregate_id, aggregate_type, event_type, tenant_id, actor_id, version,
                ts, payload)
), streams AS MATERIALIZED (
    SELECT s.aggregate_id, s.aggregate_type, s.tenant_id,
           EXISTS (SELECT 1 FROM events f
                    WHERE f.aggregate_id = s.aggregate_id AND f.aggregate_type = s.aggregate_type
                      AND f.tenant_id IS DISTINCT FROM s.tenant_id) AS foreign_stream
      FROM (SELECT DISTINCT aggregate_id, aggregate_type, tenant_id FROM b) s
)
SELECT b.event_id, e.global_position,
",
    pg_seen_columns!(),
    "
  FROM b
  LEFT JOIN events e ON e.event_id = b.event_id
",
    pg_streams_join!("streams"),
);

/// The fence token of migration `id`: what its start records as the epoch of its target's
/// `copiers` fence, and what its cutover (or the recoverer finishing it) must still find there to
/// open that fence ([`EventStore::open_target_fence`]). The low 63 bits of the id (random in a
/// UUIDv7), so no other migration's token, nor a routing epoch, plausibly equals it.
pub fn fence_token(id: Uuid) -> i64 {
    let low = u64::try_from(id.as_u128() & u128::from(u64::MAX)).unwrap_or_default();
    i64::try_from(low & (i64::MAX as u64)).unwrap_or_default()
}

/// What copying one event into a target came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// Inserted now, at this position.
    Inserted(i64),
    /// Already there, identical (same tenant, stream, version, id and content), at this
    /// position: a retry, the mirror, or another copier put it there.
    Present(i64),
    /// Its predecessor is not in the target yet: a later pass lands it.
    Waiting,
    /// The target contradicts it: it can never land.
    Diverged(Divergence),
}

impl Landing {
    /// Where the event is in the target, if it is there (inserted now or before).
    pub fn position(self) -> Option<i64> {
        match self {
            Self::Inserted(p) | Self::Present(p) => Some(p),
            Self::Waiting | Self::Diverged(_) => None,
        }
    }
}

/// Why an event can never land in a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// The target holds another event (other tenant, stream, version or content) under its id.
    EventIdTaken,
    /// The target holds another event at its stream and version.
    VersionTaken,
    /// The target's stream of that id holds another tenant's events.
    ForeignStream,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::EventIdTaken => "the target holds a different event with its event id",
            Self::VersionTaken => "the target holds a different event at its stream version",
            Self::ForeignStream => "the target's stream of that id belongs to another tenant",
        })
    }
}

/// PostgreSQL's stable horizon: the oldest transaction id the snapshot sees running, leaving
/// out those known to belong elsewhere — other databases' sessions and prepared transactions
/// (they never write this database's `events`) and autovacuum workers (an ANALYZE holds an id
/// but never writes events) — else the snapshot's xmax. An id whose owner this session cannot
/// see (`pg_stat_activity` hides other roles' `backend_xid` from a role without
/// `pg_read_all_stats`) counts as running here: the horizon may be older than needed, never
/// newer. Without the exclusions (`pg_snapshot_xmin`) one open transaction anywhere on the
/// server held every copy pass and feed page of every database back.
pub(super) const PG_HORIZON: &str = "
SELECT coalesce(
    (SELECT min(x) FROM pg_snapshot_xip(pg_current_snapshot()) AS x
      WHERE xid(x) NOT IN (SELECT a.backend_xid FROM pg_stat_activity a
                            WHERE a.backend_xid IS NOT NULL
                              AND (a.datname IS DISTINCT FROM current_database()
                                   OR a.backend_type = 'autovacuum worker')
                           UNION ALL
                           SELECT p.transaction FROM pg_prepared_xacts p
                            WHERE p.database <> current_database())),
    pg_snapshot_xmax(pg_current_snapshot()))::text";

impl EventStore {
    /// The current stable horizon (see the module docs).
    pub async fn horizon(&self) -> Result<i64, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let text: String = sqlx::query_scalar(PG_HORIZON).fetch_one(pool).await?;
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
        self.events_in_window(tenant, window, None, after_position, limit)
            .await
    }

    /// How many of the tenant's events `window` holds.
    pub async fn count_window(&self, tenant: Uuid, window: PassWindow) -> Result<i64, StoreError> {
        on_backend!(self, |pool, d| {
            let sql = format!("SELECT count(*) FROM events WHERE {}", d.window());
            let (from, to) = d.window_bounds(window);
            Ok(sqlx::query_scalar(&sql)
                .bind(d.id(tenant))
                .bind(0i64)
                .bind(from)
                .bind(to)
                .fetch_one(pool)
                .await?)
        })
    }

    /// The tenant's events in `window` after `after_position` that were written at least
    /// `settled` ago (by the store's clock), at most `limit`, in position order: what a lag
    /// measurement checks against the target (by identity, [`Self::landing_status`]).
    pub async fn settled_events(
        &self,
        tenant: Uuid,
        window: PassWindow,
        settled: std::time::Duration,
        after_position: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.events_in_window(tenant, window, Some(settled), after_position, limit)
            .await
    }

    /// [`Self::read_window`], or with `settled` [`Self::settled_events`].
    async fn events_in_window(
        &self,
        tenant: Uuid,
        window: PassWindow,
        settled: Option<std::time::Duration>,
        after_position: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let millis = settled.map(|s| i64::try_from(s.as_millis()).unwrap_or(i64::MAX));
        // The window's rows are read in position order, by the tenant's position index, from
        // `after_position`. From 0 that walked every row of the tenant before the window (the
        // positions of a tail window or the final delta are the newest): an empty delta of a
        // 240,000-event tenant took 131 ms, inside the cutover's pause, and every tail pass as
        // long. A window with a lower bound starts at its first row instead, found by the
        // tenant's txid index; an empty window is not read at all.
        let mut after_position = after_position;
        if let (Backend::Postgres(pool), true, Some(_)) =
            (&self.backend, after_position == 0, window.from)
        {
            let (from, to) = Pg.window_bounds(window);
            let first: Option<i64> = sqlx::query_scalar(PG_WINDOW_START)
                .bind(tenant)
                .bind(from)
                .bind(to)
                .fetch_one(pool)
                .await?;
            match first {
                Some(first) => after_position = first - 1,
                None => return Ok(Vec::new()),
            }
        }
        on_backend!(self, |pool, d| {
            let settled = millis.map(|millis| d.settled_before("$5", millis));
            let (condition, limit_param) = match &settled {
                Some((before, _)) => (format!(" AND created_at < {before}"), "$6"),
                None => (String::new(), "$5"),
            };
            let sql = format!(
                "SELECT {} FROM events WHERE {}{condition} ORDER BY global_position LIMIT {limit_param}",
                d.event_columns(),
                d.window()
            );
            let (from, to) = d.window_bounds(window);
            let mut query = sqlx::query(&sql)
                .bind(d.id(tenant))
                .bind(after_position)
                .bind(from)
                .bind(to);
            if let Some((_, cutoff)) = settled {
                query = query.bind(cutoff);
            }
            let rows = query.bind(i64::from(limit)).fetch_all(pool).await?;
            rows.iter().map(|row| d.decode_event(row)).collect()
        })
    }

    /// Rows here that belong to another tenant than `tenant` and collide with `events` (of
    /// `tenant`, from another store): the same event id, or the same stream. Described as
    /// `event <id>` or `stream <type>/<id>`, at most `limit`, for a migration's preflight.
    pub async fn foreign_collisions(
        &self,
        tenant: Uuid,
        events: &[StoredEvent],
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let mut streams: Vec<(Uuid, &str)> = events
            .iter()
            .map(|e| (e.aggregate_id, e.aggregate_type.as_str()))
            .collect();
        streams.sort_unstable();
        streams.dedup();
        match &self.backend {
            Backend::Postgres(pool) => {
                let (aggregate_ids, aggregate_types): (Vec<Uuid>, Vec<&str>) =
                    streams.into_iter().unzip();
                Ok(sqlx::query_scalar(
                    "(SELECT 'event ' || e.event_id::text FROM events e
                       WHERE e.event_id = ANY ($1) AND e.tenant_id IS DISTINCT FROM $4 LIMIT $5)
                     UNION ALL
                     (SELECT DISTINCT 'stream ' || e.aggregate_type || '/' || e.aggregate_id::text
                        FROM unnest($2::uuid[], $3::text[]) AS s(aggregate_id, aggregate_type)
                        JOIN events e USING (aggregate_id, aggregate_type)
                       WHERE e.tenant_id IS DISTINCT FROM $4 LIMIT $5)",
                )
                .bind(&ids)
                .bind(&aggregate_ids)
                .bind(&aggregate_types)
                .bind(tenant)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?)
            }
            Backend::Sqlite(pool) => {
                let ids =
                    serde_json::to_string(&ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let streams = serde_json::to_string(&streams)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(sqlx::query_scalar(
                    "SELECT * FROM (SELECT 'event ' || e.event_id FROM events e
                       WHERE e.event_id IN (SELECT value FROM json_each(?1))
                         AND e.tenant_id IS NOT ?3 LIMIT ?4)
                     UNION ALL
                     SELECT * FROM (SELECT DISTINCT 'stream ' || e.aggregate_type || '/' || e.aggregate_id
                        FROM json_each(?2) s
                        JOIN events e ON e.aggregate_id = json_extract(s.value, '$[0]')
                                     AND e.aggregate_type = json_extract(s.value, '$[1]')
                       WHERE e.tenant_id IS NOT ?3 LIMIT ?4)",
                )
                .bind(ids)
                .bind(streams)
                .bind(tenant.to_string())
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?)
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

    /// How many events the tenant has here.
    pub async fn count_tenant(&self, tenant: Uuid) -> Result<i64, StoreError> {
        on_backend!(self, |pool, d| {
            Ok(
                sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant_id = $1")
                    .bind(d.id(tenant))
                    .fetch_one(pool)
                    .await?,
            )
        })
    }

    /// Deletes the tenant's events here (a migration target being reset). Returns the count.
    pub async fn delete_tenant(&self, tenant: Uuid) -> Result<u64, StoreError> {
        on_backend!(self, |pool, d| {
            Ok(sqlx::query("DELETE FROM events WHERE tenant_id = $1")
                .bind(d.id(tenant))
                .execute(pool)
                .await?
                .rows_affected())
        })
    }

    /// Copies `events` (from another store) in, under the target-order rule, keeping ids,
    /// streams, versions, types, payloads, actors and timestamps. Idempotent by identity:
    /// answers, per input, whether it was inserted now, was already there (the same event),
    /// cannot land yet, or can never land (see the module docs).
    pub async fn copy_in(&self, events: &[StoredEvent]) -> Result<Vec<Landing>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Every copier inserts in source position order: the tail, the final delta and the
        // mirrors of several proxies may insert the same events at once, and inserting them
        // in different orders made PostgreSQL deadlock (each waiting on a row the other had
        // inserted) until `deadlock_timeout` (1 s) ended it. One order for everyone has no
        // cycle. The mirror batches in arrival order, which is not position order.
        if events.is_sorted_by_key(|e| e.global_position) {
            return self.copy_in_order(events).await;
        }
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by_key(|&i| events[i].global_position);
        let sorted: Vec<StoredEvent> = order.iter().map(|&i| events[i].clone()).collect();
        let landed = self.copy_in_order(&sorted).await?;
        let mut answers = vec![Landing::Waiting; events.len()];
        for (&i, landing) in order.iter().zip(landed) {
            answers[i] = landing;
        }
        Ok(answers)
    }

    /// [`Self::copy_in`] of `events` (read in source position order), answering also, per
    /// listed `(stream, lo, hi)`, the count and last version of the tenant's rows here in
    /// `lo..=hi` once they landed: the cutover's copy and check of its final delta in one
    /// round trip (PostgreSQL: one statement; SQLite: one transaction). Where the statement's
    /// snapshot cannot tell (a row neither inserted nor seen: another copier inserted it
    /// meanwhile, or it waits for its predecessor), those rows are classified again and the
    /// ranges counted again, as [`Self::copy_in`] and [`Self::range_digests`] would.
    ///
    /// `owned` is [`Self::owned_heads`] of (some of) the batch's streams, asked earlier: a
    /// stream's check for another tenant's rows looks only past its version there. Rows are
    /// never updated, and the tenant's rows in a migration's target are deleted only when no
    /// copier runs (`--reset-target` before the copy, a cleanup after the migration), so what
    /// held only the tenant's rows still does. SQLite's landing does not use it.
    pub async fn copy_in_counting(
        &self,
        tenant: Uuid,
        events: &[StoredEvent],
        ranges: &[(StreamKey, i32, i32)],
        owned: &HashMap<StreamKey, i32>,
    ) -> Result<(Vec<Landing>, HashMap<StreamKey, StreamDigest>), StoreError> {
        if events.is_empty() || !events.is_sorted_by_key(|e| e.global_position) {
            let landed = self.copy_in(events).await?;
            let counts = self.range_digests(tenant, ranges, Digesting::Count).await?;
            return Ok((landed, counts));
        }
        let (landed, mut counts) = match &self.backend {
            Backend::Postgres(pool) => {
                let Some(done) = land_and_count_pg(pool, tenant, events, ranges, owned).await?
                else {
                    let landed = self.copy_in(events).await?;
                    let counts = self.range_digests(tenant, ranges, Digesting::Count).await?;
                    return Ok((landed, counts));
                };
                done
            }
            Backend::Sqlite(pool) => {
                let mut tx = crate::dialect::begin_immediate(pool).await?;
                let landed = land_sqlite(&mut tx, events).await?;
                let rows: Vec<(String, String, i64, i32)> =
                    sqlx::query_as(super::verify::SQLITE_RANGE_COUNTS)
                        .bind(tenant.to_string())
                        .bind(super::verify::ranges_json(ranges)?)
                        .fetch_all(&mut *tx)
                        .await?;
                tx.commit().await?;
                let mut counts = HashMap::new();
                super::verify::collect_sqlite_counts(rows, &mut counts)?;
                (landed, counts)
            }
        };
        super::verify::report_empty(ranges.iter().map(|(k, _, _)| k), &mut counts);
        Ok((landed, counts))
    }

    /// For each of `streams` that holds only `tenant`'s rows here, versions 1 to its last
    /// without a gap, that last version (streams with another tenant's row or a gap are left
    /// out; so are streams not here). One walk of each stream, before the cutover's pause, so
    /// that the copy of the final delta ([`Self::copy_in_counting`]) need not walk them again
    /// inside it. Empty on SQLite, whose landing has no use for it.
    pub async fn owned_heads(
        &self,
        tenant: Uuid,
        streams: &[StreamKey],
    ) -> Result<HashMap<StreamKey, i32>, StoreError> {
        let Backend::Postgres(pool) = &self.backend else {
            return Ok(HashMap::new());
        };
        if streams.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(String, Uuid, i32)> = sqlx::query_as(PG_OWNED_HEADS)
            .bind(streams.iter().map(|k| k.0.as_str()).collect::<Vec<_>>())
            .bind(streams.iter().map(|k| k.1).collect::<Vec<_>>())
            .bind(tenant)
            .fetch_all(pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(t, id, head)| ((t, id), head))
            .collect())
    }

    /// [`Self::copy_in`], answering only where each input is here (inserted or present).
    pub async fn insert_copied(
        &self,
        events: &[StoredEvent],
    ) -> Result<Vec<Option<i64>>, StoreError> {
        Ok(self
            .copy_in(events)
            .await?
            .into_iter()
            .map(Landing::position)
            .collect())
    }

    /// What copying `events` here would come to, without writing: [`Landing::Present`] where
    /// the same event is here, [`Landing::Diverged`] where the target contradicts it,
    /// [`Landing::Waiting`] otherwise.
    pub async fn landing_status(&self, events: &[StoredEvent]) -> Result<Vec<Landing>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        match &self.backend {
            Backend::Postgres(pool) => classify_pg(pool, events).await,
            Backend::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let mut heads = HashMap::new();
                let mut out = Vec::with_capacity(events.len());
                for e in events {
                    out.push(classify_sqlite(&mut conn, &mut heads, e).await?.0);
                }
                Ok(out)
            }
        }
    }

    async fn copy_in_order(&self, events: &[StoredEvent]) -> Result<Vec<Landing>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => insert_copied_pg(pool, events).await,
            Backend::Sqlite(pool) => insert_copied_sqlite(pool, events).await,
        }
    }

    /// Makes sure the tenant's fence here exists and is open (a store the tenant once left
    /// still carries a moved fence). `epoch` records which migration opened it.
    pub async fn open_fence(&self, tenant: Uuid, epoch: i64) -> Result<(), StoreError> {
        self.set_fence(tenant, epoch, FenceState::Open, None).await
    }

    /// Prepares the tenant's fence here for a store that is not (or no longer) authoritative
    /// for it: only Switchyard's copiers may write the tenant here, and everyone else is
    /// refused as if moved, to `lives_in` (the store the tenant lives in). `epoch` records
    /// which migration set it.
    pub async fn admit_copiers_only(
        &self,
        tenant: Uuid,
        epoch: i64,
        lives_in: &str,
    ) -> Result<(), StoreError> {
        self.set_fence(tenant, epoch, FenceState::Copiers, Some(lives_in))
            .await
    }

    /// Opens the tenant's fence here to writers as the target of the migration whose fence
    /// token is `token` ([`fence_token`], which [`Self::admit_copiers_only`] recorded when that
    /// migration began), only while the fence still is that migration's `copiers` fence: a
    /// compare-and-set. A store a later migration moved the tenant out of again (a revert's move
    /// sets it `copiers` under its own epoch) is never reopened by a late driver or recoverer of
    /// the earlier one (DESIGN.md invariant 8; found by the model's `OPEN_TARGET_UNCONDITIONALLY`).
    /// `true`: open now, or already opened by that migration; `false`: left as it is.
    pub async fn open_target_fence(&self, tenant: Uuid, token: i64) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => Ok(sqlx::query_scalar(
                "WITH opened AS (
                     UPDATE switchyard_fences SET state = 'open', moved_to = NULL, updated_at = now()
                      WHERE tenant_id = $1 AND state = 'copiers' AND epoch = $2
                     RETURNING 1)
                 SELECT EXISTS (SELECT 1 FROM opened)
                     OR EXISTS (SELECT 1 FROM switchyard_fences
                                 WHERE tenant_id = $1 AND state = 'open' AND epoch = $2)",
            )
            .bind(tenant)
            .bind(token)
            .fetch_one(pool)
            .await?),
            Backend::Sqlite(pool) => {
                let mut tx = crate::dialect::begin_immediate(pool).await?;
                let id = tenant.to_string();
                sqlx::query(
                    "UPDATE switchyard_fences SET state = 'open', moved_to = NULL, updated_at = ?3
                      WHERE tenant_id = ?1 AND state = 'copiers' AND epoch = ?2",
                )
                .bind(&id)
                .bind(token)
                .bind(format_timestamp(&Utc::now()))
                .execute(&mut *tx)
                .await?;
                let open: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM switchyard_fences
                                     WHERE tenant_id = ?1 AND state = 'open' AND epoch = ?2)",
                )
                .bind(&id)
                .bind(token)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(open)
            }
        }
    }

    /// Whether the tenant's fence here is the `copiers` fence of the migration whose token is
    /// `token` ([`Self::open_target_fence`] would open it).
    pub async fn is_target_fence_of(&self, tenant: Uuid, token: i64) -> Result<bool, StoreError> {
        on_backend!(self, |pool, d| {
            Ok(sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM switchyard_fences
                                 WHERE tenant_id = $1 AND state = 'copiers' AND epoch = $2)",
            )
            .bind(d.id(tenant))
            .bind(token)
            .fetch_one(pool)
            .await?)
        })
    }

    /// Creates the tenant's fence here in `state`, or sets it so (the epoch and time only
    /// change when the state or `moved_to` does, or the epoch of a `copiers` fence: it is the
    /// token of the migration whose target it is, [`Self::open_target_fence`]).
    async fn set_fence(
        &self,
        tenant: Uuid,
        epoch: i64,
        state: FenceState,
        moved_to: Option<&str>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO switchyard_fences (tenant_id, state, epoch, moved_to, updated_at)
                     VALUES ($1, $3, $2, $4, now())
                     ON CONFLICT (tenant_id) DO UPDATE
                        SET state = EXCLUDED.state, epoch = EXCLUDED.epoch,
                            moved_to = EXCLUDED.moved_to, updated_at = now()
                      WHERE switchyard_fences.state <> EXCLUDED.state
                         OR switchyard_fences.moved_to IS DISTINCT FROM EXCLUDED.moved_to
                         OR (EXCLUDED.state = 'copiers' AND switchyard_fences.epoch <> EXCLUDED.epoch)",
                )
                .bind(tenant)
                .bind(epoch)
                .bind(state.as_str())
                .bind(moved_to)
                .execute(pool)
                .await?;
            }
            Backend::Sqlite(pool) => {
                sqlx::query(
                    "INSERT INTO switchyard_fences (tenant_id, state, epoch, moved_to, updated_at)
                     VALUES (?1, ?4, ?2, ?5, ?3)
                     ON CONFLICT (tenant_id) DO UPDATE
                        SET state = excluded.state, epoch = excluded.epoch,
                            moved_to = excluded.moved_to, updated_at = excluded.updated_at
                      WHERE switchyard_fences.state <> excluded.state
                         OR switchyard_fences.moved_to IS NOT excluded.moved_to
                         OR (excluded.state = 'copiers' AND switchyard_fences.epoch <> excluded.epoch)",
                )
                .bind(tenant.to_string())
                .bind(epoch)
                .bind(format_timestamp(&Utc::now()))
                .bind(state.as_str())
                .bind(moved_to)
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
        on_backend!(self, |pool, d| {
            Ok(
                sqlx::query_as(
                    "SELECT state, moved_to FROM switchyard_fences WHERE tenant_id = $1",
                )
                .bind(d.id(tenant))
                .fetch_optional(pool)
                .await?,
            )
        })
    }
}

/// The columns of `events` as the arrays [`PG_INSERT_COPIED`] and [`PG_CLASSIFY`] bind.
struct PgBatch<'a> {
    ids: Vec<Uuid>,
    aggregate_ids: Vec<Uuid>,
    aggregate_types: Vec<&'a str>,
    event_types: Vec<&'a str>,
    tenants: Vec<Option<Uuid>>,
    actors: Vec<Option<&'a str>>,
    versions: Vec<i32>,
    timestamps: Vec<chrono::DateTime<Utc>>,
    payloads: Vec<&'a str>,
    created: Vec<chrono::DateTime<Utc>>,
}

impl<'a> PgBatch<'a> {
    /// Binds the ten columns as `$1`–`$10` ([`PG_INSERT_COPIED`]'s order).
    fn bind_all<'q, O>(
        &'q self,
        q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        q.bind(&self.ids)
            .bind(&self.aggregate_ids)
            .bind(&self.aggregate_types)
            .bind(&self.event_types)
            .bind(&self.tenants)
            .bind(&self.actors)
            .bind(&self.versions)
            .bind(&self.timestamps)
            .bind(&self.payloads)
            .bind(&self.created)
    }

    fn of(events: &'a [StoredEvent]) -> Self {
        Self {
            ids: events.iter().map(|e| e.event_id).collect(),
            aggregate_ids: events.iter().map(|e| e.aggregate_id).collect(),
            aggregate_types: events.iter().map(|e| e.aggregate_type.as_str()).collect(),
            event_types: events.iter().map(|e| e.event_type.as_str()).collect(),
            tenants: events.iter().map(|e| e.tenant_id).collect(),
            actors: events.iter().map(|e| e.actor_id.as_deref()).collect(),
            versions: events.iter().map(|e| e.version).collect(),
            timestamps: events.iter().map(|e| e.timestamp).collect(),
            payloads: events.iter().map(|e| e.payload.get()).collect(),
            created: events.iter().map(|e| e.created_at).collect(),
        }
    }
}

async fn insert_copied_pg(
    pool: &PgPool,
    events: &[StoredEvent],
) -> Result<Vec<Landing>, StoreError> {
    let b = PgBatch::of(events);
    let inserted: Vec<(Uuid, i64)> = b
        .bind_all(sqlx::query_as(PG_INSERT_COPIED))
        .fetch_all(pool)
        .await?;
    let complete = inserted.len() == events.len();
    let inserted: HashMap<Uuid, i64> = inserted.into_iter().collect();
    if complete {
        return Ok(b
            .ids
            .iter()
            .map(|id| {
                inserted
                    .get(id)
                    .map_or(Landing::Waiting, |p| Landing::Inserted(*p))
            })
            .collect());
    }
    // Already there (a retry, the mirror), diverged, or not landed (its predecessor is
    // missing): decided by identity, never by the event id alone.
    let rest: Vec<StoredEvent> = events
        .iter()
        .filter(|e| !inserted.contains_key(&e.event_id))
        .cloned()
        .collect();
    let classified: HashMap<Uuid, Landing> = rest
        .iter()
        .map(|e| e.event_id)
        .zip(classify_pg(pool, &rest).await?)
        .collect();
    Ok(b.ids
        .iter()
        .map(|id| match inserted.get(id) {
            Some(p) => Landing::Inserted(*p),
            None => classified.get(id).copied().unwrap_or(Landing::Waiting),
        })
        .collect())
}

/// [`PG_LAND_AND_COUNT`]: the landings and the ranges' counts after the insert, or `None`
/// when a row was neither inserted nor seen by the statement's snapshot (the caller asks
/// again the long way).
async fn land_and_count_pg(
    pool: &PgPool,
    tenant: Uuid,
    events: &[StoredEvent],
    ranges: &[(StreamKey, i32, i32)],
    owned: &HashMap<StreamKey, i32>,
) -> Result<Option<LandedAndCounted>, StoreError> {
    type Row = (
        i32,
        Option<Uuid>,
        Option<i64>,
        bool,
        bool,
        bool,
        Option<String>,
        Option<Uuid>,
        i64,
        i32,
    );
    let b = PgBatch::of(events);
    let types: Vec<&str> = ranges.iter().map(|r| r.0 .0.as_str()).collect();
    let ids: Vec<Uuid> = ranges.iter().map(|r| r.0 .1).collect();
    let los: Vec<i32> = ranges.iter().map(|r| r.1).collect();
    let his: Vec<i32> = ranges.iter().map(|r| r.2).collect();
    let (mut owned_types, mut owned_ids, mut owned_heads) = (Vec::new(), Vec::new(), Vec::new());
    for ((t, id), head) in owned {
        owned_types.push(t.as_str());
        owned_ids.push(*id);
        owned_heads.push(*head);
    }
    let rows: Vec<Row> = b
        .bind_all(sqlx::query_as(PG_LAND_AND_COUNT))
        .bind(&types)
        .bind(&ids)
        .bind(&los)
        .bind(&his)
        .bind(tenant)
        .bind(owned_types)
        .bind(owned_ids)
        .bind(owned_heads)
        .fetch_all(pool)
        .await?;
    let mut inserted: HashMap<Uuid, i64> = HashMap::new();
    let mut seen: HashMap<Uuid, Landing> = HashMap::new();
    let mut counts: HashMap<StreamKey, StreamDigest> = HashMap::new();
    for (kind, id, position, same, foreign_stream, version_taken, t, aggregate, count, last) in rows
    {
        match (kind, id, t, aggregate) {
            (0, Some(id), _, _) => {
                inserted.insert(id, position.unwrap_or_default());
            }
            (1, Some(id), _, _) => {
                seen.insert(
                    id,
                    seen_landing(position, same, foreign_stream, version_taken),
                );
            }
            (2, _, Some(t), Some(aggregate)) => {
                counts.insert(
                    (t, aggregate),
                    StreamDigest {
                        count,
                        last_version: last,
                        ..StreamDigest::default()
                    },
                );
            }
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "unexpected row of kind {kind} from the copy-and-count statement"
                )))
            }
        }
    }
    let mut landed = Vec::with_capacity(events.len());
    for e in events {
        let landing = match inserted.get(&e.event_id) {
            Some(p) => Landing::Inserted(*p),
            None => seen.get(&e.event_id).copied().unwrap_or(Landing::Waiting),
        };
        if landing == Landing::Waiting {
            return Ok(None);
        }
        landed.push(landing);
    }
    // The snapshot's counts do not see the rows inserted now: add them.
    let bounds: HashMap<&StreamKey, (i32, i32)> =
        ranges.iter().map(|(k, lo, hi)| (k, (*lo, *hi))).collect();
    for (e, landing) in events.iter().zip(&landed) {
        if !matches!(landing, Landing::Inserted(_)) || e.tenant_id != Some(tenant) {
            continue;
        }
        let key = (e.aggregate_type.clone(), e.aggregate_id);
        if let Some((lo, hi)) = bounds.get(&key) {
            if (*lo..=*hi).contains(&e.version) {
                let d = counts.entry(key).or_default();
                d.count += 1;
                d.last_version = d.last_version.max(e.version);
            }
        }
    }
    Ok(Some((landed, counts)))
}

/// A row not inserted, from [`PG_CLASSIFY`]'s columns: the row under its event id (position,
/// whether the same event), whether its stream holds another tenant's events, whether its
/// version holds another event.
fn seen_landing(
    position: Option<i64>,
    same: bool,
    foreign_stream: bool,
    version_taken: bool,
) -> Landing {
    match (position, same) {
        (Some(p), true) => Landing::Present(p),
        (Some(_), false) => Landing::Diverged(Divergence::EventIdTaken),
        (None, _) if foreign_stream => Landing::Diverged(Divergence::ForeignStream),
        (None, _) if version_taken => Landing::Diverged(Divergence::VersionTaken),
        (None, _) => Landing::Waiting,
    }
}

/// Landings, and counts per listed range.
type LandedAndCounted = (Vec<Landing>, HashMap<StreamKey, StreamDigest>);

async fn classify_pg(pool: &PgPool, events: &[StoredEvent]) -> Result<Vec<Landing>, StoreError> {
    let b = PgBatch::of(events);
    let rows: Vec<(Uuid, Option<i64>, bool, bool, bool)> = sqlx::query_as(PG_CLASSIFY)
        .bind(&b.ids)
        .bind(&b.aggregate_ids)
        .bind(&b.aggregate_types)
        .bind(&b.event_types)
        .bind(&b.tenants)
        .bind(&b.actors)
        .bind(&b.versions)
        .bind(&b.timestamps)
        .bind(&b.payloads)
        .fetch_all(pool)
        .await?;
    let by_id: HashMap<Uuid, Landing> = rows
        .into_iter()
        .map(|(id, position, same, foreign_stream, version_taken)| {
            (
                id,
                seen_landing(position, same, foreign_stream, version_taken),
            )
        })
        .collect();
    Ok(b.ids
        .iter()
        .map(|id| by_id.get(id).copied().unwrap_or(Landing::Waiting))
        .collect())
}

/// A stream's head here and whether it holds another tenant's events.
type SqliteHeads = HashMap<(Uuid, String), (i32, bool)>;

/// What copying `e` into a SQLite target comes to, without writing; [`Landing::Waiting`]
/// comes with whether `e` is the next version of its stream (it can be inserted now).
async fn classify_sqlite(
    conn: &mut sqlx::SqliteConnection,
    heads: &mut SqliteHeads,
    e: &StoredEvent,
) -> Result<(Landing, bool), StoreError> {
    let sql = format!("SELECT {SQLITE_COLUMNS} FROM events WHERE event_id = ?1");
    let existing = sqlx::query(&sql)
        .bind(e.event_id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(row) = existing {
        let old = super::sqlite::decode(&row)?;
        let same = old.tenant_id == e.tenant_id
            && old.aggregate_id == e.aggregate_id
            && old.aggregate_type == e.aggregate_type
            && old.version == e.version
            && old.event_type == e.event_type
            && old.actor_id == e.actor_id
            && old.timestamp.trunc_subsecs(6) == e.timestamp.trunc_subsecs(6)
            && super::json_equal(old.payload.get(), e.payload.get());
        return Ok(if same {
            (Landing::Present(old.global_position), false)
        } else {
            (Landing::Diverged(Divergence::EventIdTaken), false)
        });
    }
    let key = (e.aggregate_id, e.aggregate_type.clone());
    let (head, foreign) = match heads.get(&key) {
        Some(head) => *head,
        None => {
            let head: (i32, bool) = sqlx::query_as(
                "SELECT coalesce(max(version), 0), coalesce(max(tenant_id IS NOT ?3), 0)
                   FROM events WHERE aggregate_id = ?1 AND aggregate_type = ?2",
            )
            .bind(e.aggregate_id.to_string())
            .bind(&e.aggregate_type)
            .bind(e.tenant_id.map(|t| t.to_string()))
            .fetch_one(&mut *conn)
            .await?;
            heads.insert(key, head);
            head
        }
    };
    Ok(if foreign {
        (Landing::Diverged(Divergence::ForeignStream), false)
    } else if e.version <= head {
        (Landing::Diverged(Divergence::VersionTaken), false)
    } else {
        (Landing::Waiting, e.version == head + 1)
    })
}

async fn insert_copied_sqlite(
    pool: &SqlitePool,
    events: &[StoredEvent],
) -> Result<Vec<Landing>, StoreError> {
    let mut tx = crate::dialect::begin_immediate(pool).await?;
    let out = land_sqlite(&mut tx, events).await?;
    tx.commit().await?;
    Ok(out)
}

/// [`insert_copied_sqlite`] on a connection already in a writing transaction.
async fn land_sqlite(
    tx: &mut sqlx::SqliteConnection,
    events: &[StoredEvent],
) -> Result<Vec<Landing>, StoreError> {
    // This transaction is a copier: a fence that admits copiers only lets its rows in (the
    // row is gone again before the transaction commits, so no other writer ever sees it).
    sqlx::query("INSERT INTO switchyard_copier (id) VALUES (1)")
        .execute(&mut *tx)
        .await?;
    let mut heads = SqliteHeads::new();
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let (landing, next) = classify_sqlite(&mut *tx, &mut heads, e).await?;
        if !next {
            out.push(landing);
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
        out.push(match position {
            Some(p) => {
                heads.insert(
                    (e.aggregate_id, e.aggregate_type.clone()),
                    (e.version, false),
                );
                Landing::Inserted(p)
            }
            None => Landing::Waiting,
        });
    }
    sqlx::query("DELETE FROM switchyard_copier")
        .execute(&mut *tx)
        .await?;
    Ok(out)
}
