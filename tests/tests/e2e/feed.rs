//! The tenant feed never skips a late commit (issue 18's feed, the defect found after it): on
//! PostgreSQL positions come from a sequence at insert time while transactions commit in any
//! order, so a consumer following `next` past a position whose transaction is still open must
//! still be given that event once it commits. On SQLite the writer holds the write lock from
//! its first insert to its commit, so the same tests pass there with positions alone. And a
//! consumer's cursor survives its tenant's migration: sent with its store (`after_store`), it
//! is translated to the new store's positions, skipping nothing.
//!
//! Verdicts are by event id, read with the harness's own SQL, never through the feed's code.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use sqlx::Connection;
use switchyard_tests::{
    events_body, feed_url, for_each_backend, start_migration, started, stream_url, Acked, Backend,
    Http, Result, Writers,
};
use uuid::Uuid;

/// A consumer of the tenant feed that keeps its own cursor: the position of the last event it
/// was given, as a projection checkpoints it (eventsource-py's `Position` holds just that),
/// and — when it sends the cursor's store — the store that position belongs to.
struct Consumer {
    url: String,
    cursor: i64,
    /// The `store_id` of the reply that gave `cursor`, sent as `after_store` when `Some`.
    store: Option<String>,
    sends_store: bool,
    seen: Vec<Uuid>,
}

impl Consumer {
    fn new(base: &str, tenant: Uuid) -> Self {
        Self {
            url: feed_url(base, tenant),
            cursor: 0,
            store: None,
            sends_store: false,
            seen: Vec::new(),
        }
    }

    /// A consumer that sends its cursor's store with it (`after_store`).
    fn sending_store(base: &str, tenant: Uuid) -> Self {
        Self {
            sends_store: true,
            ..Self::new(base, tenant)
        }
    }

    /// Reads pages of `limit` from the cursor, following `next`, until a page is not full.
    async fn drain(&mut self, http: &Http, limit: u32) -> Result<()> {
        self.read_pages(http, limit, usize::MAX).await
    }

    /// [`Consumer::drain`], but stops after `pages` pages.
    async fn read_pages(&mut self, http: &Http, limit: u32, pages: usize) -> Result<()> {
        for _ in 0..pages {
            let store = match (&self.store, self.sends_store) {
                (Some(store), true) => format!("&after_store={store}"),
                _ => String::new(),
            };
            let reply = http
                .get(&format!(
                    "{}?after_position={}{store}&limit={limit}",
                    self.url, self.cursor
                ))
                .await?;
            anyhow::ensure!(reply.status == StatusCode::OK, "{:?}", reply.json);
            let events = reply.json["events"].as_array().cloned().unwrap_or_default();
            if !events.is_empty() {
                self.store = reply.json["store_id"].as_str().map(str::to_owned);
            }
            for event in &events {
                let id = event["event_id"].as_str().unwrap_or_default();
                self.seen.push(Uuid::parse_str(id)?);
                self.cursor = event["global_position"]
                    .as_i64()
                    .ok_or_else(|| anyhow::anyhow!("no position in {event}"))?;
            }
            match &reply.json["next"] {
                Value::Null => return Ok(()),
                next => anyhow::ensure!(
                    next.as_i64() == Some(self.cursor),
                    "next {next} is not the last event's position {}",
                    self.cursor
                ),
            }
        }
        Ok(())
    }

    /// Every event id seen more than once, and the ids of `expected` never seen.
    fn compare(&self, expected: &BTreeSet<Uuid>) -> (Vec<Uuid>, Vec<Uuid>) {
        let mut counts = BTreeMap::<Uuid, usize>::new();
        for id in &self.seen {
            *counts.entry(*id).or_default() += 1;
        }
        let duplicated = counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| *id)
            .collect();
        let missing = expected
            .iter()
            .filter(|id| !counts.contains_key(id))
            .copied()
            .collect();
        (duplicated, missing)
    }
}

/// The tenant's event ids in a store, by the harness's own SQL.
async fn stored_ids(url: &str, tenant: Uuid) -> Result<BTreeSet<Uuid>> {
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT event_id FROM events WHERE tenant_id = ?1")
                .bind(tenant.to_string())
                .fetch_all(&mut conn)
                .await?;
        ids.iter().map(|s| Ok(Uuid::parse_str(s)?)).collect()
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        Ok(
            sqlx::query_scalar("SELECT event_id FROM events WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_all(&mut conn)
                .await?
                .into_iter()
                .collect(),
        )
    }
}

