//! `tenant_routing`: which store serves each tenant, and in which migration state.
//!
//! Every change takes the next routing epoch under the epoch row's lock, so changes commit in
//! epoch order: a proxy that has applied everything up to epoch E loads exactly the rows with
//! `epoch > E` to catch up, at any table size. On PostgreSQL the change also sends
//! `NOTIFY switchyard_routing` (delivered at commit).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use sqlx::{Postgres, Sqlite, Transaction};
use uuid::Uuid;

use super::{Backend, ControlDb};
use crate::dialect::{on_backend, Columns, Lite, Pg};
use crate::event::StoreError;

/// The channel proxies LISTEN on.
pub(super) const ROUTING_CHANNEL: &str = "switchyard_routing";

/// A tenant's routing state, as DESIGN.md "Routing" tabulates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingState {
    Normal,
    BulkCopy,
    DualWrite,
    CutoverPaused,
}

impl RoutingState {
    pub const ALL: [Self; 4] = [
        Self::Normal,
        Self::BulkCopy,
        Self::DualWrite,
        Self::CutoverPaused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::BulkCopy => "bulk_copy",
            Self::DualWrite => "dual_write",
            Self::CutoverPaused => "cutover_paused",
        }
    }
}

impl fmt::Display for RoutingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RoutingState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown routing state {s:?}")))
    }
}

/// A `tenant_routing` row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteRecord {
    pub tenant_id: Uuid,
    pub store_id: String,
    pub migration_state: RoutingState,
    pub target_store_id: Option<String>,
    pub active_migration_id: Option<Uuid>,
    pub epoch: i64,
    pub updated_at: DateTime<Utc>,
}

/// What a routing change writes.
#[derive(Debug, Clone)]
pub struct RouteUpdate {
    pub tenant_id: Uuid,
    pub store_id: String,
    pub migration_state: RoutingState,
    pub target_store_id: Option<String>,
    pub active_migration_id: Option<Uuid>,
}

impl RouteUpdate {
    /// A plain route to `store_id`, no migration.
    pub fn normal(tenant_id: Uuid, store_id: impl Into<String>) -> Self {
        Self {
            tenant_id,
            store_id: store_id.into(),
            migration_state: RoutingState::Normal,
            target_store_id: None,
            active_migration_id: None,
        }
    }
}

const COLUMNS: &str =
    "tenant_id, store_id, migration_state, target_store_id, active_migration_id, epoch, updated_at";

impl ControlDb {
    /// The newest routing epoch (0 before any change).
    pub async fn routing_epoch(&self) -> Result<i64, StoreError> {
        Ok(on_backend!(self, |pool, _d| {
            sqlx::query_scalar("SELECT epoch FROM switchyard_routing_epoch")
                .fetch_one(pool)
                .await?
        }))
    }

    /// Every route changed after `epoch` (all routes for 0), oldest change first.
    pub async fn routes_since(&self, epoch: i64) -> Result<Vec<RouteRecord>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM tenant_routing WHERE epoch > $1 ORDER BY epoch");
        on_backend!(self, |pool, _d| {
            let rows = sqlx::query(&sql).bind(epoch).fetch_all(pool).await?;
            rows.iter().map(decode).collect()
        })
    }

    /// The routes under reverse replication: `normal`, with the store the tenant left as
    /// their target (written when a migration with reverse replication cut over).
    pub async fn reverse_routes(&self) -> Result<Vec<RouteRecord>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tenant_routing
              WHERE migration_state = 'normal' AND target_store_id IS NOT NULL"
        );
        on_backend!(self, |pool, _d| {
            let rows = sqlx::query(&sql).fetch_all(pool).await?;
            rows.iter().map(decode).collect()
        })
    }

    /// One tenant's route, if it has a row.
    pub async fn route(&self, tenant_id: Uuid) -> Result<Option<RouteRecord>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM tenant_routing WHERE tenant_id = $1");
        on_backend!(self, |pool, d| {
            let row = sqlx::query(&sql)
                .bind(d.id(tenant_id))
                .fetch_optional(pool)
                .await?;
            row.as_ref().map(decode).transpose()
        })
    }

    /// Writes a route under the next epoch and notifies proxies. Returns the epoch.
    pub async fn set_route(&self, update: &RouteUpdate) -> Result<i64, StoreError> {
        on_backend!(self, |pool, d| {
            let mut tx = d.begin(pool).await?;
            let epoch = d.write_route(&mut tx, update).await?;
            tx.commit().await?;
            Ok(epoch)
        })
    }

    /// A listener on routing notifications, or `None` where the backend has none (SQLite).
    pub async fn routing_listener(&self) -> Result<Option<RoutingListener>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let mut listener = PgListener::connect_with(pool).await?;
                listener.listen(ROUTING_CHANNEL).await?;
                Ok(Some(RoutingListener { inner: listener }))
            }
            Backend::Sqlite(_) => Ok(None),
        }
    }
}

