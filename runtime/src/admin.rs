//! The admin port both programs serve, and what it shares: `/healthz`, `/readyz` (through
//! [`Readiness`]), `/metrics` and `/admin/log-level`, the bearer-token check and the JSON shape
//! of an error reply. Each program extends the router with its own routes
//! ([`AdminPort::route`]): the proxy its routing table and reloads, `serve` none.
//!
//! Every call but `/healthz`, `/readyz` and `/metrics` (probes and scrapers) needs the
//! configured bearer token. A token is compared in constant time, so the time an answer takes
//! says nothing about how much of a guess was right. Every error reply of both programs is one
//! JSON object with `error` (a stable code), `message` (for people) and `retryable` (whether
//! the same request can succeed later); some replies add fields after those.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, request, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Map, Value};

use crate::server::Body;

/// Most bytes an admin request body may carry.
const ADMIN_BODY_LIMIT: usize = 4096;

/// What a program answers `/readyz` with: ready when `problems` is empty (200, else 503);
/// `details` are added to the body beside `ready` and `problems`.
#[derive(Debug, Default)]
pub struct Ready {
    pub problems: Vec<String>,
    pub details: Map<String, Value>,
}

/// Whether a program can take traffic (`GET /readyz`).
pub trait Readiness: Send + Sync + 'static {
    fn readiness(&self) -> impl Future<Output = Ready> + Send;
}

/// A program's admin port: readiness, metrics, its token and its own routes.
pub trait AdminPort: Readiness {
    /// The bearer token every non-probe call needs; empty for none.
    fn admin_token(&self) -> &str;

    /// The Prometheus text `GET /metrics` answers with.
    fn metrics(&self) -> impl Future<Output = String> + Send;

    /// The program's own routes, asked after the token was checked, with the request's path
    /// split into its segments; `None` when the route is not the program's (404 `not_found`).
    fn route<'a>(
        &'a self,
        request: &'a request::Parts,
        segments: &'a [&'a str],
    ) -> impl Future<Output = Option<Response<Body>>> + Send + 'a;
}

/// An admin error reply: `{error, message, retryable: false}` (no admin call is worth a retry
/// as it was sent) with its status, `WWW-Authenticate` on 401 and `Allow` on 405.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    Unauthorized,
    NotFound { method: Method, path: String },
    MethodNotAllowed { method: Method, allow: &'static str },
    BadRequest { code: &'static str, message: String },
}

impl AdminError {
    pub fn into_response(self) -> Response<Body> {
        let (status, code, message) = match &self {
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token".to_owned(),
            ),
            Self::NotFound { method, path } => (
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such route: {method} {path}"),
            ),
            Self::MethodNotAllowed { method, allow } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("method {method} is not allowed here (allowed: {allow})"),
            ),
            Self::BadRequest { code, message } => (StatusCode::BAD_REQUEST, *code, message.clone()),
        };
        let mut response = json_response(status, &Value::Object(error_body(code, &message, false)));
        match self {
            Self::Unauthorized => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::MethodNotAllowed { allow, .. } => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            Self::NotFound { .. } | Self::BadRequest { .. } => {}
        }
        response
    }
}

/// The admin router of `port`: a tower service for [`crate::server::serve_with`] (any request
/// body, so tests can call it with `oneshot`).
pub fn router<P, B>(
    port: Arc<P>,
) -> impl tower::Service<Request<B>, Response = Response<Body>, Error = Infallible, Future = impl Send>
       + Clone
       + Send
       + 'static
where
    P: AdminPort,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tower::service_fn(move |request: Request<B>| {
        let port = Arc::clone(&port);
        async move {
            Ok::<_, Infallible>(match handle(&*port, request).await {
                Ok(response) => response,
                Err(e) => e.into_response(),
            })
        }
    })
}

