//! The cutover (DESIGN.md "Cutover (the fence)"), inside one budget:
//!
//! 1. refuse unless dual_write and the lag is within `cutover_max_lag_events` (unless forced);
//!    compare the streams with versions past the tail horizon below those versions (writers
//!    still write; a difference fails the cutover before anyone is paused);
//!    then one more tail pass (the final delta starts where it ended), and a connection opened
//!    to every live proxy (heartbeat in `proxies`);
//! 2. and 3. at once: routing → `cutover_paused` (proxies close the tenant's gate: each live
//!    proxy is told directly, NOTIFY and the poll are the fallback) and take the tenant's
//!    fence in the source (waits for appends in flight, holds every other, whatever a
//!    proxy's gate says);
//! 4. copy the final delta past that pass's horizon, verify it landed and the rest of the
//!    streams it touched agree (unless forced), mark the fence moved, commit;
//! 5. routing → `normal` on the target, each live proxy told directly (gates open onto the
//!    target): migrated.
//!
//! On timeout or any failure before step 4 commits, the source transaction rolls back (the
//! fence stays open), routing returns to `dual_write` and the migration to dual_write, with
//! the error and the number of held writers reported. After step 4 commits, the fence is the
//! truth: whatever happens, the migration can only finish (`recover` does it after a crash).
//!
//! The budget can cancel everything up to the move, never the move: the deadline is checked
//! before it, and the move and its commit run with their own bound (the fence transaction's
//! statement timeout, the budget plus [`FENCE_MARGIN`]). A move whose commit got no clear
//! answer is settled by reading the fence again under its lock on a fresh session (the lock
//! waits for a commit still being applied): moved → forward, open → back. No path routes the
//! tenant back onto a moved fence. The cutover also refuses while a session that may have
//! written the tenant's rows before its fence row existed is still open (they would commit
//! behind the moved fence, never copied).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::fault::crash_point;
use crate::verify::{Level, Scope};
use serde::Serialize;
use switchyard_store::control::Action;
use switchyard_store::{
    AuditNote, Digesting, FenceLock, FenceState, Landing, MigrationError, MigrationRecord,
    MigrationState, PassWindow, StreamKey, FENCE_MARGIN,
};
use uuid::Uuid;

use super::{Engine, EngineError};

/// How long a migration may sit in `cutover` past its budget before a recoverer treats the
/// cutover as abandoned (its driver died or froze) and finishes or rolls it back: the margin
/// the fence transaction has past the budget (a live cutover has moved the fence or let it go
/// by then; a frozen one has lost it to PostgreSQL's timeouts, or loses it while the
/// recoverer waits for it).
const ABANDONED_AFTER: Duration = FENCE_MARGIN;
/// How often the cutover looks again for sessions older than the fence row before refusing.
const OLDER_WRITERS_POLL: Duration = Duration::from_millis(50);
/// How many more times the lag is sampled (100 ms apart) before a cutover is refused for it.
const LAG_SAMPLES: usize = 10;
/// Most events the final catch-up reads per batch.
const DELTA_BATCH: u32 = 5000;

/// What `cutover` reports (DESIGN.md's `cutover --json` keys).
#[derive(Debug, Clone, Serialize)]
pub struct CutoverOutcome {
    pub migration_id: Uuid,
    pub success: bool,
    pub state: MigrationState,
    /// The whole command, from the lag check to the last routing change.
    pub duration_ms: u64,
    /// The write pause: routing `cutover_paused` until routing `normal` on the target.
    pub pause_ms: u64,
    /// Writers the fence was holding when it moved (or when the cutover rolled back).
    pub blocked_writers: i64,
    /// Events the final catch-up copied.
    pub delta_events: u64,
    pub lag_before: i64,
    pub forced: bool,
    pub error: Option<String>,
    /// Where the time went, step by step (DESIGN.md's cutover steps; milliseconds).
    pub steps_ms: Steps,
}

/// The cutover's step durations, keyed by protocol step: `1_check_lag`, `1_verify_below_delta`,
/// `1_older_writers` (waiting for sessions older than the fence row), `1_last_tail_pass` (the
/// tail pass just before the pause), `1_warm` (opening a connection to every live proxy and
/// reading how far the streams the delta may touch hold only the tenant's rows in the target),
/// `2_close_gates` (routing → `cutover_paused` and the fence taken, at once), `3_take_fence`
/// (the checks under the fence), `4_copy_delta`, `4_verify_delta`, `4_move_fence`,
/// `5_open_gates` (routing → `normal` on the target, every live proxy told); a failed attempt
/// ends with `4_failed_step` (from the last step that finished to the failure or the budget's
/// end) and `5_roll_back`. A step that did not run is absent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Steps(std::collections::BTreeMap<&'static str, f64>);

impl Steps {
    /// Records `name` as the time since `lap`, and restarts `lap`.
    fn lap(&mut self, name: &'static str, lap: &mut Instant) {
        self.lap_until(name, lap, Instant::now());
    }

    /// Records `name` as the time from `lap` to `until` (not before `lap`), and moves `lap`
    /// there.
    fn lap_until(&mut self, name: &'static str, lap: &mut Instant, until: Instant) {
        let until = until.max(*lap);
        let ms = (until - *lap).as_secs_f64() * 1000.0;
        self.0.insert(name, (ms * 10.0).round() / 10.0);
        *lap = until;
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }
}

/// Why a cutover attempt must roll back.
#[derive(Debug)]
struct Abort {
    message: String,
    blocked_writers: i64,
}

/// Steps 3 and 4 done up to the move: the fence held, the delta copied and verified.
struct Fenced {
    lock: FenceLock,
    delta: u64,
    blocked: i64,
}

/// Where the final delta starts: the tail horizon, or where the last tail pass before the
/// pause ended, with the streams that pass landed events of (compared under the fence as if
/// the delta had touched them, so every stream with versions past the tail horizon is compared
/// in full, as without the pass).
struct DeltaStart {
    from: Option<i64>,
    touched: BTreeSet<StreamKey>,
    /// Per stream with versions past the tail horizon, the version through which the target
    /// holds only the tenant's rows, asked before the pause ([`switchyard_store::EventStore::owned_heads`]):
    /// the fenced copy's check for another tenant's rows walks only the versions past it.
    owned: HashMap<StreamKey, i32>,
}

