//! `switchyard-control`: parse arguments, set up logging, run the command.

use std::process::ExitCode;

use clap::Parser;
use switchyard_control::cli::{self, Cli};
use switchyard_runtime::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands print their results on stdout; logs stay quiet unless asked for.
    telemetry::init(cli.log_format, "warn");
    cli::run(cli).await
}
