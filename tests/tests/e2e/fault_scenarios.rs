//! Fault-injection scenarios on PostgreSQL (issue 9, point 2; docs/reliability.md "Fault
//! injection"): the source's connections reset during dual-write, the target blackholed during
//! a cutover, the control database unreachable for 10 s, a proxy killed with appends in
//! flight, the control process killed at every step of the cutover, and the source's
//! PostgreSQL server restarted during the bulk copy. Each checks that no acknowledged append is
//! lost or duplicated, that the target ends equal to the source, and that no writer waited
//! past its limit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use http::StatusCode;
use serde_json::Value;
use sqlx::Connection;
use switchyard_tests::pgcluster::PgCluster;
use switchyard_tests::{
    assert_all_acked, caught_up, converged, count_events, events_body, feed_url, fence, first_json,
    load_plan, migrate_to_dual_write, route_state, run_control, seed, seed_sql, stream_url,
    tenant_events, wait_for, wait_for_every, Acked, Backend, Env, EventRow, GateMode, Http,
    ProxyProcess, Result, ServeProcess, TcpGate, Writers,
};
use uuid::Uuid;

/// The shared test PostgreSQL server, which the gates forward to.
const PG: &str = "127.0.0.1:5432";

/// One attempt of one append, as a writer saw it (status 0: no answer).
type Try = switchyard_client::Attempt;

/// What writers saw: every acknowledged append and every attempt.
#[derive(Debug, Default)]
pub(crate) struct Record {
    pub(crate) acked: Vec<Acked>,
    tries: Vec<Try>,
}

impl Record {
    /// The longest a single request took.
    pub(crate) fn slowest(&self) -> Duration {
        self.tries.iter().map(|t| t.took).max().unwrap_or_default()
    }

    /// Failed attempts by `"<status> <code>"`.
    pub(crate) fn failures(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for t in self.tries.iter().filter(|t| t.status != 201) {
            *out.entry(format!("{} {}", t.status, t.code)).or_insert(0) += 1;
        }
        out
    }

    fn acked_events(&self) -> usize {
        self.acked.iter().map(|a| a.event_ids.len()).sum()
    }
}

/// Writers appending until stopped (the harness's [`Writers`] plan, two streams each, 10 ms
/// apart: `switchyard_client`'s load writer), every attempt timed.
pub(crate) struct Load {
    load: switchyard_client::Load,
}

impl Load {
    /// `n` writers for `tenant`, writer `i` through `proxies[i % len]`, two streams each.
    pub(crate) fn start(http: &Http, proxies: &[String], tenant: Uuid, n: usize) -> Self {
        let plan = switchyard_client::LoadPlan {
            record_attempts: true,
            ..load_plan(tenant, 2, Duration::from_millis(10))
        };
        let clients: Vec<_> = proxies.iter().map(|base| http.data(base)).collect();
        Self {
            load: switchyard_client::Load::start(&clients, plan, n),
        }
    }

    /// Appends acknowledged so far.
    pub(crate) fn acked(&self) -> usize {
        usize::try_from(self.load.acked()).unwrap_or(usize::MAX)
    }

    /// Waits until `more` appends beyond those acknowledged now are acknowledged.
    pub(crate) async fn progress(&self, more: usize, timeout: Duration) -> Result<()> {
        let goal = self.acked() + more;
        wait_for(timeout, || async { Ok(self.acked() >= goal) })
            .await
            .with_context(|| format!("writers stalled at {} acknowledged appends", self.acked()))
    }

    /// Stops the writers; an append refused for good fails it.
    pub(crate) async fn stop(self) -> Result<Record> {
        let report = self.load.stop().await;
        if let Some(failure) = report.failed.first() {
            bail!("append refused: {}", failure.error);
        }
        Ok(Record {
            acked: report.acked.iter().map(Acked::from).collect(),
            tries: report.attempts,
        })
    }
}

/// The [`Acked`] of a 201 reply to `body`.
fn acked_of(body: &Value, aggregate_id: Uuid, reply: &Value) -> Acked {
    Acked {
        aggregate_id,
        event_ids: body_ids(body),
        first_version: reply["first_version"].as_i64().unwrap_or(-1),
        store_id: reply["store_id"].as_str().unwrap_or_default().to_owned(),
    }
}

fn body_ids(body: &Value) -> Vec<Uuid> {
    body["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["event_id"].as_str().and_then(|s| Uuid::parse_str(s).ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the proxy's route of `tenant` has `key` = `value`.
pub(crate) async fn route_is(
    http: &Http,
    proxy: &ProxyProcess,
    tenant: Uuid,
    key: &str,
    value: &str,
    timeout: Duration,
) -> Result<()> {
    wait_for(timeout, || async {
        Ok(route_state(http, proxy, tenant).await?[key] == value)
    })
    .await
    .with_context(|| format!("the proxy's route of {tenant} never had {key} = {value}"))
}

/// Every event of `source` is in `target`, identical (the target may hold later appends).
fn contains_all(target: &[EventRow], source: &[EventRow]) {
    let target: HashSet<&EventRow> = target.iter().collect();
    let missing = source.iter().filter(|e| !target.contains(e)).count();
    assert_eq!(
        missing, 0,
        "{missing} source events missing or different in the target"
    );
}

/// `verify ID --level hash` exits 0 and reports consistent.
pub(crate) fn verify_hash(env: &Env, id: &str) -> Result<Value> {
    let report = env.control_json(&["verify", id, "--level", "hash"])?;
    ensure!(report["consistent"] == true, "verify: {report}");
    Ok(report)
}

/// `verify --level hash` consistent, then a `cutover` through the CLI that succeeds.
pub(crate) async fn cut_over(env: &Env, id: &str) -> Result<()> {
    verify_hash(env, id)?;
    let cut = control_off_thread(env, &["--json", "cutover", id], &[]).await?;
    assert_eq!(
        first_json(&cut.stdout)?["success"],
        true,
        "{}{}",
        cut.stdout,
        cut.stderr
    );
    Ok(())
}

/// The actions of migration `id`'s audit log, oldest first, and its last entry.
pub(crate) fn audit(env: &Env, id: &str) -> Result<(Vec<String>, Value)> {
    let log = env.control_json(&["audit", id])?;
    let entries = log.as_array().cloned().unwrap_or_default();
    let actions = entries
        .iter()
        .filter_map(|e| e["action"].as_str().map(str::to_owned))
        .collect();
    Ok((actions, entries.last().cloned().unwrap_or_default()))
}

/// A session holding the tenant's fence in the source as an append in flight would
/// (`FOR SHARE`), so a cutover waits for it at step 3.
pub(crate) async fn hold_fence(url: &str, tenant: Uuid) -> Result<sqlx::PgConnection> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    sqlx::query("BEGIN").execute(&mut c).await?;
    sqlx::query("SELECT 1 FROM switchyard_fences WHERE tenant_id = $1 FOR SHARE")
        .bind(tenant)
        .execute(&mut c)
        .await?;
    Ok(c)
}

/// Runs a control command off the runtime's threads (it may take seconds).
pub(crate) async fn control_off_thread(
    env: &Env,
    args: &[&str],
    vars: &[(&str, &str)],
) -> Result<switchyard_tests::CommandOutput> {
    let config = env.config_path.clone();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_control(&config, &args, &vars)
    })
    .await?
}

/// Two stores and a control database on the shared server, `init` done.
pub(crate) async fn two_stores(extra: &str) -> Result<Env> {
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], extra).await?;
    env.control_json(&["init"])?;
    Ok(env)
}

// ---------------------------------------------------------------------------------------------

/// The source's connections are cut every 100 ms for 2 s (with 20 ms of latency so appends
/// are in flight when they are cut), then refused for 1 s, during dual-write: appends caught
/// in it fail with a retryable 503, the writers' retries land once, the mirror and the tail
/// catch up, and the target equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_connection_resets_during_dual_write_lose_nothing() -> Result<()> {
    let gate = TcpGate::start(PG).await?;
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 5, 20).await?;
    let gated = gate.url(env.store_url("shared"));
    let http = Http::new();
    let proxy = env.proxy(&[("SWITCHYARD_STORE_SHARED_URL", &gated)])?;
    proxy.wait_ready(&http).await?;
    let _serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    route_is(
        &http,
        &proxy,
        tenant,
        "state",
        "dual_write",
        Duration::from_secs(5),
    )
    .await?;

    let load = Load::start(&http, std::slice::from_ref(&proxy.data), tenant, 4);
    load.progress(20, Duration::from_secs(20)).await?;
    gate.set(GateMode::Latency(Duration::from_millis(20)));
    let fault = Instant::now();
    while fault.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        gate.reset();
    }
    gate.close();
    tokio::time::sleep(Duration::from_secs(1)).await;
    gate.open();
    load.progress(40, Duration::from_secs(20)).await?;
    let record = load.stop().await?;

    let failures = record.failures();
    assert!(
        failures.get("503 store_unavailable").copied().unwrap_or(0) >= 1,
        "the resets failed appends: {failures:?}"
    );
    assert!(
        record
            .tries
            .iter()
            .all(|t| t.status == 201 || (t.status == 503 && t.retryable)),
        "every failure is a retryable 503: {failures:?}"
    );
    // A refused connection fails at once; a pool acquire gives up after 5 s.
    assert!(
        record.slowest() < Duration::from_secs(7),
        "a writer waited {:?}",
        record.slowest()
    );
    caught_up(&env, &id, Duration::from_secs(60)).await?;
    let source = converged(env.store_url("shared"), env.store_url("dedicated"), tenant).await?;
    verify_hash(&env, &id)?;
    assert_all_acked(&record.acked, &source);
    assert_eq!(
        source.len(),
        100 + record.acked_events(),
        "the source holds the seed and the acknowledged appends, each once"
    );
    println!(
        "resets: {} appends acknowledged, failures {failures:?}, slowest attempt {:?}",
        record.acked.len(),
        record.slowest()
    );
    Ok(())
}

