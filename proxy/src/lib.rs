//! `switchyard-proxy`: the data-plane sidecar.
//!
//! Applications append and read events through it over HTTP. It routes each tenant through a
//! lock-free, swappable routing table, holds a tenant's writers at a gate during its cutover,
//! follows moved fences to the new store, and serves health, readiness, metrics and the routing
//! table on a separate admin port. [`App::build`] and [`App::run`] let tests start the real
//! thing in-process on `127.0.0.1:0`.

pub mod access;
pub mod admin;
pub mod api;
pub mod error;
pub mod fairness;
pub mod gate;
pub mod limits;
pub mod metrics;
pub mod mirror;
pub mod payload;
pub mod reads;
pub mod routing;
pub mod server;
#[cfg(test)]
mod testing;
pub mod watcher;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_config::Config;
use switchyard_runtime::tls;
use switchyard_store::{ControlDb, EventStore, StoreError};
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex, Notify};

use crate::error::ApiError;
use crate::metrics::ProxyMetrics;
use crate::mirror::Mirror;
use crate::routing::{Routes, RoutingTable, StoreIdx};

/// Everything a request handler needs, shared by all connections.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub stores: Vec<EventStore>,
    store_index: HashMap<String, StoreIdx>,
    pub default_store: StoreIdx,
    pub control: ControlDb,
    pub routes: Routes,
    pub metrics: ProxyMetrics,
    pub mirror: Mirror,
    /// The migrating tenants' share of request slots and store connections.
    pub fairness: fairness::Fairness,
    /// Serialises reloads (see `watcher::reload`).
    pub(crate) reload_lock: Mutex<()>,
    /// Lets concurrent reloads join the one in progress (see `watcher::reload`).
    pub(crate) reload_flight: watcher::ReloadFlight,
    /// Wakes the watcher to reload now (a notification arrived).
    pub(crate) reload_now: Notify,
    /// This proxy's id in the control database's `proxies` table.
    pub proxy_id: String,
    /// Where this proxy's admin port answers, as reported in `proxies` (set when it binds).
    pub admin_url: std::sync::OnceLock<String>,
    /// Where this proxy's data plane answers, as reported in `proxies` (set when it binds).
    pub data_url: std::sync::OnceLock<String>,
    /// TLS for the admin listener, when a certificate and key are configured.
    pub tls: Option<tls::Tls>,
    /// TLS for the data listener: the same certificate, plus client certificates when
    /// `proxy.tls_client_ca_path` is set.
    pub data_tls: Option<tls::Tls>,
    /// Data-plane bearer tokens, when `proxy.data_tokens_file` is set.
    pub data_tokens: Option<access::DataTokens>,
    shutting_down: AtomicBool,
}

impl AppState {
    /// The index of a configured store.
    pub fn store_index(&self, id: &str) -> Option<StoreIdx> {
        self.store_index.get(id).copied()
    }

    /// The store a route names, or 503 when this proxy does not have it configured.
    pub fn store(&self, idx: StoreIdx) -> Result<&EventStore, ApiError> {
        self.stores
            .get(usize::from(idx))
            .ok_or_else(|| ApiError::StoreUnavailable {
                store_id: "<not configured on this proxy>".to_owned(),
                source: None,
            })
    }

