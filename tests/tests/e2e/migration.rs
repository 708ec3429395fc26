//! Migrations end to end with the real binaries: proxies and `serve` as processes, writers
//! appending throughout, and the target compared with the source event by event.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard_store::EventStore;
use switchyard_tests::{
    caught_up, converged, for_each_backend, seed, tenant_events, wait_for, wait_for_every, Backend,
    Env, GateMode, Http, ProxyProcess, Result, ServeProcess, TcpGate, Writers,
};
use uuid::Uuid;

fn migration_id(started: &Value) -> Result<String> {
    started["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no id in {started}"))
}

async fn status(env: &Env, id: &str) -> Result<Value> {
    env.control_json(&["status", id])
}

/// The main scenario: a 100,000-event tenant over 1,000 streams migrates while 16
/// writers append through two proxies; the target ends up holding exactly the source's events
/// of that tenant and nothing of any other tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_tenant_is_copied_exactly_while_writers_append() -> Result<()> {
    for_each_backend(live_tenant).await
}

/// [`a_live_tenant_is_copied_exactly_while_writers_append`] on one backend: 100,000 events
/// over 1,000 streams and 16 writers on PostgreSQL; 10,000 over 100 and 4 writers on the
/// embedded default, where every append takes the one write lock the copy also needs.
async fn live_tenant(backend: Backend) -> Result<()> {
    let (streams, writer_count) = match backend {
        Backend::Postgres => (1000, 16),
        Backend::Sqlite => (100, 4),
    };
    let seeded = i64::try_from(streams * 100)?;
    let env = Env::new(
        backend,
        &["shared", "dedicated"],
        "[proxy]\nrouting_poll_ms = 200\n",
    )
    .await?;
    env.control_json(&["init"])?;
    let (tenant, neighbour) = (Uuid::new_v4(), Uuid::new_v4());
    seed(env.store_url("shared"), tenant, streams, 100).await?;
    seed(env.store_url("shared"), neighbour, 20, 10).await?;
    let http = Http::new();
    let proxies = [env.proxy(&[])?, env.proxy(&[])?];
    for p in &proxies {
        p.wait_ready(&http).await?;
    }
    let bases: Vec<String> = proxies.iter().map(|p| p.data.clone()).collect();
    let writers = Writers::start(
        &http,
        &bases,
        tenant,
        writer_count,
        4,
        Duration::from_millis(20),
    );
    let neighbours = Writers::start(&http, &bases, neighbour, 2, 2, Duration::from_millis(50));
    let _serve = ServeProcess::spawn(&env.config_path, "w1", &[])?;

    let started = env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        "dedicated",
        "--batch-size",
        "5000",
        "--detach",
    ])?;
    assert_eq!(started["tenant_id"], json!(tenant));
    let id = migration_id(&started)?;
    caught_up(&env, &id, Duration::from_secs(300)).await?;
    // Verification while the writers keep writing (issue 5): the rows below the tail's
    // horizon are compared; newer mirrored rows must exist in the source.
    for level in ["count", "hash"] {
        let report = env.control_json(&["verify", &id, "--level", level])?;
        assert_eq!(report["consistent"], true, "{level}: {report}");
        assert!(
            report["source_event_count"].as_i64().unwrap_or(0) >= seeded,
            "{report}"
        );
        assert_eq!(
            report["source_event_count"], report["target_event_count"],
            "{report}"
        );
        assert_eq!(
            report["streams_verified"], report["streams_consistent"],
            "{report}"
        );
        assert!(
            report["streams_verified"].as_u64().unwrap_or(0) >= streams as u64,
            "{report}"
        );
    }
    // Keep writing in dual-write for a moment: the mirror and the tail both carry writes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = writers.stop().await?;
    neighbours.stop().await?;
    caught_up(&env, &id, Duration::from_secs(90)).await?;

    let target = converged(env.store_url("shared"), env.store_url("dedicated"), tenant).await?;
    assert!(
        i64::try_from(target.len())? > seeded,
        "writers added to the seed: {}",
        target.len()
    );
    switchyard_tests::assert_all_acked(&acked, &target);
    assert!(
        tenant_events(env.store_url("dedicated"), neighbour)
            .await?
            .is_empty(),
        "no other tenant's events"
    );

    // Each stream's versions appear in the target's global order.
    let store = EventStore::connect("t", env.store_url("dedicated"), 2)?;
    let mut last: std::collections::HashMap<Uuid, i32> = std::collections::HashMap::new();
    let mut after = 0;
    loop {
        let page = store.read_tenant(tenant, after, 10_000).await?;
        let Some(tail) = page.last() else { break };
        after = tail.global_position;
        for e in &page {
            let previous = last.insert(e.aggregate_id, e.version).unwrap_or(0);
            assert_eq!(
                e.version,
                previous + 1,
                "stream {} out of order in the target",
                e.aggregate_id
            );
        }
    }
    let s = status(&env, &id).await?;
    // The copy horizon also took in what the writers committed before the copy began.
    assert!(s["events_total"].as_i64().unwrap_or(0) >= seeded, "{s}");
    assert_eq!(s["events_copied"], s["events_total"]);
    assert_eq!(s["progress_percentage"], 100.0);
    for key in [
        "id",
        "tenant_id",
        "state",
        "source_store_id",
        "target_store_id",
        "error_message",
        "created_at",
        "started_at",
        "completed_at",
        "lag",
    ] {
        assert!(s.get(key).is_some(), "status --json lacks {key}");
    }
    // Every target event is mapped for checkpoint translation.
    let translated = env.control_json(&[
        "positions",
        "translate",
        &id,
        "--source-position",
        "1000000000",
    ])?;
    assert_eq!(translated["exact"], false);
    Ok(())
}

