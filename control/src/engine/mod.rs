//! The migration engine: starts migrations, drives them through bulk copy and the catch-up
//! tail, and applies the operator's pause, resume and abort — every state change a
//! compare-and-set in the control database, written together with the tenant's route.
//!
//! A migration is driven by whoever holds its claim (a foreground `migrate start`, or one of
//! the `serve` replicas); progress is checkpointed after every batch, so a driver that dies
//! loses at most one batch of work and the next claimant continues from the checkpoint.

mod cleanup;
mod copy;
mod cutover;
mod metrics;
mod ops;
mod proxies;
mod reverse;
mod revert;
mod verify;

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_config::Config;
use switchyard_config::ControlConfig;
use switchyard_store::{
    ControlDb, ErrorKind, EventStore, Landing, MigrationError, MigrationRecord, MigrationState,
    StoreError,
};
use tokio::sync::watch;
use uuid::Uuid;

pub use self::cleanup::CleanupDriven;
pub use self::cutover::CutoverOutcome;
pub use self::metrics::EngineMetrics;
pub use self::ops::{StartRequest, Stopped};
pub use self::revert::RevertOutcome;

/// How long a driver's claim lasts without renewal; another worker takes over after it.
pub const CLAIM_LEASE: Duration = Duration::from_secs(5);
/// How often a driver renews its claim, whatever it is doing (a long batch, a throttled copy,
/// a cutover): well inside the lease, so a slow control database call or two do not lose it.
const CLAIM_RENEW_EVERY: Duration = Duration::from_secs(1);
/// The longest wait between two automatic cutover attempts.
const AUTO_CUTOVER_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long the tail rests when a pass found nothing new.
const TAIL_IDLE: Duration = Duration::from_millis(100);
/// How long after its write an event counts as lag if it is not in the target yet.
pub const SETTLE: Duration = Duration::from_millis(250);
/// Most events past the tail horizon a lag measurement checks (beyond that, the lag is at
/// least this).
const LAG_SCAN_LIMIT: u32 = 200_000;
/// Events a lag measurement reads and looks up at a time.
const LAG_PAGE: u32 = 5000;
/// How often the tail recomputes the lag while it has nothing to copy.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// How often it does while passes keep finding rows (a lag check reads every id past the tail
/// horizon, up to [`LAG_SCAN_LIMIT`]: not every second while a backlog is being copied).
const LAG_EVERY_BUSY: Duration = Duration::from_secs(5);

/// How a migration proceeds from dual-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CutoverMode {
    /// The operator runs `cutover`.
    Manual,
    /// The worker cuts over by itself once the lag reaches 0.
    Auto,
}

/// The options a migration was started with, kept in its `config` column.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationOptions {
    pub batch_size: u32,
    /// Events per second; 0 = unlimited.
    pub max_rate: u64,
    pub cutover: CutoverMode,
    pub reset_target: bool,
    /// Reverse replication after the cutover (absent in migrations started before it: off).
    #[serde(default)]
    pub reverse: bool,
    /// The migration this one reverts (`revert MIGRATION`): it moves the tenant back to the
    /// store that migration left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<Uuid>,
}

impl MigrationOptions {
    pub fn of(record: &MigrationRecord, defaults: &ControlConfig) -> Self {
        serde_json::from_value(record.config.clone()).unwrap_or(Self {
            batch_size: defaults.batch_size,
            max_rate: defaults.max_rate,
            cutover: CutoverMode::Manual,
            reset_target: false,
            reverse: false,
            reverts: None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error("store {store}: {source}")]
    Store { store: String, source: StoreError },
    /// The operator asked for something the migration's situation does not allow.
    #[error("{0}")]
    Refused(String),
    /// The target holds data that contradicts the source; copying cannot go on.
    #[error("migration {id}: {message}")]
    Divergence { id: Uuid, message: String },
}

impl EngineError {
    pub fn store(store: &str) -> impl FnOnce(StoreError) -> Self + '_ {
        move |source| Self::Store {
            store: store.to_owned(),
            source,
        }
    }

    /// The class of the failure (see `switchyard_store::ErrorKind`). A refusal of the
    /// operator's request is a conflict with the migration's situation; a divergence is data
    /// that contradicts itself, which no retry or other request fixes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Migration(e) => e.kind(),
            Self::Store { source, .. } => source.kind(),
            Self::Refused(_) => ErrorKind::Conflict,
            Self::Divergence { .. } => ErrorKind::Internal,
        }
    }

    /// Whether the operator's request was refused (as opposed to failing).
    pub fn is_refusal(&self) -> bool {
        self.kind().is_refusal()
    }
}

