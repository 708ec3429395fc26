//! Issue 19: undo after a cutover. The fence states (`open`, `copiers`, `moved`): a target
//! admits only Switchyard's copiers until its cutover commits (DESIGN.md invariant 8).

use std::time::Duration;

use anyhow::ensure;
use http::StatusCode;
use switchyard_tests::pgcluster::PgCluster;
use switchyard_tests::{
    assert_all_acked, events_body, fence, migrate_to_dual_write, seed, seed_sql, stream_url,
    tenant_events, wait_for_every, Backend, Env, GateMode, Http, Result, ServeProcess, TcpGate,
    Writers,
};
use uuid::Uuid;

use crate::fault_scenarios::{audit, cut_over, cut_over_until_routed, route_is, two_stores};

/// The shared test PostgreSQL server, which the gates forward to.
const PG: &str = "127.0.0.1:5432";

/// Proxy B routes the tenant to `dedicated` (an old route) and is then cut off from the
/// control database; the tenant goes back to `shared` and starts migrating to `dedicated`.
/// Before the cutover commits, neither B's append nor a direct writer's insert lands in the
/// target (its fence admits copiers only and names the source); the copy, tail and mirror
/// still fill it, and the cutover opens it: afterwards a direct insert lands there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_from_control_cannot_append_into_the_target_before_the_cutover(
) -> Result<()> {
    let gate = TcpGate::start(PG).await?;
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 500\n").await?;
    let tenant = Uuid::new_v4();
    let t = tenant.to_string();
    seed(env.store_url("shared"), tenant, 3, 10).await?;
    let http = Http::new();
    env.control_json(&["routing", "set", &t, "dedicated"])?;
    let b = env.proxy(&[("SWITCHYARD_CONTROL_URL", &gate.url(&env.control_url))])?;
    b.wait_ready(&http).await?;
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
    env.control_json(&["routing", "set", &t, "shared"])?;

    let _serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;

    // B's append, on its old route to the target: refused there (never acknowledged by it).
    let stale = Uuid::new_v4();
    let reply = http
        .post(
            &stream_url(&b.data, tenant, "Order", stale),
            &events_body(None, 2, "Stale"),
        )
        .await?;
    assert!(
        reply.status != StatusCode::CREATED || reply.json["store_id"] == "shared",
        "the target acknowledged an append before its cutover: {:?}",
        reply.json
    );
    // A direct writer into the target: refused by the fence trigger.
    let direct = seed_sql(env.store_url("dedicated"), tenant, 1).await;
    let refused = format!("{:?}", direct.as_ref().err());
    assert!(
        refused.contains("has moved to store shared"),
        "a direct insert into the target before its cutover: {refused}"
    );
    let target = tenant_events(env.store_url("dedicated"), tenant).await?;
    let source = tenant_events(env.store_url("shared"), tenant).await?;
    ensure!(
        target.iter().all(|e| e.aggregate_id != stale),
        "B's append reached the target before its cutover"
    );
    assert_eq!(target, source, "the copiers still fill the target");
    assert_eq!(
        fence(env.store_url("dedicated"), tenant).await?.as_deref(),
        Some("copiers")
    );

    cut_over(&env, &id).await?;
    assert_eq!(
        fence(env.store_url("dedicated"), tenant).await?.as_deref(),
        Some("open")
    );
    assert_eq!(
        fence(env.store_url("shared"), tenant).await?.as_deref(),
        Some("copiers")
    );
    seed_sql(env.store_url("dedicated"), tenant, 1).await?;
    gate.open();
    Ok(())
}

/// Migrates `tenant` to `dedicated` and cuts it over while 8 writers append through proxies
/// `a` and `b`, until both route it to `dedicated`; the writers go on. Answers the migration id.
async fn cut_over_under_writers(
    env: &switchyard_tests::Env,
    http: &Http,
    [a, b]: [&switchyard_tests::ProxyProcess; 2],
    tenant: Uuid,
) -> Result<(String, Writers)> {
    let id = migrate_to_dual_write(env, tenant, "dedicated", &[]).await?;
    let writers = Writers::start(
        http,
        &[a.data.clone(), b.data.clone()],
        tenant,
        8,
        2,
        Duration::from_millis(10),
    );
    cut_over(env, &id).await?;
    for proxy in [a, b] {
        route_is(
            http,
            proxy,
            tenant,
            "store_id",
            "dedicated",
            Duration::from_secs(10),
        )
        .await?;
    }
    Ok((id, writers))
}

