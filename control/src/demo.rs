//! `switchyard-control demo`: the whole lifecycle in one process, on fresh stores.
//!
//! It makes a control database and two stores (SQLite files under a fresh folder, or
//! PostgreSQL databases on a server it is given), starts a real proxy in-process on random
//! ports, seeds a tenant, runs writers that append through the proxy over HTTP, migrates the
//! tenant with the engine while they write, cuts over under their load, verifies, and checks
//! that every append the writers got acknowledged is in the target exactly once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::value::RawValue;
use switchyard_config::Config;
use switchyard_config::{ControlConfig, ProxyConfig, StoreConfig};
use switchyard_store::{AuditNote, EventStore, MigrationState, NewEvent, StoredEvent, StreamRef};
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::engine::{CutoverMode, CutoverOutcome, Driven, Engine, Report, StartRequest};

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

/// One acknowledged append of a writer.
#[derive(Debug, Clone)]
struct Acked {
    stream: Uuid,
    event_id: Uuid,
    version: i64,
    store_id: String,
    /// Since the run's start.
    started: Duration,
    latency: Duration,
}

#[derive(Debug, Default)]
struct WriterResult {
    acked: Vec<Acked>,
    retried: u64,
}

/// What the demo made and must clean up.
#[derive(Debug)]
struct Made {
    label: String,
    dir: Option<PathBuf>,
    pg: Option<(String, Vec<String>)>,
}

impl Made {
    async fn remove(&self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
            // The parent too, if the demo left it empty (it fails otherwise, as it should).
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        if let Some((server, names)) = &self.pg {
            for name in names {
                if let Err(e) = switchyard_store::provision::drop_database(server, name).await {
                    eprintln!("demo: dropping database {name}: {e}");
                }
            }
        }
    }
}

fn demo_config(control_url: String, shared: String, dedicated: String) -> Config {
    let store = |id: &str, url: String| StoreConfig {
        id: id.to_owned(),
        url,
        max_connections: 8,
        sslmode: String::new(),
        ssl_root_cert: String::new(),
    };
    Config {
        control_url,
        control_sslmode: String::new(),
        control_ssl_root_cert: String::new(),
        default_store: "shared".to_owned(),
        stores: vec![store("shared", shared), store("dedicated", dedicated)],
        proxy: ProxyConfig::default(),
        control: ControlConfig::default(),
    }
}

/// Creates what `stores` asks for and returns the config over it.
async fn prepare(stores: &Stores) -> Result<(Config, Made), DemoError> {
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let suffix = &Uuid::new_v4().simple().to_string()[..6];
    match stores {
        Stores::Embedded { parent } => {
            let dir = parent.join(format!("demo-{stamp}-{suffix}"));
            std::fs::create_dir_all(&dir)
                .map_err(|e| DemoError::Setup(format!("creating {}: {e}", dir.display())))?;
            let url = |name: &str| format!("sqlite://{}", dir.join(name).display());
            let config = demo_config(url("control.db"), url("shared.db"), url("dedicated.db"));
            Ok((
                config,
                Made {
                    label: dir.display().to_string(),
                    dir: Some(dir),
                    pg: None,
                },
            ))
        }
        Stores::Postgres { server_url } => {
            let base = format!("sy_demo_{}_{suffix}", stamp.replace('-', "_"));
            let names: Vec<String> = ["control", "shared", "dedicated"]
                .iter()
                .map(|n| format!("{base}_{n}"))
                .collect();
            let mut urls = Vec::new();
            let mut made = Made {
                label: names.join(", "),
                dir: None,
                pg: Some((server_url.clone(), Vec::new())),
            };
            for name in &names {
                let created = switchyard_store::provision::create_database(server_url, name).await;
                if let Err(e) = created {
                    made.remove().await;
                    return Err(DemoError::Setup(format!("creating database {name}: {e}")));
                }
                if let Some((_, made_names)) = &mut made.pg {
                    made_names.push(name.clone());
                }
                urls.push(
                    switchyard_store::provision::database_url(server_url, name)
                        .map_err(|e| DemoError::Setup(e.to_string()))?,
                );
            }
            let mut urls = urls.into_iter();
            let mut next = || urls.next().unwrap_or_default();
            let config = demo_config(next(), next(), next());
            Ok((config, made))
        }
        Stores::Config(config) => Ok((
            (**config).clone(),
            Made {
                label: "the stores of the config file (demo tenant left in place)".to_owned(),
                dir: None,
                pg: None,
            },
        )),
    }
}