/// Why [`Engine::drive`] returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Driven {
    /// The migration reached a state this driver does not act in (paused, terminal).
    Settled(MigrationState),
    /// The stop signal arrived; the migration keeps its state and checkpoint.
    Stopped,
    /// Another worker holds the claim.
    ClaimLost,
}

/// What a lag measurement found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LagReport {
    /// Source events of the tenant (settled, past the tail horizon) not in the target.
    pub lag: i64,
    /// Streams with an event that can never land in the target (`type/id`, the first such
    /// version and why): no amount of waiting, and no `--force`, gets them there.
    pub divergent_streams: Vec<String>,
}

/// Progress a driver reports as it goes (for a progress bar, `status --watch`, metrics).
#[derive(Debug, Clone)]
pub struct Report {
    pub record: MigrationRecord,
    /// Events copied per second over the last batch.
    pub rate: f64,
    pub lag: Option<i64>,
}

/// The engine over one config's control database and stores.
#[derive(Debug)]
pub struct Engine {
    pub control: ControlDb,
    stores: HashMap<String, EventStore>,
    pub settings: ControlConfig,
    pub default_store: String,
    /// Who holds claims and writes progress: `host:pid` or a `serve` replica's id.
    pub worker: String,
    pub metrics: EngineMetrics,
    /// Tells live proxies of the cutover's routing changes directly (with `proxy.admin_token`).
    proxy_caller: proxies::ProxyCaller,
    /// Where each tenant's reverse tail stands in the store the tenant lives in, per route epoch
    /// (`reverse.rs`); a process that starts without one makes a first pass over the whole
    /// tenant.
    reverse_horizons: std::sync::Mutex<HashMap<(Uuid, i64), i64>>,
}

impl Engine {
    /// Opens lazily connecting pools on the control database and every store.
    pub fn new(config: &Config, worker: String) -> Result<Self, EngineError> {
        let control =
            ControlDb::connect(&config.control_url, 8).map_err(EngineError::store("control"))?;
        let mut stores = HashMap::new();
        for store in &config.stores {
            let connected =
                EventStore::connect_copier(&store.id, &store.url, store.max_connections.min(8))
                    .map_err(EngineError::store(&store.id))?;
            stores.insert(store.id.clone(), connected);
        }
        Ok(Self {
            control,
            stores,
            settings: config.control.clone(),
            default_store: config.default_store.clone(),
            worker,
            metrics: EngineMetrics::new(),
            proxy_caller: proxies::ProxyCaller::new(&config.proxy.admin_token),
            reverse_horizons: std::sync::Mutex::default(),
        })
    }

    /// Creates embedded (SQLite) schemas, as the embedded default needs no `init`.
    pub async fn prepare_embedded(&self) -> Result<(), EngineError> {
        if self.control.is_embedded() {
            self.control
                .ensure_schema()
                .await
                .map_err(EngineError::store("control"))?;
            // The embedded default has no `init`: the first program to start records it.
            self.control
                .record_default_store(&self.default_store)
                .await
                .map_err(EngineError::store("control"))?;
        }
        for store in self.stores.values().filter(|s| s.is_embedded()) {
            store
                .ensure_schema()
                .await
                .map_err(EngineError::store(store.id()))?;
        }
        Ok(())
    }

    pub fn store(&self, id: &str) -> Result<&EventStore, EngineError> {
        self.stores.get(id).ok_or_else(|| {
            let mut known: Vec<&str> = self.stores.keys().map(String::as_str).collect();
            known.sort_unstable();
            EngineError::Refused(format!(
                "store {id:?} is not configured here (configured: {})",
                known.join(", ")
            ))
        })
    }

    /// The tenant's source events not yet in the target (see [`Self::lag_report`]).
    pub async fn lag(&self, record: &MigrationRecord) -> Result<i64, EngineError> {
        Ok(self.lag_report(record).await?.lag)
    }

    /// The tenant's source events not yet in the target, and the streams whose events can
    /// never land there (the target contradicts them: see [`switchyard_store::Divergence`]).
    ///
    /// Once the copy is done, everything below the tail horizon is in the target, so only the
    /// events past it are checked, by identity (same tenant, stream, version, id and content:
    /// a foreign event with the same id is not "in the target") — and only those written at
    /// least [`SETTLE`] ago: an append the mirror is carrying right now is not lag (with
    /// writers writing, a few always are, and counting them would refuse every cutover under
    /// load). Before that, it is the difference of the two counts (the source counted first),
    /// a progress figure only: nothing is decided by it.
    pub async fn lag_report(&self, record: &MigrationRecord) -> Result<LagReport, EngineError> {
        self.lag_report_until(record, None).await
    }

