//! Fairness during a migration: requests of migrating tenants may hold together at most
//! `proxy.migrating_tenant_share` of the proxy's request slots (`max_concurrent_requests`) and
//! of each store's connections (`max_connections`), so a hot tenant's cutover cannot shed
//! other tenants.
//!
//! A cutover holds the tenant's fence row in the source; appends of a proxy that has not heard
//! of it yet block on that row inside the store, each holding a pool connection, and writers
//! of a proxy that has heard wait at the gate, each holding a request slot. Without a bound,
//! enough of them take every connection of the source's pool (other tenants then time out
//! waiting for one) or every request slot (other tenants are shed with 503 `overloaded`).
//!
//! The budget is shared by all migrating tenants, not given to each: one share per tenant
//! would let two tenants migrating at once take everything again. Past it, only the migrating
//! tenants' requests are refused (503 `tenant_overloaded`, retryable, with Retry-After).

use std::sync::Arc;
use std::time::Duration;

use switchyard_store::RoutingState;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::metrics::ProxyMetrics;
use crate::routing::{Route, StoreIdx};

/// What a shed request was refused for: the `reason` label of
/// `switchyard_proxy_shed_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// `max_concurrent_requests` reached (503 `overloaded`).
    ConcurrencyLimit,
    /// A migrating tenant at its share of the request slots (503 `tenant_overloaded`).
    MigratingRequests,
    /// A migrating tenant's append found its share of the store's connections busy for the
    /// whole wait (503 `tenant_overloaded`).
    MigratingConnections,
    /// The per-client rate limit (429 `rate_limited`).
    RateLimit,
}

impl Shed {
    pub const ALL: [Self; 4] = [
        Self::ConcurrencyLimit,
        Self::MigratingRequests,
        Self::MigratingConnections,
        Self::RateLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConcurrencyLimit => "concurrency_limit",
            Self::MigratingRequests => "migrating_tenant_requests",
            Self::MigratingConnections => "migrating_tenant_connections",
            Self::RateLimit => "rate_limit",
        }
    }
}

/// Whether requests on `route` count against the migrating tenants' share.
pub fn is_migrating(route: &Route) -> bool {
    route.state != RoutingState::Normal
}

