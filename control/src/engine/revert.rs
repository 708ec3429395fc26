//! `revert MIGRATION` (issue 19 item 2): a fenced cutover back to the store a migrated
//! migration left, while that migration's reverse replication keeps that store current.
//!
//! The revert of migration M (tenant from A to B) is a migration of its own, R (the tenant from
//! B back to A), recorded with `reverts: M` and M's `reverse` option and driven by the code
//! every migration runs: its copy finds M's events already in A (the reverse mirror and tail
//! put them there, and only what they had not carried yet is inserted), its tail catches up,
//! and the forward cutover ([`Engine::cutover`]) flips the tenant under the same lag gate,
//! budget, fence, automatic rollback and recovery. Until R's cutover commits, A keeps its
//! `copiers` fence (it is R's target) and B stays open (R's source), so nobody but the copiers
//! writes the tenant into A. A revert that fails before its fence moves is rolled back
//! automatically: R is aborted, and its route gives back M's reverse replication (normal on B,
//! A kept current; `MigrationRecord::implied_route`), so M can be reverted again. After R's
//! cutover the roles swap: R's reverse replication keeps B current until `complete R`,
//! `revert R` moves the tenant to B again, and M is finished (`finished_at`, audited as
//! reverted by R).
//!
//! Every step is a recorded state of R, so a crash loses nothing: `revert M` run again
//! continues the R it finds (drives its copy and tail, settles an abandoned cutover, cuts over)
//! and finishes M's record once R is migrated; `serve` drives R and settles an abandoned
//! cutover as for any migration.

use std::time::Duration;

use serde::Serialize;
use switchyard_store::{AuditNote, MigrationRecord, MigrationState, NewMigration, RoutingState};
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    CutoverMode, CutoverOutcome, Driven, Engine, EngineError, MigrationOptions, Report, CLAIM_LEASE,
};
use crate::fault::crash_point;

/// How long a revert lets its migration's copy and tail catch up before the cutover's lag gate
/// decides.
const CATCH_UP: Duration = Duration::from_secs(120);
/// How often a revert looks again at a migration another process drives or recovers.
const RECHECK: Duration = Duration::from_millis(200);

/// What `revert` reports.
#[derive(Debug, Clone, Serialize)]
pub struct RevertOutcome {
    /// The migration reverted (M).
    pub reverts: Uuid,
    /// The revert's own migration (R: the tenant from the store it lives in back to the one M
    /// left).
    pub revert_migration_id: Uuid,
    pub tenant_id: Uuid,
    pub success: bool,
    /// R's state at the end: migrated, or rolled_back after an automatic rollback.
    pub state: MigrationState,
    /// The store the tenant lives in now.
    pub store_id: String,
    /// The store kept current by reverse replication now (until `complete`).
    pub kept_current: Option<String>,
    /// An earlier `revert` had already cut R over; this one only finished M's record.
    pub already_reverted: bool,
    pub error: Option<String>,
    /// R's cutover attempt, when this run made one.
    pub cutover: Option<CutoverOutcome>,
}

impl RevertOutcome {
    fn of(
        reverted: &MigrationRecord,
        revert: &MigrationRecord,
        error: Option<String>,
        cutover: Option<CutoverOutcome>,
    ) -> Self {
        let success = revert.state == MigrationState::Migrated;
        let route = revert.implied_route(revert.state);
        Self {
            reverts: reverted.id,
            revert_migration_id: revert.id,
            tenant_id: revert.tenant_id,
            success,
            state: revert.state,
            store_id: route.store_id,
            kept_current: route.target_store_id,
            already_reverted: false,
            error,
            cutover,
        }
    }
}

impl Engine {
    /// The migration that reverted `record`, or is reverting it now: the newest migration of
    /// its tenant naming it in `reverts` that neither rolled back nor failed.
    pub async fn revert_of(
        &self,
        record: &MigrationRecord,
    ) -> Result<Option<MigrationRecord>, EngineError> {
        self.newest_migration_of(record.tenant_id, |m| {
            m.reverts() == Some(record.id)
                && !matches!(m.state, MigrationState::RolledBack | MigrationState::Failed)
        })
        .await
    }

