//! Issue 19 item 2: `revert MIGRATION`, a fenced cutover back to the store a migrated migration
//! left (kept current by its reverse replication), with the cutover's lag gate, budget,
//! automatic rollback and crash recovery; afterwards the roles swap.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use http::StatusCode;
use serde_json::Value;
use switchyard_tests::{
    assert_all_acked, events_body, fence, first_json, migrate_to_dual_write, seed, stream_url,
    tenant_events, wait_for_every, Backend, CommandOutput, Env, EventRow, GateMode, Http,
    ProxyProcess, Result, ServeProcess, TcpGate, Writers,
};
use uuid::Uuid;

use crate::fault_scenarios::{
    audit, control_off_thread, cut_over, hold_fence, route_is, two_stores, verify_hash, Load,
};

/// The shared test PostgreSQL server, which the gates forward to.
const PG: &str = "127.0.0.1:5432";

/// `revert ID --reason … [extra]` with `--json`, off the runtime's threads, with `vars`.
async fn revert(
    env: &Env,
    id: &str,
    extra: &[&str],
    vars: &[(&str, &str)],
) -> Result<CommandOutput> {
    let mut args = vec!["--json", "revert", id, "--reason", "test"];
    args.extend_from_slice(extra);
    control_off_thread(env, &args, vars).await
}

/// A `revert` that succeeded: its JSON outcome.
async fn reverted(env: &Env, id: &str, extra: &[&str]) -> Result<Value> {
    let out = revert(env, id, extra, &[]).await?;
    let outcome = first_json(&out.stdout).with_context(|| {
        format!(
            "revert {id}: exit {}\n{}{}",
            out.code, out.stdout, out.stderr
        )
    })?;
    ensure!(
        out.code == 0 && outcome["success"] == true,
        "revert {id}: exit {}\n{}{}",
        out.code,
        out.stdout,
        out.stderr
    );
    Ok(outcome)
}

/// `revert ID --timeout-ms budget` whose cutover cannot take the fence in time: once the revert
/// migration is dual-writing (the revert held at its `revert_before_cutover` pause point), a
/// session takes the tenant's fence in `lives` as an append in flight would and keeps it until
/// the command ended.
async fn revert_with_fence_held(
    env: &Env,
    id: &str,
    tenant: Uuid,
    lives: &str,
    budget: &str,
    vars: &[(&str, &str)],
) -> Result<CommandOutput> {
    let mut vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    vars.push((
        "SWITCHYARD_PAUSE_AT".to_owned(),
        "revert_before_cutover:5000".to_owned(),
    ));
    let command = {
        let (env_config, id, budget) = (env.config_path.clone(), id.to_owned(), budget.to_owned());
        tokio::task::spawn_blocking(move || {
            let vars: Vec<(&str, &str)> =
                vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            switchyard_tests::run_control(
                &env_config,
                &[
                    "--json",
                    "revert",
                    &id,
                    "--reason",
                    "test",
                    "--timeout-ms",
                    &budget,
                ],
                &vars,
            )
        })
    };
    wait_for_every(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async { Ok(env.control_json(&["status", id])?["reverted_by_state"] == "dual_write") },
    )
    .await
    .context("the revert migration never reached dual_write")?;
    let mut holder = hold_fence(env.store_url(lives), tenant).await?;
    let out = command.await??;
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    Ok(out)
}

/// Waits until the writers have `more` appends acknowledged beyond those now.
async fn more_acked(writers: &Writers, more: u64) -> Result<()> {
    let goal = writers.acked() + more;
    switchyard_tests::wait_for(Duration::from_secs(30), || async {
        Ok(writers.acked() >= goal)
    })
    .await
    .with_context(|| {
        format!(
            "writers stalled at {} acknowledged appends",
            writers.acked()
        )
    })
}