/// The target is blackholed while a cutover waits for the source fence: the final catch-up
/// hangs, the budget runs out, the cutover rolls back to dual_write within it, writers go on
/// on the source, state and audit say so. Once the blackhole lifts, a retry succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_blackholed_during_cutover_rolls_back_within_the_budget() -> Result<()> {
    const BUDGET_MS: u64 = 3000;
    const GATE_WAIT_MS: u64 = 10_000;
    let gate = TcpGate::start(PG).await?;
    let env = two_stores(&format!(
        "[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = {GATE_WAIT_MS}\n"
    ))
    .await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 5, 20).await?;
    let gated = gate.url(env.store_url("dedicated"));
    let via_gate = [("SWITCHYARD_STORE_DEDICATED_URL", gated.as_str())];
    let http = Http::new();
    let proxy = env.proxy(&via_gate)?;
    proxy.wait_ready(&http).await?;
    let _serve = ServeProcess::spawn(&env.config_path, "w", &via_gate)?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    route_is(
        &http,
        &proxy,
        tenant,
        "state",
        "dual_write",
        Duration::from_secs(5),
    )
    .await?;
    let load = Load::start(&http, std::slice::from_ref(&proxy.data), tenant, 4);
    load.progress(20, Duration::from_secs(20)).await?;

    // The cutover closes the gates, then waits for the fence (held here); the target goes dark
    // meanwhile, so the final catch-up hangs once it has the fence.
    let holder = hold_fence(env.store_url("shared"), tenant).await?;
    let budget = BUDGET_MS.to_string();
    let cutover = {
        let args = ["--json", "cutover", &id, "--timeout-ms", &budget];
        let (config, vars) = (env.config_path.clone(), gated.clone());
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_control(
                &config,
                &args,
                &[("SWITCHYARD_STORE_DEDICATED_URL", vars.as_str())],
            )
        })
    };
    route_is(
        &http,
        &proxy,
        tenant,
        "state",
        "cutover_paused",
        Duration::from_secs(10),
    )
    .await?;
    gate.set(GateMode::Blackhole);
    let mut holder = holder;
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    let out = cutover.await??;
    assert_ne!(out.code, 0, "the cutover failed: {}", out.stdout);
    let report = first_json(&out.stdout)?;
    assert_eq!(report["success"], false, "{report}");
    assert_eq!(report["state"], "dual_write", "{report}");
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("budget")),
        "{report}"
    );
    let took = report["duration_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(
        took < BUDGET_MS + 2000,
        "rolled back within the budget (plus the lag check): {report}"
    );
    assert!(
        report["pause_ms"].as_u64().unwrap_or(u64::MAX) < BUDGET_MS + 1000,
        "the gates were closed no longer than the budget: {report}"
    );

    // Writers go on on the source, and the record says what happened.
    route_is(
        &http,
        &proxy,
        tenant,
        "state",
        "dual_write",
        Duration::from_secs(5),
    )
    .await?;
    load.progress(20, Duration::from_secs(10)).await?;
    let probe = http
        .post(
            &stream_url(&proxy.data, tenant, "Probe", Uuid::new_v4()),
            &events_body(Some(0), 1, "Probe"),
        )
        .await?;
    assert_eq!(probe.json["store_id"], "shared", "{}", probe.json);
    assert_eq!(env.control_json(&["status", &id])?["state"], "dual_write");
    let (actions, last) = audit(&env, &id)?;
    assert!(
        actions.ends_with(&["cutover".to_owned(), "cutover_rollback".to_owned()]),
        "{actions:?}"
    );
    assert!(
        last["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("automatic rollback") && r.contains("budget")),
        "{last}"
    );
    assert_eq!(
        fence(env.store_url("shared"), tenant).await?.as_deref(),
        Some("open")
    );

    // The target comes back: the tail catches up and a retry succeeds.
    gate.open();
    caught_up(&env, &id, Duration::from_secs(60)).await?;
    let retry = control_off_thread(
        &env,
        &["--json", "cutover", &id, "--timeout-ms", "5000"],
        &via_gate,
    )
    .await?;
    let outcome = first_json(&retry.stdout)?;
    assert_eq!(outcome["success"], true, "{outcome} {}", retry.stderr);
    route_is(
        &http,
        &proxy,
        tenant,
        "store_id",
        "dedicated",
        Duration::from_secs(5),
    )
    .await?;
    load.progress(10, Duration::from_secs(10)).await?;
    let record = load.stop().await?;
    assert!(record.acked.iter().any(|a| a.store_id == "dedicated"));
    assert!(
        record.failures().is_empty(),
        "no append failed (the gate waits {GATE_WAIT_MS} ms): {:?}",
        record.failures()
    );
    assert!(
        record.slowest() < Duration::from_millis(BUDGET_MS + 3000),
        "writers were held past the budget: {:?}",
        record.slowest()
    );
    let target = tenant_events(env.store_url("dedicated"), tenant).await?;
    assert_all_acked(&record.acked, &target);
    contains_all(
        &target,
        &tenant_events(env.store_url("shared"), tenant).await?,
    );
    println!(
        "blackholed cutover: rolled back after {took} ms; {} appends acknowledged, slowest {:?}",
        record.acked.len(),
        record.slowest()
    );
    Ok(())
}

/// The proxy's control database is blackholed for 10 s during dual-write: the proxy keeps its
/// last routing table, stays ready, and appends go on and are mirrored; afterwards it follows
/// routing again (a cutover reaches it) and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_control_database_leaves_the_data_plane_serving() -> Result<()> {
    let gate = TcpGate::start(PG).await?;
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 5, 20).await?;
    let gated = gate.url(&env.control_url);
    let http = Http::new();
    let proxy = env.proxy(&[("SWITCHYARD_CONTROL_URL", &gated)])?;
    proxy.wait_ready(&http).await?;
    let _serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    route_is(
        &http,
        &proxy,
        tenant,
        "state",
        "dual_write",
        Duration::from_secs(5),
    )
    .await?;
    let load = Load::start(&http, std::slice::from_ref(&proxy.data), tenant, 4);
    load.progress(20, Duration::from_secs(20)).await?;

    gate.set(GateMode::Blackhole);
    let outage = Instant::now();
    let (acked_before, target_before) = (
        load.acked(),
        count_events(env.store_url("dedicated"), Some(tenant)).await?,
    );
    let mut readiness = BTreeMap::new();
    while outage.elapsed() < Duration::from_secs(10) {
        let ready = http.get(&format!("{}/readyz", proxy.admin)).await?;
        *readiness.entry(ready.status.as_u16()).or_insert(0) += 1;
        let route = route_state(&http, &proxy, tenant).await?;
        assert_eq!(
            route["state"], "dual_write",
            "the last table stays: {route}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (acked_during, target_during) = (
        load.acked() - acked_before,
        count_events(env.store_url("dedicated"), Some(tenant)).await? - target_before,
    );
    gate.open();

    assert!(
        acked_during >= 50,
        "appends went on: {acked_during} in 10 s"
    );
    assert!(
        target_during > 0,
        "the mirror went on: {target_during} events"
    );
    assert_eq!(
        readiness.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "readiness is the routing table loaded (kept through the outage), not the control database: {readiness:?}"
    );
    // The routing poll hung on its blackholed connection; leaving the blackhole cut it, and
    // the failure is counted.
    wait_for(Duration::from_secs(10), || async {
        Ok(reload_errors(&http, &proxy).await? >= 1.0)
    })
    .await?;
    let poll_errors = reload_errors(&http, &proxy).await?;

    // Back: the proxy follows routing again, so a cutover reaches it.
    caught_up(&env, &id, Duration::from_secs(60)).await?;
    cut_over(&env, &id).await?;
    route_is(
        &http,
        &proxy,
        tenant,
        "store_id",
        "dedicated",
        Duration::from_secs(10),
    )
    .await?;
    load.progress(10, Duration::from_secs(10)).await?;
    let record = load.stop().await?;
    assert!(record.failures().is_empty(), "{:?}", record.failures());
    assert!(
        record.slowest() < Duration::from_secs(3),
        "a writer waited {:?}",
        record.slowest()
    );
    let target = tenant_events(env.store_url("dedicated"), tenant).await?;
    assert_all_acked(&record.acked, &target);
    contains_all(
        &target,
        &tenant_events(env.store_url("shared"), tenant).await?,
    );
    println!(
        "control outage: {acked_during} appends and {target_during} mirrored events in 10 s; \
         readiness {readiness:?}; {poll_errors} failed routing reloads; slowest {:?}",
        record.slowest()
    );
    Ok(())
}

