//! The tenant feed (`GET /v1/tenants/{t}/events`, optionally of one aggregate type) and the
//! tenant's current position: a consumer that follows the feed from any position it was given
//! is given every committed event of the tenant exactly once, however transactions commit.
//!
//! **Why positions alone are not enough.** On PostgreSQL a row's `global_position` comes from a
//! sequence when it is inserted, and transactions commit in any order: while the transaction
//! holding position 10 is open, position 11 may be committed and read, and a consumer that
//! continues `after_position=11` never sees 10.
//!
//! **The rule.** The feed is ordered by `(txid, global_position)` (a NULL `txid` predates the
//! column and counts as 0) and stops below a horizon `h`, so every row it returns is final and
//! every row committed later sorts after it:
//! - `h` is the oldest transaction id still running *in this database* (its backends'
//!   `backend_xid`, autovacuum workers aside, and prepared transactions of this database) among
//!   the snapshot's in-flight ids, else the snapshot's `xmax`. A transaction in another
//!   database never writes here, so it never delays the feed; with no other transaction of
//!   this database open, everything committed is below `h`, so an acknowledged append is in
//!   the feed at once.
//! - `h` is taken in a statement of its own, before the page's: a transaction the snapshot saw
//!   running but that finished before `pg_stat_activity` was read has committed before the
//!   page's snapshot, so the page sees its rows.
//! - every row inserted from now on carries its own transaction's id (`switchyard_txid`
//!   trigger), and a transaction without an id yet gets one at or above `h`: so rows below `h`
//!   never change, and rows arriving later sort after every row returned so far.
//! - a transaction that commits a row with an older id than a running one's is held back with
//!   it, whatever its positions (the copier's stable-horizon rule, `copy.rs`).
//!
//! **The cursor** stays a position, so clients keep `after_position=P` and eventsource-py's
//! `Position(key=(P,))`: the feed looks up the tenant's row at `P` and continues after its
//! `(txid, P)`. A `P` the tenant has no row at (0, or a checkpoint translated to a position
//! just below a copied event) continues from the first row, in feed order, of those past `P`:
//! nothing past `P` is skipped, and a row at or below `P` committed later may come again (at
//! least once). [`FeedStart::From`] continues from the first row, in feed order, of those at or
//! past a position whether or not the tenant has a row just below it: a cursor translated
//! across a migration names the first position it may not have seen (the proxy's feed with
//! `after_store`). SQLite holds its write lock from a writer's first insert to its commit, so
//! positions commit in order there and the feed is in position order.

use uuid::Uuid;

use super::{Backend, EventStore};
use crate::event::{StoreError, StoredEvent};

const PG_COLUMNS: &str = "e.global_position, e.event_id, e.aggregate_type, e.aggregate_id, \
     e.tenant_id, e.event_type, e.version, e.actor_id, e.timestamp, e.payload::text AS payload, \
     e.created_at";

use super::copy::PG_HORIZON;

/// The feed page: `$1` tenant, `$2` the cursor position, `$3` the aggregate type or NULL,
/// `$4` the horizon, `$5` the limit, `$6` true to ignore a row at `$2` ([`FeedStart::From`]).
const PG_PAGE: &str = "
WITH exact AS (
    SELECT coalesce(txid, '0'::xid8) AS tx, global_position AS pos
      FROM events WHERE tenant_id = $1 AND global_position = $2 AND NOT $6),
cursor AS (
    SELECT tx, pos FROM exact
    UNION ALL
    SELECT * FROM (
        SELECT coalesce(txid, '0'::xid8) AS tx, global_position - 1 AS pos
          FROM events
         WHERE tenant_id = $1 AND global_position > $2 AND NOT EXISTS (SELECT 1 FROM exact)
         ORDER BY coalesce(txid, '0'::xid8), global_position LIMIT 1) first_past)
SELECT {columns} FROM events e
 WHERE e.tenant_id = $1 AND ($3::text IS NULL OR e.aggregate_type = $3)
   -- scalar subqueries, so the row comparison is an index condition (a join would scan the
   -- tenant from its start on every page)
   AND (coalesce(e.txid, '0'::xid8), e.global_position)
       > ((SELECT tx FROM cursor), (SELECT pos FROM cursor))
   AND coalesce(e.txid, '0'::xid8) < $4::text::xid8
 ORDER BY coalesce(e.txid, '0'::xid8), e.global_position
 LIMIT $5";

/// Where a feed page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedStart {
    /// After the tenant's event at this position in feed order (a cursor the feed gave), or,
    /// without an event there, from the first in feed order of those past it.
    After(i64),
    /// From the first event in feed order of those at or past this position, whatever event
    /// is just below it: every event at or past it is delivered (a translated cursor).
    From(i64),
}

impl EventStore {
    /// The tenant's events from `start` in feed order (see the module docs), of
    /// `aggregate_type` when given, at most `limit`.
    pub async fn read_feed(
        &self,
        tenant_id: Uuid,
        start: FeedStart,
        aggregate_type: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let (after_position, past_only) = match start {
            FeedStart::After(p) => (p, false),
            FeedStart::From(p) => (p.saturating_sub(1), true),
        };
        match &self.backend {
            Backend::Postgres(pool) => {
                let horizon: String = sqlx::query_scalar(PG_HORIZON).fetch_one(pool).await?;
                let sql = PG_PAGE.replace("{columns}", PG_COLUMNS);
                let rows = sqlx::query(&sql)
                    .bind(tenant_id)
                    .bind(after_position)
                    .bind(aggregate_type)
                    .bind(horizon)
                    .bind(i64::from(limit))
                    .bind(past_only)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(super::postgres::decode).collect()
            }
            Backend::Sqlite(pool) => {
                let sql = format!(
                    "SELECT {} FROM events
                      WHERE tenant_id = ?1 AND (?2 IS NULL OR aggregate_type = ?2)
                        AND global_position > ?3
                      ORDER BY global_position LIMIT ?4",
                    super::sqlite::EVENT_COLUMNS
                );
                let rows = sqlx::query(&sql)
                    .bind(tenant_id.to_string())
                    .bind(aggregate_type)
                    .bind(after_position)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(super::sqlite::decode).collect()
            }
        }
    }

    /// The position of the tenant's last event in feed order, `None` when the feed has none
    /// yet: a consumer starting after it is given exactly the events the feed has not yet
    /// given anyone (on PostgreSQL an event of a transaction still open may be newer than it
    /// yet come before it by position).
    pub async fn feed_position(&self, tenant_id: Uuid) -> Result<Option<i64>, StoreError> {
        Ok(match &self.backend {
            Backend::Postgres(pool) => {
                let horizon: String = sqlx::query_scalar(PG_HORIZON).fetch_one(pool).await?;
                sqlx::query_scalar(
                    "SELECT global_position FROM events
                      WHERE tenant_id = $1 AND coalesce(txid, '0'::xid8) < $2::text::xid8
                      ORDER BY coalesce(txid, '0'::xid8) DESC, global_position DESC LIMIT 1",
                )
                .bind(tenant_id)
                .bind(horizon)
                .fetch_optional(pool)
                .await?
            }
            Backend::Sqlite(pool) => {
                sqlx::query_scalar("SELECT max(global_position) FROM events WHERE tenant_id = ?1")
                    .bind(tenant_id.to_string())
                    .fetch_one(pool)
                    .await?
            }
        })
    }
}
