//! Scenario setup: writers appending through proxies while a test runs ([`Writers`], recording
//! each acknowledged append as [`Acked`]), and tenants seeded straight into a store.

use std::time::Duration;

use anyhow::{bail, Context as _};
use http::StatusCode;
use serde_json::json;
use sqlx::Connection;
use switchyard_store::{EventStore, NewEvent, StreamRef};
use uuid::Uuid;

use crate::*;

/// Writers appending through proxies until stopped, each recording what was acknowledged.
#[derive(Debug)]
pub struct Writers {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<Vec<Acked>>>>,
}

/// One acknowledged append: which events, in which stream, at which versions, on which store.
#[derive(Debug, Clone)]
pub struct Acked {
    pub aggregate_id: Uuid,
    pub event_ids: Vec<Uuid>,
    pub first_version: i64,
    pub store_id: String,
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
        let (stop, rx) = tokio::sync::watch::channel(false);
        let tasks = (0..n)
            .map(|i| {
                let http = http.clone();
                let base = proxies[i % proxies.len()].clone();
                let rx = rx.clone();
                tokio::spawn(async move {
                    let streams: Vec<Uuid> = (0..streams_each).map(|_| Uuid::new_v4()).collect();
                    let mut versions = vec![0i64; streams_each];
                    let mut acked = Vec::new();
                    let mut k = 0usize;
                    while !*rx.borrow() {
                        let s = k % streams_each;
                        k += 1;
                        let body = events_body(Some(versions[s]), 1 + k % 2, "Written");
                        let ids: Vec<Uuid> = body["events"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|e| {
                                        e["event_id"].as_str().and_then(|s| Uuid::parse_str(s).ok())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        let url = stream_url(&base, tenant, "Load", streams[s]);
                        // Retry the same body until it is acknowledged: appends are idempotent.
                        loop {
                            match http.post(&url, &body).await {
                                Ok(reply) if reply.status == StatusCode::CREATED => {
                                    versions[s] =
                                        reply.json["last_version"].as_i64().unwrap_or(versions[s]);
                                    acked.push(Acked {
                                        aggregate_id: streams[s],
                                        event_ids: ids.clone(),
                                        first_version: reply.json["first_version"]
                                            .as_i64()
                                            .unwrap_or(-1),
                                        store_id: reply.json["store_id"]
                                            .as_str()
                                            .unwrap_or_default()
                                            .to_owned(),
                                    });
                                    break;
                                }
                                Ok(reply) if reply.status.is_server_error() => {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                Ok(reply) => {
                                    bail!("append refused: {} {:?}", reply.status, reply.json)
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                            }
                        }
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    Ok(acked)
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the writers and returns every acknowledged append.
    pub async fn stop(self) -> Result<Vec<Acked>> {
        let _ = self.stop.send(true);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await??);
        }
        Ok(all)
    }
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

/// Starts a migration of `tenant` to `to` (left to `serve`) and waits for dual-write at lag 0.
pub async fn migrate_to_dual_write(
    env: &Env,
    tenant: Uuid,
    to: &str,
    extra: &[&str],
) -> Result<String> {
    let tenant = tenant.to_string();
    let mut args = vec![
        "migrate", "start", "--tenant", &tenant, "--to", to, "--detach",
    ];
    args.extend_from_slice(extra);
    let started = env.control_json(&args)?;
    let id = started["id"].as_str().unwrap_or_default().to_owned();
    caught_up(env, &id, Duration::from_secs(120)).await?;
    Ok(id)
}

/// Waits until migration `id` is dual-writing with no lag.
pub async fn caught_up(env: &Env, id: &str, timeout: Duration) -> Result<()> {
    wait_for_every(timeout, Duration::from_millis(250), || async {
        let s = env.control_json(&["status", id])?;
        Ok(s["state"] == "dual_write" && s["lag"] == 0)
    })
    .await
    .with_context(|| format!("migration {id} never caught up"))
}
