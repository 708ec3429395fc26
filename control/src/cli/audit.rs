//! `audit MIGRATION`: every operator action and state change of a migration, oldest first.

use uuid::Uuid;

use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let control = ctx.control().await?;
    control.migration(args.migration).await?;
    let entries = control.audit_log(args.migration).await?;
    emit(json, &entries, |entries| {
        let mut out = String::from("AT\tACTOR\tACTION\tFROM\tTO\tREASON\n");
        for e in entries {
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}\n",
                e.at.to_rfc3339(),
                e.actor,
                e.action,
                e.from_state.map_or("-", |s| s.as_str()),
                e.to_state.map_or("-", |s| s.as_str()),
                e.reason.as_deref().unwrap_or("-")
            ));
        }
        out
    });
    Ok(())
}
