//! `cutover MIGRATION [--force] [--timeout-ms N]`: flip the tenant to its target with a write
//! pause of milliseconds, or roll back to dual_write within the budget (the runbook's
//! "initiate cutover" and "cutover timeout" procedures).

use std::time::Duration;

use uuid::Uuid;

use super::shared::operator_note;
use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
    /// Skip the lag gate and the verification (the final delta is still copied and fenced).
    #[arg(long)]
    pub force: bool,
    /// The budget of the whole sequence (default: control.cutover_timeout_ms).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: Option<String>,
}

pub async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let engine = ctx.engine().await?;
    let budget = args
        .timeout_ms
        .map_or(engine.settings.cutover_timeout, Duration::from_millis)
        .clamp(Duration::from_millis(1), Duration::from_secs(600));
    let outcome = engine
        .cutover(
            args.migration,
            args.force,
            budget,
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
