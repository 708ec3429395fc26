//! `stores list` and `stores check`.

use std::time::Duration;

use serde::Serialize;
use switchyard_config::url::redact;
use switchyard_store::SchemaStatus;

use super::{emit, CliError};
use crate::context::Context;

/// How long `stores check` waits for each store.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The configured stores.
    List,
    /// Whether each store is reachable and has Switchyard's schema (exit 1 if any is not).
    Check,
}

#[derive(Debug, Serialize)]
struct StoreRow {
    id: String,
    url: String,
    default: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reachable: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<SchemaStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub async fn run(ctx: &mut Context, command: Command, json: bool) -> Result<(), CliError> {
    let mut rows: Vec<StoreRow> = ctx
        .config
        .stores
        .iter()
        .map(|s| StoreRow {
            id: s.id.clone(),
            url: redact(&s.url),
            default: s.id == ctx.config.default_store,
            reachable: None,
            schema: None,
            error: None,
        })
        .collect();
    let check = matches!(command, Command::Check);
    if check {
        for row in &mut rows {
            let store = ctx.store(&row.id)?;
            match tokio::time::timeout(CHECK_TIMEOUT, store.schema_status()).await {
                Ok(Ok(status)) => {
                    row.reachable = Some(true);
                    row.schema = Some(status);
                }
                Ok(Err(e)) => {
                    row.reachable = Some(false);
                    row.error = Some(e.to_string());
                }
                Err(_) => {
                    row.reachable = Some(false);
                    row.error = Some(format!("no answer within {CHECK_TIMEOUT:?}"));
                }
            }
        }
    }
    emit(json, &rows, |rows| {
        let mut out = String::new();
        for r in rows {
            out.push_str(&format!(
                "{}{}\t{}",
                r.id,
                if r.default { " (default)" } else { "" },
                r.url
            ));
            match (&r.reachable, &r.schema, &r.error) {
                (Some(true), Some(schema), _) => {
                    out.push_str(&format!("\treachable\tschema: {}", schema_text(*schema)))
                }
                (_, _, Some(e)) => out.push_str(&format!("\tUNREACHABLE: {e}")),
                _ => {}
            }
            out.push('\n');
        }
        out
    });
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| check && (r.reachable != Some(true) || r.schema != Some(SchemaStatus::Ready)))
        .map(|r| r.id.as_str())
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "not ready: {} (run `switchyard-control init` for a missing schema)",
            bad.join(", ")
        )))
    }
}

fn schema_text(status: SchemaStatus) -> &'static str {
    match status {
        SchemaStatus::Empty => "empty (run init)",
        SchemaStatus::NeedsInit => "eventsource-py store without Switchyard objects (run init)",
        SchemaStatus::Ready => "ready",
    }
}