async fn handle<P, B>(port: &P, request: Request<B>) -> Result<Response<Body>, AdminError>
where
    P: AdminPort,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let method = parts.method.clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let probe = matches!(segments.as_slice(), ["healthz" | "readyz" | "metrics"]);
    if !probe && !bearer_authorized(&parts.headers, port.admin_token()) {
        return Err(AdminError::Unauthorized);
    }
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => {
            Ok(text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"))
        }
        (&Method::GET, ["readyz"]) => {
            let Ready { problems, details } = port.readiness().await;
            let status = if problems.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = details;
            body.insert("ready".into(), json!(problems.is_empty()));
            body.insert("problems".into(), json!(problems));
            Ok(json_response(status, &Value::Object(body)))
        }
        (&Method::GET, ["metrics"]) => Ok(text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            &port.metrics().await,
        )),
        (_, ["healthz" | "readyz" | "metrics"]) => Err(AdminError::MethodNotAllowed {
            method,
            allow: "GET",
        }),
        (&Method::GET, ["admin", "log-level"]) => Ok(json_response(
            StatusCode::OK,
            &json!({ "filter": crate::telemetry::current_filter() }),
        )),
        (&Method::PUT | &Method::POST, ["admin", "log-level"]) => {
            let body = Limited::new(body, ADMIN_BODY_LIMIT)
                .collect()
                .await
                .map_err(|_| AdminError::BadRequest {
                    code: "invalid_body",
                    message: format!("the body must be at most {ADMIN_BODY_LIMIT} bytes"),
                })?
                .to_bytes();
            let filter = crate::telemetry::set_from_json(&body).map_err(|message| {
                AdminError::BadRequest {
                    code: "invalid_filter",
                    message,
                }
            })?;
            Ok(json_response(StatusCode::OK, &json!({ "filter": filter })))
        }
        (_, ["admin", "log-level"]) => Err(AdminError::MethodNotAllowed {
            method,
            allow: "GET, PUT",
        }),
        _ => match port.route(&parts, &segments).await {
            Some(response) => Ok(response),
            None => Err(AdminError::NotFound { method, path }),
        },
    }
}

/// A JSON reply.
pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, content_type: &'static str, body: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Whether `headers` carry `Authorization: Bearer <expected>`; always true when no token is
/// configured (`expected` empty).
pub fn bearer_authorized(headers: &HeaderMap, expected: &str) -> bool {
    if expected.is_empty() {
        return true;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), expected.as_bytes())
}

/// Compares without an early exit, so the time taken says nothing about the token.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, byte) in b.iter().enumerate() {
        diff |= byte ^ a.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// The body of an error reply: `{"error": code, "message": message, "retryable": retryable}`,
