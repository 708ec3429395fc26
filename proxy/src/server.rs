//! The tower stack in front of the data-plane handler. (Accepting connections, HTTP/1.1 and
//! h2c on one port, with the connection limits, is `switchyard_runtime::server`'s.)

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use switchyard_config::ProxyConfig;
use switchyard_runtime::server::ClientAddr;
use tower::limit::ConcurrencyLimit;
use tower::load_shed::LoadShed;
use tower::timeout::Timeout;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tracing::Instrument;

use crate::api::{self, Endpoint};
use crate::error::{ApiError, Body};
use crate::fairness::Shed;
use crate::limits::RateLimiter;
use crate::metrics::ProxyMetrics;
use crate::AppState;

/// The data-plane service, outer to inner:
///
/// 1. `Observe` — span `request{method, route, request_id}`, request metrics, and turning the
///    inner layers' errors into replies. Outermost so that shed and timed-out requests are
///    counted and answered like any other. It also applies the per-client rate limit, when
///    configured: a request over it is answered 429 here and goes no further.
/// 2. timeout — the whole-request deadline; sits outside the limit so time spent queued for a
///    slot counts too.
/// 3. load-shed — refuses at once (503 overloaded) instead of queueing when the limit is full,
///    so a slow store cannot make the proxy hoard requests.
/// 4. concurrency limit — bounds the requests in progress, hence memory and pool pressure.
/// 5. the handler — routes, gates, appends, reads. Requests of migrating tenants take one more
///    slot there, from their share (`crate::fairness`): the tenant is known only once the path
///    is parsed and its route looked up, and a refusal there frees this layer's slot at once.
pub fn data_service(
    state: Arc<AppState>,
) -> impl Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future = impl Send>
       + Clone
       + Send
       + 'static {
    let config = state.config.proxy.clone();
    let metrics = state.metrics.clone();
    let handler = tower::service_fn(move |request: Request<Incoming>| {
        let state = Arc::clone(&state);
        async move { Ok::<_, BoxError>(api::handle(state, request).await) }
    });
    stack(handler, &config, metrics)
}

/// The layers of [`data_service`] (1 to 4) around `handler`, for any request body: the unit
/// tests drive them with `oneshot` and a handler of their own.
type Stack<H> = Observe<Timeout<LoadShed<ConcurrencyLimit<H>>>>;

fn stack<H>(handler: H, config: &ProxyConfig, metrics: ProxyMetrics) -> Stack<H> {
    let timeout = config.request_timeout;
    let limiter =
        RateLimiter::new(config.rate_limit_per_second, config.rate_limit_burst).map(Arc::new);
    let inner = ServiceBuilder::new()
        .timeout(timeout)
        .load_shed()
        .concurrency_limit(config.max_concurrent_requests)
        .service(handler);
    Observe {
        inner,
        metrics,
        limiter,
        timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
    }
}