/// Runs the demo; `progress` hears of every copy batch and tail pass.
pub async fn run(
    options: &Options,
    progress: Arc<dyn Fn(&Report) + Send + Sync>,
) -> Result<Summary, DemoError> {
    let (mut config, made) = prepare(&options.stores).await?;
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
    config.proxy.listen = "127.0.0.1:0".to_owned();
    config.proxy.admin_listen = "127.0.0.1:0".to_owned();
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
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();

    let outcome = async {
        wait_ready(&client, &format!("http://{admin_addr}/readyz")).await?;
        let tenant = Uuid::new_v4();
        let seeded = seed(&source, tenant, options.events).await?;
        let base = format!("http://{data_addr}");
        let (writers_stop, writers_rx) = watch::channel(false);
        let writers: Vec<_> = (0..options.writers)
            .map(|w| {
                tokio::spawn(writer(
                    client.clone(),
                    base.clone(),
                    tenant,
                    w,
                    started,
                    options.writer_pause,
                    writers_rx.clone(),
                ))
            })
            .collect();
        let migrated = migrate(&engine, tenant, &target_id, progress, started).await;
        // Writers keep writing after the cutover: to the target now.
        if migrated.is_ok() {
            tokio::time::sleep(options.after_cutover).await;
        }
        let _ = writers_stop.send(true);
        let mut results = Vec::new();
        for w in writers {
            results.push(
                w.await
                    .map_err(|e| DemoError::Failed(format!("writer: {e}")))??,
            );
        }
        let migrated = migrated?;
        let target_events = read_all(&target, tenant).await?;
        let verification = verify(&source, &target, tenant).await?;
        Ok::<_, DemoError>(summarise(
            options,
            label,
            tenant,
            &source_id,
            &target_id,
            seeded,
            migrated,
            results,
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

async fn wait_ready(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
) -> Result<(), DemoError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((StatusCode::OK, _)) = request(client, Method::GET, url, Bytes::new()).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Setup(format!(
                "the proxy was not ready at {url} within 20 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn request(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    body: Bytes,
) -> Result<(StatusCode, Bytes), String> {
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// Writes `events` events of the tenant into the source directly, 100 per stream.
async fn seed(source: &EventStore, tenant: Uuid, events: u64) -> Result<Vec<Uuid>, DemoError> {
    const PER_STREAM: u64 = 100;
    let mut ids = Vec::new();
    let mut written = 0u64;
    let mut seq = 0u64;
    while written < events {
        let n = PER_STREAM.min(events - written);
        let stream = Uuid::new_v4();
        let batch: Vec<NewEvent> = (0..n)
            .map(|_| {
                seq += 1;
                let payload = RawValue::from_string(format!(
                    "{{\"seq\":{seq},\"amount\":{},\"note\":\"seeded by the demo\"}}",
                    seq % 97
                ))
                .expect("valid JSON");
                NewEvent::new(
                    Uuid::new_v4(),
                    "OrderPlaced",
                    payload,
                    Some("demo-seed".to_owned()),
                    None,
                )
            })
            .collect();
        source
            .append(
                StreamRef {
                    tenant_id: tenant,
                    aggregate_type: "Order",
                    aggregate_id: stream,
                },
                Some(0),
                &batch,
            )
            .await
            .map_err(|e| DemoError::Failed(format!("seeding the source: {e}")))?;
        ids.extend(batch.iter().map(|e| e.event_id));
        written += n;
    }
    Ok(ids)
}

/// One writer: appends one event at a time to its own streams through the proxy, retrying the
/// same body (same event id) on 503 or a dropped connection, and records every
/// acknowledgement with its latency.
async fn writer(
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    tenant: Uuid,
    w: usize,
    t0: Instant,
    pause: Duration,
    stop: watch::Receiver<bool>,
) -> Result<WriterResult, DemoError> {
    const STREAMS: usize = 4;
    let streams: Vec<Uuid> = (0..STREAMS).map(|_| Uuid::new_v4()).collect();
    let mut versions = [0i64; STREAMS];
    let mut result = WriterResult::default();
    let mut seq = 0u64;
    while !*stop.borrow() {
        let s = usize::try_from(seq).unwrap_or(0) % STREAMS;
        seq += 1;
        let event_id = Uuid::new_v4();
        let body = serde_json::json!({
            "expected_version": versions[s],
            "events": [{
                "event_id": event_id,
                "event_type": "Deposited",
                "actor_id": format!("writer-{w}"),
                "payload": { "writer": w, "seq": seq, "amount": seq % 13 },
            }],
        });
        let body =
            Bytes::from(serde_json::to_vec(&body).map_err(|e| DemoError::Failed(e.to_string()))?);
        let url = format!(
            "{base}/v1/tenants/{tenant}/streams/Account/{}/events",
            streams[s]
        );
        let began = Instant::now();
        let deadline = began + Duration::from_secs(30);
        loop {
            match request(&client, Method::POST, &url, body.clone()).await {
                Ok((StatusCode::CREATED, reply)) => {
                    let reply: serde_json::Value = serde_json::from_slice(&reply)
                        .map_err(|e| DemoError::Failed(format!("append reply: {e}")))?;
                    let version = reply["first_version"].as_i64().unwrap_or(-1);
                    versions[s] = reply["last_version"].as_i64().unwrap_or(versions[s]);
                    result.acked.push(Acked {
                        stream: streams[s],
                        event_id,
                        version,
                        store_id: reply["store_id"].as_str().unwrap_or_default().to_owned(),
                        started: began.duration_since(t0),
                        latency: began.elapsed(),
                    });
                    break;
                }
                Ok((status, reply)) if status.is_server_error() => {
                    if Instant::now() > deadline {
                        return Err(DemoError::Failed(format!(
                            "writer {w}: append still refused after 30 s: {status} {}",
                            String::from_utf8_lossy(&reply)
                        )));
                    }
                    result.retried += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok((status, reply)) => {
                    return Err(DemoError::Failed(format!(
                        "writer {w}: append refused: {status} {}",
                        String::from_utf8_lossy(&reply)
                    )))
                }
                Err(e) => {
                    if Instant::now() > deadline {
                        return Err(DemoError::Failed(format!("writer {w}: {e}")));
                    }
                    result.retried += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    Ok(result)
}

/// What the migration did, for the summary.
#[derive(Debug)]
struct Migrated {
    id: Uuid,
    events_copied: i64,
    /// Events the bulk copy had copied when its last batch was reported.
    bulk_copied: i64,
    copy_seconds: f64,
    outcome: CutoverOutcome,
    attempts: u32,
    /// The cutover's window since the run's start.
    window: (Duration, Duration),
}

/// Starts the migration, drives it (copy, then the tail) in a task until the tenant is
/// dual-writing with no lag, cuts over while the writers write, and lets the driver finish.
async fn migrate(
    engine: &Arc<Engine>,
    tenant: Uuid,
    target: &str,
    progress: Arc<dyn Fn(&Report) + Send + Sync>,
    t0: Instant,
) -> Result<Migrated, DemoError> {
    let note = AuditNote::new("demo").with_reason("switchyard-control demo");
    let record = engine
        .start(
            &StartRequest {
                tenant_id: tenant,
                target_store_id: target.to_owned(),
                batch_size: Some(2000),
                max_rate: None,
                reset_target: false,
                cutover: CutoverMode::Manual,
                drive: true,
            },
            &note,
        )
        .await
        .map_err(|e| DemoError::Failed(format!("starting the migration: {e}")))?;
    let id = record.id;
    let copy_started = Instant::now();
    // (when the last bulk-copy batch was reported, events copied then)
    let copy_end: Arc<Mutex<Option<(Instant, i64)>>> = Arc::new(Mutex::new(None));
    let (caught_up_tx, mut caught_up) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let driver = {
        let engine = Arc::clone(engine);
        let copy_end = Arc::clone(&copy_end);
        tokio::spawn(async move {
            let report = move |r: &Report| {
                progress(r);
                if r.record.state == MigrationState::BulkCopy {
                    if let Ok(mut end) = copy_end.lock() {
                        *end = Some((Instant::now(), r.record.events_copied));
                    }
                }
                if r.record.state == MigrationState::DualWrite && r.lag == Some(0) {
                    let _ = caught_up_tx.send(true);
                }
            };
            engine.drive(id, &stop_rx, &report).await
        })
    };
    // Dual-write reached: with writers writing, the tail always has a little to copy, so
    // "caught up" is the state (the cutover samples the lag itself and refuses if it is over
    // cutover_max_lag_events), or a reported lag of 0, whichever comes first.
    let dual_write = async {
        loop {
            tokio::select! {
                _ = caught_up.wait_for(|c| *c) => return true,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            match engine.control.migration(id).await {
                Ok(r) if r.state == MigrationState::DualWrite => return true,
                Ok(r) if r.state.is_terminal() => return false,
                _ => {}
            }
        }
    };
    let waited = tokio::time::timeout(Duration::from_secs(120), dual_write).await;
    if waited != Ok(true) {
        let _ = stop_tx.send(true);
        let driven = driver.await;
        let state = engine
            .control
            .migration(id)
            .await
            .map(|r| r.state.to_string());
        return Err(DemoError::Failed(format!(
            "migration {id} did not catch up (state {state:?}, driver {driven:?})"
        )));
    }
    let (copy_secs, copied_in_bulk) = copy_end
        .lock()
        .ok()
        .and_then(|end| *end)
        .map_or((copy_started.elapsed().as_secs_f64(), 0), |(at, n)| {
            (at.duration_since(copy_started).as_secs_f64(), n)
        });

    // The cutover, while the writers write; retried (as the runbook says) if it rolls back.
    let budget = engine.settings.cutover_timeout;
    let mut attempts = 0;
    let (outcome, window) = loop {
        attempts += 1;
        let from = t0.elapsed();
        let outcome = engine.cutover(id, false, budget, &note).await;
        let to = t0.elapsed();
        match outcome {
            Ok(outcome) if outcome.success => break (outcome, (from, to)),
            Ok(outcome) if attempts < 3 => {
                eprintln!(
                    "cutover rolled back ({}); retrying",
                    outcome.error.as_deref().unwrap_or("?")
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(outcome) => break (outcome, (from, to)),
            Err(e) if attempts < 5 && e.is_refusal() => {
                eprintln!("cutover refused ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                let _ = stop_tx.send(true);
                let _ = driver.await;
                return Err(DemoError::Failed(format!("cutover: {e}")));
            }
        }
    };
    // The driver sees the migration migrated and returns; stop it in any case.
    let _ = stop_tx.send(true);
    match driver.await {
        Ok(Ok(Driven::Settled(_) | Driven::Stopped | Driven::ClaimLost)) => {}
        Ok(Err(e)) => return Err(DemoError::Failed(format!("driving the migration: {e}"))),
        Err(e) => return Err(DemoError::Failed(format!("driver: {e}"))),
    }
    let record = engine
        .control
        .migration(id)
        .await
        .map_err(|e| DemoError::Failed(e.to_string()))?;
    Ok(Migrated {
        id,
        // Bulk copy, tail passes and the cutover's final delta (the engine's counter; the
        // record counts the bulk copy only, which a horizon held back by another transaction
        // in the cluster can leave short of the seed).
        events_copied: i64::try_from(engine.metrics.copy_events.get())
            .unwrap_or(i64::MAX)
            .max(record.events_copied),
        bulk_copied: copied_in_bulk,
        copy_seconds: copy_secs,
        outcome,
        attempts,
        window,
    })
}

/// The tenant's events in a store, in global order.
async fn read_all(store: &EventStore, tenant: Uuid) -> Result<Vec<StoredEvent>, DemoError> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .read_tenant(tenant, after, 10_000)
            .await
            .map_err(|e| DemoError::Failed(format!("reading store {}: {e}", store.id())))?;
        let Some(last) = page.last() else { break };
        after = last.global_position;
        out.extend(page);
    }
    Ok(out)
}

/// `verify --level hash` after the cutover: the source is frozen by its moved fence, so every
/// source event is compared (the same code as `switchyard-control verify`).
async fn verify(
    source: &EventStore,
    target: &EventStore,
    tenant: Uuid,
) -> Result<Verification, DemoError> {
    let report = crate::verify::verify(
        source,
        target,
        tenant,
        &crate::verify::Scope::Final,
        crate::verify::Level::Hash,
        None,
    )
    .await
    .map_err(|e| DemoError::Failed(format!("verification: {e}")))?;
    Ok(Verification {
        consistent: report.consistent,
        source_events: usize::try_from(report.source_event_count).unwrap_or(0),
        streams: report.streams_verified,
        streams_consistent: report.streams_consistent,
        violations: report
            .violations
            .iter()
            .take(10)
            .map(|v| {
                format!(
                    "{}: {:?} at version {:?}: {}",
                    v.stream, v.kind, v.first_version, v.detail
                )
            })
            .collect(),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    options: &Options,
    label: &str,
    tenant: Uuid,
    source_id: &str,
    target_id: &str,
    seeded: Vec<Uuid>,
    migrated: Migrated,
    writers: Vec<WriterResult>,
    verification: Verification,
    target_events: &[StoredEvent],
    backend: &'static str,
    started: Instant,
) -> Summary {
    let acked: Vec<&Acked> = writers.iter().flat_map(|w| w.acked.iter()).collect();
    let retried = writers.iter().map(|w| w.retried).sum();
    let (from, to) = migrated.window;
    let mut during: Vec<f64> = acked
        .iter()
        .filter(|a| a.started < to && a.started + a.latency > from)
        .map(|a| millis(a.latency))
        .collect();
    during.sort_by(f64::total_cmp);
    let mut all: Vec<f64> = acked.iter().map(|a| millis(a.latency)).collect();
    all.sort_by(f64::total_cmp);

    // Every seeded and acknowledged event exactly once in the target, where it was acked.
    let mut counts: HashMap<Uuid, (usize, &StoredEvent)> = HashMap::new();
    for e in target_events {
        counts.entry(e.event_id).or_insert((0, e)).0 += 1;
    }
    let mut lost = seeded.iter().filter(|id| !counts.contains_key(id)).count();
    for a in &acked {
        let landed = counts
            .get(&a.event_id)
            .is_some_and(|(_, e)| e.aggregate_id == a.stream && i64::from(e.version) == a.version);
        if !landed {
            lost += 1;
        }
    }
    let mut duplicated = counts.values().filter(|(n, _)| *n > 1).count();
    // A retry that had been written under another id would show as a second (writer, seq).
    let mut logical = HashSet::new();
    for e in target_events.iter().filter(|e| e.event_type == "Deposited") {
        let p: serde_json::Value = serde_json::from_str(e.payload.get()).unwrap_or_default();
        if !logical.insert((p["writer"].as_u64(), p["seq"].as_u64())) {
            duplicated += 1;
        }
    }
    let expected = seeded.len() + acked.len();
    let cutover_ok = migrated.outcome.success;
    #[allow(clippy::cast_precision_loss)]
    let rate = if migrated.copy_seconds > 0.0 {
        (migrated.bulk_copied as f64 / migrated.copy_seconds).round()
    } else {
        0.0
    };
    Summary {
        ok: cutover_ok && verification.consistent && lost == 0 && duplicated == 0,
        backend,
        data: label.to_owned(),
        kept: options.keep,
        tenant_id: tenant,
        migration_id: migrated.id,
        source_store: source_id.to_owned(),
        target_store: target_id.to_owned(),
        seeded_events: options.events,
        writers: options.writers,
        events_copied: migrated.events_copied,
        bulk_copied: migrated.bulk_copied,
        copy_seconds: (migrated.copy_seconds * 1000.0).round() / 1000.0,
        copy_rate_events_per_second: rate,
        lag_at_cutover: migrated.outcome.lag_before,
        cutover_attempts: migrated.attempts,
        cutover: migrated.outcome,
        writer_pause_longest_ms: during.last().copied().unwrap_or(0.0),
        writer_pause_p99_ms: percentile(&during, 99.0),
        appends_during_cutover: during.len(),
        append_latency_p99_ms: percentile(&all, 99.0),
        appends_acknowledged: acked.len(),
        appends_retried: retried,
        appends_on_target: acked.iter().filter(|a| a.store_id == target_id).count(),
        verification,
        expected_events: expected,
        target_events: target_events.len(),
        lost,
        duplicated,
        total_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    }
}

/// The summary as text.
pub fn text(s: &Summary) -> String {
    let v = &s.verification;
    let c = &s.cutover;
    format!(
        "Switchyard demo on {backend} ({data}{kept})\n\
         tenant {tenant}: {seeded} events seeded in store {source}; {writers} writers appending through the in-process proxy\n\
         copy: {copied} events copied to {target} (bulk copy {bulk} events in {secs:.2} s, {rate:.0} events/s; then the tail)\n\
         cutover: {result} after {attempts} attempt(s); lag at cutover {lag}; write pause {pause} ms (whole cutover {dur} ms); final delta {delta} events; writers held by the fence {held}\n\
         writers: {appends} appends acknowledged ({on_target} on {target} after the cutover, {retried} retried); during the cutover {during} appends, longest {longest} ms, p99 {p99} ms; p99 of all appends {p99all} ms\n\
         verification: {consistent} ({streams_ok}/{streams} streams, {source_events} source events){violations}\n\
         acknowledged events in the target: {expected} expected, {target_events} present; lost {lost}, duplicated {dup}\n\
         result: {ok} in {total:.1} s",
        backend = s.backend,
        data = s.data,
        kept = if s.kept { ", kept" } else { ", removed" },
        tenant = s.tenant_id,
        seeded = s.seeded_events,
        source = s.source_store,
        writers = s.writers,
        copied = s.events_copied,
        target = s.target_store,
        bulk = s.bulk_copied,
        secs = s.copy_seconds,
        rate = s.copy_rate_events_per_second,
        result = if c.success { "done" } else { "ROLLED BACK" },
        attempts = s.cutover_attempts,
        lag = s.lag_at_cutover,
        pause = c.pause_ms,
        dur = c.duration_ms,
        delta = c.delta_events,
        held = c.blocked_writers,
        appends = s.appends_acknowledged,
        on_target = s.appends_on_target,
        retried = s.appends_retried,
        during = s.appends_during_cutover,
        longest = s.writer_pause_longest_ms,
        p99 = s.writer_pause_p99_ms,
        p99all = s.append_latency_p99_ms,
        consistent = if v.consistent { "consistent" } else { "INCONSISTENT" },
        streams_ok = v.streams_consistent,
        streams = v.streams,
        source_events = v.source_events,
        violations = if v.violations.is_empty() {
            String::new()
        } else {
            format!("\n  {}", v.violations.join("\n  "))
        },
        expected = s.expected_events,
        target_events = s.target_events,
        lost = s.lost,
        dup = s.duplicated,
        ok = if s.ok { "OK" } else { "FAILED" },
        total = s.total_seconds,
    )
}

/// The folder the embedded demo makes its own folder in.
pub fn embedded_parent() -> &'static Path {
    Path::new(switchyard_config::EMBEDDED_DIR)
}
