//! Reverse replication (issue 19): after a cutover with reverse replication (the default;
//! `migrate start --no-reverse` or `control.reverse_replication = false` turn it off), the
//! store the tenant left is kept current, so the cutover can be undone without losing an
//! append. The route stays `normal` on the new store with the store the tenant left as its
//! target: proxies mirror each append acknowledged on the new store back to it, and this
//! reverse tail makes that complete — the forward tail's passes (stable horizon, target order,
//! copier rights through the fence's `copiers` state) with the direction swapped.

use switchyard_store::{PassWindow, RouteRecord};

use super::copy::TAIL_BATCH;
use super::{Engine, EngineError};

impl Engine {
    /// One reverse pass for every tenant under reverse replication (its route `normal` with a
    /// target). Failures are logged and retried on the next call. Returns the events copied.
    pub async fn reverse_passes(&self) -> usize {
        let routes = match self.control.reverse_routes().await {
            Ok(routes) => routes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the routes under reverse replication");
                return 0;
            }
        };
        let mut copied = 0;
        for route in &routes {
            match self.reverse_pass(route).await {
                Ok(n) => copied += n,
                Err(e) => {
                    tracing::warn!(tenant.id = %route.tenant_id, error = %e, "reverse replication pass failed; retrying");
                }
            }
        }
        self.forget_reverse_lags(&routes);
        copied
    }

    /// Drops the reverse lag of every tenant no longer under reverse replication (completed,
    /// moved on): a series left at its last value would say an undo is still possible.
    fn forget_reverse_lags(&self, routes: &[RouteRecord]) {
        use prometheus::core::Collector;
        let live: std::collections::HashSet<String> =
            routes.iter().map(|r| r.tenant_id.to_string()).collect();
        let stale: Vec<String> = self
            .metrics
            .reverse_lag
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .flat_map(|m| m.get_label())
            .filter(|l| l.name() == "tenant" && !live.contains(l.value()))
            .map(|l| l.value().to_owned())
            .collect();
        for tenant in stale {
            let _ = self.metrics.reverse_lag.remove_label_values(&[&tenant]);
        }
    }

    /// Copies the tenant's events of the store it lives in past the reverse horizon into the
    /// store it left, in position order, under the target-order rule; the horizon moves only
    /// when everything up to it landed. Then records the reverse lag.
    pub async fn reverse_pass(&self, route: &RouteRecord) -> Result<usize, EngineError> {
        let Some(left) = route.target_store_id.as_deref() else {
            return Ok(0);
        };
        let tenant = route.tenant_id;
        let from = self.store(&route.store_id)?;
        let into = self.store(left)?;
        let to = from
            .horizon()
            .await
            .map_err(EngineError::store(from.id()))?;
        let start = self.reverse_horizon(tenant, route.epoch);
        let window = match start {
            Some(start) => PassWindow {
                from: Some(start),
                to: to.max(start),
            },
            None => PassWindow::first(to),
        };
        let mut copied = 0;
        let mut complete = true;
        let mut after = 0;
        while !window.is_empty() {
            let batch = from
                .read_window(tenant, window, after, TAIL_BATCH)
                .await
                .map_err(EngineError::store(from.id()))?;
            if batch.is_empty() {
                break;
            }
            let landed = self.land(None, into, &batch).await?;
            copied += landed.inserted;
            if landed.prefix < batch.len() {
                // The rest waits for the next pass (a predecessor not there yet).
                complete = false;
                break;
            }
            after = landed.last_position;
        }
        if complete {
            self.reverse_horizons
                .lock()
                .expect("not poisoned")
                .insert((tenant, route.epoch), window.to);
        }
        self.metrics.copied(copied);
        let lag = self.reverse_lag(route).await?;
        self.metrics
            .reverse_lag
            .with_label_values(&[&tenant.to_string()])
            .set(lag);
        Ok(copied)
    }

    /// Events of the tenant in the store it lives in beyond those in the store it left (the
    /// two counts' difference, the store it lives in counted first: a progress figure; the
    /// revert's cutover verifies by identity).
    pub async fn reverse_lag(&self, route: &RouteRecord) -> Result<i64, EngineError> {
        let Some(left) = route.target_store_id.as_deref() else {
            return Ok(0);
        };
        let (from, into) = (self.store(&route.store_id)?, self.store(left)?);
        let lives = from
            .count_tenant(route.tenant_id)
            .await
            .map_err(EngineError::store(from.id()))?;
        let kept = into
            .count_tenant(route.tenant_id)
            .await
            .map_err(EngineError::store(into.id()))?;
        Ok((lives - kept).max(0))
    }

    /// Ends reverse replication of a completed migration: the tenant's route loses the store it
    /// left as its target (proxies stop mirroring back, the reverse tail stops), then that
    /// store's fence goes from `copiers` to `moved` (nobody writes the tenant there any more).
    /// Nothing to do when the route already changed (a later migration, `routing set`).
    pub async fn end_reverse_replication(
        &self,
        record: &switchyard_store::MigrationRecord,
    ) -> Result<(), EngineError> {
        let route = self
            .control
            .route(record.tenant_id)
            .await
            .map_err(EngineError::store("control"))?;
        let reversing = route.is_some_and(|r| {
            r.migration_state == switchyard_store::RoutingState::Normal
                && r.store_id == record.target_store_id
                && r.target_store_id.as_deref() == Some(record.source_store_id.as_str())
        });
        if reversing {
            self.control
                .set_route(&switchyard_store::RouteUpdate::normal(
                    record.tenant_id,
                    &record.target_store_id,
                ))
                .await
                .map_err(EngineError::store("control"))?;
        }
        let left = self.store(&record.source_store_id)?;
        let mut lock = left
            .lock_fence(record.tenant_id, self.settings.cutover_timeout)
            .await
            .map_err(EngineError::store(left.id()))?;
        let (state, moved_to) = lock.state().await.map_err(EngineError::store(left.id()))?;
        if state == switchyard_store::FenceState::Copiers.as_str()
            && moved_to.as_deref() == Some(record.target_store_id.as_str())
        {
            lock.move_to(
                &record.target_store_id,
                record.revision,
                switchyard_store::FenceState::Moved,
            )
            .await
            .map_err(EngineError::store(left.id()))?;
        } else {
            lock.release()
                .await
                .map_err(EngineError::store(left.id()))?;
        }
        Ok(())
    }

    /// Ends the reverse replication `route` (normal, with the store the tenant left as its
    /// target) stands for, before a new migration of the tenant starts: the migration that set
    /// it up is completed (its route and the left store's fence as `complete` leaves them, its
    /// `complete` audit row saying why). Refused when no unfinished migrated migration matches.
    pub(super) async fn end_previous_reverse_replication(
        &self,
        route: &RouteRecord,
        note: &switchyard_store::AuditNote,
    ) -> Result<(), EngineError> {
        let left = route.target_store_id.as_deref().unwrap_or_default();
        let previous = self
            .newest_migration_of(route.tenant_id, |m| {
                m.state == switchyard_store::MigrationState::Migrated
                    && m.finished_at.is_none()
                    && m.source_store_id == left
                    && m.target_store_id == route.store_id
            })
            .await?;
        let Some(previous) = previous else {
            return Err(EngineError::Refused(format!(
                "tenant {}'s route keeps store {left} current (normal on {}, target {left}) but no \
                 migrated, uncompleted migration of it set that up; set its route with \
                 `switchyard-control routing set` first",
                route.tenant_id, route.store_id
            )));
        };
        let note = note.clone().with_details(serde_json::json!({
            "ended_by": "migrate start",
            "reverse_replication_into": left,
        }));
        self.complete(previous.id, false, &note).await?;
        Ok(())
    }

    /// The horizon of the reverse replication the route of `epoch` set up: a later one (another
    /// cutover, maybe the other way) starts from the beginning, its positions another store's.
    fn reverse_horizon(&self, tenant: uuid::Uuid, epoch: i64) -> Option<i64> {
        self.reverse_horizons
            .lock()
            .expect("not poisoned")
            .get(&(tenant, epoch))
            .copied()
    }
}
