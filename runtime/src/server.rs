//! Accepting connections: HTTP/1.1 and h2c on one port (or h2 and HTTP/1.1 by ALPN over
//! TLS), with the connection-level limits (slow clients, head size, connection count) and a
//! graceful stop. Both programs' listeners run on it: the proxy's data and admin ports and
//! `serve`'s admin port.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use switchyard_config::{ProxyConfig, MIN_HEADER_BYTES};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::activity::Activity;
use crate::tls::Tls;

/// The response body both programs serve.
pub type Body = Full<Bytes>;

/// Connection-level limits of one listener (slow clients, head size, connection count, TLS).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// From a request head's first byte (or from connecting, for the first request) to its
    /// last; then the connection is closed.
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub keep_alive_idle: Duration,
    /// Largest request head (HTTP/1: 431 over it; HTTP/2: header list size).
    pub max_header_bytes: usize,
    /// Open connections at most; the next ones are answered 503 and closed.
    pub max_connections: usize,
    pub tls: Option<Tls>,
}

/// Connections the admin port keeps open at most (its clients are probes and scrapers).
const ADMIN_MAX_CONNECTIONS: usize = 64;

impl ServeOptions {
    /// The data port's options, from the proxy config.
    pub fn data(config: &ProxyConfig, tls: Option<Tls>) -> Self {
        Self {
            header_read_timeout: config.header_read_timeout,
            keep_alive_idle: config.keep_alive_idle,
            max_header_bytes: config.max_header_bytes.max(MIN_HEADER_BYTES),
            max_connections: config.max_connections,
            tls,
        }
    }

    /// The admin port's: the same timeouts, few connections.
    pub fn admin(config: &ProxyConfig, tls: Option<Tls>) -> Self {
        Self {
            max_connections: ADMIN_MAX_CONNECTIONS,
            ..Self::data(config, tls)
        }
    }
}

/// The client's address, put into every request's extensions (for per-client rate limits).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

impl Default for ServeOptions {
    /// An admin port's options with the default proxy config and no TLS (`serve`'s admin port).
    fn default() -> Self {
        Self::admin(&ProxyConfig::default(), None)
    }
}

/// [`serve_with`] with the default options.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    serve_with(listener, service, shutdown, grace, ServeOptions::default()).await;
}

/// Serves `service` on `listener` until `shutdown` flips, then stops accepting and gives open
/// connections `grace` to finish.
///
/// Slow clients: hyper's own header read timeout also runs while a keep-alive connection sits
/// idle between requests, so it is off here; instead each connection's [`Activity`] runs the
/// header timer from a head's first byte and a separate, longer idle timer between requests,
/// and a watchdog closes the connection when one of them expires. Body read time is bounded by
/// the handler (408 `body_timeout`).
pub async fn serve_with<S>(
    listener: TcpListener,
    service: S,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    options: ServeOptions,
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
        .header_read_timeout(None)
        .max_buf_size(options.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let options = Arc::new(options);
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
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::warn!(client.addr = %peer, limit = options.max_connections, "connection limit reached; refusing a connection");
                    tokio::spawn(refuse(stream, options.max_connections, options.tls.is_some()));
                    continue;
                };
                let activity = Arc::new(Activity::new());
                let service = PerConnection {
                    inner: service.clone(),
                    peer,
                    activity: Arc::clone(&activity),
                };
                let (builder, watcher, options) = (builder.clone(), graceful.watcher(), Arc::clone(&options));
                tokio::spawn(
                    async move {
                        let _slot = slot;
                        let io = Watched { inner: stream, activity: Arc::clone(&activity), sniffed: 0, sniff: options.tls.is_none() };
                        match &options.tls {
                            None => run_connection(&builder, watcher, TokioIo::new(io), service, &activity, &options).await,
                            Some(tls) => {
                                let accepted = tokio::time::timeout(options.header_read_timeout, tls.0.accept(io)).await;
                                let stream = match accepted {
                                    Ok(Ok(stream)) => stream,
                                    Ok(Err(e)) => {
                                        tracing::debug!(error = %e, "TLS handshake failed");
                                        return;
                                    }
                                    Err(_) => {
                                        tracing::debug!("TLS handshake timed out");
                                        return;
                                    }
                                };
                                if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                                    activity.set_h2();
                                }
                                run_connection(&builder, watcher, TokioIo::new(stream), service, &activity, &options).await;
                            }
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

/// Serves one connection until it ends or the watchdog finds it too slow or idle too long.
async fn run_connection<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    service: PerConnection<S>,
    activity: &Activity,
    options: &ServeOptions,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let connection = watcher.watch(
        builder
            .serve_connection(io, TowerToHyperService::new(service))
            .into_owned(),
    );
    tokio::pin!(connection);
    loop {
        let wait = match activity.check(options.header_read_timeout, options.keep_alive_idle) {
            Ok(wait) => wait.clamp(Duration::from_millis(5), Duration::from_secs(1)),
            Err(expired) => {
                // Dropping the connection closes the socket.
                tracing::debug!(
                    reason = expired.as_str(),
                    "closing a slow or idle connection"
                );
                return;
            }
        };
        tokio::select! {
            ended = &mut connection => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Answers a connection over the limit with 503 and closes it.
async fn refuse(mut stream: TcpStream, limit: usize, tls: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if tls {
        return; // no handshake for a connection we will not serve; closing says enough
    }
    let body = serde_json::Value::Object(crate::admin::error_body(
        "too_many_connections",
        &format!("the proxy has {limit} connections open, its limit; retry shortly"),
        true,
    ))
    .to_string();
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes, so closing does not reset the reply away.
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// The per-connection service: gives each request the client's address and tells the
/// connection's [`Activity`] when a request is in progress.
#[derive(Clone)]
struct PerConnection<S> {
    inner: S,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

impl<S> Service<Request<Incoming>> for PerConnection<S>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(ClientAddr(self.peer));
        let activity = Arc::clone(&self.activity);
        let handled = self.inner.clone().oneshot(request);
        Box::pin(async move {
            let _busy = activity.begin();
            handled.await
        })
    }
}

/// A socket that reports reads to its connection's [`Activity`], and tells HTTP/2 (its
/// preface starts with `PRI`) from HTTP/1 by the first bytes when there is no TLS.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    /// How many bytes of the preface check have been seen (up to 3).
    sniffed: usize,
    sniff: bool,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                if self.sniff && self.sniffed < 3 {
                    let mut h2 = true;
                    for &byte in new.iter().take(3 - self.sniffed) {
                        h2 &= byte == b"PRI"[self.sniffed];
                        self.sniffed += 1;
                    }
                    if !h2 {
                        self.sniff = false;
                    } else if self.sniffed == 3 {
                        self.activity.set_h2();
                    }
                }
                self.activity.on_read();
            }
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
