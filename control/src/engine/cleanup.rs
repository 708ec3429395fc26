//! The end of a migration (issue 19): `complete` records that the store the tenant left is no
//! longer kept current (`finished_at`), and a cleanup deletes the tenant's rows from a store it
//! no longer uses — the source of a completed migration, or the target of an aborted or failed
//! one — in throttled batches, resumable after a crash.
//!
//! A cleanup is refused while the tenant is routed to that store (as its store or as a
//! migration's target) or a migration of the tenant uses it; a target's cleanup also while any
//! migration of the tenant is active. The check is repeated before every batch. Only rows of
//! the tenant are ever deleted (`EventStore::delete_tenant_batch`), and never its fence row, so
//! stale proxies and direct writers stay refused in that store.

use std::time::Duration;

use switchyard_store::MigrationState;
use switchyard_store::{AuditNote, CleanupRecord, CleanupRole, CleanupState, MigrationRecord};
use tokio::sync::watch;
use uuid::Uuid;

use super::{Engine, EngineError, CLAIM_LEASE};
use crate::fault::crash_point;

/// Why [`Engine::run_cleanup`] returned.
#[derive(Debug, Clone, PartialEq)]
pub enum CleanupDriven {
    /// Every row of the tenant in that store is gone.
    Done(CleanupRecord),
    /// The stop signal arrived; the next driver continues.
    Stopped,
    /// Another process holds the cleanup's claim.
    ClaimLost,
}

impl Engine {
    /// `complete MIGRATION`: a `migrated` migration is finished (`finished_at` set, audited as
    /// `complete`); the store the tenant left is no longer kept current. Idempotent: a finished
    /// migration is returned as it is, with false. With `cleanup`, the cleanup's conditions
    /// are checked first, so a refused `complete --cleanup` changes nothing.
    pub async fn complete(
        &self,
        id: Uuid,
        cleanup: bool,
        note: &AuditNote,
    ) -> Result<(MigrationRecord, bool), EngineError> {
        let record = self.control.migration(id).await?;
        // A reverted migration's store is the tenant's again (its revert's reverse replication
        // keeps the other current); one being reverted is its revert's until that ends.
        if record.state == MigrationState::Migrated {
            if let Some(revert) = self.revert_of(&record).await? {
                return Err(EngineError::Refused(super::revert::reverted_refusal(
                    &record, &revert,
                )));
            }
        }
        if record.state != MigrationState::Migrated {
            let hint = match record.state {
                MigrationState::RolledBack | MigrationState::Failed => format!(
                    "; its tenant never left {}: `switchyard-control cleanup {id}` deletes what it \
                     put in {}",
                    record.source_store_id, record.target_store_id
                ),
                _ => format!("; cut it over first (`switchyard-control cutover {id}`) or abort it"),
            };
            return Err(EngineError::Refused(format!(
                "migration {id} is {}: complete applies only to a migrated migration{hint}",
                record.state
            )));
        }
        // Reverse replication ends first: the route no longer names the store the tenant left
        // (which the cleanup's check requires), and that store's fence admits nobody.
        self.end_reverse_replication(&record).await?;
        if cleanup && record.finished_at.is_none() {
            self.check_cleanup_allowed(&record, CleanupRole::Source)
                .await?;
        }
        Ok(self.control.finish_migration(id, note).await?)
    }

    /// Which store `cleanup MIGRATION` empties of the tenant: an aborted or failed migration's
    /// target, or a completed migration's source.
    pub fn cleanup_role(record: &MigrationRecord) -> Result<CleanupRole, EngineError> {
        let id = record.id;
        match record.state {
            MigrationState::RolledBack | MigrationState::Failed => Ok(CleanupRole::Target),
            MigrationState::Migrated if record.finished_at.is_some() => Ok(CleanupRole::Source),
            MigrationState::Migrated => Err(EngineError::Refused(format!(
                "migration {id} is migrated but not completed: {} may still be kept current for \
                 an undo; `switchyard-control complete {id} --cleanup` ends that and deletes the \
                 tenant's rows there",
                record.source_store_id
            ))),
            state => Err(EngineError::Refused(format!(
                "migration {id} is {state}: a cleanup applies only to a migration that is over \
                 (rolled_back or failed: its target; migrated and completed: its source)"
            ))),
        }
    }

    /// Records the start of `record`'s cleanup of its `role` store (checking that it is
    /// allowed and counting the tenant's rows there), or returns the one already recorded.
    pub async fn start_cleanup(
        &self,
        record: &MigrationRecord,
        role: CleanupRole,
        note: &AuditNote,
    ) -> Result<CleanupRecord, EngineError> {
        if let Some(existing) = self.control.cleanup(record.id).await? {
            return Ok(existing);
        }
        self.check_cleanup_allowed(record, role).await?;
        let store = self.store(cleanup_store(record, role))?;
        let total = store
            .count_tenant(record.tenant_id)
            .await
            .map_err(EngineError::store(store.id()))?;
        Ok(self
            .control
            .begin_cleanup(record, role, total, note)
            .await?)
    }

