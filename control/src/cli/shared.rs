//! Pieces several subcommands share: turning engine errors into exit codes, the operator's
//! audit note, and the status view of a migration.

use chrono::{DateTime, Utc};
use serde::Serialize;
use switchyard_store::{AuditNote, CleanupRecord, CleanupRole, CleanupState};
use switchyard_store::{MigrationRecord, MigrationState};
use uuid::Uuid;

use super::CliError;
use crate::engine::{os_user, CleanupDriven, Engine, EngineError};

impl From<EngineError> for CliError {
    fn from(e: EngineError) -> Self {
        if e.is_refusal() {
            CliError::Refused(e.to_string())
        } else {
            CliError::Failed(e.to_string())
        }
    }
}

impl From<switchyard_store::MigrationError> for CliError {
    fn from(e: switchyard_store::MigrationError) -> Self {
        EngineError::from(e).into()
    }
}

/// The audit note of an operator command: the OS user and the given reason.
pub(super) fn operator_note(reason: Option<&str>) -> AuditNote {
    let note = AuditNote::new(os_user());
    match reason {
        Some(reason) => note.with_reason(reason),
        None => note,
    }
}

/// Everything `status` shows of a migration (DESIGN.md's `status` keys, plus rate and ETA).
#[derive(Debug, Serialize)]
pub(super) struct Status {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub state: MigrationState,
    pub paused_from: Option<MigrationState>,
    pub source_store_id: String,
    pub target_store_id: String,
    pub events_total: i64,
    pub events_copied: i64,
    pub progress_percentage: f64,
    pub lag: Option<i64>,
    /// Streams whose events can never land in the target (divergence; see `lag`).
    pub divergent_streams: Vec<String>,
    /// Average bulk-copy rate since the copy started, events per second.
    pub rate_events_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
    pub error_message: Option<String>,
    /// Reverse replication keeps the store the tenant left (`source_store_id`) current: the
    /// migration cut over with it and the tenant's route still names that store as target.
    pub reverse_replication: bool,
    /// Under reverse replication: the tenant's events in the store it lives in beyond those in
    /// the store it left (counts; `switchyard_control_reverse_lag_events`).
    pub reverse_lag: Option<i64>,
    /// Under reverse replication with a reverse lag of 0: the store the tenant left holds
    /// everything, so moving the tenant back loses nothing.
    pub undo_possible: bool,
    pub claimed_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// When `complete` ended the undo window (the store the tenant left is no longer kept
    /// current); `None` until then.
    pub finished_at: Option<DateTime<Utc>>,
    /// The deletion of the tenant's rows from the store it no longer uses, once started.
    pub cleanup: Option<CleanupStatus>,
    /// This migration is the revert of that migrated one (`revert`): it moves the tenant back.
    pub reverts: Option<Uuid>,
    /// The migration that reverted this one (migrated) or is reverting it now (active).
    pub reverted_by: Option<Uuid>,
    /// That revert's state.
    pub reverted_by_state: Option<MigrationState>,
}

