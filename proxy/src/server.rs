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
use switchyard_runtime::server::ClientAddr;
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
    let timeout = state.config.proxy.request_timeout;
    let limit = state.config.proxy.max_concurrent_requests;
    let metrics = state.metrics.clone();
    let limiter = RateLimiter::new(
        state.config.proxy.rate_limit_per_second,
        state.config.proxy.rate_limit_burst,
    )
    .map(Arc::new);
    let handler = tower::service_fn(move |request: Request<Incoming>| {
        let state = Arc::clone(&state);
        async move { Ok::<_, BoxError>(api::handle(state, request).await) }
    });
    let inner = ServiceBuilder::new()
        .timeout(timeout)
        .load_shed()
        .concurrency_limit(limit)
        .service(handler);
    Observe {
        inner,
        metrics,
        limiter,
        timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
    }
}

/// Traces, measures, and answers errors of the layers below (see [`data_service`]).
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: ProxyMetrics,
    /// Per-client-IP request rate limit, when configured (429 before anything else runs).
    limiter: Option<Arc<RateLimiter>>,
    timeout_ms: u64,
}

impl<S> Service<Request<Incoming>> for Observe<S>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is decided per call by the load-shed layer.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
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
