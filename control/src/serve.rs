//! `switchyard-control serve`: the worker. Every second it looks for active migrations whose
//! claim is free (or expired: a replica died) and drives each one it claims; several replicas
//! share the work through those claims. It also continues cleanups whose driver stopped and
//! completes migrations whose undo window (`control.reverse_replication_hours`) ran out. Its
//! admin port is the shared router ([`switchyard_runtime::admin`]): `/healthz`, `/readyz`,
//! `/metrics` and the log level, with the proxy's token rule and error shape.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Response;
use switchyard_runtime::admin::{self, AdminPort, Readiness, Ready};
use switchyard_runtime::server::Body;
use switchyard_store::MigrationState;
use tokio::net::TcpListener;
use tokio::sync::watch;
use uuid::Uuid;

use crate::engine::{Driven, Engine};

/// How often the worker looks for migrations to drive.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// How long `/readyz` waits for the control database.
const READY_PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How often (in scans) the fleet-view metrics are refreshed from the control database.
const FLEET_EVERY_SCANS: u32 = 2;

/// Runs the worker until `shutdown` completes: stops driving (checkpoints kept, claims
/// released), then closes the admin port.
pub async fn run(
    engine: Engine,
    admin: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let engine = Arc::new(engine);
    engine.metrics.up.set(1.0);
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin_server = tokio::spawn(switchyard_runtime::server::serve(
        admin,
        admin::router::<_, hyper::body::Incoming>(Arc::new(Admin(Arc::clone(&engine)))),
        stop_rx.clone(),
        Duration::from_secs(1),
    ));
    let driving: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    // Cleanups this process is running (by migration id), apart from the migrations it drives.
    let cleaning: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut scan = tokio::time::interval(SCAN_EVERY);
    tokio::pin!(shutdown);
    let mut scans = 0_u32;
    loop {
        tokio::select! {
            _ = scan.tick() => {
                if scans == 0 {
                    refresh_fleet(&engine).await;
                }
                scans = (scans + 1) % FLEET_EVERY_SCANS;
                complete_expired(&engine).await;
                resume_cleanups(&engine, &cleaning, &mut tasks, &stop_rx).await;
                let claimable = match engine.control.claimable(&engine.worker).await {
                    Ok(records) => records,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list migrations to drive");
                        continue;
                    }
                };
                for record in claimable {
                    // A paused migration has nothing to drive until it is resumed.
                    if record.state == MigrationState::Paused {
                        continue;
                    }
                    if !driving.lock().expect("not poisoned").insert(record.id) {
                        continue;
                    }
                    let (engine, driving, stop) = (Arc::clone(&engine), Arc::clone(&driving), stop_rx.clone());
                    tasks.spawn(async move {
                        engine.metrics.migrations_driven.inc();
                        let id = record.id;
                        let result = engine.drive(id, &stop, &|_| {}).await;
                        match &result {
                            Ok(Driven::ClaimLost) => tracing::debug!(migration.id = %id, "claimed by another worker"),
                            Ok(outcome) => tracing::info!(migration.id = %id, ?outcome, "stopped driving"),
                            Err(e) => {
                                tracing::warn!(migration.id = %id, error = %e, "driving failed; retrying on the next scan");
                                let _ = engine.control.set_error(id, Some(&e.to_string())).await;
                            }
                        }
                        engine.metrics.migrations_driven.dec();
                        driving.lock().expect("not poisoned").remove(&id);
                    });
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down: stopping drivers at their next batch boundary");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let _ = admin_server.await;
    engine.control.close().await;
}

/// The audit note of what `serve` does by itself.
fn worker_note(engine: &Engine, reason: &str) -> switchyard_store::AuditNote {
    switchyard_store::AuditNote::new(format!("serve:{}", engine.worker)).with_reason(reason)
}

/// Completes the migrations whose undo window (`control.reverse_replication_hours`) ran out.
async fn complete_expired(engine: &Engine) {
    let note = worker_note(engine, "reverse_replication_hours passed since the cutover");
    match engine.complete_expired(&note).await {
        Ok(done) => {
            for id in done {
                tracing::info!(migration.id = %id, "completed: reverse_replication_hours passed since the cutover");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot complete migrations whose undo window ended"),
    }
}

/// Continues every cleanup nobody runs (its driver died or was stopped), one task each.
async fn resume_cleanups(
    engine: &Arc<Engine>,
    cleaning: &Arc<Mutex<HashSet<Uuid>>>,
    tasks: &mut tokio::task::JoinSet<()>,
    stop: &watch::Receiver<bool>,
) {
    let claimable = match engine.control.claimable_cleanups(&engine.worker).await {
        Ok(records) => records,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list cleanups to continue");
            return;
        }
    };
    for cleanup in claimable {
        let id = cleanup.migration_id;
        if !cleaning.lock().expect("not poisoned").insert(id) {
            continue;
        }
        let (engine, cleaning, stop) = (Arc::clone(engine), Arc::clone(cleaning), stop.clone());
        tasks.spawn(async move {
            let note = worker_note(&engine, "cleanup continued by serve");
            match engine.run_cleanup(id, &stop, &note).await {
                Ok(outcome) => tracing::info!(migration.id = %id, ?outcome, "cleanup stopped"),
                Err(e) => tracing::warn!(migration.id = %id, error = %e, "cleanup failed; retrying on the next scan"),
            }
            cleaning.lock().expect("not poisoned").remove(&id);
        });
    }
}

/// A proxy whose last heartbeat is older than this is taken off the `proxies` table (it
/// reports every 2 s while alive).
const PROXY_FORGOTTEN_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The fleet-view metrics: migrations by state, the routing epoch and the running cleanups,
/// from the control database (every replica exports the same view; dashboards take the max).
async fn refresh_fleet(engine: &Engine) {
    match engine.control.prune_proxies(PROXY_FORGOTTEN_AFTER).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(proxies = n, "forgot proxies silent for a day"),
        Err(e) => tracing::warn!(error = %e, "cannot prune the proxies table"),
    }
    let migrations = engine.control.migrations(false).await;
    let epoch = engine.control.routing_epoch().await;
    match (migrations, epoch) {
        (Ok(all), Ok(epoch)) => engine.metrics.observe_fleet(&all, epoch),
        (Err(e), _) => tracing::warn!(error = %e, "cannot list migrations for the metrics"),
        (_, Err(e)) => tracing::warn!(error = %e, "cannot read the routing epoch for the metrics"),
    }
    match engine.control.running_cleanups(None).await {
        Ok(running) => engine.metrics.observe_cleanups(&running),
        Err(e) => tracing::warn!(error = %e, "cannot list cleanups for the metrics"),
    }
}

/// `serve`'s admin port: the shared router with no routes of its own; ready while the
/// control database answers within a second.
struct Admin(Arc<Engine>);

impl Readiness for Admin {
    async fn readiness(&self) -> Ready {
        let problem = match tokio::time::timeout(READY_PING_TIMEOUT, self.0.control.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("control database: {e}")),
            Err(_) => Some("control database did not answer within 1s".to_owned()),
        };
        Ready {
            problems: problem.into_iter().collect(),
            details: serde_json::Map::new(),
        }
    }
}

impl AdminPort for Admin {
    fn admin_token(&self) -> &str {
        &self.0.settings.admin_token
    }

    async fn metrics(&self) -> String {
        self.0.metrics.render()
    }

    async fn route<'a>(
        &'a self,
        _request: &'a http::request::Parts,
        _segments: &'a [&'a str],
    ) -> Option<Response<Body>> {
        None
    }
}
