//! Errors of the request path, and the one place they become HTTP replies.
//!
//! Each error knows its kind (client, conflict, unavailable, internal) and whether a retry can
//! help; internal details are logged here once and never sent to the client.

use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};
use switchyard_store::{AppendError, ErrorKind, StoreError};

/// The response body (the one both programs serve).
pub use switchyard_runtime::server::Body;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("no such route: {method} {path}")]
    NotFound { method: String, path: String },
    #[error("method {method} is not allowed here (allowed: {allow})")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// A value no store (or not the tenant's store) can hold; `path` names it when the proxy
    /// found it, and is absent when the store refused the append (SQLSTATE class 22 or 54).
    #[error("{message}")]
    Unstorable {
        path: Option<String>,
        message: String,
    },
    #[error("version conflict: expected version {}, stream is at version {actual}", expected.map_or_else(|| "any".to_owned(), |v| v.to_string()))]
    VersionConflict { expected: Option<i32>, actual: i32 },
    #[error("an event id of this append is already used by a different event")]
    EventIdReused,
    /// The append committed before with its events in another order; a retry must repeat it.
    #[error("this append already committed with its events in another order; retry it with the events in their original order")]
    RetryReordered,
    #[error("the stream does not exist for this tenant")]
    StreamNotFound,
    #[error("writes for this tenant are paused for a cutover; retry shortly")]
    WritesPaused { retry_after_s: u64 },
    #[error("store {store_id} is unavailable")]
    StoreUnavailable {
        store_id: String,
        source: Option<StoreError>,
    },
    #[error("the proxy is overloaded; retry shortly")]
    Overloaded,
    /// A migrating tenant already holds its share of the proxy's request slots or of its
    /// store's connections (`proxy.migrating_tenant_share`); other tenants are not refused.
    #[error(
        "this tenant is migrating and holds its share of the proxy's {resource}; retry shortly"
    )]
    TenantOverloaded { resource: &'static str },
    /// The proxy has not loaded its routing table yet (just started, or the control database
    /// has not answered): it cannot tell which store is the tenant's.
    #[error("the proxy has not loaded its routing table yet; retry shortly")]
    RoutingNotLoaded,
    /// The tenant's fence said it moved to a store this proxy has not configured, and routing
    /// has not caught up: the route's store is stale, the other one out of reach.
    #[error("this tenant moved to a store this proxy cannot reach and its routing is stale; retry shortly")]
    RouteStale,
    #[error("too many requests from this client; retry after {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(u64),
    #[error("the request took longer than {0} ms")]
    Timeout(u64),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// A data-plane request without a bearer token the proxy knows (tokens are configured).
    #[error("missing or unknown bearer token")]
    Unauthenticated,
    /// A data-plane request whose token is not allowed the tenant in its path.
    #[error("this token is not allowed this tenant")]
    ForbiddenTenant,
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An append that failed after it may have reached the store (the store went away
    /// mid-call, or the request timed out), and that had events without a client `event_id`:
    /// it may have committed under ids the client never saw, so a blind retry could store its
    /// events twice. Same status and code as the failure; `retryable: false`,
    /// `may_have_committed: true`.
    #[error(
        "{0}; the append may have committed, and events without an event_id got ids the client \
         never saw, so retrying it as is could store them twice: read the stream to check, or \
         give every event an event_id (a retry with the same ids answers what was stored)"
    )]
    Unconfirmed(Box<ApiError>),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            message: message.into(),
        }
    }

    /// The class of the error (the taxonomy the store, the engine and the CLI share).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::BadRequest { .. }
            | Self::NotFound { .. }
            | Self::MethodNotAllowed { .. }
            | Self::PayloadTooLarge { .. }
            | Self::Invalid { .. }
            | Self::Unstorable { .. }
            | Self::StreamNotFound
            | Self::BodyTimeout(_)
            | Self::Unauthorized
            | Self::Unauthenticated
            | Self::ForbiddenTenant => ErrorKind::Client,
            Self::VersionConflict { .. } | Self::EventIdReused | Self::RetryReordered => {
                ErrorKind::Conflict
            }
            Self::WritesPaused { .. }
            | Self::StoreUnavailable { .. }
            | Self::Overloaded
            | Self::TenantOverloaded { .. }
            | Self::RoutingNotLoaded
            | Self::RouteStale
            | Self::RateLimited { .. }
            | Self::Timeout(_) => ErrorKind::Unavailable,
            Self::Internal(_) => ErrorKind::Internal,
            Self::Unconfirmed(inner) => inner.kind(),
        }
    }

    /// Whether sending the same request again is safe and may succeed: never for an append
    /// that may have committed under generated ids ([`ApiError::Unconfirmed`]).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Unconfirmed(_)) && self.kind().is_retryable()
    }

    /// This failure of an append, told truthfully: when the append may have reached the store
    /// (a store error or a timeout) and some of its event ids were generated here, it becomes
    /// [`ApiError::Unconfirmed`]. Failures that wrote nothing (refusals, a closed gate, a
    /// moved fence) stay as they are.
    #[must_use]
    pub fn of_append(self, generated_ids: bool) -> Self {
        match self {
            // `source: None` is a store this proxy lacks: nothing was sent.
            Self::StoreUnavailable {
                source: Some(_), ..
            }
            | Self::Timeout(_)
                if generated_ids =>
            {
                Self::Unconfirmed(Box::new(self))
            }
            other => other,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound { .. } | Self::StreamNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Invalid { .. } | Self::Unstorable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::VersionConflict { .. } | Self::EventIdReused | Self::RetryReordered => {
                StatusCode::CONFLICT
            }
            Self::WritesPaused { .. }
            | Self::StoreUnavailable { .. }
            | Self::Overloaded
            | Self::TenantOverloaded { .. }
            | Self::RoutingNotLoaded
            | Self::RouteStale => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unauthorized | Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::ForbiddenTenant => StatusCode::FORBIDDEN,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unconfirmed(inner) => inner.status(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } | Self::Invalid { code, .. } => code,
            Self::NotFound { .. } => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::Unstorable { .. } => "unstorable_payload",
            Self::VersionConflict { .. } => "version_conflict",
            Self::EventIdReused => "event_id_conflict",
            Self::RetryReordered => "retry_order_mismatch",
            Self::StreamNotFound => "stream_not_found",
            Self::WritesPaused { .. } => "writes_paused",
            Self::StoreUnavailable { .. } => "store_unavailable",
            Self::Overloaded => "overloaded",
            Self::TenantOverloaded { .. } => "tenant_overloaded",
            Self::RoutingNotLoaded => "routing_not_loaded",
            Self::RouteStale => "route_stale",
            Self::Timeout(_) => "timeout",
            Self::RateLimited { .. } => "rate_limited",
            Self::BodyTimeout(_) => "body_timeout",
            Self::Unauthorized => "unauthorized",
            Self::Unauthenticated => "unauthenticated",
            Self::ForbiddenTenant => "forbidden_tenant",
            Self::Internal(_) => "internal",
            Self::Unconfirmed(inner) => inner.code(),
        }
    }

    /// The reply. Internal and store errors are logged here, once, with their cause.
    pub fn into_response(self) -> Response<Body> {
        let logged = match &self {
            Self::Unconfirmed(inner) => inner,
            other => other,
        };
        match logged {
            Self::Internal(cause) => tracing::error!(error = %cause, "internal error"),
            Self::StoreUnavailable {
                store_id,
                source: Some(cause),
            } => tracing::warn!(store.id = %store_id, error = %cause, "store unavailable"),
            _ => {}
        }
        let mut body = switchyard_runtime::admin::error_body(
            self.code(),
            &self.to_string(),
            self.is_retryable(),
        );
        if matches!(self, Self::Unconfirmed(_)) {
            body.insert("may_have_committed".into(), json!(true));
        }
        let mut retry_after = None;
        let mut allow = None;
        match &self {
            Self::VersionConflict { expected, actual } => {
                body.insert("expected_version".into(), json!(expected));
                body.insert("actual_version".into(), json!(actual));
            }
            Self::WritesPaused { retry_after_s } | Self::RateLimited { retry_after_s } => {
                retry_after = Some(*retry_after_s);
            }
            Self::Overloaded
            | Self::TenantOverloaded { .. }
            | Self::StoreUnavailable { .. }
            | Self::RoutingNotLoaded
            | Self::RouteStale => {
                retry_after = Some(1);
            }
            Self::PayloadTooLarge { limit } => {
                body.insert("limit_bytes".into(), json!(limit));
            }
            Self::Unstorable {
                path: Some(path), ..
            } => {
                body.insert("path".into(), json!(path));
            }
            Self::MethodNotAllowed { allow: a, .. } => allow = Some(*a),
            _ => {}
        }
        let mut response = json_response(self.status(), &Value::Object(body));
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, Self::BodyTimeout(_)) {
            // The rest of the body may still be on its way: do not read it as the next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, Self::Unauthorized | Self::Unauthenticated) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(allow) = allow {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

impl ApiError {
    /// An append's failure in store `store_id`: refusals as their own replies, a store's
    /// failure by [`ApiError::from_store`].
    pub fn from_append(store_id: &str, e: AppendError) -> Self {
        match e {
            AppendError::VersionConflict { expected, actual } => {
                Self::VersionConflict { expected, actual }
            }
            AppendError::EventIdReused => Self::EventIdReused,
            AppendError::RetryReordered => Self::RetryReordered,
            AppendError::StreamOfOtherTenant => Self::StreamNotFound,
            // The caller re-routes on a fence before it gets here; if it does get here, the
            // tenant is mid-cutover from this proxy's point of view.
            AppendError::Fenced { .. } => Self::WritesPaused { retry_after_s: 1 },
            // A value the store refused (SQLSTATE class 22 or 54): the client's 422.
            AppendError::Store(e) if e.is_unstorable_value() => {
                Self::unstorable_in_store(store_id, &e)
            }
            AppendError::Store(e) => Self::from_store(store_id, e),
        }
    }

    /// The one mapping of a store's failure to a reply, by its kind: unavailable is 503
    /// `store_unavailable` with `Retry-After`; anything else is a 500 whose details are
    /// logged, not sent. (An append's refused values are answered before, by
    /// [`ApiError::from_append`]; a conflict — a lock held past its wait — is the engine's,
    /// never an answer to a request.)
    pub fn from_store(store_id: &str, e: StoreError) -> Self {
        match e.kind() {
            ErrorKind::Unavailable => Self::StoreUnavailable {
                store_id: store_id.to_owned(),
                source: Some(e),
            },
            ErrorKind::Client | ErrorKind::Conflict | ErrorKind::Internal => {
                Self::Internal(Box::new(e))
            }
        }
    }
}

impl From<crate::payload::Unstorable> for ApiError {
    fn from(e: crate::payload::Unstorable) -> Self {
        Self::Unstorable {
            message: format!("{} {}", e.path, e.reason),
            path: Some(e.path),
        }
    }
}

impl ApiError {
    /// A store's refusal of an append's values (SQLSTATE class 22 or 54): the append can
    /// never succeed there, so it is the client's 422, not a 500. The store's own message is
    /// logged, not sent (it may quote the values).
    fn unstorable_in_store(store_id: &str, e: &StoreError) -> Self {
        let sqlstate = e.sqlstate().unwrap_or_default();
        tracing::info!(store.id = %store_id, %sqlstate, "the store refused a value of an append");
        // The database's message may quote the values: payloads are not logged at info.
        tracing::debug!(store.id = %store_id, error = %e, "the store's refusal");
        Self::Unstorable {
            path: None,
            message: format!(
                "store {store_id} cannot hold a value of this append (SQLSTATE {sqlstate})"
            ),
        }
    }
}

/// A JSON reply (the one both programs use).
pub use switchyard_runtime::admin::json_response;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn reply(error: ApiError) -> (StatusCode, Value, bool) {
        let response = error.into_response();
        let status = response.status();
        let retry_after = response.headers().contains_key(header::RETRY_AFTER);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("a full body")
            .to_bytes();
        (
            status,
            serde_json::from_slice(&body).expect("JSON"),
            retry_after,
        )
    }

    fn unavailable() -> ApiError {
        ApiError::StoreUnavailable {
            store_id: "shared".to_owned(),
            source: Some(StoreError::unavailable("connection reset")),
        }
    }

    /// Issue 16: one store error, one reply, whichever way it reached the proxy: a store that
    /// cannot be reached is a 503 with `Retry-After` (an append's failure was a 500 through
    /// `From<AppendError>` and a 503 through the read and append handlers).
    #[tokio::test]
    async fn a_store_that_cannot_be_reached_is_a_503_however_the_append_failed() {
        let lost = || AppendError::Store(StoreError::unavailable("connection reset"));
        let (status, body, retry_after) = reply(ApiError::from_append("shared", lost())).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"], "store_unavailable");
        assert_eq!(body["retryable"], true);
        assert!(retry_after);
        assert_eq!(
            ApiError::from_append("shared", lost()).kind(),
            ErrorKind::Unavailable
        );
    }

    /// Item 14 of issue 14: an append with generated event ids that failed after it may have
    /// reached the store is not called retryable; one the client gave every id to is.
    #[tokio::test]
    async fn an_append_that_may_have_committed_under_generated_ids_is_not_retryable() {
        let (status, body, retry_after) = reply(unavailable().of_append(true)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"], "store_unavailable");
        assert_eq!(body["retryable"], false);
        assert_eq!(body["may_have_committed"], true);
        assert!(!retry_after, "no Retry-After invites a blind retry");

        let (status, body, retry_after) = reply(unavailable().of_append(false)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["retryable"], true);
        assert!(body.get("may_have_committed").is_none());
        assert!(retry_after);

        let (status, body, _) = reply(ApiError::Timeout(300).of_append(true)).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(body["error"], "timeout");
        assert_eq!(body["retryable"], false);

        // Failures that wrote nothing stay retryable whatever the ids.
        for nothing_written in [
            ApiError::WritesPaused { retry_after_s: 1 },
            ApiError::Overloaded,
            ApiError::TenantOverloaded {
                resource: "request slots",
            },
            ApiError::RoutingNotLoaded,
        ] {
            let (_, body, _) = reply(nothing_written.of_append(true)).await;
            assert_eq!(body["retryable"], true, "{body}");
        }
    }
}
