//! `list [--active]`: migrations, newest first.

use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only migrations that have not ended.
    #[arg(long)]
    pub active: bool,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let records = ctx.control().await?.migrations(args.active).await?;
    emit(json, &records, |records| {
        let mut out = String::from("ID\tTENANT\tSTATE\tSOURCE\tTARGET\tCOPIED/TOTAL\tCREATED\n");
        for r in records {
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}/{}\t{}\n",
                r.id,
                r.tenant_id,
                r.state,
                r.source_store_id,
                r.target_store_id,
                r.events_copied,
                r.events_total,
                r.created_at.to_rfc3339()
            ));
        }
        out
    });
    Ok(())
}
