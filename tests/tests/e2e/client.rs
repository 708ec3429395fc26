//! `switchyard-client` against the real proxy binary on PostgreSQL and SQLite: every
//! data-plane call with its typed reply, the typed errors (409, 404, 400), the admin calls,
//! h2c, and the load writer's retries through dropped connections landing each event once.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use switchyard_client::{
    metric_sum, AdminClient, CategoryQuery, ClientError, DataClient, Direction, ErrorCode,
    ErrorKind, ExpectedVersion, FeedQuery, Load, LoadPlan, NewEvent, Protocol, RoutingState,
    StreamId, StreamQuery, Transport,
};
use switchyard_tests::{
    assert_all_acked, for_each_backend, started, tenant_events, wait_for, Acked, Backend, GateMode,
    Result, TcpGate,
};
use uuid::Uuid;

/// The refusal of a failed call (panics on success or on no answer).
fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>) -> switchyard_client::ApiError {
    match result {
        Err(ClientError::Api(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn event(kind: &str, i: u32) -> NewEvent {
    NewEvent::new(kind, json!({ "i": i }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_answers_its_typed_reply_or_error() -> Result<()> {
    for_each_backend(|backend| async move {
        let (_env, proxy, _http) = started(backend, &["shared"], "", &[]).await?;
        let data = DataClient::new(&proxy.data);
        let admin = AdminClient::new(&proxy.admin);
        let tenant = Uuid::new_v4();
        let order = StreamId::new(tenant, "Order", Uuid::new_v4());

        // Every kind of expected version, and the typed 409 of each mismatch.
        let first = data
            .append(
                &order,
                ExpectedVersion::NoStream,
                &[event("Placed", 1), event("Paid", 2)],
            )
            .await?;
        assert_eq!((first.first_version, first.last_version), (1, 2));
        assert_eq!(
            (first.store_id.as_str(), first.global_positions.len()),
            ("shared", 2)
        );
        let conflict = refusal(
            data.append(&order, ExpectedVersion::NoStream, &[event("Late", 3)])
                .await,
        );
        assert_eq!(conflict.code, ErrorCode::VersionConflict);
        assert_eq!(
            (conflict.kind(), conflict.status.as_u16()),
            (ErrorKind::Conflict, 409)
        );
        assert_eq!(conflict.actual_version, Some(2));
        assert!(!conflict.retryable && !conflict.message.is_empty());
        let stale = refusal(
            data.append(&order, ExpectedVersion::Exact(1), &[event("Late", 3)])
                .await,
        );
        assert_eq!(
            (stale.expected_version, stale.actual_version),
            (Some(1), Some(2))
        );
        assert_eq!(
            data.append(
                &order,
                ExpectedVersion::StreamExists,
                &[event("Shipped", 3)]
            )
            .await?
            .last_version,
            3
        );
        assert_eq!(
            data.append(&order, ExpectedVersion::Exact(3), &[event("Billed", 4)])
                .await?
                .last_version,
            4
        );
        assert_eq!(
            data.append(&order, ExpectedVersion::Any, &[event("Closed", 5)])
                .await?
                .last_version,
            5
        );
        let fresh = StreamId::new(tenant, "Order", Uuid::new_v4());
        let missing = refusal(
            data.append(&fresh, ExpectedVersion::StreamExists, &[event("X", 0)])
                .await,
        );
        assert_eq!(missing.code, ErrorCode::VersionConflict);
        let invoice = StreamId::new(tenant, "Invoice", Uuid::new_v4());
        let invoiced = data
            .append(&invoice, ExpectedVersion::Any, &[event("Issued", 6)])
            .await?;

        // A stream of another tenant is a typed 404.
        let foreign = StreamId::new(Uuid::new_v4(), "Order", order.aggregate_id);
        let not_found = refusal(
            data.append(&foreign, ExpectedVersion::Any, &[event("X", 0)])
                .await,
        );
        assert_eq!(
            (not_found.code.clone(), not_found.kind()),
            (ErrorCode::StreamNotFound, ErrorKind::NotFound)
        );

        // Stream reads: all, a version range, backward with a limit.
        let all = data.read_stream(&order, &StreamQuery::default()).await?;
        let versions = |page: &switchyard_client::EventPage| {
            page.events.iter().map(|e| e.version).collect::<Vec<_>>()
        };
        assert_eq!(versions(&all), [1, 2, 3, 4, 5]);
        assert_eq!(all.events[0].event_type, "Placed");
        assert_eq!(all.events[0].payload, json!({ "i": 1 }));
        assert_eq!(all.events[0].tenant_id, Some(tenant));
        let range = data
            .read_stream(
                &order,
                &StreamQuery {
                    from_version: Some(2),
                    to_version: Some(3),
                    ..StreamQuery::default()
                },
            )
            .await?;
        assert_eq!(versions(&range), [2, 3]);
        let newest = data
            .read_stream(
                &order,
                &StreamQuery {
                    direction: Direction::Backward,
                    limit: Some(2),
                    ..StreamQuery::default()
                },
            )
            .await?;
        assert_eq!((versions(&newest), newest.next), (vec![5, 4], Some(3)));
        let bad = refusal(
            data.read_stream(
                &order,
                &StreamQuery {
                    limit: Some(0),
                    ..StreamQuery::default()
                },
            )
            .await,
        );
        assert_eq!(
            (bad.kind(), bad.status.as_u16(), bad.retryable),
            (ErrorKind::Invalid, 400, false)
        );

        // Version and lookup, of known and unknown streams and events.
        assert_eq!(data.stream_version(&order).await?.version, 5);
        assert_eq!(data.stream_version(&fresh).await?.version, 0);
        let found = data.lookup_event(tenant, all.events[2].event_id).await?;
        assert_eq!(
            found.event.map(|e| (e.aggregate_id, e.version)),
            Some((order.aggregate_id, 3))
        );
        assert_eq!(data.lookup_event(tenant, Uuid::new_v4()).await?.event, None);
        assert_eq!(
            data.lookup_event(Uuid::new_v4(), all.events[2].event_id)
                .await?
                .event,
            None
        );

        // The category read pages by persistence time; the feed filters by aggregate type.
        let page = data
            .read_category(
                tenant,
                "Order",
                &CategoryQuery {
                    limit: Some(3),
                    ..CategoryQuery::default()
                },
            )
            .await?;
        assert_eq!(page.events.len(), 3);
        let cursor = page.next.expect("a next page");
        let rest = data
            .read_category(tenant, "Order", &CategoryQuery::after(cursor, None))
            .await?;
        assert_eq!((rest.events.len(), rest.next), (2, None));
        let since = data
            .read_category(
                tenant,
                "Order",
                &CategoryQuery {
                    from_timestamp: Some(all.events[0].stored_at),
                    ..CategoryQuery::default()
                },
            )
            .await?;
        assert_eq!(since.events.len(), 5);
        let feed = data.read_feed(tenant, &FeedQuery::default()).await?;
        assert_eq!(feed.events.len(), 6);
        let invoices = data
            .read_feed(
                tenant,
                &FeedQuery {
                    aggregate_type: Some("Invoice".into()),
                    ..FeedQuery::default()
                },
            )
            .await?;
        assert_eq!(
            invoices
                .events
                .iter()
                .map(|e| e.event_id)
                .collect::<Vec<_>>()
                .len(),
            1
        );
        assert_eq!(
            invoices.events[0].global_position,
            invoiced.global_positions[0]
        );
        let after = data
            .read_feed(
                tenant,
                &FeedQuery {
                    after_position: Some(feed.events[4].global_position),
                    ..FeedQuery::default()
                },
            )
            .await?;
        assert_eq!(after.events.len(), 1);
        // Pages of 2 continued with their store: the whole feed, in order.
        let mut query = FeedQuery {
            limit: Some(2),
            ..FeedQuery::default()
        };
        let mut paged = Vec::new();
        loop {
            let page = data.read_feed(tenant, &query).await?;
            paged.extend(page.events.iter().map(|e| e.event_id));
            match query.continued_after(&page) {
                Some(next) => {
                    assert_eq!(next.after_store.as_deref(), Some(page.store_id.as_str()));
                    query = next;
                }
                None => break,
            }
        }
        assert_eq!(
            paged,
            feed.events.iter().map(|e| e.event_id).collect::<Vec<_>>()
        );
        // A cursor of a store the tenant never left is a typed, non-retryable refusal.
        let refused = data
            .read_feed(
                tenant,
                &FeedQuery {
                    after_position: Some(1),
                    after_store: Some("elsewhere".into()),
                    ..FeedQuery::default()
                },
            )
            .await
            .expect_err("a foreign cursor is refused");
        assert_eq!(
            refused.code(),
            Some(&ErrorCode::CursorNotTranslatable),
            "{refused}"
        );
        assert!(!refused.is_retryable());

        // Position: the tenant's last event, none for a tenant without events.
        let position = data.position(tenant).await?;
        assert_eq!(
            (position.position, position.store_id.as_str()),
            (Some(invoiced.global_positions[0]), "shared")
        );
        assert_eq!(data.position(Uuid::new_v4()).await?.position, None);

        // h2c on the same port.
        let h2 = DataClient::with_transport(Transport::new(Protocol::H2c), &proxy.data);
        assert_eq!(h2.stream_version(&order).await?.version, 5);

        // The admin port: readiness, the table, one route, metrics, a reload.
        let ready = admin.ready().await?;
        assert!(ready.ready && ready.problems.is_empty(), "{ready:?}");
        let routes = admin.routes().await?;
        assert!(routes.loaded);
        assert_eq!(routes.default_store, "shared");
        let route = admin.route(tenant).await?;
        assert_eq!(
            (route.route.state, route.route.store_id.as_str()),
            (RoutingState::Normal, "shared")
        );
        assert!(route.route.store_configured);
        let metrics = admin.metrics().await?;
        let appends = metric_sum(&metrics, "switchyard_proxy_requests_total");
        assert!(
            appends.is_some_and(|n| n >= 10.0),
            "{appends:?} requests counted"
        );
        assert!(admin.reload().await? >= routes.epoch);

        // No answer is its own error, and retryable.
        let gone = DataClient::new("http://127.0.0.1:1").position(tenant).await;
        assert!(
            matches!(&gone, Err(ClientError::Connection { .. })),
            "{gone:?}"
        );
        assert!(gone.err().is_some_and(|e| e.is_retryable()));
        Ok(())
    })
    .await
}

/// Writers through a TCP gate in front of the proxy whose connections are cut again and again
/// with requests in flight (some after the proxy committed, before the answer came back): the
/// load writer retries each append with its event ids until acknowledged, and the store ends
/// with each acknowledged event exactly once and nothing else. On both backends: on SQLite a
/// cut that cancelled an append while its `BEGIN IMMEDIATE` waited for the write lock once
/// left the proxy's pooled connection inside a transaction nobody would end, and every later
/// append failed ("attempted to call begin_with at non-zero transaction depth", "database is
/// locked").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_writer_lands_each_event_once_through_cut_connections() -> Result<()> {
    for backend in Backend::ALL {
        let (env, proxy, _http) = started(backend, &["shared"], "", &[]).await?;
        let gate = TcpGate::start(proxy.data.trim_start_matches("http://")).await?;
        // Requests wait in the gate, so a cut finds some in flight.
        gate.set(GateMode::Latency(Duration::from_millis(15)));
        let through_gate = DataClient::new(&format!("http://127.0.0.1:{}", gate.port));
        let tenant = Uuid::new_v4();
        let plan = LoadPlan {
            record_attempts: true,
            retry_pause: Duration::from_millis(5),
            ..LoadPlan::new(tenant)
        }
        .with_events(|writer, seq| {
            (0..=seq % 2)
                .map(|i| NewEvent::new("Written", json!({ "writer": writer, "seq": seq, "i": i })))
                .collect()
        });
        let load = Load::start(&[through_gate], plan, 4);
        for _ in 0..12 {
            let goal = load.acked() + 3;
            let c = load.counters();
            wait_for(Duration::from_secs(30), || async {
                Ok(load.acked() >= goal)
            })
            .await
            .with_context(|| format!("writers stalled: {c:?}; proxy log:\n{}", proxy.log()))?;
            gate.reset();
        }
        let report = load.stop().await;
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let cut = report.attempts.iter().filter(|a| a.status == 0).count();
        assert!(
            cut > 0 && report.retries > 0,
            "no attempt was cut: {:?}",
            report.attempts.len()
        );
        let events = tenant_events(env.store_url("shared"), tenant).await?;
        let acked: Vec<Acked> = report.acked.iter().map(Acked::from).collect();
        assert_all_acked(&acked, &events);
        assert_eq!(
            events.len(),
            report.acked_events(),
            "events besides the acknowledged ones"
        );
    }
    Ok(())
}
