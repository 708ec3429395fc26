//! The end of a migration (issue 19 item 3): `complete MIGRATION [--cleanup]`, `cleanup
//! MIGRATION`, and `serve` completing by itself after `reverse_replication_hours`. The real
//! binaries against PostgreSQL; what the stores hold is read with the harness's own SQL
//! (`count_events`, `tenant_events`, `fence`), never through the code under test.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;
use switchyard_tests::*;
use uuid::Uuid;

/// Small batches with a pause, so a cleanup of a few hundred rows takes several batches.
const THROTTLED: &str = "[proxy]\nrouting_poll_ms = 100\n\n[control]\ncleanup_batch_size = 40\n\
                         cleanup_pause_ms = 20\n";

/// A PostgreSQL env with a proxy; tenant `a` (`a_events` in `shared`) migrated to `dedicated`
/// with an automatic cutover, tenant `b` (`b_events`) left in `shared`. Returns the migration id.
struct Migrated {
    env: Env,
    proxy: ProxyProcess,
    http: Http,
    a: Uuid,
    b: Uuid,
    id: String,
}

async fn migrated(extra: &str, a_events: i64, b_events: i64) -> Result<Migrated> {
    migrated_on(Backend::Postgres, extra, a_events, b_events).await
}

/// [`migrated`] on `backend` (on SQLite, events are seeded in streams of 50).
async fn migrated_on(
    backend: Backend,
    extra: &str,
    a_events: i64,
    b_events: i64,
) -> Result<Migrated> {
    let (env, proxy, http) = started(backend, &["shared", "dedicated"], extra, &[]).await?;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for (tenant, events) in [(a, a_events), (b, b_events)] {
        match backend {
            Backend::Postgres => seed_sql(env.store_url("shared"), tenant, events).await?,
            Backend::Sqlite => {
                let streams = usize::try_from(events / 50)?;
                seed(env.store_url("shared"), tenant, streams, 50).await?;
            }
        }
    }
    let done = env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &a.to_string(),
        "--to",
        "dedicated",
        "--cutover",
        "auto",
    ])?;
    assert_eq!(done["state"], "migrated", "{done}");
    let id = done["id"].as_str().unwrap_or_default().to_owned();
    Ok(Migrated {
        env,
        proxy,
        http,
        a,
        b,
        id,
    })
}

/// The event ids of `tenant` in the store at `url`.
async fn ids(url: &str, tenant: Uuid) -> Result<HashSet<Uuid>> {
    Ok(tenant_events(url, tenant)
        .await?
        .into_iter()
        .map(|e| e.event_id)
        .collect())
}