/// `serve` killed with SIGKILL in the middle of the copy: another replica takes the claim over
/// within seconds and continues from the checkpoint; at most one batch is redone and nothing
/// is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_replaced_and_the_copy_resumes_from_its_checkpoint() -> Result<()> {
    for_each_backend(killed_worker).await
}

async fn killed_worker(backend: Backend) -> Result<()> {
    let env = Env::new(backend, &["shared", "dedicated"], "").await?;
    env.control_json(&["init"])?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 300, 100).await?;
    let batch = 1000;
    let mut first = ServeProcess::spawn(&env.config_path, "first", &[])?;
    let started = env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        "dedicated",
        "--batch-size",
        &batch.to_string(),
        "--max-rate",
        "6000",
        "--detach",
    ])?;
    let id = migration_id(&started)?;
    wait_for_every(
        Duration::from_secs(90),
        Duration::from_millis(100),
        || async {
            Ok(status(&env, &id).await?["events_copied"]
                .as_i64()
                .unwrap_or(0)
                >= 5000)
        },
    )
    .await?;
    let claimed_by = status(&env, &id).await?["claimed_by"].clone();
    assert_eq!(claimed_by, "first");
    first.kill9();
    let killed_at = Instant::now();
    let checkpoint = status(&env, &id).await?["events_copied"]
        .as_i64()
        .unwrap_or(0);
    let in_target =
        switchyard_tests::count_events(env.store_url("dedicated"), Some(tenant)).await?;
    assert!(
        in_target >= checkpoint && in_target - checkpoint <= batch,
        "target {in_target} vs checkpoint {checkpoint}"
    );

    let _second = ServeProcess::spawn(&env.config_path, "second", &[])?;
    wait_for(Duration::from_secs(60), || async {
        Ok(status(&env, &id).await?["claimed_by"] == "second")
    })
    .await?;
    assert!(
        killed_at.elapsed() < Duration::from_secs(30),
        "taken over after {:?}",
        killed_at.elapsed()
    );
    caught_up(&env, &id, Duration::from_secs(60)).await?;
    assert_eq!(
        converged(env.store_url("shared"), env.store_url("dedicated"), tenant)
            .await?
            .len(),
        30_000
    );
    let redone = in_target - checkpoint;
    eprintln!("checkpoint {checkpoint}, rows already in the target at the kill {in_target}: {redone} redone (batch {batch})");
    Ok(())
}