/// Traces, measures, and answers errors of the layers below (see [`data_service`]).
#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    metrics: ProxyMetrics,
    /// Per-client-IP request rate limit, when configured (429 before anything else runs).
    limiter: Option<Arc<RateLimiter>>,
    timeout_ms: u64,
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is decided per call by the load-shed layer.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let operation = Endpoint::operation(request.method(), request.uri().path());
        // The append handler marks whether it generated event ids; read after a timeout.
        let unconfirmed = crate::api::UnconfirmedOnTimeout::default();
        request.extensions_mut().insert(unconfirmed.clone());
        let request_id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 128)
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let span = tracing::info_span!("request", method = %request.method(), route = operation, request_id = %request_id);
        let limited = match (&self.limiter, request.extensions().get::<ClientAddr>()) {
            (Some(limiter), Some(client)) => limiter
                .check(client.0.ip(), Instant::now())
                .err()
                .map(|wait| ApiError::RateLimited {
                    retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
                }),
            _ => None,
        };
        let inner = self.inner.clone();
        let metrics = self.metrics.clone();
        let timeout_ms = self.timeout_ms;
        Box::pin(
            async move {
                let started = Instant::now();
                let handled = match limited {
                    Some(refused) => Err(refused),
                    None => Ok(inner.oneshot(request).await),
                };
                let mut response = match handled {
                    Err(refused) => {
                        metrics.shed(Shed::RateLimit);
                        refused.into_response()
                    }
                    Ok(handled) => match handled {
                        Ok(response) => response,
                        Err(e) if e.is::<tower::timeout::error::Elapsed>() => {
                            let generated_ids =
                                unconfirmed.0.load(std::sync::atomic::Ordering::Acquire);
                            ApiError::Timeout(timeout_ms)
                                .of_append(generated_ids)
                                .into_response()
                        }
                        Err(e) if e.is::<tower::load_shed::error::Overloaded>() => {
                            metrics.shed(Shed::ConcurrencyLimit);
                            ApiError::Overloaded.into_response()
                        }
                        Err(e) => ApiError::Internal(e).into_response(),
                    },
                };
                let outcome = outcome_of(response.status());
                metrics
                    .requests
                    .with_label_values(&[operation, outcome])
                    .inc();
                metrics
                    .request_duration
                    .with_label_values(&[operation, outcome])
                    .observe(started.elapsed().as_secs_f64());
                if let Ok(value) = HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert("x-request-id", value);
                }
                tracing::debug!(status = response.status().as_u16(), "request done");
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// The outcome label of a status.
pub fn outcome_of(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "ok",
        409 => "conflict",
        400..=499 => "client_error",
        503 | 504 => "unavailable",
        _ => "internal",
    }
}
#[cfg(test)]
mod tests {
    //! The data-plane stack (layers 1 to 4 of [`data_service`]) driven with `oneshot` around a
    //! handler of the test's own: no sockets, no store, paused time for the timeout.

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http::StatusCode;
    use http_body_util::BodyExt;
    use tokio::sync::Notify;
    use tower::util::BoxCloneService;

    use super::*;

    /// What the test handler does, by path: `/slow` sleeps an hour, `/hold` waits for
    /// `release` (saying `entered` first), anything else answers 200 at once.
    #[derive(Default)]
    struct Handler {
        calls: AtomicUsize,
        entered: Notify,
        release: Notify,
    }

    type TestService = Stack<BoxCloneService<Request<String>, Response<Body>, BoxError>>;

    fn service(handler: &Arc<Handler>, config: &ProxyConfig) -> (TestService, ProxyMetrics) {
        let handler = Arc::clone(handler);
        let metrics = ProxyMetrics::new();
        let inner = tower::service_fn(move |request: Request<String>| {
            let handler = Arc::clone(&handler);
            async move {
                handler.calls.fetch_add(1, Ordering::SeqCst);
                match request.uri().path() {
                    "/slow" => tokio::time::sleep(Duration::from_secs(3600)).await,
                    "/hold" => {
                        handler.entered.notify_one();
                        handler.release.notified().await;
                    }
                    _ => {}
                }
                Ok::<_, BoxError>(Response::new(Body::from("done")))
            }
        });
        (
            stack(BoxCloneService::new(inner), config, metrics.clone()),
            metrics,
        )
    }

    fn get(path: &str) -> Request<String> {
        Request::get(path)
            .body(String::new())
            .expect("a valid request")
    }

