//! `positions translate MIGRATION --source-position P`: a subscription checkpoint's position
//! in the target: just before the first target position of an event past P, so a subscriber
//! reading in position order (eventsource-py's own stores, SQL) may see some events again but
//! never misses one (target positions follow landing order). A consumer of the proxy's tenant
//! feed, which is in `(txid, position)` order, keeps its old cursor and sends `after_store`
//! instead (docs/architecture.md, "The tenant feed").

use serde_json::json;
use uuid::Uuid;

use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Translate a source global position to the target's.
    Translate {
        migration: Uuid,
        #[arg(long)]
        source_position: i64,
    },
}

pub(super) async fn run(ctx: &mut Context, command: Command, json: bool) -> Result<(), CliError> {
    let Command::Translate {
        migration,
        source_position,
    } = command;
    let control = ctx.control().await?;
    control.migration(migration).await?;
    let found = control
        .translate_position(migration, source_position)
        .await?;
    let Some(t) = found else {
        return Err(CliError::Refused(format!(
            "no target position in migration {migration} precedes every event past \
             {source_position}: start the subscription at 0"
        )));
    };
    emit(
        json,
        &json!({
            "migration_id": migration,
            "source_position": source_position,
            "mapped_source_position": t.source_position,
            "target_position": t.target_position,
            "exact": t.exact,
        }),
        |_| {
            if t.exact {
                format!("{}", t.target_position)
            } else {
                format!(
                    "{} (inexact: the event there has source position {}; events landed out of \
                     source order are delivered again)",
                    t.target_position, t.source_position
                )
            }
        },
    );
    Ok(())
}
