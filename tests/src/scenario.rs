//! Scenario setup: writers appending through proxies while a test runs ([`Writers`], recording
//! each acknowledged append as [`Acked`]), tenants seeded straight into a store, and a
//! migration started, or driven to dual-write.

use std::time::Duration;

use anyhow::bail;
use serde_json::json;
use sqlx::Connection;
use switchyard_client::{Ack, Load, LoadPlan, NewEvent as ClientEvent, Pacing};
use switchyard_store::{EventStore, NewEvent, StreamRef};
use uuid::Uuid;

use crate::*;

/// Writers appending through proxies until stopped (`switchyard_client`'s [`Load`]), each
/// retrying an append with its event ids until it is acknowledged; what was acknowledged is
/// recorded as [`Acked`].
#[derive(Debug)]
pub struct Writers {
    load: Load,
}

/// One acknowledged append: which events, in which stream, at which versions, on which store.
#[derive(Debug, Clone)]
pub struct Acked {
    pub aggregate_id: Uuid,
    pub event_ids: Vec<Uuid>,
    pub first_version: i64,
    pub store_id: String,
}

impl From<&Ack> for Acked {
    fn from(ack: &Ack) -> Self {
        Self {
            aggregate_id: ack.aggregate_id,
            event_ids: ack.event_ids.clone(),
            first_version: ack.first_version,
            store_id: ack.store_id.clone(),
        }
    }
}

/// The load plan of the harness's writers: `Load` streams of `tenant`, `streams_each` per
/// writer written round robin with `expected_version`, one or two `Written` events per
/// append, `pause` between appends.
pub fn load_plan(tenant: Uuid, streams_each: usize, pause: Duration) -> LoadPlan {
    LoadPlan {
        streams: streams_each,
        pacing: Pacing::Closed { pause },
        ..LoadPlan::new(tenant)
    }
    .with_events(|_, seq| {
        (0..1 + (seq + 1) % 2)
            .map(|i| ClientEvent::new("Written", json!({ "i": i, "note": "x" })))
            .collect()
    })
}

impl Writers {
    /// `n` writers for `tenant`, writer `i` through `proxies[i % len]`, each on its own streams
    /// (`streams_each`, round robin) with `expected_version`, pausing `pause` between appends.
    pub fn start(
        http: &Http,
        proxies: &[String],
        tenant: Uuid,
        n: usize,
        streams_each: usize,
        pause: Duration,
    ) -> Self {
        let clients: Vec<_> = proxies.iter().map(|base| http.data(base)).collect();
        Self {
            load: Load::start(&clients, load_plan(tenant, streams_each, pause), n),
        }
    }

    /// Appends acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.load.acked()
    }

    /// Stops the writers and returns every acknowledged append; an append refused for good
    /// (not retryable) fails it.
    pub async fn stop(self) -> Result<Vec<Acked>> {
        let report = self.load.stop().await;
        if let Some(failure) = report.failed.first() {
            bail!(
                "{} appends refused, the first: {}",
                report.failed.len(),
                failure.error
            );
        }
        Ok(report.acked.iter().map(Acked::from).collect())
    }
}

/// Starts a migration of `tenant` to `to` (`--detach`, left to `serve`; `extra` arguments
/// added, e.g. `--cutover auto`); answers its id.
pub fn start_migration(env: &Env, tenant: Uuid, to: &str, extra: &[&str]) -> Result<String> {
    let tenant = tenant.to_string();
    let mut args = vec![
        "migrate", "start", "--tenant", &tenant, "--to", to, "--detach",
    ];
    args.extend_from_slice(extra);
    let started = env.control_json(&args)?;
    Ok(started["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no id in {started}"))?
        .to_owned())
}

/// Starts a migration of `tenant` to `to` ([`start_migration`]) and waits for dual-write at
/// lag 0; answers its id.
pub async fn migrate_to_dual_write(
    env: &Env,
    tenant: Uuid,
    to: &str,
    extra: &[&str],
) -> Result<String> {
    let id = start_migration(env, tenant, to, extra)?;
    caught_up(env, &id, Duration::from_secs(300)).await?;
    Ok(id)
}

/// Waits until migration `id` is dual-writing with lag 0; a timeout names the last status seen.
pub async fn caught_up(env: &Env, id: &str, timeout: Duration) -> Result<()> {
    let last = std::sync::Mutex::new(serde_json::Value::Null);
    let waited = wait_for_every(timeout, Duration::from_millis(250), || async {
        let s = env.control_json(&["status", id])?;
        let done = s["state"] == "dual_write" && s["lag"] == 0;
        *last.lock().expect("status lock") = s;
        Ok(done)
    })
    .await;
    waited.map_err(|e| {
        anyhow::anyhow!(
            "migration {id}: {e}; last status: {}",
            last.lock().expect("status lock")
        )
    })
}

/// Seeds `events` events of `tenant` in a PostgreSQL store (streams of 100 versions, ~80-byte
/// payloads) with one `INSERT … SELECT`: fast for the big tenants the end-to-end tests need.
pub async fn seed_sql(url: &str, tenant: Uuid, events: i64) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::query(
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, actor_id, version, timestamp, payload)
         SELECT gen_random_uuid(),
                (md5($1::text || (g / 100)::text))::uuid,
                'Seed', 'Seeded', $1, 'seeder', (g % 100) + 1, now(),
                jsonb_build_object('g', g, 'pad', repeat('x', 60))
           FROM generate_series(0, $2 - 1) AS g",
    )
    .bind(tenant)
    .bind(events)
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// Seeds `streams` streams of `per_stream` events for `tenant` straight into a store.
pub async fn seed(url: &str, tenant: Uuid, streams: usize, per_stream: usize) -> Result<()> {
    let store = EventStore::connect("seed", url, 4)?;
    for _ in 0..streams {
        let aggregate_id = Uuid::new_v4();
        let events: Vec<NewEvent> = (0..per_stream)
            .map(|i| {
                let payload = serde_json::value::RawValue::from_string(
                    json!({"i": i, "pad": "x".repeat(40)}).to_string(),
                )?;
                Ok(NewEvent::new(
                    Uuid::new_v4(),
                    "Seeded",
                    payload,
                    Some("seeder".into()),
                    None,
                ))
            })
            .collect::<Result<_>>()?;
        store
            .append(
                StreamRef {
                    tenant_id: tenant,
                    aggregate_type: "Seed",
                    aggregate_id,
                },
                Some(0),
                &events,
            )
            .await?;
    }
    store.close().await;
    Ok(())
}
