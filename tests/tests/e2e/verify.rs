//! Consistency verification (`verify`, the cutover's delta check, `verify-post`) and checkpoint
//! translation (`checkpoints migrate`) with the real binaries, on PostgreSQL and SQLite.
//!
//! The target is corrupted with SQL in each way verification must see (missing, extra,
//! changed payload, swapped versions, changed type), and each level is checked to name the
//! right stream, kind and first version.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use sqlx::Connection;
use switchyard_tests::{
    first_json, for_each_backend, seed, stream_url, wait_for, Backend, Env, Http, Result, Writers,
};
use uuid::Uuid;

const CUTOVER_LAG: &str =
    "[control]\ncutover_max_lag_events = 100\n[proxy]\nrouting_poll_ms = 200\n";

/// Runs one SQL statement on a store (either backend).
async fn exec(url: &str, sql: &str) -> Result<u64> {
    Ok(if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await?;
        sqlx::query(sql).execute(&mut c).await?.rows_affected()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await?;
        sqlx::query(sql).execute(&mut c).await?.rows_affected()
    })
}

/// The tenant's stream ids in a store, sorted.
async fn streams(url: &str, tenant: Uuid) -> Result<Vec<Uuid>> {
    let mut ids: Vec<Uuid> = switchyard_tests::tenant_events(url, tenant)
        .await?
        .into_iter()
        .map(|e| e.aggregate_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// A tenant of `n` streams × `per` events migrated to `dedicated` and dual-writing (the
/// foreground `migrate start` returns there); answers the migration id.
async fn migrated_to_dual_write(env: &Env, tenant: Uuid, n: usize, per: usize) -> Result<String> {
    seed(env.store_url("shared"), tenant, n, per).await?;
    let started = env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        "dedicated",
    ])?;
    let id = started["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(started["state"], "dual_write", "{started}");
    Ok(id)
}

/// `verify --json` that is expected to find the target inconsistent (exit 1).
fn inconsistent(env: &Env, id: &str, level: &str) -> Result<Value> {
    let out = env.control(&["--json", "verify", id, "--level", level])?;
    assert_eq!(out.code, 1, "{level}: {}{}", out.stdout, out.stderr);
    let report: Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(report["consistent"], false, "{report}");
    Ok(report)
}

/// `stream id → (kind, first_version)` of a report's violations.
fn found(report: &Value) -> BTreeMap<Uuid, (String, i64)> {
    report["violations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            (
                v["aggregate_id"]
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .unwrap_or_default(),
                (
                    v["kind"].as_str().unwrap_or_default().to_owned(),
                    v["first_version"].as_i64().unwrap_or(-1),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_level_names_the_corruption_it_should_see() -> Result<()> {
    for_each_backend(|backend| async move {
        let env = Env::new(backend, &["shared", "dedicated"], "").await?;
        env.control_json(&["init"])?;
        let tenant = Uuid::new_v4();
        let id = migrated_to_dual_write(&env, tenant, 12, 10).await?;

        for level in ["count", "hash", "full"] {
            let report = env.control_json(&["verify", &id, "--level", level])?;
            assert_eq!(report["consistent"], true, "{level}: {report}");
            assert_eq!(report["source_event_count"], 120, "{report}");
            assert_eq!(report["target_event_count"], 120, "{report}");
            assert_eq!(report["streams_verified"], 12, "{report}");
            assert_eq!(report["streams_consistent"], 12, "{report}");
        }

        let target = env.store_url("dedicated");
        let s = streams(target, tenant).await?;
        let (missing, extra, payload, order, kind) = (s[0], s[1], s[2], s[3], s[4]);
        let at = |stream: Uuid, v: i32| format!("aggregate_id = '{stream}' AND version = {v}");
        assert_eq!(exec(target, &format!("DELETE FROM events WHERE {}", at(missing, 5))).await?, 1);
        let new_id = Uuid::new_v4();
        // The target admits copiers only before its cutover: the corrupting insert is a hand
        // edit past the fence (opened for it, then closed again).
        let fence_to = |state: &str| {
            format!("UPDATE switchyard_fences SET state = '{state}' WHERE tenant_id = '{tenant}'")
        };
        assert_eq!(exec(target, &fence_to("open")).await?, 1);
        assert_eq!(
            exec(
                target,
                &format!(
                    "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id,
                                         actor_id, version, timestamp, payload, created_at)
                     SELECT '{new_id}', aggregate_id, aggregate_type, event_type, tenant_id, actor_id,
                            11, timestamp, payload, created_at FROM events WHERE {}",
                    at(extra, 10)
                )
            )
            .await?,
            1
        );
        assert_eq!(exec(target, &fence_to("copiers")).await?, 1);
        assert_eq!(
            exec(
                target,
                &format!(
                    "UPDATE events SET payload = '{{\"i\": 2, \"pad\": \"tampered\"}}' WHERE {}",
                    at(payload, 3)
                )
            )
            .await?,
            1
        );
        exec(target, &format!("UPDATE events SET version = 1000 WHERE {}", at(order, 2))).await?;
        exec(target, &format!("UPDATE events SET version = 2 WHERE {}", at(order, 3))).await?;
        exec(target, &format!("UPDATE events SET version = 3 WHERE {}", at(order, 1000))).await?;
        assert_eq!(
            exec(target, &format!("UPDATE events SET event_type = 'Renamed' WHERE {}", at(kind, 4)))
                .await?,
            1
        );

        // Count: only what changes counts or last versions.
        let count = inconsistent(&env, &id, "count")?;
        let expected_count: BTreeMap<Uuid, (String, i64)> = [
            (missing, ("missing".to_owned(), 5)),
            (extra, ("extra".to_owned(), 11)),
        ]
        .into();
        assert_eq!(found(&count), expected_count, "{count}");
        assert_eq!(count["streams_consistent"], 10, "{count}");

        // Hash and full: everything, at the right version.
        let expected_all: BTreeMap<Uuid, (String, i64)> = [
            (missing, ("missing".to_owned(), 5)),
            (extra, ("extra".to_owned(), 11)),
            (payload, ("different".to_owned(), 3)),
            (order, ("out_of_order".to_owned(), 2)),
            (kind, ("different".to_owned(), 4)),
        ]
        .into();
        for level in ["hash", "full"] {
            let report = inconsistent(&env, &id, level)?;
            assert_eq!(found(&report), expected_all, "{level}: {report}");
            let details: Vec<&str> = report["violations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["detail"].as_str())
                .collect();
            assert!(details.iter().any(|d| d.contains("payload")), "{details:?}");
            assert!(details.iter().any(|d| d.contains("event_type")), "{details:?}");
            for v in report["violations"].as_array().into_iter().flatten() {
                assert_eq!(v["stream"], format!("Seed/{}", v["aggregate_id"].as_str().unwrap_or_default()));
            }
        }

        // The text report names the stream and version, and exits 1.
        let text = env.control(&["verify", &id, "--level", "hash"])?;
        assert_eq!(text.code, 1);
        assert!(text.stdout.contains("Consistency Report"), "{}", text.stdout);
        assert!(text.stdout.contains(&format!("Seed/{payload}: Different at version 3")), "{}", text.stdout);

        // Sampling: the same streams every run, fewer than all.
        let a = env.control(&["--json", "verify", &id, "--level", "hash", "--sample", "50"])?;
        let b = env.control(&["--json", "verify", &id, "--level", "hash", "--sample", "50"])?;
        let (a, b): (Value, Value) = (serde_json::from_str(&a.stdout)?, serde_json::from_str(&b.stdout)?);
        assert_eq!(a["streams_verified"], b["streams_verified"]);
        assert_eq!(found(&a), found(&b));
        let n = a["streams_verified"].as_u64().unwrap_or(0);
        assert!(n > 0 && n < 12, "a 50% sample of 12 streams verified {n}");
        let bad = env.control(&["verify", &id, "--sample", "0"])?;
        assert_eq!(bad.code, 2, "{}", bad.stderr);
        Ok(())
    })
    .await
}

/// A difference in the versions the final delta touches is found under the fence: the target
/// holds a version past the source's last (written straight into it). The versions below the
/// delta agree, so the check before the gates close passes, and the attempt rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_whose_delta_versions_differ_rolls_back_under_the_fence() -> Result<()> {
    for_each_backend(|backend| async move {
        let env = Env::new(backend, &["shared", "dedicated"], CUTOVER_LAG).await?;
        env.control_json(&["init"])?;
        let tenant = Uuid::new_v4();
        let id = migrated_to_dual_write(&env, tenant, 3, 4).await?;
        let broken = streams(env.store_url("dedicated"), tenant).await?[0];
        let stream = switchyard_store::StreamRef {
            tenant_id: tenant,
            aggregate_type: "Seed",
            aggregate_id: broken,
        };
        let event = |kind: &str| -> Result<switchyard_store::NewEvent> {
            Ok(switchyard_store::NewEvent::new(
                Uuid::new_v4(),
                kind,
                serde_json::value::RawValue::from_string("{\"late\":true}".into())?,
                None,
                None,
            ))
        };
        // Version 5 straight into the source (past the tail's horizon) and copied as the
        // mirror would; then a version 6 only the target has.
        let source = switchyard_store::EventStore::connect("s", env.store_url("shared"), 1)?;
        let target = switchyard_store::EventStore::connect("t", env.store_url("dedicated"), 1)?;
        source.append(stream, Some(4), &[event("Late")?]).await?;
        let late = source.read_stream(stream, 5, 5).await?;
        target.insert_copied(&late).await?;
        // The target admits copiers only before its cutover: opened for the stray append,
        // as a writer bypassing Switchyard might find it, then closed again (as the
        // migration's start left it, with its fence token).
        target.open_fence(tenant, 0).await?;
        target.append(stream, Some(5), &[event("Stray")?]).await?;
        let token = switchyard_store::fence_token(id.parse()?);
        target.admit_copiers_only(tenant, token, "shared").await?;
        source.close().await;
        target.close().await;

        let out = env.control(&["--json", "cutover", &id])?;
        assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
        let outcome = first_json(&out.stdout)?;
        assert_eq!(outcome["success"], false, "{outcome}");
        assert_eq!(outcome["state"], "dual_write", "{outcome}");
        let error = outcome["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("verification failed; streams differ"),
            "{error}"
        );
        assert!(error.contains(&format!("Seed/{broken}")), "{error}");
        // Under the fence: the gates were closed and the attempt rolled back.
        let steps = &outcome["steps_ms"];
        assert!(steps["4_copy_delta"].is_number(), "{outcome}");
        assert!(steps["5_roll_back"].is_number(), "{outcome}");
        let status = env.control_json(&["status", &id])?;
        assert_eq!(status["state"], "dual_write", "{status}");
        Ok(())
    })
    .await
}

/// A cutover whose delta does not verify rolls back to dual_write and names the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_whose_delta_differs_rolls_back_naming_the_stream() -> Result<()> {
    for_each_backend(|backend| async move {
        let env = Env::new(backend, &["shared", "dedicated"], CUTOVER_LAG).await?;
        env.control_json(&["init"])?;
        let tenant = Uuid::new_v4();
        let id = migrated_to_dual_write(&env, tenant, 3, 4).await?;
        let target = env.store_url("dedicated");
        let broken = streams(target, tenant).await?[0];
        // A write past the tail's horizon straight into the source (no mirror), so the
        // cutover's delta touches the stream; and a hole in the target's copy of it.
        let store = switchyard_store::EventStore::connect("s", env.store_url("shared"), 1)?;
        store
            .append(
                switchyard_store::StreamRef {
                    tenant_id: tenant,
                    aggregate_type: "Seed",
                    aggregate_id: broken,
                },
                Some(4),
                &[switchyard_store::NewEvent::new(
                    Uuid::new_v4(),
                    "Late",
                    serde_json::value::RawValue::from_string("{\"late\":true}".into())?,
                    None,
                    None,
                )],
            )
            .await?;
        store.close().await;
        exec(
            target,
            &format!("DELETE FROM events WHERE aggregate_id = '{broken}' AND version = 2"),
        )
        .await?;

        let out = env.control(&["--json", "cutover", &id])?;
        assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
        let outcome = first_json(&out.stdout)?;
        assert_eq!(outcome["success"], false, "{outcome}");
        assert_eq!(outcome["state"], "dual_write", "{outcome}");
        let error = outcome["error"].as_str().unwrap_or_default();
        assert!(error.contains("verification failed"), "{error}");
        assert!(error.contains(&format!("Seed/{broken}")), "{error}");
        assert!(error.contains("Missing at version 2"), "{error}");
        // Found below the delta, before the gates closed: nobody was paused.
        assert!(error.contains("before the gates closed"), "{error}");
        assert_eq!(outcome["pause_ms"], 0, "{outcome}");
        let status = env.control_json(&["status", &id])?;
        assert_eq!(status["state"], "dual_write", "{status}");
        Ok(())
    })
    .await
}

/// `verify-post`: fails while a proxy still mirrors the tenant, passes after the cutover, and
/// its test append lands in the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_post_checks_state_routing_mirrors_read_and_write() -> Result<()> {
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], CUTOVER_LAG).await?;
    env.control_json(&["init"])?;
    let tenant = Uuid::new_v4();
    let http = Http::new();
    let proxy = env.proxy(&[])?;
    proxy.wait_ready(&http).await?;
    let id = migrated_to_dual_write(&env, tenant, 2, 3).await?;
    let stream = format!("Order/{}", Uuid::new_v4());

    // Dual-writing: the migration is not migrated (first check fails, the rest is not run).
    let early = env.control(&["--json", "verify-post", &id, "--stream", &stream])?;
    assert_eq!(early.code, 1, "{}", early.stdout);
    let early: Value = serde_json::from_str(&early.stdout)?;
    assert_eq!(early["passed"], false);
    assert_eq!(early["checks"].as_array().map(Vec::len), Some(1), "{early}");
    assert_eq!(early["checks"][0]["check"], "migration state");

    // Writes through the proxy while it mirrors, then the cutover.
    let w = Writers::start(
        &http,
        std::slice::from_ref(&proxy.data),
        tenant,
        1,
        1,
        Duration::from_millis(20),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.stop().await?;
    // A second proxy that hears of no routing change after it loaded dual_write (no NOTIFY,
    // no poll, and the cutover's direct call refused: its admin token is not the config's):
    // it goes on mirroring the tenant after the cutover, and says so in its heartbeat.
    let mut deaf = env.proxy(&[
        ("SWITCHYARD_PROXY_ROUTING_LISTEN", "false"),
        ("SWITCHYARD_PROXY_ROUTING_POLL_MS", "600000"),
        ("SWITCHYARD_PROXY_PROXY_ID", "deaf-proxy"),
        ("SWITCHYARD_PROXY_ADMIN_TOKEN", "not-the-configured-token"),
    ])?;
    deaf.wait_ready(&http).await?;
    let cut = env.control_json(&["cutover", &id])?;
    assert_eq!(cut["success"], true, "{cut}");
    wait_for(Duration::from_secs(10), || async {
        let out = env.control(&["verify-post", &id, "--stream", &stream])?;
        Ok(out.code == 1 && out.stdout.contains("[FAILED] no dual-write mirror"))
    })
    .await?;
    let out = env.control(&["verify-post", &id, "--stream", &stream])?;
    assert!(out.stdout.contains("deaf-proxy"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("[ok] read"),
        "stops at the first failure: {}",
        out.stdout
    );
    // Once it is gone (no heartbeat for 10 s), the checks pass.
    deaf.kill9();

    // Migrated: every check passes against the live proxy, found through its heartbeat.
    wait_for(Duration::from_secs(30), || async {
        Ok(env
            .control(&["verify-post", &id, "--stream", &stream])?
            .code
            == 0)
    })
    .await
    .map_err(|e| {
        let out = env.control(&["verify-post", &id, "--stream", &stream]);
        anyhow::anyhow!("{e}: {out:?}")
    })?;
    let out = env.control(&["--json", "verify-post", &id, "--stream", &stream])?;
    let passed: Value = serde_json::from_str(&out.stdout)?;
    let checks: Vec<&str> = passed["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["check"].as_str())
        .collect();
    assert_eq!(
        checks,
        [
            "migration state",
            "routing",
            "no dual-write mirror",
            "read",
            "write",
            "write landed on the target"
        ]
    );
    let (kind, sid) = stream.split_once('/').unwrap_or_default();
    let read = http
        .get(&stream_url(
            &proxy.data,
            tenant,
            kind,
            Uuid::parse_str(sid)?,
        ))
        .await?;
    assert_eq!(read.json["store_id"], "dedicated");
    assert_eq!(
        read.json["events"][0]["event_type"],
        "SwitchyardPostMigrationCheck"
    );

    Ok(())
}

/// `checkpoints migrate`: exact and nearest-below translations, refusal of what cannot be
/// translated, dry run, and a second run that changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_translated_exactly_or_to_the_nearest_below() -> Result<()> {
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    env.control_json(&["init"])?;
    let (tenant, other) = (Uuid::new_v4(), Uuid::new_v4());
    seed(env.store_url("shared"), other, 1, 3).await?; // before the tenant's first event
    seed(env.store_url("shared"), tenant, 2, 5).await?;
    seed(env.store_url("shared"), other, 1, 3).await?; // after its last
    let id = migrated_to_dual_write(&env, tenant, 0, 0).await?;

    let app = switchyard_tests::TestDb::create("app").await?;
    let mut c = sqlx::PgConnection::connect(&app.url).await?;
    // The table as eventsource-py creates it (the vendored file's CREATE TABLE statement).
    let ddl = include_str!("../../../store/sql/eventsource-py/checkpoints-postgresql.sql");
    let table = ddl
        .find("CREATE TABLE IF NOT EXISTS projection_checkpoints")
        .and_then(|start| {
            ddl[start..]
                .find(");")
                .map(|end| &ddl[start..start + end + 2])
        })
        .ok_or_else(|| anyhow::anyhow!("no projection_checkpoints table in the vendored DDL"))?;
    sqlx::raw_sql(table).execute(&mut c).await?;
    // Source positions and the ids there.
    let mut s = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    let rows: Vec<(i64, Uuid)> =
        sqlx::query_as("SELECT global_position, event_id FROM events ORDER BY global_position")
            .fetch_all(&mut s)
            .await?;
    assert_eq!(rows.len(), 16);
    // 0..3 the other tenant, 3..13 the tenant, 13..16 the other tenant again.
    let (p2, (p7, e7), (_, e13), (p15, e15)) = (rows[1].0, rows[6], rows[12], rows[14]);
    for (name, pos, ev) in [
        ("exact", Some(p7), Some(e7)),
        ("nearest", Some(p15), Some(e15)),
        ("before", Some(p2), None),
        ("fresh", None, None),
    ] {
        sqlx::query("INSERT INTO projection_checkpoints (projection_name, global_position, last_event_id) VALUES ($1, $2, $3)")
            .bind(name)
            .bind(pos)
            .bind(ev)
            .execute(&mut c)
            .await?;
    }
    let mut t = sqlx::PgConnection::connect(env.store_url("dedicated")).await?;
    let target_of = |e: Uuid| {
        sqlx::query_scalar::<_, i64>("SELECT global_position FROM events WHERE event_id = $1")
            .bind(e)
    };
    let (t7, t13) = (
        target_of(e7).fetch_one(&mut t).await?,
        target_of(e13).fetch_one(&mut t).await?,
    );

    let before = checkpoints(&app.url).await?;

    // Dry run: the plan, nothing changed; "before" is refused (exit 1).
    let dry = env.control(&[
        "--json",
        "checkpoints",
        "migrate",
        &id,
        "--database",
        &app.url,
        "--dry-run",
    ])?;
    assert_eq!(dry.code, 1, "{}{}", dry.stdout, dry.stderr);
    let plan: Value = serde_json::from_str(&dry.stdout)?;
    let action = |plan: &Value, name: &str| {
        plan["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["projection_name"] == name)
            .map(|r| {
                (
                    r["action"].as_str().unwrap_or_default().to_owned(),
                    r["target_position"].as_i64(),
                )
            })
    };
    assert_eq!(action(&plan, "exact"), Some(("exact".into(), Some(t7))));
    assert_eq!(
        action(&plan, "nearest"),
        Some(("inexact".into(), Some(t13)))
    );
    assert_eq!(action(&plan, "before"), Some(("refused".into(), None)));
    assert_eq!(action(&plan, "fresh"), Some(("no_position".into(), None)));
    assert_eq!(
        checkpoints(&app.url).await?,
        before,
        "a dry run changes nothing"
    );

    // Only the translatable ones, by name.
    let done = env.control_json(&[
        "checkpoints",
        "migrate",
        &id,
        "--database",
        &app.url,
        "--names",
        "exact,nearest",
    ])?;
    assert_eq!(done["applied"], true, "{done}");
    let after = checkpoints(&app.url).await?;
    assert!(
        after.contains(&("exact".into(), Some(t7), Some(e7))),
        "{after:?}"
    );
    assert!(
        after.contains(&("nearest".into(), Some(t13), Some(e13))),
        "{after:?}"
    );
    assert!(
        after.contains(&("before".into(), Some(p2), None)),
        "{after:?}"
    );

    // Again: already translated, nothing moves.
    let again = env.control_json(&[
        "checkpoints",
        "migrate",
        &id,
        "--database",
        &app.url,
        "--names",
        "exact,nearest",
    ])?;
    assert_eq!(
        action(&again, "exact"),
        Some(("already_translated".into(), Some(t7)))
    );
    assert_eq!(
        action(&again, "nearest"),
        Some(("already_translated".into(), Some(t13)))
    );
    assert_eq!(checkpoints(&app.url).await?, after);

    let unknown = env.control(&[
        "checkpoints",
        "migrate",
        &id,
        "--database",
        &app.url,
        "--names",
        "nope",
    ])?;
    assert_eq!(unknown.code, 1);
    assert!(
        unknown.stderr.contains("no checkpoint named nope"),
        "{}",
        unknown.stderr
    );
    Ok(())
}

async fn checkpoints(url: &str) -> Result<Vec<(String, Option<i64>, Option<Uuid>)>> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    Ok(sqlx::query_as(
        "SELECT projection_name, global_position, last_event_id FROM projection_checkpoints ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await?)
}

/// Found by the soak (seed 0x5eed0009, CI of 2026-12-08): a `verify` that chose what to compare
/// while the migration dual-wrote, and compared after its cutover had committed, found the
/// appends acknowledged on the target since then "in the target but not in the source", as if
/// something had written into a store the tenant did not live in. They belong there: the
/// tenant had moved. The report must compare what the tenant holds when it is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verify_overtaken_by_the_cutover_compares_what_the_tenant_then_holds() -> Result<()> {
    let env = crate::fault_scenarios::two_stores("[proxy]\nrouting_poll_ms = 100\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 3, 10).await?;
    let http = Http::new();
    let proxy = env.proxy(&[])?;
    proxy.wait_ready(&http).await?;
    let _serve = switchyard_tests::ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = switchyard_tests::migrate_to_dual_write(&env, tenant, "dedicated", &["--no-reverse"])
        .await?;
    let writers = Writers::start(
        &http,
        std::slice::from_ref(&proxy.data),
        tenant,
        2,
        2,
        Duration::from_millis(10),
    );
    let args = ["--json", "verify", &id, "--level", "hash"];
    let held = [("SWITCHYARD_PAUSE_AT", "verify_before_compare:8000")];
    let verify = crate::fault_scenarios::control_off_thread(&env, &args, &held);
    let meanwhile = async {
        // The verify holds with its scope chosen; the tenant moves and its writers go on there.
        crate::fault_scenarios::cut_over_until_routed(
            &env,
            &http,
            &proxy,
            tenant,
            &id,
            "dedicated",
        )
        .await?;
        let moved = writers.acked();
        wait_for(Duration::from_secs(30), || async {
            Ok(writers.acked() >= moved + 20)
        })
        .await?;
        Result::<()>::Ok(())
    };
    let (verify, moved) = tokio::join!(verify, meanwhile);
    moved?;
    let verify = verify?;
    writers.stop().await?;
    let report = first_json(&verify.stdout)?;
    assert_eq!(
        (verify.code, &report["consistent"]),
        (0, &Value::Bool(true)),
        "{}{}",
        verify.stdout,
        verify.stderr
    );
    assert_eq!(
        env.control_json(&["status", &id])?["state"],
        "migrated",
        "the cutover committed while the verify was held"
    );
    Ok(())
}
