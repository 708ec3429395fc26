//! The operator's actions on migrations: start, pause, resume, abort. Each is one
//! compare-and-set state change written with the tenant's route and an audit row; a second
//! operator racing the first gets a clear refusal.

use std::time::Duration;

use switchyard_store::control::Action;
use switchyard_store::{
    AuditNote, MigrationError, MigrationRecord, MigrationState, NewMigration, RoutingState,
    FENCE_MARGIN,
};
use uuid::Uuid;

use super::{CutoverMode, Engine, EngineError, MigrationOptions};

/// How long an abort waits for a running cutover to commit or roll back.
const ABORT_WAITS_FOR_CUTOVER: Duration = Duration::from_secs(30);

/// Collisions a refused `migrate start` lists at most.
const PREFLIGHT_LISTED: usize = 20;
/// Source events the preflight reads and looks up at a time.
const PREFLIGHT_PAGE: u32 = 5000;
/// The least an emergency stop waits for a cutover holding a tenant's fence before it gives up
/// on that tenant and names the holder.
const STOP_WAITS_FOR_FENCE: Duration = Duration::from_secs(15);

/// What emergency stop did for one tenant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stopped {
    pub tenant_id: Uuid,
    /// The store the tenant is routed to now (normal).
    pub store_id: String,
    pub failed_migration: Option<Uuid>,
    /// The migration this stop finished forward instead of failing it: its cutover had
    /// already moved the source fence to the target, so the target holds every acknowledged
    /// append (and appends may have been acknowledged there since).
    pub finished_migration: Option<Uuid>,
    /// What an operator should know about this tenant beyond the fields above.
    pub note: Option<String>,
    /// Whether a moved fence in that store was opened again.
    pub reopened_fence: bool,
    /// What could not be done for this tenant (the other tenants are stopped regardless).
    pub error: Option<String>,
}

/// What `migrate start` asks for.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub tenant_id: Uuid,
    pub target_store_id: String,
    pub batch_size: Option<u32>,
    pub max_rate: Option<u64>,
    pub reset_target: bool,
    pub cutover: CutoverMode,
    /// `--no-reverse`: no reverse replication after the cutover, whatever
    /// `control.reverse_replication` says.
    pub no_reverse: bool,
    /// The caller drives the migration itself right away (a foreground `migrate start`): it is
    /// created claimed by this engine's worker, so no `serve` replica takes it first.
    pub drive: bool,
}