/// The audit actions of migration `id`, oldest first.
fn audit_actions(env: &Env, id: &str) -> Result<Vec<String>> {
    let log = env.control_json(&["audit", id])?;
    Ok(log
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["action"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Appends of one event at a time to `tenant`'s stream through the proxy until `stop`,
/// returning each acknowledged event id and each append's latency.
async fn one_writer(
    http: Http,
    base: String,
    tenant: Uuid,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Vec<Uuid>, Vec<Duration>)> {
    let stream = Uuid::new_v4();
    let url = stream_url(&base, tenant, "Other", stream);
    let (mut acked, mut latencies) = (Vec::new(), Vec::new());
    let mut version = 0;
    while !*stop.borrow_and_update() {
        let body = events_body(Some(version), 1, "OtherWrote");
        let id: Uuid = body["events"][0]["event_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no event id in {body}"))?;
        let started = Instant::now();
        let reply = http.post(&url, &body).await?;
        latencies.push(started.elapsed());
        assert_eq!(reply.status.as_u16(), 201, "{:?}", reply.json);
        acked.push(id);
        version += 1;
    }
    Ok((acked, latencies))
}

/// Runs `switchyard-control ARGS`, which must be refused (exit 1) saying `says`.
fn refused(env: &Env, args: &[&str], says: &str) -> Result<()> {
    let out = env.control(args)?;
    assert_eq!(out.code, 1, "{args:?}: {}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    Ok(())
}

fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort_unstable();
    latencies
        .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// `complete --cleanup` deletes the migrated tenant's rows from the store it left, in batches,
/// while another tenant of that store keeps appending: every row of the other tenant (seeded
/// before, acknowledged during) is still there, by id; the tenant's fence row stays `moved`;
/// the target is untouched; `status` and the audit log show it; a second `complete` is a no-op.
/// The other tenant's p99 append latency before and during is printed, not asserted. On both
/// backends (on SQLite every batch and every append take the one write lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_cleanup_deletes_only_the_tenants_rows_beside_another_tenants_writers(
) -> Result<()> {
    for backend in Backend::ALL {
        cleanup_beside_writers(backend)
            .await
            .with_context(|| format!("on {backend:?}"))?;
    }
    Ok(())
}

async fn cleanup_beside_writers(backend: Backend) -> Result<()> {
    let m = migrated_on(backend, THROTTLED, 400, 200).await?;
    let (shared, dedicated) = (m.env.store_url("shared"), m.env.store_url("dedicated"));
    let b_before = ids(shared, m.b).await?;
    assert_eq!(b_before.len(), 200);
    assert_eq!(count_events(dedicated, Some(m.a)).await?, 400);

    // The other tenant's latency alone, then during the cleanup.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let before = tokio::spawn(one_writer(m.http.clone(), m.proxy.data.clone(), m.b, stop));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    let (acked_before, mut lat_before) = before.await??;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let during = tokio::spawn(one_writer(m.http.clone(), m.proxy.data.clone(), m.b, stop));
    let config = m.env.config_path.clone();
    let id = m.id.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_control(&config, &["--json", "complete", &id, "--cleanup"], &[])
    })
    .await??;
    let _ = stop_tx.send(true);
    let (acked_during, mut lat_during) = during.await??;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    println!(
        "{backend:?}: other tenant's appends: p99 {:?} over {} before, p99 {:?} over {} during the cleanup",
        p99(&mut lat_before),
        lat_before.len(),
        p99(&mut lat_during),
        lat_during.len()
    );

    let status: Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(status["state"], "migrated", "{status}");
    assert!(status["finished_at"].is_string(), "{status}");
    let cleanup = &status["cleanup"];
    assert_eq!(cleanup["store_id"], "shared", "{status}");
    assert_eq!(cleanup["role"], "source", "{status}");
    assert_eq!(cleanup["state"], "done", "{status}");
    assert_eq!(cleanup["rows_total"], 400, "{status}");
    assert_eq!(cleanup["rows_deleted"], 400, "{status}");
    assert_eq!(cleanup["rows_left"], 0, "{status}");

    assert_eq!(count_events(shared, Some(m.a)).await?, 0);
    assert_eq!(count_events(dedicated, Some(m.a)).await?, 400);
    assert_eq!(fence(shared, m.a).await?.as_deref(), Some("moved"));
    let b_after = ids(shared, m.b).await?;
    let expected: HashSet<Uuid> = b_before
        .iter()
        .chain(&acked_before)
        .chain(&acked_during)
        .copied()
        .collect();
    assert_eq!(
        b_after, expected,
        "the other tenant's rows are exactly what it wrote"
    );

    let actions = audit_actions(&m.env, &m.id)?;
    for action in ["complete", "cleanup_start", "cleanup_done"] {
        assert_eq!(
            actions.iter().filter(|a| *a == action).count(),
            1,
            "{action} in {actions:?}"
        );
    }
    // Idempotent: nothing more recorded, the same answer.
    let again = m.env.control_json(&["complete", &m.id])?;
    assert_eq!(again["finished_at"], status["finished_at"], "{again}");
    assert_eq!(audit_actions(&m.env, &m.id)?, actions);
    Ok(())
}