/// What `status` shows of a cleanup.
#[derive(Debug, Serialize)]
pub(super) struct CleanupStatus {
    pub store_id: String,
    pub role: CleanupRole,
    pub state: CleanupState,
    pub rows_total: i64,
    pub rows_deleted: i64,
    pub rows_left: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<CleanupRecord> for CleanupStatus {
    fn from(c: CleanupRecord) -> Self {
        Self {
            rows_left: c.rows_left(),
            store_id: c.store_id,
            role: c.role,
            state: c.state,
            rows_total: c.rows_total,
            rows_deleted: c.rows_deleted,
            started_at: c.started_at,
            finished_at: c.finished_at,
        }
    }
}

impl Status {
    /// Builds the view; `lag` costs a count in each store, so it is taken only while the
    /// migration is active (the stores may be unreachable: then it is left out).
    pub(super) async fn of(engine: &Engine, record: MigrationRecord) -> Self {
        let report = if record.is_active() {
            engine.lag_report(&record).await.ok()
        } else {
            None
        };
        let lag = report.as_ref().map(|r| r.lag);
        let reverse = reverse_route(engine, &record).await;
        let reverse_lag = match &reverse {
            Some(route) => engine.reverse_lag(route).await.ok(),
            None => None,
        };
        let divergent_streams = report.map(|r| r.divergent_streams).unwrap_or_default();
        let reverted_by = if record.state == MigrationState::Migrated {
            engine.revert_of(&record).await.ok().flatten()
        } else {
            None
        };
        // Only an ended migration can have one; a control database that cannot say leaves it out.
        let cleanup = if record.is_active() {
            None
        } else {
            engine.control.cleanup(record.id).await.ok().flatten()
        };
        #[allow(clippy::cast_precision_loss)] // counts stay far below 2^52
        let rate = record.started_at.and_then(|started| {
            let end = record.completed_at.unwrap_or(record.updated_at);
            let secs = (end - started).num_milliseconds() as f64 / 1000.0;
            (secs > 0.0 && record.events_copied > 0).then(|| record.events_copied as f64 / secs)
        });
        #[allow(clippy::cast_precision_loss)]
        let eta = match (record.state, rate) {
            (MigrationState::BulkCopy, Some(rate)) if rate > 0.0 => {
                Some((record.events_total - record.events_copied).max(0) as f64 / rate)
            }
            _ => None,
        };
        Self {
            id: record.id,
            tenant_id: record.tenant_id,
            state: record.state,
            paused_from: record.paused_from,
            source_store_id: record.source_store_id.clone(),
            target_store_id: record.target_store_id.clone(),
            events_total: record.events_total,
            events_copied: record.events_copied,
            progress_percentage: (record.progress_percentage() * 10.0).round() / 10.0,
            lag,
            divergent_streams,
            rate_events_per_second: rate.map(|r| r.round()),
            eta_seconds: eta.map(|e| e.round()),
            error_message: record.error_message.clone(),
            reverse_replication: reverse.is_some(),
            reverse_lag,
            undo_possible: reverse_lag == Some(0),
            claimed_by: record.claimed_by.clone(),
            created_at: record.created_at,
            started_at: record.started_at,
            completed_at: record.completed_at,
            updated_at: record.updated_at,
            finished_at: record.finished_at,
            cleanup: cleanup.map(CleanupStatus::from),
            reverts: record.reverts(),
            reverted_by_state: reverted_by.as_ref().map(|r| r.state),
            reverted_by: reverted_by.map(|r| r.id),
        }
    }

