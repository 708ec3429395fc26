//! Routing through the real control CLI and a real proxy: NOTIFY delivery, the poll safety
//! net, snapshots held by in-flight requests, admin reload with a token, and routes naming a
//! store the proxy does not have.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use sqlx::Connection;
use switchyard_tests::{
    events_body, for_each_backend, started, stream_url, wait_for, Backend, Http, ProxyProcess,
    Result,
};
use uuid::Uuid;

async fn routed_store(http: &Http, proxy: &ProxyProcess, tenant: Uuid) -> Result<String> {
    routed_store_with(http, proxy, tenant, None).await
}

/// [`routed_store`] from a proxy with an admin token (admin reads need it).
async fn routed_store_with(
    http: &Http,
    proxy: &ProxyProcess,
    tenant: Uuid,
    admin_token: Option<&str>,
) -> Result<String> {
    let route = switchyard_tests::route_state_with(http, proxy, tenant, admin_token).await?;
    Ok(route["store_id"].as_str().unwrap_or_default().to_owned())
}

/// With the poll effectively off, a `routing set` reaches the proxy through NOTIFY alone,
/// well within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_set_reaches_a_running_proxy_through_notify() -> Result<()> {
    let extra = "[proxy]\nrouting_poll_ms = 600000\n";
    let (env, proxy, http) =
        started(Backend::Postgres, &["shared", "dedicated"], extra, &[]).await?;
    let tenant = Uuid::new_v4();
    assert_eq!(routed_store(&http, &proxy, tenant).await?, "shared");
    // Let the listener connect (it reports itself through a reload) before the change.
    wait_for(Duration::from_secs(5), || async {
        let metrics = http.get(&format!("{}/metrics", proxy.admin)).await?;
        Ok(String::from_utf8_lossy(&metrics.body).contains("trigger=\"notify\""))
    })
    .await?;
    let started_at = Instant::now();
    env.control_json(&["routing", "set", &tenant.to_string(), "dedicated"])?;
    wait_for(Duration::from_secs(1), || async {
        Ok(routed_store(&http, &proxy, tenant).await? == "dedicated")
    })
    .await?;
    assert!(started_at.elapsed() < Duration::from_secs(2));
    let reply = http
        .post(
            &stream_url(&proxy.data, tenant, "Order", Uuid::new_v4()),
            &events_body(None, 1, "E"),
        )
        .await?;
    assert_eq!(reply.json["store_id"], "dedicated");
    Ok(())
}

