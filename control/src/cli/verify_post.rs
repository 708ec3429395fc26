//! `verify-post MIGRATION --stream TYPE/ID [--proxy URL]`: the runbook's "verify
//! post-migration" procedure. Each check is printed; the first failure stops the run with exit 1.
//!
//! Checks, in order: the migration is `migrated`; the tenant's route is `normal` on the target;
//! every live proxy (heartbeat in the last 10 s) has applied that route and mirrors nothing for
//! the tenant; a read of the stream through a proxy succeeds; a test append
//! (`SwitchyardPostMigrationCheck`) through the proxy succeeds and landed in the target store,
//! not in the source. Use a stream kept for such checks: the test event stays in it.

use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use serde_json::json;
use switchyard_client::{DataClient, ExpectedVersion, NewEvent, StreamId, StreamQuery, Transport};
use switchyard_store::{MigrationState, RoutingState};
use uuid::Uuid;

use super::{emit, CliError};
use crate::context::Context;

/// A proxy whose heartbeat is older than this is not live.
const LIVE: chrono::Duration = chrono::Duration::seconds(10);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
    /// The stream to read and append a test event to, as TYPE/ID.
    #[arg(long, value_parser = parse_stream)]
    pub stream: (String, Uuid),
    /// The proxy's data-plane URL (default: the first live proxy's, from its heartbeat).
    #[arg(long)]
    pub proxy: Option<String>,
}

fn parse_stream(text: &str) -> Result<(String, Uuid), String> {
    let (kind, id) = text
        .rsplit_once('/')
        .ok_or_else(|| format!("{text:?}: expected TYPE/ID, e.g. Order/6f1c…"))?;
    if kind.is_empty() {
        return Err(format!("{text:?}: the stream type is empty"));
    }
    let id = Uuid::parse_str(id).map_err(|e| format!("{id:?} is not a UUID: {e}"))?;
    Ok((kind.to_owned(), id))
}

#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    passed: bool,
    detail: String,
}

#[derive(Debug, Default, Serialize)]
struct Outcome {
    passed: bool,
    checks: Vec<Check>,
}

impl Outcome {
    /// Records a check; `Err` ends the run at the first failure.
    fn check(&mut self, check: &'static str, result: Result<String, String>) -> Result<(), ()> {
        let passed = result.is_ok();
        let detail = result.unwrap_or_else(|e| e);
        self.checks.push(Check {
            check,
            passed,
            detail,
        });
        if passed {
            Ok(())
        } else {
            Err(())
        }
    }
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let mut outcome = Outcome::default();
    let _ = checks(ctx, args, &mut outcome).await?;
    outcome.passed = outcome.checks.iter().all(|c| c.passed);
    emit(json, &outcome, |o| {
        let mut out = String::from("Post-Migration Verification\n===========================\n");
        for c in &o.checks {
            out.push_str(&format!(
                "[{}] {}: {}\n",
                if c.passed { "ok" } else { "FAILED" },
                c.check,
                c.detail
            ));
        }
        out.push_str(if o.passed {
            "\nVerification PASSED\n"
        } else {
            "\nVerification FAILED\n"
        });
        out
    });
    match outcome.checks.iter().find(|c| !c.passed) {
        None => Ok(()),
        Some(c) => Err(CliError::Reported(format!(
            "post-migration check {:?} failed: {}",
            c.check, c.detail
        ))),
    }
}

