//! `verify`: which of a migration's rows are compared, and the verification metrics.

use switchyard_store::{FenceState, MigrationRecord, MigrationState, PassWindow};

use super::{Engine, EngineError};
use crate::verify::{self, Level, Report, Scope};

impl Engine {
    /// Verifies a migration's tenant (see [`crate::verify`]): once the tenant has moved (the
    /// source's fence moved: the cutover committed, whatever the record says yet), every source
    /// row; before, the rows below the tail's horizon.
    ///
    /// A window is compared as if the source were still authoritative: a target event the source
    /// lacks is then a write into a store the tenant does not live in. A cutover that commits
    /// while the comparison runs makes that false (the appends the target acknowledged since are
    /// the tenant's, and reach the source only by reverse replication, if at all), so a window
    /// found different is compared again, as what the tenant then holds, when the source's fence
    /// moved meanwhile.
    pub async fn verify(
        &self,
        record: &MigrationRecord,
        level: Level,
        sample_percent: Option<f64>,
    ) -> Result<Report, EngineError> {
        let mut record = std::borrow::Cow::Borrowed(record);
        let mut overtaken = 0;
        loop {
            let scope = if self.has_moved(&record).await? {
                Scope::Final
            } else if let Some(horizon) = record.tail_horizon {
                Scope::Window(PassWindow::first(horizon))
            } else {
                return Err(EngineError::Refused(format!(
                    "migration {} is {} and has not finished its bulk copy: verification \
                     compares what the tail has reached; run it once the migration is tailing \
                     or dual-writing",
                    record.id, record.state
                )));
            };
            crate::fault::pause_point("verify_before_compare").await;
            let report = self
                .verify_scope(&record, &scope, level, sample_percent)
                .await?;
            let window = matches!(scope, Scope::Window(_));
            if report.consistent || !window || overtaken == 2 || !self.has_moved(&record).await? {
                return Ok(report);
            }
            overtaken += 1;
            record = std::borrow::Cow::Owned(self.control.migration(record.id).await?);
        }
    }

    /// Whether the migration's tenant has left its source: the migration is migrated, or its
    /// cutover moved the source's fence (committed; the record follows).
    async fn has_moved(&self, record: &MigrationRecord) -> Result<bool, EngineError> {
        if record.state == MigrationState::Migrated {
            return Ok(true);
        }
        let fence = self
            .store(&record.source_store_id)?
            .fence(record.tenant_id)
            .await
            .map_err(|source| EngineError::Store {
                store: record.source_store_id.clone(),
                source,
            })?;
        Ok(fence.is_some_and(|(state, _)| state != FenceState::Open.as_str()))
    }

    /// Verifies `scope` of the migration's tenant and records the metrics.
    pub(super) async fn verify_scope(
        &self,
        record: &MigrationRecord,
        scope: &Scope,
        level: Level,
        sample_percent: Option<f64>,
    ) -> Result<Report, EngineError> {
        let source = self.store(&record.source_store_id)?;
        let target = self.store(&record.target_store_id)?;
        let report = verify::verify(
            source,
            target,
            record.tenant_id,
            scope,
            level,
            sample_percent,
        )
        .await
        .map_err(|source| EngineError::Store {
            store: format!("{} or {}", record.source_store_id, record.target_store_id),
            source,
        })?;
        self.metrics.observe_verification(&report);
        Ok(report)
    }
}