    /// The runbook's "check migration status" layout.
    pub(super) fn text(&self) -> String {
        let opt =
            |t: Option<DateTime<Utc>>| t.map_or_else(|| "None".to_owned(), |t| t.to_rfc3339());
        let mut out = format!(
            "Migration ID: {}\nTenant ID: {}\nState: {}{}\nSource Store: {}\nTarget Store: {}\n",
            self.id,
            self.tenant_id,
            self.state,
            self.paused_from
                .map_or_else(String::new, |p| format!(" (paused from {p})")),
            self.source_store_id,
            self.target_store_id
        );
        out.push_str(&format!(
            "Progress: {:.1}%\nEvents Copied: {}/{}\n",
            self.progress_percentage, self.events_copied, self.events_total
        ));
        if let Some(lag) = self.lag {
            out.push_str(&format!("Lag: {lag} events\n"));
        }
        if self.reverse_replication {
            out.push_str(&format!(
                "Reverse replication: on (to {}), reverse lag: {}, undo possible: {}\n",
                self.source_store_id,
                self.reverse_lag
                    .map_or_else(|| "unknown".to_owned(), |l| format!("{l} events")),
                if self.undo_possible { "yes" } else { "no" }
            ));
        }
        if !self.divergent_streams.is_empty() {
            out.push_str(&format!(
                "Divergent streams (can never land in the target): {}\n",
                self.divergent_streams.join(", ")
            ));
        }
        if let Some(rate) = self.rate_events_per_second {
            out.push_str(&format!("Rate: {rate:.0} events/s\n"));
        }
        if let Some(eta) = self.eta_seconds {
            out.push_str(&format!("ETA: {eta:.0} s\n"));
        }
        if let Some(error) = &self.error_message {
            out.push_str(&format!("Error: {error}\n"));
        }
        out.push_str(&format!(
            "Created: {}\nStarted: {}\nCompleted: {}\n",
            self.created_at.to_rfc3339(),
            opt(self.started_at),
            opt(self.completed_at)
        ));
        if let Some(reverts) = self.reverts {
            out.push_str(&format!(
                "Reverts: migration {reverts} (moves the tenant back to {})\n",
                self.target_store_id
            ));
        }
        if let (Some(by), Some(state)) = (self.reverted_by, self.reverted_by_state) {
            out.push_str(&if state == MigrationState::Migrated {
                format!(
                    "Reverted by: migration {by} (the tenant lives in {} again)\n",
                    self.source_store_id
                )
            } else {
                format!("Being reverted by: migration {by} ({state})\n")
            });
        }
        if let Some(finished) = self.finished_at {
            let reverted = self.reverted_by_state == Some(MigrationState::Migrated);
            out.push_str(&format!(
                "Finished: {} ({})\n",
                finished.to_rfc3339(),
                if reverted {
                    "reverted"
                } else {
                    "the undo window is closed"
                }
            ));
        }
        if let Some(c) = &self.cleanup {
            out.push_str(&format!(
                "Cleanup of {} ({}): {}, {}/{} rows deleted, {} left\n",
                c.store_id,
                c.role,
                match c.state {
                    CleanupState::Running => "running",
                    CleanupState::Done => "done",
                },
                c.rows_deleted,
                c.rows_total,
                c.rows_left
            ));
        }
        out
    }
}

/// The tenant's route when `record` cut over with reverse replication that still runs: normal
/// on its target, with its source as the route's target.
pub(super) async fn reverse_route(
    engine: &Engine,
    record: &MigrationRecord,
) -> Option<switchyard_store::RouteRecord> {
    // A completed migration (`complete`: `finished_at`) keeps the store it left current no more.
    if record.state != MigrationState::Migrated
        || !record.reverse_replication()
        || record.finished_at.is_some()
    {
        return None;
    }
    let route = engine.control.route(record.tenant_id).await.ok()??;
    (route.migration_state == switchyard_store::RoutingState::Normal
        && route.store_id == record.target_store_id
        && route.target_store_id.as_deref() == Some(record.source_store_id.as_str()))
    .then_some(route)
}

/// How long a foreground cleanup waits before trying again to take over a cleanup another
/// process holds (it finishes it, or takes over once that one's claim runs out).
const CLEANUP_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs migration `id`'s started cleanup in the foreground to its end (Ctrl-C stops it; the
/// next `cleanup` or `serve` continues). While another process holds it, waits for that one.
pub(super) async fn drive_cleanup(
    engine: &Engine,
    id: Uuid,
    note: &AuditNote,
) -> Result<CleanupRecord, CliError> {
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let ctrl_c = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = stop_tx.send(true);
        }
    });
    let outcome = loop {
        match engine.run_cleanup(id, &stop, note).await {
            Ok(CleanupDriven::Done(record)) => break Ok(record),
            Ok(CleanupDriven::Stopped) => {
                break Err(CliError::Failed(format!(
                    "cleanup of migration {id} stopped; `switchyard-control cleanup {id}` (or \
                     `serve`) continues it"
                )))
            }
            Ok(CleanupDriven::ClaimLost) => tokio::time::sleep(CLEANUP_RETRY).await,
            Err(e) => break Err(e.into()),
        }
    };
    ctrl_c.abort();
    outcome
}
