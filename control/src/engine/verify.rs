//! `verify`: which of a migration's rows are compared, and the verification metrics.

use switchyard_store::{MigrationRecord, MigrationState, PassWindow};

use super::{Engine, EngineError};
use crate::verify::{self, Level, Report, Scope};

impl Engine {
    /// Verifies a migration's tenant (see [`crate::verify`]): after a cutover, every source row
    /// (the source is fenced); before, the rows below the tail's horizon.
    pub async fn verify(
        &self,
        record: &MigrationRecord,
        level: Level,
        sample_percent: Option<f64>,
    ) -> Result<Report, EngineError> {
        let scope = if record.state == MigrationState::Migrated {
            Scope::Final
        } else if let Some(horizon) = record.tail_horizon {
            Scope::Window(PassWindow::first(horizon))
        } else {
            return Err(EngineError::Refused(format!(
                "migration {} is {} and has not finished its bulk copy: verification compares \
                 what the tail has reached; run it once the migration is tailing or dual-writing",
                record.id, record.state
            )));
        };
        self.verify_scope(record, &scope, level, sample_percent)
            .await
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
