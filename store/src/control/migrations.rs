//! `tenant_migrations`: the migration records with their compare-and-set state changes, and
//! the routing changes that must not race a migration (`routing set`, the default store).
//! Worker claims live in `claims.rs`, progress in `progress.rs`, the position map in
//! `positions.rs`, the proxies' heartbeats in `proxies.rs`.
//!
//! Every state change is one transaction that checks the stored state is the one the caller
//! saw (so of two racing operators exactly one wins), asks [`lifecycle::next`] whether the action
//! is legal, writes the audit row and, when asked, the tenant's route under the next routing
//! epoch. The database enforces one non-terminal migration per tenant with a unique partial
//! index, so of two racing creators exactly one wins too.
//!
//! Each query is written once for both backends through [`crate::dialect`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::audit::{AuditNote, NewAuditRow};
use super::lifecycle::{self, Action, IllegalTransition, MigrationState, Phase};
use super::{ControlDb, RouteUpdate, RoutingState};
use crate::dialect::{on_backend, Columns};
use crate::error::{ErrorKind, StoreError};

/// Why a migration operation did not happen. Nothing was written in any case.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration {0} not found")]
    NotFound(Uuid),
    #[error(
        "tenant {tenant_id} already has an active migration {existing_id} ({state}); \
         let it finish or abort it first"
    )]
    AlreadyActive {
        tenant_id: Uuid,
        existing_id: Uuid,
        state: MigrationState,
    },
    #[error(
        "migration {id} is {actual}, not {expected}: someone else changed it first; \
         check its status and retry if still wanted"
    )]
    StateChanged {
        id: Uuid,
        expected: MigrationState,
        actual: MigrationState,
    },
    #[error("migration {id}: {refused}")]
    Illegal {
        id: Uuid,
        refused: IllegalTransition,
    },
    #[error("migration {id} is not claimed by worker {worker:?} (holder: {holder:?})")]
    ClaimLost {
        id: Uuid,
        worker: String,
        holder: Option<String>,
    },
    #[error("a migration needs two stores: source and target are both {0:?}")]
    SameStore(String),
    #[error(
        "migration {id} is of tenant {tenant_id}; refusing to write a route for {route_tenant}"
    )]
    RouteOfOtherTenant {
        id: Uuid,
        tenant_id: Uuid,
        route_tenant: Uuid,
    },
    #[error(
        "tenant {tenant_id}'s route changed (epoch {expected} when read, {actual} now) while the \
         migration was being created; nothing was created: check `routing get {tenant_id}` and \
         start again if still wanted"
    )]
    RouteChanged {
        tenant_id: Uuid,
        expected: i64,
        actual: i64,
    },
    #[error(
        "tenant {tenant_id} has no routing row, so it lives in the default store, which is \
         {default:?} now, not {source_store_id:?} as read; nothing was created: start again"
    )]
    DefaultChanged {
        tenant_id: Uuid,
        source_store_id: String,
        default: String,
    },
    #[error(
        "tenant {tenant_id} has no routing row (it lives in the default store) and its migration \
         {migration_id} is {state}: changing the default store would move it mid-migration; \
         let the migration start copying, finish or abort it first"
    )]
    DefaultInUse {
        tenant_id: Uuid,
        migration_id: Uuid,
        state: MigrationState,
    },
    #[error("tenant {0}: migrations were created and ended concurrently; retry")]
    Contended(Uuid),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl MigrationError {
    /// For exit codes and retries. A route of another tenant is the caller's bug, not the
    /// operator's request: internal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound(_) | Self::Illegal { .. } | Self::SameStore(_) => ErrorKind::Client,
            Self::AlreadyActive { .. }
            | Self::StateChanged { .. }
            | Self::ClaimLost { .. }
            | Self::RouteChanged { .. }
            | Self::DefaultChanged { .. }
            | Self::DefaultInUse { .. } => ErrorKind::Conflict,
            Self::Contended(_) => ErrorKind::Unavailable,
            Self::RouteOfOtherTenant { .. } => ErrorKind::Internal,
            Self::Store(e) => e.kind(),
        }
    }

    /// Whether the same request, later, can help.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