/// Appends `n` events of `event_type` to a new `Order` stream of `tenant` through the proxy at
/// `base`; answers the request body (its events' ids: [`ids_of`]) and the reply.
async fn append_new_stream(
    http: &Http,
    base: &str,
    tenant: Uuid,
    n: usize,
    event_type: &str,
) -> Result<(Value, switchyard_tests::Reply)> {
    let body = events_body(Some(0), n, event_type);
    let reply = http
        .post(&stream_url(base, tenant, "Order", Uuid::new_v4()), &body)
        .await?;
    anyhow::ensure!(reply.status == StatusCode::CREATED, "{:?}", reply.json);
    Ok((body, reply))
}

/// The tenant's event ids in a store ([`stored_ids`]), having checked that every
/// acknowledged append is among them.
async fn stored_holding(url: &str, tenant: Uuid, acked: &[Acked]) -> Result<BTreeSet<Uuid>> {
    let stored = stored_ids(url, tenant).await?;
    let missing: Vec<Uuid> = acked
        .iter()
        .flat_map(|a| a.event_ids.iter().copied())
        .filter(|id| !stored.contains(id))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "acknowledged events not stored: {missing:?}"
    );
    Ok(stored)
}

/// The proxy's `switchyard_proxy_feed_cursor_translations_total` of one `outcome`.
async fn cursor_translations(http: &Http, admin: &str, outcome: &str) -> Result<f64> {
    let metrics = http.get(&format!("{admin}/metrics")).await?;
    let series =
        format!("switchyard_proxy_feed_cursor_translations_total{{outcome=\"{outcome}\"}} ");
    Ok(String::from_utf8_lossy(&metrics.body)
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0.0))
}

fn ids_of(body: &Value) -> Vec<Uuid> {
    body["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["event_id"].as_str().and_then(|s| Uuid::parse_str(s).ok()))
        .collect()
}

/// A transaction writing straight into the store (a legal writer: on PostgreSQL the fence
/// trigger takes the tenant's fence FOR SHARE) holds `Late` uncommitted while an append through
/// the proxy commits `After`; a consumer follows `next` meanwhile, then the transaction
/// commits, and the consumer, continuing from its cursor, is given both, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_past_an_open_transaction_still_gets_its_event_once_it_commits() -> Result<()> {
    for_each_backend(|backend| async move {
        let (env, proxy, http) = started(backend, &["shared"], "", &[]).await?;
        let url = env.store_url("shared").to_owned();
        let tenant = Uuid::new_v4();
        let before = events_body(Some(0), 2, "Before");
        let reply = http
            .post(&stream_url(&proxy.data, tenant, "Order", Uuid::new_v4()), &before)
            .await?;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);

        let late = Uuid::new_v4();
        let insert_late = "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, \
             tenant_id, version, timestamp, payload) VALUES ($1, $2, 'Order', 'Late', $3, 1, now(), \
             '{\"late\": true}')";
        let after = events_body(Some(0), 1, "After");
        let after_url = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
        let mut consumer = Consumer::new(&proxy.data, tenant);
        let mut expected: BTreeSet<Uuid> = ids_of(&before).into_iter().collect();
        expected.insert(late);
        expected.extend(ids_of(&after));

        match backend {
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                let mut held = conn.begin().await?;
                sqlx::query(insert_late)
                    .bind(late)
                    .bind(Uuid::new_v4())
                    .bind(tenant)
                    .execute(&mut *held)
                    .await?;
                // Acknowledged while Late is still open: its position is above Late's.
                let reply = http.post(&after_url, &after).await?;
                assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
                consumer.drain(&http, 1).await?;
                held.commit().await?;
            }
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&url).await?;
                let mut held = conn.begin().await?;
                let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6f+00:00");
                let insert_late = insert_late
                    .replace('$', "?")
                    .replace("now()", &format!("'{now}'"));
                sqlx::query(&insert_late)
                    .bind(late.to_string())
                    .bind(Uuid::new_v4().to_string())
                    .bind(tenant.to_string())
                    .execute(&mut *held)
                    .await?;
                // The append waits for the write lock Late's transaction holds.
                let (http2, url2, body2) = (http.clone(), after_url.clone(), after.clone());
                let append = tokio::spawn(async move { http2.post(&url2, &body2).await });
                consumer.drain(&http, 1).await?;
                held.commit().await?;
                let reply = append.await??;
                assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
            }
        }
        consumer.drain(&http, 1).await?;
        assert_eq!(stored_ids(&url, tenant).await?, expected);
        let (duplicated, missing) = consumer.compare(&expected);
        assert!(
            duplicated.is_empty() && missing.is_empty(),
            "duplicated {duplicated:?}, missing {missing:?} (Late is {late}); seen {:?}",
            consumer.seen
        );
        assert_eq!(consumer.seen.len(), expected.len());
        Ok(())
    })
    .await
}

