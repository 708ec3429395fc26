//! Bulk copy and the catch-up tail: passes over stable-horizon windows of the source, in
//! source position order, in batches, each batch inserted into the target under the
//! target-order rule, mapped in `migration_position_map`, and checkpointed.

use std::time::{Duration, Instant};

use switchyard_store::control::{Action, Progress};
use switchyard_store::{
    AuditNote, Divergence, FenceState, Landing, MigrationRecord, MigrationState, PassWindow,
    StoredEvent,
};
use tokio::sync::watch;
use uuid::Uuid;

use super::{Engine, EngineError, MigrationOptions, Report};

/// How many times in a row a batch may fail to land anything before the migration fails: a
/// row whose predecessor never arrives means the target contradicts the source.
const MAX_STUCK_BATCHES: u32 = 50;
/// How a divergence recorded as a migration's error begins.
const DIVERGENCE: &str = "divergence:";
/// Most events one tail batch reads (the tail's passes are small; this bounds memory).
pub(super) const TAIL_BATCH: u32 = 2000;

/// What one batch achieved.
pub(super) struct Landed {
    /// Rows of the batch, from its start, that are now in the target.
    pub(super) prefix: usize,
    /// Source position of the last of them.
    pub(super) last_position: i64,
    /// Rows of the batch this call inserted (not those already there).
    pub(super) inserted: usize,
    /// The first row of the batch that can never land, and why.
    pub(super) diverged: Option<(StoredEvent, Divergence)>,
}

impl Engine {
    /// pending → bulk_copy: opens the tenant's fence in the source, admits only copiers in the
    /// target's, and routes it `bulk_copy`. The copy horizon is taken when the copy starts.
    pub(super) async fn begin_copy(&self, record: &MigrationRecord) -> Result<(), EngineError> {
        let source = self.store(&record.source_store_id)?;
        let target = self.store(&record.target_store_id)?;
        // A moved source fence means the tenant's writes already left that store: reopening
        // it would let appends land where nothing reads them any more. Only a cutover of
        // this tenant's migration moves it, and that needs this migration dual-writing, so
        // nothing moves it between this check and the open below.
        let fence = source
            .fence(record.tenant_id)
            .await
            .map_err(EngineError::store(source.id()))?;
        if let Some((_, moved_to)) = fence
            .as_ref()
            .filter(|(state, _)| FenceState::refuses_writers(state))
        {
            let why = format!(
                "the fence of tenant {} in source store {} is moved (to {}): the tenant's writes \
                 left that store, so it cannot be the source of a migration; check `routing get {}`",
                record.tenant_id,
                source.id(),
                moved_to.as_deref().unwrap_or("?"),
                record.tenant_id
            );
            // Failed, routing untouched (nothing was started).
            let note = AuditNote::new(format!("worker:{}", self.worker)).with_reason(why.clone());
            self.control
                .transition(
                    record.id,
                    MigrationState::Pending,
                    Action::Fail,
                    &note,
                    None,
                )
                .await?;
            tracing::warn!(migration.id = %record.id, reason = %why, "migration failed before it started");
            return Ok(());
        }
        source
            .open_fence(record.tenant_id, record.revision)
            .await
            .map_err(EngineError::store(source.id()))?;
        // The target is not authoritative until the cutover commits: only the copiers (copy,
        // tail, mirror) may write the tenant there, and anyone else (a direct writer, a proxy
        // cut off from control with an old route) is refused and sent to the source.
        target
            .admit_copiers_only(
                record.tenant_id,
                switchyard_store::fence_token(record.id),
                source.id(),
            )
            .await
            .map_err(EngineError::store(target.id()))?;
        let route = record.implied_route(MigrationState::BulkCopy);
        let note = AuditNote::new(format!("worker:{}", self.worker));
        self.control
            .transition(
                record.id,
                MigrationState::Pending,
                Action::StartCopy,
                &note,
                Some(&route),
            )
            .await?;
        Ok(())
    }