/// With notifications off, the epoch poll alone brings the change (the only path on SQLite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poll_catches_up_when_notifications_are_lost() -> Result<()> {
    for_each_backend(|backend| async move {
        let extra = "[proxy]\nrouting_listen = false\nrouting_poll_ms = 200\n";
        let (env, proxy, http) = started(backend, &["shared", "dedicated"], extra, &[]).await?;
        let tenants: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for tenant in &tenants {
            env.control_json(&["routing", "set", &tenant.to_string(), "dedicated"])?;
        }
        wait_for(Duration::from_secs(1), || async {
            for tenant in &tenants {
                if routed_store(&http, &proxy, *tenant).await? != "dedicated" {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await?;
        let routes = http.get(&format!("{}/admin/routes", proxy.admin)).await?;
        assert_eq!(routes.json["tenants"], 3);
        assert_eq!(routes.json["epoch"], 3);
        Ok(())
    })
    .await
}

/// An append that took its route before a swap finishes against the store it chose; the next
/// one follows the new route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_request_completes_against_its_snapshot() -> Result<()> {
    let (env, proxy, http) = started(Backend::Postgres, &["shared", "dedicated"], "", &[]).await?;
    let tenant = Uuid::new_v4();
    let url = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
    let mut blocker = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    sqlx::query("BEGIN").execute(&mut blocker).await?;
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await?;
    let in_flight = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move { http.post(&url, &events_body(Some(0), 1, "Before")).await })
    };
    // The append is now waiting inside the shared store.
    wait_for(Duration::from_secs(5), || async {
        let metrics = http.get(&format!("{}/metrics", proxy.admin)).await?;
        Ok(String::from_utf8_lossy(&metrics.body).contains("switchyard_proxy_appends_in_flight 1"))
    })
    .await?;
    env.control_json(&["routing", "set", &tenant.to_string(), "dedicated"])?;
    wait_for(Duration::from_secs(2), || async {
        Ok(routed_store(&http, &proxy, tenant).await? == "dedicated")
    })
    .await?;
    sqlx::query("COMMIT").execute(&mut blocker).await?;
    let reply = in_flight.await??;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(
        reply.json["store_id"], "shared",
        "the request kept the route it started with"
    );
    let after = http.post(&url, &events_body(None, 1, "After")).await?;
    assert_eq!(after.json["store_id"], "dedicated");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_needs_the_token_when_one_is_set() -> Result<()> {
    let extra = "[proxy]\nadmin_token = \"${SY_TEST_TOKEN}\"\nrouting_listen = false\nrouting_poll_ms = 600000\n";
    let env_vars = [("SY_TEST_TOKEN", "s3cret-token")];
    let env = switchyard_tests::Env::new(Backend::Sqlite, &["shared", "dedicated"], extra).await?;
    let out = switchyard_tests::run_control(&env.config_path, &["init"], &env_vars)?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let proxy = env.proxy(&env_vars)?;
    let http = Http::new();
    proxy.wait_ready(&http).await?;
    let reload = format!("{}/admin/routes/reload", proxy.admin);
    let tenant = Uuid::new_v4();
    let out = switchyard_tests::run_control(
        &env.config_path,
        &["routing", "set", &tenant.to_string(), "dedicated"],
        &env_vars,
    )?;
    assert_eq!(out.code, 0, "{}", out.stderr);

    let denied = http.request(Method::POST, &reload, Vec::new(), &[]).await?;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    let wrong = http
        .request(
            Method::POST,
            &reload,
            Vec::new(),
            &[("authorization", "Bearer s3cret-tokeN")],
        )
        .await?;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        routed_store_with(&http, &proxy, tenant, Some("s3cret-token")).await?,
        "shared",
        "no reload happened"
    );
    let ok = http
        .request(
            Method::POST,
            &reload,
            Vec::new(),
            &[("authorization", "Bearer s3cret-token")],
        )
        .await?;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.json);
    assert_eq!(ok.json["epoch"], 1);
    assert_eq!(
        routed_store_with(&http, &proxy, tenant, Some("s3cret-token")).await?,
        "dedicated"
    );
    assert!(
        !proxy.log().contains("s3cret-token"),
        "the token never reaches the log"
    );
    Ok(())
}

/// A route naming a store this proxy lacks fails that tenant's requests with 503 and nobody
/// else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_to_an_unconfigured_store_fails_only_that_tenant() -> Result<()> {
    let (env, proxy, http) = started(
        Backend::Postgres,
        &["shared"],
        "[proxy]\nrouting_poll_ms = 100\n",
        &[],
    )
    .await?;
    let (lost, fine) = (Uuid::new_v4(), Uuid::new_v4());
    let mut control = sqlx::PgConnection::connect(&env.control_url).await?;
    sqlx::query("UPDATE switchyard_routing_epoch SET epoch = epoch + 1")
        .execute(&mut control)
        .await?;
    sqlx::query("INSERT INTO tenant_routing (tenant_id, store_id, epoch) SELECT $1, 'elsewhere', epoch FROM switchyard_routing_epoch")
        .bind(lost)
        .execute(&mut control)
        .await?;
    wait_for(Duration::from_secs(2), || async {
        Ok(routed_store(&http, &proxy, lost).await? == "<unknown>")
    })
    .await?;
    let reply = http
        .post(
            &stream_url(&proxy.data, lost, "A", Uuid::new_v4()),
            &events_body(None, 1, "E"),
        )
        .await?;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json["error"], "store_unavailable");
    let reply = http
        .post(
            &stream_url(&proxy.data, fine, "A", Uuid::new_v4()),
            &events_body(None, 1, "E"),
        )
        .await?;
    assert_eq!(reply.status, StatusCode::CREATED);
    Ok(())
}