/// Issue 15 item 7: proxy B, cut off from the control database, does not hear a cutover; an
/// append through it meets the source's moved fence (and follows it to the target, issue 17),
/// and from then on B's reads of the tenant come from the target the fence named, with the
/// events appended there after the cutover, never from the stale source. When B reaches the control
/// database again, its routing takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_a_proxy_cut_off_from_control_follow_a_moved_fence() -> Result<()> {
    let gate = TcpGate::start(PG).await?;
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 500\n").await?;
    let tenant = Uuid::new_v4();
    let aggregate = Uuid::new_v4();
    let http = Http::new();
    let a = env.proxy(&[])?;
    let gated = gate.url(&env.control_url);
    let b = env.proxy(&[("SWITCHYARD_CONTROL_URL", &gated)])?;
    a.wait_ready(&http).await?;
    b.wait_ready(&http).await?;
    let (id, _serve) =
        dual_write_then_cut_off(&env, &http, &gate, (&a, &b), (tenant, aggregate)).await?;

    cut_over_onto_dedicated(&env, &id, &http, &a, tenant).await?;
    let after = events_body(Some(2), 1, "After");
    let on_target = http
        .post(&stream_url(&a.data, tenant, "Order", aggregate), &after)
        .await?;
    ensure!(
        on_target.json["store_id"] == "dedicated",
        "{:?}",
        on_target.json
    );
    ensure!(
        route_state(&http, &b, tenant).await?["store_id"] == "shared",
        "B heard the cutover"
    );

    // B's append meets the moved fence, which names its route's target: it follows it there
    // (issue 17) although routing cannot be reloaded.
    let followed = events_body(Some(3), 1, "Followed");
    let followed_reply = http
        .post(&stream_url(&b.data, tenant, "Order", aggregate), &followed)
        .await?;
    assert_eq!(
        (
            followed_reply.status,
            followed_reply.json["store_id"].as_str()
        ),
        (StatusCode::CREATED, Some("dedicated")),
        "{:?}",
        followed_reply.json
    );

    let stream = http
        .get(&stream_url(&b.data, tenant, "Order", aggregate))
        .await?;
    let feed = http.get(&feed_url(&b.data, tenant)).await?;
    let after_id = body_ids(&after)[0];
    for (what, read) in [("stream", &stream), ("feed", &feed)] {
        assert_eq!(read.status, StatusCode::OK, "{what}: {:?}", read.json);
        assert_eq!(
            read.json["store_id"], "dedicated",
            "{what} read from the stale source: {:?}",
            read.json
        );
        let ids = read_ids(&read.json);
        assert_eq!(ids.len(), 4, "{what}: {ids:?}");
        assert!(
            ids.contains(&after_id) && ids.contains(&body_ids(&followed)[0]),
            "{what} lacks an append after the cutover"
        );
    }
    let route = route_state(&http, &b, tenant).await?;
    assert_eq!(route["reads_follow_fence_to"], "dedicated", "{route}");

    // Back in touch: routing names the target, and the noted move is gone.
    gate.open();
    route_is(
        &http,
        &b,
        tenant,
        "store_id",
        "dedicated",
        Duration::from_secs(20),
    )
    .await?;
    let route = route_state(&http, &b, tenant).await?;
    assert_eq!(route["reads_follow_fence_to"], Value::Null, "{route}");
    Ok(())
}

/// Issue 17: proxy B is cut off from the control database (its connection blackholed) before
/// a cutover it never hears of: its route still says dual_write on `shared`. Writers through
/// B and through A (which hears everything) keep appending across the cutover. B's appends
/// meet the source's fence moved to their route's target and go there at once (later ones
/// straight there), so B keeps acknowledging the tenant's appends, never mirrored. Nothing
/// lost, checked by event id against both stores: every acknowledged append is in the target
/// once at its version, every source event is in the target, and no append the target
/// acknowledged is in the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_through_a_proxy_cut_off_from_control_follow_a_moved_fence() -> Result<()> {
    let gate = TcpGate::start(PG).await?;
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 500\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 5, 20).await?;
    let http = Http::new();
    let a = env.proxy(&[])?;
    let gated = gate.url(&env.control_url);
    let b = env.proxy(&[("SWITCHYARD_CONTROL_URL", &gated)])?;
    a.wait_ready(&http).await?;
    b.wait_ready(&http).await?;
    let (id, _serve) =
        dual_write_then_cut_off(&env, &http, &gate, (&a, &b), (tenant, Uuid::new_v4())).await?;
    // Writers 0 and 2 through A, 1 and 3 through B.
    let writers = Writers::start(
        &http,
        &[a.data.clone(), b.data.clone()],
        tenant,
        4,
        2,
        Duration::from_millis(10),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    cut_over_onto_dedicated(&env, &id, &http, &a, tenant).await?;
    // B keeps acknowledging: its writers' appends follow the fence to the target.
    wait_for(Duration::from_secs(60), || async {
        Ok(proxy_counter(&http, &b, "switchyard_proxy_appends_followed_total").await? >= 20.0)
    })
    .await?;
    // Bounded only so a writer that can no longer append ends the test instead of hanging it.
    let acked = tokio::time::timeout(Duration::from_secs(120), writers.stop())
        .await
        .context("a writer never got its append acknowledged")??;
    let route = route_state(&http, &b, tenant).await?;
    assert_eq!(
        (route["store_id"].as_str(), route["state"].as_str()),
        (Some("shared"), Some("dual_write")),
        "B heard the cutover: {route}"
    );
    assert_eq!(route["reads_follow_fence_to"], "dedicated", "{route}");

    let target = tenant_events(env.store_url("dedicated"), tenant).await?;
    let source = tenant_events(env.store_url("shared"), tenant).await?;
    assert_all_acked(&acked, &target);
    let target_ids: HashSet<Uuid> = target.iter().map(|e| e.event_id).collect();
    let source_ids: HashSet<Uuid> = source.iter().map(|e| e.event_id).collect();
    assert!(
        source_ids.is_subset(&target_ids),
        "a source event is missing from the target"
    );
    let on_target: Vec<Uuid> = acked
        .iter()
        .filter(|a| a.store_id == "dedicated")
        .flat_map(|a| a.event_ids.iter().copied())
        .collect();
    assert!(!on_target.is_empty());
    assert!(
        on_target.iter().all(|id| !source_ids.contains(id)),
        "an append acknowledged by the target reached the source"
    );
    assert!(acked
        .iter()
        .all(|a| a.store_id == "dedicated" || a.store_id == "shared"));
    gate.open();
    Ok(())
}

/// Issue 17, hop by hop: the tenant moves S → T (`shared` → `dedicated`), then T → U
/// (`dedicated` → `third`), while proxy B hears neither (its route still says dual_write from
/// S to T). B's append meets S's fence moved to T (its route's target), follows it, meets T's
/// fence moved to U (a store B has), follows that too: acknowledged by U after two fences,
/// within `MAX_REROUTES`, and in U only. B notes the move: its next append goes straight to U
/// (no fence met), and its reads follow to U.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_follows_a_fence_moved_onward_hop_by_hop() -> Result<()> {
    let gate = TcpGate::start(PG).await?;
    let env = Env::new(
        Backend::Postgres,
        &["shared", "dedicated", "third"],
        "[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 500\n",
    )
    .await?;
    env.control_json(&["init"])?;
    let tenant = Uuid::new_v4();
    let aggregate = Uuid::new_v4();
    let http = Http::new();
    let gated = gate.url(&env.control_url);
    let b = env.proxy(&[("SWITCHYARD_CONTROL_URL", &gated)])?;
    b.wait_ready(&http).await?;
    let (to_t, _serve) =
        dual_write_then_cut_off(&env, &http, &gate, (&b, &b), (tenant, aggregate)).await?;
    cut_over(&env, &to_t).await?;
    let to_u = migrate_to_dual_write(&env, tenant, "third", &[]).await?;
    cut_over(&env, &to_u).await?;

    let rejections_before =
        proxy_counter(&http, &b, "switchyard_proxy_fence_rejections_total").await?;
    let hop = events_body(Some(2), 1, "Hopped");
    let reply = http
        .post(&stream_url(&b.data, tenant, "Order", aggregate), &hop)
        .await?;
    assert_eq!(
        (reply.status, reply.json["store_id"].as_str()),
        (StatusCode::CREATED, Some("third")),
        "{:?}",
        reply.json
    );
    assert_eq!(reply.json["first_version"], 3, "{:?}", reply.json);
    let rejections = proxy_counter(&http, &b, "switchyard_proxy_fence_rejections_total").await?;
    assert_eq!(rejections - rejections_before, 2.0, "one fence per hop");

    let next = events_body(Some(3), 1, "Straight");
    let reply = http
        .post(&stream_url(&b.data, tenant, "Order", aggregate), &next)
        .await?;
    assert_eq!(
        (reply.status, reply.json["store_id"].as_str()),
        (StatusCode::CREATED, Some("third")),
        "{:?}",
        reply.json
    );
    assert_eq!(
        proxy_counter(&http, &b, "switchyard_proxy_fence_rejections_total").await?,
        rejections,
        "the noted move sends it straight to U"
    );
    assert_eq!(
        proxy_counter(&http, &b, "switchyard_proxy_appends_followed_total").await?,
        2.0
    );
    let route = route_state(&http, &b, tenant).await?;
    assert_eq!(route["store_id"], "shared", "B heard a cutover: {route}");
    assert_eq!(route["reads_follow_fence_to"], "third", "{route}");
    let read = http
        .get(&stream_url(&b.data, tenant, "Order", aggregate))
        .await?;
    assert_eq!(read.json["store_id"], "third", "{:?}", read.json);
    assert_eq!(read_ids(&read.json).len(), 4, "{:?}", read.json);

    // The followed appends are in U only, each once.
    let new_ids: Vec<Uuid> = body_ids(&hop).into_iter().chain(body_ids(&next)).collect();
    for (store, wanted) in [("shared", 0), ("dedicated", 0), ("third", 1)] {
        let events = tenant_events(env.store_url(store), tenant).await?;
        for id in &new_ids {
            assert_eq!(
                events.iter().filter(|e| e.event_id == *id).count(),
                wanted,
                "event {id} in {store}"
            );
        }
    }
    gate.open();
    Ok(())
}

