//! `abort MIGRATION --reason R`: routing back to the source, mirror off, state rolled_back,
//! reason in the audit log. Target data is left (start again with --reset-target).

use uuid::Uuid;

use super::shared::{operator_note, Status};
use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
    /// Why, for the audit log (required).
    #[arg(long)]
    pub reason: String,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let engine = ctx.engine().await?;
    let record = engine
        .abort(args.migration, &operator_note(Some(&args.reason)))
        .await?;
    let status = Status::of(&engine, record).await;
    emit(json, &status, |s| {
        format!(
            "Migration aborted successfully\nNew state: {}\nRouting: tenant {} back on {} (normal)\n",
            s.state, s.tenant_id, s.source_store_id
        )
    });
    Ok(())
}