/// Every stream of `rows` holds versions 1..=n, each once.
fn in_order(store: &str, rows: &[EventRow]) {
    let mut streams: BTreeMap<Uuid, Vec<i32>> = BTreeMap::new();
    for r in rows {
        streams.entry(r.aggregate_id).or_default().push(r.version);
    }
    for (stream, mut versions) in streams {
        versions.sort_unstable();
        let expected: Vec<i32> = (1..=i32::try_from(versions.len()).unwrap_or(0)).collect();
        assert_eq!(
            versions, expected,
            "stream {stream} in {store} has gaps or repeats"
        );
    }
}

/// The tenant's route (`routing get`): `(store_id, migration_state, target_store_id)`.
fn route(env: &Env, tenant: Uuid) -> Result<(String, String, Option<String>)> {
    let r = env.control_json(&["routing", "get", &tenant.to_string()])?;
    Ok((
        r["store_id"].as_str().unwrap_or_default().to_owned(),
        r["migration_state"].as_str().unwrap_or_default().to_owned(),
        r["target_store_id"].as_str().map(str::to_owned),
    ))
}

/// Waits until migration `id`'s reverse replication has carried everything back (reverse lag 0),
/// then asserts both stores hold exactly the same events of the tenant, every stream in order,
/// with every acknowledged append in the store it lives in; answers them.
async fn both_stores_hold_everything(
    env: &Env,
    serve: &ServeProcess,
    tenant: Uuid,
    id: &str,
    acked: &[switchyard_tests::Acked],
) -> Result<Vec<EventRow>> {
    wait_for_every(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async { Ok(env.control_json(&["status", id])?["reverse_lag"] == 0) },
    )
    .await
    .map_err(|e| e.context(format!("serve log:\n{}", serve.log())))?;
    let status = env.control_json(&["status", id])?;
    let (lives_in, left) = (
        status["target_store_id"].as_str().unwrap_or_default(),
        status["source_store_id"].as_str().unwrap_or_default(),
    );
    let lives = tenant_events(env.store_url(lives_in), tenant).await?;
    assert_all_acked(acked, &lives);
    in_order(lives_in, &lives);
    assert_eq!(
        tenant_events(env.store_url(left), tenant).await?,
        lives,
        "{left} (kept current) holds exactly the tenant's events of {lives_in}"
    );
    Ok(lives)
}