    /// Refused unless the tenant no longer uses `record`'s `role` store: not routed there (as
    /// its store, or as its migration's target), no active migration of the tenant from or to
    /// it, and for a target's cleanup no active migration of the tenant at all.
    async fn check_cleanup_allowed(
        &self,
        record: &MigrationRecord,
        role: CleanupRole,
    ) -> Result<(), EngineError> {
        let store_id = cleanup_store(record, role);
        self.store(store_id)?;
        let tenant = record.tenant_id;
        let route = self
            .control
            .route(tenant)
            .await
            .map_err(EngineError::store("control"))?;
        let routed_to = match &route {
            Some(r) if r.store_id == store_id => Some(format!("routed to {store_id}")),
            Some(r) if r.target_store_id.as_deref() == Some(store_id) => Some(format!(
                "migrating to {store_id} (routing state {})",
                r.migration_state
            )),
            Some(_) => None,
            None => (self.recorded_default_store().await? == store_id).then(|| {
                format!("without a routing row, so it lives in the default store {store_id}")
            }),
        };
        if let Some(why) = routed_to {
            return Err(EngineError::Refused(format!(
                "tenant {tenant} is still {why}: a cleanup deletes the tenant's rows only from a \
                 store it no longer uses"
            )));
        }
        if let Some(active) = self.control.active_migration(tenant).await? {
            let uses_it = active.source_store_id == store_id || active.target_store_id == store_id;
            if uses_it || role == CleanupRole::Target {
                return Err(EngineError::Refused(format!(
                    "tenant {tenant} has an active migration {} ({}, {} to {}): a cleanup of {store_id} \
                     waits until no migration of the tenant {}",
                    active.id,
                    active.state,
                    active.source_store_id,
                    active.target_store_id,
                    if role == CleanupRole::Target {
                        "is active"
                    } else {
                        "uses that store"
                    }
                )));
            }
        }
        Ok(())
    }

    /// Deletes the tenant's rows in the cleanup's store, `control.cleanup_batch_size` at a
    /// time with `control.cleanup_pause_ms` between batches, recording the count after each,
    /// until none are left, `stop` fires or another process holds the claim. A driver that
    /// starts (again) recounts first, so a batch deleted by a predecessor that died before
    /// recording it is counted.
    pub async fn run_cleanup(
        &self,
        id: Uuid,
        stop: &watch::Receiver<bool>,
        note: &AuditNote,
    ) -> Result<CleanupDriven, EngineError> {
        let cleanup = self.control.cleanup(id).await?.ok_or_else(|| {
            EngineError::Refused(format!("migration {id} has no cleanup started"))
        })?;
        if cleanup.state == CleanupState::Done {
            return Ok(CleanupDriven::Done(cleanup));
        }
        let pause = self.settings.cleanup_pause;
        let lease = CLAIM_LEASE + pause * 2;
        if !self.control.claim_cleanup(id, &self.worker, lease).await? {
            return Ok(CleanupDriven::ClaimLost);
        }
        let record = self.control.migration(id).await?;
        let store = self.store(&cleanup.store_id)?;
        let left = store
            .count_tenant(record.tenant_id)
            .await
            .map_err(EngineError::store(store.id()))?;
        let mut deleted = cleanup.rows_deleted.max(cleanup.rows_total - left);
        let batch = self.settings.cleanup_batch_size.max(1);
        loop {
            if *stop.borrow() {
                return Ok(CleanupDriven::Stopped);
            }
            if !self.control.claim_cleanup(id, &self.worker, lease).await? {
                return Ok(CleanupDriven::ClaimLost);
            }
            // Again before every batch: a route or a migration may have come back meanwhile.
            self.check_cleanup_allowed(&record, cleanup.role).await?;
            crate::fault::pause_point("cleanup_before_delete").await;
            let n = store
                .delete_tenant_batch(record.tenant_id, batch)
                .await
                .map_err(EngineError::store(store.id()))?;
            crash_point("cleanup_after_batch");
            self.metrics.cleanup_rows_deleted.inc_by(n);
            deleted += i64::try_from(n).unwrap_or(i64::MAX);
            // Fewer than a batch: the tenant had no more rows there when it ran.
            let done = n < u64::from(batch);
            let recorded = self
                .control
                .record_cleanup(id, &self.worker, deleted, done, note)
                .await?;
            if done {
                return Ok(CleanupDriven::Done(recorded));
            }
            let mut stop = stop.clone();
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|s| *s) => return Ok(CleanupDriven::Stopped),
            }
        }
    }

    /// Every migration whose cutover is older than `control.reverse_replication_hours` and not
    /// completed yet, completed (by `serve`). Returns the ids completed now; nothing when the
    /// setting is 0.
    pub async fn complete_expired(&self, note: &AuditNote) -> Result<Vec<Uuid>, EngineError> {
        let hours = self.settings.reverse_replication_hours;
        if hours <= 0.0 {
            return Ok(Vec::new());
        }
        let grace = Duration::from_secs_f64(hours * 3600.0);
        let mut done = Vec::new();
        for record in self.control.unfinished_older_than(grace).await? {
            let note = note.clone().with_details(serde_json::json!({
                "reverse_replication_hours": hours,
                "cutover_at": record.completed_at,
            }));
            // A reverted migration is finished by its revert; one being reverted is left to it
            // (ending reverse replication would close the revert's target to its copiers).
            if let Some(revert) = self.revert_of(&record).await? {
                if revert.state == MigrationState::Migrated {
                    self.finish_reverted(&record, &revert, &note).await?;
                }
                continue;
            }
            // As `complete` does: reverse replication ends first (the route loses the store the
            // tenant left, whose fence then admits nobody), or it would go on after the end.
            self.end_reverse_replication(&record).await?;
            if self.control.finish_migration(record.id, &note).await?.1 {
                done.push(record.id);
            }
        }
        Ok(done)
    }
}

/// The store a cleanup in `role` empties of the tenant.
fn cleanup_store(record: &MigrationRecord, role: CleanupRole) -> &str {
    match role {
        CleanupRole::Source => &record.source_store_id,
        CleanupRole::Target => &record.target_store_id,
    }
}