/// Two events of `tenant`'s stream `aggregate` through `via`, then a migration of the tenant
/// to `dedicated` driven by the returned `serve` up to dual-write at lag 0; once proxy `b`
/// (whose control database connection goes through `gate`) routes the tenant dual_write, the
/// gate blackholes: `b` hears nothing more. Returns the migration's id.
async fn dual_write_then_cut_off(
    env: &Env,
    http: &Http,
    gate: &TcpGate,
    (via, b): (&ProxyProcess, &ProxyProcess),
    (tenant, aggregate): (Uuid, Uuid),
) -> Result<(String, ServeProcess)> {
    let first = http
        .post(
            &stream_url(&via.data, tenant, "Order", aggregate),
            &events_body(Some(0), 2, "Before"),
        )
        .await?;
    ensure!(first.status == StatusCode::CREATED, "{:?}", first.json);
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    // No reverse replication: these tests check by event id that what the target acknowledged
    // never reached the source (with it, the proxies copy the target's appends back).
    let id = migrate_to_dual_write(env, tenant, "dedicated", &["--no-reverse"]).await?;
    route_is(
        http,
        b,
        tenant,
        "state",
        "dual_write",
        Duration::from_secs(5),
    )
    .await?;
    gate.set(GateMode::Blackhole);
    Ok((id, serve))
}

/// Cuts migration `id` over and waits until `proxy` (which hears routing) routes `tenant` to
/// `dedicated`.
async fn cut_over_onto_dedicated(
    env: &Env,
    id: &str,
    http: &Http,
    proxy: &ProxyProcess,
    tenant: Uuid,
) -> Result<()> {
    cut_over_until_routed(env, http, proxy, tenant, id, "dedicated").await
}

/// Cuts migration `id` over and waits until `proxy` routes the tenant to `store`.
pub(crate) async fn cut_over_until_routed(
    env: &Env,
    http: &Http,
    proxy: &ProxyProcess,
    tenant: Uuid,
    id: &str,
    store: &str,
) -> Result<()> {
    cut_over(env, id).await?;
    route_is(
        http,
        proxy,
        tenant,
        "store_id",
        store,
        Duration::from_secs(10),
    )
    .await
}

/// A counter (or gauge) without labels from the proxy's `/metrics`; 0 when absent.
async fn proxy_counter(http: &Http, proxy: &ProxyProcess, name: &str) -> Result<f64> {
    let metrics = http.get(&format!("{}/metrics", proxy.admin)).await?;
    Ok(String::from_utf8_lossy(&metrics.body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0))
}

/// The event ids of a read reply, in order.
fn read_ids(reply: &Value) -> Vec<Uuid> {
    reply["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["event_id"].as_str().and_then(|s| Uuid::parse_str(s).ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// The proxy's failed routing reloads and polls so far (`switchyard_proxy_routing_reloads_total`
/// with outcome error).
async fn reload_errors(http: &Http, proxy: &ProxyProcess) -> Result<f64> {
    let metrics = http.get(&format!("{}/metrics", proxy.admin)).await?;
    Ok(String::from_utf8_lossy(&metrics.body)
        .lines()
        .filter(|l| l.starts_with("switchyard_proxy_routing_reloads_total") && l.contains("error"))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .sum())
}

/// The control database goes silent without closing its connections (a frozen server, a
/// failover behind the same address): the proxy's routing calls give up after their timeout
/// instead of waiting for the kernel, appends go on, and once it answers again a routing change
/// made meanwhile reaches the proxy within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_control_database_never_stalls_the_routing_loop() -> Result<()> {
    let gate = TcpGate::start(PG).await?;
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 2, 5).await?;
    let http = Http::new();
    let proxy = env.proxy(&[("SWITCHYARD_CONTROL_URL", &gate.url(&env.control_url))])?;
    proxy.wait_ready(&http).await?;
    let before = reload_errors(&http, &proxy).await?;

    gate.set(GateMode::Stall);
    let stalled = Instant::now();
    // The poll in flight hangs on its frozen connection; the timeout (5 s) fails it and the
    // failure is counted while the database is still silent.
    wait_for(Duration::from_secs(12), || async {
        Ok(reload_errors(&http, &proxy).await? > before)
    })
    .await
    .context("a routing call on a silent control database never gave up")?;
    let gave_up_after = stalled.elapsed();
    let reply = http
        .post(
            &stream_url(&proxy.data, tenant, "During", Uuid::new_v4()),
            &events_body(Some(0), 1, "D"),
        )
        .await?;
    assert_eq!(reply.status.as_u16(), 201, "{:?}", reply.json);
    env.control_json(&["routing", "set", &tenant.to_string(), "dedicated"])?;

    gate.open();
    let reopened = Instant::now();
    route_is(
        &http,
        &proxy,
        tenant,
        "store_id",
        "dedicated",
        Duration::from_secs(10),
    )
    .await?;
    println!(
        "silent control database: a routing call gave up after {gave_up_after:?}; the change \
         made meanwhile reached the proxy {:?} after it answered again",
        reopened.elapsed()
    );
    Ok(())
}