/// A tenant cuts over from `shared` to `dedicated` and is reverted while 16 writers append
/// through 2 proxies. Nothing acknowledged is lost or duplicated (by event id), every stream is
/// in order in both stores, `shared` is open again and `dedicated` admits copiers only (kept
/// current by the revert's reverse replication); the two migrations name each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_under_16_writers_through_2_proxies_loses_nothing() -> Result<()> {
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 2000\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 3, 10).await?;
    let http = Http::new();
    let (a, b) = (env.proxy(&[])?, env.proxy(&[])?);
    a.wait_ready(&http).await?;
    b.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    let proxies = [a.data.clone(), b.data.clone()];
    let writers = Writers::start(&http, &proxies, tenant, 16, 2, Duration::from_millis(10));
    verify_hash(&env, &id)?;
    let cut = first_json(
        &control_off_thread(&env, &["--json", "cutover", &id], &[])
            .await?
            .stdout,
    )?;
    assert_eq!(cut["success"], true, "{cut}");
    more_acked(&writers, 100).await?;

    let outcome = reverted(&env, &id, &[])
        .await
        .map_err(|e| e.context(format!("serve log:\n{}", serve.log())))?;
    let back = outcome["revert_migration_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(outcome["store_id"], "shared", "{outcome}");
    assert_eq!(outcome["kept_current"], "dedicated", "{outcome}");
    println!(
        "16 writers, 2 proxies: cutover pause {} ms (whole {} ms), revert pause {} ms (whole cutover back {} ms)",
        cut["pause_ms"], cut["duration_ms"], outcome["cutover"]["pause_ms"], outcome["cutover"]["duration_ms"]
    );
    for proxy in [&a, &b] {
        route_is(
            &http,
            proxy,
            tenant,
            "store_id",
            "shared",
            Duration::from_secs(10),
        )
        .await?;
    }
    more_acked(&writers, 100).await?;
    let acked = writers.stop().await?;
    ensure!(
        acked.iter().any(|a| a.store_id == "dedicated")
            && acked.iter().any(|a| a.store_id == "shared"),
        "appends were acknowledged on both sides of the revert"
    );

    both_stores_hold_everything(&env, &serve, tenant, &back, &acked).await?;
    in_order(
        "dedicated",
        &tenant_events(env.store_url("dedicated"), tenant).await?,
    );
    assert_eq!(
        fence(env.store_url("shared"), tenant).await?.as_deref(),
        Some("open")
    );
    assert_eq!(
        fence(env.store_url("dedicated"), tenant).await?.as_deref(),
        Some("copiers")
    );
    assert_eq!(
        route(&env, tenant)?,
        (
            "shared".to_owned(),
            "normal".to_owned(),
            Some("dedicated".to_owned())
        )
    );
    let first = env.control_json(&["status", &id])?;
    assert_eq!(first["reverted_by"], back.as_str(), "{first}");
    assert!(first["finished_at"].is_string(), "{first}");
    let second = env.control_json(&["status", &back])?;
    assert_eq!(second["reverts"], id.as_str(), "{second}");
    assert_eq!(second["state"], "migrated", "{second}");
    assert_eq!(second["reverse_replication"], true, "{second}");
    let (actions, last) = audit(&env, &id)?;
    assert!(actions.iter().any(|a| a == "revert"), "{actions:?}");
    assert_eq!(last["details"]["reverted_by"], back.as_str(), "{last}");
    Ok(())
}

/// `revert` refuses, changing nothing, a migration it cannot undo: one completed (the store it
/// left is no longer kept current), one that ran with `--no-reverse`, one not migrated; and after
/// a revert, `complete` and `revert` of the reverted migration say it was reverted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_is_refused_after_complete_and_without_reverse_replication() -> Result<()> {
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\n").await?;
    let _serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let refused = |out: CommandOutput, says: &[&str]| -> Result<()> {
        ensure!(
            out.code == 1,
            "exit {}: {}{}",
            out.code,
            out.stdout,
            out.stderr
        );
        for s in says {
            ensure!(out.stderr.contains(s), "{s:?} not in: {}", out.stderr);
        }
        Ok(())
    };

    let completed = Uuid::new_v4();
    seed(env.store_url("shared"), completed, 2, 5).await?;
    let id = migrate_to_dual_write(&env, completed, "dedicated", &[]).await?;
    refused(
        revert(&env, &id, &[], &[]).await?,
        &["is dual_write", "applies only to a migrated migration"],
    )?;
    cut_over(&env, &id).await?;
    env.control_json(&["complete", &id, "--reason", "done"])?;
    refused(
        revert(&env, &id, &[], &[]).await?,
        &[
            "revert is no longer possible",
            "migrate start",
            "--reset-target",
        ],
    )?;
    assert_eq!(
        route(&env, completed)?,
        ("dedicated".to_owned(), "normal".to_owned(), None),
        "nothing changed"
    );

    let plain = Uuid::new_v4();
    seed(env.store_url("shared"), plain, 2, 5).await?;
    let id = migrate_to_dual_write(&env, plain, "dedicated", &["--no-reverse"]).await?;
    cut_over(&env, &id).await?;
    refused(
        revert(&env, &id, &[], &[]).await?,
        &["--no-reverse", "--reset-target"],
    )?;
    assert_eq!(
        fence(env.store_url("shared"), plain).await?.as_deref(),
        Some("moved")
    );

    let twice = Uuid::new_v4();
    seed(env.store_url("shared"), twice, 2, 5).await?;
    let id = migrate_to_dual_write(&env, twice, "dedicated", &[]).await?;
    cut_over(&env, &id).await?;
    let back = reverted(&env, &id, &[]).await?["revert_migration_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    refused(
        revert(&env, &id, &[], &[]).await?,
        &["was reverted by migration", &back],
    )?;
    refused(
        control_off_thread(&env, &["complete", &id, "--reason", "x"], &[]).await?,
        &["was reverted by migration", &back],
    )?;
    Ok(())
}

