//! `pause MIGRATION`: stop copy or tail at the next batch boundary, keeping progress; a
//! dual-writing tenant's writes go to the source only until `resume`.

use uuid::Uuid;

use super::shared::{operator_note, Status};
use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: Option<String>,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let engine = ctx.engine().await?;
    let record = engine
        .pause(args.migration, &operator_note(args.reason.as_deref()))
        .await?;
    let status = Status::of(&engine, record).await;
    emit(json, &status, |s| {
        format!(
            "Migration paused successfully\nNew state: {}\n\n{}",
            s.state,
            s.text()
        )
    });
    Ok(())
}