impl Engine {
    /// Creates a migration of the tenant from the store it lives in now to the target.
    /// Refused when the tenant is already migrating, the target is its current store, the
    /// target already holds events of the tenant (unless `reset_target`, which deletes them,
    /// and only them), or the target holds another tenant's stream or event under an id of
    /// the tenant's (the preflight names them).
    pub async fn start(
        &self,
        request: &StartRequest,
        note: &AuditNote,
    ) -> Result<MigrationRecord, EngineError> {
        let target = self.store(&request.target_store_id)?;
        let route = self
            .control
            .route(request.tenant_id)
            .await
            .map_err(EngineError::store("control"))?;
        // What the source was chosen from; the creation compares it again in its transaction.
        let route_epoch = route.as_ref().map_or(0, |r| r.epoch);
        let source_id = match &route {
            Some(r) if r.migration_state != RoutingState::Normal => {
                return Err(EngineError::Refused(format!(
                    "tenant {} is already migrating (routing state {}, migration {}); see `switchyard-control status`",
                    request.tenant_id,
                    r.migration_state,
                    r.active_migration_id.map_or_else(|| "?".to_owned(), |m| m.to_string())
                )))
            }
            Some(r) => r.store_id.clone(),
            None => self.recorded_default_store().await?,
        };
        self.store(&source_id)?;
        if source_id == request.target_store_id {
            return Err(EngineError::Refused(format!(
                "tenant {} already lives in store {source_id}",
                request.tenant_id
            )));
        }
        // A cleanup still deleting the tenant's rows from either store would delete what this
        // migration copies (or reads): let it finish first.
        if let Some(why) = self
            .cleanup_in_the_way(request.tenant_id, &source_id, &request.target_store_id)
            .await?
        {
            return Err(EngineError::Refused(why));
        }
        let existing = target
            .count_tenant(request.tenant_id)
            .await
            .map_err(EngineError::store(target.id()))?;
        if existing > 0 && !request.reset_target {
            return Err(EngineError::Refused(format!(
                "store {} already holds {existing} events of tenant {} (left by an earlier migration?); \
                 start again with --reset-target to delete them first",
                request.target_store_id, request.tenant_id
            )));
        }
        // Stream and event ids are unique per store only: the target may hold another
        // tenant's stream or event under one of ours (by accident, or a hostile tenant's
        // doing). Copying would splice our events onto its stream or count its event as ours.
        let collisions = self
            .foreign_collisions(self.store(&source_id)?, target, request.tenant_id)
            .await?;
        if !collisions.is_empty() {
            return Err(EngineError::Refused(format!(
                "store {} holds rows of other tenants that collide with tenant {}'s in {source_id}: {}{}; \
                 a migration never changes another tenant's rows (--reset-target deletes only this tenant's), \
                 so these must be resolved first",
                request.target_store_id,
                request.tenant_id,
                collisions.join(", "),
                if collisions.len() >= PREFLIGHT_LISTED { ", …" } else { "" }
            )));
        }
        let batch_size = request.batch_size.unwrap_or(self.settings.batch_size);
        if batch_size == 0 {
            return Err(EngineError::Refused("--batch-size must be > 0".to_owned()));
        }
        // The tenant's last migration may still keep the store it left current (its route
        // `normal` with that store as target): the proxies' reverse mirror and the reverse tail
        // write there with copier rights. A new migration must not run beside them (its
        // `--reset-target` would delete what they keep writing, and their writes would meet its
        // copy): that reverse replication ends first, audited, as `complete` ends it.
        let route_epoch = match &route {
            Some(r) if r.target_store_id.is_some() => {
                self.end_previous_reverse_replication(r, note).await?;
                self.control
                    .route(request.tenant_id)
                    .await
                    .map_err(EngineError::store("control"))?
                    .map_or(0, |r| r.epoch)
            }
            _ => route_epoch,
        };
        let options = MigrationOptions {
            batch_size,
            max_rate: request.max_rate.unwrap_or(self.settings.max_rate),
            cutover: request.cutover,
            reset_target: request.reset_target,
            reverse: self.settings.reverse_replication && !request.no_reverse,
            reverts: None,
        };
        crate::fault::pause_point("migrate_start_before_insert").await;
        let record = self
            .control
            .create_migration(
                &NewMigration {
                    tenant_id: request.tenant_id,
                    source_store_id: source_id,
                    target_store_id: request.target_store_id.clone(),
                    config: serde_json::to_value(&options).unwrap_or_default(),
                    route_epoch: Some(route_epoch),
                    claim: request
                        .drive
                        .then(|| (self.worker.clone(), super::CLAIM_LEASE)),
                },
                note,
            )
            .await?;
        // Again now that the migration is recorded: a cleanup recorded after the check above
        // checked for migrations before this one existed, and may be about to delete a batch
        // from the target this migration copies into. Recording first and checking second on
        // both sides means at least one of the two sees the other; this one stands down.
        if let Some(why) = self
            .cleanup_in_the_way(
                request.tenant_id,
                &record.source_store_id,
                &record.target_store_id,
            )
            .await?
        {
            let note = note
                .clone()
                .with_details(serde_json::json!({ "reason": why }));
            self.change(&record, Action::Abort, MigrationState::RolledBack, &note)
                .await?;
            return Err(EngineError::Refused(format!(
                "{why} (it started while migration {} was being recorded, which is rolled back)",
                record.id
            )));
        }
        if existing > 0 {
            // Only now: the migration row makes sure nobody else is using this tenant's target.
            let deleted = target
                .delete_tenant(request.tenant_id)
                .await
                .map_err(EngineError::store(target.id()))?;
            self.control
                .append_audit(
                    record.id,
                    "reset_target",
                    &note
                        .clone()
                        .with_details(serde_json::json!({ "events_deleted": deleted })),
                )
                .await?;
        }
        Ok(record)
    }

    /// Why a cleanup running now keeps a migration of `tenant` from `source` to `target` from
    /// going on: it is deleting the tenant's rows from one of the two stores.
    pub(super) async fn cleanup_in_the_way(
        &self,
        tenant: Uuid,
        source: &str,
        target: &str,
    ) -> Result<Option<String>, EngineError> {
        let running = self.control.running_cleanups(Some(tenant)).await?;
        Ok(running
            .iter()
            .find(|c| c.store_id == source || c.store_id == target)
            .map(|c| {
                format!(
                    "tenant {tenant}'s rows in store {} are being deleted by the cleanup of \
                     migration {} ({} of {} deleted); start again when it is done \
                     (`switchyard-control status {}`)",
                    c.store_id, c.migration_id, c.rows_deleted, c.rows_total, c.migration_id
                )
            }))
    }