/// as a map the caller may add fields to.
pub fn error_body(code: &str, message: &str, retryable: bool) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("error".into(), json!(code));
    body.insert("message".into(), json!(message));
    body.insert("retryable".into(), json!(retryable));
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use tower::ServiceExt;

    /// A program whose readiness, token and one route of its own the test chooses.
    struct Fake {
        problems: Vec<String>,
        token: &'static str,
    }

    impl Readiness for Fake {
        async fn readiness(&self) -> Ready {
            let mut details = Map::new();
            details.insert("stores".into(), json!([]));
            Ready {
                problems: self.problems.clone(),
                details,
            }
        }
    }

    impl AdminPort for Fake {
        fn admin_token(&self) -> &str {
            self.token
        }

        async fn metrics(&self) -> String {
            "fake_up 1\n".to_owned()
        }

        async fn route<'a>(
            &'a self,
            request: &'a request::Parts,
            segments: &'a [&'a str],
        ) -> Option<Response<Body>> {
            match (&request.method, segments) {
                (&Method::GET, ["admin", "own"]) => {
                    Some(json_response(StatusCode::OK, &json!({"own": true})))
                }
                _ => None,
            }
        }
    }

    async fn call(
        fake: Fake,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let response = router(Arc::new(fake))
            .oneshot(request)
            .await
            .expect("infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a full body").to_bytes();
        (parts.status, parts.headers, body)
    }

    fn json_of(body: &Bytes) -> Value {
        serde_json::from_slice(body).expect("a JSON body")
    }

    fn ready() -> Fake {
        Fake {
            problems: Vec::new(),
            token: "s3cret",
        }
    }

    #[tokio::test]
    async fn readyz_is_200_when_the_program_has_no_problems_and_503_with_them() {
        let (status, _, body) = call(ready(), Method::GET, "/readyz", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json_of(&body),
            json!({"ready": true, "problems": [], "stores": []})
        );
        let draining = Fake {
            problems: vec!["shutting down".to_owned()],
            token: "s3cret",
        };
        let (status, _, body) = call(draining, Method::GET, "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            json_of(&body),
            json!({"ready": false, "problems": ["shutting down"], "stores": []})
        );
    }

    #[tokio::test]
    async fn probes_need_no_token_and_everything_else_does() {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let (status, _, _) = call(ready(), Method::GET, path, None).await;
            assert_eq!(status, StatusCode::OK, "{path}");
        }
        let (status, _, body) = call(ready(), Method::GET, "/metrics", None).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"fake_up 1\n"[..]));
        for path in ["/admin/log-level", "/admin/own", "/nowhere"] {
            for token in [None, Some("s3cre")] {
                let (status, headers, body) = call(ready(), Method::GET, path, token).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {token:?}");
                assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
                assert_eq!(json_of(&body)["error"], "unauthorized");
            }
        }
        let (status, _, body) = call(ready(), Method::GET, "/admin/own", Some("s3cret")).await;
        assert_eq!(
            (status, json_of(&body)),
            (StatusCode::OK, json!({"own": true}))
        );
        let open = Fake {
            problems: Vec::new(),
            token: "",
        };
        let (status, _, body) = call(open, Method::GET, "/admin/log-level", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(json_of(&body).get("filter").is_some());
    }

    #[tokio::test]
    async fn errors_have_one_shape_with_allow_on_a_wrong_method() {
        let token = Some("s3cret");
        let cases = [
            (
                Method::POST,
                "/metrics",
                StatusCode::METHOD_NOT_ALLOWED,
                Some("GET"),
                "method_not_allowed",
                "method POST is not allowed here (allowed: GET)",
            ),
            (
                Method::DELETE,
                "/admin/log-level",
                StatusCode::METHOD_NOT_ALLOWED,
                Some("GET, PUT"),
                "method_not_allowed",
                "method DELETE is not allowed here (allowed: GET, PUT)",
            ),
            (
                Method::GET,
                "/nowhere",
                StatusCode::NOT_FOUND,
                None,
                "not_found",
                "no such route: GET /nowhere",
            ),
        ];
        for (method, path, expected, allow, code, message) in cases {
            let (status, headers, body) = call(ready(), method, path, token).await;
            assert_eq!(status, expected, "{path}");
            assert_eq!(
                headers
                    .get(header::ALLOW)
                    .map(|v| v.to_str().expect("ascii")),
                allow
            );
            assert_eq!(headers[header::CONTENT_TYPE], "application/json");
            assert_eq!(
                json_of(&body),
                json!({"error": code, "message": message, "retryable": false})
            );
        }
        let (status, _, body) = call(ready(), Method::PUT, "/admin/log-level", token).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json_of(&body)["error"], "invalid_filter");
        assert_eq!(json_of(&body)["retryable"], false);
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret-longer", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }

    #[test]
    fn a_bearer_token_is_needed_only_when_one_is_configured() {
        let mut headers = HeaderMap::new();
        assert!(bearer_authorized(&headers, ""));
        assert!(!bearer_authorized(&headers, "s3cret"));
        headers.insert(
            header::AUTHORIZATION,
            "Bearer s3cre".parse().expect("ascii"),
        );
        assert!(!bearer_authorized(&headers, "s3cret"));
        headers.insert(
            header::AUTHORIZATION,
            "Basic s3cret".parse().expect("ascii"),
        );
        assert!(!bearer_authorized(&headers, "s3cret"));
        headers.insert(
            header::AUTHORIZATION,
            "Bearer s3cret".parse().expect("ascii"),
        );
        assert!(bearer_authorized(&headers, "s3cret"));
    }

    #[test]
    fn an_error_body_has_code_message_and_retryable() {
        let body = Value::Object(error_body("not_found", "no such route: GET /x", false));
        assert_eq!(
            body,
            json!({"error": "not_found", "message": "no such route: GET /x", "retryable": false})
        );
    }
}
