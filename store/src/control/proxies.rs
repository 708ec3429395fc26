//! `proxies`: each proxy's heartbeat (its admin URL, the routing epoch it has applied, and
//! what it reports about itself), so the control plane knows the fleet.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::migrations::MigrationError;
use super::ControlDb;
use crate::dialect::{on_backend, Columns};
use crate::event::StoreError;

/// A `proxies` row: a live proxy's heartbeat.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProxyRecord {
    pub proxy_id: String,
    pub admin_url: String,
    pub routing_epoch: i64,
    pub last_seen: DateTime<Utc>,
    pub details: Option<ProxyDetails>,
}

/// What a proxy reports about itself with each heartbeat (the `details` JSON column). Every
/// field has a default, so a row written by an older or newer proxy still reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ProxyDetails {
    /// The proxy's version.
    pub version: Option<String>,
    /// Tenants the proxy mirrors to a target (routed `dual_write`), at most a thousand:
    /// `verify-post` checks none still mirrors a migrated tenant.
    pub mirroring_tenants: Vec<Uuid>,
    /// The proxy's data-plane URL, where `verify-post` reads through it.
    pub data_url: Option<String>,
    /// Whether the proxy is draining for shutdown.
    pub shutting_down: bool,
}

fn decode_proxy(row: &impl Columns) -> Result<ProxyRecord, StoreError> {
    Ok(ProxyRecord {
        proxy_id: row.text("proxy_id")?,
        admin_url: row.text("admin_url")?,
        routing_epoch: row.int("routing_epoch")?,
        last_seen: row.time("last_seen")?,
        details: row
            .opt_json("details")?
            .map(|details| {
                serde_json::from_value(details)
                    .map_err(|e| StoreError::Corrupt(format!("proxies.details: {e}")))
            })
            .transpose()?,
    })
}

impl ControlDb {
    /// A proxy's heartbeat: its admin URL and the routing epoch it has applied.
    pub async fn upsert_proxy(
        &self,
        proxy_id: &str,
        admin_url: &str,
        routing_epoch: i64,
        details: Option<&ProxyDetails>,
    ) -> Result<(), MigrationError> {
        on_backend!(self, |pool, d| {
            let sql = format!(
                "INSERT INTO proxies (proxy_id, admin_url, routing_epoch, last_seen, details)
                 VALUES ($1, $2, $3, {now}, $4)
                 ON CONFLICT (proxy_id) DO UPDATE SET admin_url = excluded.admin_url,
                     routing_epoch = excluded.routing_epoch, last_seen = excluded.last_seen,
                     details = excluded.details",
                now = d.now()
            );
            sqlx::query(&sql)
                .bind(proxy_id)
                .bind(admin_url)
                .bind(routing_epoch)
                .bind(details.map(sqlx::types::Json))
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Forgets proxies whose last heartbeat is older than `age` (replaced pods, proxies long
    /// gone), so the table holds the fleet rather than its history. Returns how many went.
    pub async fn prune_proxies(&self, age: std::time::Duration) -> Result<u64, MigrationError> {
        Ok(on_backend!(self, |pool, d| {
            let sql = format!("DELETE FROM proxies WHERE last_seen < {}", d.now_plus("$1"));
            sqlx::query(&sql)
                .bind(-age.as_secs_f64())
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// Every proxy that ever sent a heartbeat, by id; `last_seen` tells which are live.
    pub async fn proxies(&self) -> Result<Vec<ProxyRecord>, MigrationError> {
        let sql = "SELECT proxy_id, admin_url, routing_epoch, last_seen, details
                   FROM proxies ORDER BY proxy_id";
        Ok(on_backend!(self, |pool, _d| {
            sqlx::query(sql)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_proxy)
                .collect::<Result<Vec<_>, _>>()?
        }))
    }
}
