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

#[cfg(test)]
mod tests {
    //! The gate on the real `AppState` (SQLite files, no server) under paused time: the wait
    //! limit and the rechecks pass in virtual time, so each test takes milliseconds.

    use std::sync::Arc;

    use super::*;
    use crate::testing::TestApp;

    fn route(state: &AppState, routing: RoutingState, epoch: i64) -> Route {
        Route {
            state: routing,
            epoch,
            ..Route::normal(state.default_store)
        }
    }

    /// Publishes a table where `tenant` has `route`, as a reload would.
    fn publish(state: &AppState, tenant: Uuid, route: Route) {
        let table = state
            .routes
            .load_full()
            .with_changes([(tenant, route)], route.epoch);
        state.routes.store(table);
    }

    /// Lets spawned tasks run until `n` writers wait at the gate (a writer that never waits
    /// fails the test here instead of hanging it).
    async fn until_waiting(state: &AppState, n: i64) {
        for _ in 0..1000 {
            if state.metrics.gate_writers.get() == n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{n} writer(s) never waited at the gate");
    }

    /// A writer of a fresh tenant whose route is `first`, waiting at the gate for `until`.
    async fn waiting_writer(
        state: &Arc<AppState>,
        first: Route,
        until: Until,
    ) -> (Uuid, tokio::task::JoinHandle<Result<Route, ApiError>>) {
        let tenant = Uuid::new_v4();
        publish(state, tenant, first);
        let waiter = {
            let state = Arc::clone(state);
            tokio::spawn(async move { wait(&state, tenant, until).await })
        };
        until_waiting(state, 1).await;
        (tenant, waiter)
    }

    /// The gate reads only the routing table: no database is touched (a pool's timeouts
    /// would pass at once in paused time).
    fn app() -> anyhow::Result<TestApp> {
        TestApp::build(|config| config.proxy.gate_wait = std::time::Duration::from_millis(5000))
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_at_a_gate_that_stays_closed_is_refused_writes_paused_at_the_limit(
    ) -> anyhow::Result<()> {
        let app = app()?;
        let state = app.state();
        let tenant = Uuid::new_v4();
        publish(state, tenant, route(state, RoutingState::CutoverPaused, 1));
        let refused = wait(state, tenant, Until::Open).await;
        assert!(
            matches!(refused, Err(ApiError::WritesPaused { retry_after_s: 5 })),
            "{refused:?}"
        );
        assert_eq!(
            state.metrics.gate_writers.get(),
            0,
            "the writer left the gate"
        );
        assert_eq!(state.metrics.gate_wait.get_sample_count(), 1);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_writer_goes_on_with_the_route_that_opens_the_gate() -> anyhow::Result<()> {
        let app = app()?;
        let state = Arc::clone(app.state());
        let closed = route(&state, RoutingState::CutoverPaused, 1);
        let (tenant, waiter) = waiting_writer(&state, closed, Until::Open).await;
        // Another tenant's change wakes the writer, which looks again and keeps waiting.
        publish(
            &state,
            Uuid::new_v4(),
            route(&state, RoutingState::Normal, 2),
        );
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "still closed for this tenant");
        let open = route(&state, RoutingState::Normal, 3);
        publish(&state, tenant, open);
        let passed = waiter.await?;
        assert_eq!(
            passed.ok(),
            Some(open),
            "the writer goes on with the new route"
        );
        assert_eq!(state.metrics.gate_writers.get(), 0);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_moved_fence_a_writer_waits_for_a_newer_route_not_just_an_open_one(
    ) -> anyhow::Result<()> {
        let app = app()?;
        let state = Arc::clone(app.state());
        let stale = route(&state, RoutingState::Normal, 4);
        let (tenant, waiter) = waiting_writer(&state, stale, Until::OpenAfter { epoch: 4 }).await;
        publish(&state, tenant, stale);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !waiter.is_finished(),
            "an open route of the same epoch is the stale one"
        );
        let newer = route(&state, RoutingState::Normal, 5);
        publish(&state, tenant, newer);
        assert_eq!(waiter.await?.ok(), Some(newer));
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_writer_asks_the_watcher_for_a_reload_every_recheck() -> anyhow::Result<()> {
        let app = app()?;
        let state = Arc::clone(app.state());
        let closed = route(&state, RoutingState::CutoverPaused, 1);
        let (_, waiter) = waiting_writer(&state, closed, Until::Open).await;
        // A proxy that missed the notification opening the gate must not hold its writers
        // until the limit: each recheck pokes the watcher.
        for _ in 0..3 {
            tokio::time::timeout(RECHECK * 2, state.reload_now.notified())
                .await
                .expect("a reload is asked for within a recheck period");
        }
        assert!(!waiter.is_finished());
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(
            state.metrics.gate_writers.get(),
            0,
            "a cancelled writer leaves the gate"
        );
        Ok(())
    }
}
