//! `lag MIGRATION`: the tenant's source events not yet in the target.

use serde_json::json;
use uuid::Uuid;

use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
}

pub async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let engine = ctx.engine().await?;
    let record = engine.control.migration(args.migration).await?;
    let lag = engine.lag(&record).await?;
    emit(
        json,
        &json!({ "lag": lag, "migration_id": record.id, "state": record.state }),
        |_| format!("Current sync lag: {lag} events"),
    );
    Ok(())
}