/// A proxy is killed (SIGKILL) while twelve appends wait on a slow source: each append is in
/// the source whole or not at all, and retrying each through another proxy with the same
/// event ids answers 201 with exactly what the source holds. Writers on the other proxy lose
/// nothing, and the tail gives the target what the dead proxy never mirrored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_with_appends_in_flight_commits_each_whole_or_not_at_all() -> Result<()> {
    const IN_FLIGHT: usize = 12;
    let gate = TcpGate::start(PG).await?;
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 5, 20).await?;
    let gated = gate.url(env.store_url("shared"));
    let http = Http::new();
    let mut doomed = env.proxy(&[("SWITCHYARD_STORE_SHARED_URL", &gated)])?;
    let survivor = env.proxy(&[])?;
    doomed.wait_ready(&http).await?;
    survivor.wait_ready(&http).await?;
    let _serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    route_is(
        &http,
        &doomed,
        tenant,
        "state",
        "dual_write",
        Duration::from_secs(5),
    )
    .await?;
    let load = Load::start(&http, std::slice::from_ref(&survivor.data), tenant, 3);

    // Twelve appends of three events, each to a new stream, through the doomed proxy; the
    // source answers it only after 2 × 300 ms.
    gate.set(GateMode::Latency(Duration::from_millis(300)));
    let appends: Vec<(Uuid, Value)> = (0..IN_FLIGHT)
        .map(|_| (Uuid::new_v4(), events_body(Some(0), 3, "InFlight")))
        .collect();
    let clients: Vec<_> = appends
        .iter()
        .map(|(stream, body)| {
            let (http, body) = (http.clone(), body.clone());
            let url = stream_url(&doomed.data, tenant, "Flight", *stream);
            tokio::spawn(async move {
                let reply = http.post(&url, &body).await;
                (reply, Instant::now())
            })
        })
        .collect();
    let all_ids: Vec<Uuid> = appends.iter().flat_map(|(_, b)| body_ids(b)).collect();
    let mut source = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    // Kill as soon as the first of them committed: its reply is still on its way back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = ANY($1)")
            .bind(&all_ids)
            .fetch_one(&mut source)
            .await?;
        if n > 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no in-flight append committed within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    doomed.kill9();
    let killed = Instant::now();
    gate.reset();
    gate.set(GateMode::Pass);

    let mut acknowledged = Vec::new();
    for (client, (stream, body)) in clients.into_iter().zip(&appends) {
        let (reply, at) = client.await?;
        assert!(
            at.saturating_duration_since(killed) < Duration::from_secs(2),
            "a client of the killed proxy waited {:?} after the kill",
            at.saturating_duration_since(killed)
        );
        if let Ok(reply) = reply {
            // Answered before the kill: an acknowledged append like any other.
            assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
            acknowledged.push(acked_of(body, *stream, &reply.json));
        }
    }

    // Whole or nothing: each append's three events are all there or none is.
    let rows = |ids: &[Uuid]| {
        let ids = ids.to_vec();
        let url = env.store_url("shared").to_owned();
        async move {
            let mut c = sqlx::PgConnection::connect(&url).await?;
            let rows: Vec<(Uuid, i32, i64)> = sqlx::query_as(
                "SELECT event_id, version, global_position FROM events WHERE event_id = ANY($1) ORDER BY version",
            )
            .bind(&ids)
            .fetch_all(&mut c)
            .await?;
            Ok::<_, anyhow::Error>(rows)
        }
    };
    let mut committed = 0;
    for (_, body) in &appends {
        let n = rows(&body_ids(body)).await?.len();
        assert!(n == 0 || n == 3, "an append half-written: {n} of 3 events");
        committed += usize::from(n == 3);
    }
    assert!(committed >= 1, "an append committed before the kill");

    // The idempotent retry through the other proxy answers with what the source holds.
    for (stream, body) in &appends {
        let url = stream_url(&survivor.data, tenant, "Flight", *stream);
        let reply = http.post(&url, body).await?;
        assert_eq!(reply.status, StatusCode::CREATED, "retry: {}", reply.json);
        let stored = rows(&body_ids(body)).await?;
        assert_eq!(stored.len(), 3);
        assert_eq!(
            stored.iter().map(|r| r.0).collect::<Vec<_>>(),
            body_ids(body),
            "the ids in order"
        );
        assert_eq!(reply.json["first_version"], 1);
        assert_eq!(reply.json["last_version"], 3);
        assert_eq!(
            reply.json["global_positions"],
            serde_json::json!(stored.iter().map(|r| r.2).collect::<Vec<_>>()),
            "the retry answers the original result"
        );
        acknowledged.push(acked_of(body, *stream, &reply.json));
    }

    let record = load.stop().await?;
    assert!(record.failures().is_empty(), "{:?}", record.failures());
    assert!(
        record.slowest() < Duration::from_secs(3),
        "a writer on the other proxy waited {:?}",
        record.slowest()
    );
    caught_up(&env, &id, Duration::from_secs(60)).await?;
    let source_events =
        converged(env.store_url("shared"), env.store_url("dedicated"), tenant).await?;
    verify_hash(&env, &id)?;
    let mut all = record.acked.clone();
    all.extend(acknowledged);
    assert_all_acked(&all, &source_events);
    assert_eq!(
        source_events.len(),
        100 + record.acked_events() + IN_FLIGHT * 3,
        "nothing but the seed and the acknowledged appends"
    );
    println!(
        "proxy kill: {committed} of {IN_FLIGHT} in-flight appends had committed; retries answered the original result"
    );
    Ok(())
}

/// The step boundaries of the cutover where the control process can die, in protocol order,
/// with what recovery must make of it.
const CRASH_POINTS: [(&str, &str); 7] = [
    ("after_gate_closed", "dual_write"),
    ("after_fence_taken", "dual_write"),
    ("after_delta_verified", "dual_write"),
    // The attempt failed (the budget ran out waiting for the fence) and dies before rolling back.
    ("before_rollback", "dual_write"),
    // The source's fence moved, the target still admits copiers only: finished, the recoverer
    // opens the target (never both open to writers).
    ("after_source_moved", "migrated"),
    ("after_fence", "migrated"),
    ("after_routing_flipped", "migrated"),
];

/// The control process dies (abort, as kill -9) at each step boundary of the cutover in turn,
/// on one tenant with writers throughout: `serve` rolls the cutover back when the fence had not
/// moved and finishes it when it had; writers wait no longer than the gate's limit per request
/// and go on; nothing is lost or duplicated. After the migration that finishes, the tenant
/// migrates back for the last point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_crash_at_every_cutover_step_is_finished_or_rolled_back() -> Result<()> {
    const GATE_WAIT_MS: u64 = 3000;
    let env = two_stores(&format!(
        "[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = {GATE_WAIT_MS}\n"
    ))
    .await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 10, 100).await?;
    let http = Http::new();
    let proxy = env.proxy(&[])?;
    proxy.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let mut id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    let (mut source, mut target) = ("shared", "dedicated");
    let load = Load::start(&http, std::slice::from_ref(&proxy.data), tenant, 4);
    load.progress(20, Duration::from_secs(20)).await?;

    for (point, outcome) in CRASH_POINTS {
        if fence(env.store_url(source), tenant).await?.as_deref() == Some("copiers") {
            // The last point migrated the tenant: migrate it back for the next one.
            (source, target) = (target, source);
            id = match migrate_to_dual_write(&env, tenant, target, &["--reset-target"]).await {
                Ok(id) => id,
                Err(e) => {
                    // A stream that cannot land: both stores' rows of it, to tell a split brain
                    // (two events at one version) from a gap (a version missing below others).
                    let rows = dump_named_stream(&env, &e.to_string()).await;
                    return Err(e.context(format!(
                        "migrating back to {target} before {point}; {rows}; serve log:\n{}",
                        serve.log()
                    )));
                }
            };
        }
        crash_at(&env, &http, &proxy, &load, tenant, &id, point, outcome)
            .await
            .with_context(|| format!("crash at {point}; serve log:\n{}", serve.log()))?;
        let (end_store, end_state) = match outcome {
            "migrated" => (target, "normal"),
            _ => (source, "dual_write"),
        };
        route_is(
            &http,
            &proxy,
            tenant,
            "store_id",
            end_store,
            Duration::from_secs(5),
        )
        .await?;
        route_is(
            &http,
            &proxy,
            tenant,
            "state",
            end_state,
            Duration::from_secs(5),
        )
        .await?;
        let (actions, _) = audit(&env, &id)?;
        let last = actions.last().map_or("", String::as_str);
        assert_eq!(
            last,
            if outcome == "migrated" {
                "cutover_done"
            } else {
                "cutover_rollback"
            },
            "{point}: {actions:?}"
        );
        load.progress(20, Duration::from_secs(20))
            .await
            .with_context(|| format!("writers after {point}"))?;
    }

    let record = load.stop().await?;
    // The tenant lives in `dedicated` again (migrated there last), which holds everything.
    assert_eq!(target, "dedicated");
    let home = tenant_events(env.store_url(target), tenant).await?;
    assert_all_acked(&record.acked, &home);
    assert_eq!(
        home.len(),
        1000 + record.acked_events(),
        "nothing else, nothing twice"
    );
    contains_all(&home, &tenant_events(env.store_url(source), tenant).await?);
    let failures = record.failures();
    assert!(
        failures.keys().all(|k| k == "503 writes_paused"),
        "only gate waits past the limit failed, and were retried: {failures:?}"
    );
    assert!(
        record.slowest() < Duration::from_millis(GATE_WAIT_MS + 2000),
        "a writer waited {:?} (gate_wait_ms = {GATE_WAIT_MS})",
        record.slowest()
    );
    println!(
        "crash points: {} appends acknowledged, failures {failures:?}, slowest attempt {:?}",
        record.acked.len(),
        record.slowest()
    );
    Ok(())
}

/// Every row, in both stores, of the stream a migration error names (`(type/id version n)`),
/// as text for the failure message; what the error does not name is said so.
async fn dump_named_stream(env: &Env, error: &str) -> String {
    let named = error.split('(').skip(1).find_map(|part| {
        let (stream, _) = part.split_once(" version ")?;
        let (_, id) = stream.split_once('/')?;
        Uuid::parse_str(id).ok()
    });
    let Some(stream) = named else {
        return "the error names no stream".to_owned();
    };
    let mut out = format!("rows of stream {stream}:");
    for store in ["shared", "dedicated"] {
        let rows: Result<Vec<(i32, Uuid, i64, String)>, _> = async {
            let mut conn = sqlx::PgConnection::connect(env.store_url(store)).await?;
            sqlx::query_as(
                "SELECT version, event_id, global_position, created_at::text FROM events
                  WHERE aggregate_id = $1 ORDER BY version, global_position",
            )
            .bind(stream)
            .fetch_all(&mut conn)
            .await
        }
        .await;
        out.push_str(&format!("\n  {store}: {rows:?}"));
    }
    out
}