/// Issue 14 item 8: a foreground `migrate start` whose copy outlasts the 5 s claim lease, beside
/// two `serve` replicas, completes without the claim bouncing between workers: the driver
/// renews its claim while it copies, and creates the migration already claimed, so no replica
/// takes it in between. (The 300,000 events fail today for the same reason as these
/// 2,400 at `--max-rate 300`, an 8 s copy: the lease is time, not size.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreground_copy_longer_than_the_lease_keeps_its_claim_beside_two_replicas() -> Result<()>
{
    for_each_backend(|backend| async move {
        let env = Env::new(backend, &["shared", "dedicated"], "").await?;
        env.control_json(&["init"])?;
        let tenant = Uuid::new_v4();
        seed(env.store_url("shared"), tenant, 24, 100).await?;
        let _w1 = ServeProcess::spawn(&env.config_path, "w1", &[])?;
        let _w2 = ServeProcess::spawn(&env.config_path, "w2", &[])?;
        let started = Instant::now();
        let done = env.control_json(&[
            "migrate",
            "start",
            "--tenant",
            &tenant.to_string(),
            "--to",
            "dedicated",
            "--batch-size",
            "100",
            "--max-rate",
            "300",
        ])?;
        assert!(
            started.elapsed() > Duration::from_secs(6),
            "the copy must outlast the lease for this test to mean anything"
        );
        assert_eq!(done["state"], "dual_write", "{done}");
        let id = migration_id(&done)?;
        let record = status(&env, &id).await?;
        assert_eq!(record["events_copied"], 2400, "{record}");
        // Only the foreground driver ever wrote progress: no replica held the claim meanwhile.
        let audit = env.control_json(&["audit", &id])?;
        let actors: HashSet<String> = audit
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| e["action"] == "start_copy" || e["action"] == "copy_done")
                    .filter_map(|e| e["actor"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            actors.len(),
            1,
            "one driver started and finished the copy: {audit}"
        );
        assert!(
            !actors
                .iter()
                .any(|a| a.ends_with(":w1") || a.ends_with(":w2")),
            "the foreground process drove it: {actors:?}"
        );
        converged(env.store_url("shared"), env.store_url("dedicated"), tenant).await?;
        Ok(())
    })
    .await
}

