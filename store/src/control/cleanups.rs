//! The end of a migration (issue 19): `finished_at` on the migration record (`complete`), and
//! `migration_cleanups`, the deletion of the tenant's rows from a store it no longer uses (the
//! source of a completed migration, the target of an aborted or failed one), recorded here so
//! a killed driver's successor resumes it. The deleting itself is the event store's
//! (`EventStore::delete_tenant_batch`); the refusals (still routed there, a migration of the
//! tenant active) are the engine's, which sees routes and stores together.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::audit::{AuditNote, NewAuditRow};
use super::claims::claim_is_free;
use super::migrations::{decode_migration, MigrationError, MigrationRecord, COLUMNS};
use super::ControlDb;
use crate::dialect::{on_backend, Columns};
use crate::error::StoreError;

/// Which of the migration's stores a cleanup empties of the tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CleanupRole {
    /// The store a completed migration left.
    Source,
    /// The target of an aborted or failed migration (what the copy and the mirror put there).
    Target,
}

impl CleanupRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Target => "target",
        }
    }
}

impl fmt::Display for CleanupRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a cleanup still has rows to delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CleanupState {
    Running,
    Done,
}

/// A `migration_cleanups` row.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CleanupRecord {
    pub migration_id: Uuid,
    pub tenant_id: Uuid,
    pub store_id: String,
    pub role: CleanupRole,
    pub state: CleanupState,
    /// The tenant's rows in the store when the cleanup started.
    pub rows_total: i64,
    pub rows_deleted: i64,
    pub claimed_by: Option<String>,
    pub claimed_until: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl CleanupRecord {
    /// Rows of the tenant still to delete, as last recorded.
    pub fn rows_left(&self) -> i64 {
        (self.rows_total - self.rows_deleted).max(0)
    }
}

const CLEANUP_COLUMNS: &str = "migration_id, tenant_id, store_id, role, state, rows_total, \
     rows_deleted, claimed_by, claimed_until, started_at, updated_at, finished_at";

fn decode_cleanup(row: &impl Columns) -> Result<CleanupRecord, StoreError> {
    let role = match row.text("role")?.as_str() {
        "source" => CleanupRole::Source,
        "target" => CleanupRole::Target,
        other => return Err(StoreError::Corrupt(format!("cleanup role {other:?}"))),
    };
    let state = match row.text("state")?.as_str() {
        "running" => CleanupState::Running,
        "done" => CleanupState::Done,
        other => return Err(StoreError::Corrupt(format!("cleanup state {other:?}"))),
    };
    Ok(CleanupRecord {
        migration_id: row.uuid("migration_id")?,
        tenant_id: row.uuid("tenant_id")?,
        store_id: row.text("store_id")?,
        role,
        state,
        rows_total: row.int("rows_total")?,
        rows_deleted: row.int("rows_deleted")?,
        claimed_by: row.opt_text("claimed_by")?,
        claimed_until: row.opt_time("claimed_until")?,
        started_at: row.time("started_at")?,
        updated_at: row.time("updated_at")?,
        finished_at: row.opt_time("finished_at")?,
    })
}

impl ControlDb {
    /// Sets `finished_at` on migration `id` if it is `migrated` and not finished yet, with its
    /// `complete` audit row in the same transaction. Returns the record and whether this call
    /// finished it (false: it was finished already, nothing written). A migration in any other
    /// state is returned unchanged with false; the caller refuses it.
    pub async fn finish_migration(
        &self,
        id: Uuid,
        note: &AuditNote,
    ) -> Result<(MigrationRecord, bool), MigrationError> {
        let finished = on_backend!(self, |pool, d| {
            let mut tx = d.begin(pool).await?;
            let sql = format!(
                "UPDATE tenant_migrations SET finished_at = {now},
                     revision = revision + 1, updated_at = {now}
                 WHERE id = $1 AND state = 'migrated' AND finished_at IS NULL
                 RETURNING {COLUMNS}",
                now = d.now()
            );
            let row = sqlx::query(&sql)
                .bind(d.id(id))
                .fetch_optional(&mut *tx)
                .await?;
            match row {
                None => None,
                Some(row) => {
                    let record = decode_migration(&row)?;
                    d.insert_audit(
                        &mut tx,
                        &NewAuditRow {
                            migration_id: id,
                            tenant_id: record.tenant_id,
                            action: "complete",
                            from_state: Some(record.state),
                            to_state: None,
                            note,
                        },
                    )
                    .await?;
                    tx.commit().await?;
                    Some(record)
                }
            }
        });
        match finished {
            Some(record) => Ok((record, true)),
            None => Ok((self.migration(id).await?, false)),
        }
    }