/// Eight writers append through the proxy at once while a consumer pages the feed with small
/// pages: the consumer's sequence is exactly the set of committed events, no gaps, no
/// duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_paging_beside_concurrent_writers_gets_every_event_exactly_once() -> Result<()> {
    for_each_backend(|backend| async move {
        let (env, proxy, http) = started(backend, &["shared"], "", &[]).await?;
        let tenant = Uuid::new_v4();
        let writers = Writers::start(
            &http,
            std::slice::from_ref(&proxy.data),
            tenant,
            8,
            2,
            // A pause keeps the consumer near the head, where an open transaction's position
            // can lie below a committed one it reads.
            Duration::from_millis(30),
        );
        // On PostgreSQL a direct writer also keeps a transaction open a while after each
        // insert, so positions above its own commit while it is open (SQLite serialises it):
        // without it the consumer rarely reads in the short window of a proxy append's commit
        // (a feed that ignores open transactions passed without it, and loses events with it).
        let (stop_direct, stopped) = tokio::sync::watch::channel(false);
        let direct = (backend == Backend::Postgres).then(|| {
            let url = env.store_url("shared").to_owned();
            tokio::spawn(async move {
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                let stream = Uuid::new_v4();
                let mut version = 0;
                while !*stopped.borrow() {
                    version += 1;
                    let mut tx = conn.begin().await?;
                    sqlx::query(
                        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, \
                         tenant_id, version, timestamp, payload) \
                         VALUES ($1, $2, 'Direct', 'Held', $3, $4, now(), '{}')",
                    )
                    .bind(Uuid::new_v4())
                    .bind(stream)
                    .bind(tenant)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    tx.commit().await?;
                }
                anyhow::Ok(())
            })
        });
        let mut consumer = Consumer::new(&proxy.data, tenant);
        // Page while the writers run, until the consumer has been given 600 events.
        while consumer.seen.len() < 600 {
            consumer.read_pages(&http, 3, 10).await?;
        }
        let acked = writers.stop().await?;
        stop_direct.send_replace(true);
        if let Some(direct) = direct {
            direct.await??;
        }
        consumer.drain(&http, 3).await?;

        let stored = stored_holding(env.store_url("shared"), tenant, &acked).await?;
        let (duplicated, missing) = consumer.compare(&stored);
        assert!(
            duplicated.is_empty() && missing.is_empty(),
            "{} events stored, {} seen: duplicated {duplicated:?}, missing {missing:?}",
            stored.len(),
            consumer.seen.len()
        );
        assert_eq!(consumer.seen.len(), stored.len());
        Ok(())
    })
    .await
}

/// Freshness: an open transaction of another database of the same server (here the control
/// database, holding a transaction id as a `DROP DATABASE` or maintenance would) never delays
/// the feed: an acknowledged append is in it, and is the tenant's position, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_databases_open_transaction_never_delays_the_feed() -> Result<()> {
    let (env, proxy, http) = started(Backend::Postgres, &["shared"], "", &[]).await?;
    let tenant = Uuid::new_v4();
    let mut conn = sqlx::PgConnection::connect(&env.control_url).await?;
    let mut elsewhere = conn.begin().await?;
    let xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *elsewhere)
        .await?;
    assert!(!xid.is_empty());

    let (body, reply) = append_new_stream(&http, &proxy.data, tenant, 2, "Fresh").await?;
    let mut consumer = Consumer::new(&proxy.data, tenant);
    consumer.drain(&http, 10).await?;
    assert_eq!(consumer.seen, ids_of(&body));
    let position = http
        .get(&format!("{}/v1/tenants/{tenant}/position", proxy.data))
        .await?;
    assert_eq!(position.json["position"], reply.json["global_positions"][1]);
    elsewhere.rollback().await?;
    Ok(())
}

