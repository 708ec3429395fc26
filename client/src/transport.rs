//! The HTTP connection pool every call goes through: hyper's pooled client over plain TCP
//! (HTTP/1.1 keep-alive, or h2c with prior knowledge as the proxy serves on the same port),
//! an optional bearer token and an optional per-request timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ClientError};

/// Which HTTP version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive (a connection per request in flight).
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (one connection, requests multiplexed).
    H2c,
}

/// A reply as received: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// The HTTP status.
    pub status: StatusCode,
    /// The reply's headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl RawReply {
    /// The body parsed as JSON (`Value::Null` when it is not JSON).
    pub fn json_value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body parsed as `T` when the status is `success`, else the reply's [`ApiError`].
    pub(crate) fn expect<T: DeserializeOwned>(
        self,
        success: StatusCode,
        url: &str,
    ) -> Result<T, ClientError> {
        if self.status != success {
            return Err(ClientError::Api(ApiError::from_reply(
                self.status,
                &self.body,
            )));
        }
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Decode {
            url: url.to_owned(),
            message: e.to_string(),
        })
    }
}

/// A pooled HTTP client; cheap to clone (clones share the pool).
///
/// ```
/// use std::time::Duration;
/// use switchyard_client::{Protocol, Transport};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let transport = Transport::new(Protocol::H2c)
///     .with_token("app-token")
///     .with_timeout(Duration::from_secs(5));
/// # let _ = transport; }
/// ```
#[derive(Debug, Clone)]
pub struct Transport {
    client: Client<HttpConnector, Full<Bytes>>,
    /// Sent as `Authorization: Bearer …` on every request.
    bearer: Option<Arc<str>>,
    /// No answer within it is a [`ClientError::Connection`].
    timeout: Option<Duration>,
}

impl Default for Transport {
    fn default() -> Self {
        Self::new(Protocol::Http1)
    }
}

impl Transport {
    /// A client speaking `protocol`, with `TCP_NODELAY` (latency-minded, as the proxy is).
    pub fn new(protocol: Protocol) -> Self {
        Self::with_pool(protocol, None)
    }

    /// [`Transport::new`] keeping at most `max_idle_per_host` idle connections per proxy
    /// (HTTP/1.1: size it to the requests in flight, so none is reopened).
    pub fn with_pool(protocol: Protocol, max_idle_per_host: Option<usize>) -> Self {
        // Must be called from inside a Tokio runtime; hyper spawns its connection tasks there.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        if protocol == Protocol::H2c {
            builder.http2_only(true);
        }
        if let Some(n) = max_idle_per_host {
            builder.pool_max_idle_per_host(n);
        }
        Self {
            client: builder.build(connector),
            bearer: None,
            timeout: None,
        }
    }

    /// Sends `Authorization: Bearer <token>` (a data token, or the admin token).
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.bearer = Some(Arc::from(format!("Bearer {}", token.into())));
        self
    }

    /// Gives up on a request that has no whole answer within `timeout`.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends one request; a non-empty body is sent as `application/json`. Any status is a
    /// reply; only no answer is an error.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Result<RawReply, ClientError> {
        let mut builder = Request::builder().method(method).uri(url);
        if let Some(bearer) = &self.bearer {
            builder = builder.header(http::header::AUTHORIZATION, bearer.as_ref());
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        if !body.is_empty() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| ClientError::Request(format!("{url}: {e}")))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                // The source chain says why (refused, reset); hyper's own message does not.
                let mut message = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    message = format!("{message}: {s}");
                    source = s.source();
                }
                message
            })?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(RawReply {
                status,
                headers,
                body,
            })
        };
        let answer = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, exchange)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {limit:?}"))),
            None => exchange.await,
        };
        answer.map_err(|message| ClientError::Connection {
            url: url.to_owned(),
            message,
        })
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<RawReply, ClientError> {
        self.send(Method::GET, url, Bytes::new(), &[]).await
    }

    /// `POST url` with a JSON body.
    pub async fn post_json(
        &self,
        url: &str,
        body: &impl serde::Serialize,
    ) -> Result<RawReply, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Request(e.to_string()))?;
        self.send(Method::POST, url, Bytes::from(body), &[]).await
    }
}