    /// [`Self::lag_report`], stopping as soon as the lag is past `stop_above`: a cutover only
    /// needs to know whether the lag is within its limit, and a large lag (a tail that stopped,
    /// writers going) must not make it read every event past the horizon, again and again.
    /// The lag reported is then a lower bound.
    pub async fn lag_report_until(
        &self,
        record: &MigrationRecord,
        stop_above: Option<i64>,
    ) -> Result<LagReport, EngineError> {
        let source = self.store(&record.source_store_id)?;
        let target = self.store(&record.target_store_id)?;
        if let (true, Some(horizon)) = (record.copy_done(), record.tail_horizon) {
            let window = switchyard_store::PassWindow {
                from: Some(horizon),
                to: i64::MAX,
            };
            let mut report = LagReport::default();
            let mut divergent = std::collections::BTreeSet::new();
            let mut after = 0;
            let mut scanned = 0;
            while scanned < LAG_SCAN_LIMIT && stop_above.is_none_or(|limit| report.lag <= limit) {
                let page = source
                    .settled_events(record.tenant_id, window, SETTLE, after, LAG_PAGE)
                    .await
                    .map_err(EngineError::store(source.id()))?;
                let Some(last) = page.last() else { break };
                after = last.global_position;
                scanned += u32::try_from(page.len()).unwrap_or(u32::MAX);
                let status = target
                    .landing_status(&page)
                    .await
                    .map_err(EngineError::store(target.id()))?;
                for (e, landing) in page.iter().zip(status) {
                    match landing {
                        Landing::Present(_) | Landing::Inserted(_) => {}
                        Landing::Waiting => report.lag += 1,
                        Landing::Diverged(why) => {
                            report.lag += 1;
                            divergent.insert(format!(
                                "{}/{} (version {}, event {}: {why})",
                                e.aggregate_type, e.aggregate_id, e.version, e.event_id
                            ));
                        }
                    }
                }
            }
            report.divergent_streams = divergent.into_iter().collect();
            self.metrics
                .observe_divergence(record, report.divergent_streams.len());
            return Ok(report);
        }
        let s = source
            .count_tenant(record.tenant_id)
            .await
            .map_err(EngineError::store(source.id()))?;
        let t = target
            .count_tenant(record.tenant_id)
            .await
            .map_err(EngineError::store(target.id()))?;
        Ok(LagReport {
            lag: (s - t).max(0),
            divergent_streams: Vec::new(),
        })
    }

    /// Whether `--cutover auto` may try a cutover now. Every cutover that rolled back is an
    /// attempt (counted from the audit log, so a new driver — another replica, a restart —
    /// counts the same): after `auto_cutover_attempts` of them it stops trying and says so in
    /// the migration's error (shown by `status`); between them it waits
    /// `auto_cutover_backoff_ms`, doubled after each, so a cutover that keeps failing does not
    /// pause the tenant's writers every second.
    async fn auto_cutover_due(&self, record: &MigrationRecord) -> Result<bool, EngineError> {
        let log = self.control.audit_log(record.id).await?;
        let rollbacks: Vec<_> = log
            .iter()
            .filter(|e| e.action == switchyard_store::control::Action::CutoverRollback.as_str())
            .collect();
        let Some(last) = rollbacks.last() else {
            return Ok(true);
        };
        let attempts = u32::try_from(rollbacks.len()).unwrap_or(u32::MAX);
        if attempts >= self.settings.auto_cutover_attempts {
            let why = last
                .reason
                .clone()
                .or_else(|| last.details.as_ref().map(ToString::to_string))
                .unwrap_or_else(|| "see the audit log".to_owned());
            let message = format!(
                "--cutover auto gave up after {attempts} cutover attempts rolled back (the last: {why}); \
                 find the cause (`switchyard-control audit {id}`), then run `switchyard-control cutover {id}`",
                id = record.id
            );
            if record.error_message.as_deref() != Some(message.as_str()) {
                tracing::warn!(migration.id = %record.id, attempts, "automatic cutover gave up");
                self.control.set_error(record.id, Some(&message)).await?;
            }
            return Ok(false);
        }
        let backoff = self
            .settings
            .auto_cutover_backoff
            .saturating_mul(1 << (attempts - 1).min(16))
            .min(AUTO_CUTOVER_MAX_BACKOFF);
        let since = (chrono::Utc::now() - last.at).to_std().unwrap_or_default();
        Ok(since >= backoff)
    }

