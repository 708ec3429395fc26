//! The control database: tenant routing now; migrations, audit, positions and proxies join it
//! as the engine grows. PostgreSQL in production (routing changes are NOTIFYed), SQLite for
//! the embedded default (routing changes are polled).

mod audit;
mod claims;
mod cleanups;
pub mod lifecycle;
mod migrations;
mod positions;
mod progress;
mod proxies;
mod routing;

pub use audit::{AuditEntry, AuditNote};
pub use cleanups::{CleanupRecord, CleanupRole, CleanupState};
pub use lifecycle::{Action, IllegalTransition, MigrationState, Phase};
pub use migrations::{MigrationError, MigrationRecord, NewMigration, Transitioned};
pub use positions::Translation;
pub use progress::Progress;
pub use proxies::{ProxyDetails, ProxyRecord};
pub use routing::{RouteRecord, RouteUpdate, RoutingListener, RoutingState};

use crate::dialect::{AsBackend, Backend};
use crate::event::StoreError;
use crate::url::Planning;

const PG_DDL: &str = include_str!("../../sql/control-postgresql.sql");
const SQLITE_DDL: &str = include_str!("../../sql/control-sqlite.sql");
/// Version 3 on SQLite: `migration_cleanups`, with [`SQLITE_COLUMNS_V3`].
const SQLITE_DDL_V3: &str = include_str!("../../sql/control-sqlite-v3.sql");
/// Columns version 3 adds to SQLite tables (added when missing: see `ensure_sqlite_schema`).
const SQLITE_COLUMNS_V3: &[(&str, &str, &str)] = &[("tenant_migrations", "finished_at", "TEXT")];
/// The `switchyard_schema` version `control-sqlite-v3.sql` records; raise both together.
const SCHEMA_VERSION: i64 = 3;
const SCHEMA_LOCK: i64 = 0x5359_5244_0002;

/// A connected control database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ControlDb {
    backend: Backend,
}

impl AsBackend for ControlDb {
    fn as_backend(&self) -> &Backend {
        &self.backend
    }
}

impl ControlDb {
    /// Opens a lazily connecting pool on `url`. Its statements are planned at each run
    /// ([`Planning::EachRun`]): `migration_position_map` grows by a row per copied event under
    /// sessions that may have planned on it nearly empty; none of them is on an append's path.
    pub fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::connect(url, max_connections, Planning::EachRun)?,
        })
    }

    /// Whether this is the embedded (SQLite) control database, whose schema programs create on
    /// start.
    pub fn is_embedded(&self) -> bool {
        self.backend.is_sqlite()
    }

    /// Whether routing changes are pushed (PostgreSQL NOTIFY) or only polled.
    pub fn supports_notify(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Creates or upgrades the control schema. Idempotent and safe to run concurrently.
    pub async fn ensure_schema(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(SCHEMA_LOCK)
                    .execute(&mut *tx)
                    .await?;
                sqlx::raw_sql(PG_DDL).execute(&mut *tx).await?;
                tx.commit().await?;
            }
            Backend::Sqlite(pool) => {
                crate::url::ensure_sqlite_schema(
                    pool,
                    "control",
                    SCHEMA_VERSION,
                    &[SQLITE_DDL, SQLITE_DDL_V3],
                    SQLITE_COLUMNS_V3,
                )
                .await?;
            }
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.backend.ping().await
    }

    pub async fn close(&self) {
        self.backend.close().await;
    }
}
