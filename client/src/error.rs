//! The client's one error type: an answer of the proxy in its one JSON error shape
//! (`{error, message, retryable}`, typed as [`ApiError`]), or no answer at all.

use http::StatusCode;
use serde::Deserialize;

/// Declares [`ErrorCode`] with one variant per stable code of the data-plane and admin APIs
/// (docs/openapi/*.yaml, `Error.error`) and its parsing.
macro_rules! error_codes {
    ($($variant:ident => $code:literal,)*) => {
        /// The stable `error` code of a refused request. A code this client does not know
        /// (a newer proxy's) is kept as [`ErrorCode::Other`].
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $(
                #[doc = concat!("`", $code, "`")]
                $variant,
            )*
            /// A code this client does not know.
            Other(String),
        }

        impl ErrorCode {
            /// The code as the API spells it.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $code,)*
                    Self::Other(code) => code,
                }
            }

            /// The variant of an API code.
            pub fn parse(code: &str) -> Self {
                match code {
                    $($code => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }
        }
    };
}

error_codes! {
    MalformedJson => "malformed_json",
    InvalidBody => "invalid_body",
    BodyReadFailed => "body_read_failed",
    DuplicateEventId => "duplicate_event_id",
    InvalidId => "invalid_id",
    InvalidPath => "invalid_path",
    InvalidQuery => "invalid_query",
    NotFound => "not_found",
    MethodNotAllowed => "method_not_allowed",
    PayloadTooLarge => "payload_too_large",
    EmptyAppend => "empty_append",
    TooManyEvents => "too_many_events",
    InvalidEvent => "invalid_event",
    UnstorablePayload => "unstorable_payload",
    VersionConflict => "version_conflict",
    EventIdConflict => "event_id_conflict",
    RetryOrderMismatch => "retry_order_mismatch",
    StreamNotFound => "stream_not_found",
    CursorNotTranslatable => "cursor_not_translatable",
    WritesPaused => "writes_paused",
    StoreUnavailable => "store_unavailable",
    RoutingNotLoaded => "routing_not_loaded",
    RouteStale => "route_stale",
    Overloaded => "overloaded",
    TenantOverloaded => "tenant_overloaded",
    Timeout => "timeout",
    Unauthorized => "unauthorized",
    Unauthenticated => "unauthenticated",
    ForbiddenTenant => "forbidden_tenant",
    Internal => "internal",
    RateLimited => "rate_limited",
    BodyTimeout => "body_timeout",
    TooManyConnections => "too_many_connections",
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What sort of refusal an [`ApiError`] is, from its HTTP status: what a caller does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// 400, 405, 408, 413, 422, 431: the request itself is wrong; sending it again cannot help.
    Invalid,
    /// 401 or 403: no token, an unknown one, or one not allowed the tenant.
    Auth,
    /// 404: no such path, or the stream is another tenant's.
    NotFound,
    /// 409: a version or event-id conflict.
    Conflict,
    /// 429 or 503: the proxy or the tenant's store cannot serve it now.
    Unavailable,
    /// 504: the request took longer than the proxy's limit.
    Timeout,
    /// 500 and anything else.
    Internal,
}

impl ErrorKind {
    /// The kind of a reply's status.
    pub fn of(status: StatusCode) -> Self {
        match status.as_u16() {
            401 | 403 => Self::Auth,
            404 => Self::NotFound,
            409 => Self::Conflict,
            429 | 503 => Self::Unavailable,
            504 => Self::Timeout,
            400..=499 => Self::Invalid,
            _ => Self::Internal,
        }
    }
}

/// A request the proxy answered with an error (any status other than the call's success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The reply's HTTP status.
    pub status: StatusCode,
    /// The stable code (`error`).
    pub code: ErrorCode,
    /// The human-readable `message`.
    pub message: String,
    /// Whether sending the same request again is safe and may succeed (`retryable`).
    pub retryable: bool,
    /// An append that failed after it may have committed (`may_have_committed`).
    pub may_have_committed: bool,
    /// With `version_conflict`: the version the append expected, when it named one.
    pub expected_version: Option<i64>,
    /// With `version_conflict`: the stream's version.
    pub actual_version: Option<i64>,
}

