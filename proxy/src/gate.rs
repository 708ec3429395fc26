//! The writer gate: while a tenant's route is `cutover_paused`, its appends wait here, holding
//! no database connection and touching no other tenant, until the route changes or the wait
//! limit passes (then 503 `writes_paused` with Retry-After).

use std::time::Duration;

use switchyard_store::RoutingState;
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::ApiError;
use crate::routing::Route;
use crate::AppState;

/// How often a waiting writer asks the watcher to re-read the routing table.
const RECHECK: Duration = Duration::from_millis(250);

/// What a writer waits for.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// The tenant's route is not `cutover_paused`.
    Open,
    /// The route is open and newer than `epoch` (after a fence said the route is stale).
    OpenAfter { epoch: i64 },
}

/// Waits until the tenant's route satisfies `until`, and returns that route.
pub async fn wait(state: &AppState, tenant: Uuid, until: Until) -> Result<Route, ApiError> {
    let limit = state.config.proxy.gate_wait;
    let deadline = Instant::now() + limit;
    let mut changes = state.routes.subscribe();
    let satisfied = |route: &Route| {
        route.state != RoutingState::CutoverPaused
            && match until {
                Until::Open => true,
                Until::OpenAfter { epoch } => route.epoch > epoch,
            }
    };
    let route = *state.routes.load().get(&tenant);
    if satisfied(&route) {
        return Ok(route);
    }
    let started = std::time::Instant::now();
    state.metrics.gate_writers.inc();
    let _leave = scopeguard(|| state.metrics.gate_writers.dec());
    // While writers wait, the routing table is re-read every RECHECK (an incremental reload:
    // one query when nothing changed), so a proxy that missed the notification that opens the
    // gate (a lost LISTEN connection, a long poll interval, a reload that raced the cutover's
    // last routing change) does not hold its writers until the wait limit.
    let mut recheck = tokio::time::interval_at(Instant::now() + RECHECK, RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        // `changed` is marked seen before the route is read again, so a swap between the read
        // and the wait still wakes us.
        let changed = tokio::select! {
            changed = tokio::time::timeout_at(deadline, changes.changed()) => changed,
            _ = recheck.tick() => {
                state.reload_now.notify_one();
                continue;
            }
        };
        match changed {
            Ok(Ok(())) => {
                changes.borrow_and_update();
                let route = *state.routes.load().get(&tenant);
                if satisfied(&route) {
                    break Ok(route);
                }
            }
            Ok(Err(_)) | Err(_) => {
                break Err(ApiError::WritesPaused {
                    retry_after_s: limit.as_secs().max(1),
                })
            }
        }
    };
    state
        .metrics
        .gate_wait
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Runs `f` when dropped (also when the request is cancelled mid-wait).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
