//! `cutover MIGRATION [--force] [--timeout-ms N]`: flip the tenant to its target with a write
//! pause of milliseconds, or roll back to dual_write within the budget (the runbook's
//! "initiate cutover" and "cutover timeout" procedures).

use std::time::Duration;

use uuid::Uuid;

use super::shared::operator_note;
use super::{emit, CliError};
use crate::context::Context;
use crate::engine::Engine;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
    #[command(flatten)]
    pub budget: Budget,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: Option<String>,
}

/// The cutover's force flag and budget (`cutover`, and `revert`'s cutover back).
#[derive(Debug, clap::Args)]
pub struct Budget {
    /// Skip the lag gate and the verification (the final delta is still copied and fenced).
    #[arg(long)]
    pub force: bool,
    /// The budget of the whole sequence (default: control.cutover_timeout_ms).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
}

impl Budget {
    /// `--timeout-ms`, or the configured budget; between 1 ms and 10 minutes.
    pub(super) fn duration(&self, engine: &Engine) -> Duration {
        self.timeout_ms
            .map_or(engine.settings.cutover_timeout, Duration::from_millis)
            .clamp(Duration::from_millis(1), Duration::from_secs(600))
    }
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let engine = ctx.engine().await?;
    let outcome = engine
        .cutover(
            args.migration,
            args.budget.force,
            args.budget.duration(&engine),
            &operator_note(args.reason.as_deref()),
        )
        .await?;
    emit(json, &outcome, |o| {
        if o.success {
            format!(
                "Cutover successful!\nState: {}\nWrite pause: {} ms (whole cutover {} ms)\nFinal delta copied: {} events\nWriters held by the fence: {}",
                o.state, o.pause_ms, o.duration_ms, o.delta_events, o.blocked_writers
            )
        } else {
            format!(
                "ERROR: Cutover failed: {}\nBlocked writers: {}\nMigration has been rolled back automatically (state: {}); writes continue on the source.\n\
                 Options: wait for the lag to clear and retry; retry with a larger --timeout-ms; --force; or abort.",
                o.error.as_deref().unwrap_or("?"),
                o.blocked_writers,
                o.state
            )
        }
    });
    if outcome.success {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "cutover of migration {} rolled back: {}",
            outcome.migration_id,
            outcome.error.unwrap_or_default()
        )))
    }
}