/// A control killed right after a cleanup batch was deleted (before its count was recorded)
/// leaves the cleanup `running`; `serve` takes it over once the claim runs out and finishes
/// it, counting the batch the dead one deleted; the other tenant's rows are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_killed_mid_cleanup_is_resumed_by_serve() -> Result<()> {
    let m = migrated(THROTTLED, 300, 100).await?;
    let shared = m.env.store_url("shared");
    let b_before = ids(shared, m.b).await?;
    let out = run_control(
        &m.env.config_path,
        &["--json", "complete", &m.id, "--cleanup"],
        &[(
            switchyard_control::fault::CRASH_AT_VAR,
            "cleanup_after_batch",
        )],
    )?;
    assert_ne!(out.code, 0, "the crash point was reached: {}", out.stderr);
    assert!(
        out.stderr.contains("crashing at cleanup_after_batch"),
        "{}",
        out.stderr
    );
    let status = m.env.control_json(&["status", &m.id])?;
    assert!(status["finished_at"].is_string(), "{status}");
    assert_eq!(status["cleanup"]["state"], "running", "{status}");
    assert_eq!(status["cleanup"]["rows_deleted"], 0, "{status}");
    assert_eq!(
        count_events(shared, Some(m.a)).await?,
        260,
        "one batch went"
    );

    let serve = ServeProcess::spawn(&m.env.config_path, "resumer", &[])?;
    wait_for_every(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async { Ok(m.env.control_json(&["status", &m.id])?["cleanup"]["state"] == "done") },
    )
    .await?;
    let status = m.env.control_json(&["status", &m.id])?;
    assert_eq!(status["cleanup"]["rows_deleted"], 300, "{status}");
    assert_eq!(status["cleanup"]["rows_left"], 0, "{status}");
    assert_eq!(count_events(shared, Some(m.a)).await?, 0);
    assert_eq!(ids(shared, m.b).await?, b_before);
    assert_eq!(fence(shared, m.a).await?.as_deref(), Some("moved"));

    // Its metrics: serve deleted the 260 rows the crashed run left, and the fleet view (read
    // from the control database every 2 s) shows no cleanup running with nothing left.
    let metric = |text: &str, name: &str| switchyard_client::metric_sum(text, name);
    let scrape = || async {
        let reply = m.http.get(&format!("{}/metrics", serve.admin)).await?;
        Ok::<_, anyhow::Error>(String::from_utf8(reply.body.to_vec())?)
    };
    wait_for(Duration::from_secs(20), || async {
        Ok(metric(&scrape().await?, "switchyard_control_cleanups_running") == Some(0.0))
    })
    .await?;
    let text = scrape().await?;
    assert_eq!(
        metric(&text, "switchyard_control_cleanup_rows_deleted_total"),
        Some(260.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "switchyard_control_cleanup_rows_left"),
        Some(0.0),
        "{text}"
    );
    Ok(())
}

/// `cleanup` of an aborted migration deletes what the copy put in its target — and nothing of
/// another tenant living there — and only once the migration is over and the tenant is not
/// routed there; `complete` is refused on a migration that is not migrated; unknown ids are
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_of_an_aborted_migrations_target_and_its_refusals() -> Result<()> {
    let (env, _proxy, _http) =
        started(Backend::Postgres, &["shared", "dedicated"], THROTTLED, &[]).await?;
    let _serve = ServeProcess::spawn(&env.config_path, "driver", &[])?;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (shared, dedicated) = (env.store_url("shared"), env.store_url("dedicated"));
    seed_sql(shared, a, 200).await?;
    seed_sql(dedicated, b, 100).await?;
    let b_before = ids(dedicated, b).await?;
    let id = migrate_to_dual_write(&env, a, "dedicated", &[]).await?;
    assert_eq!(count_events(dedicated, Some(a)).await?, 200);

    refused(
        &env,
        &["cleanup", &id],
        "is dual_write: a cleanup applies only",
    )?;
    refused(
        &env,
        &["complete", &id],
        "is dual_write: complete applies only to a migrated migration",
    )?;
    env.control_json(&["abort", &id, "--reason", "test"])?;
    refused(&env, &["complete", &id, "--cleanup"], "is rolled_back")?;
    // Routed by hand to the target: its rows there are live.
    env.control_json(&["routing", "set", &a.to_string(), "dedicated"])?;
    refused(&env, &["cleanup", &id], "is still routed to dedicated")?;
    env.control_json(&["routing", "set", &a.to_string(), "shared"])?;
    let unknown = Uuid::new_v4().to_string();
    refused(&env, &["complete", &unknown], "not found")?;
    refused(&env, &["cleanup", &unknown], "not found")?;
    assert_eq!(
        count_events(dedicated, Some(a)).await?,
        200,
        "nothing deleted yet"
    );

    let status = env.control_json(&["cleanup", &id])?;
    assert_eq!(status["state"], "rolled_back", "{status}");
    assert_eq!(status["cleanup"]["role"], "target", "{status}");
    assert_eq!(status["cleanup"]["store_id"], "dedicated", "{status}");
    assert_eq!(status["cleanup"]["state"], "done", "{status}");
    assert_eq!(status["cleanup"]["rows_deleted"], 200, "{status}");
    assert_eq!(count_events(dedicated, Some(a)).await?, 0);
    assert_eq!(
        count_events(shared, Some(a)).await?,
        200,
        "the source is untouched"
    );
    assert_eq!(
        ids(dedicated, b).await?,
        b_before,
        "the other tenant is untouched"
    );
    Ok(())
}

