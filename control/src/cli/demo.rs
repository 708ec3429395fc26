//! `demo [--events N] [--writers W] [--keep] [--store-url URL]`: the whole lifecycle on fresh
//! stores in one process — seed, writers through an in-process proxy, migrate with a progress
//! bar, cut over under load, verify, and a summary checked against what the writers got
//! acknowledged. SQLite files under ./switchyard-data/ by default; `--store-url` (a PostgreSQL
//! server) or `--config` (its stores) for PostgreSQL.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard_config::Config;

use super::migrate::Progress;
use super::{emit, CliError};
use crate::demo::{self, Options, Stores};
use crate::engine::Report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Events to seed in the tenant before the migration starts.
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    /// Writers appending through the proxy during the whole migration.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Keep the demo's SQLite folder or PostgreSQL databases afterwards.
    #[arg(long)]
    pub keep: bool,
    /// A PostgreSQL server (`postgres://user@host:port/db`): the demo creates its control
    /// database and two stores there (dropped at the end unless --keep).
    /// With the global `--config FILE` instead: that file's stores (the default store is the
    /// source, the next one the target) with a fresh tenant; nothing is created or dropped.
    #[arg(long)]
    pub store_url: Option<String>,
}

pub async fn run(global_config: Option<&Path>, args: &Args, json: bool) -> Result<(), CliError> {
    if args.events == 0 || args.writers == 0 {
        return Err(CliError::Usage(
            "--events and --writers must be at least 1".to_owned(),
        ));
    }
    let stores = match (&args.store_url, global_config) {
        (Some(_), Some(_)) => {
            return Err(CliError::Usage(
                "give --store-url or --config, not both".to_owned(),
            ))
        }
        (Some(url), None) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(CliError::Usage(format!(
                    "--store-url must be a postgres:// URL (the embedded default needs none): {}",
                    switchyard_config::url::redact(url)
                )));
            }
            Stores::Postgres {
                server_url: url.clone(),
            }
        }
        (None, Some(path)) => Stores::Config(Box::new(
            Config::load(Some(path)).map_err(|e| CliError::Usage(e.to_string()))?,
        )),
        (None, None) => Stores::Embedded {
            parent: demo::embedded_parent().to_owned(),
        },
    };
    let options = Options {
        events: args.events,
        writers: args.writers,
        keep: args.keep,
        stores,
        writer_pause: Duration::from_millis(5),
        after_cutover: Duration::from_millis(500),
    };
    let display = Arc::new(Progress::new(std::io::stderr().is_terminal()));
    let shown = Arc::clone(&display);
    let progress: Arc<dyn Fn(&Report) + Send + Sync> = Arc::new(move |r: &Report| shown.show(r));
    let summary = demo::run(&options, progress).await;
    display.finish();
    let summary = summary.map_err(|e| match e {
        demo::DemoError::Setup(m) => CliError::Failed(format!("demo setup: {m}")),
        demo::DemoError::Failed(m) => CliError::Failed(format!("demo: {m}")),
    })?;
    emit(json, &summary, demo::text);
    if summary.ok {
        Ok(())
    } else {
        Err(CliError::Failed(
            "the demo's checks failed (see the summary)".to_owned(),
        ))
    }
}