/// Reverse replication (issue 19 item 2): a tenant cuts over from `shared` to `dedicated`
/// while 8 writers append through 2 proxies, and goes on appending to `dedicated`. The store it
/// left is kept current: the proxies mirror each append back to it and `serve`'s reverse tail
/// completes it, also across an outage of `shared` (every connection the proxies and `serve`
/// hold to it cut, new ones refused, for a while). Afterwards `status` shows reverse lag 0
/// and an undo possible, and `shared` holds exactly the tenant's events of `dedicated` (checked
/// by event id, stream, version and content); a direct writer is still refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_replication_keeps_the_store_the_tenant_left_current_across_an_outage() -> Result<()>
{
    let gate = TcpGate::start(PG).await?;
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 2000\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 3, 10).await?;
    let http = Http::new();
    let shared = gate.url(env.store_url("shared"));
    let vars = [("SWITCHYARD_STORE_SHARED_URL", shared.as_str())];
    let (a, b) = (env.proxy(&vars)?, env.proxy(&vars)?);
    a.wait_ready(&http).await?;
    b.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &vars)?;
    let (id, writers) = cut_over_under_writers(&env, &http, [&a, &b], tenant).await?;
    // The store the tenant left goes away and comes back while writers go on.
    gate.close();
    let during = tenant_events(env.store_url("dedicated"), tenant)
        .await?
        .len();
    wait_for_every(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            Ok(tenant_events(env.store_url("dedicated"), tenant)
                .await?
                .len()
                >= during + 40)
        },
    )
    .await?;
    gate.open();
    let acked = writers.stop().await?;

    wait_for_every(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let status = env.control_json(&["status", &id])?;
            Ok(status["reverse_lag"] == 0 && status["undo_possible"] == true)
        },
    )
    .await
    .map_err(|e| e.context(format!("serve log:\n{}", serve.log())))?;
    let lives = tenant_events(env.store_url("dedicated"), tenant).await?;
    let left = tenant_events(env.store_url("shared"), tenant).await?;
    assert_all_acked(&acked, &lives);
    assert_eq!(
        left, lives,
        "the store the tenant left holds exactly its events"
    );
    let status = env.control_json(&["status", &id])?;
    assert_eq!(status["reverse_replication"], true, "{status}");
    // `list` says so too: the undo it can be undone with, and its reverse lag.
    let listed = env.control_json(&["list"])?;
    let entry = listed
        .as_array()
        .and_then(|all| all.iter().find(|m| m["id"] == id.as_str()))
        .ok_or_else(|| anyhow::anyhow!("{id} not listed: {listed}"))?;
    assert_eq!(
        (&entry["reverse_replication"], &entry["reverse_lag"]),
        (&serde_json::json!(true), &serde_json::json!(0)),
        "{entry}"
    );
    let text = env.control(&["list"])?.stdout;
    assert!(
        text.lines()
            .any(|l| l.starts_with(id.as_str()) && l.ends_with("revert (reverse lag 0)")),
        "{text}"
    );
    assert_eq!(
        fence(env.store_url("shared"), tenant).await?.as_deref(),
        Some("copiers")
    );
    let direct = seed_sql(env.store_url("shared"), tenant, 1).await;
    assert!(
        format!("{:?}", direct.err()).contains("has moved to store dedicated"),
        "a direct writer into the store the tenant left"
    );
    Ok(())
}

/// Reverse replication survives a real restart of the store the tenant left (issue 19's test
/// list): `shared` is a private PostgreSQL cluster, restarted (`pg_ctl restart -m fast`) after
/// the tenant cut over to `dedicated`, while 8 writers go on appending there through 2 proxies.
/// The restart cuts every connection the proxies' reverse mirrors and `serve`'s reverse tail
/// hold to it; once it is back, reverse replication completes it: reverse lag 0, and `shared`
/// holds exactly the tenant's events of `dedicated`, by id, stream, version and content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_replication_survives_a_restart_of_the_store_the_tenant_left() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await??;
    let shared = cluster.create_db("shared").await?;
    let env = Env::new(
        Backend::Postgres,
        &["shared", "dedicated"],
        "[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 2000\n",
    )
    .await?;
    let config = std::fs::read_to_string(&env.config_path)?.replace(
        &format!("\"{}\"", env.store_url("shared")),
        &format!("\"{shared}\""),
    );
    std::fs::write(&env.config_path, config)?;
    env.control_json(&["init"])?;
    let tenant = Uuid::new_v4();
    seed(&shared, tenant, 3, 10).await?;
    let http = Http::new();
    let (a, b) = (env.proxy(&[])?, env.proxy(&[])?);
    a.wait_ready(&http).await?;
    b.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let (id, writers) = cut_over_under_writers(&env, &http, [&a, &b], tenant).await?;
    let dedicated = env.store_url("dedicated");
    let before = tenant_events(dedicated, tenant).await?.len();
    let cluster =
        tokio::task::spawn_blocking(move || cluster.restart().map(|()| cluster)).await??;
    wait_for_every(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { Ok(tenant_events(dedicated, tenant).await?.len() >= before + 40) },
    )
    .await?;
    let acked = writers.stop().await?;

    wait_for_every(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let status = env.control_json(&["status", &id])?;
            Ok(status["reverse_lag"] == 0 && status["undo_possible"] == true)
        },
    )
    .await
    .map_err(|e| {
        e.context(format!(
            "serve log:\n{}\nserver log:\n{}",
            serve.log(),
            cluster.log()
        ))
    })?;
    let lives = tenant_events(dedicated, tenant).await?;
    let left = tenant_events(&shared, tenant).await?;
    assert_all_acked(&acked, &lives);
    assert!(lives.len() >= before + 40, "the writers went on meanwhile");
    assert_eq!(
        left, lives,
        "the store the tenant left holds exactly its events after its restart"
    );
    assert_eq!(fence(&shared, tenant).await?.as_deref(), Some("copiers"));
    Ok(())
}