    /// bulk_copy or dual_write → paused. The copy or tail stops at its next batch boundary;
    /// a dual-writing tenant's writes go to the source only.
    pub async fn pause(&self, id: Uuid, note: &AuditNote) -> Result<MigrationRecord, EngineError> {
        let record = self.control.migration(id).await?;
        self.change(&record, Action::Pause, MigrationState::Paused, note)
            .await
    }

    /// paused → the phase it paused; the copy continues from its checkpoint and the tail
    /// catches up.
    pub async fn resume(&self, id: Uuid, note: &AuditNote) -> Result<MigrationRecord, EngineError> {
        let record = self.control.migration(id).await?;
        let back_to = record.paused_from.unwrap_or(MigrationState::BulkCopy);
        self.change(&record, Action::Resume, back_to, note).await
    }

    /// Any state but migrated (and the other terminal states) → rolled_back, routing back to
    /// the source. An abort during a cutover waits for the cutover to commit (then it is
    /// refused) or roll back.
    pub async fn abort(&self, id: Uuid, note: &AuditNote) -> Result<MigrationRecord, EngineError> {
        let deadline = tokio::time::Instant::now() + ABORT_WAITS_FOR_CUTOVER;
        let mut record = self.control.migration(id).await?;
        while record.state == MigrationState::Cutover {
            if tokio::time::Instant::now() > deadline {
                return Err(EngineError::Refused(format!(
                    "migration {id} is still cutting over after {ABORT_WAITS_FOR_CUTOVER:?}; try again"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            record = self.control.migration(id).await?;
        }
        if record.state == MigrationState::Migrated
            && record.reverse_replication()
            && record.finished_at.is_none()
        {
            return Err(EngineError::Refused(format!(
                "migration {id} is migrated: the tenant lives in {} now; to move it back to {} \
                 (kept current by reverse replication until `complete`), use \
                 `switchyard-control revert {id} --reason …`",
                record.target_store_id, record.source_store_id
            )));
        }
        if record.state == MigrationState::Migrated {
            return Err(EngineError::Refused(format!(
                "migration {id} is migrated (completed {}): the tenant's data is on {} now; \
                 to move it back, start a new migration to {}",
                record
                    .completed_at
                    .map_or_else(|| "?".to_owned(), |t| t.to_rfc3339()),
                record.target_store_id,
                record.source_store_id
            )));
        }
        self.change(&record, Action::Abort, MigrationState::RolledBack, note)
            .await
    }

    /// Runbook procedure 8: every listed tenant (or every tenant with `all`) back to normal on
    /// its source at once — gates open, mirrors off, a moved source fence opened again — and
    /// its active migration failed with the reason. Returns what it did per tenant.
    pub async fn emergency_stop(
        &self,
        tenants: &[Uuid],
        all: bool,
        note: &AuditNote,
    ) -> Result<Vec<Stopped>, EngineError> {
        let mut wanted: Vec<Uuid> = tenants.to_vec();
        if all {
            for r in self.control.migrations(true).await? {
                wanted.push(r.tenant_id);
            }
            for route in self
                .control
                .routes_since(0)
                .await
                .map_err(EngineError::store("control"))?
            {
                if route.migration_state != RoutingState::Normal {
                    wanted.push(route.tenant_id);
                }
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        // Every tenant at once: a tenant in `cutover` waits for its source fence (a cutover or
        // an append holding it; on SQLite, the store's write lock), and one tenant's busy or
        // unreachable store must not hold the others back or keep them running. Each gets its
        // own result.
        let out = futures_util::future::join_all(wanted.into_iter().map(|tenant| async move {
            let mut stopped = match self.stop_tenant(tenant, note).await {
                Ok(stopped) => stopped,
                Err(e) => Stopped {
                    tenant_id: tenant,
                    store_id: String::new(),
                    failed_migration: None,
                    finished_migration: None,
                    note: None,
                    reopened_fence: false,
                    error: Some(e.to_string()),
                },
            };
            if stopped.error.is_none() {
                self.reopen_after_stop(&mut stopped).await;
            }
            stopped
        }))
        .await;
        Ok(out)
    }

    /// Migration preflight: the target's rows of other tenants that share an event id or a
    /// stream with the tenant's events in the source (at most [`PREFLIGHT_LISTED`]).
    async fn foreign_collisions(
        &self,
        source: &switchyard_store::EventStore,
        target: &switchyard_store::EventStore,
        tenant: Uuid,
    ) -> Result<Vec<String>, EngineError> {
        let mut found = Vec::new();
        let mut after = 0;
        loop {
            let page = source
                .read_tenant(tenant, after, PREFLIGHT_PAGE)
                .await
                .map_err(EngineError::store(source.id()))?;
            let Some(last) = page.last() else { break };
            after = last.global_position;
            let limit = u32::try_from(PREFLIGHT_LISTED - found.len()).unwrap_or(1);
            for c in target
                .foreign_collisions(tenant, &page, limit)
                .await
                .map_err(EngineError::store(target.id()))?
            {
                if !found.contains(&c) {
                    found.push(c);
                }
            }
            if found.len() >= PREFLIGHT_LISTED {
                found.truncate(PREFLIGHT_LISTED);
                break;
            }
        }
        Ok(found)
    }

    /// Fails the tenant's active migration, if any, and routes the tenant normal on the store
    /// it belongs to: the source of the migration this stop failed, else the store routing
    /// already names. A migration that left its state meanwhile (a cutover that finished) is
    /// read again, never acted on from an old read: a migrated tenant stays on its target.
    ///
    /// A migration in `cutover` is decided under its source fence ([`Self::stop_cutover`]):
    /// once the cutover's fence move committed, appends may be acknowledged on the target
    /// (a proxy follows the moved fence there before routing says so), so such a migration is
    /// finished forward, never failed back onto its source. A migration this stop failed can
    /// never move its fence afterwards (the cutover re-checks the state under the fence) nor
    /// finish (its last step is a compare-and-set from `cutover`).
    async fn stop_tenant(&self, tenant: Uuid, note: &AuditNote) -> Result<Stopped, EngineError> {
        let mut failed: Option<MigrationRecord> = None;
        let mut finished: Option<MigrationRecord> = None;
        let note = note
            .clone()
            .with_details(serde_json::json!({ "emergency_stop": true }));
        // The state may change under us (a worker, a cutover finishing): read again and retry.
        for _ in 0..10 {
            let Some(record) = self.control.active_migration(tenant).await? else {
                break;
            };
            let applied = if record.state == MigrationState::Cutover {
                self.stop_cutover(&record, &note).await?
            } else {
                let route = record.implied_route(MigrationState::Failed);
                self.control
                    .transition(record.id, record.state, Action::Fail, &note, Some(&route))
                    .await
                    .map(|done| done.record.state)
            };
            match applied {
                Ok(MigrationState::Migrated) => {
                    finished = Some(record);
                    break;
                }
                Ok(_) => {
                    failed = Some(record);
                    break;
                }
                Err(MigrationError::StateChanged { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // A tenant routed oddly without a migration (or whose migration just ended): normal on
        // the store it is routed to.
        let route = self
            .control
            .route(tenant)
            .await
            .map_err(EngineError::store("control"))?;
        let store = match (&failed, &finished, &route) {
            (Some(record), ..) => record.source_store_id.clone(),
            (None, Some(record), _) => record.target_store_id.clone(),
            (None, None, Some(r)) => r.store_id.clone(),
            (None, None, None) => self.recorded_default_store().await?,
        };
        if route
            .as_ref()
            .is_some_and(|r| r.migration_state != RoutingState::Normal || r.store_id != store)
        {
            self.control
                .set_route(&switchyard_store::RouteUpdate::normal(tenant, &store))
                .await
                .map_err(EngineError::store("control"))?;
        }
        Ok(Stopped {
            tenant_id: tenant,
            store_id: store,
            failed_migration: failed.map(|r| r.id),
            note: finished.as_ref().map(|r| {
                format!(
                    "migration {} was finished, not failed: its cutover had already moved the fence in {} \
                     to {}, so appends may have been acknowledged there; the tenant stays on {}. \
                     To go back, start a new migration to {}",
                    r.id, r.source_store_id, r.target_store_id, r.target_store_id, r.source_store_id
                )
            }),
            finished_migration: finished.map(|r| r.id),
            reopened_fence: false,
            error: None,
        })
    }

    /// Stops a migration in `cutover` holding its source fence (`lock_fence`, as the cutover
    /// and the recoverer do: this waits for a cutover holding it, or wins against one still
    /// to take it). Moved to the target → the cutover committed its move: finished forward
    /// (migrated, routing normal on the target), as [`Self::recover_cutover`] would. Otherwise
    /// the migration is failed (routing normal on the source) while the fence is held, so no
    /// cutover can move it after. Answers the state written, or the compare-and-set's refusal
    /// when the migration left `cutover` meanwhile (the caller reads it again).
    async fn stop_cutover(
        &self,
        record: &MigrationRecord,
        note: &AuditNote,
    ) -> Result<Result<MigrationState, MigrationError>, EngineError> {
        let source = self.store(&record.source_store_id)?;
        let lock = source
            .lock_fence(record.tenant_id, self.fence_wait())
            .await
            .map_err(EngineError::store(source.id()))?;
        let applied = self
            .settle_under_fence(record, lock, (Action::Fail, MigrationState::Failed), note)
            .await?;
        if applied
            .as_ref()
            .is_ok_and(|done| done.state == MigrationState::Migrated)
        {
            self.metrics.cutovers.with_label_values(&["migrated"]).inc();
            tracing::warn!(migration.id = %record.id, "emergency stop: the cutover had moved the fence; finished it forward");
        }
        Ok(applied.map(|done| done.state))
    }

    /// How long the emergency stop waits for a tenant's fence: a cutover holds it for its
    /// budget (which `cutover --timeout-ms` may raise) plus the fence's margin at most.
    fn fence_wait(&self) -> Duration {
        fence_wait(self.settings.cutover_timeout)
    }

    /// Writes must be able to land on the store the tenant is routed to: a moved fence there
    /// is opened again — only while routing still names that store (checked just before;
    /// nothing but an operator moves a normal route).
    async fn reopen_after_stop(&self, stopped: &mut Stopped) {
        let Ok(store) = self.store(&stopped.store_id) else {
            return;
        };
        match self.control.route(stopped.tenant_id).await {
            Ok(Some(r)) if r.store_id != stopped.store_id => {
                stopped.error = Some(format!(
                    "routing names {} now, not {}: its fence was left as it is",
                    r.store_id, stopped.store_id
                ));
                return;
            }
            Ok(_) => {}
            Err(e) => {
                stopped.error = Some(format!(
                    "routing could not be read again, so the fence in {} was left as it is: {}",
                    stopped.store_id,
                    EngineError::store("control")(e)
                ));
                return;
            }
        }
        match store
            .reopen_fence(stopped.tenant_id, self.fence_wait())
            .await
        {
            Ok(reopened) => stopped.reopened_fence = reopened,
            Err(e) => {
                stopped.error = Some(format!(
                    "routing is normal on {}, but its fence could not be checked or reopened \
                     ({}); if appends are refused as moved, run the SQL-level emergency stop \
                     (docs/operations.md)",
                    stopped.store_id,
                    EngineError::store(&stopped.store_id)(e)
                ));
            }
        }
    }

    async fn change(
        &self,
        record: &MigrationRecord,
        action: Action,
        to: MigrationState,
        note: &AuditNote,
    ) -> Result<MigrationRecord, EngineError> {
        let route = record.implied_route(to);
        match self
            .control
            .transition(record.id, record.state, action, note, Some(&route))
            .await
        {
            Ok(done) => Ok(done.record),
            Err(MigrationError::StateChanged { actual, .. }) => Err(EngineError::Refused(format!(
                "migration {} changed state to {actual} while this {} was being applied (another operator \
                 or the worker); check `switchyard-control status {}` and retry if still wanted",
                record.id,
                action.as_str(),
                record.id
            ))),
            Err(e) => Err(e.into()),
        }
    }
}

/// [`Engine::fence_wait`] for a cutover budget: the budget and twice the fence's margin, and
/// never less than [`STOP_WAITS_FOR_FENCE`].
fn fence_wait(cutover_budget: Duration) -> Duration {
    (cutover_budget + FENCE_MARGIN * 2).max(STOP_WAITS_FOR_FENCE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_emergency_stop_waits_out_any_cutover_budget_and_never_less_than_its_floor() {
        assert_eq!(fence_wait(Duration::ZERO), STOP_WAITS_FOR_FENCE);
        let long = Duration::from_secs(60);
        assert_eq!(fence_wait(long), long + FENCE_MARGIN * 2);
        assert!(
            fence_wait(long) > long,
            "a cutover holding the fence for its budget ends first"
        );
    }
}
