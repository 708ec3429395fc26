//! `list [--active]`: migrations, newest first, with whether each can still be undone.

use serde::Serialize;
use switchyard_store::{MigrationRecord, MigrationState};

use super::shared::reverse_route;
use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only migrations that have not ended.
    #[arg(long)]
    pub active: bool,
}

/// A listed migration: its record, and for one that cut over with reverse replication still
/// running (the store the tenant left kept current: `revert` can undo it), its reverse lag.
#[derive(Debug, Serialize)]
struct Listed {
    #[serde(flatten)]
    record: MigrationRecord,
    reverse_replication: bool,
    /// The tenant's events in the store it lives in beyond those in the store it left; `None`
    /// without reverse replication, or when a store did not answer.
    reverse_lag: Option<i64>,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let records = ctx.control().await?.migrations(args.active).await?;
    // Only a migrated, uncompleted migration can be under reverse replication: the stores are
    // asked (two counts) for those alone, so `list` stays a control-database read otherwise.
    let undoable = |r: &MigrationRecord| {
        r.state == MigrationState::Migrated && r.finished_at.is_none() && r.reverse_replication()
    };
    let engine = if records.iter().any(undoable) {
        Some(ctx.engine().await?)
    } else {
        None
    };
    let mut listed = Vec::with_capacity(records.len());
    for record in records {
        let reverse = match &engine {
            Some(engine) if undoable(&record) => reverse_route(engine, &record).await,
            _ => None,
        };
        let reverse_lag = match (&engine, &reverse) {
            (Some(engine), Some(route)) => engine.reverse_lag(route).await.ok(),
            _ => None,
        };
        listed.push(Listed {
            record,
            reverse_replication: reverse.is_some(),
            reverse_lag,
        });
    }
    emit(json, &listed, |listed| {
        let mut out =
            String::from("ID\tTENANT\tSTATE\tSOURCE\tTARGET\tCOPIED/TOTAL\tCREATED\tUNDO\n");
        for l in listed {
            let r = &l.record;
            let undo = match (l.reverse_replication, l.reverse_lag) {
                (false, _) => "-".to_owned(),
                (true, Some(lag)) => format!("revert (reverse lag {lag})"),
                (true, None) => "revert (reverse lag unknown)".to_owned(),
            };
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}/{}\t{}\t{}\n",
                r.id,
                r.tenant_id,
                r.state,
                r.source_store_id,
                r.target_store_id,
                r.events_copied,
                r.events_total,
                r.created_at.to_rfc3339(),
                undo
            ));
        }
        out
    });
    Ok(())
}