impl From<sqlx::Error> for MigrationError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.into())
    }
}

/// A `tenant_migrations` row.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MigrationRecord {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub source_store_id: String,
    pub target_store_id: String,
    pub state: MigrationState,
    /// The phase a paused migration resumes to; `Some` exactly while paused.
    pub paused_from: Option<MigrationState>,
    pub events_total: i64,
    pub events_copied: i64,
    /// PostgreSQL: the bulk copy's xid8 watermark; SQLite: its last global_position.
    pub copy_horizon: Option<i64>,
    /// The last source global_position the bulk copy checkpointed.
    pub copy_position: Option<i64>,
    /// PostgreSQL: the xid8 watermark the tail has copied below; SQLite: a global_position.
    pub tail_horizon: Option<i64>,
    /// The last source global_position the current tail pass checkpointed.
    pub tail_position: Option<i64>,
    pub error_message: Option<String>,
    /// The options the migration was started with (batch size, rate, cutover mode, …).
    pub config: Value,
    /// Counts every change of the row but claims, so a watcher can tell that something moved.
    pub revision: i64,
    pub claimed_by: Option<String>,
    pub claimed_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Set by `complete` on a migrated migration: the store the tenant left is no longer kept
    /// current (no undo any more). `completed_at` stays the cutover's time.
    pub finished_at: Option<DateTime<Utc>>,
}

impl MigrationRecord {
    pub fn phase(&self) -> Phase {
        Phase {
            state: self.state,
            paused_from: self.paused_from,
        }
    }

    pub fn is_active(&self) -> bool {
        !self.state.is_terminal()
    }

    /// Whether the bulk copy has reached its horizon.
    pub fn copy_done(&self) -> bool {
        matches!(
            self.state,
            MigrationState::DualWrite | MigrationState::Cutover | MigrationState::Migrated
        ) || self.paused_from == Some(MigrationState::DualWrite)
    }

    /// Bulk-copy progress, 0 to 100.
    #[allow(clippy::cast_precision_loss)] // event counts stay far below 2^52
    pub fn progress_percentage(&self) -> f64 {
        if self.events_total <= 0 {
            return if self.copy_done() { 100.0 } else { 0.0 };
        }
        (self.events_copied as f64 * 100.0 / self.events_total as f64).clamp(0.0, 100.0)
    }

    /// Whether the migration keeps the store the tenant left current after its cutover
    /// (`reverse` in its options, written by `migrate start` unless `--no-reverse`).
    pub fn reverse_replication(&self) -> bool {
        self.config.get("reverse") == Some(&Value::Bool(true))
    }

    /// The migration this one reverts (`revert MIGRATION`: `reverts` in its options), if any.
    pub fn reverts(&self) -> Option<Uuid> {
        self.config
            .get("reverts")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
    }

    /// The route of this migration's tenant while the migration is in `state`: `normal` on the
    /// target once migrated, `normal` on the source before it starts and after it failed or
    /// rolled back, and otherwise the state's routing on the source with the target and this
    /// migration named. A revert that ends without its cutover gives the tenant back the
    /// reverse replication it interrupted: `normal` on its source with its target (the store
    /// the reverted migration left) still kept current.
    pub fn implied_route(&self, state: MigrationState) -> RouteUpdate {
        match state.routing_state() {
            // With reverse replication, the route keeps the store the tenant left as its
            // target: proxies mirror the tenant's appends back to it, as copiers.
            RoutingState::Normal if state == MigrationState::Migrated => RouteUpdate {
                target_store_id: self
                    .reverse_replication()
                    .then(|| self.source_store_id.clone()),
                ..RouteUpdate::normal(self.tenant_id, &self.target_store_id)
            },
            RoutingState::Normal
                if matches!(state, MigrationState::RolledBack | MigrationState::Failed)
                    && self.reverts().is_some()
                    && self.reverse_replication() =>
            {
                RouteUpdate {
                    target_store_id: Some(self.target_store_id.clone()),
                    ..RouteUpdate::normal(self.tenant_id, &self.source_store_id)
                }
            }
            RoutingState::Normal => RouteUpdate::normal(self.tenant_id, &self.source_store_id),
            routing => RouteUpdate {
                tenant_id: self.tenant_id,
                store_id: self.source_store_id.clone(),
                migration_state: routing,
                target_store_id: Some(self.target_store_id.clone()),
                active_migration_id: Some(self.id),
            },
        }
    }
}