/// A projection's checkpoint survives its tenant's migration (issue 18): writers append
/// throughout; one consumer pages part of the feed on the source and stops, another keeps
/// paging; the tenant is migrated to another store and cut over; both continue from their
/// cursors, each sent with its store (`after_store`), and end with every stored event of the
/// tenant (by id). An event comes twice only if the consumer had it before the cutover (the
/// translation's boundary delivers again, never skips). Another tenant writes in the source
/// too, so the same event's source and target positions differ. Before `after_store` the
/// proxy refused the parameter (400); a cursor sent without it was read as a target position
/// and skipped the events between (a projection losing events silently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_cursor_of_the_source_continues_after_the_cutover_without_losing_an_event(
) -> Result<()> {
    for_each_backend(cursor_through_a_cutover).await
}

async fn cursor_through_a_cutover(backend: Backend) -> Result<()> {
    let config = "[proxy]\nrouting_poll_ms = 100\n";
    let (env, proxy, http) = started(backend, &["shared", "dedicated"], config, &[]).await?;
    let tenant = Uuid::new_v4();
    // Another tenant's events in the source, before and between the tenant's, so source
    // and target positions of the same event differ (as they do in production).
    let neighbour = Uuid::new_v4();
    switchyard_tests::seed(env.store_url("shared"), neighbour, 3, 100).await?;
    let neighbours = Writers::start(
        &http,
        std::slice::from_ref(&proxy.data),
        neighbour,
        2,
        2,
        Duration::from_millis(20),
    );
    let writers = Writers::start(
        &http,
        std::slice::from_ref(&proxy.data),
        tenant,
        4,
        2,
        Duration::from_millis(20),
    );
    let mut stopped = Consumer::sending_store(&proxy.data, tenant);
    let mut steady = Consumer::sending_store(&proxy.data, tenant);
    while stopped.seen.len() < 40 {
        stopped.read_pages(&http, 5, 4).await?;
    }
    anyhow::ensure!(stopped.store.as_deref() == Some("shared"));

    let _serve = switchyard_tests::ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = start_migration(&env, tenant, "dedicated", &["--cutover", "auto"])?;
    // The steady consumer pages all along, through the cutover.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while env.control_json(&["status", &id])?["state"] != "migrated" {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "not migrated: {}",
            env.control_json(&["status", &id])?
        );
        steady.read_pages(&http, 5, 4).await?;
    }
    let steady_before: BTreeSet<Uuid> = steady.seen.iter().copied().collect();
    // Appends into the target after the cutover.
    let acked_at_cutover = writers.acked();
    switchyard_tests::wait_for_every(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async { Ok(writers.acked() >= acked_at_cutover + 20) },
    )
    .await?;
    let acked = writers.stop().await?;
    neighbours.stop().await?;
    let stopped_before: BTreeSet<Uuid> = stopped.seen.iter().copied().collect();
    stopped.drain(&http, 7).await?;
    steady.drain(&http, 7).await?;

    let stored = stored_holding(env.store_url("dedicated"), tenant, &acked).await?;
    for (name, consumer, before) in [
        ("stopped", &stopped, &stopped_before),
        ("steady", &steady, &steady_before),
    ] {
        assert_eq!(consumer.store.as_deref(), Some("dedicated"), "{name}");
        let (duplicated, missing) = consumer.compare(&stored);
        assert!(
            missing.is_empty(),
            "{name}: {} stored, {} seen, missing {missing:?}",
            stored.len(),
            consumer.seen.len()
        );
        println!(
            "{name}: {} stored, {} seen, {} given twice",
            stored.len(),
            consumer.seen.len(),
            duplicated.len()
        );
        let beyond: Vec<&Uuid> = duplicated
            .iter()
            .filter(|id| !before.contains(id))
            .collect();
        assert!(
            beyond.is_empty(),
            "{name}: events given twice that it had not before the cutover: {beyond:?}"
        );
    }
    // Each consumer's cursor was translated once at least (its first read past the cutover).
    assert!(cursor_translations(&http, &proxy.admin, "translated").await? >= 2.0);
    Ok(())
}

