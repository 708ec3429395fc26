//! `switchyard-control serve`: the worker. Every second it looks for active migrations whose
//! claim is free (or expired: a replica died) and drives each one it claims; several replicas
//! share the work through those claims. It also continues cleanups whose driver stopped and
//! completes migrations whose undo window (`control.reverse_replication_hours`) ran out. Its
//! admin port serves `/healthz`, `/readyz`,
//! `/metrics` and the log level; its error replies have the proxy's shape
//! ([`switchyard_runtime::admin::error_body`]).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use switchyard_store::MigrationState;
use tokio::net::TcpListener;
use tokio::sync::watch;
use uuid::Uuid;

use crate::engine::{Driven, Engine};

/// How often the worker looks for migrations to drive.
const SCAN_EVERY: Duration = Duration::from_secs(1);
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
        admin_service(Arc::clone(&engine)),
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

/// The fleet-view metrics: migrations by state and the routing epoch, from the control
/// database (every replica exports the same view; dashboards take the max).
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
}

fn admin_service(
    engine: Arc<Engine>,
) -> impl tower::Service<
    Request<hyper::body::Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |request: Request<hyper::body::Incoming>| {
        let engine = Arc::clone(&engine);
        async move {
            let probe = matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics");
            let (status, content_type, body) = match (request.method().as_str(), request.uri().path()) {
                // Every call but the probes' needs the token when one is set (the proxy's rule).
                _ if !probe
                    && !switchyard_runtime::admin::bearer_authorized(request.headers(), &engine.settings.admin_token) =>
                {
                    error(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong bearer token".to_owned())
                }
                ("GET", "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
                ("GET", "/readyz") => match tokio::time::timeout(Duration::from_secs(1), engine.control.ping()).await {
                    Ok(Ok(())) => (StatusCode::OK, "application/json", r#"{"ready":true,"problems":[]}"#.to_owned()),
                    Ok(Err(e)) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "application/json",
                        serde_json::json!({"ready": false, "problems": [format!("control database: {e}")]}).to_string(),
                    ),
                    Err(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "application/json",
                        r#"{"ready":false,"problems":["control database did not answer within 1s"]}"#.to_owned(),
                    ),
                },
                ("GET", "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4", engine.metrics.render()),
                ("GET", "/admin/log-level") => (
                    StatusCode::OK,
                    "application/json",
                    serde_json::json!({ "filter": switchyard_runtime::telemetry::current_filter() }).to_string(),
                ),
                ("PUT" | "POST", "/admin/log-level") => set_log_level(request).await,
                (method, path @ ("/healthz" | "/readyz" | "/metrics" | "/admin/log-level")) => error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!(
                        "method {method} is not allowed here (allowed: {})",
                        if path == "/admin/log-level" { "GET, PUT" } else { "GET" }
                    ),
                ),
                (method, path) => error(StatusCode::NOT_FOUND, "not_found", format!("no such route: {method} {path}")),
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            Ok::<_, Infallible>(response)
        }
    })
}

/// An error reply in the shape both admin ports use; none of `serve`'s is worth a retry.
fn error(status: StatusCode, code: &str, message: String) -> (StatusCode, &'static str, String) {
    let body = switchyard_runtime::admin::error_body(code, &message, false);
    (
        status,
        "application/json",
        serde_json::Value::Object(body).to_string(),
    )
}

/// `PUT /admin/log-level` with `{"level": "debug"}` or `{"filter": "…"}` (the caller checked
/// the admin token).
async fn set_log_level(
    request: Request<hyper::body::Incoming>,
) -> (StatusCode, &'static str, String) {
    use http_body_util::BodyExt;
    let body = match http_body_util::Limited::new(request.into_body(), 4096)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "the body must be at most 4096 bytes".to_owned(),
            )
        }
    };
    match switchyard_runtime::telemetry::set_from_json(&body) {
        Ok(filter) => (
            StatusCode::OK,
            "application/json",
            serde_json::json!({ "filter": filter }).to_string(),
        ),
        Err(message) => error(StatusCode::BAD_REQUEST, "invalid_filter", message),
    }
}
