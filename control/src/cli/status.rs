//! `status [MIGRATION] [--watch]`: the runbook's status fields plus lag, rate and ETA; without
//! an id, every active migration.

use std::io::IsTerminal;
use std::time::Duration;

use uuid::Uuid;

use super::shared::Status;
use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Option<Uuid>,
    /// Refresh every second until the migration ends (Ctrl-C to stop watching).
    #[arg(long)]
    pub watch: bool,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let engine = ctx.engine().await?;
    let tty = std::io::stdout().is_terminal();
    loop {
        let done = match args.migration {
            Some(id) => {
                let mut record = engine.control.migration(id).await?;
                // A cutover whose driver died is finished (or rolled back) by the next command.
                if engine.recover_cutover(&record).await?.is_some() {
                    record = engine.control.migration(id).await?;
                }
                let active = record.is_active();
                let status = Status::of(&engine, record).await;
                if args.watch && tty && !json {
                    print!("\x1b[2J\x1b[H");
                }
                emit(json, &status, Status::text);
                !active
            }
            None => {
                let mut all = Vec::new();
                for record in engine.control.migrations(true).await? {
                    all.push(Status::of(&engine, record).await);
                }
                emit(json, &all, |all| {
                    if all.is_empty() {
                        "no active migrations".to_owned()
                    } else {
                        all.iter().map(Status::text).collect::<Vec<_>>().join("\n")
                    }
                });
                false
            }
        };
        if !args.watch || done {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