/// What [`ControlDb::create_migration`] needs.
#[derive(Debug, Clone)]
pub struct NewMigration {
    pub tenant_id: Uuid,
    pub source_store_id: String,
    pub target_store_id: String,
    pub config: Value,
    /// The epoch of the tenant's routing row when the caller chose the source (0: no row).
    /// The creation is refused with [`MigrationError::RouteChanged`] if the route changed
    /// since; `None` skips the check.
    pub route_epoch: Option<i64>,
    /// Created already claimed by this worker for this lease (a foreground `migrate start`
    /// that drives it at once), so no `serve` replica takes it in between.
    pub claim: Option<(String, Duration)>,
}

/// A state change that happened.
#[derive(Debug, Clone)]
pub struct Transitioned {
    pub record: MigrationRecord,
    /// The routing epoch the route was written under, when a route was given.
    pub routing_epoch: Option<i64>,
}

/// The states no action leaves, as SQL; must match [`MigrationState::is_terminal`] and the
/// unique index in the DDL.
pub(super) const TERMINAL: &str = "('migrated', 'failed', 'rolled_back')";

/// The recorded default store.
const SELECT_DEFAULT: &str = "SELECT value FROM switchyard_settings WHERE name = 'default_store'";

pub(super) const COLUMNS: &str =
    "id, tenant_id, source_store_id, target_store_id, state, paused_from, \
     events_total, events_copied, copy_horizon, copy_position, tail_horizon, tail_position, \
     error_message, config, revision, claimed_by, claimed_until, created_at, started_at, \
     completed_at, updated_at, finished_at";

pub(super) fn decode_migration(row: &impl Columns) -> Result<MigrationRecord, StoreError> {
    Ok(MigrationRecord {
        id: row.uuid("id")?,
        tenant_id: row.uuid("tenant_id")?,
        source_store_id: row.text("source_store_id")?,
        target_store_id: row.text("target_store_id")?,
        state: row.state("state")?,
        paused_from: row.opt_state("paused_from")?,
        events_total: row.int("events_total")?,
        events_copied: row.int("events_copied")?,
        copy_horizon: row.opt_int("copy_horizon")?,
        copy_position: row.opt_int("copy_position")?,
        tail_horizon: row.opt_int("tail_horizon")?,
        tail_position: row.opt_int("tail_position")?,
        error_message: row.opt_text("error_message")?,
        config: row.opt_json("config")?.unwrap_or(Value::Null),
        revision: row.int("revision")?,
        claimed_by: row.opt_text("claimed_by")?,
        claimed_until: row.opt_time("claimed_until")?,
        created_at: row.time("created_at")?,
        started_at: row.opt_time("started_at")?,
        completed_at: row.opt_time("completed_at")?,
        updated_at: row.time("updated_at")?,
        finished_at: row.opt_time("finished_at")?,
    })
}

/// How often `create_migration` retries when the unique index refuses it but the migration
/// that held the slot has ended by the time we look.
const CREATE_ATTEMPTS: usize = 5;

