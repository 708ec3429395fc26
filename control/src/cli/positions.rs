//! `positions translate MIGRATION --source-position P`: a subscription checkpoint's position
//! in the target (the nearest mapped position at or below when not exact).

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

pub async fn run(ctx: &mut Context, command: Command, json: bool) -> Result<(), CliError> {
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
            "no mapped position at or below {source_position} in migration {migration}: \
             the checkpoint predates the tenant's first event (start the subscription at 0)"
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
                    "{} (inexact: nearest mapped source position at or below is {})",
                    t.target_position, t.source_position
                )
            }
        },
    );
    Ok(())
}