/// Pause and resume in bulk copy and in dual-write, then abort: states, routing, audit rows
/// and data exactly as the runbook describes; on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_abort_behave_as_the_runbook_says() -> Result<()> {
    switchyard_tests::for_each_backend(|backend| async move {
        let env = Env::new(
            backend,
            &["shared", "dedicated"],
            "[proxy]\nrouting_poll_ms = 100\n",
        )
        .await?;
        env.control_json(&["init"])?;
        let tenant = Uuid::new_v4();
        seed(env.store_url("shared"), tenant, 100, 100).await?;
        let http = Http::new();
        let proxy = env.proxy(&[])?;
        proxy.wait_ready(&http).await?;
        let _serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
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
        let id = migration_id(&started)?;
        wait_for(Duration::from_secs(60), || async {
            Ok(status(&env, &id).await?["events_copied"]
                .as_i64()
                .unwrap_or(0)
                > 0)
        })
        .await?;

        // Pause in bulk copy: progress stops at a batch boundary and stays.
        let paused = env.control_json(&["pause", &id, "--reason", "maintenance"])?;
        assert_eq!(paused["state"], "paused");
        assert_eq!(paused["paused_from"], "bulk_copy");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = status(&env, &id).await?["events_copied"].clone();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            status(&env, &id).await?["events_copied"],
            held,
            "nothing copied while paused"
        );
        assert_eq!(
            held.as_i64().unwrap_or(0) % 500,
            0,
            "paused at a batch boundary"
        );
        let again = env.control(&["pause", &id])?;
        assert_eq!(again.code, 1, "pausing a paused migration is refused");
        assert!(again.stderr.contains("paused"), "{}", again.stderr);

        env.control_json(&["resume", &id])?;
        caught_up(&env, &id, Duration::from_secs(60)).await?;
        wait_for(Duration::from_secs(3), || async {
            Ok(
                switchyard_tests::route_state(&http, &proxy, tenant).await?["state"]
                    == "dual_write",
            )
        })
        .await?;

        // Pause in dual-write: writes go to the source only (no mirror) and the target falls behind.
        env.control_json(&["pause", &id, "--reason", "target maintenance"])?;
        wait_for(Duration::from_secs(3), || async {
            Ok(switchyard_tests::route_state(&http, &proxy, tenant).await?["mirroring"] == false)
        })
        .await?;
        let url = switchyard_tests::stream_url(&proxy.data, tenant, "Late", Uuid::new_v4());
        let reply = http
            .post(
                &url,
                &switchyard_tests::events_body(Some(0), 3, "WhilePaused"),
            )
            .await?;
        assert_eq!(reply.json["store_id"], "shared");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            env.control_json(&["lag", &id])?["lag"],
            3,
            "paused: nothing reaches the target"
        );
        env.control_json(&["resume", &id])?;
        caught_up(&env, &id, Duration::from_secs(90)).await?;
        converged(env.store_url("shared"), env.store_url("dedicated"), tenant).await?;

        // Abort: back to normal on the source, state rolled_back, reason audited.
        let aborted = env.control_json(&["abort", &id, "--reason", "business decision"])?;
        assert_eq!(aborted["state"], "rolled_back");
        let shown = env.control_json(&["routing", "get", &tenant.to_string()])?;
        assert_eq!(
            (
                shown["store_id"].as_str(),
                shown["migration_state"].as_str()
            ),
            (Some("shared"), Some("normal"))
        );
        wait_for(Duration::from_secs(3), || async {
            Ok(switchyard_tests::route_state(&http, &proxy, tenant).await?["state"] == "normal")
        })
        .await?;
        let second = env.control(&["abort", &id, "--reason", "again"])?;
        assert_eq!(second.code, 1);
        let audit = env.control_json(&["audit", &id])?;
        let actions: Vec<&str> = audit
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["action"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            actions,
            vec![
                "create",
                "start_copy",
                "pause",
                "resume",
                "copy_done",
                "pause",
                "resume",
                "abort"
            ]
        );
        let abort_row = audit
            .as_array()
            .and_then(|a| a.last())
            .cloned()
            .unwrap_or_default();
        assert_eq!(abort_row["reason"], "business decision");
        assert_eq!(abort_row["from_state"], "dual_write");

        // A new migration refuses a target holding the tenant's events unless reset; abort in
        // bulk copy.
        let refused = env.control(&[
            "migrate",
            "start",
            "--tenant",
            &tenant.to_string(),
            "--to",
            "dedicated",
            "--detach",
        ])?;
        assert_eq!(refused.code, 1);
        assert!(
            refused.stderr.contains("--reset-target"),
            "{}",
            refused.stderr
        );
        let restarted = env.control_json(&[
            "migrate",
            "start",
            "--tenant",
            &tenant.to_string(),
            "--to",
            "dedicated",
            "--reset-target",
            "--max-rate",
            "2000",
            "--batch-size",
            "500",
            "--detach",
        ])?;
        let id2 = migration_id(&restarted)?;
        let dup = env.control(&[
            "migrate",
            "start",
            "--tenant",
            &tenant.to_string(),
            "--to",
            "dedicated",
            "--detach",
        ])?;
        assert_eq!(dup.code, 1, "one active migration per tenant");
        wait_for(Duration::from_secs(60), || async {
            Ok(status(&env, &id2).await?["state"] == "bulk_copy")
        })
        .await?;
        assert_eq!(
            env.control_json(&["abort", &id2, "--reason", "wrong target"])?["state"],
            "rolled_back"
        );
        assert_eq!(
            env.control_json(&["routing", "get", &tenant.to_string()])?["migration_state"],
            "normal"
        );
        Ok(())
    })
    .await
}

/// A seeded tenant migrating to `dedicated` under `serve`, at `dual_write` with lag 0 and
/// mirrored by a proxy; the proxy and `serve` reach the target through `gate`.
struct GatedMigration {
    env: Env,
    proxy: ProxyProcess,
    http: Http,
    tenant: Uuid,
    id: String,
    _serve: ServeProcess,
}

/// [`GatedMigration`] of a tenant with `streams` streams of `per_stream` events, `extra`
/// appended to the config.
async fn dual_writing_through(
    gate: &TcpGate,
    extra: &str,
    streams: usize,
    per_stream: usize,
) -> Result<GatedMigration> {
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], extra).await?;
    env.control_json(&["init"])?;
    let gated = gate.url(env.store_url("dedicated"));
    let via_gate = [("SWITCHYARD_STORE_DEDICATED_URL", gated.as_str())];
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, streams, per_stream).await?;
    let http = Http::new();
    let proxy = env.proxy(&via_gate)?;
    proxy.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &via_gate)?;
    let id = migration_id(&env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        "dedicated",
        "--detach",
    ])?)?;
    caught_up(&env, &id, Duration::from_secs(90)).await?;
    wait_for(Duration::from_secs(3), || async {
        Ok(switchyard_tests::route_state(&http, &proxy, tenant).await?["mirroring"] == true)
    })
    .await?;
    Ok(GatedMigration {
        env,
        proxy,
        http,
        tenant,
        id,
        _serve: serve,
    })
}

