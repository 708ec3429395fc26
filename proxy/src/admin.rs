//! The admin port: health, readiness, metrics, the routing table, reloads. Every call but
//! `/healthz`, `/readyz` and `/metrics` (probes and scrapers) needs the configured bearer token
//! (compared in constant time): the routing table lists tenant ids.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use uuid::Uuid;

use crate::error::{json_response, ApiError, Body};
use crate::routing::{Route, UNKNOWN_STORE};
use crate::AppState;

/// How long `/readyz` and `/metrics` wait for each store to answer.
const READY_PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Most routes `GET /admin/routes` lists (the count is always given).
const LIST_LIMIT: usize = 1000;

pub fn service(
    state: Arc<AppState>,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |request: Request<Incoming>| {
        let state = Arc::clone(&state);
        async move {
            Ok::<_, Infallible>(match handle(&state, request).await {
                Ok(response) => response,
                Err(e) => e.into_response(),
            })
        }
    })
}

async fn handle(state: &AppState, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if !matches!(segments.as_slice(), ["healthz" | "readyz" | "metrics"]) {
        authorize(state, &request)?;
    }
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => Ok(text(StatusCode::OK, "ok\n")),
        (&Method::GET, ["readyz"]) => Ok(ready(state).await),
        (&Method::GET, ["metrics"]) => {
            check_stores(state).await;
            state
                .metrics
                .routing_moved_tenants
                .set(i64::try_from(state.routes.moved_len()).unwrap_or(i64::MAX));
            let mut response = text(StatusCode::OK, &state.metrics.render());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(response)
        }
        (&Method::GET, ["admin", "routes"]) => Ok(list_routes(state)),
        (&Method::GET, ["admin", "routes", tenant]) => {
            let tenant = Uuid::parse_str(tenant).map_err(|_| {
                ApiError::bad_request("invalid_id", format!("tenant {tenant:?} is not a UUID"))
            })?;
            let table = state.routes.load();
            let has_row = table.row(&tenant).is_some();
            let mut body = route_json(state, &tenant, table.get(&tenant));
            body["has_row"] = json!(has_row);
            body["mirroring"] =
                json!(table.get(&tenant).state == switchyard_store::RoutingState::DualWrite);
            body["mirror"] = json!(state.mirror.stats(&tenant));
            body["table_epoch"] = json!(table.epoch());
            // A moved fence this proxy met before routing said so: where its reads go instead.
            body["reads_follow_fence_to"] = json!(state
                .routes
                .moved_to(&tenant, table.get(&tenant))
                .map(|to| state.store_name(to)));
            Ok(json_response(StatusCode::OK, &body))
        }
        (&Method::POST, ["admin", "routes", "reload"]) => {
            let epoch = crate::watcher::reload(state, "admin").await.map_err(|e| {
                ApiError::StoreUnavailable {
                    store_id: "control".to_owned(),
                    source: Some(e),
                }
            })?;
            Ok(json_response(StatusCode::OK, &json!({ "epoch": epoch })))
        }
        (&Method::POST, ["admin", "tenants", tenant, "resume-writes"]) => {
            let tenant = Uuid::parse_str(tenant).map_err(|_| {
                ApiError::bad_request("invalid_id", format!("tenant {tenant:?} is not a UUID"))
            })?;
            let route = resume_writes(state, tenant).await;
            let mut body = route_json(state, &tenant, &route);
            body["local_override"] = json!(true);
            body["note"] = json!("this proxy only, until the tenant's next routing change");
            Ok(json_response(StatusCode::OK, &body))
        }
        (&Method::GET, ["admin", "log-level"]) => Ok(json_response(
            StatusCode::OK,
            &json!({ "filter": switchyard_runtime::telemetry::current_filter() }),
        )),
        (&Method::PUT | &Method::POST, ["admin", "log-level"]) => {
            let body = read_small_body(request).await?;
            let filter = switchyard_runtime::telemetry::set_from_json(&body)
                .map_err(|m| ApiError::bad_request("invalid_filter", m))?;
            Ok(json_response(StatusCode::OK, &json!({ "filter": filter })))
        }
        (_, ["admin", "log-level"]) => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: "GET, PUT",
        }),
        (_, ["admin", "tenants", _, "resume-writes"]) => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: "POST",
        }),
        (_, ["healthz" | "readyz" | "metrics"] | ["admin", "routes", ..]) => {
            Err(ApiError::MethodNotAllowed {
                method: method.to_string(),
                allow: if path.ends_with("/reload") {
                    "POST"
                } else {
                    "GET"
                },
            })
        }
        _ => Err(ApiError::NotFound {
            method: method.to_string(),
            path,
        }),
    }
}

