//! `cleanup MIGRATION`: delete the tenant's rows from the store a migration that is over left
//! behind — an aborted or failed migration's target (what the copy and the mirror put there),
//! or a completed migration's source — in throttled batches, in the foreground. Refused while
//! the tenant is routed there or (for a target) has an active migration; resumable.

use uuid::Uuid;

use super::shared::{drive_cleanup, operator_note, Status};
use super::{emit, CliError};
use crate::context::Context;
use crate::engine::Engine;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: Option<String>,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let engine = ctx.engine().await?;
    let note = operator_note(args.reason.as_deref());
    let record = engine.control.migration(args.migration).await?;
    let role = Engine::cleanup_role(&record)?;
    engine.start_cleanup(&record, role, &note).await?;
    drive_cleanup(&engine, record.id, &note).await?;
    let record = engine.control.migration(args.migration).await?;
    let status = Status::of(&engine, record).await;
    emit(json, &status, |s| match &s.cleanup {
        Some(c) => format!(
            "Cleanup of {} ({}) done: {} rows of tenant {} deleted\n",
            c.store_id, c.role, c.rows_deleted, s.tenant_id
        ),
        None => String::new(),
    });
    Ok(())
}