/// `serve`'s grace-period completion (`control.reverse_replication_hours`) comes due while the
/// migration is being reverted (the revert held before its cutover, past the grace period): it
/// leaves the migration to its revert (ending its reverse replication would close the store the
/// revert moves the tenant back to, to the revert's own copiers), and the revert succeeds and
/// finishes it as reverted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_completion_leaves_a_migration_being_reverted_alone() -> Result<()> {
    // 0.001 h = 3.6 s.
    let env = two_stores(
        "[proxy]\nrouting_poll_ms = 100\n[control]\nreverse_replication_hours = 0.001\n",
    )
    .await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 3, 10).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    cut_over(&env, &id).await?;
    let out = revert(
        &env,
        &id,
        &[],
        &[("SWITCHYARD_PAUSE_AT", "revert_before_cutover:6000")],
    )
    .await?;
    let outcome = first_json(&out.stdout)?;
    ensure!(
        out.code == 0 && outcome["success"] == true,
        "exit {}: {}{}\nserve log:\n{}",
        out.code,
        out.stdout,
        out.stderr,
        serve.log()
    );
    let back = outcome["revert_migration_id"].as_str().unwrap_or_default();
    let status = env.control_json(&["status", &id])?;
    assert_eq!(status["reverted_by"], back, "{status}");
    let (_, last) = audit(&env, &id)?;
    assert_eq!(last["details"]["reverted_by"], back, "{last}");
    assert_eq!(
        fence(env.store_url("shared"), tenant).await?.as_deref(),
        Some("open")
    );
    Ok(())
}