    /// A store's id for display.
    pub fn store_name(&self, idx: StoreIdx) -> String {
        self.stores
            .get(usize::from(idx))
            .map_or_else(|| "<unknown>".to_owned(), |s| s.id().to_owned())
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("store {id}: {source}")]
    Store { id: String, source: StoreError },
    #[error("control database: {0}")]
    Control(StoreError),
    #[error("too many stores configured ({0}); at most {max}", max = StoreIdx::MAX - 1)]
    TooManyStores(usize),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Tokens(#[from] access::TokensError),
    /// A data listener beyond loopback that nobody has to authenticate to.
    #[error("{0}")]
    Unauthenticated(String),
    /// The config's `default_store` is not the one the control database records.
    #[error("{0}")]
    DefaultStore(String),
}

/// A built proxy, ready to run.
#[derive(Debug, Clone)]
pub struct App {
    state: Arc<AppState>,
}

impl App {
    /// Opens (lazily connecting) pools on every store and the control database. Nothing here
    /// waits for a database: a proxy starts while one is down and reports itself unready.
    pub fn build(config: Config) -> Result<Self, BuildError> {
        if let Some(refusal) = config.proxy.unauthenticated_exposure() {
            return Err(BuildError::Unauthenticated(refusal));
        }
        if config.stores.len() >= usize::from(StoreIdx::MAX) {
            return Err(BuildError::TooManyStores(config.stores.len()));
        }
        let mut stores = Vec::with_capacity(config.stores.len());
        let mut store_index = HashMap::new();
        for (i, store) in config.stores.iter().enumerate() {
            let connected = EventStore::connect(&store.id, &store.url, store.max_connections)
                .map_err(|source| BuildError::Store {
                    id: store.id.clone(),
                    source,
                })?;
            stores.push(connected);
            store_index.insert(
                store.id.clone(),
                StoreIdx::try_from(i).expect("checked above"),
            );
        }
        let default_store = *store_index
            .get(&config.default_store)
            .expect("validated config names a configured default store");
        let control = ControlDb::connect(&config.control_url, 4).map_err(BuildError::Control)?;
        let p = &config.proxy;
        let (tls, data_tls) = match (&p.tls_cert_path, &p.tls_key_path) {
            (Some(cert), Some(key)) => {
                let admin = tls::Tls::load(cert, key, None)?;
                let data = match &p.tls_client_ca_path {
                    None => admin.clone(),
                    Some(ca) => tls::Tls::load(cert, key, Some(ca))?,
                };
                (Some(admin), Some(data))
            }
            // Validation sets both or neither.
            _ => (None, None),
        };
        let data_tokens = match &p.data_tokens_file {
            None => None,
            Some(path) => Some(access::DataTokens::load(path)?),
        };
        let metrics = ProxyMetrics::new();
        if let Some(tokens) = &data_tokens {
            metrics
                .data_tokens
                .set(i64::try_from(tokens.len()).unwrap_or(i64::MAX));
        }
        let fairness = fairness::Fairness::new(
            config.proxy.migrating_tenant_share,
            config.proxy.max_concurrent_requests,
            stores.iter().map(EventStore::max_connections),
            config.proxy.gate_wait,
            metrics.clone(),
        );
        let state = AppState {
            fairness,
            mirror: Mirror::new(
                &config
                    .stores
                    .iter()
                    .map(|s| s.id.as_str())
                    .collect::<Vec<_>>(),
                config.proxy.mirror_queue_bytes,
                metrics.clone(),
            ),
            stores,
            store_index,
            default_store,
            control,
            routes: Routes::new(RoutingTable::empty(default_store)),
            metrics,
            reload_lock: Mutex::new(()),
            reload_flight: watcher::ReloadFlight::default(),
            reload_now: Notify::new(),
            proxy_id: if config.proxy.proxy_id.is_empty() {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "localhost".to_owned());
                format!("{host}:{}", std::process::id())
            } else {
                config.proxy.proxy_id.clone()
            },
            admin_url: std::sync::OnceLock::new(),
            data_url: std::sync::OnceLock::new(),
            tls,
            data_tls,
            data_tokens,
            shutting_down: AtomicBool::new(false),
            config,
        };
        Ok(Self {
            state: Arc::new(state),
        })
    }

