//! Fault injection for the crash-safety tests, compiled in only with the `fault-injection`
//! feature (off by default, so release binaries carry none of it; `scripts/test.sh` builds
//! the binaries the tests start with it on).
//!
//! `SWITCHYARD_CRASH_AT=<point>` kills the process (as `kill -9` would: no cleanup, no
//! unwinding) when it reaches that point. A precise crash between two steps is the one fault a
//! real component cannot produce on demand. The points, in protocol order: `after_gate_closed`
//! (routing `cutover_paused`), `after_fence_taken` (the source fence held `FOR UPDATE`),
//! `after_delta_verified` (final delta copied and verified, fence not yet moved),
//! `after_source_moved` (the source's fence moved and committed, the target's still admitting
//! copiers only), `after_fence` (the target's fence opened to writers as well),
//! `after_routing_flipped` (routing `normal` on the target, state
//! migrated, nothing reported yet); on the rollback path, `before_rollback` (the attempt failed,
//! routing still `cutover_paused`). A revert (`revert`) adds `revert_after_start` (its migration
//! recorded, or found), `revert_before_cutover` (caught up, dual-writing), `revert_before_rollback`
//! (its cutover rolled back to dual_write, the revert migration not yet aborted) and
//! `revert_after_cutover` (the revert migrated, the reverted migration not yet finished); its
//! cutover passes the cutover's points. A cleanup (`complete --cleanup`, `cleanup`) has
//! `cleanup_after_batch` (a batch of the tenant's rows deleted, its count not yet recorded).
//! docs/reliability.md lists what recovery must give at each.
//!
//! `SWITCHYARD_PAUSE_AT=<point>:<ms>` holds the process that long at a pause point instead, so
//! a test can interleave two operators' commands in the one order that matters (a real race
//! too narrow to hit on demand), the first time the process gets there: `before_open_target` (a
//! cutover's source fence moved, the target not yet opened), `migrate_start_before_insert` (the preflight checks passed,
//! the migration not yet recorded), `revert_before_insert` (a revert's checks passed, its
//! migration not yet recorded), `revert_before_cutover` (a revert caught up, its cutover not
//! yet begun), `cleanup_before_delete` (a batch's checks passed, its
//! rows not yet deleted) and `verify_before_compare` (a `verify` chose what to compare, nothing
//! read yet).

/// The variable naming the point to crash at.
pub const CRASH_AT_VAR: &str = "SWITCHYARD_CRASH_AT";

/// Whether this build has crash points.
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// `switchyard-control --version`: the package version, marked when the build has crash points,
/// so a test (or an operator) can tell the builds apart.
pub const VERSION: &str = if ENABLED {
    concat!(env!("CARGO_PKG_VERSION"), " (fault-injection)")
} else {
    env!("CARGO_PKG_VERSION")
};

/// Aborts the process if `SWITCHYARD_CRASH_AT` names `point`.
#[cfg(feature = "fault-injection")]
pub(crate) fn crash_point(point: &str) {
    if std::env::var(CRASH_AT_VAR).is_ok_and(|p| p == point) {
        eprintln!("switchyard: crashing at {point} ({CRASH_AT_VAR})");
        std::process::abort();
    }
}

/// Without the feature a crash point is nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn crash_point(_point: &str) {}

/// The variable naming the point to pause at, and for how long (`<point>:<ms>`).
pub const PAUSE_AT_VAR: &str = "SWITCHYARD_PAUSE_AT";

/// Sleeps as long as `SWITCHYARD_PAUSE_AT` says if it names `point`, the first time the
/// process reaches it (a cleanup's later batches go on unheld).
#[cfg(feature = "fault-injection")]
pub(crate) async fn pause_point(point: &str) {
    static PAUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Ok(spec) = std::env::var(PAUSE_AT_VAR) else {
        return;
    };
    let Some((at, ms)) = spec.split_once(':') else {
        return;
    };
    if at == point && !PAUSED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        if let Ok(ms) = ms.parse::<u64>() {
            eprintln!("switchyard: pausing at {point} for {ms} ms ({PAUSE_AT_VAR})");
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }
}

/// Without the feature a pause point is nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) async fn pause_point(_point: &str) {}

/// The line to print at startup when `SWITCHYARD_CRASH_AT` is set: armed, or ignored because
/// this build has no crash points (so nobody debugs a crash that silently never happens).
pub fn startup_notice() -> Option<String> {
    let point = std::env::var(CRASH_AT_VAR).ok()?;
    Some(if ENABLED {
        format!("switchyard: fault injection armed: {CRASH_AT_VAR}={point}")
    } else {
        format!(
            "switchyard: {CRASH_AT_VAR}={point} ignored: this build has no fault injection \
             (build with --features switchyard-control/fault-injection)"
        )
    })
}