/// The target stops accepting connections during dual-write: appends still succeed promptly,
/// mirror failures are counted, and the tail closes the gap once the target is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_target_never_slows_appends_and_the_tail_closes_the_gap() -> Result<()> {
    let gate = TcpGate::start("127.0.0.1:5432").await?;
    let GatedMigration {
        env,
        proxy,
        http,
        tenant,
        id,
        _serve,
    } = dual_writing_through(&gate, "[proxy]\nrouting_poll_ms = 100\n", 10, 10).await?;

    gate.close();
    let aggregate = Uuid::new_v4();
    let url = switchyard_tests::stream_url(&proxy.data, tenant, "Order", aggregate);
    let mut slowest = Duration::ZERO;
    for version in 0..20 {
        let t = Instant::now();
        let reply = http
            .post(
                &url,
                &switchyard_tests::events_body(Some(version), 1, "WhileTargetDown"),
            )
            .await?;
        slowest = slowest.max(t.elapsed());
        assert_eq!(reply.status, http::StatusCode::CREATED, "{:?}", reply.json);
    }
    // Far below the mirror's 2 s write timeout: the mirror never sits on the client's path.
    assert!(
        slowest < Duration::from_secs(1),
        "an append took {slowest:?} while the target was down"
    );
    wait_for(Duration::from_secs(10), || async {
        let r = switchyard_tests::route_state(&http, &proxy, tenant).await?;
        Ok(r["mirror"]["total_failures"].as_u64().unwrap_or(0)
            + r["mirror"]["events_dropped"].as_u64().unwrap_or(0)
            >= 1)
    })
    .await?;
    assert!(switchyard_tests::count_events(env.store_url("dedicated"), Some(tenant)).await? < 120);

    gate.open();
    caught_up(&env, &id, Duration::from_secs(60)).await?;
    let ids: HashSet<Uuid> = converged(env.store_url("shared"), env.store_url("dedicated"), tenant)
        .await?
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(ids.len(), 120);
    Ok(())
}

