//! `switchyard-control serve`: the worker. Every second it looks for active migrations whose
//! claim is free (or expired: a replica died) and drives each one it claims; several replicas
//! share the work through those claims. Its admin port serves `/healthz`, `/readyz` and
//! `/metrics`.

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
    let admin_server = tokio::spawn(switchyard_proxy::server::serve(
        admin,
        admin_service(Arc::clone(&engine)),
        stop_rx.clone(),
        Duration::from_secs(1),
    ));
    let driving: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
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
                _ if !probe && !authorized(&engine, &request) => unauthorized(),
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
                    serde_json::json!({ "filter": switchyard_proxy::telemetry::current_filter() }).to_string(),
                ),
                ("PUT" | "POST", "/admin/log-level") => set_log_level(request).await,
                (_, "/healthz" | "/readyz" | "/metrics" | "/admin/log-level") => {
                    (StatusCode::METHOD_NOT_ALLOWED, "application/json", r#"{"error":"method_not_allowed"}"#.to_owned())
                }
                _ => (StatusCode::NOT_FOUND, "application/json", r#"{"error":"not_found"}"#.to_owned()),
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

/// Whether the request carries `control.admin_token` as its bearer token, compared in
/// constant time (always, when no token is configured).
fn authorized<B>(engine: &Engine, request: &Request<B>) -> bool {
    let expected = engine.settings.admin_token.as_bytes();
    let given = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .as_bytes();
    expected.is_empty() || switchyard_proxy::admin::constant_time_eq(given, expected)
}

fn unauthorized() -> (StatusCode, &'static str, String) {
    (
        StatusCode::UNAUTHORIZED,
        "application/json",
        r#"{"error":"unauthorized"}"#.to_owned(),
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
            return (
                StatusCode::BAD_REQUEST,
                "application/json",
                r#"{"error":"invalid_body"}"#.to_owned(),
            )
        }
    };
    match switchyard_proxy::telemetry::set_from_json(&body) {
        Ok(filter) => (
            StatusCode::OK,
            "application/json",
            serde_json::json!({ "filter": filter }).to_string(),
        ),
        Err(message) => (
            StatusCode::BAD_REQUEST,
            "application/json",
            serde_json::json!({ "error": "invalid_filter", "message": message }).to_string(),
        ),
    }
}