impl Pg {
    /// Reads the routing epoch and locks its row until the transaction ends, which every
    /// routing change takes first: the checks that follow in the same transaction cannot be
    /// overtaken by a routing change.
    pub(super) fn lock_routing_epoch(self) -> &'static str {
        "SELECT epoch FROM switchyard_routing_epoch FOR UPDATE"
    }

    /// Queues `NOTIFY switchyard_routing` for `epoch` (delivered at commit).
    pub(super) async fn notify_routing(
        self,
        tx: &mut Transaction<'_, Postgres>,
        epoch: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(ROUTING_CHANNEL)
            .bind(epoch.to_string())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

impl Lite {
    /// `BEGIN IMMEDIATE` already excludes every other writer.
    pub(super) fn lock_routing_epoch(self) -> &'static str {
        "SELECT epoch FROM switchyard_routing_epoch"
    }

    /// SQLite has no NOTIFY: proxies poll the epoch.
    #[allow(clippy::unused_async)]
    pub(super) async fn notify_routing(
        self,
        _tx: &mut Transaction<'_, Sqlite>,
        _epoch: i64,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

/// `write_route` for each dialect: the same statements, bound with the backend's types.
macro_rules! impl_write_route {
    ($dialect:ty, $db:ty) => {
        impl $dialect {
            /// Writes `update` inside `tx` under the next routing epoch and queues the routing
            /// notification (PostgreSQL; delivered at commit). Takes the epoch row's lock until
            /// `tx` ends, so call it last before committing (on SQLite `tx` should be `BEGIN
            /// IMMEDIATE`). The caller commits; returns the epoch.
            pub(super) async fn write_route(
                self,
                tx: &mut Transaction<'_, $db>,
                update: &RouteUpdate,
            ) -> Result<i64, StoreError> {
                let epoch: i64 = sqlx::query_scalar(
                    "UPDATE switchyard_routing_epoch SET epoch = epoch + 1 RETURNING epoch",
                )
                .fetch_one(&mut **tx)
                .await?;
                let sql = format!(
                    "INSERT INTO tenant_routing (tenant_id, store_id, migration_state,
                         target_store_id, active_migration_id, epoch, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, {now})
                     ON CONFLICT (tenant_id) DO UPDATE SET store_id = excluded.store_id,
                         migration_state = excluded.migration_state,
                         target_store_id = excluded.target_store_id,
                         active_migration_id = excluded.active_migration_id,
                         epoch = excluded.epoch, updated_at = excluded.updated_at",
                    now = self.now()
                );
                sqlx::query(&sql)
                    .bind(self.id(update.tenant_id))
                    .bind(&update.store_id)
                    .bind(update.migration_state.as_str())
                    .bind(update.target_store_id.as_deref())
                    .bind(update.active_migration_id.map(|id| self.id(id)))
                    .bind(epoch)
                    .execute(&mut **tx)
                    .await?;
                self.notify_routing(tx, epoch).await?;
                Ok(epoch)
            }
        }
    };
}

impl_write_route!(Pg, Postgres);
impl_write_route!(Lite, Sqlite);

/// Receives `NOTIFY switchyard_routing`.
pub struct RoutingListener {
    inner: PgListener,
}

impl fmt::Debug for RoutingListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RoutingListener")
    }
}

impl RoutingListener {
    /// Waits for the next notification and returns the epoch it announces. An error means the
    /// connection is gone; notifications sent meanwhile are lost (the poll covers them).
    pub async fn recv(&mut self) -> Result<i64, StoreError> {
        let note = self.inner.try_recv().await?;
        match note {
            Some(note) => Ok(note.payload().parse().unwrap_or(0)),
            None => Err(StoreError::Unavailable(sqlx::Error::Protocol(
                "routing listener connection lost".to_owned(),
            ))),
        }
    }
}

fn decode(row: &impl Columns) -> Result<RouteRecord, StoreError> {
    Ok(RouteRecord {
        tenant_id: row.uuid("tenant_id")?,
        store_id: row.text("store_id")?,
        migration_state: row.text("migration_state")?.parse()?,
        target_store_id: row.opt_text("target_store_id")?,
        active_migration_id: row.opt_uuid("active_migration_id")?,
        epoch: row.int("epoch")?,
        updated_at: row.time("updated_at")?,
    })
}
