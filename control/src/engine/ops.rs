//! The operator's actions on migrations: start, pause, resume, abort. Each is one
//! compare-and-set state change written with the tenant's route and an audit row; a second
//! operator racing the first gets a clear refusal.

use std::time::Duration;

use switchyard_store::control::Action;
use switchyard_store::{
    AuditNote, MigrationError, MigrationRecord, MigrationState, NewMigration, RoutingState,
};
use uuid::Uuid;

use super::{CutoverMode, Engine, EngineError, MigrationOptions};

/// How long an abort waits for a running cutover to commit or roll back.
const ABORT_WAITS_FOR_CUTOVER: Duration = Duration::from_secs(30);

/// What `migrate start` asks for.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub tenant_id: Uuid,
    pub target_store_id: String,
    pub batch_size: Option<u32>,
    pub max_rate: Option<u64>,
    pub reset_target: bool,
    pub cutover: CutoverMode,
}

impl Engine {
    /// Creates a migration of the tenant from the store it lives in now to the target.
    /// Refused when the tenant is already migrating, the target is its current store, or the
    /// target already holds events of the tenant (unless `reset_target`, which deletes them).
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
            None => self.default_store.clone(),
        };
        self.store(&source_id)?;
        if source_id == request.target_store_id {
            return Err(EngineError::Refused(format!(
                "tenant {} already lives in store {source_id}",
                request.tenant_id
            )));
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
        let batch_size = request.batch_size.unwrap_or(self.settings.batch_size);
        if batch_size == 0 {
            return Err(EngineError::Refused("--batch-size must be > 0".to_owned()));
        }
        let options = MigrationOptions {
            batch_size,
            max_rate: request.max_rate.unwrap_or(self.settings.max_rate),
            cutover: request.cutover,
            reset_target: request.reset_target,
        };
        let record = self
            .control
            .create_migration(
                &NewMigration {
                    tenant_id: request.tenant_id,
                    source_store_id: source_id,
                    target_store_id: request.target_store_id.clone(),
                    config: serde_json::to_value(&options).unwrap_or_default(),
                },
                note,
            )
            .await?;
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