/// The tenant is migrated to `dedicated` with reverse replication (`shared` kept current) and
/// moved back with `migrate start --reset-target` while writers go on: the start ends that
/// reverse replication first (the earlier migration's audit ends with `complete`, saying so),
/// so the reset deletes nothing the reverse mirror or tail writes again; the new migration
/// catches up, cuts over, and both stores end with exactly the tenant's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_migration_ends_the_reverse_replication_of_the_last_one_first() -> Result<()> {
    let env = two_stores("[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 2000\n").await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 3, 10).await?;
    let http = Http::new();
    let proxy = env.proxy(&[])?;
    proxy.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let first = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    let writers = Writers::start(
        &http,
        std::slice::from_ref(&proxy.data),
        tenant,
        4,
        2,
        Duration::from_millis(10),
    );
    cut_over_until_routed(&env, &http, &proxy, tenant, &first, "dedicated").await?;
    ensure!(
        env.control_json(&["status", &first])?["reverse_replication"] == true,
        "the first migration keeps shared current"
    );

    let back = migrate_to_dual_write(&env, tenant, "shared", &["--reset-target"])
        .await
        .map_err(|e| e.context(format!("serve log:\n{}", serve.log())))?;
    let (actions, last) = audit(&env, &first)?;
    assert_eq!(
        actions.last().map(String::as_str),
        Some("complete"),
        "{actions:?}"
    );
    assert_eq!(last["details"]["ended_by"], "migrate start", "{last}");
    assert_eq!(
        env.control_json(&["status", &first])?["reverse_replication"],
        false
    );
    cut_over_until_routed(&env, &http, &proxy, tenant, &back, "shared").await?;
    let acked = writers.stop().await?;
    wait_for_every(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let status = env.control_json(&["status", &back])?;
            Ok(status["reverse_lag"] == 0)
        },
    )
    .await
    .map_err(|e| e.context(format!("serve log:\n{}", serve.log())))?;
    let lives = tenant_events(env.store_url("shared"), tenant).await?;
    assert_all_acked(&acked, &lives);
    assert_eq!(
        tenant_events(env.store_url("dedicated"), tenant).await?,
        lives,
        "the store the tenant left holds exactly its events"
    );
    Ok(())
}

/// `serve`'s grace-period completion (`control.reverse_replication_hours`) ends reverse
/// replication as `complete` does: once the migration is finished, the tenant's route no
/// longer names the store it left (proxies stop mirroring back, the reverse tail stops) and
/// that store's fence admits nobody (`moved`, not `copiers`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_completion_ends_reverse_replication() -> Result<()> {
    // 0.0005 h = 1.8 s.
    let env = two_stores(
        "[proxy]\nrouting_poll_ms = 100\n[control]\nreverse_replication_hours = 0.0005\n",
    )
    .await?;
    let tenant = Uuid::new_v4();
    seed(env.store_url("shared"), tenant, 3, 10).await?;
    let serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
    let id = migrate_to_dual_write(&env, tenant, "dedicated", &[]).await?;
    cut_over(&env, &id).await?;
    // serve's reverse lag of the tenant: there while the store it left is kept current, gone
    // once that ends (a series left at its last value would say an undo is still possible).
    let http = Http::new();
    let series = format!("switchyard_control_reverse_lag_events{{tenant=\"{tenant}\"}}");
    let exported = || async {
        let reply = http.get(&format!("{}/metrics", serve.admin)).await?;
        Ok::<_, anyhow::Error>(String::from_utf8_lossy(&reply.body).contains(&series))
    };
    wait_for_every(Duration::from_secs(30), Duration::from_millis(50), exported).await?;
    wait_for_every(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async { Ok(env.control_json(&["status", &id])?["finished_at"].is_string()) },
    )
    .await
    .map_err(|e| e.context(format!("serve log:\n{}", serve.log())))?;
    wait_for_every(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { Ok(!exported().await?) },
    )
    .await
    .map_err(|e| e.context(format!("{series} is still exported after the completion")))?;
    let route = env.control_json(&["routing", "get", &tenant.to_string()])?;
    assert_eq!(
        (
            route["store_id"].as_str(),
            route["migration_state"].as_str(),
            &route["target_store_id"]
        ),
        (Some("dedicated"), Some("normal"), &serde_json::Value::Null),
        "{route}"
    );
    assert_eq!(
        fence(env.store_url("shared"), tenant).await?.as_deref(),
        Some("moved")
    );
    assert_eq!(
        env.control_json(&["status", &id])?["reverse_replication"],
        false
    );
    let listed = env.control_json(&["list"])?;
    assert_eq!(
        listed[0]["reverse_replication"], false,
        "no undo after the completion: {listed}"
    );
    assert!(
        env.control(&["list"])?
            .stdout
            .lines()
            .nth(1)
            .is_some_and(|l| l.ends_with("\t-")),
        "list's UNDO column after the completion"
    );
    Ok(())
}
