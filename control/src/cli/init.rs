//! `init`: create or upgrade the control schema and every configured store's schema
//! (idempotent; adds Switchyard's objects to stores eventsource-py created).

use serde::Serialize;

use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only these stores (default: every configured store).
    #[arg(long = "store")]
    pub stores: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    control: &'static str,
    stores: Vec<StoreReport>,
}

#[derive(Debug, Serialize)]
struct StoreReport {
    id: String,
    backend: &'static str,
    status: &'static str,
}

pub async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    ctx.control()
        .await?
        .ensure_schema()
        .await
        .map_err(CliError::store("control database"))?;
    let ids = if args.stores.is_empty() {
        ctx.store_ids()
    } else {
        args.stores.clone()
    };
    let mut stores = Vec::new();
    for id in ids {
        let store = ctx.store(&id)?;
        store.ensure_schema().await.map_err(CliError::store(&id))?;
        stores.push(StoreReport {
            id,
            backend: store.backend_name(),
            status: "ready",
        });
    }
    emit(
        json,
        &Report {
            control: "ready",
            stores,
        },
        |r| {
            let mut out = format!("control database: {}\n", r.control);
            for s in &r.stores {
                out.push_str(&format!("store {} ({}): {}\n", s.id, s.backend, s.status));
            }
            out
        },
    );
    Ok(())
}