    /// The store of tenants without a routing row: the one recorded in the control database,
    /// or this config's while none is recorded (a control database `init` has not upgraded).
    pub async fn recorded_default_store(&self) -> Result<String, EngineError> {
        Ok(self
            .control
            .default_store()
            .await
            .map_err(EngineError::store("control"))?
            .unwrap_or_else(|| self.default_store.clone()))
    }

    /// Refuses to work with a config whose `default_store` is not the one recorded in the
    /// control database: its row-less tenants would be read and migrated from the wrong store.
    pub async fn check_default_store(&self) -> Result<(), EngineError> {
        let recorded = self.recorded_default_store().await?;
        if recorded == self.default_store {
            return Ok(());
        }
        Err(EngineError::Refused(default_store_mismatch(
            &self.default_store,
            &recorded,
        )))
    }

    /// Drives migration `id` until it settles (paused or terminal), `stop` flips, or the claim
    /// is lost; `report` hears of every batch and tail pass.
    ///
    /// The claim is renewed every [`CLAIM_RENEW_EVERY`] beside the work, for as long as the
    /// driver runs (a copy or a pass outlasts the lease); a renewal that finds the claim gone
    /// stops the driver at its next batch boundary, and its progress writes are refused from
    /// the moment the lease ran out.
    pub async fn drive(
        &self,
        id: Uuid,
        stop: &watch::Receiver<bool>,
        report: &(dyn Fn(&Report) + Send + Sync),
    ) -> Result<Driven, EngineError> {
        if !self.control.claim(id, &self.worker, CLAIM_LEASE).await? {
            return Ok(Driven::ClaimLost);
        }
        // The driver's stop: the caller's, or a lost claim.
        let (halt_tx, halt_rx) = watch::channel(*stop.borrow());
        let finished = tokio::sync::Notify::new();
        let work = async {
            let result = self.drive_claimed(id, &halt_rx, report).await;
            finished.notify_one();
            result
        };
        let (result, lost) = tokio::join!(work, self.keep_claim(id, stop, &halt_tx, &finished));
        // Hand the migration back at once rather than after the lease runs out.
        if !lost {
            let _ = self.control.release(id, &self.worker).await;
        }
        if let Ok(record) = self.control.migration(id).await {
            self.metrics.forget(&record);
        }
        match result {
            Err(EngineError::Migration(MigrationError::ClaimLost { .. })) => Ok(Driven::ClaimLost),
            Ok(Driven::Stopped) if lost => Ok(Driven::ClaimLost),
            other => other,
        }
    }