/// `complete --cleanup` is refused, and changes nothing, while the tenant is routed to the
/// store it left; with `reverse_replication_hours` set, `serve` completes the migration by
/// itself once that long has passed since the cutover, deleting nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_completes_after_the_grace_period_and_cleanup_is_refused_where_routed() -> Result<()>
{
    // 0.0005 h = 1.8 s.
    let extra = format!("{THROTTLED}reverse_replication_hours = 0.0005\n");
    let m = migrated(&extra, 100, 10).await?;
    let shared = m.env.store_url("shared");
    m.env
        .control_json(&["routing", "set", &m.a.to_string(), "shared"])?;
    refused(
        &m.env,
        &["complete", &m.id, "--cleanup"],
        "is still routed to shared",
    )?;
    let status = m.env.control_json(&["status", &m.id])?;
    assert!(status["finished_at"].is_null(), "{status}");
    assert!(status["cleanup"].is_null(), "{status}");

    let serve = ServeProcess::spawn(&m.env.config_path, "grace", &[])?;
    wait_for_every(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async { Ok(m.env.control_json(&["status", &m.id])?["finished_at"].is_string()) },
    )
    .await?;
    let log = m.env.control_json(&["audit", &m.id])?;
    let complete = log
        .as_array()
        .and_then(|a| a.iter().find(|e| e["action"] == "complete"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        complete["actor"],
        format!("serve:{}", serve.worker),
        "{log}"
    );
    assert!(m.env.control_json(&["status", &m.id])?["cleanup"].is_null());
    assert_eq!(
        count_events(shared, Some(m.a)).await?,
        100,
        "nothing deleted"
    );
    Ok(())
}

/// A second operator's `migrate start` back into the store a cleanup is emptying, in the one
/// order that loses rows unless one of them stands down: the migration's preflight passes
/// before the cleanup is recorded, the cleanup's batch check passes before the migration is
/// recorded, and the batch is deleted after the migration copied the tenant there (pause points
/// hold each side at its step). Whatever the outcome, a migration that went on holds every
/// event of its source in its target, checked by id with the harness's own SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_racing_a_cleanup_of_its_target_never_loses_a_batch() -> Result<()> {
    use switchyard_control::fault::PAUSE_AT_VAR;
    let m = migrated(THROTTLED, 300, 100).await?;
    let (shared, dedicated) = (m.env.store_url("shared"), m.env.store_url("dedicated"));
    let tenant = m.a.to_string();

    // Operator 2 moves the tenant back to shared (where its old rows still are), held for 6 s
    // once its preflight passed.
    let held = m.env.dir.path.join("migrate-back.stderr");
    let back = std::process::Command::new(bin("switchyard-control"))
        .arg("--config")
        .arg(&m.env.config_path)
        .args(["--json", "migrate", "start", "--tenant", &tenant])
        .args(["--to", "shared", "--reset-target"])
        .env(PAUSE_AT_VAR, "migrate_start_before_insert:6000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&held)?)
        .spawn()?;
    wait_for(Duration::from_secs(30), || async {
        Ok(std::fs::read_to_string(&held)?.contains("pausing at migrate_start_before_insert"))
    })
    .await?;

    // Operator 1 completes the first migration with a cleanup of shared, whose first batch is
    // held for 12 s after its check: the migration is recorded and copies meanwhile.
    let config = m.env.config_path.clone();
    let id = m.id.clone();
    let cleanup = tokio::task::spawn_blocking(move || {
        run_control(
            &config,
            &["--json", "complete", &id, "--cleanup"],
            &[(PAUSE_AT_VAR, "cleanup_before_delete:12000")],
        )
    });
    let back = tokio::task::spawn_blocking(move || back.wait_with_output()).await??;
    let cleanup = cleanup.await??;
    let back_said = format!(
        "{}{}",
        String::from_utf8_lossy(&back.stdout),
        std::fs::read_to_string(&held)?
    );

    if back.status.success() {
        // The migration went on: its target must hold every event of its source.
        let source_ids: HashSet<Uuid> = tenant_events(dedicated, m.a)
            .await?
            .into_iter()
            .map(|e| e.event_id)
            .collect();
        let target_ids: HashSet<Uuid> = tenant_events(shared, m.a)
            .await?
            .into_iter()
            .map(|e| e.event_id)
            .collect();
        let missing = source_ids.difference(&target_ids).count();
        assert_eq!(
            missing,
            0,
            "the migration back reached dual_write, yet {missing} of its {} events are not in \
             its target: the cleanup deleted them after the copy (cleanup said: {}{})",
            source_ids.len(),
            cleanup.stdout,
            cleanup.stderr
        );
    } else {
        assert!(
            back_said.contains("cleanup"),
            "the migration back stood down naming the cleanup: {back_said}"
        );
    }
    assert_eq!(ids(shared, m.b).await?.len(), 100, "b's rows untouched");
    Ok(())
}