/// Two operators run `revert M` at once, both past their checks before either recorded the
/// revert migration (each held at the pause point `revert_before_insert`): the second's record
/// is refused (the tenant has an active migration, the first's revert). The second then goes on
/// as a rerun would, with the first's revert migration: exactly one cutover happens, the other
/// command succeeds as well or says that someone else changed the migration first; before, it
/// answered "already has an active migration …; let it finish or abort it first", advice that
/// would have undone the revert under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reverts_at_once_make_one_revert() -> Result<()> {
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 3, 10).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    cut_over(&env, &id).await?;
    let first = revert(
        &env,
        &id,
        &[],
        &[("SWITCHYARD_PAUSE_AT", "revert_before_insert:3000")],
    );
    let second = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        revert(
            &env,
            &id,
            &[],
            &[("SWITCHYARD_PAUSE_AT", "revert_before_insert:3000")],
        )
        .await
    };
    let (first, second) = tokio::join!(first, second);
    let outs = [first?, second?];
    let said = |out: &CommandOutput| format!("exit {}: {}{}", out.code, out.stdout, out.stderr);
    let both = format!(
        "{}\n{}\nserve log:\n{}",
        said(&outs[0]),
        said(&outs[1]),
        serve.log()
    );
    let succeeded: Vec<&CommandOutput> = outs
        .iter()
        .filter(|o| o.code == 0 && first_json(&o.stdout).is_ok_and(|v| v["success"] == true))
        .collect();
    ensure!(!succeeded.is_empty(), "no revert succeeded:\n{both}");
    for out in &outs {
        ensure!(
            out.code == 0 || out.stderr.contains("someone else changed it first"),
            "the other revert:\n{both}"
        );
    }
    let back = env.control_json(&["status", &id])?["reverted_by"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ids: Vec<String> = succeeded
        .iter()
        .map(|o| {
            first_json(&o.stdout).map_or_else(
                |_| String::new(),
                |v| {
                    v["revert_migration_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                },
            )
        })
        .collect();
    ensure!(
        !back.is_empty() && ids.iter().all(|i| *i == back),
        "one revert migration, {back}:\n{both}"
    );
    let migrations = env.control_json(&["list"])?;
    let of_tenant = migrations.as_array().map_or(0, |all| {
        all.iter()
            .filter(|m| m["tenant_id"] == tenant.to_string())
            .count()
    });
    assert_eq!(of_tenant, 2, "the migration and one revert: {migrations}");
    assert_eq!(route(&env, tenant)?.0, "shared");
    assert_eq!(
        (
            fence(env.store_url("shared"), tenant).await?.as_deref(),
            fence(env.store_url("dedicated"), tenant).await?.as_deref()
        ),
        (Some("open"), Some("copiers"))
    );
    Ok(())
}

/// Found by the model (issue 19 item 5, mutant `OPEN_TARGET_UNCONDITIONALLY`): a cutover's driver
/// that stalls between moving the source's fence and opening the target, past its budget, is
/// finished by `serve`'s recoverer; the tenant is then reverted, and the revert's move sets that
/// target's fence back to `copiers` and opens the store the tenant returned to. When the stalled
/// driver goes on, its open must not reopen the store the tenant left: before, it set the fence
/// `open` whatever it held, and both stores admitted writers (invariant 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_cutover_never_reopens_a_store_a_revert_moved_the_tenant_out_of() -> Result<()> {
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 3, 10).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    let args = ["--json", "cutover", &id, "--timeout-ms", "1000"];
    let vars = [("SWITCHYARD_PAUSE_AT", "before_open_target:25000")];
    let stalled = control_off_thread(&env, &args, &vars);
    let meanwhile = async {
        // The recoverer finishes the abandoned cutover; then the tenant goes back.
        wait_for_every(
            Duration::from_secs(60),
            Duration::from_millis(200),
            || async { Ok(env.control_json(&["status", &id])?["state"] == "migrated") },
        )
        .await
        .map_err(|e| e.context(format!("serve log:\n{}", serve.log())))?;
        reverted(&env, &id, &[]).await
    };
    let (stalled, outcome) = tokio::join!(stalled, meanwhile);
    let outcome = outcome?;
    let stalled = stalled?;
    assert_eq!(outcome["store_id"], "shared", "{outcome}");
    let fences = (
        fence(env.store_url("shared"), tenant).await?,
        fence(env.store_url("dedicated"), tenant).await?,
    );
    assert_eq!(
        (fences.0.as_deref(), fences.1.as_deref()),
        (Some("open"), Some("copiers")),
        "the stalled cutover's late open (exit {}: {}{})",
        stalled.code,
        stalled.stdout,
        stalled.stderr
    );
    assert_eq!(route(&env, tenant)?.0, "shared");
    Ok(())
}

/// The crash points of the revert (its own and its cutover's), in protocol order.
const CRASH_POINTS: [&str; 10] = [
    "revert_after_start",
    "revert_before_cutover",
    "after_gate_closed",
    "after_fence_taken",
    "after_delta_verified",
    "revert_before_rollback",
    "after_source_moved",
    "after_fence",
    "after_routing_flipped",
    "revert_after_cutover",
];

