//! Keeps the routing table current: a full load at start, then deltas (`epoch > current`) on
//! every `NOTIFY switchyard_routing`, on an epoch poll (the safety net when notifications are
//! lost, and the only mechanism on SQLite), and on demand (admin reload, a fenced append).
//! A failed reload keeps the old table and is counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_store::StoreError;
use tokio::sync::watch;

use crate::routing::{route_of, RoutingTable, StoreIdx};
use crate::AppState;

/// Longest any control-database call of the watcher may take. A control database that goes
/// silent without closing its connections would otherwise hold a call until the kernel gives
/// up on the connection (minutes), and with it the loop that reloads, polls and heartbeats —
/// and the writers waiting at a gate for a reload. The data plane never waits on this.
const CONTROL_CALL_TIMEOUT: Duration = Duration::from_secs(5);

async fn bounded<T, E: From<StoreError>>(
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    tokio::time::timeout(CONTROL_CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(StoreError::timed_out(CONTROL_CALL_TIMEOUT).into()))
}

/// Which reloads have begun, and how the last one ended: lets a caller join a reload instead
/// of running its own (see [`reload`]).
#[derive(Debug, Default)]
pub struct ReloadFlight {
    /// Reloads begun so far; incremented under `reload_lock` as a reload starts.
    started: AtomicU64,
    /// The last reload's outcome: its epoch, or its error's text.
    last: std::sync::Mutex<Option<Result<i64, String>>>,
}

impl ReloadFlight {
    fn last(&self) -> Result<i64, StoreError> {
        match self.last.lock().expect("not poisoned").clone() {
            Some(Ok(epoch)) => Ok(epoch),
            Some(Err(message)) => Err(StoreError::unavailable(message)),
            None => Err(StoreError::unavailable(
                "no routing reload has finished yet",
            )),
        }
    }
}

/// Applies every routing change newer than the table in use. Reloads are serialised so a slow
/// one can never publish an older table over a newer one, and coalesced (single flight): a
/// call that finds a reload already begun after it arrived, once it gets the lock, answers
/// with that reload's outcome instead of running another, since that reload read the control
/// database after every change this caller can have seen. So N appends hitting a moved fence
/// at once cost one reload (two at most), not N in a row.
pub async fn reload(state: &AppState, trigger: &'static str) -> Result<i64, StoreError> {
    let arrived = state.reload_flight.started.load(Ordering::Acquire);
    let _one_at_a_time = state.reload_lock.lock().await;
    if state.reload_flight.started.load(Ordering::Acquire) != arrived {
        state
            .metrics
            .routing_reloads
            .with_label_values(&[trigger, "joined"])
            .inc();
        return state.reload_flight.last();
    }
    state.reload_flight.started.fetch_add(1, Ordering::AcqRel);
    let result = reload_locked(state).await;
    *state.reload_flight.last.lock().expect("not poisoned") = Some(match &result {
        Ok(epoch) => Ok(*epoch),
        Err(e) => Err(e.to_string()),
    });
    let outcome = if result.is_ok() { "ok" } else { "error" };
    state
        .metrics
        .routing_reloads
        .with_label_values(&[trigger, outcome])
        .inc();
    if let Err(e) = &result {
        tracing::warn!(trigger, error = %e, "routing reload failed; keeping the current table");
    }
    result
}

async fn reload_locked(state: &AppState) -> Result<i64, StoreError> {
    let current = state.routes.load_full();
    // The epoch first: every change up to it has committed (changes commit in epoch order),
    // so the table may claim it even when the change was the default store's (no row).
    let head = bounded(state.control.routing_epoch()).await?;
    let default = recorded_default(state, current.default_route().store).await?;
    let full = !state.routes.is_loaded() || default != current.default_route().store;
    let since = if full { 0 } else { current.epoch() };
    let records = bounded(state.control.routes_since(since)).await?;
    if records.is_empty() && !full && head <= since {
        return Ok(since);
    }
    let epoch = records
        .iter()
        .map(|r| r.epoch)
        .max()
        .unwrap_or(0)
        .max(since)
        .max(head);
    let base = if full {
        RoutingTable::empty(default)
    } else {
        (*current).clone()
    };
    let index = |id: &str| state.store_index(id);
    let changes: Vec<_> = records
        .iter()
        .map(|record| {
            let route = route_of(record, index);
            if route.store == crate::routing::UNKNOWN_STORE
                || route.target == Some(crate::routing::UNKNOWN_STORE)
            {
                tracing::warn!(tenant.id = %record.tenant_id, store.id = %record.store_id,
                    "route names a store this proxy has not configured; its requests will get 503");
                state.metrics.routing_unknown_stores.inc();
            }
            (record.tenant_id, route)
        })
        .collect();
    let table = base.with_changes(changes, epoch);
    state.metrics.routing_epoch.set(table.epoch());
    state
        .metrics
        .routing_tenants
        .set(i64::try_from(table.len()).unwrap_or(i64::MAX));
    tracing::debug!(
        epoch = table.epoch(),
        changed = records.len(),
        full,
        "routing table replaced"
    );
    state.routes.store(table);
    Ok(epoch)
}

