//! The cutover's hold on a tenant's fence in the source store (DESIGN.md "Cutover").
//!
//! On PostgreSQL, [`EventStore::lock_fence`] opens a transaction and takes `FOR UPDATE` on the
//! tenant's fence row: it waits for appends in flight (they hold `FOR SHARE`) to commit, then
//! holds every new append of the tenant — through the proxy or straight into the table — until
//! the lock is released. [`FenceLock::move_to`] marks the fence moved and commits;
//! [`FenceLock::release`] (or dropping the lock) rolls back and leaves the fence open.
//! On SQLite the hold is a write transaction (`BEGIN IMMEDIATE`), which holds every writer of
//! the store for its short duration.

use std::time::Duration;

use chrono::Utc;
use sqlx::{Postgres, Sqlite, Transaction};
use uuid::Uuid;

use super::{Backend, EventStore};
use crate::event::{format_timestamp, StoreError};

/// An open source transaction holding a tenant's fence.
#[derive(Debug)]
pub struct FenceLock {
    tenant: Uuid,
    tx: Tx,
}

#[derive(Debug)]
enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

impl EventStore {
    /// Takes the tenant's fence, waiting at most `budget` for appends in flight (PostgreSQL
    /// `lock_timeout`; the same bound applies to each later statement of the transaction).
    pub async fn lock_fence(
        &self,
        tenant: Uuid,
        budget: Duration,
    ) -> Result<FenceLock, StoreError> {
        let millis = budget.as_millis().clamp(1, u128::from(u32::MAX));
        match &self.backend {
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query(&format!("SET LOCAL lock_timeout = {millis}"))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(&format!("SET LOCAL statement_timeout = {millis}"))
                    .execute(&mut *tx)
                    .await?;
                // The row exists since the migration started; create it if someone removed it.
                sqlx::query(
                    "INSERT INTO switchyard_fences (tenant_id, state, epoch, updated_at)
                     VALUES ($1, 'open', 0, now()) ON CONFLICT (tenant_id) DO NOTHING",
                )
                .bind(tenant)
                .execute(&mut *tx)
                .await?;
                sqlx::query("SELECT state FROM switchyard_fences WHERE tenant_id = $1 FOR UPDATE")
                    .bind(tenant)
                    .execute(&mut *tx)
                    .await?;
                Ok(FenceLock {
                    tenant,
                    tx: Tx::Postgres(tx),
                })
            }
            Backend::Sqlite(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                sqlx::query(
                    "INSERT INTO switchyard_fences (tenant_id, state, epoch, updated_at)
                     VALUES (?1, 'open', 0, ?2) ON CONFLICT (tenant_id) DO NOTHING",
                )
                .bind(tenant.to_string())
                .bind(format_timestamp(&Utc::now()))
                .execute(&mut *tx)
                .await?;
                Ok(FenceLock {
                    tenant,
                    tx: Tx::Sqlite(tx),
                })
            }
        }
    }
}

impl FenceLock {
    /// The fence's state as this transaction sees it: `(state, moved_to)`.
    pub async fn state(&mut self) -> Result<(String, Option<String>), StoreError> {
        Ok(match &mut self.tx {
            Tx::Postgres(tx) => {
                sqlx::query_as("SELECT state, moved_to FROM switchyard_fences WHERE tenant_id = $1")
                    .bind(self.tenant)
                    .fetch_one(&mut **tx)
                    .await?
            }
            Tx::Sqlite(tx) => {
                sqlx::query_as("SELECT state, moved_to FROM switchyard_fences WHERE tenant_id = ?1")
                    .bind(self.tenant.to_string())
                    .fetch_one(&mut **tx)
                    .await?
            }
        })
    }