/// The control process dies (abort, as kill -9) at each step of a revert in turn, with writers
/// throughout; `revert` run again (beside `serve`) ends the revert, from wherever it stopped:
/// the tenant lives in the store the migration left, kept current the other way. Each revert is
/// then the migration the next point reverts, so the tenant goes back and forth. Right after
/// each crash the two stores are never both open to writers; at the end nothing acknowledged is
/// lost or duplicated and both stores hold the same events, every stream in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_crash_at_every_revert_step_is_finished_by_revert_again() -> Result<()> {
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 3000\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 5, 20).await?;
    let http = Http::new();
    let proxy = env.proxy(&[])?;
    proxy.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let mut id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    let load = Load::start(&http, std::slice::from_ref(&proxy.data), tenant, 4);
    cut_over(&env, &id).await?;
    let (mut lives, mut left) = ("dedicated", "shared");

    for point in CRASH_POINTS {
        load.progress(10, Duration::from_secs(20)).await?;
        let crash = [("SWITCHYARD_CRASH_AT", point)];
        // `revert_before_rollback` needs a failing attempt: the fence held past a short budget.
        let out = if point == "revert_before_rollback" {
            revert_with_fence_held(&env, &id, tenant, lives, "500", &crash).await?
        } else {
            revert(&env, &id, &["--timeout-ms", "2000"], &crash).await?
        };
        ensure!(
            out.code != 0 && out.stderr.contains(&format!("crashing at {point}")),
            "the control process did not die at {point}: exit {}\n{}{}",
            out.code,
            out.stdout,
            out.stderr
        );
        let both = (
            fence(env.store_url(lives), tenant).await?,
            fence(env.store_url(left), tenant).await?,
        );
        ensure!(
            both.0.as_deref() != Some("open") || both.1.as_deref() != Some("open"),
            "right after the crash at {point} both fences are open: {both:?}"
        );
        let outcome = reverted(&env, &id, &["--timeout-ms", "2000"])
            .await
            .with_context(|| {
                format!(
                    "revert again after the crash at {point}; serve log:\n{}",
                    serve.log()
                )
            })?;
        assert_eq!(outcome["store_id"], left, "{point}: {outcome}");
        id = outcome["revert_migration_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (lives, left) = (left, lives);
        route_is(
            &http,
            &proxy,
            tenant,
            "store_id",
            lives,
            Duration::from_secs(10),
        )
        .await
        .with_context(|| format!("after {point}"))?;
        assert_eq!(
            fence(env.store_url(lives), tenant).await?.as_deref(),
            Some("open")
        );
        assert_eq!(
            fence(env.store_url(left), tenant).await?.as_deref(),
            Some("copiers")
        );
        println!("{point}: reverted by {id}, now in {lives}");
    }
    load.progress(10, Duration::from_secs(20)).await?;
    let record = load.stop().await?;
    both_stores_hold_everything(&env, &serve, tenant, &id, &record.acked).await?;
    let failures = record.failures();
    assert!(
        failures.keys().all(|k| k == "503 writes_paused"),
        "only gate waits past the limit failed, and were retried: {failures:?}"
    );
    Ok(())
}

/// The proxies' settings of the tests with writers: a routing change is seen within 100 ms, and
/// a writer waits at a closed gate up to 3 s.
const WITH_WRITERS: &str = "[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 3000\n";

/// A tenant of 30 events migrated from `shared` to `dedicated` (reverse replication on) while 4
/// writers append through a proxy, `serve` running; they go on. Answers what the test holds.
async fn migrated_with_writers(
    backend: Backend,
) -> Result<(Env, ProxyProcess, ServeProcess, (String, Uuid), Load)> {
    let env = Env::new(backend, &["shared", "dedicated"], WITH_WRITERS).await?;
    env.control_json(&["init"])?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 3, 10).await?;
    let http = Http::new();
    let proxy = env.proxy(&[])?;
    proxy.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    let load = Load::start(&http, std::slice::from_ref(&proxy.data), tenant, 4);
    cut_over(&env, &id).await?;
    load.progress(20, Duration::from_secs(30)).await?;
    Ok((env, proxy, serve, (id, tenant), load))
}

