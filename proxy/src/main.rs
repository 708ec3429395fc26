//! `switchyard-proxy`: parse arguments, set up logging, load the config, bind, run until
//! SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use switchyard_config::Config;
use switchyard_proxy::App;
use switchyard_runtime::telemetry::{self, LogFormat};

/// The Switchyard data-plane sidecar. With no config it runs on the embedded default (SQLite
/// files under ./switchyard-data/).
#[derive(Debug, Parser)]
#[command(name = "switchyard-proxy", version)]
struct Args {
    /// Config file (TOML); SWITCHYARD_* variables override it.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Log line format on stderr (also SWITCHYARD_LOG_FORMAT).
    #[arg(
        long,
        env = "SWITCHYARD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format, "info");
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("switchyard-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let (data, admin) = match switchyard_proxy::bind(&config).await {
        Ok(listeners) => listeners,
        Err(e) => {
            eprintln!(
                "switchyard-proxy: cannot bind {} / {}: {e}",
                config.proxy.listen, config.proxy.admin_listen
            );
            return ExitCode::from(1);
        }
    };
    let app = match App::build(config) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("switchyard-proxy: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = app.prepare_embedded().await {
        eprintln!("switchyard-proxy: {e}");
        return ExitCode::from(1);
    }
    if let Err(e) = app.check_default_store(Duration::from_secs(5)).await {
        eprintln!("switchyard-proxy: {e}");
        return ExitCode::from(1);
    }
    let (data_addr, admin_addr) = match (data.local_addr(), admin.local_addr()) {
        (Ok(d), Ok(a)) => (d, a),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("switchyard-proxy: {e}");
            return ExitCode::from(1);
        }
    };
    // One machine-readable line on stdout, so supervisors and tests learn the bound ports.
    println!("switchyard-proxy listening data={data_addr} admin={admin_addr}");
    tracing::info!(%data_addr, %admin_addr, "listening");
    app.run(data, admin, switchyard_runtime::shutdown_signal())
        .await;
    ExitCode::SUCCESS
}