/// The default store the control database records, as this proxy's index; `in_use` while
/// none is recorded (or it names a store this proxy lacks, which is logged). When it is not
/// this config's `default_store`, the control database wins: a proxy started before the
/// default changed follows it rather than splitting row-less tenants between two stores.
async fn recorded_default(state: &AppState, in_use: StoreIdx) -> Result<StoreIdx, StoreError> {
    let Some(name) = bounded(state.control.default_store()).await? else {
        return Ok(in_use);
    };
    if name != state.config.default_store {
        tracing::warn!(recorded = %name, configured = %state.config.default_store,
            "{}", switchyard_config::default_store_mismatch(&state.config.default_store, &name));
    }
    Ok(state.store_index(&name).unwrap_or_else(|| {
        tracing::error!(recorded = %name, "the recorded default store is not configured on this proxy; keeping the one in use");
        in_use
    }))
}

/// Runs until `shutdown` flips: loads the table (retrying until the control database answers),
/// then follows notifications and polls.
pub async fn run(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    while !state.routes.is_loaded() {
        if reload(&state, "start").await.is_ok() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    if state.control.supports_notify() && state.config.proxy.routing_listen {
        tokio::spawn(listen(Arc::clone(&state), shutdown.clone()));
    }
    let mut poll = tokio::time::interval(state.config.proxy.routing_poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = heartbeat.tick() => report(&state).await,
            _ = poll.tick() => {
                match bounded(state.control.routing_epoch()).await {
                    Ok(epoch) if epoch > state.routes.load().epoch() => {
                        if reload(&state, "poll").await.is_ok() {
                            report(&state).await;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        state.metrics.routing_reloads.with_label_values(&["poll", "error"]).inc();
                        tracing::debug!(error = %e, "routing poll failed; keeping the current table");
                    }
                }
            }
            () = state.reload_now.notified() => {
                if reload(&state, "notify").await.is_ok() {
                    report(&state).await;
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// How often a proxy reports itself in the control database's `proxies` table.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// Reports this proxy's routing epoch and the tenants it mirrors (for `verify-post` and
/// operators) in `proxies`. A failure only logs: the data plane does not depend on it.
pub async fn report(state: &AppState) {
    let table = state.routes.load_full();
    let mirroring: Vec<String> = table
        .migrating()
        .filter(|(_, route)| route.state == switchyard_store::RoutingState::DualWrite)
        .take(1000)
        .map(|(tenant, _)| tenant.to_string())
        .collect();
    let details = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "mirroring_tenants": mirroring,
        "data_url": state.data_url.get(),
        "shutting_down": state.is_shutting_down(),
    });
    let admin_url = state.admin_url.get().map_or("", String::as_str);
    if let Err(e) = bounded(state.control.upsert_proxy(
        &state.proxy_id,
        admin_url,
        table.epoch(),
        Some(&details),
    ))
    .await
    {
        tracing::debug!(error = %e, "proxy heartbeat failed");
    }
}

/// LISTENs for routing notifications, reconnecting after a lost connection (and catching up,
/// since notifications sent meanwhile are gone).
async fn listen(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    loop {
        match bounded(state.control.routing_listener()).await {
            Ok(Some(mut listener)) => {
                state.reload_now.notify_one();
                loop {
                    tokio::select! {
                        note = listener.recv() => match note {
                            Ok(_) => state.reload_now.notify_one(),
                            Err(e) => {
                                tracing::warn!(error = %e, "routing listener lost; reconnecting");
                                break;
                            }
                        },
                        _ = shutdown.changed() => return,
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for routing changes; polling meanwhile")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Item 15 of issue 14: N appends hitting a moved fence at once reload routing once, not N
    /// times in a row under the lock (each up to 5 s when the control database is slow).
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_reloads_join_the_one_in_flight() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("switchyard-flight-{}", uuid::Uuid::new_v4()));
        let mut config = switchyard_config::Config {
            control_url: format!("sqlite://{}", dir.join("control.db").display()),
            ..switchyard_config::Config::default()
        };
        for store in &mut config.stores {
            store.url = format!(
                "sqlite://{}",
                dir.join(format!("{}.db", store.id)).display()
            );
        }
        let app = crate::App::build(config)?;
        app.prepare_embedded().await?;
        let state = Arc::clone(app.state());
        reload(&state, "start").await?;
        let count = |outcome: &str| {
            state
                .metrics
                .routing_reloads
                .with_label_values(&["fence", outcome])
                .get()
        };

        // A reload is in flight (it holds the lock) while 20 fenced appends ask for one.
        let held = state.reload_lock.lock().await;
        let mut waiters = Vec::new();
        for _ in 0..20 {
            let state = Arc::clone(&state);
            waiters.push(tokio::spawn(async move { reload(&state, "fence").await }));
        }
        // Let every waiter arrive and queue on the lock (one thread: they run now).
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        drop(held);
        for waiter in waiters {
            waiter.await??;
        }
        assert_eq!(count("ok"), 1, "one reload ran for all of them");
        assert_eq!(count("joined"), 19, "the others took its outcome");
        assert_eq!(count("error"), 0);

        // A call arriving after that reload finished runs its own: it may have seen a change
        // the finished one did not.
        reload(&state, "fence").await?;
        assert_eq!(count("ok"), 2);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
