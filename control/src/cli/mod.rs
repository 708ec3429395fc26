//! The operator CLI: global flags, the subcommand tree, exit codes (0 ok, 1 refused or failed,
//! 2 usage error) and output (human text, or one JSON document with `--json`).

mod abort;
mod audit;
mod check_config;
mod checkpoints;
mod cleanup;
mod complete;
mod cutover;
mod demo;
mod emergency_stop;
mod init;
mod lag;
mod list;
mod migrate;
mod pause;
mod positions;
mod resume;
mod revert;
mod routing;
mod serve;
mod shared;
mod status;
mod stores;
mod verify;
mod verify_post;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;
use switchyard_config::Config;
use switchyard_runtime::telemetry::LogFormat;

use crate::context::Context;

/// Switchyard control plane: move tenants between event stores with zero downtime.
#[derive(Debug, Parser)]
#[command(
    name = "switchyard-control",
    version = crate::fault::VERSION,
    propagate_version = true
)]
pub struct Cli {
    /// Config file (TOML); SWITCHYARD_* variables override it. Without one: the embedded default.
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log line format on stderr (also SWITCHYARD_LOG_FORMAT).
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the control schema and every configured store's schema.
    Init(init::Args),
    /// Validate a config file and say what is wrong.
    CheckConfig(check_config::Args),
    /// Configured stores and whether each is reachable with its schema.
    #[command(subcommand)]
    Stores(stores::Command),
    /// Read or set tenant routes.
    #[command(subcommand)]
    Routing(routing::Command),
    /// Create a migration and run it.
    #[command(subcommand)]
    Migrate(migrate::Command),
    /// A migration's state, progress, lag, rate and ETA (every active one without an id).
    Status(status::Args),
    /// Migrations, newest first.
    List(list::Args),
    /// Pause a migration at its next batch boundary, keeping progress.
    Pause(pause::Args),
    /// Resume a paused migration from its checkpoint.
    Resume(resume::Args),
    /// Abort a migration: routing back to the source, state rolled_back.
    Abort(abort::Args),
    /// A migration's sync lag in events.
    Lag(lag::Args),
    /// Translate subscription checkpoints from source to target positions.
    #[command(subcommand)]
    Positions(positions::Command),
    /// Rewrite eventsource-py projection checkpoints to target positions.
    #[command(subcommand)]
    Checkpoints(checkpoints::Command),
    /// A migration's audit log.
    Audit(audit::Args),
    /// Cut a dual-writing migration over to its target (automatic rollback on failure).
    Cutover(cutover::Args),
    /// Undo a cutover: cut the tenant back over to the store a migrated migration left (kept
    /// current by its reverse replication), with automatic rollback on failure.
    Revert(revert::Args),
    /// End a migrated migration's undo window; with --cleanup, delete the tenant's rows from
    /// the store it left.
    Complete(complete::Args),
    /// Delete the tenant's rows from the store a migration that is over left behind (an
    /// aborted migration's target, a completed one's source).
    Cleanup(cleanup::Args),
    /// Put tenants back to normal on their source at once; fail their migrations.
    EmergencyStop(emergency_stop::Args),
    /// Run the worker that drives migrations (admin port with /metrics).
    Serve(serve::Args),
    /// Compare the tenant's events in source and target (exit 1 when they differ).
    Verify(verify::Args),
    /// The runbook's post-migration checks, each printed; exit 1 on the first failure.
    VerifyPost(verify_post::Args),
    /// The whole lifecycle on fresh stores: seed, writers, migrate, cut over, verify, summary.
    Demo(demo::Args),
}

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The operation was refused (wrong state, unknown id…): exit 1.
    #[error("{0}")]
    Refused(String),
    /// The operation failed (a database error…): exit 1.
    #[error("{0}")]
    Failed(String),
    /// The outcome was printed and is a failure (e.g. an inconsistent verification): exit 1,
    /// no second JSON document.
    #[error("{0}")]
    Reported(String),
    /// The command line or config is wrong: exit 2.
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Refused(_) | Self::Failed(_) | Self::Reported(_) => ExitCode::from(1),
            Self::Usage(_) => ExitCode::from(2),
        }
    }
}

/// Prints a result as JSON or through its text form.
pub fn emit<T: Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value)
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
    } else {
        let text = text(value);
        if !text.is_empty() {
            println!("{}", text.trim_end());
        }
    }
}

/// Runs the parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let json = cli.json;
    let result = match cli.command {
        Command::CheckConfig(args) => check_config::run(cli.config.as_deref(), &args, json),
        Command::Demo(args) => demo::run(cli.config.as_deref(), &args, json).await,
        command => match Config::load(cli.config.as_deref()) {
            Err(e) => Err(CliError::Usage(e.to_string())),
            Ok(config) => {
                let mut ctx = Context::new(config);
                let result = dispatch(&mut ctx, command, json).await;
                ctx.close().await;
                result
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json && !matches!(e, CliError::Reported(_)) {
                let kind = match e {
                    CliError::Refused(_) => "refused",
                    CliError::Failed(_) | CliError::Reported(_) => "failed",
                    CliError::Usage(_) => "usage",
                };
                println!(
                    "{}",
                    serde_json::json!({ "error": kind, "message": e.to_string() })
                );
            }
            eprintln!("switchyard-control: {e}");
            e.exit_code()
        }
    }
}

async fn dispatch(ctx: &mut Context, command: Command, json: bool) -> Result<(), CliError> {
    match command {
        Command::Init(args) => init::run(ctx, &args, json).await,
        Command::Stores(command) => stores::run(ctx, command, json).await,
        Command::Routing(command) => routing::run(ctx, command, json).await,
        Command::Migrate(command) => migrate::run(ctx, command, json).await,
        Command::Status(args) => status::run(ctx, &args, json).await,
        Command::List(args) => list::run(ctx, &args, json).await,
        Command::Pause(args) => pause::run(ctx, &args, json).await,
        Command::Resume(args) => resume::run(ctx, &args, json).await,
        Command::Abort(args) => abort::run(ctx, &args, json).await,
        Command::Lag(args) => lag::run(ctx, &args, json).await,
        Command::Positions(command) => positions::run(ctx, command, json).await,
        Command::Checkpoints(command) => checkpoints::run(ctx, command, json).await,
        Command::Audit(args) => audit::run(ctx, &args, json).await,
        Command::Cutover(args) => cutover::run(ctx, &args, json).await,
        Command::Revert(args) => revert::run(ctx, &args, json).await,
        Command::Complete(args) => complete::run(ctx, &args, json).await,
        Command::Cleanup(args) => cleanup::run(ctx, &args, json).await,
        Command::EmergencyStop(args) => emergency_stop::run(ctx, &args, json).await,
        Command::Serve(args) => serve::run(ctx, &args).await,
        Command::Verify(args) => verify::run(ctx, &args, json).await,
        Command::VerifyPost(args) => verify_post::run(ctx, &args, json).await,
        Command::CheckConfig(_) | Command::Demo(_) => {
            unreachable!("handled before a context is built")
        }
    }
}