/// The value of one series (`name{labels}`) in a Prometheus text exposition.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Issue 15 item 2: a stalled target with large appends. The mirror's queue was bounded only
/// in appends (4,096), so its memory grew with every large append while the target hung; now
/// it holds at most `proxy.mirror_queue_bytes` per target store, drops (and counts) the rest,
/// and the tail repairs what was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_target_never_holds_more_mirror_memory_than_its_byte_bound() -> Result<()> {
    /// `proxy.mirror_queue_bytes` here.
    const BOUND_KIB: u64 = 8 * 1024;
    /// What the proxy may grow by beyond the bound: the requests in flight (body, decoded
    /// events, the source insert's encoded arguments: about 3 times a 512 KiB payload), the
    /// worker's batch being encoded for the target (at most 4 MiB plus one append) and
    /// allocator slack.
    const ALLOWANCE_KIB: u64 = 16 * 1024;
    const PAYLOAD: usize = 512 * 1024;
    /// 48 MiB of payloads, 6 times the bound.
    const APPENDS: i64 = 96;
    let gate = TcpGate::start("127.0.0.1:5432").await?;
    let extra = format!(
        "[proxy]\nrouting_poll_ms = 100\nmirror_queue_bytes = {}\n",
        BOUND_KIB * 1024
    );
    let migration = dual_writing_through(&gate, &extra, 1, 10).await?;
    let (env, proxy, http, tenant) = (
        &migration.env,
        &migration.proxy,
        &migration.http,
        migration.tenant,
    );
    let aggregate = Uuid::new_v4();
    let url = switchyard_tests::stream_url(&proxy.data, tenant, "Large", aggregate);
    let large = |version: i64| {
        json!({"expected_version": version, "events": [{
            "event_id": Uuid::new_v4(),
            "event_type": "Large",
            "payload": {"version": version, "pad": "x".repeat(PAYLOAD)},
        }]})
    };

    // Warm up with the target reachable: the same appends, mirrored, so what the process
    // keeps for its pools and buffers is in the baseline.
    for version in 0..4 {
        let reply = http.post(&url, &large(version)).await?;
        assert_eq!(reply.status, http::StatusCode::CREATED, "{:?}", reply.json);
    }
    wait_for(Duration::from_secs(10), || async {
        Ok(
            switchyard_tests::route_state(http, proxy, tenant).await?["mirror"]["events_mirrored"]
                == 4,
        )
    })
    .await?;
    let baseline = proxy.memory_kib("VmRSS")?;

    gate.set(GateMode::Blackhole);
    let load = Instant::now();
    for version in 4..4 + APPENDS {
        let reply = http.post(&url, &large(version)).await?;
        assert_eq!(reply.status, http::StatusCode::CREATED, "{:?}", reply.json);
    }
    let load = load.elapsed();
    let peak = proxy.memory_kib("VmHWM")?;
    let scraped = http.get(&format!("{}/metrics", proxy.admin)).await?;
    let text = String::from_utf8_lossy(&scraped.body);
    let dropped = metric(
        &text,
        "switchyard_proxy_mirror_dropped_events_total{reason=\"queue_bytes\"}",
    );
    eprintln!(
        "resident before the load {baseline} KiB, peak {peak} KiB (+{} KiB); {APPENDS} appends in {load:?}; dropped {dropped:?}",
        peak.saturating_sub(baseline)
    );
    assert!(
        peak <= baseline + BOUND_KIB + ALLOWANCE_KIB,
        "resident memory peaked at {peak} KiB, {} KiB over the {baseline} KiB before the load \
         (bound {BOUND_KIB} KiB + allowance {ALLOWANCE_KIB} KiB)",
        peak.saturating_sub(baseline)
    );
    assert!(
        dropped.is_some_and(|n| n >= 1.0),
        "drops past the byte bound are counted: {dropped:?}"
    );
    let stats = switchyard_tests::route_state(http, proxy, tenant).await?;
    assert!(
        stats["mirror"]["events_dropped"].as_u64() >= Some(1),
        "{stats}"
    );

    // Released, the target gets what the mirror wrote and the tail copies what it dropped.
    gate.set(GateMode::Pass);
    caught_up(env, &migration.id, Duration::from_secs(60)).await?;
    let events = converged(env.store_url("shared"), env.store_url("dedicated"), tenant).await?;
    assert_eq!(events.len(), 10 + 4 + usize::try_from(APPENDS)?);
    Ok(())
}

/// Writers whose transactions commit out of position order during dual-write (held open on
/// purpose, bypassing the proxy so only the tail can copy them): the tail still copies every
/// row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_copies_rows_of_transactions_that_commit_late() -> Result<()> {
    use sqlx::Connection;
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    env.control_json(&["init"])?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 10, 10).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migration_id(&env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        "dedicated",
        "--detach",
    ])?)?;
    caught_up(&env, &id, Duration::from_secs(90)).await?;
    // serve exports the lag (and its health) on its admin port.
    let http = Http::new();
    wait_for(Duration::from_secs(5), || async {
        let m = http.get(&format!("{}/metrics", serve.admin)).await?;
        let text = String::from_utf8_lossy(&m.body).into_owned();
        Ok(text.contains(&format!("switchyard_control_migration_lag_events{{migration_id=\"{id}\",tenant_id=\"{tenant}\"}} 0"))
            && text.contains("switchyard_control_copy_events_total 100"))
    })
    .await?;
    assert_eq!(
        http.get(&format!("{}/readyz", serve.admin))
            .await?
            .status
            .as_u16(),
        200
    );

    // Three transactions take positions, then stay open while later ones commit.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = sqlx::PgConnection::connect(env.store_url("shared")).await?;
        sqlx::query("BEGIN").execute(&mut conn).await?;
        sqlx::query(
            "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, version, timestamp, payload)
             VALUES ($1, $2, 'Direct', 'Held', $3, 1, now(), '{}')",
        )
        .bind(Uuid::new_v4())
        .bind(Uuid::new_v4())
        .bind(tenant)
        .execute(&mut conn)
        .await?;
        held.push(conn);
    }
    seed(env.store_url("shared"), tenant, 5, 3).await?;
    // The tail runs meanwhile and copies what is final; then the held ones commit, last first.
    tokio::time::sleep(Duration::from_millis(800)).await;
    while let Some(mut conn) = held.pop() {
        sqlx::query("COMMIT").execute(&mut conn).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    caught_up(&env, &id, Duration::from_secs(90)).await?;
    assert_eq!(
        converged(env.store_url("shared"), env.store_url("dedicated"), tenant)
            .await?
            .len(),
        118
    );
    Ok(())
}

