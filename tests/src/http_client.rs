//! A small HTTP client for the tests ([`Http`], HTTP/1.1 or h2c, replies as [`Reply`]), the
//! data plane's paths and append bodies, and a proxy's admin view of a route.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
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

/// A keep-alive HTTP client (HTTP/1.1, or h2c with prior knowledge).
#[derive(Debug, Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// HTTP/2 over cleartext (prior knowledge), as the proxy serves on the same port.
    pub fn h2c() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    pub async fn request(
        &self,
        method: Method,
        url: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        let mut builder = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let body: Bytes = body.into();
        if !body.is_empty() {
            builder = builder.header("content-type", "application/json");
        }
        let response = self.client.request(builder.body(Full::new(body))?).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            headers,
            body,
            json,
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
