//! `complete MIGRATION [--cleanup]`: end a migrated migration's undo window (`finished_at`,
//! audited); with `--cleanup`, then delete the tenant's rows from the store it left, in
//! throttled batches, in the foreground (resumable: run it again, or let `serve` continue).

use switchyard_store::CleanupRole;
use uuid::Uuid;

use super::shared::{drive_cleanup, operator_note, Status};
use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
    /// Then delete the tenant's rows from the store it left (refused while it is routed there).
    #[arg(long)]
    pub cleanup: bool,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: Option<String>,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let engine = ctx.engine().await?;
    let note = operator_note(args.reason.as_deref());
    let (record, newly) = engine.complete(args.migration, args.cleanup, &note).await?;
    if args.cleanup {
        engine
            .start_cleanup(&record, CleanupRole::Source, &note)
            .await?;
        drive_cleanup(&engine, record.id, &note).await?;
    }
    let record = engine.control.migration(args.migration).await?;
    let status = Status::of(&engine, record).await;
    emit(json, &status, |s| {
        let mut out = format!(
            "Migration {} {}\n{} is no longer kept current for tenant {}; revert is no longer possible\n",
            s.id,
            if newly { "completed" } else { "was already completed" },
            s.source_store_id,
            s.tenant_id
        );
        if let Some(c) = &s.cleanup {
            out.push_str(&format!(
                "Cleanup of {}: {} rows of the tenant deleted, {} left\n",
                c.store_id, c.rows_deleted, c.rows_left
            ));
        }
        out
    });
    Ok(())
}