/// One crash: `cutover` with `SWITCHYARD_CRASH_AT=point` dies there; the migration is left in
/// `cutover` (or already migrated), writers wait at the gate, and `serve` recovers it to
/// `outcome` with the source fence agreeing.
#[allow(clippy::too_many_arguments)]
async fn crash_at(
    env: &Env,
    http: &Http,
    proxy: &ProxyProcess,
    load: &Load,
    tenant: Uuid,
    id: &str,
    point: &str,
    outcome: &str,
) -> Result<()> {
    let record = env.control_json(&["status", id])?;
    let source = record["source_store_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    caught_up(env, id, Duration::from_secs(60)).await?;
    // `before_rollback` needs a failing attempt: the fence held past a short budget.
    let holder = if point == "before_rollback" {
        Some(hold_fence(env.store_url(&source), tenant).await?)
    } else {
        None
    };
    let budget = if holder.is_some() { "500" } else { "5000" };
    let out = control_off_thread(
        env,
        &["cutover", id, "--timeout-ms", budget],
        &[("SWITCHYARD_CRASH_AT", point)],
    )
    .await?;
    if let Some(mut holder) = holder {
        sqlx::query("ROLLBACK").execute(&mut holder).await?;
    }
    ensure!(
        out.code != 0 && out.stderr.contains(&format!("crashing at {point}")),
        "the control process did not die at {point}: exit {}\n{}{}",
        out.code,
        out.stdout,
        out.stderr
    );
    // Before any recovery: never both fences open to writers (the target opens only after the
    // source's fence moved).
    let target = record["target_store_id"].as_str().unwrap_or_default();
    let both = (
        fence(env.store_url(&source), tenant).await?,
        fence(env.store_url(target), tenant).await?,
    );
    ensure!(
        both.0.as_deref() != Some("open") || both.1.as_deref() != Some("open"),
        "right after the crash at {point} both fences are open ({source}, {target}: {both:?})"
    );
    let state = env.control_json(&["status", id])?["state"].clone();
    let expected_now = if point == "after_routing_flipped" {
        "migrated"
    } else {
        "cutover"
    };
    if state != expected_now {
        bail!("right after the crash the migration is {state}, expected {expected_now}");
    }
    if expected_now == "cutover" {
        // Writers are held meanwhile, at the gate.
        route_is(
            http,
            proxy,
            tenant,
            "state",
            "cutover_paused",
            Duration::from_secs(5),
        )
        .await?;
    }
    let acked = load.acked();
    wait_for_every(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async { Ok(env.control_json(&["status", id])?["state"] == outcome) },
    )
    .await
    .with_context(|| format!("not {outcome} after the crash"))?;
    // The source's fence moved only if the cutover went forward; the target admits writers
    // only once its cutover committed (invariant 8).
    let expected = if outcome == "migrated" {
        // Moved for writers; copiers only, for reverse replication (the default).
        [(source.as_str(), "copiers"), (target, "open")]
    } else {
        [(source.as_str(), "open"), (target, "copiers")]
    };
    for (store, state) in expected {
        let now = fence(env.store_url(store), tenant).await?;
        ensure!(
            now.as_deref() == Some(state),
            "the fence in {store} is {now:?}, expected {state}"
        );
    }
    load.progress(5, Duration::from_secs(10)).await?;
    println!(
        "{point}: {outcome} ({} appends acknowledged meanwhile)",
        load.acked() - acked
    );
    Ok(())
}

/// A migration's `(state, events_copied, events_total)`, read from the control database.
async fn copy_progress(control: &mut sqlx::PgConnection, id: Uuid) -> Result<(String, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT state, events_copied, events_total FROM tenant_migrations WHERE id = $1",
    )
    .bind(id)
    .fetch_one(control)
    .await?)
}

/// The source's PostgreSQL server (a private cluster) restarts (`pg_ctl restart -m fast`) in
/// the middle of the bulk copy: the copy's connections are cut, the copy goes on from its
/// checkpoint once the server is back (a failed batch is taken up again by `serve`), and it
/// completes with every event copied once and the target equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_restart_during_bulk_copy_resumes_from_the_checkpoint() -> Result<()> {
    const EVENTS: i64 = 30_000;
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await??;
    let source_url = cluster.create_db("source").await?;
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    let config = std::fs::read_to_string(&env.config_path)?.replace(
        &format!("\"{}\"", env.store_url("shared")),
        &format!("\"{source_url}\""),
    );
    std::fs::write(&env.config_path, config)?;
    env.control_json(&["init"])?;
    let tenant = Uuid::new_v4();
    seed_sql(&source_url, tenant, EVENTS).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let started = env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        "dedicated",
        "--batch-size",
        "500",
        "--max-rate",
        "4000",
        "--detach",
    ])?;
    let id = Uuid::parse_str(started["id"].as_str().unwrap_or_default())?;

    let mut control = sqlx::PgConnection::connect(&env.control_url).await?;
    let mut progress: Vec<(String, i64)> = Vec::new();
    loop {
        let (state, copied, _) = copy_progress(&mut control, id).await?;
        progress.push((state.clone(), copied));
        ensure!(
            state == "pending" || state == "bulk_copy",
            "copy ended before the restart: {state}"
        );
        if copied >= EVENTS / 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restart = Instant::now();
    let cluster =
        tokio::task::spawn_blocking(move || cluster.restart().map(|()| cluster)).await??;
    let restart_took = restart.elapsed();
    let at_restart = progress.last().map_or(0, |p| p.1);
    let (_, after_restart, _) = copy_progress(&mut control, id).await?;
    assert!(
        after_restart < EVENTS,
        "the copy was still running when the server came back: {after_restart}"
    );

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (state, copied, total) = copy_progress(&mut control, id).await?;
        progress.push((state.clone(), copied));
        if state == "dual_write" {
            assert_eq!(total, EVENTS, "the copy counted the tenant");
            assert_eq!(copied, EVENTS, "every event copied once: {progress:?}");
            break;
        }
        ensure!(
            state == "bulk_copy" && Instant::now() < deadline,
            "the copy did not complete: {state} at {copied}\nserve log:\n{}\nserver log:\n{}",
            serve.log(),
            cluster.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let copied: Vec<i64> = progress.iter().map(|p| p.1).collect();
    assert!(
        copied.windows(2).all(|w| w[0] <= w[1]),
        "the copy went on from its checkpoint, never back: {copied:?}"
    );
    // The restart cut the copy's connections: a batch in flight fails the drive (and `serve`
    // takes it up again from the checkpoint), an idle pooled one fails its ping and is
    // replaced (sqlx logs it); connecting while the server is down waits within the pool's
    // acquire timeout.
    let log = serve.log();
    assert!(
        log.contains("driving failed")
            || log.contains("terminating connection due to administrator command"),
        "the restart reached the copy's connections:\n{log}"
    );

    let source = tenant_events(&source_url, tenant).await?;
    let target = tenant_events(env.store_url("dedicated"), tenant).await?;
    assert_eq!(source.len(), usize::try_from(EVENTS)?);
    assert!(source == target, "the target equals the source");
    let report = verify_hash(&env, &id.to_string())?;
    assert_eq!(report["target_event_count"], EVENTS);
    let (mapped, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT event_id) FROM migration_position_map WHERE migration_id = $1",
    )
    .bind(id)
    .fetch_one(&mut control)
    .await?;
    assert_eq!(
        (mapped, distinct),
        (EVENTS, EVENTS),
        "each event mapped once"
    );
    let by_id: HashMap<Uuid, usize> = target.iter().fold(HashMap::new(), |mut m, e| {
        *m.entry(e.event_id).or_insert(0) += 1;
        m
    });
    assert!(by_id.values().all(|n| *n == 1), "no event copied twice");
    println!(
        "source restart: at {at_restart} of {EVENTS} copied (back up at {after_restart}); restart took {restart_took:?}; drive failed: {}",
        log.contains("driving failed")
    );
    Ok(())
}

/// The connection carrying the fence's move is cut right after it forwarded the `COMMIT`
/// (issue 14, item 5): the server commits the move, the cutover gets no answer. The cutover
/// reads the fence again on a fresh session and goes forward by what it says: migrated, the
/// tenant writable on the target, nothing lost. (A cutover that took the lost answer for a
/// rollback would route the tenant back onto its moved source fence: every append refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_move_whose_commit_answer_is_lost_goes_forward() -> Result<()> {
    let gate = TcpGate::start(PG).await?;
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 5, 20).await?;
    let http = Http::new();
    let proxy = env.proxy(&[])?;
    proxy.wait_ready(&http).await?;
    let _serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    route_is(
        &http,
        &proxy,
        tenant,
        "state",
        "dual_write",
        Duration::from_secs(5),
    )
    .await?;
    let load = Load::start(&http, std::slice::from_ref(&proxy.data), tenant, 3);
    load.progress(10, Duration::from_secs(20)).await?;

    // Only the cutover reaches the source through the gate; its first COMMIT there is the
    // fence's move (everything before it reads without a transaction).
    let gated = gate.url(env.store_url("shared"));
    gate.cut_after_next_commit();
    let out = control_off_thread(
        &env,
        &["--json", "cutover", &id, "--timeout-ms", "5000"],
        &[("SWITCHYARD_STORE_SHARED_URL", gated.as_str())],
    )
    .await?;
    assert_eq!(gate.commit_cuts(), 1, "the move's COMMIT was cut: {out:?}");
    let report = first_json(&out.stdout)?;
    assert_eq!(report["success"], true, "{report} {}", out.stderr);
    assert_eq!(report["state"], "migrated", "{report}");
    assert_eq!(
        fence(env.store_url("shared"), tenant).await?.as_deref(),
        Some("copiers")
    );
    route_is(
        &http,
        &proxy,
        tenant,
        "store_id",
        "dedicated",
        Duration::from_secs(5),
    )
    .await?;
    load.progress(10, Duration::from_secs(10)).await?;
    let record = load.stop().await?;
    assert!(record.acked.iter().any(|a| a.store_id == "dedicated"));
    let target = tenant_events(env.store_url("dedicated"), tenant).await?;
    assert_all_acked(&record.acked, &target);
    contains_all(
        &target,
        &tenant_events(env.store_url("shared"), tenant).await?,
    );
    Ok(())
}

