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

/// A retry of a committed append that sends the same events in another order (issue 14 item
/// 2). The store answered such a retry by version and the mirror paired event i with row i,
/// landing the events at swapped versions in the target. It is refused now (409
/// `retry_order_mismatch`), writes nothing anywhere, and the retry in the original order
/// answers the original result and mirrors every event at its own version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_in_another_order_is_refused_and_never_mirrored_at_swapped_versions() -> Result<()>
{
    for_each_backend(|backend| async move {
        let extra = "[proxy]\nrouting_poll_ms = 100\n";
        let (env, proxy, http) = started(backend, &["shared", "dedicated"], extra, &[]).await?;
        let tenant = Uuid::new_v4();
        let aggregate = Uuid::new_v4();
        let url = stream_url(&proxy.data, tenant, "Order", aggregate);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let event = |id: Uuid, kind: &str| {
            serde_json::json!({"event_id": id, "event_type": kind, "payload": {"kind": kind}})
        };
        // Committed before the migration (no mirror); the client did not hear the answer.
        let original = serde_json::json!({"expected_version": 0, "events": [event(a, "A"), event(b, "B")]});
        let first = http.post(&url, &original).await?;
        assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.json);

        dual_write(&env.control_url, tenant, "shared", "dedicated").await?;
        let route_url = format!("{}/admin/routes/{tenant}", proxy.admin);
        wait_for(Duration::from_secs(3), || async {
            Ok(http.get(&route_url).await?.json["state"] == "dual_write")
        })
        .await?;

        let reordered = serde_json::json!({"expected_version": 0, "events": [event(b, "B"), event(a, "A")]});
        let refused = http.post(&url, &reordered).await?;
        assert_eq!(
            (refused.status, refused.json["error"].as_str()),
            (StatusCode::CONFLICT, Some("retry_order_mismatch")),
            "{:?}",
            refused.json
        );
        let again = http.post(&url, &original).await?;
        assert_eq!(again.status, StatusCode::CREATED, "{:?}", again.json);
        assert_eq!(again.json, first.json, "the original answer");

        let target = EventStore::connect("dedicated", env.store_url("dedicated"), 2)?;
        wait_for(Duration::from_secs(5), || async {
            Ok(target.count_tenant(tenant).await? == 2)
        })
        .await?;
        let stream = switchyard_store::StreamRef {
            tenant_id: tenant,
            aggregate_type: "Order",
            aggregate_id: aggregate,
        };
        let mirrored: Vec<(Uuid, i32, String)> = target
            .read_stream(stream, 1, 10)
            .await?
            .into_iter()
            .map(|e| (e.event_id, e.version, e.event_type))
            .collect();
        assert_eq!(
            mirrored,
            vec![(a, 1, "A".to_owned()), (b, 2, "B".to_owned())],
            "every event at its own version"
        );
        Ok(())
    })
    .await
}