/// After a revert of migration `id` that did not move the tenant (rolled back or aborted):
/// the tenant is normal on `dedicated` again under `id`'s reverse replication, `shared`
/// admitting copiers only, and `id` can still be reverted.
async fn reverse_replication_is_back(env: &Env, id: &str, tenant: Uuid) -> Result<()> {
    assert_eq!(
        route(env, tenant)?,
        (
            "dedicated".to_owned(),
            "normal".to_owned(),
            Some("shared".to_owned())
        ),
        "the reverse replication the revert interrupted is back"
    );
    assert_eq!(
        (
            fence(env.store_url("shared"), tenant).await?.as_deref(),
            fence(env.store_url("dedicated"), tenant).await?.as_deref()
        ),
        (Some("copiers"), Some("open"))
    );
    let status = env.control_json(&["status", id])?;
    assert_eq!(
        (&status["reverse_replication"], &status["reverted_by"]),
        (&Value::Bool(true), &Value::Null),
        "{status}"
    );
    Ok(())
}

/// Then a later `revert` of `id` succeeds with a new revert migration (not `ended`) while the
/// writers go on; once they stop, both stores hold everything acknowledged.
async fn a_later_revert_succeeds(
    env: &Env,
    serve: &ServeProcess,
    load: Load,
    (id, tenant): (&str, Uuid),
    ended: &str,
) -> Result<()> {
    load.progress(20, Duration::from_secs(20)).await?;
    let outcome = reverted(env, id, &[]).await?;
    let again = outcome["revert_migration_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(again != ended, "a new revert migration");
    load.progress(20, Duration::from_secs(20)).await?;
    let record = load.stop().await?;
    both_stores_hold_everything(env, serve, tenant, &again, &record.acked).await?;
    Ok(())
}

/// A revert whose cutover runs out of budget (the fence in the store the tenant lives in is
/// held by an append that does not commit) rolls back by itself to exactly where it started:
/// the revert migration rolled back, the tenant normal on `dedicated` keeping `shared` current,
/// `shared` admitting copiers only; writers go on, and a later `revert` succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_out_of_budget_rolls_back_and_a_later_revert_succeeds() -> Result<()> {
    let (env, _proxy, serve, (id, tenant), load) = migrated_with_writers(Backend::Postgres).await?;

    let out = revert_with_fence_held(&env, &id, tenant, "dedicated", "300", &[]).await?;
    let outcome = first_json(&out.stdout)?;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert_eq!(outcome["success"], false, "{outcome}");
    assert_eq!(outcome["state"], "rolled_back", "{outcome}");
    let failed = outcome["revert_migration_id"].as_str().unwrap_or_default();
    ensure!(
        outcome["error"]
            .as_str()
            .unwrap_or_default()
            .contains("budget"),
        "{outcome}"
    );
    reverse_replication_is_back(&env, &id, tenant).await?;
    let (actions, _) = audit(&env, failed)?;
    assert_eq!(
        actions.last().map(String::as_str),
        Some("abort"),
        "{actions:?}"
    );
    a_later_revert_succeeds(&env, &serve, load, (&id, tenant), failed).await?;
    Ok(())
}

/// `abort R` of a revert in progress (its migration dual-writing, the `revert` command held
/// before its cutover) while writers go on: R is rolled back and the tenant's route is M's
/// reverse replication again (normal on `dedicated`, keeping `shared` current, `shared`
/// admitting copiers only), so M can still be undone; the held `revert` then fails saying R
/// changed, and a later `revert` succeeds with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_of_a_revert_in_progress_gives_back_the_reverse_replication() -> Result<()> {
    let (env, _proxy, serve, (id, tenant), load) = migrated_with_writers(Backend::Postgres).await?;

    let held = revert(
        &env,
        &id,
        &[],
        &[("SWITCHYARD_PAUSE_AT", "revert_before_cutover:8000")],
    );
    let abort = async {
        wait_for_every(
            Duration::from_secs(60),
            Duration::from_millis(50),
            || async {
                Ok(env.control_json(&["status", &id])?["reverted_by_state"] == "dual_write")
            },
        )
        .await
        .context("the revert migration never reached dual_write")?;
        let back = env.control_json(&["status", &id])?["reverted_by"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let aborted = env.control_json(&["abort", &back, "--reason", "changed my mind"])?;
        Result::<(String, Value)>::Ok((back, aborted))
    };
    let (held, aborted) = tokio::join!(held, abort);
    let (back, aborted) = aborted?;
    let held = held?;
    assert_eq!(aborted["state"], "rolled_back", "{aborted}");
    assert_ne!(held.code, 0, "{}{}", held.stdout, held.stderr);
    assert!(
        held.stderr.contains(&back),
        "the held revert names its revert migration: {}",
        held.stderr
    );
    reverse_replication_is_back(&env, &id, tenant).await?;
    a_later_revert_succeeds(&env, &serve, load, (&id, tenant), &back).await?;
    Ok(())
}

