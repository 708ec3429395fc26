//! Accepting connections (HTTP/1.1 and h2c on one port) and the tower stack in front of the
//! data-plane handler.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tracing::Instrument;

use crate::api::{self, Endpoint};
use crate::error::{ApiError, Body};
use crate::metrics::ProxyMetrics;
use crate::AppState;

/// How long a client may take to send a request's headers (slow-client protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The data-plane service, outer to inner:
///
/// 1. `Observe` — span `request{method, route, request_id}`, request metrics, and turning the
///    inner layers' errors into replies. Outermost so that shed and timed-out requests are
///    counted and answered like any other.
/// 2. timeout — the whole-request deadline; sits outside the limit so time spent queued for a
///    slot counts too.
/// 3. load-shed — refuses at once (503 overloaded) instead of queueing when the limit is full,
///    so a slow store cannot make the proxy hoard requests.
/// 4. concurrency limit — bounds the requests in progress, hence memory and pool pressure.
/// 5. the handler — routes, gates, appends, reads.
pub fn data_service(
    state: Arc<AppState>,
) -> impl Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future = impl Send>
       + Clone
       + Send
       + 'static {
    let timeout = Duration::from_millis(state.config.proxy.request_timeout_ms);
    let limit = state.config.proxy.max_concurrent_requests;
    let metrics = state.metrics.clone();
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
        timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
    }
}

/// Traces, measures, and answers errors of the layers below (see [`data_service`]).
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: ProxyMetrics,
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

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let operation = Endpoint::operation(request.method(), request.uri().path());
        let request_id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 128)
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let span = tracing::info_span!("request", method = %request.method(), route = operation, request_id = %request_id);
        let inner = self.inner.clone();
        let metrics = self.metrics.clone();
        let timeout_ms = self.timeout_ms;
        Box::pin(
            async move {
                let started = Instant::now();
                let mut response = match inner.oneshot(request).await {
                    Ok(response) => response,
                    Err(e) if e.is::<tower::timeout::error::Elapsed>() => {
                        ApiError::Timeout(timeout_ms).into_response()
                    }
                    Err(e) if e.is::<tower::load_shed::error::Overloaded>() => {
                        ApiError::Overloaded.into_response()
                    }
                    Err(e) => ApiError::Internal(e).into_response(),
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

/// Serves `service` on `listener` until `shutdown` flips, then stops accepting and gives open
/// connections `grace` to finish.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let connection = builder
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service.clone()))
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(
                    async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    }
                    .instrument(tracing::debug_span!("conn", client.addr = %peer)),
                );
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = grace.as_millis(),
            "connections still open after the grace period; closing them"
        );
    }
}