/// Why the target's fence was not opened to writers.
#[derive(Debug)]
enum OpenTarget {
    /// It could not be reached or said no (the next recovery tries again).
    Failed(String),
    /// It is no longer this migration's `copiers` fence: never opened again.
    Superseded(String),
}

impl std::fmt::Display for OpenTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Failed(why) | Self::Superseded(why) => f.write_str(why),
        }
    }
}

/// Where an attempt ended, from what the source fence says.
enum Settled {
    /// The fence moved to the target: only forward.
    Forward { delta: u64, blocked: i64 },
    /// The fence is open: back to dual_write (holding the fence meanwhile when `held`).
    Back {
        abort: Abort,
        held: Option<FenceLock>,
    },
    /// The fence could not be read, or says something this cutover did not write: routing
    /// is left as it is (`cutover_paused`) for the recoverer, who decides under the lock.
    Unknown(String),
}

impl Engine {
    /// Cuts migration `id` over within `budget`.
    pub async fn cutover(
        &self,
        id: Uuid,
        force: bool,
        budget: Duration,
        note: &AuditNote,
    ) -> Result<CutoverOutcome, EngineError> {
        let started = Instant::now();
        let mut steps = Steps::default();
        let mut lap = started;
        let record = self.control.migration(id).await?;
        if record.state != MigrationState::DualWrite {
            return Err(EngineError::Refused(format!(
                "migration {id} is {}: cutover needs dual_write{}",
                record.state,
                match record.state {
                    MigrationState::BulkCopy | MigrationState::Pending =>
                        " (the bulk copy is still running; wait for it)",
                    MigrationState::Paused => " (resume it first)",
                    _ => "",
                }
            )));
        }
        // Writers keep writing: sample the lag a few times before refusing.
        let max_lag = i64::try_from(self.settings.cutover_max_lag_events).unwrap_or(i64::MAX);
        let mut report = self.lag_report_until(&record, Some(max_lag)).await?;
        for _ in 0..LAG_SAMPLES {
            if report.lag <= max_lag || force || !report.divergent_streams.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Someone else (an operator's abort or emergency stop, a worker) may have moved the
            // migration on meanwhile: then there is nothing left to wait for.
            let now = self.control.migration(id).await?;
            if now.state != MigrationState::DualWrite {
                return Err(EngineError::Refused(format!(
                    "migration {id} is {} now (changed while this cutover waited for the lag); nothing was paused",
                    now.state
                )));
            }
            report = self.lag_report_until(&record, Some(max_lag)).await?;
        }
        let lag = report.lag;
        // Events that can never land are not lag: no wait and no --force gets them into the
        // target, and the fence must not move without them.
        if !report.divergent_streams.is_empty() {
            return Err(EngineError::Refused(format!(
                "migration {id} cannot cut over: {} stream(s) of the tenant have events that can never land in \
                 the target ({}); nothing was paused. Correct the target (`switchyard-control verify {id}`), or \
                 abort and start again with --reset-target if the target's rows are this tenant's",
                report.divergent_streams.len(),
                report
                    .divergent_streams
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if lag > max_lag && !force {
            return Err(EngineError::Refused(format!(
                "migration {id} lags by at least {lag} events (cutover_max_lag_events = {max_lag}); wait for the tail \
                 (`switchyard-control lag {id}`), or use --force to cut over anyway"
            )));
        }
        // The tail went on while the lag was sampled: its horizon now is where the checks
        // below and the last tail pass start (the less past it, the less they compare).
        let record = self.control.migration(id).await?;
        if record.state != MigrationState::DualWrite {
            return Err(EngineError::Refused(format!(
                "migration {id} is {} now (changed while this cutover checked the lag); nothing was paused",
                record.state
            )));
        }
        steps.lap("1_check_lag", &mut lap);
        // The streams the final delta will touch are checked below the delta while writers
        // still write, so only their newest versions are left for the pause.
        let below = if force {
            None
        } else {
            match self.check_below_delta(&record).await? {
                Ok(below) => Some(below),
                Err(message) => {
                    steps.lap("1_verify_below_delta", &mut lap);
                    return Ok(CutoverOutcome {
                        migration_id: id,
                        success: false,
                        state: record.state,
                        duration_ms: elapsed_ms(started),
                        pause_ms: 0,
                        blocked_writers: 0,
                        delta_events: 0,
                        lag_before: lag,
                        forced: force,
                        error: Some(message),
                        steps_ms: steps,
                    });
                }
            }
        };
        steps.lap("1_verify_below_delta", &mut lap);
        let source = self.store(&record.source_store_id)?;
        let target = self.store(&record.target_store_id)?;
        // The target opens only if its fence still is the one this migration's start wrote
        // (`open_target`): find out now, with nobody paused, rather than after the move.
        if !target
            .is_target_fence_of(record.tenant_id, switchyard_store::fence_token(record.id))
            .await
            .map_err(EngineError::store(target.id()))?
        {
            return Err(EngineError::Refused(format!(
                "migration {id} cannot cut over: the tenant's fence in target {} is not the one this migration's \
                 start wrote (changed since, or written by a release before fence tokens), so the target could \
                 not be opened after the move; nothing was paused. Abort the migration and start it again",
                target.id()
            )));
        }
        self.wait_for_older_writers(&record, budget).await?;
        steps.lap("1_older_writers", &mut lap);
        // One more tail pass while writers still write (the fenced delta starts where it
        // ended) and, meanwhile, what the pause will use made ready beforehand: a connection
        // to every live proxy, and how far each stream the delta may touch holds only the
        // tenant's rows in the target (its walk, which grows with the stream, stays out of the
        // pause; best effort: a stream not answered is walked whole under the fence).
        let warm = async {
            let live = self.live_proxies().await;
            let streams: Vec<StreamKey> = below.iter().flat_map(|b| b.keys().cloned()).collect();
            let (_, owned) = tokio::join!(
                self.proxy_caller.warm(&live),
                target.owned_heads(record.tenant_id, &streams)
            );
            let owned = owned.unwrap_or_else(|e| {
                tracing::info!(migration.id = %record.id, error = %e, "reading the target's streams before the pause failed; the fenced copy walks them whole");
                HashMap::new()
            });
            (live, owned)
        };
        let pass = async { (self.last_tail_pass(&record, budget).await, Instant::now()) };
        let ((mut delta_start, passed), (live, owned)) = tokio::join!(pass, warm);
        delta_start.owned = owned;
        steps.lap_until("1_last_tail_pass", &mut lap, passed);
        // `1_warm`: how much longer than the pass the warming took (usually nothing).
        steps.lap("1_warm", &mut lap);
        let deadline = tokio::time::Instant::now() + budget;

        // 2 and 3 at once: close the gates (routing → cutover_paused) and take the fence. The
        // fence alone keeps every append out of the source from the moment it is held, gate
        // or no gate; the gates only keep the writers of proxies that know from queueing on it.
        let paused_route = record.implied_route(MigrationState::Cutover);
        let detail_note = note.clone().with_details(
            serde_json::json!({ "force": force, "budget_ms": budget.as_millis(), "lag": lag }),
        );
        let ((closed, closed_at), (lock, locked_at)) = tokio::join!(
            async {
                let closed = self
                    .control
                    .transition(
                        id,
                        MigrationState::DualWrite,
                        Action::Cutover,
                        &detail_note,
                        Some(&paused_route),
                    )
                    .await;
                (closed, Instant::now())
            },
            async {
                let lock =
                    tokio::time::timeout_at(deadline, source.lock_fence(record.tenant_id, budget))
                        .await;
                (lock, Instant::now())
            },
        );
        let lock = match lock {
            Ok(Ok(lock)) => Ok(lock),
            Ok(Err(e)) => Err(format!("taking the fence in {}: {e}", source.id())),
            Err(_) => Err(format!(
                "cutover budget of {} ms exceeded while taking the fence",
                budget.as_millis()
            )),
        };
        let closed = match closed {
            Ok(closed) => closed,
            Err(e) => {
                if let Ok(lock) = lock {
                    let _ = lock.release().await;
                }
                return Err(e.into());
            }
        };
        // Every live proxy is told directly, while the fence works (NOTIFY and the poll are the
        // fallback for any that does not answer).
        let told_closed = {
            let (caller, live) = (self.proxy_caller.clone(), live.clone());
            tokio::spawn(async move { caller.reload_all(&live).await })
        };
        let pause_started = match &lock {
            Ok(_) => closed_at.min(locked_at),
            Err(_) => closed_at,
        };
        steps.lap("2_close_gates", &mut lap);
        crash_point("after_gate_closed");
        let epoch = closed.routing_epoch.unwrap_or(closed.record.revision);

        // The rest of 3 and 4 up to the move, within what is left of the budget (cancelling
        // them rolls the fence transaction back); then the move, never cancelled halfway.
        let attempt = tokio::time::timeout_at(
            deadline,
            self.fence_and_copy(
                &closed.record,
                lock,
                (source, target),
                (&delta_start, below.as_ref()),
                (&mut steps, &mut lap),
            ),
        )
        .await;
        let settled = match attempt {
            Ok(Ok(fenced)) => {
                self.move_fence(
                    &closed.record,
                    fenced,
                    epoch,
                    deadline,
                    (&mut steps, &mut lap),
                )
                .await
            }
            Ok(Err(abort)) => self.fence_still_open(&closed.record, abort).await,
            Err(_) => {
                let abort = Abort {
                    message: format!("cutover budget of {} ms exceeded", budget.as_millis()),
                    blocked_writers: 0,
                };
                self.fence_still_open(&closed.record, abort).await
            }
        };
        let (failure, held) = match settled {
            Settled::Forward { delta, blocked } => {
                crash_point("after_source_moved");
                crate::fault::pause_point("before_open_target").await;
                // 5. The source's fence moved: only forward from here. The target opens to
                // writers before routing names it (a failure leaves routing cutover_paused for
                // the recoverer, which opens it and finishes).
                match self.open_target(&closed.record).await {
                    Ok(()) => {}
                    Err(OpenTarget::Superseded(why)) => {
                        let _ = told_closed.await;
                        return Err(EngineError::Refused(format!(
                            "migration {id}: the fence moved, but this cutover took too long and was finished \
                             without it: {why}; see `switchyard-control status {id}`"
                        )));
                    }
                    Err(OpenTarget::Failed(e)) => {
                        let _ = told_closed.await;
                        return Err(EngineError::Refused(format!(
                            "migration {id}: the fence moved (the tenant's writes are held) but the target could \
                             not be opened to them: {e}; `switchyard-control serve` or the next `status {id}` finishes it"
                        )));
                    }
                }
                crash_point("after_fence");
                // Every live proxy is told at once (its writers released from the gate go
                // straight to the target).
                let finished = self.finish_cutover(&closed.record, note).await;
                // The pause as DESIGN.md counts it ends with routing normal on the target; the
                // calls below only bring that to the proxies sooner than NOTIFY would, and
                // waiting for their answers holds no writer.
                let pause = pause_started.elapsed();
                if finished.is_ok() {
                    self.proxy_caller.reload_all(&live).await;
                }
                let _ = told_closed.await;
                steps.lap("5_open_gates", &mut lap);
                if finished.is_ok() {
                    crash_point("after_routing_flipped");
                }
                let pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
                self.metrics.cutover_pause.observe(pause.as_secs_f64());
                if finished.is_ok() {
                    self.metrics.cutovers.with_label_values(&["migrated"]).inc();
                }
                return match finished {
                    Ok(record) => Ok(CutoverOutcome {
                        migration_id: id,
                        success: true,
                        state: record.state,
                        duration_ms: elapsed_ms(started),
                        pause_ms,
                        blocked_writers: blocked,
                        delta_events: delta,
                        lag_before: lag,
                        forced: force,
                        error: None,
                        steps_ms: steps,
                    }),
                    Err(EngineError::Migration(MigrationError::StateChanged {
                        actual: MigrationState::Failed,
                        ..
                    })) => Err(EngineError::Refused(format!(
                        "migration {id}: an emergency stop failed the migration while its fence moved; \
                         routing never named {} and the stop opens the fence in {} again: the tenant stays there",
                        closed.record.target_store_id, closed.record.source_store_id
                    ))),
                    Err(e) => Err(EngineError::Refused(format!(
                        "migration {id}: the fence moved (the tenant's writes are held) but routing could not be \
                         finished: {e}; `switchyard-control serve` or the next `status {id}` finishes it"
                    ))),
                };
            }
            Settled::Back { abort, held } => (abort, held),
            Settled::Unknown(message) => {
                return Err(EngineError::Refused(format!(
                    "migration {id}: the cutover's outcome is unknown ({message}); routing stays \
                     cutover_paused until `switchyard-control serve` reads the fence and finishes or rolls back"
                )));
            }
        };
        // Roll back: the source transaction is gone (dropped or rolled back), the fence is open.
        steps.lap("4_failed_step", &mut lap);
        crash_point("before_rollback");
        let rollback_note = note.clone().with_reason(format!("automatic rollback: {}", failure.message)).with_details(
            serde_json::json!({ "blocked_writers": failure.blocked_writers, "budget_ms": budget.as_millis() }),
        );
        let back = closed.record.implied_route(MigrationState::DualWrite);
        let rolled = self
            .control
            .transition(
                id,
                MigrationState::Cutover,
                Action::CutoverRollback,
                &rollback_note,
                Some(&back),
            )
            .await;
        self.metrics
            .cutover_pause
            .observe(pause_started.elapsed().as_secs_f64());
        self.metrics
            .cutovers
            .with_label_values(&["rolled_back"])
            .inc();
        if let Some(lock) = held {
            let _ = lock.release().await;
        }
        if rolled.is_ok() {
            self.proxy_caller.reload_all(&live).await;
        }
        let _ = told_closed.await;
        steps.lap("5_roll_back", &mut lap);
        let state = match rolled {
            Ok(t) => t.record.state,
            Err(MigrationError::StateChanged { actual, .. }) => actual,
            Err(e) => return Err(e.into()),
        };
        Ok(CutoverOutcome {
            migration_id: id,
            success: false,
            state,
            duration_ms: elapsed_ms(started),
            pause_ms: elapsed_ms(pause_started),
            blocked_writers: failure.blocked_writers,
            delta_events: 0,
            lag_before: lag,
            forced: force,
            error: Some(failure.message),
            steps_ms: steps,
        })
    }

    /// Steps 3 and 4 up to the move, given the fence taken beside the gates' closing (or why
    /// it could not be): make sure no session older than the fence row is still open, copy
    /// and verify the final delta from `delta_start`. `below` is what
    /// [`Self::check_below_delta`] compared (`None` when forced: nothing is verified).
    /// Returns the held fence, the delta size and the writers held.
    async fn fence_and_copy(
        &self,
        record: &MigrationRecord,
        lock: Result<FenceLock, String>,
        (source, target): (&switchyard_store::EventStore, &switchyard_store::EventStore),
        (delta_start, below): (&DeltaStart, Option<&HashMap<StreamKey, i32>>),
        (steps, lap): (&mut Steps, &mut Instant),
    ) -> Result<Fenced, Abort> {
        let fail = |message: String| Abort {
            message,
            blocked_writers: 0,
        };
        let mut lock: FenceLock = lock.map_err(fail)?;
        // Holding the fence, make sure nobody (an operator's emergency stop, a recoverer) took
        // the migration out of cutover meanwhile: they act under the same lock or before it.
        // And a session that wrote before the fence row existed holds no fence: its rows would
        // commit behind the moved fence. Checked again here, where none can newly qualify. Both
        // at once (the control database and the fence's own session).
        let (current, older) =
            tokio::join!(self.control.migration(record.id), lock.older_writers());
        let refusal = match (current, older) {
            (Ok(current), _) if current.state != MigrationState::Cutover => Some(format!(
                "the migration left cutover meanwhile (now {})",
                current.state
            )),
            (Err(e), _) => Some(format!("reading the migration: {e}")),
            (Ok(_), Ok(older)) if older.is_empty() => None,
            (Ok(_), Ok(older)) => Some(older_writers_message(source.id(), &older)),
            (Ok(_), Err(e)) => Some(format!(
                "looking for sessions older than the fence in {}: {e}",
                source.id()
            )),
        };
        if let Some(message) = refusal {
            let _ = lock.release().await;
            return Err(fail(message));
        }
        steps.lap("3_take_fence", lap);
        crash_point("after_fence_taken");
        let outcome = self
            .copy_delta(record, (source, target), (delta_start, below), (steps, lap))
            .await;
        let blocked = lock.blocked_writers().await.unwrap_or(0);
        let delta = match outcome {
            Ok(delta) => delta,
            Err(message) => {
                let _ = lock.release().await;
                return Err(Abort {
                    message,
                    blocked_writers: blocked,
                });
            }
        };
        crash_point("after_delta_verified");
        Ok(Fenced {
            lock,
            delta,
            blocked,
        })
    }

    /// Step 4's move: checks the deadline first, then marks the fence moved and commits with
    /// its own bound (what is left of the budget plus [`FENCE_MARGIN`]), never cancelled
    /// halfway. A move without a clear answer is settled by [`Self::read_back_fence`].
    async fn move_fence(
        &self,
        record: &MigrationRecord,
        fenced: Fenced,
        epoch: i64,
        deadline: tokio::time::Instant,
        (steps, lap): (&mut Steps, &mut Instant),
    ) -> Settled {
        let Fenced {
            lock,
            delta,
            blocked,
        } = fenced;
        let now = tokio::time::Instant::now();
        if now >= deadline {
            let _ = lock.release().await;
            let abort = Abort {
                message: format!(
                    "cutover budget of {} ms exceeded before the fence moved",
                    self.settings.cutover_timeout.as_millis()
                ),
                blocked_writers: blocked,
            };
            return self.fence_still_open(record, abort).await;
        }
        let bound = deadline - now + FENCE_MARGIN;
        // Only the source's fence moves here; the target opens to the tenant's writers after
        // this move committed (`Engine::open_target`), so no moment has both stores open to
        // writers. An append meeting the moved fence in between finds the target still
        // admitting copiers only and waits briefly there (the proxy's follow step).
        let after = Self::fence_after_move(record);
        let moved =
            tokio::time::timeout(bound, lock.move_to(&record.target_store_id, epoch, after)).await;
        steps.lap("4_move_fence", lap);
        let message = match moved {
            Ok(Ok(())) => return Settled::Forward { delta, blocked },
            Ok(Err(e)) => format!("moving the fence: {e}"),
            Err(_) => format!(
                "moving the fence: no answer within {} ms",
                bound.as_millis()
            ),
        };
        tracing::warn!(migration.id = %record.id, error = %message, "the fence move got no clear answer; reading the fence");
        match self.read_back_fence(record).await {
            Ok((state, moved_to, lock)) => {
                if FenceState::refuses_writers(&state)
                    && moved_to.as_deref() == Some(record.target_store_id.as_str())
                {
                    let _ = lock.release().await;
                    Settled::Forward { delta, blocked }
                } else if state == "open" {
                    Settled::Back {
                        abort: Abort {
                            message: format!("{message}; the fence is still open"),
                            blocked_writers: blocked,
                        },
                        held: Some(lock),
                    }
                } else {
                    let _ = lock.release().await;
                    Settled::Unknown(format!("{message}; the fence says {state} to {moved_to:?}"))
                }
            }
            Err(e) => Settled::Unknown(format!("{message}; reading the fence since: {e}")),
        }
    }

    /// The source fence read again under its lock, on a fresh session: the lock waits for a
    /// move whose commit is still being applied (or for PostgreSQL to end a frozen holder's
    /// transaction), so what it says is final while the lock is held. Tries for a while: the
    /// connection that failed may have been the only thing wrong.
    async fn read_back_fence(
        &self,
        record: &MigrationRecord,
    ) -> Result<(String, Option<String>, FenceLock), String> {
        let source = self
            .store(&record.source_store_id)
            .map_err(|e| e.to_string())?;
        let wait = self.settings.cutover_timeout + FENCE_MARGIN * 2;
        let until = tokio::time::Instant::now() + wait * 2;
        let mut last = String::new();
        while tokio::time::Instant::now() < until {
            match source.lock_fence(record.tenant_id, wait).await {
                Ok(mut lock) => match lock.state().await {
                    Ok((state, moved_to)) => return Ok((state, moved_to, lock)),
                    Err(e) => {
                        let _ = lock.release().await;
                        last = e.to_string();
                    }
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last)
    }

    /// An attempt that failed before sending the move: the fence is open unless someone else
    /// moved it, which is checked rather than assumed, so the rollback never routes the
    /// tenant back onto a moved fence.
    async fn fence_still_open(&self, record: &MigrationRecord, abort: Abort) -> Settled {
        let Ok(source) = self.store(&record.source_store_id) else {
            return Settled::Back { abort, held: None };
        };
        match source.fence(record.tenant_id).await {
            Ok(Some((state, moved_to))) if FenceState::refuses_writers(&state) => {
                if moved_to.as_deref() == Some(record.target_store_id.as_str()) {
                    Settled::Forward {
                        delta: 0,
                        blocked: abort.blocked_writers,
                    }
                } else {
                    Settled::Unknown(format!(
                        "{}; and the source fence says moved to {moved_to:?}",
                        abort.message
                    ))
                }
            }
            // Open, absent, or unreadable: this attempt never sent a move, so not moved by it.
            _ => Settled::Back { abort, held: None },
        }
    }

    /// Step 1's last check: waits (at most `budget`, nobody paused yet) for the sessions that
    /// may hold rows of the tenant written before its fence row existed
    /// ([`switchyard_store::EventStore::writers_older_than_fence`]), after the fence row settled
    /// ([`switchyard_store::EventStore::fence_settles_in`]); refuses if they stay.
    async fn wait_for_older_writers(
        &self,
        record: &MigrationRecord,
        budget: Duration,
    ) -> Result<(), EngineError> {
        let source = self.store(&record.source_store_id)?;
        // A fence row written less than a second ago (the migration just started) makes every
        // writer the fence will hold look older than it: let it settle first (at most that
        // second, nobody paused), then wait for the older ones within the budget.
        let settling = source
            .fence_settles_in(record.tenant_id)
            .await
            .map_err(EngineError::store(source.id()))?;
        tokio::time::sleep(settling).await;
        let until = tokio::time::Instant::now() + budget;
        loop {
            let older = source
                .writers_older_than_fence(record.tenant_id)
                .await
                .map_err(EngineError::store(source.id()))?;
            if older.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                return Err(EngineError::Refused(format!(
                    "migration {}: {} (nothing was paused); end them, then cut over again",
                    record.id,
                    older_writers_message(source.id(), &older)
                )));
            }
            tokio::time::sleep(OLDER_WRITERS_POLL).await;
        }
    }

    /// The final catch-up: every event of the tenant past `delta_start` (the tail horizon, or
    /// where [`Self::last_tail_pass`] ended; no upper bound: with the fence held, nothing more
    /// can commit). Events the mirror or the tail already
    /// wrote are found by identity and not inserted again, so the time under the fence grows
    /// with what is really missing, not with how far the horizon lags.
    ///
    /// Every delta event must be in the target by identity (same tenant, stream, version, id
    /// and content), forced or not: one that did not land, or never can, fails the attempt
    /// and the fence stays. Unless forced, every stream the delta touched also
    /// agrees in count and last version on both sides. The versions [`Self::check_below_delta`]
    /// compared before the gates closed are not counted again: under the fence only the rest
    /// of each stream is (a stream it did not see, whole). Both stores are asked at once, and
    /// the position map is written meanwhile.
    async fn copy_delta(
        &self,
        record: &MigrationRecord,
        (source, target): (&switchyard_store::EventStore, &switchyard_store::EventStore),
        (delta_start, below): (&DeltaStart, Option<&HashMap<StreamKey, i32>>),
        (steps, lap): (&mut Steps, &mut Instant),
    ) -> Result<u64, String> {
        let window = PassWindow {
            from: delta_start.from,
            to: i64::MAX,
        };
        let mut after = 0;
        let mut copied = 0u64;
        let mut map: Vec<(i64, i64, Uuid)> = Vec::new();
        let mut touched: BTreeSet<StreamKey> = delta_start.touched.clone();
        let mut counted: Option<Scope> = None;
        loop {
            let batch = source
                .read_window(record.tenant_id, window, after, DELTA_BATCH)
                .await
                .map_err(|e| format!("reading the final delta: {e}"))?;
            let Some(last) = batch.last() else { break };
            after = last.global_position;
            // With the fence held nothing more commits: a short batch is the last one.
            let more = batch.len() == DELTA_BATCH as usize;
            touched.extend(
                batch
                    .iter()
                    .map(|e| (e.aggregate_type.clone(), e.aggregate_id)),
            );
            // Rows the mirror or the tail already wrote are found present (same tenant,
            // stream, version, id and content) and not inserted again. With the last batch
            // the target also counts the touched streams' compared versions once they
            // landed, in the same round trip, while the source (held still by the fence)
            // counts its own: the copy and its check in one round trip per store.
            let landings = match below {
                Some(below) if !more => {
                    let ranges = compared_ranges(&touched, below);
                    let (landed, source_counts) = tokio::join!(
                        target.copy_in_counting(
                            record.tenant_id,
                            &batch,
                            &ranges,
                            &delta_start.owned
                        ),
                        source.range_digests(record.tenant_id, &ranges, Digesting::Count)
                    );
                    let (landings, target_counts) =
                        landed.map_err(|e| format!("copying the final delta: {e}"))?;
                    let source_counts =
                        source_counts.map_err(|e| format!("verifying the delta: {e}"))?;
                    counted = Some(Scope::Counted(source_counts, target_counts));
                    landings
                }
                _ => target
                    .copy_in(&batch)
                    .await
                    .map_err(|e| format!("copying the final delta: {e}"))?,
            };
            for (e, landing) in batch.iter().zip(&landings) {
                match landing {
                    Landing::Inserted(p) => {
                        copied += 1;
                        map.push((e.global_position, *p, e.event_id));
                    }
                    Landing::Present(p) => map.push((e.global_position, *p, e.event_id)),
                    // Forced or not, the fence never moves while a delta event is not in the
                    // target: that event would be acknowledged in the source and lost.
                    Landing::Waiting => {
                        return Err(format!(
                            "event {} ({}/{} version {}) of the final delta did not land in the target \
                             (version {} of its stream is not there); the fence stays where it is",
                            e.event_id,
                            e.aggregate_type,
                            e.aggregate_id,
                            e.version,
                            e.version - 1
                        ))
                    }
                    Landing::Diverged(why) => {
                        return Err(format!(
                            "{}; the fence stays where it is",
                            super::copy::divergence_message(e, *why)
                        ))
                    }
                }
            }
            if !more {
                break;
            }
        }
        self.metrics
            .copied(usize::try_from(copied).unwrap_or(usize::MAX));
        steps.lap("4_copy_delta", lap);
        let mapped = async {
            for chunk in map.chunks(DELTA_BATCH as usize) {
                self.control
                    .insert_position_map(record.id, chunk)
                    .await
                    .map_err(|e| format!("recording positions: {e}"))?;
            }
            Ok::<(), String>(())
        };
        let Some(below) = below else {
            // Forced: not verified.
            mapped.await?;
            return Ok(copied);
        };
        if touched.is_empty() {
            // An empty delta after an empty last pass touched no stream: nothing to compare,
            // no round trip to either store.
            mapped.await?;
            steps.lap("4_verify_delta", lap);
            return Ok(copied);
        }
        // The touched streams, compared under the fence with the same code as `verify`
        // (counts and last versions: digests do not fit a pause): counted with the last
        // batch's copy, or (no last batch: the delta was empty or ended on a full one) now.
        let scope = counted.unwrap_or_else(|| Scope::Ranges(compared_ranges(&touched, below)));
        let checked = async {
            self.verify_scope(record, &scope, Level::Count, None)
                .await
                .map_err(|e| format!("verifying the delta: {e}"))
        };
        let ((), report) = tokio::try_join!(mapped, checked)?;
        steps.lap("4_verify_delta", lap);
        if report.consistent {
            Ok(copied)
        } else {
            Err(format!(
                "verification failed; streams differ: {}",
                report.summary(10)
            ))
        }
    }

    /// Step 1's last act, writers still writing: one more tail pass, landing every event
    /// between the tail horizon and the source's current horizon in the target (with its
    /// position map rows), so that the fenced delta starts at that horizon and finds (almost)
    /// nothing to read, look up or copy. Every event below the answer is in the target by
    /// identity: below the tail horizon the tail landed it; from there to the new horizon this
    /// pass did (all of them, or the answer stays the tail horizon). The streams it touched
    /// are compared as before: their versions below [`Self::check_below_delta`]'s bound
    /// before the pause, the rest under the fence (they are in the answer's `touched`).
    ///
    /// Best effort, within `bound` (the cutover's budget): any failure, an event that cannot
    /// land yet, or a pass that takes longer leaves the delta to start at the tail horizon, as
    /// without this pass. Nothing is recorded as the tail's progress (the
    /// migration's driver keeps its own claim and horizon).
    async fn last_tail_pass(&self, record: &MigrationRecord, bound: Duration) -> DeltaStart {
        let fallback = || DeltaStart {
            from: record.tail_horizon,
            touched: BTreeSet::new(),
            owned: HashMap::new(),
        };
        let pass = async {
            let source = self.store(&record.source_store_id)?;
            let target = self.store(&record.target_store_id)?;
            let Some(from) = record.tail_horizon else {
                return Ok(fallback());
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
                return Ok(fallback());
            }
            let mut after = 0;
            let mut touched = BTreeSet::new();
            loop {
                let batch = source
                    .read_window(record.tenant_id, window, after, DELTA_BATCH)
                    .await
                    .map_err(EngineError::store(source.id()))?;
                if batch.is_empty() {
                    break;
                }
                let landed = self.land(Some(record.id), target, &batch).await?;
                if landed.prefix < batch.len() {
                    return Ok(fallback());
                }
                touched.extend(
                    batch
                        .iter()
                        .map(|e| (e.aggregate_type.clone(), e.aggregate_id)),
                );
                after = landed.last_position;
                if batch.len() < DELTA_BATCH as usize {
                    break;
                }
            }
            Ok::<_, EngineError>(DeltaStart {
                from: Some(window.to),
                touched,
                owned: HashMap::new(),
            })
        };
        match tokio::time::timeout(bound, pass).await {
            Ok(Ok(start)) => start,
            Ok(Err(e)) => {
                tracing::info!(migration.id = %record.id, error = %e, "the last tail pass before the pause failed; the fenced delta starts at the tail horizon");
                fallback()
            }
            Err(_) => {
                tracing::info!(migration.id = %record.id, "the last tail pass before the pause took longer than the budget; the fenced delta starts at the tail horizon");
                fallback()
            }
        }
    }

    /// Before the gates close: for each stream with versions past the tail horizon, compares
    /// its versions below them (`1..=below`) in both stores, and answers `below` per stream,
    /// or why they differ. A stream's versions past a horizon are the newest ones (version
    /// v + 1 commits after v, so it is past any horizon v is past), so `below` is its last
    /// version there less their count. With the versions the fence leaves compared later,
    /// each stream the final delta touches is compared whole, while only its newest versions
    /// are compared during the pause.
    async fn check_below_delta(
        &self,
        record: &MigrationRecord,
    ) -> Result<Result<HashMap<StreamKey, i32>, String>, EngineError> {
        let source = self.store(&record.source_store_id)?;
        let window = PassWindow {
            from: record.tail_horizon,
            to: i64::MAX,
        };
        let past = source
            .window_digests(record.tenant_id, window, Digesting::Count)
            .await
            .map_err(EngineError::store(source.id()))?;
        let below: HashMap<StreamKey, i32> = past
            .into_iter()
            .map(|(k, d)| {
                let newest = i32::try_from(d.count).unwrap_or(i32::MAX);
                (k, d.last_version.saturating_sub(newest).max(0))
            })
            .collect();
        let ranges: Vec<(StreamKey, i32, i32)> = below
            .iter()
            .filter(|(_, b)| **b > 0)
            .map(|(k, b)| (k.clone(), 1, *b))
            .collect();
        if !ranges.is_empty() {
            let report = self
                .verify_scope(record, &Scope::Ranges(ranges), Level::Count, None)
                .await?;
            if !report.consistent {
                return Ok(Err(format!(
                    "verification failed before the gates closed (nothing was paused); streams differ: {}",
                    report.summary(10)
                )));
            }
        }
        Ok(Ok(below))
    }

    /// Step 5: cutover → migrated, routing normal on the target. Retried briefly: the fence
    /// already moved, so this is the only way forward.
    async fn finish_cutover(
        &self,
        record: &MigrationRecord,
        note: &AuditNote,
    ) -> Result<MigrationRecord, EngineError> {
        let route = record.implied_route(MigrationState::Migrated);
        let mut last = None;
        for attempt in 0..5u32 {
            match self
                .control
                .transition(
                    record.id,
                    MigrationState::Cutover,
                    Action::CutoverDone,
                    note,
                    Some(&route),
                )
                .await
            {
                Ok(done) => return Ok(done.record),
                // A recoverer finished it meanwhile.
                Err(MigrationError::StateChanged {
                    actual: MigrationState::Migrated,
                    ..
                }) => {
                    return Ok(self.control.migration(record.id).await?);
                }
                Err(e) if e.is_retryable() => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map_or_else(
            || EngineError::Refused("routing not finished".to_owned()),
            EngineError::from,
        ))
    }

    /// Finishes or rolls back a cutover whose driver died, from what the source fence says:
    /// moved → migrated on the target; open → back to dual_write. Acts only once the
    /// migration has sat in `cutover` past the configured budget plus a margin, and holds the
    /// fence while it decides and applies, so a live cutover can never move the fence under a
    /// rollback (it re-checks the state under the same lock). Returns the state it left.
    pub async fn recover_cutover(
        &self,
        record: &MigrationRecord,
    ) -> Result<Option<MigrationState>, EngineError> {
        if record.state != MigrationState::Cutover {
            return Ok(None);
        }
        let age = (chrono::Utc::now() - record.updated_at)
            .to_std()
            .unwrap_or_default();
        if !abandoned(age, self.settings.cutover_timeout) {
            return Ok(None);
        }
        // The attempt may have been given another budget (`cutover --timeout-ms`): a live
        // cutover is left its own.
        let budget = self.attempt_budget(record).await;
        if !abandoned(age, budget) {
            return Ok(None);
        }
        let source = self.store(&record.source_store_id)?;
        // A frozen driver's fence transaction ends at most the budget plus the margin after it
        // went idle: wait that long for it.
        let wait = budget + FENCE_MARGIN * 2;
        let lock = match source.lock_fence(record.tenant_id, wait).await {
            Ok(lock) => lock,
            // Someone holds it still (a live cutover): not abandoned after all.
            Err(e) => {
                tracing::info!(migration.id = %record.id, error = %e, "a cutover past its budget still holds the fence");
                return Ok(None);
            }
        };
        let note = AuditNote::new(format!("worker:{}", self.worker))
            .with_reason("recovering a cutover whose driver stopped");
        let applied = self
            .settle_under_fence(
                record,
                lock,
                (Action::CutoverRollback, MigrationState::DualWrite),
                &note,
            )
            .await?;
        match applied {
            Ok(done) => {
                let outcome = if done.state == MigrationState::Migrated {
                    "migrated"
                } else {
                    "rolled_back"
                };
                self.metrics.cutovers.with_label_values(&[outcome]).inc();
                tracing::warn!(migration.id = %record.id, state = %done.state, "recovered an abandoned cutover");
                Ok(Some(done.state))
            }
            Err(MigrationError::StateChanged { actual, .. }) => Ok(Some(actual)),
            Err(e) => Err(e.into()),
        }
    }
}

impl Engine {
    /// Settles `record`, in `cutover`, by what its source fence says while `lock` holds it:
    /// moved to the target → the cutover committed its move, so migrated (routing normal on
    /// the target); otherwise `otherwise` (the recoverer's rollback, the emergency stop's
    /// fail). The transition is a compare-and-set from `cutover`, written before the fence is
    /// let go, so no cutover can move the fence under a decision that it is open.
    pub(super) async fn settle_under_fence(
        &self,
        record: &MigrationRecord,
        mut lock: FenceLock,
        otherwise: (Action, MigrationState),
        note: &AuditNote,
    ) -> Result<Result<MigrationRecord, MigrationError>, EngineError> {
        let (state, moved_to) = match lock.state().await {
            Ok(s) => s,
            Err(e) => {
                let _ = lock.release().await;
                return Err(EngineError::store(&record.source_store_id)(e));
            }
        };
        let (action, to) = settled(
            &state,
            moved_to.as_deref(),
            &record.target_store_id,
            otherwise,
        );
        if to == MigrationState::Migrated {
            // The source's fence moved; the attempt may have died before it opened the target.
            // It opens before routing names it; if it cannot, nothing changes and the next
            // recovery tries again (writers wait at the gate meanwhile).
            if let Err(e) = self.open_target(record).await {
                let _ = lock.release().await;
                return Err(EngineError::Refused(format!(
                    "migration {}: the fence moved but the target could not be opened: {e}",
                    record.id
                )));
            }
        }
        let route = record.implied_route(to);
        let applied = self
            .control
            .transition(
                record.id,
                MigrationState::Cutover,
                action,
                note,
                Some(&route),
            )
            .await;
        let _ = lock.release().await;
        Ok(applied.map(|done| done.record))
    }

    /// Opens the tenant's fence in `record`'s target to every writer, once the source's fence
    /// moved there (never before: both would be open). A few tries, backing off: a proxy's
    /// append that followed the moved fence waits at the target until then.
    async fn open_target(&self, record: &MigrationRecord) -> Result<(), OpenTarget> {
        let target = self
            .store(&record.target_store_id)
            .map_err(|e| OpenTarget::Failed(e.to_string()))?;
        let token = switchyard_store::fence_token(record.id);
        let mut last = String::new();
        for attempt in 0..4u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(25 << attempt)).await;
            }
            match tokio::time::timeout(
                self.settings.cutover_timeout + FENCE_MARGIN,
                target.open_target_fence(record.tenant_id, token),
            )
            .await
            {
                Ok(Ok(true)) => return Ok(()),
                // Not this migration's copiers fence any more: someone finished this cutover
                // and the tenant has moved on since (a revert); opening it would leave two
                // stores open.
                Ok(Ok(false)) => {
                    let fence = target.fence(record.tenant_id).await.ok().flatten();
                    return Err(OpenTarget::Superseded(format!(
                        "the tenant's fence in {} is no longer this migration's ({}), so it was left as it is: \
                         the cutover was finished meanwhile and the tenant has moved on",
                        target.id(),
                        fence.map_or_else(
                            || "none".to_owned(),
                            |(state, to)| format!("{state}, to {}", to.unwrap_or_default())
                        )
                    )));
                }
                Ok(Err(e)) => last = format!("opening the fence in {}: {e}", target.id()),
                Err(_) => last = format!("opening the fence in {}: no answer", target.id()),
            }
        }
        Err(OpenTarget::Failed(last))
    }

    /// What the source's fence admits once it moved: copiers only while reverse replication
    /// keeps it current, nobody otherwise.
    fn fence_after_move(record: &MigrationRecord) -> FenceState {
        if record.reverse_replication() {
            FenceState::Copiers
        } else {
            FenceState::Moved
        }
    }

    /// The budget the current cutover attempt of `record` was given (its `cutover` audit
    /// entry's `budget_ms`), or the configured one.
    async fn attempt_budget(&self, record: &MigrationRecord) -> Duration {
        let configured = self.settings.cutover_timeout;
        let Ok(log) = self.control.audit_log(record.id).await else {
            return configured;
        };
        log.iter()
            .rev()
            .find(|e| e.action == Action::Cutover.as_str())
            .and_then(|e| e.details.as_ref()?.get("budget_ms")?.as_u64())
            .map_or(configured, Duration::from_millis)
    }
}

/// Whether a cutover last changed `age` ago was abandoned by its driver, given the attempt's
/// `budget`: a live driver finishes or rolls back within the budget, and its fence
/// transaction within the margin after that.
fn abandoned(age: Duration, budget: Duration) -> bool {
    age >= ABANDONED_AFTER + budget
}

/// What a cutover left behind becomes, from the source fence (read under its lock): forward
/// only when the fence was moved to this migration's target; anything else (open, or moved
/// elsewhere) takes `otherwise` (the recoverer's rollback to dual_write, the emergency stop's
/// failure).
fn settled(
    fence_state: &str,
    moved_to: Option<&str>,
    target: &str,
    otherwise: (Action, MigrationState),
) -> (Action, MigrationState) {
    if FenceState::refuses_writers(fence_state) && moved_to == Some(target) {
        (Action::CutoverDone, MigrationState::Migrated)
    } else {
        otherwise
    }
}

/// The versions of each touched stream compared under the fence: those past what
/// [`Engine::check_below_delta`] compared before the gates closed (a stream it did not see,
/// whole).
fn compared_ranges(
    touched: &BTreeSet<StreamKey>,
    below: &HashMap<StreamKey, i32>,
) -> Vec<(StreamKey, i32, i32)> {
    touched
        .iter()
        .map(|k| {
            let lo = below.get(k).map_or(1, |b| b + 1);
            (k.clone(), lo, i32::MAX)
        })
        .collect()
}

/// Why sessions older than the fence row stop a cutover, naming them.
fn older_writers_message(store: &str, older: &[switchyard_store::OlderWriter]) -> String {
    let named: Vec<String> = older.iter().take(5).map(ToString::to_string).collect();
    format!(
        "{} session(s) in store {store} began before the tenant's fence and may hold its rows \
         outside the fence: {}",
        older.len(),
        named.join("; ")
    )
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    //! The recoverer's and the emergency stop's decisions, without a database.

    use super::*;

    #[test]
    fn a_cutover_goes_forward_only_when_the_fence_moved_to_this_target() {
        let forward = (Action::CutoverDone, MigrationState::Migrated);
        let back = (Action::CutoverRollback, MigrationState::DualWrite);
        let recovery = |state: &str, moved_to: Option<&str>, target: &str| {
            settled(state, moved_to, target, back)
        };
        assert_eq!(recovery("moved", Some("target"), "target"), forward);
        assert_eq!(
            recovery("open", None, "target"),
            back,
            "the fence never moved"
        );
        assert_eq!(
            recovery("moved", Some("elsewhere"), "target"),
            back,
            "a fence moved by another migration is not this one's forward"
        );
        assert_eq!(recovery("moved", None, "target"), back);
    }

    #[test]
    fn a_cutover_is_abandoned_only_past_its_budget_and_the_fence_margin() {
        let budget = Duration::from_millis(3_000);
        assert!(!abandoned(Duration::ZERO, budget));
        assert!(
            !abandoned(budget, budget),
            "a live driver still has the margin"
        );
        assert!(!abandoned(
            budget + ABANDONED_AFTER - Duration::from_millis(1),
            budget
        ));
        assert!(abandoned(budget + ABANDONED_AFTER, budget));
        // A larger budget (`cutover --timeout-ms`) is left its own.
        assert!(!abandoned(budget + ABANDONED_AFTER, budget * 2));
    }
}