/// The `cutover` process is frozen (SIGSTOP) right as it gets the fence (issue 14, item 6):
/// PostgreSQL ends its fence transaction after the budget plus the margin of idleness, `serve`
/// finds the cutover abandoned and rolls it back from what the fence says, and writers are
/// served again soon after, not when someone notices. The frozen process, once resumed,
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_process_frozen_inside_the_fence_loses_it_within_the_budget() -> Result<()> {
    const BUDGET_MS: u64 = 2000;
    let env = two_stores(&format!(
        "[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 1000\n\n[control]\ncutover_timeout_ms = {BUDGET_MS}\n"
    ))
    .await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 5, 20).await?;
    let http = Http::new();
    let proxy = env.proxy(&[])?;
    proxy.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    route_is(
        &http,
        &proxy,
        tenant,
        "state",
        "dual_write",
        Duration::from_secs(5),
    )
    .await?;
    let load = Load::start(&http, std::slice::from_ref(&proxy.data), tenant, 3);
    load.progress(10, Duration::from_secs(20)).await?;

    // The cutover queues for the fence behind a session holding it, and is frozen there; the
    // session lets go, so the frozen process's transaction gets the fence and sits idle.
    let mut holder = hold_fence(env.store_url("shared"), tenant).await?;
    let mut cutover = std::process::Command::new(switchyard_tests::bin("switchyard-control"))
        .arg("--config")
        .arg(&env.config_path)
        .args(["--json", "cutover", &id])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut watcher = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    let queued_by = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND query LIKE '%switchyard_fences%FOR UPDATE%'",
        )
        .fetch_one(&mut watcher)
        .await?;
        // The cutover records its state while it takes the fence (at the same time, not
        // before): frozen before that record, it would leave nothing for serve to roll back.
        if waiting == 1 && env.control_json(&["status", &id])?["state"] == "cutover" {
            break;
        }
        ensure!(
            Instant::now() < queued_by,
            "the cutover never queued for the fence"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &cutover.id().to_string()])
            .status()
    };
    ensure!(signal("-STOP")?.success(), "SIGSTOP");
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    let frozen_at = Instant::now();
    // The frozen process's transaction holds the fence, idle (its client cannot go on).
    let held_by = Instant::now() + Duration::from_secs(2);
    loop {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE state LIKE 'idle in transaction%' AND query LIKE '%switchyard_fences%FOR UPDATE%'",
        )
        .fetch_one(&mut watcher)
        .await?;
        if held == 1 {
            break;
        }
        ensure!(
            Instant::now() < held_by,
            "the frozen cutover never held the fence"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let outcome = async {
        // Served again: the budget plus the margin, plus serve's scan and the proxies' reload.
        load.progress(5, Duration::from_millis(BUDGET_MS + 1000 + 5000))
            .await
            .context("writers were not served again after the freeze")?;
        let served_after = frozen_at.elapsed();
        ensure!(
            env.control_json(&["status", &id])?["state"] == "dual_write",
            "serve rolled the cutover back"
        );
        let (actions, last) = audit(&env, &id)?;
        ensure!(
            actions.last().map(String::as_str) == Some("cutover_rollback"),
            "{actions:?}"
        );
        ensure!(
            last["reason"]
                .as_str()
                .is_some_and(|r| r.contains("driver stopped")),
            "{last}"
        );
        Ok(served_after)
    }
    .await;
    // Resumed, the frozen process finds its session gone and changes nothing.
    let _ = signal("-CONT");
    let finished = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = cutover.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = cutover.kill();
                bail!("the resumed cutover never exited");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await??;
    let served_after = outcome.with_context(|| format!("serve log:\n{}", serve.log()))?;
    assert!(!finished.success(), "the frozen cutover cannot succeed");
    assert_eq!(env.control_json(&["status", &id])?["state"], "dual_write");
    assert_eq!(
        fence(env.store_url("shared"), tenant).await?.as_deref(),
        Some("open")
    );
    load.progress(5, Duration::from_secs(10)).await?;
    let record = load.stop().await?;
    assert_all_acked(
        &record.acked,
        &tenant_events(env.store_url("shared"), tenant).await?,
    );
    println!("frozen inside the fence: writers served again after {served_after:?}");
    Ok(())
}