/// How many of `total` a share allows: `ceil(share × total)`, at least 1, and below `total`
/// when the share is below 1 (so other tenants always keep one).
pub fn share_of(share: f64, total: usize) -> usize {
    if share >= 1.0 || total <= 1 {
        return total;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let allowed = (share * total as f64).ceil() as usize;
    allowed.clamp(1, total - 1)
}

/// The migrating tenants' budgets of request slots and of store connections.
#[derive(Debug)]
pub struct Fairness {
    /// Request slots migrating tenants hold now; `None` when the share is 1 (no bound).
    slots: Option<Arc<Semaphore>>,
    /// Per store, in config order: connections their appends may hold at once.
    connections: Vec<Option<Arc<Semaphore>>>,
    /// How long an append of a migrating tenant waits for one of those connections.
    connection_wait: Duration,
    metrics: ProxyMetrics,
}

impl Fairness {
    /// Budgets of `share` of `max_requests` and of each of `pool_sizes`.
    pub fn new(
        share: f64,
        max_requests: usize,
        pool_sizes: impl IntoIterator<Item = u32>,
        connection_wait: Duration,
        metrics: ProxyMetrics,
    ) -> Self {
        let bound =
            |total: usize| (share < 1.0).then(|| Arc::new(Semaphore::new(share_of(share, total))));
        Self {
            slots: bound(max_requests),
            connections: pool_sizes
                .into_iter()
                .map(|size| bound(usize::try_from(size).unwrap_or(usize::MAX)))
                .collect(),
            connection_wait,
            metrics,
        }
    }

    /// A request slot for a request of a tenant on `route`: nothing to take on a normal route;
    /// on a migrating one a share slot, held until the permit drops, or 503
    /// `tenant_overloaded` at once when the share is taken (a refusal now frees the proxy-wide
    /// slot this request holds, where queueing would keep it).
    pub fn request_slot(&self, route: &Route) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        match &self.slots {
            Some(slots) if is_migrating(route) => match Arc::clone(slots).try_acquire_owned() {
                Ok(permit) => Ok(Some(permit)),
                Err(_) => Err(self.shed(Shed::MigratingRequests, "request slots")),
            },
            _ => Ok(None),
        }
    }

    /// A connection of `store`'s share for an append on `route`, taken before the store's pool
    /// is asked: appends blocked on a fence row hold at most the share of the pool. Waits up
    /// to the connection wait (`proxy.gate_wait_ms`, the patience a writer gets at a closed
    /// gate), then 503 `tenant_overloaded`.
    pub async fn connection(
        &self,
        route: &Route,
        store: StoreIdx,
    ) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        let Some(Some(connections)) = self.connections.get(usize::from(store)) else {
            return Ok(None);
        };
        if !is_migrating(route) {
            return Ok(None);
        }
        let acquiring = Arc::clone(connections).acquire_owned();
        match tokio::time::timeout(self.connection_wait, acquiring).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            // The semaphore is never closed; a timeout is the only other way out.
            Ok(Err(_)) | Err(_) => {
                Err(self.shed(Shed::MigratingConnections, "connections to its store"))
            }
        }
    }

    fn shed(&self, reason: Shed, resource: &'static str) -> ApiError {
        self.metrics.shed(reason);
        ApiError::TenantOverloaded { resource }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn route(state: RoutingState) -> Route {
        Route {
            state,
            store: 0,
            target: Some(1),
            epoch: 1,
            migration_id: Some(Uuid::nil()),
        }
    }

    #[test]
    fn shares_round_up_and_leave_others_at_least_one() {
        assert_eq!(share_of(0.5, 1024), 512);
        assert_eq!(share_of(0.5, 7), 4);
        assert_eq!(share_of(0.01, 8), 1);
        assert_eq!(share_of(0.9, 2), 1, "others keep one");
        assert_eq!(share_of(0.5, 1), 1);
        assert_eq!(share_of(1.0, 8), 8);
    }

    /// Migrating tenants together hold at most their share of the slots; a normal route never
    /// takes one and is never refused; a released slot is free again.
    #[test]
    fn migrating_requests_are_refused_past_their_share_and_others_never() {
        let metrics = ProxyMetrics::new();
        let fairness = Fairness::new(0.5, 8, [4], Duration::ZERO, metrics.clone());
        let (gated, dual) = (
            route(RoutingState::CutoverPaused),
            route(RoutingState::DualWrite),
        );
        let held: Vec<_> = (0..4)
            .map(|i| {
                let r = if i % 2 == 0 { &gated } else { &dual };
                fairness.request_slot(r).expect("within the share")
            })
            .collect();
        assert!(held.iter().all(Option::is_some));
        let refused = fairness.request_slot(&dual).expect_err("share taken");
        assert!(matches!(refused, ApiError::TenantOverloaded { .. }));
        for _ in 0..100 {
            assert!(fairness
                .request_slot(&Route::normal(0))
                .expect("never refused")
                .is_none());
        }
        drop(held);
        assert!(fairness.request_slot(&gated).expect("freed").is_some());
        assert_eq!(metrics.shed_count(Shed::MigratingRequests), 1);
    }

    /// Appends of migrating tenants hold at most the share of a store's connections and give
    /// up after the wait; a normal tenant's append takes none; the bound is per store.
    #[tokio::test]
    async fn migrating_appends_hold_at_most_their_share_of_a_pool() {
        let metrics = ProxyMetrics::new();
        let fairness = Fairness::new(0.5, 8, [4, 2], Duration::from_millis(20), metrics.clone());
        let dual = route(RoutingState::DualWrite);
        let a = fairness.connection(&dual, 0).await.expect("1 of 2");
        let b = fairness.connection(&dual, 0).await.expect("2 of 2");
        assert!(a.is_some() && b.is_some());
        let refused = fairness.connection(&dual, 0).await.expect_err("share busy");
        assert!(matches!(refused, ApiError::TenantOverloaded { .. }));
        assert!(fairness
            .connection(&Route::normal(0), 0)
            .await
            .expect("normal")
            .is_none());
        assert!(
            fairness
                .connection(&dual, 1)
                .await
                .expect("other store")
                .is_some(),
            "each store has its own share"
        );
        assert!(
            fairness
                .connection(&dual, 9)
                .await
                .expect("unknown store")
                .is_none(),
            "a store this proxy lacks fails later, not here"
        );
        drop(a);
        assert!(fairness
            .connection(&dual, 0)
            .await
            .expect("freed")
            .is_some());
        assert_eq!(metrics.shed_count(Shed::MigratingConnections), 1);
        let off = Fairness::new(1.0, 8, [4], Duration::ZERO, ProxyMetrics::new());
        assert!(off.request_slot(&dual).expect("no bound").is_none());
        assert!(off.connection(&dual, 0).await.expect("no bound").is_none());
    }
}
