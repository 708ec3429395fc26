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
    default_store: String,
    stores: Vec<StoreReport>,
}

#[derive(Debug, Serialize)]
struct StoreReport {
    id: String,
    backend: &'static str,
    status: &'static str,
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let control = ctx.control().await?.clone();
    control
        .ensure_schema()
        .await
        .map_err(CliError::store("control database"))?;
    // Every process must agree on where row-less tenants live: the first `init` records the
    // config's default store, later ones check it.
    let configured = ctx.config.default_store.clone();
    let recorded = control
        .record_default_store(&configured)
        .await
        .map_err(CliError::store("control database"))?;
    if recorded != configured {
        return Err(CliError::Refused(crate::engine::default_store_mismatch(
            &configured,
            &recorded,
        )));
    }
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
            default_store: configured,
            stores,
        },
        |r| {
            let mut out = format!(
                "control database: {} (default store: {})\n",
                r.control, r.default_store
            );
            for s in &r.stores {
                out.push_str(&format!("store {} ({}): {}\n", s.id, s.backend, s.status));
            }
            out
        },
    );
    Ok(())
}
