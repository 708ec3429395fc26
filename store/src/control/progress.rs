//! What a migration's worker records as it goes: the copy's and the tail's counts, horizons
//! and checkpoints (fenced by the worker's claim), and the migration's error message.

use uuid::Uuid;

use super::migrations::{decode_migration, MigrationError, MigrationRecord, COLUMNS};
use super::ControlDb;
use crate::dialect::on_backend;

/// Progress to record; `None` leaves a column as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub events_total: Option<i64>,
    pub events_copied: Option<i64>,
    pub copy_horizon: Option<i64>,
    pub copy_position: Option<i64>,
    pub tail_horizon: Option<i64>,
    pub tail_position: Option<i64>,
}

impl ControlDb {
    /// Records progress. With `worker`, only while that worker holds the claim and its lease
    /// has not run out (else [`MigrationError::ClaimLost`]), so a worker that lost its lease —
    /// even one nobody has taken over from yet — stops writing.
    pub async fn update_progress(
        &self,
        id: Uuid,
        worker: Option<&str>,
        progress: &Progress,
    ) -> Result<MigrationRecord, MigrationError> {
        let updated = on_backend!(self, |pool, d| {
            let sql = format!(
                "UPDATE tenant_migrations SET
                     events_total = COALESCE($2, events_total),
                     events_copied = COALESCE($3, events_copied),
                     copy_horizon = COALESCE($4, copy_horizon),
                     copy_position = COALESCE($5, copy_position),
                     tail_horizon = COALESCE($6, tail_horizon),
                     tail_position = COALESCE($7, tail_position),
                     revision = revision + 1, updated_at = {now}
                 WHERE id = $1 AND ($8 IS NULL OR (claimed_by = $8 AND claimed_until >= {now}))
                 RETURNING {COLUMNS}",
                now = d.now()
            );
            sqlx::query(&sql)
                .bind(d.id(id))
                .bind(progress.events_total)
                .bind(progress.events_copied)
                .bind(progress.copy_horizon)
                .bind(progress.copy_position)
                .bind(progress.tail_horizon)
                .bind(progress.tail_position)
                .bind(worker)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_migration)
                .transpose()?
        });
        match updated {
            Some(record) => Ok(record),
            None => {
                let current = self.migration(id).await?;
                Err(MigrationError::ClaimLost {
                    id,
                    worker: worker.unwrap_or_default().to_owned(),
                    holder: current.claimed_by,
                })
            }
        }
    }

    /// Sets (or with `None` clears) the migration's error message, leaving its state.
    pub async fn set_error(
        &self,
        id: Uuid,
        message: Option<&str>,
    ) -> Result<MigrationRecord, MigrationError> {
        let record = on_backend!(self, |pool, d| {
            let sql = format!(
                "UPDATE tenant_migrations SET error_message = $2,
                     revision = revision + 1, updated_at = {now}
                 WHERE id = $1 RETURNING {COLUMNS}",
                now = d.now()
            );
            sqlx::query(&sql)
                .bind(d.id(id))
                .bind(message)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_migration)
                .transpose()?
        });
        record.ok_or(MigrationError::NotFound(id))
    }
}
