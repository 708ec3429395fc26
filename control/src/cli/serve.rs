//! `serve`: run the migration worker (see `crate::serve`) until SIGTERM or SIGINT.

use super::CliError;
use crate::context::Context;
use crate::engine::{default_worker_id, Engine};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// This replica's id in claims and audit rows (default: host:pid).
    #[arg(long)]
    pub worker_id: Option<String>,
}

pub(super) async fn run(ctx: &mut Context, args: &Args) -> Result<(), CliError> {
    let addr = ctx.config.control.admin_listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Failed(format!("cannot bind {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let worker = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let engine =
        Engine::new(&ctx.config, worker.clone()).map_err(|e| CliError::Failed(e.to_string()))?;
    engine
        .prepare_embedded()
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    engine.check_default_store().await?;
    // One machine-readable line on stdout, so supervisors and tests learn the bound port.
    println!("switchyard-control serve listening admin={bound} worker={worker}");
    tracing::info!(admin_addr = %bound, worker, "serving");
    crate::serve::run(engine, listener, switchyard_runtime::shutdown_signal()).await;
    Ok(())
}
