//! Telling every live proxy directly that the tenant's route changed (the cutover's gates),
//! so a gate closes or opens within one local HTTP round trip rather than whenever NOTIFY or
//! the poll gets there: `POST {admin_url}/admin/routes/reload` to each proxy whose heartbeat
//! in the `proxies` table is recent, all at once, with the admin token when one is set, each
//! bounded by [`CALL_TIMEOUT`].
//!
//! Only ever a shortcut: a call that fails or times out is logged at debug level and nothing
//! else happens. NOTIFY and the poll still bring the change, and the fence, not the gate,
//! keeps a proxy that never hears of it from writing past the cutover.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::Engine;

/// A proxy whose heartbeat is older than this is not told (it is gone, or cannot reach the
/// control database, whose table it would reload from anyway).
const LIVE: Duration = Duration::from_secs(10);
/// Longest one proxy's call may take. A proxy this slow learns by NOTIFY or the poll.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// The HTTP client and admin token the engine tells proxies with.
#[derive(Clone, Debug)]
pub(super) struct ProxyCaller {
    client: Client<HttpConnector, Full<Bytes>>,
    token: String,
}

/// The live proxies' admin URLs, read before the pause.
#[derive(Clone, Debug, Default)]
pub(super) struct LiveProxies(Vec<String>);

impl ProxyCaller {
    pub(super) fn new(token: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            token: token.to_owned(),
        }
    }

    /// Sends one call; answers whether the proxy said 2xx in time.
    async fn call(&self, method: Method, url: String) -> bool {
        let mut request = Request::builder().method(method).uri(&url);
        if !self.token.is_empty() {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        }
        let Ok(request) = request.body(Full::new(Bytes::new())) else {
            return false;
        };
        match tokio::time::timeout(CALL_TIMEOUT, self.client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => true,
            Ok(Ok(response)) => {
                tracing::debug!(%url, status = %response.status(), "a proxy refused the routing call");
                false
            }
            Ok(Err(e)) => {
                tracing::debug!(%url, error = %e, "a proxy could not be told of a routing change");
                false
            }
            Err(_) => {
                tracing::debug!(%url, "a proxy did not answer the routing call in time");
                false
            }
        }
    }

    /// Asks every proxy of `proxies` to reload routing now, all at once; answers how many did.
    pub(super) async fn reload_all(&self, proxies: &LiveProxies) -> usize {
        self.call_all(proxies, Method::POST, "/admin/routes/reload")
            .await
    }

    /// Opens a connection to every proxy of `proxies` before the pause (`GET /healthz`), so
    /// the calls inside it reuse one instead of connecting.
    pub(super) async fn warm(&self, proxies: &LiveProxies) {
        self.call_all(proxies, Method::GET, "/healthz").await;
    }

    /// Sends `method path` to every proxy at once; answers how many said 2xx in time.
    async fn call_all(&self, proxies: &LiveProxies, method: Method, path: &str) -> usize {
        let mut calls = tokio::task::JoinSet::new();
        for admin in &proxies.0 {
            let caller = self.clone();
            let (method, url) = (method.clone(), format!("{admin}{path}"));
            calls.spawn(async move { caller.call(method, url).await });
        }
        let mut answered = 0;
        while let Some(done) = calls.join_next().await {
            answered += usize::from(done.unwrap_or(false));
        }
        answered
    }
}

impl Engine {
    /// The admin URLs of the proxies whose heartbeat is recent (plain HTTP only: the engine's
    /// client speaks no TLS, so a TLS admin port learns by NOTIFY and the poll). Empty when
    /// the table cannot be read.
    pub(super) async fn live_proxies(&self) -> LiveProxies {
        let Ok(all) = self.control.proxies().await else {
            return LiveProxies::default();
        };
        let now = chrono::Utc::now();
        LiveProxies(
            all.into_iter()
                .filter(|p| (now - p.last_seen).to_std().unwrap_or_default() < LIVE)
                .filter(|p| p.admin_url.starts_with("http://"))
                .map(|p| p.admin_url.trim_end_matches('/').to_owned())
                .collect(),
        )
    }
}
