//! `revert MIGRATION --reason R [--force] [--timeout-ms N]`: undo a cutover — a fenced cutover
//! of the tenant back to the store a migrated migration left (kept current by its reverse
//! replication), with the cutover's lag gate, budget and automatic rollback; afterwards the
//! store the tenant left is kept current in turn (the runbook's "Undo a cutover").

use uuid::Uuid;

use super::cutover::Budget;
use super::shared::operator_note;
use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The migrated migration to revert.
    pub migration: Uuid,
    // The cutover back's `--force` and `--timeout-ms`, as `cutover` has them.
    #[command(flatten)]
    pub budget: Budget,
    /// Why, for the audit log (required).
    #[arg(long)]
    pub reason: String,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let engine = ctx.engine().await?;
    let outcome = engine
        .revert(
            args.migration,
            args.budget.force,
            args.budget.duration(&engine),
            &operator_note(Some(&args.reason)),
        )
        .await?;
    emit(json, &outcome, |o| {
        if o.success {
            let mut out = format!(
                "Revert successful: tenant {} lives in {} again (migration {} reverts {})\n",
                o.tenant_id, o.store_id, o.revert_migration_id, o.reverts
            );
            if o.already_reverted {
                out.push_str("(an earlier `revert` had cut over; its record is finished now)\n");
            }
            if let Some(c) = &o.cutover {
                out.push_str(&format!(
                    "Write pause: {} ms (whole cutover {} ms)\nFinal delta copied: {} events\n",
                    c.pause_ms, c.duration_ms, c.delta_events
                ));
            }
            if let Some(kept) = &o.kept_current {
                out.push_str(&format!(
                    "{kept} is kept current by reverse replication until `switchyard-control complete {r}`; \
                     `switchyard-control revert {r}` moves the tenant to {kept} again\n",
                    r = o.revert_migration_id
                ));
            }
            out
        } else {
            format!(
                "ERROR: Revert failed: {}\nRolled back automatically (migration {} is {}): tenant {} stays on {}{}; \
                 migration {} can be reverted again.\nOptions: wait for the lag to clear and retry; retry with a \
                 larger --timeout-ms; --force.",
                o.error.as_deref().unwrap_or("?"),
                o.revert_migration_id,
                o.state,
                o.tenant_id,
                o.store_id,
                o.kept_current
                    .as_deref()
                    .map_or_else(String::new, |k| format!(", {k} still kept current")),
                o.reverts
            )
        }
    });
    if outcome.success {
        Ok(())
    } else {
        Err(CliError::Reported(format!(
            "revert of migration {} rolled back: {}",
            outcome.reverts,
            outcome.error.unwrap_or_default()
        )))
    }
}