    /// Migrated migrations not finished whose cutover is older than `grace`: what `serve`
    /// completes by itself (`reverse_replication_hours`).
    pub async fn unfinished_older_than(
        &self,
        grace: Duration,
    ) -> Result<Vec<MigrationRecord>, MigrationError> {
        Ok(on_backend!(self, |pool, d| {
            let sql = format!(
                "SELECT {COLUMNS} FROM tenant_migrations
                 WHERE state = 'migrated' AND finished_at IS NULL AND completed_at < {before}
                 ORDER BY completed_at, id",
                before = d.now_plus("$1")
            );
            sqlx::query(&sql)
                .bind(-grace.as_secs_f64())
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_migration)
                .collect::<Result<Vec<_>, _>>()?
        }))
    }

    /// Records the start of migration `migration`'s cleanup of `store_id` (its `role` store)
    /// with `rows_total` rows of the tenant there, and its `cleanup_start` audit row; if one is
    /// recorded already (a second request, a resumed one), returns that one unchanged.
    pub async fn begin_cleanup(
        &self,
        migration: &MigrationRecord,
        role: CleanupRole,
        rows_total: i64,
        note: &AuditNote,
    ) -> Result<CleanupRecord, MigrationError> {
        let store_id = match role {
            CleanupRole::Source => &migration.source_store_id,
            CleanupRole::Target => &migration.target_store_id,
        };
        on_backend!(self, |pool, d| {
            let mut tx = d.begin(pool).await?;
            let sql = format!(
                "INSERT INTO migration_cleanups (migration_id, tenant_id, store_id, role,
                     rows_total, started_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, {now}, {now})
                 ON CONFLICT (migration_id) DO NOTHING",
                now = d.now()
            );
            let inserted = sqlx::query(&sql)
                .bind(d.id(migration.id))
                .bind(d.id(migration.tenant_id))
                .bind(store_id)
                .bind(role.as_str())
                .bind(rows_total)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if inserted == 1 {
                let details = serde_json::json!({
                    "store_id": store_id, "role": role.as_str(), "rows_total": rows_total
                });
                let note = note.clone().with_details(details);
                d.insert_audit(
                    &mut tx,
                    &NewAuditRow {
                        migration_id: migration.id,
                        tenant_id: migration.tenant_id,
                        action: "cleanup_start",
                        from_state: Some(migration.state),
                        to_state: None,
                        note: &note,
                    },
                )
                .await?;
            }
            let sql =
                format!("SELECT {CLEANUP_COLUMNS} FROM migration_cleanups WHERE migration_id = $1");
            let row = sqlx::query(&sql)
                .bind(d.id(migration.id))
                .fetch_one(&mut *tx)
                .await?;
            let record = decode_cleanup(&row)?;
            tx.commit().await?;
            Ok(record)
        })
    }

    /// Migration `id`'s cleanup, if one was started.
    pub async fn cleanup(&self, id: Uuid) -> Result<Option<CleanupRecord>, MigrationError> {
        let sql =
            format!("SELECT {CLEANUP_COLUMNS} FROM migration_cleanups WHERE migration_id = $1");
        Ok(on_backend!(self, |pool, d| {
            sqlx::query(&sql)
                .bind(d.id(id))
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_cleanup)
                .transpose()?
        }))
    }

    /// The cleanups that are still deleting: of `tenant_id`'s migrations, or of every tenant.
    pub async fn running_cleanups(
        &self,
        tenant_id: Option<Uuid>,
    ) -> Result<Vec<CleanupRecord>, MigrationError> {
        let tenant = if tenant_id.is_some() {
            "AND tenant_id = $1"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {CLEANUP_COLUMNS} FROM migration_cleanups
             WHERE state = 'running' {tenant} ORDER BY started_at"
        );
        Ok(on_backend!(self, |pool, d| {
            let mut query = sqlx::query(&sql);
            if let Some(tenant_id) = tenant_id {
                query = query.bind(d.id(tenant_id));
            }
            query
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_cleanup)
                .collect::<Result<Vec<_>, _>>()?
        }))
    }

    /// Claims (or renews) migration `id`'s running cleanup for `worker` for `lease`, as
    /// [`ControlDb::claim`] does for migrations: one process deletes at a time.
    pub async fn claim_cleanup(
        &self,
        id: Uuid,
        worker: &str,
        lease: Duration,
    ) -> Result<bool, MigrationError> {
        self.claim_row(
            "migration_cleanups",
            "migration_id",
            "state = 'running'",
            id,
            worker,
            lease,
        )
        .await
    }

    /// Running cleanups `worker` could claim now, oldest first.
    pub async fn claimable_cleanups(
        &self,
        worker: &str,
    ) -> Result<Vec<CleanupRecord>, MigrationError> {
        Ok(on_backend!(self, |pool, d| {
            let sql = format!(
                "SELECT {CLEANUP_COLUMNS} FROM migration_cleanups
                 WHERE state = 'running' AND {free}
                 ORDER BY started_at, migration_id",
                free = claim_is_free("$1", d.now())
            );
            sqlx::query(&sql)
                .bind(worker)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_cleanup)
                .collect::<Result<Vec<_>, _>>()?
        }))
    }

    /// Records `rows_deleted` for `worker`'s cleanup of migration `id` (only while it holds the
    /// claim, else [`MigrationError::ClaimLost`]); with `done`, the cleanup is over: state
    /// `done`, claim released, `cleanup_done` audited in the same transaction.
    pub async fn record_cleanup(
        &self,
        id: Uuid,
        worker: &str,
        rows_deleted: i64,
        done: bool,
        note: &AuditNote,
    ) -> Result<CleanupRecord, MigrationError> {
        let updated = on_backend!(self, |pool, d| {
            let mut tx = d.begin(pool).await?;
            let sql = format!(
                "UPDATE migration_cleanups SET rows_deleted = $3, updated_at = {now},
                     state = CASE WHEN $4 THEN 'done' ELSE state END,
                     finished_at = CASE WHEN $4 THEN {now} ELSE finished_at END,
                     claimed_by = CASE WHEN $4 THEN NULL ELSE claimed_by END,
                     claimed_until = CASE WHEN $4 THEN NULL ELSE claimed_until END
                 WHERE migration_id = $1 AND state = 'running' AND claimed_by = $2
                 RETURNING {CLEANUP_COLUMNS}",
                now = d.now()
            );
            let row = sqlx::query(&sql)
                .bind(d.id(id))
                .bind(worker)
                .bind(rows_deleted)
                .bind(done)
                .fetch_optional(&mut *tx)
                .await?;
            match row {
                None => None,
                Some(row) => {
                    let record = decode_cleanup(&row)?;
                    if done {
                        let state: String =
                            sqlx::query_scalar("SELECT state FROM tenant_migrations WHERE id = $1")
                                .bind(d.id(id))
                                .fetch_one(&mut *tx)
                                .await?;
                        let note = note.clone().with_details(serde_json::json!({
                            "store_id": record.store_id,
                            "role": record.role.as_str(),
                            "rows_deleted": record.rows_deleted,
                        }));
                        d.insert_audit(
                            &mut tx,
                            &NewAuditRow {
                                migration_id: id,
                                tenant_id: record.tenant_id,
                                action: "cleanup_done",
                                from_state: Some(
                                    state
                                        .parse()
                                        .map_err(|e| StoreError::Corrupt(format!("state: {e}")))?,
                                ),
                                to_state: None,
                                note: &note,
                            },
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    Some(record)
                }
            }
        });
        match updated {
            Some(record) => Ok(record),
            None => Err(MigrationError::ClaimLost {
                id,
                worker: worker.to_owned(),
                holder: self.cleanup(id).await?.and_then(|c| c.claimed_by),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::lifecycle::Action;
    use crate::control::{MigrationState, NewMigration};
    use crate::dialect::{AsBackend, Backend};

    /// A SQLite control database at version 2 (before `finished_at` and `migration_cleanups`)
    /// upgrades in place, and the end of a migration works on it: `complete` once, a cleanup
    /// started once, claimed by one worker at a time, done with its count.
    #[tokio::test]
    async fn a_version_2_sqlite_control_database_upgrades_and_records_the_end() -> anyhow::Result<()>
    {
        let dir = std::env::temp_dir().join(format!("switchyard-cleanups-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let control = ControlDb::connect(&format!("sqlite://{}", dir.join("c.db").display()), 2)?;
        let Backend::Sqlite(pool) = AsBackend::as_backend(&control) else {
            unreachable!("a sqlite url")
        };
        sqlx::raw_sql(super::super::SQLITE_DDL)
            .execute(pool)
            .await?;
        control.ensure_schema().await?;
        control.ensure_schema().await?;
        let version: i64 =
            sqlx::query_scalar("SELECT version FROM switchyard_schema WHERE component = 'control'")
                .fetch_one(pool)
                .await?;
        assert_eq!(version, 3);

        let note = AuditNote::new("test");
        let m = control
            .create_migration(
                &NewMigration {
                    tenant_id: Uuid::new_v4(),
                    source_store_id: "shared".into(),
                    target_store_id: "dedicated".into(),
                    config: serde_json::Value::Null,
                    route_epoch: None,
                    claim: None,
                },
                &note,
            )
            .await?;
        // Not migrated: nothing is finished.
        let (record, finished) = control.finish_migration(m.id, &note).await?;
        assert!(!finished && record.finished_at.is_none());
        for (from, action) in [
            (MigrationState::Pending, Action::StartCopy),
            (MigrationState::BulkCopy, Action::CopyDone),
            (MigrationState::DualWrite, Action::Cutover),
            (MigrationState::Cutover, Action::CutoverDone),
        ] {
            control.transition(m.id, from, action, &note, None).await?;
        }
        let (record, finished) = control.finish_migration(m.id, &note).await?;
        assert!(finished && record.finished_at.is_some());
        let (again, finished) = control.finish_migration(m.id, &note).await?;
        assert!(!finished);
        assert_eq!(again.finished_at, record.finished_at);
        assert!(control
            .unfinished_older_than(Duration::ZERO)
            .await?
            .is_empty());

        let started = control
            .begin_cleanup(&record, CleanupRole::Source, 7, &note)
            .await?;
        assert_eq!(
            (
                started.store_id.as_str(),
                started.state,
                started.rows_left()
            ),
            ("shared", CleanupState::Running, 7)
        );
        let same = control
            .begin_cleanup(&record, CleanupRole::Target, 99, &note)
            .await?;
        assert_eq!(same, started, "a second start returns the first");
        let lease = Duration::from_secs(30);
        assert!(control.claim_cleanup(m.id, "w1", lease).await?);
        assert!(!control.claim_cleanup(m.id, "w2", lease).await?);
        assert!(control.claimable_cleanups("w2").await?.is_empty());
        assert!(matches!(
            control.record_cleanup(m.id, "w2", 3, false, &note).await,
            Err(MigrationError::ClaimLost { .. })
        ));
        let part = control.record_cleanup(m.id, "w1", 3, false, &note).await?;
        assert_eq!((part.rows_deleted, part.rows_left()), (3, 4));
        assert_eq!(
            control
                .running_cleanups(Some(record.tenant_id))
                .await?
                .len(),
            1
        );
        assert_eq!(control.running_cleanups(None).await?.len(), 1);
        let done = control.record_cleanup(m.id, "w1", 7, true, &note).await?;
        assert_eq!((done.state, done.rows_left()), (CleanupState::Done, 0));
        assert!(done.finished_at.is_some() && done.claimed_by.is_none());
        assert!(!control.claim_cleanup(m.id, "w1", lease).await?);
        assert!(control
            .running_cleanups(Some(record.tenant_id))
            .await?
            .is_empty());
        assert!(control.running_cleanups(None).await?.is_empty());
        let actions: Vec<String> = control
            .audit_log(m.id)
            .await?
            .into_iter()
            .map(|e| e.action)
            .collect();
        for action in ["complete", "cleanup_start", "cleanup_done"] {
            assert_eq!(
                actions.iter().filter(|a| *a == action).count(),
                1,
                "{actions:?}"
            );
        }
        control.close().await;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
