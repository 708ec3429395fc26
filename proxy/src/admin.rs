//! The proxy's admin port: the shared router (health, readiness, metrics, log level, the
//! token: [`switchyard_runtime::admin`]) with the proxy's own routes — the routing table,
//! reloads and the local override. Every call but `/healthz`, `/readyz` and `/metrics` needs
//! the configured bearer token: the routing table lists tenant ids.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{request, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use switchyard_runtime::admin::{self, AdminPort, Readiness, Ready};
use uuid::Uuid;

use crate::error::{json_response, ApiError, Body};
use crate::routing::{Route, UNKNOWN_STORE};
use crate::AppState;

/// How long `/readyz` and `/metrics` wait for each store to answer.
const READY_PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Most routes `GET /admin/routes` lists (the count is always given).
const LIST_LIMIT: usize = 1000;

/// The admin port's router: the shared one ([`switchyard_runtime::admin::router`]) extended
/// with the routing table, reloads and the local override.
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
    admin::router(state)
}

/// Readiness is this proxy's own state only: routing loaded and not draining. A store outage
/// must not take every application pod out of its Service (each sidecar gates its pod, and most
/// tenants are on other stores): per-store health is in the body and in
/// `switchyard_proxy_store_up`, and requests for a down store get 503 `store_unavailable`.
impl Readiness for AppState {
    async fn readiness(&self) -> Ready {
        let mut problems = Vec::new();
        if self.is_shutting_down() {
            problems.push("shutting down".to_owned());
        }
        if !self.routes.is_loaded() {
            problems.push("routing table not loaded yet".to_owned());
        }
        let mut details = serde_json::Map::new();
        details.insert("stores".into(), json!(check_stores(self).await));
        Ready { problems, details }
    }
}

impl AdminPort for AppState {
    fn admin_token(&self) -> &str {
        &self.config.proxy.admin_token
    }

    async fn metrics(&self) -> String {
        check_stores(self).await;
        self.metrics
            .routing_moved_tenants
            .set(i64::try_from(self.routes.moved_len()).unwrap_or(i64::MAX));
        self.metrics.render()
    }

    async fn route<'a>(
        &'a self,
        request: &'a request::Parts,
        segments: &'a [&'a str],
    ) -> Option<Response<Body>> {
        let reply = match route(self, &request.method, request.uri.path(), segments).await? {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
        Some(reply)
    }
}

/// The proxy's own admin routes (`None`: not one of them).
async fn route(
    state: &AppState,
    method: &Method,
    path: &str,
    segments: &[&str],
) -> Option<Result<Response<Body>, ApiError>> {
    Some(match (method, segments) {
        (&Method::GET, ["admin", "routes"]) => Ok(list_routes(state)),
        (&Method::GET, ["admin", "routes", tenant]) => route_of(state, tenant),
        (&Method::POST, ["admin", "routes", "reload"]) => {
            match crate::watcher::reload(state, "admin").await {
                Ok(epoch) => Ok(json_response(StatusCode::OK, &json!({ "epoch": epoch }))),
                Err(e) => Err(ApiError::StoreUnavailable {
                    store_id: "control".to_owned(),
                    source: Some(e),
                }),
            }
        }
        (&Method::POST, ["admin", "tenants", tenant, "resume-writes"]) => {
            match parse_tenant(tenant) {
                Ok(tenant) => {
                    let route = resume_writes(state, tenant).await;
                    let mut body = route_json(state, &tenant, &route);
                    body["local_override"] = json!(true);
                    body["note"] = json!("this proxy only, until the tenant's next routing change");
                    Ok(json_response(StatusCode::OK, &body))
                }
                Err(e) => Err(e),
            }
        }
        (_, ["admin", "tenants", _, "resume-writes"]) => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: "POST",
        }),
        (_, ["admin", "routes", ..]) => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: if path.ends_with("/reload") {
                "POST"
            } else {
                "GET"
            },
        }),
        _ => return None,
    })
}

fn parse_tenant(tenant: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(tenant).map_err(|_| {
        ApiError::bad_request("invalid_id", format!("tenant {tenant:?} is not a UUID"))
    })
}

/// `GET /admin/routes/{tenant}`: the tenant's route as this proxy holds it.
fn route_of(state: &AppState, tenant: &str) -> Result<Response<Body>, ApiError> {
    let tenant = parse_tenant(tenant)?;
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
