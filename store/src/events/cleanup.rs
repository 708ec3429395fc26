//! Deleting a tenant's rows from a store it no longer uses, a batch at a time (issue 19's
//! `complete --cleanup` and `cleanup`). Only `events` rows of that one tenant: the tenant's
//! fence row stays, so a stale proxy or a direct writer is still refused (and followed) there.

use uuid::Uuid;

use super::EventStore;
use crate::dialect::on_backend;
use crate::event::StoreError;

impl EventStore {
    /// Deletes at most `limit` of `tenant`'s events here, oldest position first, in one short
    /// transaction; returns how many went (0: none left). Every row it touches is the
    /// tenant's, by the inner and the outer condition alike.
    pub async fn delete_tenant_batch(&self, tenant: Uuid, limit: u32) -> Result<u64, StoreError> {
        let sql = "DELETE FROM events WHERE tenant_id = $1 AND global_position IN (
                       SELECT global_position FROM events WHERE tenant_id = $1
                       ORDER BY global_position LIMIT $2)";
        Ok(on_backend!(self, |pool, d| {
            sqlx::query(sql)
                .bind(d.id(tenant))
                .bind(i64::from(limit))
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }
}
