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
    loop {
        tokio::select! {
            _ = scan.tick() => {
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
            let (status, content_type, body) = match (request.method().as_str(), request.uri().path()) {
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
                (_, "/healthz" | "/readyz" | "/metrics") => {
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