    /// Renews the claim on `id` until `finished`; passes `stop` on to `halt`, and flips
    /// `halt` itself when a renewal finds the claim taken. Returns whether it was lost.
    async fn keep_claim(
        &self,
        id: Uuid,
        stop: &watch::Receiver<bool>,
        halt: &watch::Sender<bool>,
        finished: &tokio::sync::Notify,
    ) -> bool {
        let mut stop = stop.clone();
        let mut stop_open = true;
        let mut renew = tokio::time::interval(CLAIM_RENEW_EVERY);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        loop {
            tokio::select! {
                () = finished.notified() => return false,
                changed = stop.changed(), if stop_open => match changed {
                    Ok(()) => {
                        if *stop.borrow() {
                            let _ = halt.send(true);
                        }
                    }
                    Err(_) => stop_open = false,
                },
                _ = renew.tick() => match self.control.claim(id, &self.worker, CLAIM_LEASE).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(migration.id = %id, worker = %self.worker,
                            "the claim was taken by another worker; stopping at the next batch boundary");
                        let _ = halt.send(true);
                        // Still wait for the driver: it is finishing its batch.
                        finished.notified().await;
                        return true;
                    }
                    // The lease may still hold; the next tick tries again. Once it ran out,
                    // progress writes are refused and the driver stops by itself.
                    Err(e) => tracing::warn!(migration.id = %id, error = %e, "cannot renew the claim"),
                },
            }
        }
    }

    async fn drive_claimed(
        &self,
        id: Uuid,
        stop: &watch::Receiver<bool>,
        report: &(dyn Fn(&Report) + Send + Sync),
    ) -> Result<Driven, EngineError> {
        let mut last_lag_at: Option<std::time::Instant> = None;
        loop {
            if *stop.borrow() {
                return Ok(Driven::Stopped);
            }
            let record = self.control.migration(id).await?;
            if record.state.is_terminal() {
                return Ok(Driven::Settled(record.state));
            }
            if !self.control.claim(id, &self.worker, CLAIM_LEASE).await? {
                return Ok(Driven::ClaimLost);
            }
            match record.state {
                MigrationState::Pending => {
                    self.begin_copy(&record).await?;
                }
                MigrationState::BulkCopy => {
                    if self.bulk_copy(&record, stop, report).await? {
                        self.finish_copy(id).await?;
                    }
                }
                MigrationState::DualWrite => {
                    let copied = self.tail_pass(&record, stop, report).await?;
                    // On a timer, not only when a pass found nothing: under steady writes
                    // every pass copies something, and the lag must still be known (for
                    // `--cutover auto`, `status`, the metric).
                    let every = if copied == 0 {
                        LAG_EVERY
                    } else {
                        LAG_EVERY_BUSY
                    };
                    if last_lag_at.is_none_or(|at| at.elapsed() >= every) {
                        let lag = self.lag(&record).await?;
                        last_lag_at = Some(std::time::Instant::now());
                        self.metrics.observe_lag(&record, lag);
                        report(&Report {
                            record: record.clone(),
                            rate: 0.0,
                            lag: Some(lag),
                        });
                        if lag == 0
                            && MigrationOptions::of(&record, &self.settings).cutover
                                == CutoverMode::Auto
                            && self.auto_cutover_due(&record).await?
                        {
                            let note =
                                switchyard_store::AuditNote::new(format!("worker:{}", self.worker))
                                    .with_reason("--cutover auto: lag reached 0");
                            let budget = self.settings.cutover_timeout;
                            let outcome = self.cutover(id, false, budget, &note).await?;
                            tracing::info!(migration.id = %id, success = outcome.success, pause_ms = outcome.pause_ms,
                                error = outcome.error.as_deref().unwrap_or(""), "automatic cutover");
                            continue;
                        }
                    }
                    if copied == 0 {
                        let mut stop = stop.clone();
                        tokio::select! {
                            () = tokio::time::sleep(TAIL_IDLE) => {}
                            _ = stop.changed() => {}
                        }
                    }
                }
                MigrationState::Cutover => {
                    // A cutover in progress belongs to whoever runs it; one whose driver died
                    // is finished or rolled back from what the fence says.
                    match self.recover_cutover(&record).await? {
                        Some(_) => continue,
                        None => return Ok(Driven::Settled(MigrationState::Cutover)),
                    }
                }
                state @ (MigrationState::Paused
                | MigrationState::Migrated
                | MigrationState::Failed
                | MigrationState::RolledBack) => return Ok(Driven::Settled(state)),
            }
        }
    }
}

pub use switchyard_config::default_store_mismatch;

/// The OS user, for the audit log of operator actions: `$USER`, `$LOGNAME`, or the name of
/// this process's uid in /etc/passwd.
pub fn os_user() -> String {
    if let Ok(user) = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        return user;
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        });
    let name = uid.and_then(|uid| {
        std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|passwd| {
                passwd.lines().find_map(|line| {
                    let fields: Vec<&str> = line.split(':').collect();
                    (fields.get(2) == Some(&uid.as_str())).then(|| fields[0].to_owned())
                })
            })
    });
    name.unwrap_or_else(|| "unknown".to_owned())
}

/// This process's worker id: `host:pid`.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    //! The engine's refusal rule: what the CLI reports as "refused" (exit 1, nothing done, the
    //! operator's request did not fit) against what failed.

    use super::*;

    #[test]
    fn operator_refusals_are_told_apart_from_failures() {
        let id = Uuid::new_v4();
        let refusals = [
            EngineError::Refused("no".to_owned()),
            EngineError::Migration(MigrationError::NotFound(id)),
            EngineError::Migration(MigrationError::SameStore("shared".to_owned())),
            EngineError::Migration(MigrationError::AlreadyActive {
                tenant_id: id,
                existing_id: id,
                state: MigrationState::DualWrite,
            }),
            EngineError::Migration(MigrationError::StateChanged {
                id,
                expected: MigrationState::DualWrite,
                actual: MigrationState::Paused,
            }),
            // A worker that lost its claim was overtaken by another (store/src/error.rs:
            // a conflict, which operators see as a refusal, not as a failure of the store).
            EngineError::Migration(MigrationError::ClaimLost {
                id,
                worker: "w".to_owned(),
                holder: None,
            }),
        ];
        for refusal in &refusals {
            assert!(refusal.is_refusal(), "{refusal}");
        }
        let failures = [
            EngineError::Divergence {
                id,
                message: "cannot land".to_owned(),
            },
            EngineError::store("shared")(StoreError::unavailable("connection reset")),
        ];
        for failure in &failures {
            assert!(!failure.is_refusal(), "{failure}");
        }
    }
}