/// `cutover` and `emergency-stop` started together, the stop 120–1420 ms after the gates
/// closed, round after round, while writers append (issue 14, item 1); the cutover's link to
/// the source is slowed (15 ms each way) so that the stop often lands while the cutover holds
/// the fence.
/// Whoever wins, after each round: routing is normal; a migration the stop failed left the
/// tenant on its source, one that finished left it on its target; every acknowledged append is
/// on the store routing names, and appends succeed there again within the cutover's budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emergency_stop_racing_a_cutover_leaves_the_tenant_writable_where_routing_points(
) -> Result<()> {
    const ROUNDS: usize = 10;
    const BUDGET_MS: u64 = 3000;
    let gate = TcpGate::start(PG).await?;
    gate.set(GateMode::Latency(Duration::from_millis(15)));
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 1000\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 5, 20).await?;
    let http = Http::new();
    let proxy = env.proxy(&[])?;
    proxy.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let mut home = "shared".to_owned();
    let mut acked: Vec<Acked> = Vec::new();
    let mut outcomes = BTreeMap::new();
    for round in 0..ROUNDS {
        let to = if home == "shared" {
            "dedicated"
        } else {
            "shared"
        };
        let reset: &[&str] = if round == 0 { &[] } else { &["--reset-target"] };
        let id = migrate_to_dual_write(&env, tenant, to, reset).await?;
        route_is(
            &http,
            &proxy,
            tenant,
            "state",
            "dual_write",
            Duration::from_secs(5),
        )
        .await?;
        let load = Load::start(&http, std::slice::from_ref(&proxy.data), tenant, 3);
        load.progress(5, Duration::from_secs(20)).await?;

        let offset = Duration::from_millis(120 + u64::try_from(Uuid::new_v4().as_u128() % 1300)?);
        let source_var = format!("SWITCHYARD_STORE_{}_URL", home.to_uppercase());
        let slowed = gate.url(env.store_url(&home));
        let budget = BUDGET_MS.to_string();
        let tenant_arg = tenant.to_string();
        let cutover_args = ["--json", "cutover", &id, "--timeout-ms", &budget];
        let cutover_vars = [(source_var.as_str(), slowed.as_str())];
        let cutover = control_off_thread(&env, &cutover_args, &cutover_vars);
        // The stop starts `offset` after the gates closed (seen in the control database), so
        // that it lands before, while, or after the cutover holds the fence.
        let stop = async {
            let mut control = sqlx::PgConnection::connect(&env.control_url).await?;
            let closed_by = Instant::now() + Duration::from_secs(10);
            while Instant::now() < closed_by {
                let state: String =
                    sqlx::query_scalar("SELECT state FROM tenant_migrations WHERE id = $1::uuid")
                        .bind(&id)
                        .fetch_one(&mut control)
                        .await?;
                if state != "dual_write" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(offset).await;
            control_off_thread(
                &env,
                &[
                    "--json",
                    "emergency-stop",
                    "--tenant",
                    &tenant_arg,
                    "--reason",
                    "race",
                ],
                &[],
            )
            .await
        };
        let (cut, stopped) = tokio::join!(cutover, stop);
        let (cut, stopped) = (cut?, stopped?);
        let context = || {
            format!(
                "round {round} (stop after {offset:?}): cutover exit {} {}{}\nstop exit {} {}{}\nserve log:\n{}",
                cut.code,
                cut.stdout,
                cut.stderr,
                stopped.code,
                stopped.stdout,
                stopped.stderr,
                serve.log()
            )
        };
        ensure!(
            stopped.code == 0,
            "the emergency stop failed: {}",
            context()
        );
        let state = env.control_json(&["status", &id])?["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let route = env.control_json(&["routing", "get", &tenant_arg])?;
        let routed = route["store_id"].as_str().unwrap_or_default().to_owned();
        ensure!(
            route["migration_state"] == "normal",
            "routing {route}: {}",
            context()
        );
        let expected = match state.as_str() {
            "migrated" => to.to_owned(),
            "failed" => home.clone(),
            other => bail!("the migration is {other}: {}", context()),
        };
        ensure!(
            routed == expected,
            "the migration is {state} but routing names {routed}: {}",
            context()
        );
        // Appends succeed on the store routing names within the budget (plus the proxies'
        // reload).
        let probe_url = stream_url(&proxy.data, tenant, "Probe", Uuid::new_v4());
        let probe = events_body(Some(0), 1, "Probe");
        let deadline = Instant::now() + Duration::from_millis(BUDGET_MS + 2000);
        let reply = loop {
            let reply = http.post(&probe_url, &probe).await?;
            if reply.status == StatusCode::CREATED || Instant::now() > deadline {
                break reply;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        ensure!(
            reply.status == StatusCode::CREATED && reply.json["store_id"] == routed.as_str(),
            "a probe append got {} {}: {}",
            reply.status,
            reply.json,
            context()
        );
        load.progress(5, Duration::from_secs(10))
            .await
            .with_context(context)?;
        acked.extend(load.stop().await?.acked);
        acked.push(acked_of(&probe, probe_url_stream(&probe_url), &reply.json));
        let events = tenant_events(env.store_url(&routed), tenant).await?;
        let present: HashSet<Uuid> = events.iter().map(|e| e.event_id).collect();
        let missing = acked
            .iter()
            .flat_map(|a| &a.event_ids)
            .filter(|id| !present.contains(id))
            .count();
        ensure!(
            missing == 0,
            "{missing} acknowledged events are not on {routed}, the store routing names: {}",
            context()
        );
        assert_all_acked(&acked, &events);
        println!(
            "round {round}: stop after {offset:?}, {state}; cutover {}",
            first_json(&cut.stdout).map_or_else(
                |_| cut.stderr.clone(),
                |r| format!("{} {} {}", r["steps_ms"], r["error"], r["message"])
            )
        );
        *outcomes.entry(state).or_insert(0) += 1;
        home = routed;
    }
    println!("cutover against emergency stop, {ROUNDS} rounds: {outcomes:?}");
    Ok(())
}

/// The stream id in a stream URL `…/streams/{type}/{id}/events`.
fn probe_url_stream(url: &str) -> Uuid {
    url.rsplit('/')
        .nth(1)
        .and_then(|id| Uuid::parse_str(id).ok())
        .unwrap_or_default()
}

/// Fairness during a hot tenant's cutover (issue 15, item 8; docs/architecture.md "Fairness
/// during a migration"). One proxy has not heard of the cutover: its control link is
/// blackholed, so its route of the hot tenant stays `dual_write`. A session holds the hot
/// tenant's source fence `FOR UPDATE`, as a cutover does, so that proxy's appends of the hot
/// tenant block on the fence row inside PostgreSQL, each on a pool connection. 40 writers of
/// the hot tenant (more than the 16 request slots and the 8 connections of the store) append
/// without pause. Meanwhile another tenant on the same store appends through the same proxy:
/// each of its appends succeeds. The hot tenant holds at most its share (the default 0.5) of
/// the connections, and its refused appends are 503 `tenant_overloaded`, retryable.
///
/// Before the share existed the hot tenant's appends took all 8 connections and the request
/// slots, and the other tenant's appends were shed (503 `overloaded`) or timed out waiting for
/// a connection (503 `store_unavailable` after the pool's 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_tenants_cutover_seen_by_a_stale_proxy_never_sheds_another_tenant() -> Result<()> {
    const HOT_WRITERS: usize = 40;
    // ceil(0.5 × 8): the harness gives each store a pool of 8.
    const HOT_CONNECTIONS: i64 = 4;
    let gate = TcpGate::start(PG).await?;
    let env = two_stores(
        "[proxy]\nrouting_poll_ms = 100\nmax_concurrent_requests = 16\nrequest_timeout_ms = 20000\n",
    )
    .await?;
    let (hot, other) = (Uuid::new_v4(), Uuid::new_v4());
    seed(env.store_url("shared"), hot, 2, 5).await?;
    seed(env.store_url("shared"), other, 1, 1).await?;
    let http = Http::new();
    let proxy = env.proxy(&[("SWITCHYARD_CONTROL_URL", &gate.url(&env.control_url))])?;
    proxy.wait_ready(&http).await?;
    let _serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    migrate_to_dual_write(&env, hot, "dedicated", &[]).await?;
    route_is(
        &http,
        &proxy,
        hot,
        "state",
        "dual_write",
        Duration::from_secs(5),
    )
    .await?;
    // From here on the proxy hears of nothing: a cutover would not reach it.
    gate.set(GateMode::Blackhole);
    let mut holder = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    sqlx::query("BEGIN").execute(&mut holder).await?;
    let held = sqlx::query("SELECT 1 FROM switchyard_fences WHERE tenant_id = $1 FOR UPDATE")
        .bind(hot)
        .execute(&mut holder)
        .await?;
    ensure!(held.rows_affected() == 1, "the hot tenant has a fence row");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writers: Vec<_> = (0..HOT_WRITERS)
        .map(|_| {
            let (http, stopped) = (http.clone(), stopped.clone());
            let url = stream_url(&proxy.data, hot, "Hot", Uuid::new_v4());
            tokio::spawn(async move {
                let mut answers: BTreeMap<(u16, String, bool), usize> = BTreeMap::new();
                while !*stopped.borrow() {
                    let reply = http.post(&url, &events_body(None, 1, "Hot")).await?;
                    let code = reply.json["error"].as_str().unwrap_or_default().to_owned();
                    let retryable = reply.json["retryable"].as_bool().unwrap_or(false);
                    *answers
                        .entry((reply.status.as_u16(), code, retryable))
                        .or_insert(0) += 1;
                    if reply.status == StatusCode::SERVICE_UNAVAILABLE {
                        // A client backing off; not a synchronisation.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Ok::<_, anyhow::Error>(answers)
            })
        })
        .collect();

    // The hot tenant's appends queue behind the fence on every connection they may hold.
    let mut watcher = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    let queued_by = Instant::now() + Duration::from_secs(20);
    while appends_waiting_for_a_lock(&mut watcher).await? < HOT_CONNECTIONS {
        ensure!(
            Instant::now() < queued_by,
            "the hot tenant's appends never queued behind the fence"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The other tenant, same store, same proxy: 4 writers, 5 appends each.
    let others: Vec<_> = (0..4)
        .map(|_| {
            let http = http.clone();
            let url = stream_url(&proxy.data, other, "Other", Uuid::new_v4());
            tokio::spawn(async move {
                for version in 0..5 {
                    let reply = http
                        .post(&url, &events_body(Some(version), 1, "Other"))
                        .await?;
                    ensure!(
                        reply.status == StatusCode::CREATED,
                        "the other tenant's append {version} was answered {}: {}",
                        reply.status,
                        String::from_utf8_lossy(&reply.body)
                    );
                }
                Ok(())
            })
        })
        .collect();
    let mut most_blocked = 0;
    for handle in others {
        handle.await??;
        most_blocked = most_blocked.max(appends_waiting_for_a_lock(&mut watcher).await?);
    }
    let feed = http.get(&feed_url(&proxy.data, other)).await?;
    ensure!(
        feed.status == StatusCode::OK,
        "the other tenant's feed read"
    );
    let metrics = http.get(&format!("{}/metrics", proxy.admin)).await?;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();

    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    let _ = stop.send(true);
    let mut answers: BTreeMap<(u16, String, bool), usize> = BTreeMap::new();
    for writer in writers {
        for (answer, n) in writer.await?? {
            *answers.entry(answer).or_insert(0) += n;
        }
    }
    gate.open();
    println!("hot tenant's answers (status, code, retryable): {answers:?}; most appends blocked at the fence: {most_blocked}");
    ensure!(
        most_blocked <= HOT_CONNECTIONS,
        "{most_blocked} appends held connections at the fence"
    );
    for ((status, code, retryable), n) in &answers {
        ensure!(
            *status == 201 || (*status == 503 && code == "tenant_overloaded" && *retryable),
            "the hot tenant got {n} × {status} {code} (retryable {retryable})"
        );
    }
    ensure!(
        answers
            .keys()
            .any(|(_, code, _)| code == "tenant_overloaded"),
        "the hot tenant was held to its share: {answers:?}"
    );
    ensure!(
        metrics.lines().any(|l| l.starts_with(
            "switchyard_proxy_shed_requests_total{reason=\"migrating_tenant_requests\"}"
        ) && !l.ends_with(" 0")),
        "refusals counted by reason"
    );
    let stored = tenant_events(env.store_url("shared"), other).await?;
    ensure!(
        stored.len() == 1 + 20,
        "{} events of the other tenant",
        stored.len()
    );
    Ok(())
}

/// Appends waiting for a lock in the watcher's database now (each holds a pool connection).
async fn appends_waiting_for_a_lock(watcher: &mut sqlx::PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock'
            AND query LIKE '%switchyard_append%'",
    )
    .fetch_one(watcher)
    .await?)
}