    /// The newest migration of `tenant` that `matches`.
    pub(super) async fn newest_migration_of(
        &self,
        tenant: Uuid,
        matches: impl Fn(&MigrationRecord) -> bool,
    ) -> Result<Option<MigrationRecord>, EngineError> {
        Ok(self
            .control
            .migrations_of(tenant)
            .await?
            .into_iter()
            .rev()
            .find(|m| matches(m)))
    }

    /// Reverts migration `id` (see the module): starts its revert migration, or continues the
    /// one a crashed or failed-over `revert` left, lets it catch up, and cuts it over within
    /// `budget` (`force` as for `cutover`). A cutover that rolls back, or that the lag gate
    /// refuses, aborts the revert migration: the tenant stays where it lives, the store it left
    /// still kept current, and `id` can be reverted again. Refused (nothing done) when `id`
    /// cannot be reverted.
    pub async fn revert(
        &self,
        id: Uuid,
        force: bool,
        budget: Duration,
        note: &AuditNote,
    ) -> Result<RevertOutcome, EngineError> {
        let reverted = self.control.migration(id).await?;
        let revert = match self.revert_of(&reverted).await? {
            Some(revert) => {
                tracing::info!(migration.id = %id, revert.id = %revert.id, state = %revert.state,
                    "continuing the revert a previous `revert` started");
                revert
            }
            None => match self.begin_revert(&reverted, note).await {
                Ok(revert) => revert,
                // Another `revert` recorded one first (both passed their checks; this one's
                // record was refused: an active migration, or the route it read changed): go
                // on with it as a rerun would; one cutover wins, the other is told someone else
                // changed the migration first.
                Err(e) => {
                    let revert = self.revert_of(&reverted).await?.ok_or(e)?;
                    tracing::info!(migration.id = %id, revert.id = %revert.id,
                        "continuing the revert another `revert` started just now");
                    revert
                }
            },
        };
        if revert.state == MigrationState::Migrated {
            if reverted.finished_at.is_some() {
                return Err(EngineError::Refused(reverted_refusal(&reverted, &revert)));
            }
            // A revert that died after its cutover: only M's record is left to finish.
            self.finish_reverted(&reverted, &revert, note).await?;
            let mut outcome = RevertOutcome::of(&reverted, &revert, None, None);
            outcome.already_reverted = true;
            return Ok(outcome);
        }
        crash_point("revert_after_start");
        let ready = self.catch_up(&revert, force).await?;
        if ready.state == MigrationState::Migrated {
            // Its cutover was recovered forward meanwhile.
            self.finish_reverted(&reverted, &ready, note).await?;
            return Ok(RevertOutcome::of(&reverted, &ready, None, None));
        }
        crash_point("revert_before_cutover");
        crate::fault::pause_point("revert_before_cutover").await;
        match self.cutover(ready.id, force, budget, note).await {
            Ok(outcome) if outcome.success => {
                crash_point("revert_after_cutover");
                let done = self.control.migration(ready.id).await?;
                self.finish_reverted(&reverted, &done, note).await?;
                Ok(RevertOutcome::of(&reverted, &done, None, Some(outcome)))
            }
            Ok(outcome) => {
                let why = outcome.error.clone().unwrap_or_default();
                let left = self.roll_back_revert(&ready, &why, note).await?;
                Ok(RevertOutcome::of(
                    &reverted,
                    &left,
                    Some(why),
                    Some(outcome),
                ))
            }
            // Refused before anything was paused (the lag gate, a divergence, sessions older
            // than the fence) or failed before the gates closed: still dual_write, rolled back.
            // Anything else (the fence moved but routing could not be finished, an outcome
            // unknown) is settled by recovery, from the fence: `serve` or `revert` again.
            Err(e) => {
                let now = self.control.migration(ready.id).await?;
                if now.state != MigrationState::DualWrite {
                    return Err(e);
                }
                let why = e.to_string();
                let left = self.roll_back_revert(&now, &why, note).await?;
                Ok(RevertOutcome::of(&reverted, &left, Some(why), None))
            }
        }
    }