async fn checks(
    ctx: &mut Context,
    args: &Args,
    o: &mut Outcome,
) -> Result<Result<(), ()>, CliError> {
    let engine = ctx.engine().await?;
    let record = engine.control.migration(args.migration).await?;
    let tenant = record.tenant_id;
    macro_rules! check {
        ($name:expr, $result:expr) => {
            if o.check($name, $result).is_err() {
                return Ok(Err(()));
            }
        };
    }

    check!(
        "migration state",
        if record.state == MigrationState::Migrated {
            Ok(format!("{} (tenant {tenant})", record.state))
        } else {
            Err(format!("{}, expected migrated", record.state))
        }
    );

    let route = engine
        .control
        .route(tenant)
        .await
        .map_err(|e| CliError::Failed(format!("reading the route: {e}")))?;
    check!(
        "routing",
        match &route {
            Some(r)
                if r.migration_state == RoutingState::Normal
                    && r.store_id == record.target_store_id =>
            {
                Ok(format!(
                    "{} on {} (epoch {})",
                    r.migration_state, r.store_id, r.epoch
                ))
            }
            Some(r) => Err(format!(
                "{} on {}, expected normal on {}",
                r.migration_state, r.store_id, record.target_store_id
            )),
            None => Err(format!("tenant {tenant} has no route")),
        }
    );
    // Reverse replication (the default after a cutover) keeps the store the tenant left
    // current: the test event is then copied back there, as it should be.
    let reverse = route
        .as_ref()
        .is_some_and(|r| r.target_store_id.as_deref() == Some(record.source_store_id.as_str()));
    let epoch = route.map_or(0, |r| r.epoch);

    let now = Utc::now();
    let live: Vec<_> = engine
        .control
        .proxies()
        .await?
        .into_iter()
        .filter(|p| now - p.last_seen < LIVE)
        .collect();
    let mirroring: Vec<&str> = live
        .iter()
        .filter(|p| {
            p.details
                .as_ref()
                .is_some_and(|d| d.mirroring_tenants.contains(&tenant))
        })
        .map(|p| p.proxy_id.as_str())
        .collect();
    let stale: Vec<String> = live
        .iter()
        .filter(|p| p.routing_epoch < epoch)
        .map(|p| format!("{} (epoch {})", p.proxy_id, p.routing_epoch))
        .collect();
    check!(
        "no dual-write mirror",
        if !mirroring.is_empty() {
            Err(format!(
                "still mirroring the tenant: {} (Active (ERROR!))",
                mirroring.join(", ")
            ))
        } else if !stale.is_empty() {
            Err(format!(
                "not yet on routing epoch {epoch}: {}",
                stale.join(", ")
            ))
        } else {
            Ok(format!("cleared on {} live proxies", live.len()))
        }
    );

    let base = match &args.proxy {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let found = live
                .iter()
                .find_map(|p| p.details.as_ref()?.data_url.clone());
            match found {
                Some(url) => url,
                None => {
                    check!(
                        "read",
                        Err::<String, _>(
                            "no live proxy reported a data URL; pass --proxy URL".to_owned()
                        )
                    );
                    return Ok(Ok(()));
                }
            }
        }
    };
    let (kind, id) = &args.stream;
    let stream = StreamId::new(tenant, kind.clone(), *id);
    let proxy = DataClient::with_transport(Transport::default().with_timeout(HTTP_TIMEOUT), &base);

    let read = proxy
        .read_stream(
            &stream,
            &StreamQuery {
                limit: Some(1000),
                ..StreamQuery::default()
            },
        )
        .await;
    check!(
        "read",
        match read {
            Ok(page) if page.store_id == record.target_store_id => Ok(format!(
                "read {} events of {kind}/{id} from {} through {base}",
                page.events.len(),
                page.store_id
            )),
            Ok(page) => Err(format!(
                "the read was served by {}, expected {}",
                page.store_id, record.target_store_id
            )),
            Err(e) => Err(format!("{base}: {e}")),
        }
    );

    let check_event = NewEvent::new(
        "SwitchyardPostMigrationCheck",
        json!({ "migration_id": record.id }),
    );
    let event_id = check_event.event_id;
    let append = proxy
        .append(&stream, ExpectedVersion::Any, &[check_event])
        .await;
    check!(
        "write",
        match append {
            Ok(appended) if appended.store_id == record.target_store_id => Ok(format!(
                "appended test event {event_id} at version {} via store {}",
                appended.last_version, appended.store_id
            )),
            Ok(appended) => Err(format!(
                "the test event was acknowledged by store {}, expected {}",
                appended.store_id, record.target_store_id
            )),
            Err(e) => Err(format!("{base}: {e}")),
        }
    );

    let source = engine.store(&record.source_store_id)?;
    let target = engine.store(&record.target_store_id)?;
    let ids = [event_id];
    let (in_source, in_target) =
        tokio::try_join!(source.positions_of(&ids), target.positions_of(&ids))
            .map_err(|e| CliError::Failed(format!("looking up the test event: {e}")))?;
    check!(
        "write landed on the target",
        match (in_source.is_empty(), in_target.get(&event_id)) {
            (true, Some(p)) => Ok(format!(
                "in {} at global position {p}, not in {}",
                record.target_store_id, record.source_store_id
            )),
            (false, Some(p)) if reverse => Ok(format!(
                "in {} at global position {p}, and copied back to {} by reverse replication",
                record.target_store_id, record.source_store_id
            )),
            (false, _) => Err(format!(
                "the test event landed in the source store {}",
                record.source_store_id
            )),
            (true, None) => Err(format!(
                "the test event is not in the target store {}",
                record.target_store_id
            )),
        }
    );
    Ok(Ok(()))
}
