//! `emergency-stop [--tenant T…] [--all] --reason R` (runbook procedure 8): every listed tenant
//! back to normal on its source, gates open, mirrors off, active migrations failed — except a
//! tenant whose cutover had already moved its fence: that migration is finished and the
//! tenant stays on its target, said so in its line.

use uuid::Uuid;

use super::shared::operator_note;
use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A tenant to stop (repeat for several).
    #[arg(long = "tenant")]
    pub tenants: Vec<Uuid>,
    /// Every tenant with an active migration or a non-normal route.
    #[arg(long)]
    pub all: bool,
    /// Why, for the audit log (required).
    #[arg(long)]
    pub reason: String,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    if args.tenants.is_empty() && !args.all {
        return Err(CliError::Usage(
            "name tenants with --tenant, or use --all".to_owned(),
        ));
    }
    let engine = ctx.engine().await?;
    let stopped = engine
        .emergency_stop(&args.tenants, args.all, &operator_note(Some(&args.reason)))
        .await?;
    emit(json, &stopped, |stopped| {
        let mut out = String::from("EMERGENCY STOP - migrations disabled\n");
        for s in stopped {
            if s.store_id.is_empty() {
                out.push_str(&format!(
                    "  Tenant {}: NOT STOPPED: {}\n",
                    s.tenant_id,
                    s.error.as_deref().unwrap_or("unknown error")
                ));
                continue;
            }
            out.push_str(&format!(
                "  Tenant {}: writes enabled on {}, dual-write cleared{}{}{}\n",
                s.tenant_id,
                s.store_id,
                s.failed_migration
                    .map_or_else(String::new, |m| format!(", migration {m} failed")),
                s.finished_migration.map_or_else(String::new, |m| format!(
                    ", migration {m} finished (its fence had moved)"
                )),
                if s.reopened_fence {
                    ", source fence reopened"
                } else {
                    ""
                }
            ));
            if let Some(note) = &s.note {
                out.push_str(&format!("    NOTE: {note}\n"));
            }
            if let Some(error) = &s.error {
                out.push_str(&format!("    WARNING: {error}\n"));
            }
        }
        if stopped.iter().all(|s| s.error.is_none()) {
            out.push_str("\nAll listed tenants back to normal operation (proxies follow within their routing poll).");
            if stopped.iter().any(|s| s.finished_migration.is_some()) {
                out.push_str("\nA tenant with a NOTE stays on its migration's target (see above).");
            }
        }
        out
    });
    let incomplete = stopped.iter().filter(|s| s.error.is_some()).count();
    if incomplete > 0 {
        return Err(CliError::Reported(format!(
            "{incomplete} of {} tenants not fully stopped (see above)",
            stopped.len()
        )));
    }
    Ok(())
}
