//! The demo's migration: started and driven by the engine in-process, cut over (retried as the
//! runbook says) while the writers write.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_store::{AuditNote, MigrationState};
use tokio::sync::watch;
use uuid::Uuid;

use super::DemoError;
use crate::engine::{CutoverMode, CutoverOutcome, Driven, Engine, Report, StartRequest};

/// How long the demo, once dual-writing, waits for a reported lag of 0 before it cuts over on
/// the state alone.
const CAUGHT_UP_PATIENCE: Duration = Duration::from_secs(30);
/// How many times a refused cutover is tried, a second apart.
const REFUSALS_RETRIED: u32 = 20;

/// What the migration did, for the summary.
#[derive(Debug)]
pub(super) struct Migrated {
    pub(super) id: Uuid,
    pub(super) events_copied: i64,
    /// Events the bulk copy had copied when its last batch was reported.
    pub(super) bulk_copied: i64,
    pub(super) copy_seconds: f64,
    pub(super) outcome: CutoverOutcome,
    pub(super) attempts: u32,
    /// The cutover's window since the run's start.
    pub(super) window: (Duration, Duration),
}

/// Starts the migration, drives it (copy, then the tail) in a task until the tenant is
/// dual-writing with no lag, cuts over while the writers write, and lets the driver finish.
pub(super) async fn migrate(
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
                no_reverse: false,
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
    // Caught up: dual-writing with a reported lag of 0, as an operator checks (`status`, `lag`)
    // before a cutover. Right after the bulk copy the tail still has what the writers wrote
    // during it to copy, and a cutover started then spends its time waiting for that. If no
    // report says 0 for a while (a machine too busy for the tail to keep up), the state is
    // enough: the cutover samples the lag itself and refuses if it is over
    // cutover_max_lag_events.
    let dual_write = async {
        let mut dual_since = None;
        loop {
            tokio::select! {
                _ = caught_up.wait_for(|c| *c) => return true,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            match engine.control.migration(id).await {
                Ok(r) if r.state == MigrationState::DualWrite => {
                    let since = *dual_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= CAUGHT_UP_PATIENCE {
                        return true;
                    }
                }
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
            // A refusal (lag over the gate, most often, when the machine is busy and the tail
            // is behind the writers) leaves nobody paused: wait for the tail and try again.
            Err(e) if attempts < REFUSALS_RETRIED && e.is_refusal() => {
                eprintln!("cutover refused ({e}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
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
