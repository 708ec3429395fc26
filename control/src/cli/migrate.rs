//! `migrate start`: create a migration and run it in the foreground with a progress display
//! until the tenant is dual-writing with no lag, or leave it to `serve` with `--detach`.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_store::MigrationState;
use tokio::sync::watch;
use uuid::Uuid;

use super::shared::operator_note;
use super::{emit, CliError};
use crate::context::Context;
use crate::engine::{CutoverMode, Driven, Report, StartRequest};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a migration of TENANT to STORE and run it.
    Start(StartArgs),
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    #[arg(long)]
    pub tenant: Uuid,
    /// The target store id.
    #[arg(long)]
    pub to: String,
    /// Events per copy batch (default: control.batch_size).
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Copy rate limit in events per second; 0 = unlimited (default: control.max_rate).
    #[arg(long)]
    pub max_rate: Option<u64>,
    /// Delete the tenant's events already in the target first (left by an earlier migration).
    #[arg(long)]
    pub reset_target: bool,
    /// `manual`: the operator runs `cutover`; `auto`: cut over once the lag reaches 0.
    #[arg(long, value_enum, default_value = "manual")]
    pub cutover: CutoverMode,
    /// No reverse replication after the cutover: the store the tenant leaves is not kept
    /// current (default: control.reverse_replication).
    #[arg(long)]
    pub no_reverse: bool,
    /// Create the migration and return; `serve` runs it.
    #[arg(long)]
    pub detach: bool,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: Option<String>,
}

pub(super) async fn run(ctx: &mut Context, command: Command, json: bool) -> Result<(), CliError> {
    let Command::Start(args) = command;
    let engine = ctx.engine().await?;
    let request = StartRequest {
        tenant_id: args.tenant,
        target_store_id: args.to.clone(),
        batch_size: args.batch_size,
        max_rate: args.max_rate,
        reset_target: args.reset_target,
        cutover: args.cutover,
        no_reverse: args.no_reverse,
        drive: !args.detach,
    };
    let record = engine
        .start(&request, &operator_note(args.reason.as_deref()))
        .await?;
    if !json {
        eprintln!(
            "migration {} created: tenant {} from {} to {}",
            record.id, record.tenant_id, record.source_store_id, record.target_store_id
        );
    }
    if args.detach {
        emit(
            json,
            &json!({"id": record.id, "tenant_id": record.tenant_id, "state": record.state}),
            |_| {
                format!("{}\n(detached: `switchyard-control serve` runs it; watch it with `switchyard-control status {} --watch`)", record.id, record.id)
            },
        );
        return Ok(());
    }

    // Caught up means: every transaction that had committed when the command started is below
    // the tail's horizon (a lag of 0 alone does not count rows younger than the settle time,
    // nor rows a long transaction elsewhere in the cluster keeps above the horizon).
    let source = engine.store(&record.source_store_id)?;
    let ceiling = source
        .horizon_ceiling()
        .await
        .map_err(|e| CliError::Failed(format!("store {}: {e}", source.id())))?;
    // One stop signal: Ctrl-C (detach; the checkpoint stays and `serve` resumes) or catching
    // up (the mirror and `serve` keep the target current from there).
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = std::sync::Arc::new(stop_tx);
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (stop_tx, interrupted) = (
            std::sync::Arc::clone(&stop_tx),
            std::sync::Arc::clone(&interrupted),
        );
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, std::sync::atomic::Ordering::Release);
                let _ = stop_tx.send(true);
            }
        });
    }
    let display = Progress::new(!json && std::io::stderr().is_terminal());
    let caught_up = std::sync::atomic::AtomicBool::new(false);
    let report = |r: &Report| {
        display.show(r);
        if args.cutover == CutoverMode::Manual
            && r.record.state == MigrationState::DualWrite
            && r.lag == Some(0)
            && r.record.tail_horizon >= Some(ceiling)
        {
            caught_up.store(true, std::sync::atomic::Ordering::Release);
            let _ = stop_tx.send(true);
        }
    };
    let driven = engine.drive(record.id, &stop_rx, &report).await;
    display.finish();
    let driven = driven?;
    let record = engine.control.migration(record.id).await?;
    engine.control.close().await;
    let interrupted = interrupted.load(std::sync::atomic::Ordering::Acquire);
    emit(
        json,
        &json!({"id": record.id, "tenant_id": record.tenant_id, "state": record.state}),
        |_| {
            let mut out = format!(
                "{}\nstate: {}  copied: {}/{}",
                record.id, record.state, record.events_copied, record.events_total
            );
            if caught_up.load(std::sync::atomic::Ordering::Acquire) {
                out.push_str(&format!(
                "\ncaught up (lag 0); the proxies mirror new writes. Cut over with `switchyard-control cutover {}`; \
                 keep `switchyard-control serve` running to tail writes that bypass the proxies.",
                record.id
            ));
            } else if interrupted {
                out.push_str("\ninterrupted: the migration keeps its checkpoint; `switchyard-control serve` resumes it.");
            }
            out
        },
    );
    match driven {
        Driven::Settled(MigrationState::Failed) => Err(CliError::Failed(format!(
            "migration {} failed: {}",
            record.id,
            record.error_message.unwrap_or_default()
        ))),
        Driven::ClaimLost => Err(CliError::Refused(format!(
            "migration {} is being driven by {} (a `serve` replica)",
            record.id,
            record.claimed_by.unwrap_or_default()
        ))),
        _ => Ok(()),
    }
}

/// A one-line progress display on a terminal, plain lines (at most one a second) otherwise.
pub(super) struct Progress {
    tty: bool,
    last: Mutex<Option<Instant>>,
}

impl Progress {
    pub(super) fn new(tty: bool) -> Self {
        Self {
            tty,
            last: Mutex::new(None),
        }
    }

    pub(super) fn show(&self, r: &Report) {
        let mut last = self.last.lock().expect("not poisoned");
        if !self.tty && last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(Instant::now());
        let rec = &r.record;
        #[allow(clippy::cast_precision_loss)]
        let eta = if r.rate > 0.0 && rec.state == MigrationState::BulkCopy {
            format!(
                " ETA {:.0}s",
                (rec.events_total - rec.events_copied).max(0) as f64 / r.rate
            )
        } else {
            String::new()
        };
        let lag = r.lag.map_or_else(String::new, |l| format!(" lag {l}"));
        let width = 30usize;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let filled = ((rec.progress_percentage() / 100.0) * width as f64) as usize;
        let line = format!(
            "{:<10} [{}{}] {:5.1}% {}/{} {:.0} ev/s{eta}{lag}",
            rec.state.as_str(),
            "#".repeat(filled.min(width)),
            "-".repeat(width - filled.min(width)),
            rec.progress_percentage(),
            rec.events_copied,
            rec.events_total,
            r.rate
        );
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    pub(super) fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