/// The embedded default (SQLite stores and control database): a tenant cut over from `shared`
/// to `dedicated` is reverted while 4 writers append through a proxy, then reverted again
/// (the revert's revert, forward once more). Nothing acknowledged is lost or duplicated, every
/// stream is in order, and the store the tenant left holds exactly its events each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_and_its_revert_on_sqlite_lose_nothing() -> Result<()> {
    let (env, _proxy, serve, (id, tenant), load) = migrated_with_writers(Backend::Sqlite).await?;
    let back = reverted(&env, &id, &[]).await?;
    assert_eq!(back["store_id"], "shared", "{back}");
    let back = back["revert_migration_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    load.progress(20, Duration::from_secs(30)).await?;
    let forth = reverted(&env, &back, &[]).await?;
    assert_eq!(forth["store_id"], "dedicated", "{forth}");
    let forth = forth["revert_migration_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    load.progress(20, Duration::from_secs(30)).await?;
    let record = load.stop().await?;
    both_stores_hold_everything(&env, &serve, tenant, &forth, &record.acked).await?;
    assert_eq!(route(&env, tenant)?.0, "dedicated");
    Ok(())
}

/// Proxy B is cut off from the control database (its connections blackholed) while the tenant,
/// migrated to `dedicated`, is reverted to `shared`; B still routes it to `dedicated`. B's
/// appends, during and after the revert, are either acknowledged by the store the tenant lives
/// in at that moment or not at all — never by `dedicated` once its fence admits copiers only —
/// and none acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_from_control_during_a_revert_loses_nothing() -> Result<()> {
    let gate = TcpGate::start(PG).await?;
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 1000\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 3, 10).await?;
    let http = Http::new();
    let a = env.proxy(&[])?;
    let b = env.proxy(&[("SWITCHYARD_CONTROL_URL", &gate.url(&env.control_url))])?;
    a.wait_ready(&http).await?;
    b.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    cut_over(&env, &id).await?;
    route_is(
        &http,
        &b,
        tenant,
        "store_id",
        "dedicated",
        Duration::from_secs(10),
    )
    .await?;
    gate.set(GateMode::Blackhole);
    let writers = Writers::start(
        &http,
        &[a.data.clone(), b.data.clone()],
        tenant,
        4,
        2,
        Duration::from_millis(10),
    );
    let outcome = reverted(&env, &id, &[])
        .await
        .map_err(|e| e.context(format!("serve log:\n{}", serve.log())))?;
    let back = outcome["revert_migration_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    more_acked(&writers, 50).await?;
    // B still believes the tenant lives in `dedicated`.
    let stale = Uuid::new_v4();
    let reply = http
        .post(
            &stream_url(&b.data, tenant, "Order", stale),
            &events_body(None, 2, "Stale"),
        )
        .await?;
    assert!(
        reply.status != StatusCode::CREATED || reply.json["store_id"] == "shared",
        "a fenced store acknowledged an append after the revert: {:?}",
        reply.json
    );
    let acked = writers.stop().await?;
    gate.open();
    let lives = both_stores_hold_everything(&env, &serve, tenant, &back, &acked).await?;
    if reply.status == StatusCode::CREATED {
        ensure!(
            lives.iter().any(|e| e.aggregate_id == stale),
            "B's acknowledged append is in shared"
        );
    }
    Ok(())
}
