//! `switchyard-control demo`: the whole lifecycle in one process, on fresh stores.
//!
//! It makes a control database and two stores (SQLite files under a fresh folder, or
//! PostgreSQL databases on a server it is given), starts a real proxy in-process on random
//! ports, seeds a tenant, runs writers that append through the proxy over HTTP, migrates the
//! tenant with the engine while they write, cuts over under their load, verifies, and checks
//! that every append the writers got acknowledged is in the target exactly once.
//!
//! The run in order: [`setup`] makes the stores and seeds the tenant, [`load`] writes through
//! the proxy while [`migrate`] copies and cuts over, and [`report`] checks the target and
//! summarises.

mod load;
mod migrate;
mod report;
mod setup;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use switchyard_client::{AdminClient, DataClient};
use switchyard_config::Config;
use switchyard_store::EventStore;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::engine::{CutoverOutcome, Engine, Report};

pub use report::text;

/// Where the demo keeps its data.
#[derive(Debug, Clone)]
pub enum Stores {
    /// SQLite files in a fresh folder under this one (the embedded default's
    /// `./switchyard-data`).
    Embedded { parent: PathBuf },
    /// Fresh databases on the PostgreSQL server of this URL.
    Postgres { server_url: String },
    /// The stores of a config file: its default store is the source, the next one the target.
    /// Nothing is created or dropped; the demo tenant is a fresh id.
    Config(Box<Config>),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub events: u64,
    pub writers: usize,
    pub keep: bool,
    pub stores: Stores,
    /// Rest between one writer's appends.
    pub writer_pause: Duration,
    /// How long the writers go on writing (to the target) after the cutover.
    pub after_cutover: Duration,
}

/// The summary the demo prints.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub ok: bool,
    pub backend: &'static str,
    /// The folder (embedded) or the databases (PostgreSQL) the demo used.
    pub data: String,
    pub kept: bool,
    pub tenant_id: Uuid,
    pub migration_id: Uuid,
    pub source_store: String,
    pub target_store: String,
    pub seeded_events: u64,
    pub writers: usize,
    /// Events the bulk copy, the tail and the final delta copied into the target.
    pub events_copied: i64,
    /// The bulk copy alone: events and seconds.
    pub bulk_copied: i64,
    pub copy_seconds: f64,
    pub copy_rate_events_per_second: f64,
    pub lag_at_cutover: i64,
    pub cutover_attempts: u32,
    pub cutover: CutoverOutcome,
    /// The slowest acknowledged append that overlapped the cutover: the pause a writer saw.
    pub writer_pause_longest_ms: f64,
    /// The 99th percentile of the appends that overlapped the cutover.
    pub writer_pause_p99_ms: f64,
    /// Appends that overlapped the cutover.
    pub appends_during_cutover: usize,
    /// The 99th percentile of every acknowledged append of the run.
    pub append_latency_p99_ms: f64,
    /// Each append carries one event.
    pub appends_acknowledged: usize,
    /// Appends answered 503 and retried (the same body: appends are idempotent).
    pub appends_retried: u64,
    /// Acknowledged appends that landed on the target store (after the cutover).
    pub appends_on_target: usize,
    pub verification: Verification,
    /// Seeded plus acknowledged events that the target must hold.
    pub expected_events: usize,
    pub target_events: usize,
    /// Expected events missing from the target (or at another stream or version).
    pub lost: usize,
    /// Events present more than once in the target (by event_id, or by writer and sequence).
    pub duplicated: usize,
    pub total_seconds: f64,
}

/// The result of comparing the source (frozen by its fence) with the target.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub consistent: bool,
    pub source_events: usize,
    pub streams: usize,
    pub streams_consistent: usize,
    /// At most 10 differences, described.
    pub violations: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Failed(String),
}

/// Runs the demo; `progress` hears of every copy batch and tail pass.
pub async fn run(
    options: &Options,
    progress: Arc<dyn Fn(&Report) + Send + Sync>,
) -> Result<Summary, DemoError> {
    let (mut config, made) = setup::prepare(&options.stores).await?;
    let result = run_on(&mut config, options, &made.label, progress).await;
    if !options.keep {
        made.remove().await;
    }
    result.map(|mut s| {
        s.kept = options.keep || matches!(options.stores, Stores::Config(_));
        s
    })
}