impl ApiError {
    /// What sort of refusal this is.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::of(self.status)
    }

    /// The error of a reply with `status` and `body` (the JSON error shape, or anything else:
    /// a body that is not one is kept as the message, code `internal` for a 5xx).
    pub fn from_reply(status: StatusCode, body: &[u8]) -> Self {
        /// The one JSON error shape.
        #[derive(Deserialize)]
        struct Shape {
            error: String,
            #[serde(default)]
            message: String,
            #[serde(default)]
            retryable: bool,
            #[serde(default)]
            may_have_committed: bool,
            #[serde(default)]
            expected_version: Option<i64>,
            #[serde(default)]
            actual_version: Option<i64>,
        }
        match serde_json::from_slice::<Shape>(body) {
            Ok(shape) => Self {
                status,
                code: ErrorCode::parse(&shape.error),
                message: shape.message,
                retryable: shape.retryable,
                may_have_committed: shape.may_have_committed,
                expected_version: shape.expected_version,
                actual_version: shape.actual_version,
            },
            Err(_) => Self {
                status,
                code: ErrorCode::Other(format!("http_{}", status.as_u16())),
                message: String::from_utf8_lossy(body).into_owned(),
                // Not the proxy's own answer: a gateway in between, whose 502/503/504 pass.
                retryable: matches!(status.as_u16(), 502..=504),
                may_have_committed: false,
                expected_version: None,
                actual_version: None,
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The proxy answered with an error.
    #[error("refused: {0}")]
    Api(ApiError),
    /// No answer: the connection could not be made, broke, or the client's timeout passed.
    /// Whether the request took effect is unknown; an append with event ids may be retried.
    #[error("no answer from {url}: {message}")]
    Connection {
        /// The request's URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The call could not be sent as asked (a URL that does not parse, a body that does not
    /// serialise).
    #[error("invalid request: {0}")]
    Request(String),
    /// A success reply whose body is not what the API documents.
    #[error("unexpected reply from {url}: {message}")]
    Decode {
        /// The request's URL.
        url: String,
        /// Why.
        message: String,
    },
}

impl ClientError {
    /// Whether sending the same request again is safe and may succeed: a retryable refusal,
    /// or no answer at all (safe for reads, and for appends whose events carry ids).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Api(e) => e.retryable,
            Self::Connection { .. } => true,
            Self::Request(_) | Self::Decode { .. } => false,
        }
    }

    /// The refusal, if the proxy answered one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Self::Api(e) => Some(e),
            _ => None,
        }
    }

    /// The refusal's code, if the proxy answered one.
    pub fn code(&self) -> Option<&ErrorCode> {
        self.api().map(|e| &e.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_shape_is_typed() {
        let e = ApiError::from_reply(
            StatusCode::CONFLICT,
            br#"{"error":"version_conflict","message":"stream at 3","retryable":false,"expected_version":1,"actual_version":3}"#,
        );
        assert_eq!(e.code, ErrorCode::VersionConflict);
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!((e.expected_version, e.actual_version), (Some(1), Some(3)));
        assert!(!ClientError::Api(e).is_retryable());

        let e = ApiError::from_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error":"writes_paused","message":"gate","retryable":true}"#,
        );
        assert_eq!((e.kind(), e.retryable), (ErrorKind::Unavailable, true));
    }

    #[test]
    fn unknown_codes_and_bodies_are_kept() {
        let e = ApiError::from_reply(
            StatusCode::BAD_REQUEST,
            br#"{"error":"brand_new","message":"m","retryable":false}"#,
        );
        assert_eq!(e.code, ErrorCode::Other("brand_new".into()));
        assert_eq!(e.code.as_str(), "brand_new");
        let e = ApiError::from_reply(StatusCode::BAD_GATEWAY, b"upstream gone");
        assert_eq!(e.code.as_str(), "http_502");
        assert_eq!(e.message, "upstream gone");
        assert_eq!(e.kind(), ErrorKind::Internal);
    }

    #[test]
    fn every_code_round_trips() {
        for code in [
            "malformed_json",
            "event_id_conflict",
            "too_many_connections",
        ] {
            assert_eq!(ErrorCode::parse(code).as_str(), code);
        }
        assert_eq!(ErrorCode::parse("not_found"), ErrorCode::NotFound);
    }
}
