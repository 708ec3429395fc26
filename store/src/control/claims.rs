//! Worker claims on migrations: a lease in `tenant_migrations.claimed_by` / `claimed_until`,
//! timed by the database's clock, so one `serve` replica (or a foreground `migrate start`)
//! drives a migration at a time.

use std::time::Duration;

use uuid::Uuid;

use super::migrations::{decode_migration, MigrationError, MigrationRecord, COLUMNS, TERMINAL};
use super::ControlDb;
use crate::dialect::on_backend;

/// The claim rule, as SQL: the row's claim is free for the worker bound at `worker` (a
/// parameter like `$2`) — unclaimed, its lease expired by the database's clock `now`, or the
/// worker's own. Migrations and cleanups (`cleanups.rs`) share it.
pub(super) fn claim_is_free(worker: &str, now: &str) -> String {
    format!(
        "(claimed_by IS NULL OR claimed_by = {worker} \
         OR claimed_until IS NULL OR claimed_until < {now})"
    )
}

impl ControlDb {
    /// Claims migration `id` for `worker` for `lease` if it is active and unclaimed, its lease
    /// expired, or already `worker`'s (then it renews). Times are the database's clock, so
    /// replicas on different hosts agree on expiry.
    pub async fn claim(
        &self,
        id: Uuid,
        worker: &str,
        lease: Duration,
    ) -> Result<bool, MigrationError> {
        let active = format!("state NOT IN {TERMINAL}");
        self.claim_row("tenant_migrations", "id", &active, id, worker, lease)
            .await
    }

    /// Claims (or renews) the row of `table` whose `key` is `id` for `worker` for `lease`,
    /// if the row is `active` (an SQL condition) and its claim is free ([`claim_is_free`]).
    pub(super) async fn claim_row(
        &self,
        table: &str,
        key: &str,
        active: &str,
        id: Uuid,
        worker: &str,
        lease: Duration,
    ) -> Result<bool, MigrationError> {
        let affected = on_backend!(self, |pool, d| {
            let sql = format!(
                "UPDATE {table} SET claimed_by = $2, claimed_until = {until}
                 WHERE {key} = $1 AND {active} AND {free}",
                until = d.now_plus("$3"),
                free = claim_is_free("$2", d.now())
            );
            sqlx::query(&sql)
                .bind(d.id(id))
                .bind(worker)
                .bind(lease.as_secs_f64())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Gives up `worker`'s claim on `id`. False when it did not hold it.
    pub async fn release(&self, id: Uuid, worker: &str) -> Result<bool, MigrationError> {
        let affected = on_backend!(self, |pool, d| {
            sqlx::query(
                "UPDATE tenant_migrations SET claimed_by = NULL, claimed_until = NULL
                 WHERE id = $1 AND claimed_by = $2",
            )
            .bind(d.id(id))
            .bind(worker)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Active migrations `worker` could claim now (unclaimed, lease expired, or its own),
    /// oldest first.
    pub async fn claimable(&self, worker: &str) -> Result<Vec<MigrationRecord>, MigrationError> {
        Ok(on_backend!(self, |pool, d| {
            let sql = format!(
                "SELECT {COLUMNS} FROM tenant_migrations
                 WHERE state NOT IN {TERMINAL} AND {free}
                 ORDER BY created_at, id",
                free = claim_is_free("$1", d.now())
            );
            sqlx::query(&sql)
                .bind(worker)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_migration)
                .collect::<Result<Vec<_>, _>>()?
        }))
    }
}
