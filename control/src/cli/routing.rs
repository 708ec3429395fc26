//! `routing get [TENANT]` and `routing set TENANT STORE`.

use serde::Serialize;
use switchyard_store::{RouteRecord, RouteUpdate, RoutingState};
use uuid::Uuid;

use super::{emit, CliError};
use crate::context::Context;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// A tenant's route (its row, or the default store), or every routing row.
    Get { tenant: Option<Uuid> },
    /// Route a tenant to a store by hand. This moves no data: use `migrate` to move a tenant
    /// with its events. Refused while the tenant has a migration that is not over (pending
    /// included), checked in the same transaction as the change.
    Set { tenant: Uuid, store: String },
    /// Change the default store: where every tenant without a routing row lives, recorded in
    /// the control database. This moves no data: tenants without a row that have events in
    /// the old default lose sight of them (pin them first with `routing set TENANT OLD`).
    /// Refused while such a tenant has a migration that is not over. Every process's config
    /// must then name the new default (a process whose config disagrees refuses to start).
    SetDefault { store: String },
}

/// A route as shown: the row, or the default a tenant without one gets.
#[derive(Debug, Serialize)]
struct Shown {
    tenant_id: Uuid,
    store_id: String,
    migration_state: RoutingState,
    target_store_id: Option<String>,
    active_migration_id: Option<Uuid>,
    epoch: i64,
    has_row: bool,
}

impl From<RouteRecord> for Shown {
    fn from(r: RouteRecord) -> Self {
        Self {
            tenant_id: r.tenant_id,
            store_id: r.store_id,
            migration_state: r.migration_state,
            target_store_id: r.target_store_id,
            active_migration_id: r.active_migration_id,
            epoch: r.epoch,
            has_row: true,
        }
    }
}

fn line(r: &Shown) -> String {
    let mut out = format!("{}\t{}\t{}", r.tenant_id, r.store_id, r.migration_state);
    if let Some(target) = &r.target_store_id {
        out.push_str(&format!("\ttarget={target}"));
    }
    if let Some(id) = &r.active_migration_id {
        out.push_str(&format!("\tmigration={id}"));
    }
    out.push_str(&format!("\tepoch={}", r.epoch));
    if !r.has_row {
        out.push_str("\t(default route: no row)");
    }
    out
}

pub(super) async fn run(ctx: &mut Context, command: Command, json: bool) -> Result<(), CliError> {
    match command {
        Command::Get {
            tenant: Some(tenant),
        } => {
            let default = ctx.default_store().await?;
            let record = ctx
                .control()
                .await?
                .route(tenant)
                .await
                .map_err(CliError::store("control database"))?;
            let shown = record.map_or_else(
                || Shown {
                    tenant_id: tenant,
                    store_id: default,
                    migration_state: RoutingState::Normal,
                    target_store_id: None,
                    active_migration_id: None,
                    epoch: 0,
                    has_row: false,
                },
                Shown::from,
            );
            emit(json, &shown, line);
        }
        Command::Get { tenant: None } => {
            let rows: Vec<Shown> = ctx
                .control()
                .await?
                .routes_since(0)
                .await
                .map_err(CliError::store("control database"))?
                .into_iter()
                .map(Shown::from)
                .collect();
            emit(json, &rows, |rows| {
                rows.iter().map(|r| line(r) + "\n").collect()
            });
        }
        Command::Set { tenant, store } => {
            ctx.store(&store)?;
            let control = ctx.control().await?;
            if let Some(current) = control
                .route(tenant)
                .await
                .map_err(CliError::store("control database"))?
            {
                if current.migration_state != RoutingState::Normal {
                    return Err(CliError::Refused(format!(
                        "tenant {tenant} is migrating (routing state {}, migration {}); \
                         pause, abort or finish the migration first",
                        current.migration_state,
                        current
                            .active_migration_id
                            .map_or_else(|| "?".to_owned(), |m| m.to_string())
                    )));
                }
            }
            // The check that decides: no migration of the tenant that is not over, in the
            // transaction that writes the route.
            let epoch = control
                .set_route_by_hand(&RouteUpdate::normal(tenant, &store))
                .await?;
            let record = control
                .route(tenant)
                .await
                .map_err(CliError::store("control database"))?;
            let shown = record.map(Shown::from);
            emit(json, &shown, |_| {
                format!("tenant {tenant} now routes to {store} (epoch {epoch})")
            });
        }
        Command::SetDefault { store } => {
            ctx.store(&store)?;
            let control = ctx.control().await?;
            let before = control
                .default_store()
                .await
                .map_err(CliError::store("control database"))?;
            let epoch = control.change_default_store(&store).await?;
            emit(
                json,
                &serde_json::json!({ "default_store": store, "previous": before, "epoch": epoch }),
                |_| {
                    format!(
                        "the default store is {store} now (was {}; epoch {epoch}); set \
                         default_store = \"{store}\" in every process's config",
                        before.as_deref().unwrap_or("not recorded")
                    )
                },
            );
        }
    }
    Ok(())
}
