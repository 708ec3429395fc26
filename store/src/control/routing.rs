//! `tenant_routing`: which store serves each tenant, and in which migration state.
//!
//! Every change takes the next routing epoch under the epoch row's lock, so changes commit in
//! epoch order: a proxy that has applied everything up to epoch E loads exactly the rows with
//! `epoch > E` to catch up, at any table size. On PostgreSQL the change also sends
//! `NOTIFY switchyard_routing` (delivered at commit).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::sqlite::SqliteRow;
use sqlx::{Postgres, Row, Sqlite, Transaction};
use uuid::Uuid;

use super::{Backend, ControlDb};
use crate::event::{parse_timestamp, StoreError};

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
        let sql = "SELECT epoch FROM switchyard_routing_epoch";
        Ok(match &self.backend {
            Backend::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
            Backend::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
        })
    }

    /// Every route changed after `epoch` (all routes for 0), oldest change first.
    pub async fn routes_since(&self, epoch: i64) -> Result<Vec<RouteRecord>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let sql =
                    format!("SELECT {COLUMNS} FROM tenant_routing WHERE epoch > $1 ORDER BY epoch");
                let rows = sqlx::query(&sql).bind(epoch).fetch_all(pool).await?;
                rows.iter().map(decode_pg).collect()
            }
            Backend::Sqlite(pool) => {
                let sql =
                    format!("SELECT {COLUMNS} FROM tenant_routing WHERE epoch > ?1 ORDER BY epoch");
                let rows = sqlx::query(&sql).bind(epoch).fetch_all(pool).await?;
                rows.iter().map(decode_sqlite).collect()
            }
        }
    }

    /// One tenant's route, if it has a row.
    pub async fn route(&self, tenant_id: Uuid) -> Result<Option<RouteRecord>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let sql = format!("SELECT {COLUMNS} FROM tenant_routing WHERE tenant_id = $1");
                let row = sqlx::query(&sql)
                    .bind(tenant_id)
                    .fetch_optional(pool)
                    .await?;
                row.as_ref().map(decode_pg).transpose()
            }
            Backend::Sqlite(pool) => {
                let sql = format!("SELECT {COLUMNS} FROM tenant_routing WHERE tenant_id = ?1");
                let row = sqlx::query(&sql)
                    .bind(tenant_id.to_string())
                    .fetch_optional(pool)
                    .await?;
                row.as_ref().map(decode_sqlite).transpose()
            }
        }
    }

    /// Writes a route under the next epoch and notifies proxies. Returns the epoch.
    pub async fn set_route(&self, update: &RouteUpdate) -> Result<i64, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                let epoch = write_route_pg(&mut tx, update).await?;
                tx.commit().await?;
                Ok(epoch)
            }
            Backend::Sqlite(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let epoch = write_route_sqlite(&mut tx, update).await?;
                tx.commit().await?;
                Ok(epoch)
            }
        }
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

/// Writes `update` inside `tx` under the next routing epoch and queues `NOTIFY
/// switchyard_routing` (delivered at commit). Takes the epoch row's lock until `tx` ends, so
/// call it last before committing. The caller commits; returns the epoch.
pub(super) async fn write_route_pg(
    tx: &mut Transaction<'_, Postgres>,
    update: &RouteUpdate,
) -> Result<i64, StoreError> {
    let epoch: i64 =
        sqlx::query_scalar("UPDATE switchyard_routing_epoch SET epoch = epoch + 1 RETURNING epoch")
            .fetch_one(&mut **tx)
            .await?;
    sqlx::query(
        "INSERT INTO tenant_routing (tenant_id, store_id, migration_state,
             target_store_id, active_migration_id, epoch, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, NOW())
         ON CONFLICT (tenant_id) DO UPDATE SET store_id = EXCLUDED.store_id,
             migration_state = EXCLUDED.migration_state,
             target_store_id = EXCLUDED.target_store_id,
             active_migration_id = EXCLUDED.active_migration_id,
             epoch = EXCLUDED.epoch, updated_at = EXCLUDED.updated_at",
    )
    .bind(update.tenant_id)
    .bind(&update.store_id)
    .bind(update.migration_state.as_str())
    .bind(update.target_store_id.as_deref())
    .bind(update.active_migration_id)
    .bind(epoch)
    .execute(&mut **tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(ROUTING_CHANNEL)
        .bind(epoch.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(epoch)
}

/// [`write_route_pg`] for SQLite (no NOTIFY: proxies poll). `tx` should be `BEGIN IMMEDIATE`.
pub(super) async fn write_route_sqlite(
    tx: &mut Transaction<'_, Sqlite>,
    update: &RouteUpdate,
) -> Result<i64, StoreError> {
    let epoch: i64 =
        sqlx::query_scalar("UPDATE switchyard_routing_epoch SET epoch = epoch + 1 RETURNING epoch")
            .fetch_one(&mut **tx)
            .await?;
    sqlx::query(
        "INSERT INTO tenant_routing (tenant_id, store_id, migration_state,
             target_store_id, active_migration_id, epoch, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
         ON CONFLICT (tenant_id) DO UPDATE SET store_id = excluded.store_id,
             migration_state = excluded.migration_state,
             target_store_id = excluded.target_store_id,
             active_migration_id = excluded.active_migration_id,
             epoch = excluded.epoch, updated_at = excluded.updated_at",
    )
    .bind(update.tenant_id.to_string())
    .bind(&update.store_id)
    .bind(update.migration_state.as_str())
    .bind(update.target_store_id.as_deref())
    .bind(update.active_migration_id.map(|id| id.to_string()))
    .bind(epoch)
    .execute(&mut **tx)
    .await?;
    Ok(epoch)
}

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

fn decode_pg(row: &PgRow) -> Result<RouteRecord, StoreError> {
    let state: String = row.try_get("migration_state")?;
    Ok(RouteRecord {
        tenant_id: row.try_get("tenant_id")?,
        store_id: row.try_get("store_id")?,
        migration_state: state.parse()?,
        target_store_id: row.try_get("target_store_id")?,
        active_migration_id: row.try_get("active_migration_id")?,
        epoch: row.try_get("epoch")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn decode_sqlite(row: &SqliteRow) -> Result<RouteRecord, StoreError> {
    let uuid = |column: &str| -> Result<Option<Uuid>, StoreError> {
        let text: Option<String> = row.try_get(column)?;
        text.map(|t| {
            Uuid::parse_str(&t).map_err(|e| StoreError::Corrupt(format!("{column} {t:?}: {e}")))
        })
        .transpose()
    };
    let state: String = row.try_get("migration_state")?;
    let updated_at: String = row.try_get("updated_at")?;
    Ok(RouteRecord {
        tenant_id: uuid("tenant_id")?
            .ok_or_else(|| StoreError::Corrupt("tenant_routing.tenant_id is NULL".to_owned()))?,
        store_id: row.try_get("store_id")?,
        migration_state: state.parse()?,
        target_store_id: row.try_get("target_store_id")?,
        active_migration_id: uuid("active_migration_id")?,
        epoch: row.try_get("epoch")?,
        updated_at: parse_timestamp(&updated_at)?,
    })
}