/// `migrate start` refuses a target holding another tenant's stream or event under an id of
/// the tenant's (issue 14 item 3), naming them, also with `--reset-target`, which never deletes
/// another tenant's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_start_refuses_a_target_with_colliding_foreign_ids() -> Result<()> {
    use switchyard_store::{NewEvent, StreamRef};
    for_each_backend(|backend| async move {
        let env = Env::new(backend, &["shared", "dedicated"], "").await?;
        env.control_json(&["init"])?;
        let (ours, theirs) = (Uuid::new_v4(), Uuid::new_v4());
        let (collide, own) = (Uuid::new_v4(), Uuid::new_v4());
        let source = EventStore::connect("shared", env.store_url("shared"), 2)?;
        let target = EventStore::connect("dedicated", env.store_url("dedicated"), 2)?;
        let new_event = |id: Uuid| -> Result<NewEvent> {
            Ok(NewEvent::new(
                id,
                "E",
                serde_json::value::RawValue::from_string("{}".to_owned())?,
                None,
                None,
            ))
        };
        let on = |tenant_id, aggregate_id| StreamRef {
            tenant_id,
            aggregate_type: "Order",
            aggregate_id,
        };
        let taken_id = Uuid::new_v4();
        source
            .append(on(ours, collide), Some(0), &[new_event(Uuid::new_v4())?])
            .await?;
        source
            .append(on(ours, own), Some(0), &[new_event(taken_id)?])
            .await?;
        target
            .append(on(theirs, collide), Some(0), &[new_event(Uuid::new_v4())?])
            .await?;
        target
            .append(on(theirs, Uuid::new_v4()), Some(0), &[new_event(taken_id)?])
            .await?;
        let tenant_arg = ours.to_string();
        for extra in [None, Some("--reset-target")] {
            let mut args = vec![
                "migrate",
                "start",
                "--tenant",
                tenant_arg.as_str(),
                "--to",
                "dedicated",
                "--detach",
            ];
            args.extend(extra);
            let out = env.control(&args)?;
            assert_ne!(out.code, 0, "{extra:?}: {}{}", out.stdout, out.stderr);
            let said = format!("{}{}", out.stdout, out.stderr);
            assert!(
                said.contains(&format!("stream Order/{collide}"))
                    && said.contains(&format!("event {taken_id}")),
                "{extra:?}: the refusal names the stream and the event id: {said}"
            );
        }
        assert_eq!(
            env.control_json(&["list"])?.as_array().map(Vec::len),
            Some(0),
            "no migration was created"
        );
        assert_eq!(target.count_tenant(theirs).await?, 2, "their rows stay");
        Ok(())
    })
    .await
}

/// Rows written with `txid` NULL or an old explicit value (a restore, an `INSERT … SELECT` of
/// every column) during dual-write are copied by the tail and cut over (issue 14 item 13);
/// they used to fall outside every tail window, so the cutover left them behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_a_writer_set_txid_during_dual_write_are_copied() -> Result<()> {
    use sqlx::Connection;
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    env.control_json(&["init"])?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 3, 5).await?;
    let _serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migration_id(&env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        "dedicated",
        "--detach",
    ])?)?;
    caught_up(&env, &id, Duration::from_secs(90)).await?;
    let mut conn = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    for txid in ["NULL", "'1'::xid8", "'5'::xid8"] {
        sqlx::query(&format!(
            "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, version, timestamp, payload, txid)
             VALUES ($1, $2, 'Restored', 'Restored', $3, 1, now(), '{{}}', {txid})"
        ))
        .bind(Uuid::new_v4())
        .bind(Uuid::new_v4())
        .bind(tenant)
        .execute(&mut conn)
        .await?;
    }
    assert_eq!(
        converged(env.store_url("shared"), env.store_url("dedicated"), tenant)
            .await?
            .len(),
        18
    );
    let done = env.control_json(&["cutover", &id])?;
    assert_eq!(done["success"], true, "{done}");
    assert_eq!(
        tenant_events(env.store_url("dedicated"), tenant)
            .await?
            .len(),
        18
    );
    Ok(())
}