    /// Checks that `reverted` can be reverted, then records its revert migration (claimed by
    /// this worker, so no `serve` replica takes it first) and a `revert` audit row on it.
    async fn begin_revert(
        &self,
        reverted: &MigrationRecord,
        note: &AuditNote,
    ) -> Result<MigrationRecord, EngineError> {
        let id = reverted.id;
        let (left, lives) = (&reverted.source_store_id, &reverted.target_store_id);
        let tenant = reverted.tenant_id;
        if reverted.state != MigrationState::Migrated {
            return Err(EngineError::Refused(format!(
                "migration {id} is {}: revert applies only to a migrated migration (the tenant \
                 still lives in {left}; `switchyard-control abort {id}` ends a migration that has \
                 not cut over)",
                reverted.state
            )));
        }
        if let Some(finished) = reverted.finished_at {
            return Err(EngineError::Refused(format!(
                "revert is no longer possible: migration {id} was completed at {} and {left} is no \
                 longer kept current for tenant {tenant}; to move the tenant back, start a new \
                 migration back with `switchyard-control migrate start --tenant {tenant} --to {left} \
                 --reset-target`",
                finished.to_rfc3339()
            )));
        }
        if !reverted.reverse_replication() {
            return Err(EngineError::Refused(format!(
                "revert is not possible: migration {id} ran without reverse replication \
                 (--no-reverse), so {left} was not kept current for tenant {tenant}; to move the \
                 tenant back, start a new migration back with `switchyard-control migrate start \
                 --tenant {tenant} --to {left} --reset-target`"
            )));
        }
        let route = self
            .control
            .route(tenant)
            .await
            .map_err(EngineError::store("control"))?;
        let Some(route) = route.filter(|r| {
            r.migration_state == RoutingState::Normal
                && r.store_id == *lives
                && r.target_store_id.as_deref() == Some(left.as_str())
        }) else {
            return Err(EngineError::Refused(format!(
                "revert is not possible: tenant {tenant}'s route is no longer migration {id}'s \
                 reverse replication (normal on {lives} keeping {left} current): a later \
                 migration or `routing set` changed it (`switchyard-control routing get {tenant}`); \
                 to move the tenant to {left}, start a new migration with --reset-target"
            )));
        };
        self.store(left)?;
        self.store(lives)?;
        if let Some(why) = self.cleanup_in_the_way(tenant, lives, left).await? {
            return Err(EngineError::Refused(why));
        }
        let started = MigrationOptions::of(reverted, &self.settings);
        let options = MigrationOptions {
            batch_size: started.batch_size,
            max_rate: started.max_rate,
            cutover: CutoverMode::Manual,
            reset_target: false,
            reverse: true,
            reverts: Some(id),
        };
        crate::fault::pause_point("revert_before_insert").await;
        let revert = self
            .control
            .create_migration(
                &NewMigration {
                    tenant_id: tenant,
                    source_store_id: lives.clone(),
                    target_store_id: left.clone(),
                    config: serde_json::to_value(&options).unwrap_or_default(),
                    route_epoch: Some(route.epoch),
                    claim: Some((self.worker.clone(), CLAIM_LEASE)),
                },
                &note
                    .clone()
                    .with_details(serde_json::json!({ "reverts": id })),
            )
            .await?;
        self.control
            .append_audit(
                id,
                "revert",
                &note.clone().with_details(serde_json::json!({
                    "revert_migration_id": revert.id,
                    "from": lives,
                    "to": left,
                })),
            )
            .await?;
        Ok(revert)
    }