async fn run_on(
    config: &mut Config,
    options: &Options,
    label: &str,
    progress: Arc<dyn Fn(&Report) + Send + Sync>,
) -> Result<Summary, DemoError> {
    let started = Instant::now();
    config.proxy.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.proxy.admin_listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    // SQLite has no notifications: proxies learn routing changes by polling the epoch.
    config.proxy.routing_poll = config.proxy.routing_poll.min(Duration::from_millis(50));
    let source_id = config.default_store.clone();
    let target_id = config
        .stores
        .iter()
        .map(|s| s.id.clone())
        .find(|id| *id != source_id)
        .ok_or_else(|| DemoError::Setup("the demo needs a second store as target".to_owned()))?;

    let engine = Arc::new(
        Engine::new(config, format!("demo:{}", std::process::id()))
            .map_err(|e| DemoError::Setup(e.to_string()))?,
    );
    // What `init` does: idempotent on stores that are already set up.
    engine
        .control
        .ensure_schema()
        .await
        .map_err(|e| DemoError::Setup(format!("control database: {e}")))?;
    for id in [&source_id, &target_id] {
        let store = engine
            .store(id)
            .map_err(|e| DemoError::Setup(e.to_string()))?;
        store
            .ensure_schema()
            .await
            .map_err(|e| DemoError::Setup(format!("store {id}: {e}")))?;
    }
    let source = engine
        .store(&source_id)
        .map_err(|e| DemoError::Setup(e.to_string()))?
        .clone();
    let target = engine
        .store(&target_id)
        .map_err(|e| DemoError::Setup(e.to_string()))?
        .clone();

    // The proxy, in-process on random ports.
    let (data, admin) = switchyard_proxy::bind(config)
        .await
        .map_err(|e| DemoError::Setup(format!("binding the proxy: {e}")))?;
    let data_addr = data
        .local_addr()
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let admin_addr = admin
        .local_addr()
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let app = switchyard_proxy::App::build(config.clone())
        .map_err(|e| DemoError::Setup(format!("proxy: {e}")))?;
    let (proxy_stop, proxy_stopped) = oneshot::channel::<()>();
    let proxy = tokio::spawn(app.run(data, admin, async move {
        let _ = proxy_stopped.await;
    }));
    let outcome = async {
        setup::wait_ready(&AdminClient::new(&format!("http://{admin_addr}"))).await?;
        let tenant = Uuid::new_v4();
        let seeded = setup::seed(&source, tenant, options.events).await?;
        let proxy = DataClient::new(&format!("http://{data_addr}"));
        let writers = load::start(
            proxy,
            tenant,
            options.writers,
            started,
            options.writer_pause,
        );
        let migrated = migrate::migrate(&engine, tenant, &target_id, progress, started).await;
        // Writers keep writing after the cutover: to the target now.
        if migrated.is_ok() {
            tokio::time::sleep(options.after_cutover).await;
        }
        let writers = writers.stop().await;
        if let Some(failure) = writers.failed.first() {
            return Err(DemoError::Failed(format!(
                "writer {}: append refused: {}",
                failure.writer, failure.error
            )));
        }
        let migrated = migrated?;
        let target_events = report::read_all(&target, tenant).await?;
        let verification = report::verify(&source, &target, tenant).await?;
        Ok::<_, DemoError>(report::summarise(
            options,
            label,
            tenant,
            &source_id,
            &target_id,
            seeded,
            migrated,
            &writers,
            verification,
            &target_events,
            engine
                .store(&source_id)
                .map_or("?", EventStore::backend_name),
            started,
        ))
    }
    .await;

    let _ = proxy_stop.send(());
    let _ = proxy.await;
    engine.control.close().await;
    source.close().await;
    target.close().await;
    outcome
}

/// The folder the embedded demo makes its own folder in.
pub fn embedded_parent() -> &'static Path {
    Path::new(switchyard_config::EMBEDDED_DIR)
}
