//! `lag MIGRATION`: the tenant's source events not yet in the target, and the streams whose
//! events can never land there (divergence).

use serde_json::json;
use uuid::Uuid;

use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let engine = ctx.engine().await?;
    let record = engine.control.migration(args.migration).await?;
    let report = engine.lag_report(&record).await?;
    let lag = report.lag;
    emit(
        json,
        &json!({
            "lag": lag,
            "migration_id": record.id,
            "state": record.state,
            "divergent_streams": report.divergent_streams,
        }),
        |_| {
            let mut out = format!("Current sync lag: {lag} events");
            if !report.divergent_streams.is_empty() {
                out.push_str(&format!(
                    "\nDivergent streams (their events can never land in the target): {}",
                    report.divergent_streams.join(", ")
                ));
            }
            out
        },
    );
    Ok(())
}