    /// Copies every event of the tenant up to the copy horizon. Returns true when the copy
    /// reached its horizon, false when it stopped early (paused, aborted, stop signal).
    pub(super) async fn bulk_copy(
        &self,
        record: &MigrationRecord,
        stop: &watch::Receiver<bool>,
        report: &(dyn Fn(&Report) + Send + Sync),
    ) -> Result<bool, EngineError> {
        let source = self.store(&record.source_store_id)?;
        let target = self.store(&record.target_store_id)?;
        let options = MigrationOptions::of(record, &self.settings);
        let mut record = record.clone();
        let horizon = match record.copy_horizon {
            Some(h) => h,
            None => {
                let h = source
                    .horizon()
                    .await
                    .map_err(EngineError::store(source.id()))?;
                let total = source
                    .count_window(record.tenant_id, PassWindow::first(h))
                    .await
                    .map_err(EngineError::store(source.id()))?;
                record = self
                    .control
                    .update_progress(
                        record.id,
                        Some(&self.worker),
                        &Progress {
                            events_total: Some(total),
                            events_copied: Some(0),
                            copy_horizon: Some(h),
                            copy_position: Some(0),
                            ..Progress::default()
                        },
                    )
                    .await?;
                h
            }
        };
        let window = PassWindow::first(horizon);
        let mut after = record.copy_position.unwrap_or(0);
        let mut copied = record.events_copied;
        let started = Instant::now();
        let copied_at_start = copied;
        let mut stuck = 0;
        // The next batch is read while this one lands (one round trip of the pair saved).
        let mut prefetched: Option<Vec<StoredEvent>> = None;
        loop {
            if *stop.borrow() {
                return Ok(false);
            }
            let batch_started = Instant::now();
            let batch = match prefetched.take() {
                Some(batch) => batch,
                None => source
                    .read_window(record.tenant_id, window, after, options.batch_size)
                    .await
                    .map_err(EngineError::store(source.id()))?,
            };
            let Some(last) = batch.last() else {
                return Ok(true);
            };
            let (landed, next) = tokio::join!(
                self.land(Some(record.id), target, &batch),
                source.read_window(
                    record.tenant_id,
                    window,
                    last.global_position,
                    options.batch_size
                )
            );
            let landed = landed?;
            if landed.prefix == batch.len() {
                prefetched = Some(next.map_err(EngineError::store(source.id()))?);
            }
            if let Some((event, why)) = &landed.diverged {
                return Err(diverged(record.id, event, *why));
            }
            if landed.prefix == 0 {
                stuck += 1;
                self.check_stuck(record.id, stuck, &batch[0])?;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            stuck = 0;
            after = landed.last_position;
            // Progress of the copy's snapshot: rows already there (a copy resumed after a
            // crash) count as done; the metric counts only what this batch inserted.
            copied += landed.prefix as i64;
            self.metrics.copied(landed.inserted);
            record = self
                .control
                .update_progress(
                    record.id,
                    Some(&self.worker),
                    &Progress {
                        events_copied: Some(copied),
                        copy_position: Some(after),
                        ..Progress::default()
                    },
                )
                .await?;
            let rate = landed.prefix as f64 / batch_started.elapsed().as_secs_f64().max(1e-6);
            self.metrics.observe_rate(&record, rate);
            report(&Report {
                record: record.clone(),
                rate,
                lag: None,
            });
            if record.state != MigrationState::BulkCopy {
                return Ok(false);
            }
            throttle(options.max_rate, copied - copied_at_start, started).await;
        }
    }

    /// bulk_copy → dual_write: the tail starts where the copy's horizon ended, and the
    /// tenant's route turns on the mirror.
    pub(super) async fn finish_copy(&self, id: Uuid) -> Result<(), EngineError> {
        let record = self.control.migration(id).await?;
        let Some(horizon) = record.copy_horizon else {
            return Err(EngineError::Refused(format!(
                "migration {id} finished copying without a horizon"
            )));
        };
        self.control
            .update_progress(
                id,
                Some(&self.worker),
                &Progress {
                    tail_horizon: Some(horizon),
                    tail_position: Some(0),
                    ..Progress::default()
                },
            )
            .await?;
        let route = record.implied_route(MigrationState::DualWrite);
        let note = AuditNote::new(format!("worker:{}", self.worker)).with_details(
            serde_json::json!({ "events_copied": record.events_copied, "copy_horizon": horizon }),
        );
        match self
            .control
            .transition(
                id,
                MigrationState::BulkCopy,
                Action::CopyDone,
                &note,
                Some(&route),
            )
            .await
        {
            // Paused or aborted in the meantime: the next loop sees it.
            Err(switchyard_store::MigrationError::StateChanged { .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// One tail pass: everything between the tail's horizon and the source's current one.
    /// Returns how many events it inserted (rows the mirror already landed do not count, so
    /// a pass that only meets those, or a row that cannot land, lets the driver rest and
    /// measure the lag). The tail horizon moves only when the whole pass landed, so a row
    /// that could not land yet is read again by the next pass. A row that can never land
    /// (divergence) is recorded as the migration's error, naming its stream, and counted in
    /// `switchyard_control_migration_divergent_streams`; the tail keeps going for the rest.
    pub(super) async fn tail_pass(
        &self,
        record: &MigrationRecord,
        stop: &watch::Receiver<bool>,
        report: &(dyn Fn(&Report) + Send + Sync),
    ) -> Result<usize, EngineError> {
        let source = self.store(&record.source_store_id)?;
        let target = self.store(&record.target_store_id)?;
        let Some(from) = record.tail_horizon else {
            return Err(EngineError::Refused(format!(
                "migration {} is dual-writing without a tail horizon",
                record.id
            )));
        };
        let to = source
            .horizon()
            .await
            .map_err(EngineError::store(source.id()))?;
        let window = PassWindow {
            from: Some(from),
            to: to.max(from),
        };
        if window.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let mut after = 0;
        let mut copied = 0usize;
        let mut complete = true;
        let mut divergence = None;
        loop {
            if *stop.borrow() {
                return Ok(copied);
            }
            let batch = source
                .read_window(record.tenant_id, window, after, TAIL_BATCH)
                .await
                .map_err(EngineError::store(source.id()))?;
            if batch.is_empty() {
                break;
            }
            let landed = self.land(Some(record.id), target, &batch).await?;
            copied += landed.inserted;
            if let Some((event, why)) = landed.diverged {
                divergence = Some(divergence_message(&event, why));
            }
            if landed.prefix < batch.len() {
                // The rest waits for the next pass (its predecessor is not in the target yet).
                complete = false;
                break;
            }
            after = landed.last_position;
        }
        self.metrics.copied(copied);
        match &divergence {
            Some(message) => {
                self.metrics.observe_divergence(record, 1);
                if record.error_message.as_deref() != Some(message.as_str()) {
                    tracing::warn!(migration.id = %record.id, "{message}");
                    self.control.set_error(record.id, Some(message)).await?;
                }
            }
            // Corrected meanwhile (the target's rows were fixed): the error goes.
            None if complete
                && record
                    .error_message
                    .as_deref()
                    .is_some_and(|m| m.starts_with(DIVERGENCE)) =>
            {
                self.metrics.observe_divergence(record, 0);
                self.control.set_error(record.id, None).await?;
            }
            None => {}
        }
        let record = self
            .control
            .update_progress(
                record.id,
                Some(&self.worker),
                &Progress {
                    tail_horizon: complete.then_some(window.to),
                    tail_position: Some(0),
                    ..Progress::default()
                },
            )
            .await?;
        if copied > 0 {
            let rate = copied as f64 / started.elapsed().as_secs_f64().max(1e-6);
            report(&Report {
                record,
                rate,
                lag: None,
            });
        }
        Ok(copied)
    }

    /// Inserts a batch into the target and maps what landed; reports the landed prefix.
    pub(super) async fn land(
        &self,
        id: Option<Uuid>,
        target: &switchyard_store::EventStore,
        batch: &[StoredEvent],
    ) -> Result<Landed, EngineError> {
        let landings = target
            .copy_in(batch)
            .await
            .map_err(EngineError::store(target.id()))?;
        let map: Vec<(i64, i64, Uuid)> = batch
            .iter()
            .zip(&landings)
            .filter_map(|(e, l)| l.position().map(|p| (e.global_position, p, e.event_id)))
            .collect();
        // The position map translates source positions to target ones: the forward copy's
        // only (reverse replication has none to keep).
        if let (Some(id), false) = (id, map.is_empty()) {
            self.control.insert_position_map(id, &map).await?;
        }
        let prefix = landings
            .iter()
            .take_while(|l| l.position().is_some())
            .count();
        let inserted = landings
            .iter()
            .filter(|l| matches!(l, Landing::Inserted(_)))
            .count();
        let diverged = batch.iter().zip(&landings).find_map(|(e, l)| match l {
            Landing::Diverged(why) => Some((e.clone(), *why)),
            _ => None,
        });
        Ok(Landed {
            prefix,
            last_position: prefix
                .checked_sub(1)
                .map_or(0, |i| batch[i].global_position),
            inserted,
            diverged,
        })
    }

    fn check_stuck(&self, id: Uuid, stuck: u32, first: &StoredEvent) -> Result<(), EngineError> {
        if stuck < MAX_STUCK_BATCHES {
            return Ok(());
        }
        Err(EngineError::Divergence {
            id,
            message: format!(
                "event {} ({}/{} version {}) cannot land in the target: version {} of its stream is missing there, \
                 or the target holds a different event at that version; verify the target or restart with --reset-target",
                first.event_id,
                first.aggregate_type,
                first.aggregate_id,
                first.version,
                first.version - 1
            ),
        })
    }
}

/// The error for an event of migration `id` that can never land in its target.
pub(super) fn diverged(id: Uuid, event: &StoredEvent, why: Divergence) -> EngineError {
    EngineError::Divergence {
        id,
        message: divergence_message(event, why),
    }
}

/// Names an event that can never land in the target, its stream, and why.
pub(super) fn divergence_message(event: &StoredEvent, why: Divergence) -> String {
    format!(
        "{DIVERGENCE} event {} ({}/{} version {}) can never land in the target: {why}; \
             the stream cannot be migrated until the target is corrected (`verify`, or restart \
             with --reset-target if the target's rows are this tenant's)",
        event.event_id, event.aggregate_type, event.aggregate_id, event.version
    )
}

/// Sleeps as long as copying `copied` events since `started` got ahead of `max_rate`.
async fn throttle(max_rate: u64, copied: i64, started: Instant) {
    if max_rate == 0 || copied <= 0 {
        return;
    }
    let due = Duration::from_secs_f64(copied as f64 / max_rate as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        tokio::time::sleep(wait).await;
    }
}
