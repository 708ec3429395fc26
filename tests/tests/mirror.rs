//! The dual-write mirror through a real proxy: exact copies in the target, and a target that
//! cannot be reached never touches the client's appends.

use std::time::Duration;

use http::StatusCode;
use switchyard_store::{ControlDb, EventStore, RouteUpdate, RoutingState};
use switchyard_tests::{
    events_body, for_each_backend, started, stream_url, wait_for, Backend, Result,
};
use uuid::Uuid;

async fn dual_write(control_url: &str, tenant: Uuid, source: &str, target: &str) -> Result<()> {
    let control = ControlDb::connect(control_url, 1)?;
    control
        .set_route(&RouteUpdate {
            tenant_id: tenant,
            store_id: source.to_owned(),
            migration_state: RoutingState::DualWrite,
            target_store_id: Some(target.to_owned()),
            active_migration_id: Some(Uuid::new_v4()),
        })
        .await?;
    control.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_write_mirrors_exact_copies_to_the_target() -> Result<()> {
    for_each_backend(|backend| async move {
        let extra = "[proxy]\nrouting_poll_ms = 100\n";
        let (env, proxy, http) = started(backend, &["shared", "dedicated"], extra, &[]).await?;
        let tenant = Uuid::new_v4();
        dual_write(&env.control_url, tenant, "shared", "dedicated").await?;
        let route_url = format!("{}/admin/routes/{tenant}", proxy.admin);
        wait_for(Duration::from_secs(3), || async {
            Ok(http.get(&route_url).await?.json["state"] == "dual_write")
        })
        .await?;

        let streams: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        for round in 0..5 {
            for s in &streams {
                let reply = http
                    .post(
                        &stream_url(&proxy.data, tenant, "Order", *s),
                        &events_body(Some(round * 2), 2, "Placed"),
                    )
                    .await?;
                assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
                assert_eq!(
                    reply.json["store_id"], "shared",
                    "the answer comes from the source"
                );
            }
        }
        let source = EventStore::connect("shared", env.store_url("shared"), 2)?;
        let target = EventStore::connect("dedicated", env.store_url("dedicated"), 2)?;
        wait_for(Duration::from_secs(5), || async {
            Ok(target.count_tenant(tenant).await? == 40)
        })
        .await?;
        let (a, b) = (
            source.read_tenant(tenant, 0, 100).await?,
            target.read_tenant(tenant, 0, 100).await?,
        );
        let key = |e: &switchyard_store::StoredEvent| {
            let payload: serde_json::Value =
                serde_json::from_str(e.payload.get()).unwrap_or_default();
            (
                e.event_id,
                e.aggregate_id,
                e.version,
                e.event_type.clone(),
                e.actor_id.clone(),
                e.timestamp,
                e.created_at,
                payload,
            )
        };
        let mut ka: Vec<_> = a.iter().map(key).collect();
        let mut kb: Vec<_> = b.iter().map(key).collect();
        ka.sort_by_key(|k| (k.1, k.2));
        kb.sort_by_key(|k| (k.1, k.2));
        assert_eq!(ka, kb);
        let stats = http.get(&route_url).await?;
        assert_eq!(stats.json["mirroring"], true);
        assert_eq!(
            stats.json["mirror"]["events_mirrored"], 40,
            "{:?}",
            stats.json
        );
        assert_eq!(stats.json["mirror"]["total_failures"], 0);
        Ok(())
    })
    .await
}

/// The target refuses connections: appends succeed as usual, failures are counted per tenant
/// and in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_never_fails_an_append() -> Result<()> {
    let extra = "[proxy]\nrouting_poll_ms = 100\n\n[[stores]]\nid = \"gone\"\nurl = \"postgres://postgres@127.0.0.1:1/nothing\"\n";
    let env = switchyard_tests::Env::new(Backend::Postgres, &["shared"], extra).await?;
    env.control(&["init", "--store", "shared"])?;
    let proxy = env.proxy(&[])?;
    let http = switchyard_tests::Http::new();
    wait_for(Duration::from_secs(10), || async {
        Ok(http
            .get(&format!("{}/admin/routes", proxy.admin))
            .await?
            .json["loaded"]
            == true)
    })
    .await?;
    let tenant = Uuid::new_v4();
    dual_write(&env.control_url, tenant, "shared", "gone").await?;
    let route_url = format!("{}/admin/routes/{tenant}", proxy.admin);
    wait_for(Duration::from_secs(3), || async {
        Ok(http.get(&route_url).await?.json["state"] == "dual_write")
    })
    .await?;
    let aggregate = Uuid::new_v4();
    for version in 0..10 {
        let reply = http
            .post(
                &stream_url(&proxy.data, tenant, "Order", aggregate),
                &events_body(Some(version), 1, "E"),
            )
            .await?;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    }
    wait_for(Duration::from_secs(10), || async {
        let stats = http.get(&route_url).await?;
        Ok(stats.json["mirror"]["total_failures"] == 10)
    })
    .await?;
    let stats = http.get(&route_url).await?.json;
    assert_eq!(
        stats["mirror"]["streams_affected"],
        serde_json::json!([format!("Order/{aggregate}")])
    );
    assert!(stats["mirror"]["first_failure_at"].is_string());
    let metrics = http.get(&format!("{}/metrics", proxy.admin)).await?;
    assert!(String::from_utf8_lossy(&metrics.body)
        .contains("switchyard_proxy_mirror_writes_total{outcome=\"failed\"} 10"));
    assert_eq!(
        switchyard_tests::count_events(env.store_url("shared"), Some(tenant)).await?,
        10
    );
    Ok(())
}