/// The emergency local override (runbook procedure 8 when the control database cannot be
/// reached): the tenant's route on this proxy becomes `normal` on the store it is routed to —
/// gate open, mirror off — until the control database next changes the tenant's route.
async fn resume_writes(state: &AppState, tenant: Uuid) -> Route {
    let _one_at_a_time = state.reload_lock.lock().await;
    let table = state.routes.load_full();
    let current = *table.get(&tenant);
    let route = Route {
        state: switchyard_store::RoutingState::Normal,
        target: None,
        migration_id: None,
        ..current
    };
    state
        .routes
        .store(table.with_changes([(tenant, route)], table.epoch()));
    tracing::warn!(tenant.id = %tenant, store = %state.store_name(route.store), "writes resumed by a local override");
    route
}

/// Most bytes an admin request body may carry.
const ADMIN_BODY_LIMIT: usize = 4096;

async fn read_small_body(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    http_body_util::Limited::new(request.into_body(), ADMIN_BODY_LIMIT)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_body",
                format!("the body must be at most {ADMIN_BODY_LIMIT} bytes"),
            )
        })
}

/// Checks `Authorization: Bearer <token>` when a token is configured.
pub fn authorize(state: &AppState, request: &Request<Incoming>) -> Result<(), ApiError> {
    if switchyard_runtime::admin::bearer_authorized(
        request.headers(),
        &state.config.proxy.admin_token,
    ) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Readiness is this proxy's own state only: routing loaded and not draining. A store outage
/// must not take every application pod out of its Service (each sidecar gates its pod, and most
/// tenants are on other stores): per-store health is in the body and in
/// `switchyard_proxy_store_up`, and requests for a down store get 503 `store_unavailable`.
async fn ready(state: &AppState) -> Response<Body> {
    let mut problems = Vec::new();
    if state.is_shutting_down() {
        problems.push("shutting down".to_owned());
    }
    if !state.routes.is_loaded() {
        problems.push("routing table not loaded yet".to_owned());
    }
    let stores = check_stores(state).await;
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &json!({ "ready": problems.is_empty(), "problems": problems, "stores": stores }),
    )
}

/// Pings every store at once (each for at most [`READY_PING_TIMEOUT`]), sets
/// `switchyard_proxy_store_up`, and describes each answer.
async fn check_stores(state: &AppState) -> Vec<serde_json::Value> {
    let pings = state.stores.iter().map(|store| async move {
        let problem = match tokio::time::timeout(READY_PING_TIMEOUT, store.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("unreachable: {e}")),
            Err(_) => Some(format!("no answer within {READY_PING_TIMEOUT:?}")),
        };
        state
            .metrics
            .store_up
            .with_label_values(&[store.id()])
            .set(i64::from(problem.is_none()));
        json!({ "id": store.id(), "reachable": problem.is_none(), "problem": problem })
    });
    futures_util::future::join_all(pings).await
}

fn list_routes(state: &AppState) -> Response<Body> {
    let table = state.routes.load();
    let routes: Vec<_> = table
        .iter()
        .take(LIST_LIMIT)
        .map(|(tenant, route)| route_json(state, tenant, route))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "epoch": table.epoch(),
            "loaded": state.routes.is_loaded(),
            "default_store": state.store_name(table.default_route().store),
            "tenants": table.len(),
            "truncated": table.len() > LIST_LIMIT,
            "routes": routes,
        }),
    )
}

fn route_json(state: &AppState, tenant: &Uuid, route: &Route) -> serde_json::Value {
    json!({
        "tenant_id": tenant,
        "state": route.state,
        "store_id": state.store_name(route.store),
        "target_store_id": route.target.map(|t| state.store_name(t)),
        "epoch": route.epoch,
        "migration_id": route.migration_id,
        "store_configured": route.store != UNKNOWN_STORE,
    })
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