    /// Sessions waiting behind this lock right now (writers the fence is holding). SQLite
    /// cannot tell: 0.
    pub async fn blocked_writers(&mut self) -> Result<i64, StoreError> {
        match &mut self.tx {
            Tx::Postgres(tx) => Ok(sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE pg_backend_pid() = ANY (pg_blocking_pids(pid))",
            )
            .fetch_one(&mut **tx)
            .await?),
            Tx::Sqlite(_) => Ok(0),
        }
    }

    /// Marks the fence moved to `target` under `epoch` and commits: from now on no append of
    /// the tenant lands in this store.
    pub async fn move_to(self, target: &str, epoch: i64) -> Result<(), StoreError> {
        match self.tx {
            Tx::Postgres(mut tx) => {
                sqlx::query(
                    "UPDATE switchyard_fences SET state = 'moved', moved_to = $2, epoch = $3, updated_at = now()
                     WHERE tenant_id = $1",
                )
                .bind(self.tenant)
                .bind(target)
                .bind(epoch)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
            Tx::Sqlite(mut tx) => {
                sqlx::query(
                    "UPDATE switchyard_fences SET state = 'moved', moved_to = ?2, epoch = ?3, updated_at = ?4
                     WHERE tenant_id = ?1",
                )
                .bind(self.tenant.to_string())
                .bind(target)
                .bind(epoch)
                .bind(format_timestamp(&Utc::now()))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Rolls back: the fence stays as it was, and held writers proceed.
    pub async fn release(self) -> Result<(), StoreError> {
        match self.tx {
            Tx::Postgres(tx) => tx.rollback().await?,
            Tx::Sqlite(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

impl EventStore {
    /// Opens a moved fence again (emergency stop: the tenant stays on this store). Waits for a
    /// cutover holding the fence to finish first.
    pub async fn reopen_fence(&self, tenant: Uuid) -> Result<bool, StoreError> {
        let changed = match &self.backend {
            Backend::Postgres(pool) => sqlx::query(
                "UPDATE switchyard_fences SET state = 'open', moved_to = NULL, updated_at = now()
                 WHERE tenant_id = $1 AND state = 'moved'",
            )
            .bind(tenant)
            .execute(pool)
            .await?
            .rows_affected(),
            Backend::Sqlite(pool) => sqlx::query(
                "UPDATE switchyard_fences SET state = 'open', moved_to = NULL, updated_at = ?2
                 WHERE tenant_id = ?1 AND state = 'moved'",
            )
            .bind(tenant.to_string())
            .bind(format_timestamp(&Utc::now()))
            .execute(pool)
            .await?
            .rows_affected(),
        };
        Ok(changed > 0)
    }

    /// Each listed stream's event count and last version here (absent streams are left out).
    pub async fn stream_heads(
        &self,
        tenant: Uuid,
        streams: &[(String, Uuid)],
    ) -> Result<std::collections::HashMap<(String, Uuid), (i64, i32)>, StoreError> {
        let mut out = std::collections::HashMap::new();
        if streams.is_empty() {
            return Ok(out);
        }
        let types: Vec<&str> = streams.iter().map(|s| s.0.as_str()).collect();
        let ids: Vec<Uuid> = streams.iter().map(|s| s.1).collect();
        match &self.backend {
            Backend::Postgres(pool) => {
                let rows: Vec<(String, Uuid, i64, i32)> = sqlx::query_as(
                    "SELECT e.aggregate_type, e.aggregate_id, count(*), max(e.version)
                       FROM unnest($2::text[], $3::uuid[]) AS s(aggregate_type, aggregate_id)
                       JOIN events e ON e.aggregate_type = s.aggregate_type AND e.aggregate_id = s.aggregate_id
                      WHERE e.tenant_id = $1
                      GROUP BY e.aggregate_type, e.aggregate_id",
                )
                .bind(tenant)
                .bind(&types)
                .bind(&ids)
                .fetch_all(pool)
                .await?;
                for (t, id, count, max) in rows {
                    out.insert((t, id), (count, max));
                }
            }
            Backend::Sqlite(pool) => {
                for (t, id) in streams {
                    let row: (i64, Option<i32>) = sqlx::query_as(
                        "SELECT count(*), max(version) FROM events
                          WHERE tenant_id = ?1 AND aggregate_type = ?2 AND aggregate_id = ?3",
                    )
                    .bind(tenant.to_string())
                    .bind(t)
                    .bind(id.to_string())
                    .fetch_one(pool)
                    .await?;
                    if let (count, Some(max)) = row {
                        out.insert((t.clone(), *id), (count, max));
                    }
                }
            }
        }
        Ok(out)
    }
}