/// A cursor naming a store the tenant was never migrated from is refused with 422
/// `cursor_not_translatable`, never read as a position of the current store; position 0 is
/// the start in any store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_of_a_store_the_tenant_never_left_is_refused() -> Result<()> {
    let (_env, proxy, http) = started(Backend::Sqlite, &["shared", "dedicated"], "", &[]).await?;
    let tenant = Uuid::new_v4();
    let (body, _) = append_new_stream(&http, &proxy.data, tenant, 3, "Placed").await?;
    let url = feed_url(&proxy.data, tenant);
    let refused = http
        .get(&format!("{url}?after_position=1&after_store=dedicated"))
        .await?;
    assert_eq!(
        (
            refused.status,
            &refused.json["error"],
            &refused.json["retryable"]
        ),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!("cursor_not_translatable"),
            &json!(false)
        ),
        "{:?}",
        refused.json
    );
    let from_start = http
        .get(&format!("{url}?after_position=0&after_store=dedicated"))
        .await?;
    assert_eq!(from_start.status, StatusCode::OK, "{:?}", from_start.json);
    assert_eq!(ids_of(&from_start.json), ids_of(&body));
    assert_eq!(
        cursor_translations(&http, &proxy.admin, "not_translatable").await?,
        1.0
    );
    let own = http
        .get(&format!("{url}?after_position=0&after_store=shared"))
        .await?;
    assert_eq!(ids_of(&own.json), ids_of(&body));
    Ok(())
}

/// A cursor of the store the tenant moved to, read through a proxy that has not heard of the
/// move (no NOTIFY, no poll), is answered 503 `route_stale` — retryable, and it wakes that
/// proxy's routing reload — never 422: the retry reads on from the new store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_of_the_new_store_through_a_proxy_behind_the_move_is_retried_not_refused(
) -> Result<()> {
    let config = "[proxy]\nrouting_poll_ms = 100\n";
    let (env, proxy, http) =
        started(Backend::Sqlite, &["shared", "dedicated"], config, &[]).await?;
    let deaf = env.proxy(&[
        ("SWITCHYARD_PROXY_ROUTING_LISTEN", "false"),
        ("SWITCHYARD_PROXY_ROUTING_POLL_MS", "600000"),
        ("SWITCHYARD_PROXY_ADMIN_TOKEN", "not-the-configured-token"),
    ])?;
    deaf.wait_ready(&http).await?;
    let tenant = Uuid::new_v4();
    append_new_stream(&http, &proxy.data, tenant, 3, "Placed").await?;
    let _serve = switchyard_tests::ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = start_migration(&env, tenant, "dedicated", &["--cutover", "auto"])?;
    switchyard_tests::wait_for_every(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async { Ok(env.control_json(&["status", &id])?["state"] == "migrated") },
    )
    .await?;
    let (later, _) = append_new_stream(&http, &proxy.data, tenant, 2, "Later").await?;
    let page = http
        .get(&format!("{}?limit=4", feed_url(&proxy.data, tenant)))
        .await?;
    assert_eq!(page.json["store_id"], "dedicated", "{:?}", page.json);
    let cursor = &page.json["next"];
    assert!(cursor.is_i64(), "{:?}", page.json);

    let url = format!(
        "{}?after_position={cursor}&after_store=dedicated",
        feed_url(&deaf.data, tenant)
    );
    let behind = http.get(&url).await?;
    assert_eq!(
        (
            behind.status,
            &behind.json["error"],
            &behind.json["retryable"]
        ),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &json!("route_stale"),
            &json!(true)
        ),
        "{:?}",
        behind.json
    );
    assert_eq!(
        cursor_translations(&http, &deaf.admin, "route_stale").await?,
        1.0
    );
    let retried = std::sync::Mutex::new(Value::Null);
    switchyard_tests::wait_for_every(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let reply = http.get(&url).await?;
            let ok = reply.status == StatusCode::OK;
            *retried.lock().expect("reply lock") = reply.json;
            Ok(ok)
        },
    )
    .await?;
    let retried = retried.into_inner().expect("reply lock");
    assert_eq!(retried["store_id"], "dedicated");
    assert_eq!(ids_of(&retried), ids_of(&later)[1..]);
    Ok(())
}
