//! A proxy's admin port (docs/openapi/admin.yaml): readiness, the routing table and one
//! tenant's route, the Prometheus metrics text, and a routing reload.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{ApiError, ClientError};
use crate::transport::Transport;

/// The readiness answer (`GET /readyz`, 200 or 503).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Readiness {
    /// Whether it is ready.
    pub ready: bool,
    /// Why not.
    pub problems: Vec<String>,
    /// Each store's health (the proxy's port only).
    #[serde(default)]
    pub stores: Vec<StoreHealth>,
}

/// One store's health as the proxy saw it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StoreHealth {
    /// The store.
    pub id: String,
    /// Whether it answered within a second.
    pub reachable: bool,
    /// Why it did not.
    pub problem: Option<String>,
}

/// Where a tenant's requests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingState {
    /// Not migrating.
    Normal,
    /// Its events are being copied to a target.
    BulkCopy,
    /// Appends are mirrored to the target.
    DualWrite,
    /// Appends wait at the gate while the cutover runs.
    CutoverPaused,
}

/// One tenant's route on a proxy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Route {
    /// The tenant.
    pub tenant_id: Uuid,
    /// Its state.
    pub state: RoutingState,
    /// Where its writes and reads go.
    pub store_id: String,
    /// The migration's target.
    pub target_store_id: Option<String>,
    /// The routing epoch of its row (0 without one).
    pub epoch: i64,
    /// The migration in progress.
    pub migration_id: Option<Uuid>,
    /// False: the route names a store this proxy has not configured.
    pub store_configured: bool,
}

/// One tenant's route with what else the proxy says of it (mirror statistics, an override).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RouteDetail {
    /// The route.
    #[serde(flatten)]
    pub route: Route,
    /// The reply's other fields, as sent.
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

/// A proxy's routing table (`GET /admin/routes`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RouteList {
    /// The routing epoch in use.
    pub epoch: i64,
    /// Whether a table has been loaded.
    pub loaded: bool,
    /// The store of tenants without a routing row.
    pub default_store: String,
    /// Routing rows in the table.
    pub tenants: i64,
    /// Whether `routes` was cut at 1000.
    pub truncated: bool,
    /// The routes.
    pub routes: Vec<Route>,
}

/// The sum of a metric's samples (every label set) in Prometheus text, if it has any.
///
/// ```
/// let text = "# TYPE a_total counter\na_total{x=\"1\"} 2\na_total{x=\"2\"} 3\na_totals 9\n";
/// assert_eq!(switchyard_client::metric_sum(text, "a_total"), Some(5.0));
/// assert_eq!(switchyard_client::metric_sum(text, "b_total"), None);
/// ```
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once('}')?.1
            } else if rest.starts_with(' ') {
                rest
            } else {
                return None;
            };
            value.split_whitespace().next()?.parse().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A metric's samples in Prometheus text by the value of one label, summed over its other
/// labels (a sample without that label counts under `""`).
///
/// ```
/// let text = "m_total{outcome=\"ok\",x=\"1\"} 2\nm_total{outcome=\"ok\",x=\"2\"} 3\n\
///             m_total{outcome=\"failed\"} 1\nm_totals{outcome=\"ok\"} 9\n";
/// let by = switchyard_client::metric_by_label(text, "m_total", "outcome");
/// assert_eq!(by.get("ok"), Some(&5.0));
/// assert_eq!(by.get("failed"), Some(&1.0));
/// assert_eq!(by.len(), 2);
/// ```
pub fn metric_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = if let Some(labelled) = rest.strip_prefix('{') {
            let Some((labels, value)) = labelled.rsplit_once('}') else {
                continue;
            };
            (labels, value)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let Some(Ok(value)) = value.split_whitespace().next().map(str::parse::<f64>) else {
            continue;
        };
        let key = labels
            .split(',')
            .find_map(|l| {
                l.strip_prefix(label)?
                    .strip_prefix("=\"")?
                    .strip_suffix('"')
            })
            .unwrap_or_default();
        *out.entry(key.to_owned()).or_insert(0.0) += value;
    }
    out
}

/// The admin calls against one proxy's admin port (e.g. `http://127.0.0.1:7071`); give the
/// transport the admin token when one is configured.
#[derive(Debug, Clone)]
pub struct AdminClient {
    transport: Transport,
    base: Arc<str>,
}

impl AdminClient {
    /// A client of the admin port at `base`.
    pub fn new(base: &str) -> Self {
        Self::with_transport(Transport::default(), base)
    }

    /// A client of the admin port at `base` through `transport`.
    pub fn with_transport(transport: Transport, base: &str) -> Self {
        Self {
            transport,
            base: Arc::from(base.trim_end_matches('/')),
        }
    }

    /// The admin URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Readiness (a 503 is an answer: `ready` false with its problems).
    pub async fn ready(&self) -> Result<Readiness, ClientError> {
        let url = format!("{}/readyz", self.base);
        let reply = self.transport.get(&url).await?;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            if let Ok(r) = serde_json::from_slice(&reply.body) {
                return Ok(r);
            }
        }
        reply.expect(StatusCode::OK, &url)
    }

    /// The routing table.
    pub async fn routes(&self) -> Result<RouteList, ClientError> {
        let url = format!("{}/admin/routes", self.base);
        self.transport.get(&url).await?.expect(StatusCode::OK, &url)
    }

    /// One tenant's route.
    pub async fn route(&self, tenant: Uuid) -> Result<RouteDetail, ClientError> {
        let url = format!("{}/admin/routes/{tenant}", self.base);
        self.transport.get(&url).await?.expect(StatusCode::OK, &url)
    }

    /// The Prometheus metrics text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let url = format!("{}/metrics", self.base);
        let reply = self.transport.get(&url).await?;
        if reply.status != StatusCode::OK {
            return Err(ClientError::Api(ApiError::from_reply(
                reply.status,
                &reply.body,
            )));
        }
        String::from_utf8(reply.body.to_vec()).map_err(|e| ClientError::Decode {
            url,
            message: e.to_string(),
        })
    }

    /// Reloads routing from the control database now; answers the epoch in use.
    pub async fn reload(&self) -> Result<i64, ClientError> {
        /// The reload's answer.
        #[derive(Deserialize)]
        struct Reloaded {
            epoch: i64,
        }
        let url = format!("{}/admin/routes/reload", self.base);
        let reloaded: Reloaded = self
            .transport
            .send(Method::POST, &url, Bytes::new(), &[])
            .await?
            .expect(StatusCode::OK, &url)?;
        Ok(reloaded.epoch)
    }
}
