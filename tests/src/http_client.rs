//! A small HTTP client for the tests ([`Http`], HTTP/1.1 or h2c, replies as [`Reply`]), the
//! data plane's paths and append bodies, and a proxy's admin view of a route.

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::Value;
use switchyard_client::{Protocol, Transport};
use uuid::Uuid;

use crate::*;

/// A reply, with the body parsed as JSON when it is JSON.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub json: Value,
}

/// A keep-alive HTTP client (HTTP/1.1, or h2c with prior knowledge) for raw requests: the
/// `switchyard-client` transport, whose typed clients share its pool ([`Http::transport`]).
#[derive(Debug, Clone)]
pub struct Http {
    transport: Transport,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        Self {
            transport: Transport::new(Protocol::Http1),
        }
    }

    /// HTTP/2 over cleartext (prior knowledge), as the proxy serves on the same port.
    pub fn h2c() -> Self {
        Self {
            transport: Transport::new(Protocol::H2c),
        }
    }

    /// The transport, for `switchyard_client`'s typed clients.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// A typed data-plane client of the proxy at `base`, on this pool.
    pub fn data(&self, base: &str) -> switchyard_client::DataClient {
        switchyard_client::DataClient::with_transport(self.transport.clone(), base)
    }

    pub async fn request(
        &self,
        method: Method,
        url: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        let reply = self
            .transport
            .send(method, url, body.into(), headers)
            .await?;
        Ok(Reply {
            json: reply.json_value(),
            status: reply.status,
            headers: reply.headers,
            body: reply.body,
        })
    }

    pub async fn get(&self, url: &str) -> Result<Reply> {
        self.request(Method::GET, url, Bytes::new(), &[]).await
    }

    pub async fn post(&self, url: &str, body: &Value) -> Result<Reply> {
        self.request(Method::POST, url, serde_json::to_vec(body)?, &[])
            .await
    }
}

/// Paths of the data-plane API.
pub fn stream_url(base: &str, tenant: Uuid, aggregate_type: &str, aggregate_id: Uuid) -> String {
    format!("{base}/v1/tenants/{tenant}/streams/{aggregate_type}/{aggregate_id}/events")
}

pub fn feed_url(base: &str, tenant: Uuid) -> String {
    format!("{base}/v1/tenants/{tenant}/events")
}

/// An append body of `n` events of type `kind` with fresh ids.
pub fn events_body(expected_version: Option<i64>, n: usize, kind: &str) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|i| serde_json::json!({ "event_id": Uuid::new_v4(), "event_type": kind, "payload": { "i": i, "note": "x" } }))
        .collect();
    serde_json::json!({ "expected_version": expected_version, "events": events })
}

/// A proxy's admin view of a tenant's route (`GET /admin/routes/{tenant}`).
pub async fn route_state(http: &Http, proxy: &ProxyProcess, tenant: Uuid) -> Result<Value> {
    route_state_with(http, proxy, tenant, None).await
}

/// [`route_state`] from a proxy with an admin token (every admin read needs it).
pub async fn route_state_with(
    http: &Http,
    proxy: &ProxyProcess,
    tenant: Uuid,
    admin_token: Option<&str>,
) -> Result<Value> {
    let bearer = admin_token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    let url = format!("{}/admin/routes/{tenant}", proxy.admin);
    Ok(http
        .request(http::Method::GET, &url, Bytes::new(), &headers)
        .await?
        .json)
}
