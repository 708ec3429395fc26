//! `checkpoints migrate MIGRATION --database URL [--names a,b] [--dry-run]`: rewrite
//! eventsource-py `projection_checkpoints` rows from source to target positions, through the
//! migration's position map: just before the first target position of an event past the
//! checkpoint (target positions follow landing order, not source order), so a projection may
//! see some events again but never misses one; exact when that is the checkpoint's own event. The plan is printed first; rows that cannot be translated are refused and left
//! as they are (exit 1). Rows already holding a translated (position, event) pair are skipped,
//! so running it twice is harmless. Stop the projections first: each row is rewritten only if
//! it still holds what the plan read.

use serde::Serialize;
use switchyard_config::url::redact;
use switchyard_store::checkpoints::{Checkpoint, CheckpointDb, CheckpointRewrite};
use uuid::Uuid;

use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Rewrite projection checkpoints to the migration's target positions.
    Migrate(Args),
}

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
    /// The application database holding `projection_checkpoints` (postgres:// or sqlite:).
    #[arg(long)]
    pub database: String,
    /// Only these projections (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub names: Option<Vec<String>>,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Action {
    /// Rewritten to the exact target position of the same event.
    Exact,
    /// Rewritten to a target position below the checkpoint's own event's: events that landed
    /// out of source order are delivered again.
    Inexact,
    /// Already at a translated position: nothing to do.
    AlreadyTranslated,
    /// Never processed anything (no position): nothing to do.
    NoPosition,
    /// No mapped position at or below: left as it is.
    Refused,
}

#[derive(Debug, Serialize)]
struct Row {
    projection_name: String,
    action: Action,
    source_position: Option<i64>,
    target_position: Option<i64>,
    last_event_id: Option<Uuid>,
    detail: String,
}

#[derive(Debug, Serialize)]
struct Plan {
    migration_id: Uuid,
    database: String,
    dry_run: bool,
    applied: bool,
    rows: Vec<Row>,
}

pub async fn run(ctx: &mut Context, command: Command, json: bool) -> Result<(), CliError> {
    let Command::Migrate(args) = command;
    let control = ctx.control().await?;
    let record = control.migration(args.migration).await?;
    let db = CheckpointDb::connect(&args.database)
        .map_err(|e| CliError::Usage(format!("--database {}: {e}", redact(&args.database))))?;
    let result = plan_and_apply(control, record.id, &db, &args).await;
    db.close().await;
    let plan = result?;
    emit(json, &plan, render);
    let refused: Vec<&str> = plan
        .rows
        .iter()
        .filter(|r| matches!(r.action, Action::Refused))
        .map(|r| r.projection_name.as_str())
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(CliError::Reported(format!(
            "checkpoints not translated (left unchanged): {}",
            refused.join(", ")
        )))
    }
}

async fn plan_and_apply(
    control: &switchyard_store::ControlDb,
    migration: Uuid,
    db: &CheckpointDb,
    args: &Args,
) -> Result<Plan, CliError> {
    let checkpoints = db
        .list(args.names.as_deref())
        .await
        .map_err(|e| CliError::Failed(format!("reading projection_checkpoints: {e}")))?;
    if let Some(names) = &args.names {
        let missing: Vec<&str> = names
            .iter()
            .filter(|n| !checkpoints.iter().any(|c| &c.projection_name == *n))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(CliError::Refused(format!(
                "no checkpoint named {}",
                missing.join(", ")
            )));
        }
    }
    let mut rows = Vec::new();
    let mut rewrites = Vec::new();
    for c in checkpoints {
        let row = plan_row(control, migration, &c).await?;
        if let (Action::Exact | Action::Inexact, Some(p), Some(e)) =
            (&row.action, row.target_position, row.last_event_id)
        {
            rewrites.push(CheckpointRewrite {
                from: c.clone(),
                global_position: p,
                last_event_id: e,
            });
        }
        rows.push(row);
    }
    let mut applied = false;
    if !args.dry_run && !rewrites.is_empty() {
        let changed = db
            .rewrite(&rewrites)
            .await
            .map_err(|e| CliError::Failed(format!("rewriting projection_checkpoints: {e}")))?;
        if !changed.is_empty() {
            return Err(CliError::Refused(format!(
                "checkpoints changed while planning (is a projection still running?): {}; \
                 nothing was rewritten — stop the projections and run again",
                changed.join(", ")
            )));
        }
        applied = true;
    }
    Ok(Plan {
        migration_id: migration,
        database: redact(&args.database),
        dry_run: args.dry_run,
        applied,
        rows,
    })
}

async fn plan_row(
    control: &switchyard_store::ControlDb,
    migration: Uuid,
    c: &Checkpoint,
) -> Result<Row, CliError> {
    let mut row = Row {
        projection_name: c.projection_name.clone(),
        action: Action::NoPosition,
        source_position: c.global_position,
        target_position: None,
        last_event_id: c.last_event_id,
        detail: String::new(),
    };
    let Some(position) = c.global_position else {
        row.detail = "never processed an event".to_owned();
        return Ok(row);
    };
    if let Some(event) = c.last_event_id {
        if control.maps_to_target(migration, position, event).await? {
            row.action = Action::AlreadyTranslated;
            row.target_position = Some(position);
            row.detail = format!("already at target position {position} of event {event}");
            return Ok(row);
        }
    }
    match control.translate_with_event(migration, position).await? {
        None => {
            row.action = Action::Refused;
            row.detail = format!(
                "no mapped position at or below {position}: the checkpoint predates the tenant's \
                 first copied event; reset the projection to 0 instead"
            );
        }
        Some((t, event)) => {
            row.target_position = Some(t.target_position);
            row.last_event_id = Some(event);
            if t.exact {
                row.action = Action::Exact;
                row.detail = format!("{position} -> {}", t.target_position);
            } else {
                row.action = Action::Inexact;
                row.detail = format!(
                    "{position} -> {} (inexact: the event there, {event}, has source position {}; events landed out of source order are delivered again)",
                    t.target_position, t.source_position
                );
            }
        }
    }
    Ok(row)
}

fn render(plan: &Plan) -> String {
    let mut out = format!(
        "Checkpoint plan for migration {} on {}{}\n",
        plan.migration_id,
        plan.database,
        if plan.dry_run { " (dry run)" } else { "" }
    );
    for r in &plan.rows {
        out.push_str(&format!(
            "  {:<32} {:<18} {}\n",
            r.projection_name,
            format!("{:?}", r.action).to_lowercase(),
            r.detail
        ));
    }
    out.push_str(if plan.applied {
        "Applied.\n"
    } else if plan.dry_run {
        "Dry run: nothing changed.\n"
    } else {
        "Nothing to apply.\n"
    });
    out
}