impl ControlDb {
    /// Creates a `pending` migration and its `create` audit row. Refused with
    /// [`MigrationError::AlreadyActive`] while the tenant has a non-terminal migration; the
    /// database decides, so of two racing creators exactly one wins.
    pub async fn create_migration(
        &self,
        new: &NewMigration,
        note: &AuditNote,
    ) -> Result<MigrationRecord, MigrationError> {
        if new.source_store_id == new.target_store_id {
            return Err(MigrationError::SameStore(new.source_store_id.clone()));
        }
        for _ in 0..CREATE_ATTEMPTS {
            let id = Uuid::now_v7();
            let created = on_backend!(self, |pool, d| {
                let mut tx = d.begin(pool).await?;
                let sql = format!(
                    "INSERT INTO tenant_migrations (id, tenant_id, source_store_id,
                         target_store_id, state, config, claimed_by, claimed_until,
                         created_at, updated_at)
                     VALUES ($1, $2, $3, $4, 'pending', $5, $6,
                         CASE WHEN $6 IS NULL THEN NULL ELSE {until} END, {now}, {now})
                     RETURNING {COLUMNS}",
                    until = d.now_plus("$7"),
                    now = d.now()
                );
                let inserted = sqlx::query(&sql)
                    .bind(d.id(id))
                    .bind(d.id(new.tenant_id))
                    .bind(&new.source_store_id)
                    .bind(&new.target_store_id)
                    .bind(&new.config)
                    .bind(new.claim.as_ref().map(|(worker, _)| worker.as_str()))
                    .bind(
                        new.claim
                            .as_ref()
                            .map_or(0.0, |(_, lease)| lease.as_secs_f64()),
                    )
                    .fetch_one(&mut *tx)
                    .await;
                match inserted {
                    Ok(row) => {
                        if let Some(expected) = new.route_epoch {
                            // After the insert (which may wait for a racing end of the
                            // tenant's last migration, whose transaction takes the epoch row
                            // last): the epoch row, then the route as it is now. A routing
                            // change either committed before (seen here) or waits for this
                            // transaction and then sees the migration and refuses.
                            sqlx::query(d.lock_routing_epoch())
                                .fetch_one(&mut *tx)
                                .await?;
                            let actual: Option<i64> = sqlx::query_scalar(
                                "SELECT epoch FROM tenant_routing WHERE tenant_id = $1",
                            )
                            .bind(d.id(new.tenant_id))
                            .fetch_optional(&mut *tx)
                            .await?;
                            if actual.unwrap_or(0) != expected {
                                return Err(MigrationError::RouteChanged {
                                    tenant_id: new.tenant_id,
                                    expected,
                                    actual: actual.unwrap_or(0),
                                });
                            }
                            // No row: the tenant lives in the recorded default store.
                            let default: Option<String> = sqlx::query_scalar(SELECT_DEFAULT)
                                .fetch_optional(&mut *tx)
                                .await?;
                            if let (None, Some(default)) = (actual, default) {
                                if default != new.source_store_id {
                                    return Err(MigrationError::DefaultChanged {
                                        tenant_id: new.tenant_id,
                                        source_store_id: new.source_store_id.clone(),
                                        default,
                                    });
                                }
                            }
                        }
                        let record = decode_migration(&row)?;
                        d.insert_audit(
                            &mut tx,
                            &NewAuditRow {
                                migration_id: id,
                                tenant_id: new.tenant_id,
                                action: "create",
                                from_state: None,
                                to_state: Some(MigrationState::Pending),
                                note,
                            },
                        )
                        .await?;
                        tx.commit().await?;
                        Some(record)
                    }
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => None,
                    Err(e) => return Err(e.into()),
                }
            });
            if let Some(record) = created {
                return Ok(record);
            }
            if let Some(existing) = self.active_migration(new.tenant_id).await? {
                return Err(MigrationError::AlreadyActive {
                    tenant_id: new.tenant_id,
                    existing_id: existing.id,
                    state: existing.state,
                });
            }
        }
        Err(MigrationError::Contended(new.tenant_id))
    }

    /// One migration.
    pub async fn migration(&self, id: Uuid) -> Result<MigrationRecord, MigrationError> {
        let sql = format!("SELECT {COLUMNS} FROM tenant_migrations WHERE id = $1");
        let record = on_backend!(self, |pool, d| {
            sqlx::query(&sql)
                .bind(d.id(id))
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_migration)
                .transpose()?
        });
        record.ok_or(MigrationError::NotFound(id))
    }

    /// The tenant's non-terminal migration, if it has one.
    pub async fn active_migration(
        &self,
        tenant_id: Uuid,
    ) -> Result<Option<MigrationRecord>, MigrationError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tenant_migrations
             WHERE tenant_id = $1 AND state NOT IN {TERMINAL}"
        );
        Ok(on_backend!(self, |pool, d| {
            sqlx::query(&sql)
                .bind(d.id(tenant_id))
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_migration)
                .transpose()?
        }))
    }

    /// Migrations, oldest first; only non-terminal ones when `active_only`.
    pub async fn migrations(
        &self,
        active_only: bool,
    ) -> Result<Vec<MigrationRecord>, MigrationError> {
        let filter = if active_only {
            format!("WHERE state NOT IN {TERMINAL}")
        } else {
            String::new()
        };
        let sql =
            format!("SELECT {COLUMNS} FROM tenant_migrations {filter} ORDER BY created_at, id");
        Ok(on_backend!(self, |pool, _d| {
            sqlx::query(&sql)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_migration)
                .collect::<Result<Vec<_>, _>>()?
        }))
    }

    /// The migrations of `tenant`, oldest first (by the `(tenant_id, created_at)` index).
    pub async fn migrations_of(
        &self,
        tenant: Uuid,
    ) -> Result<Vec<MigrationRecord>, MigrationError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tenant_migrations WHERE tenant_id = $1 ORDER BY created_at, id"
        );
        Ok(on_backend!(self, |pool, d| {
            sqlx::query(&sql)
                .bind(d.id(tenant))
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_migration)
                .collect::<Result<Vec<_>, _>>()?
        }))
    }

    /// Applies `action` to migration `id` if it is still in `expected`, in one transaction:
    /// the compare-and-set of the state, `started_at` / `completed_at`, the audit row, and —
    /// when `route` is given — the tenant's route under the next routing epoch (NOTIFYed on
    /// PostgreSQL, as [`ControlDb::set_route`] does). A `fail` records the reason as the
    /// migration's error; reaching a terminal state releases the worker claim.
    ///
    /// Refused, with nothing written: [`MigrationError::NotFound`], [`MigrationError::StateChanged`]
    /// when the stored state is not `expected` (or changed under us), and
    /// [`MigrationError::Illegal`] when the lifecycle does not allow `action` there.
    pub async fn transition(
        &self,
        id: Uuid,
        expected: MigrationState,
        action: Action,
        note: &AuditNote,
        route: Option<&RouteUpdate>,
    ) -> Result<Transitioned, MigrationError> {
        let select = format!("SELECT {COLUMNS} FROM tenant_migrations WHERE id = $1");
        on_backend!(self, |pool, d| {
            let mut tx = d.begin(pool).await?;
            let current = sqlx::query(&select)
                .bind(d.id(id))
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(decode_migration)
                .transpose()?
                .ok_or(MigrationError::NotFound(id))?;
            if current.state != expected {
                return Err(MigrationError::StateChanged {
                    id,
                    expected,
                    actual: current.state,
                });
            }
            let after = lifecycle::next(current.phase(), action)
                .map_err(|refused| MigrationError::Illegal { id, refused })?;
            if let Some(route) = route {
                if route.tenant_id != current.tenant_id {
                    return Err(MigrationError::RouteOfOtherTenant {
                        id,
                        tenant_id: current.tenant_id,
                        route_tenant: route.tenant_id,
                    });
                }
            }
            let terminal = after.state.is_terminal();
            let error = if action == Action::Fail {
                note.reason.as_deref()
            } else {
                None
            };
            // The state (and paused phase) read above is the compare half of the
            // compare-and-set: on PostgreSQL a racing change that commits first makes this
            // match nothing; SQLite's write lock already excludes one.
            let update = format!(
                "UPDATE tenant_migrations SET state = $3, paused_from = $4,
                     started_at = CASE WHEN $5 THEN COALESCE(started_at, {now}) ELSE started_at END,
                     completed_at = CASE WHEN $6 THEN {now} ELSE completed_at END,
                     claimed_by = CASE WHEN $6 THEN NULL ELSE claimed_by END,
                     claimed_until = CASE WHEN $6 THEN NULL ELSE claimed_until END,
                     error_message = COALESCE($7, error_message),
                     revision = revision + 1, updated_at = {now}
                 WHERE id = $1 AND state = $2 AND paused_from IS NOT DISTINCT FROM $8
                 RETURNING {COLUMNS}",
                now = d.now()
            );
            let updated = sqlx::query(&update)
                .bind(d.id(id))
                .bind(expected.as_str())
                .bind(after.state.as_str())
                .bind(after.paused_from.map(MigrationState::as_str))
                .bind(action == Action::StartCopy)
                .bind(terminal)
                .bind(error)
                .bind(current.paused_from.map(MigrationState::as_str))
                .fetch_optional(&mut *tx)
                .await?;
            let Some(row) = updated else {
                let actual: String =
                    sqlx::query_scalar("SELECT state FROM tenant_migrations WHERE id = $1")
                        .bind(d.id(id))
                        .fetch_one(&mut *tx)
                        .await?;
                return Err(MigrationError::StateChanged {
                    id,
                    expected,
                    actual: actual
                        .parse()
                        .map_err(|e| StoreError::Corrupt(format!("state: {e}")))?,
                });
            };
            let record = decode_migration(&row)?;
            d.insert_audit(
                &mut tx,
                &NewAuditRow {
                    migration_id: id,
                    tenant_id: record.tenant_id,
                    action: action.as_str(),
                    from_state: Some(current.state),
                    to_state: Some(record.state),
                    note,
                },
            )
            .await?;
            // Last: the routing write holds the epoch row's lock until commit.
            let routing_epoch = match route {
                Some(route) => Some(d.write_route(&mut tx, route).await?),
                None => None,
            };
            tx.commit().await?;
            Ok(Transitioned {
                record,
                routing_epoch,
            })
        })
    }

    /// Routes a tenant by hand (`routing set`). Refused with [`MigrationError::AlreadyActive`]
    /// while the tenant has a migration that is not over, checked in the transaction that
    /// writes the route, after taking the routing epoch's lock: a migration created at the
    /// same time is either seen here or sees this route's new epoch and refuses itself.
    pub async fn set_route_by_hand(&self, update: &RouteUpdate) -> Result<i64, MigrationError> {
        let active = format!(
            "SELECT {COLUMNS} FROM tenant_migrations WHERE tenant_id = $1 AND state NOT IN {TERMINAL}"
        );
        on_backend!(self, |pool, d| {
            let mut tx = d.begin(pool).await?;
            sqlx::query(d.lock_routing_epoch())
                .fetch_one(&mut *tx)
                .await?;
            let existing = sqlx::query(&active)
                .bind(d.id(update.tenant_id))
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(decode_migration)
                .transpose()?;
            if let Some(existing) = existing {
                return Err(MigrationError::AlreadyActive {
                    tenant_id: update.tenant_id,
                    existing_id: existing.id,
                    state: existing.state,
                });
            }
            let epoch = d.write_route(&mut tx, update).await?;
            tx.commit().await?;
            Ok(epoch)
        })
    }

    /// The default store recorded in the control database: where every tenant without a
    /// routing row lives. `None` before `init` recorded one (or before the schema has the
    /// settings table).
    pub async fn default_store(&self) -> Result<Option<String>, StoreError> {
        let found: Result<Option<String>, sqlx::Error> = on_backend!(self, |pool, _d| {
            sqlx::query_scalar(SELECT_DEFAULT)
                .fetch_optional(pool)
                .await
        });
        match found {
            Ok(found) => Ok(found),
            // An older schema (the binaries upgraded before `init` ran): nothing recorded.
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("42P01")
                    || e.message().contains("no such table") =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records `store` as the default store unless one is recorded already; returns the one
    /// recorded now (which differs from `store` when another was recorded first).
    pub async fn record_default_store(&self, store: &str) -> Result<String, StoreError> {
        let recorded: String = on_backend!(self, |pool, d| {
            let sql = format!(
                "INSERT INTO switchyard_settings (name, value, updated_at)
                 VALUES ('default_store', $1, {now}) ON CONFLICT (name) DO NOTHING",
                now = d.now()
            );
            sqlx::query(&sql).bind(store).execute(pool).await?;
            sqlx::query_scalar(SELECT_DEFAULT).fetch_one(pool).await?
        });
        Ok(recorded)
    }

    /// Changes the recorded default store (`routing set-default`), which moves every tenant
    /// without a routing row — and moves no data. Refused with
    /// [`MigrationError::DefaultInUse`] while such a tenant has a migration that is not over
    /// (checked after the routing epoch's lock, as [`Self::set_route_by_hand`] does); bumps the
    /// routing epoch (NOTIFYed on PostgreSQL) so proxies reload. Returns that epoch.
    pub async fn change_default_store(&self, store: &str) -> Result<i64, MigrationError> {
        let rowless = format!(
            "SELECT {COLUMNS} FROM tenant_migrations m WHERE state NOT IN {TERMINAL}
               AND NOT EXISTS (SELECT 1 FROM tenant_routing r WHERE r.tenant_id = m.tenant_id)
             ORDER BY created_at LIMIT 1"
        );
        on_backend!(self, |pool, d| {
            let mut tx = d.begin(pool).await?;
            sqlx::query(d.lock_routing_epoch())
                .fetch_one(&mut *tx)
                .await?;
            let blocking = sqlx::query(&rowless)
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(decode_migration)
                .transpose()?;
            if let Some(m) = blocking {
                return Err(MigrationError::DefaultInUse {
                    tenant_id: m.tenant_id,
                    migration_id: m.id,
                    state: m.state,
                });
            }
            let sql = format!(
                "INSERT INTO switchyard_settings (name, value, updated_at)
                 VALUES ('default_store', $1, {now})
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value,
                     updated_at = excluded.updated_at",
                now = d.now()
            );
            sqlx::query(&sql).bind(store).execute(&mut *tx).await?;
            let epoch: i64 = sqlx::query_scalar(
                "UPDATE switchyard_routing_epoch SET epoch = epoch + 1 RETURNING epoch",
            )
            .fetch_one(&mut *tx)
            .await?;
            d.notify_routing(&mut tx, epoch).await?;
            tx.commit().await?;
            Ok(epoch)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_terminal_sql_list_matches_the_lifecycle() {
        let terminal: Vec<String> = MigrationState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .map(|s| format!("'{s}'"))
            .collect();
        assert_eq!(TERMINAL, format!("({})", terminal.join(", ")));
        for ddl in [
            include_str!("../../sql/control-postgresql.sql"),
            include_str!("../../sql/control-sqlite.sql"),
        ] {
            assert!(ddl.contains(&format!("WHERE state NOT IN {TERMINAL}")));
        }
    }

    fn record(state: MigrationState) -> MigrationRecord {
        let now = Utc::now();
        MigrationRecord {
            id: Uuid::new_v4(),
            tenant_id: Uuid::new_v4(),
            source_store_id: "shared".to_owned(),
            target_store_id: "dedicated".to_owned(),
            state,
            paused_from: (state == MigrationState::Paused).then_some(MigrationState::DualWrite),
            events_total: 0,
            events_copied: 0,
            copy_horizon: None,
            copy_position: None,
            tail_horizon: None,
            tail_position: None,
            error_message: None,
            config: Value::Null,
            revision: 0,
            claimed_by: None,
            claimed_until: None,
            created_at: now,
            started_at: None,
            completed_at: None,
            updated_at: now,
            finished_at: None,
        }
    }

    #[test]
    fn implied_routes_point_at_the_right_store() {
        let r = record(MigrationState::DualWrite);
        let route = r.implied_route(MigrationState::DualWrite);
        assert_eq!(route.store_id, "shared");
        assert_eq!(route.migration_state, RoutingState::DualWrite);
        assert_eq!(route.target_store_id.as_deref(), Some("dedicated"));
        assert_eq!(route.active_migration_id, Some(r.id));

        let paused = r.implied_route(MigrationState::Paused);
        assert_eq!(paused.migration_state, RoutingState::BulkCopy);
        assert_eq!(paused.active_migration_id, Some(r.id));

        let migrated = r.implied_route(MigrationState::Migrated);
        assert_eq!(migrated.store_id, "dedicated");
        assert_eq!(migrated.migration_state, RoutingState::Normal);
        assert_eq!(migrated.active_migration_id, None);

        for state in [MigrationState::RolledBack, MigrationState::Failed] {
            let back = r.implied_route(state);
            assert_eq!(back.store_id, "shared");
            assert_eq!(back.migration_state, RoutingState::Normal);
            assert_eq!(back.target_store_id, None);
        }
    }

    #[test]
    fn a_revert_that_ends_without_its_cutover_gives_back_the_reverse_replication() {
        let mut r = record(MigrationState::DualWrite);
        let reverted = Uuid::new_v4();
        r.config = serde_json::json!({ "reverse": true, "reverts": reverted.to_string() });
        assert_eq!(r.reverts(), Some(reverted));
        for state in [MigrationState::RolledBack, MigrationState::Failed] {
            let back = r.implied_route(state);
            assert_eq!(back.store_id, "shared");
            assert_eq!(back.migration_state, RoutingState::Normal);
            assert_eq!(
                back.target_store_id.as_deref(),
                Some("dedicated"),
                "the store the reverted migration left is kept current again"
            );
            assert_eq!(back.active_migration_id, None);
        }
        let migrated = r.implied_route(MigrationState::Migrated);
        assert_eq!(migrated.store_id, "dedicated");
        assert_eq!(migrated.target_store_id.as_deref(), Some("shared"));
        // Not a revert: an abort ends every mirror.
        r.config = serde_json::json!({ "reverse": true });
        assert_eq!(r.reverts(), None);
        assert_eq!(
            r.implied_route(MigrationState::RolledBack).target_store_id,
            None
        );
    }

    #[test]
    fn progress_is_a_percentage_of_the_copy() {
        let mut r = record(MigrationState::BulkCopy);
        assert!(r.progress_percentage().abs() < f64::EPSILON);
        r.events_total = 200;
        r.events_copied = 50;
        assert!((r.progress_percentage() - 25.0).abs() < 1e-9);
        let empty_done = record(MigrationState::Paused);
        assert!((empty_done.progress_percentage() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn errors_know_their_kind() {
        let id = Uuid::new_v4();
        assert_eq!(MigrationError::NotFound(id).kind(), ErrorKind::Client);
        let changed = MigrationError::StateChanged {
            id,
            expected: MigrationState::BulkCopy,
            actual: MigrationState::Paused,
        };
        assert_eq!(changed.kind(), ErrorKind::Conflict);
        assert!(changed
            .to_string()
            .starts_with(&format!("migration {id} is paused, not bulk_copy")));
        assert!(MigrationError::Contended(id).is_retryable());
        let other = MigrationError::RouteOfOtherTenant {
            id,
            tenant_id: Uuid::new_v4(),
            route_tenant: Uuid::new_v4(),
        };
        assert_eq!(other.kind(), ErrorKind::Internal);
        let held = MigrationError::Store(StoreError::Held("pid 7".to_owned()));
        assert_eq!(held.kind(), ErrorKind::Conflict);
        assert!(!held.is_retryable());
    }
}