    async fn error_code(response: Response<Body>) -> String {
        let body = response.into_body().collect().await.expect("a full body");
        let json: serde_json::Value = serde_json::from_slice(&body.to_bytes()).expect("JSON");
        json["error"].as_str().unwrap_or_default().to_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_slower_than_the_timeout_is_answered_504_timeout() {
        let config = ProxyConfig {
            request_timeout: Duration::from_millis(300),
            ..ProxyConfig::default()
        };
        let handler = Arc::new(Handler::default());
        let (service, metrics) = service(&handler, &config);
        let response = service
            .clone()
            .oneshot(get("/slow"))
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(error_code(response).await, "timeout");
        let fast = service.oneshot(get("/fast")).await.expect("infallible");
        assert_eq!(fast.status(), StatusCode::OK, "the timeout is per request");
        let timed_out = metrics
            .requests
            .with_label_values(&[
                Endpoint::operation(&http::Method::GET, "/slow"),
                "unavailable",
            ])
            .get();
        assert_eq!(
            timed_out, 1,
            "a timed-out request is counted like any other"
        );
    }

    #[tokio::test]
    async fn a_request_over_the_concurrency_limit_is_shed_at_once_not_queued() {
        let config = ProxyConfig {
            max_concurrent_requests: 1,
            ..ProxyConfig::default()
        };
        let handler = Arc::new(Handler::default());
        let (service, metrics) = service(&handler, &config);
        let held = tokio::spawn(service.clone().oneshot(get("/hold")));
        handler.entered.notified().await;

        let refused = service
            .clone()
            .oneshot(get("/other"))
            .await
            .expect("infallible");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error_code(refused).await, "overloaded");
        assert_eq!(metrics.shed_count(Shed::ConcurrencyLimit), 1);
        assert_eq!(
            handler.calls.load(Ordering::SeqCst),
            1,
            "the refused one never ran"
        );

        handler.release.notify_one();
        let first = held.await.expect("joined").expect("infallible");
        assert_eq!(first.status(), StatusCode::OK);
        let after = service.oneshot(get("/other")).await.expect("infallible");
        assert_eq!(after.status(), StatusCode::OK, "the slot came back");
    }

    #[tokio::test]
    async fn a_client_over_the_rate_limit_gets_429_and_other_clients_do_not() {
        let config = ProxyConfig {
            rate_limit_per_second: 1,
            rate_limit_burst: 1,
            ..ProxyConfig::default()
        };
        let handler = Arc::new(Handler::default());
        let (service, metrics) = service(&handler, &config);
        let from = |ip: [u8; 4]| {
            let mut request = get("/");
            request
                .extensions_mut()
                .insert(ClientAddr(SocketAddr::from((ip, 40000))));
            request
        };
        let first = service
            .clone()
            .oneshot(from([10, 0, 0, 1]))
            .await
            .expect("infallible");
        assert_eq!(first.status(), StatusCode::OK);
        let second = service
            .clone()
            .oneshot(from([10, 0, 0, 1]))
            .await
            .expect("infallible");
        assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(second.headers().contains_key(http::header::RETRY_AFTER));
        assert_eq!(error_code(second).await, "rate_limited");
        assert_eq!(metrics.shed_count(Shed::RateLimit), 1);
        assert_eq!(
            handler.calls.load(Ordering::SeqCst),
            1,
            "refused before the handler"
        );
        let other = service
            .oneshot(from([10, 0, 0, 2]))
            .await
            .expect("infallible");
        assert_eq!(other.status(), StatusCode::OK, "the bucket is per client");
    }

    #[tokio::test]
    async fn every_reply_carries_the_request_id_given_or_a_new_one() {
        let handler = Arc::new(Handler::default());
        let (service, _) = service(&handler, &ProxyConfig::default());
        let id_of = |response: &Response<Body>| {
            response
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let mut given = get("/");
        given
            .headers_mut()
            .insert("x-request-id", HeaderValue::from_static("req-42"));
        let response = service.clone().oneshot(given).await.expect("infallible");
        assert_eq!(id_of(&response).as_deref(), Some("req-42"));

        let response = service.clone().oneshot(get("/")).await.expect("infallible");
        let made = id_of(&response).expect("an id is made when none is given");
        assert!(uuid::Uuid::parse_str(&made).is_ok(), "{made}");

        // An id longer than 128 bytes is not echoed (it would end up in every log line).
        let mut long = get("/");
        long.headers_mut().insert(
            "x-request-id",
            HeaderValue::from_str(&"x".repeat(129)).expect("ASCII"),
        );
        let response = service.oneshot(long).await.expect("infallible");
        let replaced = id_of(&response).expect("an id");
        assert!(uuid::Uuid::parse_str(&replaced).is_ok(), "{replaced}");
    }
}