    /// Drives the revert migration until it is dual-writing with its lag within
    /// `cutover_max_lag_events` (at once when `force`), or [`CATCH_UP`] has passed (the
    /// cutover's lag gate then decides), or it is migrated (a cutover recovered forward).
    /// Another process driving it (`serve`) is left to: its lag is watched instead. A cutover
    /// left by a dead driver is settled by the drive, from the fence.
    async fn catch_up(
        &self,
        revert: &MigrationRecord,
        force: bool,
    ) -> Result<MigrationRecord, EngineError> {
        let max_lag = i64::try_from(self.settings.cutover_max_lag_events).unwrap_or(i64::MAX);
        let until = tokio::time::Instant::now() + CATCH_UP;
        loop {
            let (stop_tx, stop) = watch::channel(false);
            let ready = |r: &Report| {
                if r.record.state == MigrationState::DualWrite
                    && r.lag.is_some_and(|lag| force || lag <= max_lag)
                {
                    let _ = stop_tx.send(true);
                }
            };
            let drive = self.drive(revert.id, &stop, &ready);
            tokio::pin!(drive);
            let driven = tokio::select! {
                driven = &mut drive => driven,
                () = tokio::time::sleep_until(until) => {
                    let _ = stop_tx.send(true);
                    drive.await
                }
            }?;
            let now = self.control.migration(revert.id).await?;
            let late = tokio::time::Instant::now() >= until;
            match now.state {
                MigrationState::Migrated => return Ok(now),
                MigrationState::DualWrite if driven == Driven::Stopped || late || force => {
                    return Ok(now)
                }
                MigrationState::DualWrite => {
                    if self.lag(&now).await? <= max_lag {
                        return Ok(now);
                    }
                }
                MigrationState::Pending | MigrationState::BulkCopy if late => {
                    return Err(EngineError::Refused(format!(
                        "revert migration {} is still {} after {CATCH_UP:?} (its copy is running: \
                         `switchyard-control status {}`); run `revert` again to continue it",
                        now.id, now.state, now.id
                    )))
                }
                MigrationState::Cutover if late => {
                    return Err(EngineError::Refused(format!(
                        "revert migration {} is cutting over (another `revert`, or one whose driver \
                         stopped: `serve` settles it from the fence); run `revert` again to continue",
                        now.id
                    )))
                }
                MigrationState::Pending | MigrationState::BulkCopy | MigrationState::Cutover => {}
                MigrationState::Paused => {
                    return Err(EngineError::Refused(format!(
                        "revert migration {} is paused: `switchyard-control resume {}`, then run \
                         `revert` again (or abort it: the tenant stays where it lives)",
                        now.id, now.id
                    )))
                }
                MigrationState::RolledBack | MigrationState::Failed => {
                    return Err(EngineError::Refused(format!(
                        "revert migration {} was {} meanwhile (an operator's abort or emergency \
                         stop); the tenant stays where it lives, and `revert` can be run again",
                        now.id, now.state
                    )))
                }
            }
            tokio::time::sleep(RECHECK).await;
        }
    }

    /// The automatic rollback of a revert whose cutover did not happen: the revert migration
    /// aborted (routing gives back the reverse replication it interrupted). A migration that
    /// already left the active states (an emergency stop failed it) is left as it is.
    async fn roll_back_revert(
        &self,
        revert: &MigrationRecord,
        why: &str,
        note: &AuditNote,
    ) -> Result<MigrationRecord, EngineError> {
        crash_point("revert_before_rollback");
        let now = self.control.migration(revert.id).await?;
        if !now.is_active() {
            return Ok(now);
        }
        let note = note
            .clone()
            .with_reason(format!("automatic rollback of the revert: {why}"));
        self.abort(revert.id, &note).await
    }

    /// Finishes the reverted migration's record once its revert is migrated: `finished_at`
    /// (the store it left is the tenant's again, no longer kept current by it), audited as
    /// reverted by `revert`.
    pub(super) async fn finish_reverted(
        &self,
        reverted: &MigrationRecord,
        revert: &MigrationRecord,
        note: &AuditNote,
    ) -> Result<(), EngineError> {
        let note = note
            .clone()
            .with_reason(format!("reverted by migration {}", revert.id))
            .with_details(serde_json::json!({ "reverted_by": revert.id }));
        self.control.finish_migration(reverted.id, &note).await?;
        Ok(())
    }
}

/// Why `complete` and `revert` do nothing for a migration `revert` reverted or is reverting.
pub(super) fn reverted_refusal(reverted: &MigrationRecord, revert: &MigrationRecord) -> String {
    let (id, r) = (reverted.id, revert.id);
    if revert.state == MigrationState::Migrated {
        format!(
            "migration {id} was reverted by migration {r}: tenant {} lives in {} again and \
             nothing of {id} is left to complete or revert; `switchyard-control complete {r}` \
             ends {r}'s reverse replication into {}, `switchyard-control revert {r}` moves the \
             tenant to {} again",
            reverted.tenant_id,
            reverted.source_store_id,
            reverted.target_store_id,
            reverted.target_store_id
        )
    } else {
        format!(
            "migration {id} is being reverted by migration {r} ({}): let the revert finish \
             (`switchyard-control revert {id}` continues it) or abort {r}",
            revert.state
        )
    }
}