/// A subscription checkpoint translated to the target never skips an event (issue 14 item
/// 10). The target's positions follow landing order: here an event the mirror landed at once
/// sits below one with a lower source position that the tail landed after its transaction
/// committed late. Translating the checkpoint at that lower source position to "its event's
/// target position" skipped the mirrored one; the answer is now below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_translated_checkpoint_never_skips_an_event_that_landed_out_of_order() -> Result<()> {
    use sqlx::Connection;
    let (env, proxy, http) = switchyard_tests::started(
        Backend::Postgres,
        &["shared", "dedicated"],
        "[proxy]\nrouting_poll_ms = 100\n",
        &[],
    )
    .await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 2, 3).await?;
    let _serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migration_id(&env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        "dedicated",
        "--detach",
    ])?)?;
    caught_up(&env, &id, Duration::from_secs(90)).await?;
    wait_for(Duration::from_secs(5), || async {
        Ok(switchyard_tests::route_state(&http, &proxy, tenant).await?["state"] == "dual_write")
    })
    .await?;

    // A writer takes a source position and holds its transaction open...
    let mut held = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    sqlx::query("BEGIN").execute(&mut held).await?;
    let late = Uuid::new_v4();
    let late_position: i64 = sqlx::query_scalar(
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, version, timestamp, payload)
         VALUES ($1, $2, 'Direct', 'Late', $3, 1, now(), '{}') RETURNING global_position",
    )
    .bind(late)
    .bind(Uuid::new_v4())
    .bind(tenant)
    .fetch_one(&mut held)
    .await?;
    // ...while an append through the proxy commits after it and is mirrored at once.
    let reply = http
        .post(
            &switchyard_tests::stream_url(&proxy.data, tenant, "Order", Uuid::new_v4()),
            &switchyard_tests::events_body(Some(0), 1, "Early"),
        )
        .await?;
    assert_eq!(reply.status.as_u16(), 201, "{:?}", reply.json);
    let mirrored = reply.json["global_positions"][0]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("no position in {:?}", reply.json))?;
    assert!(mirrored > late_position);
    let target = EventStore::connect("dedicated", env.store_url("dedicated"), 2)?;
    wait_for(Duration::from_secs(5), || async {
        Ok(target.count_tenant(tenant).await? == 7)
    })
    .await?;
    sqlx::query("COMMIT").execute(&mut held).await?;
    assert_eq!(
        converged(env.store_url("shared"), env.store_url("dedicated"), tenant)
            .await?
            .len(),
        8
    );
    // Both are mapped once the tail has passed them.
    let control = switchyard_store::ControlDb::connect(&env.control_url, 1)?;
    let mid: Uuid = id.parse()?;
    wait_for(Duration::from_secs(30), || async {
        Ok(control.position_map_len(mid).await? == 8)
    })
    .await?;
    let target_of = |source_position: i64| {
        let control = &control;
        async move {
            Ok::<_, anyhow::Error>(
                control
                    .translate_position(mid, source_position)
                    .await?
                    .map(|t| t.target_position),
            )
        }
    };
    let in_target: std::collections::HashMap<Uuid, i64> = target
        .read_tenant(tenant, 0, 100)
        .await?
        .iter()
        .map(|e| (e.event_id, e.global_position))
        .collect();
    let late_in_target = in_target[&late];
    let below_late: Vec<i64> = in_target
        .values()
        .copied()
        .filter(|p| *p < late_in_target)
        .collect();
    assert_eq!(
        below_late.len(),
        7,
        "the mirrored event landed before the late one"
    );
    // A checkpoint that has seen the late event but not the mirrored one.
    let translated = target_of(late_position)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no translation"))?;
    let first_unseen = *below_late.iter().max().unwrap_or(&0);
    assert!(
        translated < first_unseen,
        "checkpoint at source {late_position} translated to {translated}: the event at target \
         {first_unseen} (source {mirrored}) would be skipped"
    );
    // Through the CLI too.
    let cli = env.control_json(&[
        "positions",
        "translate",
        &id,
        "--source-position",
        &late_position.to_string(),
    ])?;
    assert_eq!(cli["target_position"], translated);
    Ok(())
}
