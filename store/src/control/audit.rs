//! `migration_audit_log`: who did what to a migration, when and why.
//!
//! Every state change writes its row in the transaction that makes the change (see
//! `migrations.rs`), so the log never claims a change that did not happen nor misses one that
//! did. Operator actions that change no state (a refused cutover, a verification, a lag
//! check that gated something) are appended with [`ControlDb::append_audit`].

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Postgres, Sqlite, Transaction};
use uuid::Uuid;

use super::lifecycle::MigrationState;
use super::migrations::MigrationError;
use super::ControlDb;
use crate::dialect::{on_backend, Columns, Lite, Pg};
use crate::event::StoreError;

/// Who acts and why: what every audited operation records besides the action itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditNote {
    /// The OS user for the CLI, `serve@<host>` or similar for the worker.
    pub actor: String,
    /// The operator's `--reason`, or the engine's explanation.
    pub reason: Option<String>,
    /// Anything else worth keeping (lag at cutover, verification counts, …).
    pub details: Option<Value>,
}

impl AuditNote {
    pub fn new(actor: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            reason: None,
            details: None,
        }
    }

    #[must_use]
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    #[must_use]
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// A `migration_audit_log` row.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub migration_id: Uuid,
    pub tenant_id: Uuid,
    pub at: DateTime<Utc>,
    pub actor: String,
    /// A lifecycle action (`pause`, `cutover_done`, …), `create`, or an action that changes no
    /// state.
    pub action: String,
    pub from_state: Option<MigrationState>,
    /// `None` for actions that change no state.
    pub to_state: Option<MigrationState>,
    pub reason: Option<String>,
    pub details: Option<Value>,
}

/// What the repository writes into the log inside its own transactions.
#[derive(Debug)]
pub(super) struct NewAuditRow<'a> {
    pub migration_id: Uuid,
    pub tenant_id: Uuid,
    pub action: &'a str,
    pub from_state: Option<MigrationState>,
    pub to_state: Option<MigrationState>,
    pub note: &'a AuditNote,
}

const COLUMNS: &str =
    "id, migration_id, tenant_id, at, actor, action, from_state, to_state, reason, details";

fn insert_sql(now: &str) -> String {
    format!(
        "INSERT INTO migration_audit_log (migration_id, tenant_id, at, actor, action,
             from_state, to_state, reason, details)
         VALUES ($1, $2, {now}, $3, $4, $5, $6, $7, $8)
         RETURNING {COLUMNS}"
    )
}

fn decode(row: &impl Columns) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        id: row.int("id")?,
        migration_id: row.uuid("migration_id")?,
        tenant_id: row.uuid("tenant_id")?,
        at: row.time("at")?,
        actor: row.text("actor")?,
        action: row.text("action")?,
        from_state: row.opt_state("from_state")?,
        to_state: row.opt_state("to_state")?,
        reason: row.opt_text("reason")?,
        details: row.opt_json("details")?,
    })
}

/// `insert_audit` for each dialect: the same statement, bound with the backend's types.
macro_rules! impl_insert_audit {
    ($dialect:ty, $db:ty) => {
        impl $dialect {
            pub(super) async fn insert_audit(
                self,
                tx: &mut Transaction<'_, $db>,
                row: &NewAuditRow<'_>,
            ) -> Result<AuditEntry, StoreError> {
                let inserted = sqlx::query(&insert_sql(self.now()))
                    .bind(self.id(row.migration_id))
                    .bind(self.id(row.tenant_id))
                    .bind(&row.note.actor)
                    .bind(row.action)
                    .bind(row.from_state.map(MigrationState::as_str))
                    .bind(row.to_state.map(MigrationState::as_str))
                    .bind(row.note.reason.as_deref())
                    .bind(row.note.details.as_ref())
                    .fetch_one(&mut **tx)
                    .await?;
                decode(&inserted)
            }
        }
    };
}

impl_insert_audit!(Pg, Postgres);
impl_insert_audit!(Lite, Sqlite);

impl ControlDb {
    /// Logs an action on migration `migration_id` that changes no state, with the state it
    /// found (`to_state` stays empty).
    pub async fn append_audit(
        &self,
        migration_id: Uuid,
        action: &str,
        note: &AuditNote,
    ) -> Result<AuditEntry, MigrationError> {
        on_backend!(self, |pool, d| {
            let mut tx = d.begin(pool).await?;
            let found = sqlx::query("SELECT tenant_id, state FROM tenant_migrations WHERE id = $1")
                .bind(d.id(migration_id))
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(MigrationError::NotFound(migration_id))?;
            let entry = d
                .insert_audit(
                    &mut tx,
                    &NewAuditRow {
                        migration_id,
                        tenant_id: found.uuid("tenant_id")?,
                        action,
                        from_state: Some(found.state("state")?),
                        to_state: None,
                        note,
                    },
                )
                .await?;
            tx.commit().await?;
            Ok(entry)
        })
    }

    /// The migration's audit log, oldest first.
    pub async fn audit_log(&self, migration_id: Uuid) -> Result<Vec<AuditEntry>, MigrationError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM migration_audit_log WHERE migration_id = $1 ORDER BY id"
        );
        Ok(on_backend!(self, |pool, d| {
            sqlx::query(&sql)
                .bind(d.id(migration_id))
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode)
                .collect::<Result<Vec<_>, _>>()?
        }))
    }
}