    /// Creates the schemas of embedded (SQLite) databases, so the embedded default runs with no
    /// `init`. PostgreSQL databases are left to `switchyard-control init`.
    pub async fn prepare_embedded(&self) -> Result<(), BuildError> {
        if self.state.control.is_embedded() {
            self.state
                .control
                .ensure_schema()
                .await
                .map_err(BuildError::Control)?;
            // The embedded default has no `init`: the first program to start records it.
            self.state
                .control
                .record_default_store(&self.state.config.default_store)
                .await
                .map_err(BuildError::Control)?;
        }
        for store in self.state.stores.iter().filter(|s| s.is_embedded()) {
            store
                .ensure_schema()
                .await
                .map_err(|source| BuildError::Store {
                    id: store.id().to_owned(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Refuses to start when the control database records another default store than this
    /// config's. A control database that does not answer within `limit` is not waited for (the
    /// proxy starts while it is down); the routing watcher then follows the recorded default.
    pub async fn check_default_store(&self, limit: Duration) -> Result<(), BuildError> {
        let configured = &self.state.config.default_store;
        match tokio::time::timeout(limit, self.state.control.default_store()).await {
            Ok(Ok(Some(recorded))) if &recorded != configured => Err(BuildError::DefaultStore(
                switchyard_config::default_store_mismatch(configured, &recorded),
            )),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the recorded default store yet");
                Ok(())
            }
            Err(_) => {
                tracing::warn!("the control database did not answer; the default store is checked when routing loads");
                Ok(())
            }
        }
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves the data plane on `data` and the admin port on `admin` until `shutdown`
    /// completes; then readiness goes 503, listeners close, in-flight requests drain within
    /// the grace period, and pools close last.
    pub async fn run(
        self,
        data: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let state = self.state;
        let grace = state.config.proxy.shutdown_grace;
        let scheme = if state.tls.is_some() { "https" } else { "http" };
        if let Ok(addr) = admin.local_addr() {
            let _ = state.admin_url.set(format!("{scheme}://{addr}"));
        }
        if let Ok(addr) = data.local_addr() {
            let _ = state.data_url.set(format!("{scheme}://{addr}"));
            if !state.config.proxy.data_plane_authenticated() && !addr.ip().is_loopback() {
                // Only reachable with proxy.allow_unauthenticated (App::build refuses otherwise).
                tracing::warn!(
                    data_addr = %addr,
                    "unauthenticated data plane on {addr}: anyone who can reach it may read and \
                     write every tenant (proxy.allow_unauthenticated = true)"
                );
                state.metrics.data_plane_unauthenticated.set(1);
            }
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        // The admin port outlives the data port's drain, so `/readyz` can say 503 meanwhile.
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        let watcher = tokio::spawn(watcher::run(Arc::clone(&state), stop_rx.clone()));
        let tokens_watcher = state.data_tokens.is_some().then(|| {
            let (state, stop) = (Arc::clone(&state), stop_rx.clone());
            tokio::spawn(async move {
                if let Some(tokens) = &state.data_tokens {
                    let every = state.config.proxy.data_tokens_poll;
                    access::watch(tokens, &state.metrics, every, stop).await;
                }
            })
        });
        let mirror_workers = state.mirror.start(&state.stores);
        let admin_server = tokio::spawn(switchyard_runtime::server::serve_with(
            admin,
            admin::service(Arc::clone(&state)),
            admin_stop_rx,
            Duration::from_secs(1),
            switchyard_runtime::server::ServeOptions::admin(&state.config.proxy, state.tls.clone()),
        ));
        let data_server = switchyard_runtime::server::serve_with(
            data,
            server::data_service(Arc::clone(&state)),
            stop_rx,
            grace,
            switchyard_runtime::server::ServeOptions::data(
                &state.config.proxy,
                state.data_tls.clone(),
            ),
        );
        tokio::pin!(data_server);
        tokio::select! {
            () = &mut data_server => {}
            () = shutdown => {
                tracing::info!("shutting down: readiness off, draining requests");
                state.shutting_down.store(true, Ordering::Release);
                let _ = stop_tx.send(true);
                data_server.await;
            }
        }
        // Mirror work still queued gets a moment; what is left the tail copies.
        if !state.mirror.drain(Duration::from_secs(2)).await {
            tracing::warn!(
                "mirror queues not empty at shutdown; the migration tail will copy the rest"
            );
        }
        let _ = admin_stop_tx.send(true);
        let _ = admin_server.await;
        watcher.abort();
        if let Some(tokens_watcher) = tokens_watcher {
            tokens_watcher.abort();
        }
        for worker in mirror_workers {
            worker.abort();
        }
        for store in &state.stores {
            store.close().await;
        }
        state.control.close().await;
        tracing::info!("stopped");
    }
}

/// Binds the configured data and admin addresses.
pub async fn bind(config: &Config) -> std::io::Result<(TcpListener, TcpListener)> {
    Ok((
        TcpListener::bind(config.proxy.listen).await?,
        TcpListener::bind(config.proxy.admin_listen).await?,
    ))
}
#[cfg(test)]
mod tests {
    //! The whole proxy in-process on `127.0.0.1:0` (SQLite files, no PostgreSQL, no child
    //! process): what the end-to-end tests check on the binary, in a second.

    use bytes::Bytes;
    use http::{Method, Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpStream;
    use uuid::Uuid;

    use super::*;
    use crate::testing::TestApp;

    /// One request on a fresh connection; the status and the body as JSON (null when empty).
    async fn call(
        addr: std::net::SocketAddr,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)?
        };
        Ok((status, json))
    }

    #[tokio::test]
    async fn the_app_in_process_serves_appends_and_reads_and_stops_on_shutdown(
    ) -> anyhow::Result<()> {
        let test = TestApp::start(|_| {}).await?;
        let data = TcpListener::bind("127.0.0.1:0").await?;
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        let (data_addr, admin_addr) = (data.local_addr()?, admin.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(test.app.clone().run(data, admin, async {
            let _ = stopped.await;
        }));

        // Ready once the first routing table is loaded (poll with a deadline, no sleeps).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (status, _) = call(admin_addr, Method::GET, "/readyz", None).await?;
            if status == StatusCode::OK {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz stayed {status}"
            );
            tokio::task::yield_now().await;
        }

        let tenant = Uuid::new_v4();
        let stream = format!(
            "/v1/tenants/{tenant}/streams/Order/{}/events",
            Uuid::new_v4()
        );
        let event_id = Uuid::new_v4();
        let body = serde_json::json!({
            "expected_version": 0,
            "events": [{ "event_id": event_id, "event_type": "Placed", "payload": { "n": 1 } }],
        });
        let (status, reply) = call(data_addr, Method::POST, &stream, Some(body)).await?;
        assert_eq!(status, StatusCode::CREATED, "{reply}");
        let (status, read) = call(data_addr, Method::GET, &stream, None).await?;
        assert_eq!(status, StatusCode::OK, "{read}");
        let events = read["events"].as_array().expect("events");
        assert_eq!(events.len(), 1, "{read}");
        assert_eq!(events[0]["event_id"], event_id.to_string());
        assert_eq!(events[0]["payload"]["n"], 1);

        let _ = stop.send(());
        running.await?;
        assert!(
            TcpStream::connect(data_addr).await.is_err(),
            "the data port is closed after shutdown"
        );
        Ok(())
    }
}
