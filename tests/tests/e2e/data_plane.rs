//! The data-plane API through the real proxy over real HTTP, on PostgreSQL and SQLite:
//! round trips, optimistic concurrency under contention, idempotent retries, every bad input,
//! h2c, and tenant isolation.

use std::collections::BTreeSet;
use std::sync::Arc;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use switchyard_tests::{
    count_events, events_body, feed_url, for_each_backend, started, stream_url, Backend, Http,
    Result,
};
use tokio::sync::Mutex;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_and_read_round_trip() -> Result<()> {
    for_each_backend(|backend| async move {
        let (env, proxy, http) = started(backend, &["shared", "dedicated"], "", &[]).await?;
        let (tenant, aggregate) = (Uuid::new_v4(), Uuid::new_v4());
        let url = stream_url(&proxy.data, tenant, "Order", aggregate);
        let event_id = Uuid::new_v4();
        let body = json!({"expected_version": 0, "events": [
            {"event_id": event_id, "event_type": "OrderCreated", "payload": {"total": 12.5, "lines": [1, 2]},
             "actor_id": "user-7", "timestamp": "2024-01-15T10:30:00.123456Z"},
            {"event_type": "OrderPaid", "payload": {}}
        ]});
        let reply = http.post(&url, &body).await?;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
        assert_eq!(reply.json["store_id"], "shared");
        assert_eq!(reply.json["first_version"], 1);
        assert_eq!(reply.json["last_version"], 2);
        let positions = reply.json["global_positions"].as_array().expect("positions").clone();
        assert_eq!(positions.len(), 2);

        let read = http.get(&url).await?;
        assert_eq!(read.status, StatusCode::OK);
        let events = read.json["events"].as_array().expect("events");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["event_id"], json!(event_id));
        assert_eq!(events[0]["event_type"], "OrderCreated");
        assert_eq!(events[0]["payload"], json!({"total": 12.5, "lines": [1, 2]}));
        assert_eq!(events[0]["actor_id"], "user-7");
        assert_eq!(events[0]["timestamp"], "2024-01-15T10:30:00.123456Z");
        assert_eq!(events[0]["tenant_id"], json!(tenant));
        assert_eq!(events[1]["version"], 2);
        assert!(Uuid::parse_str(events[1]["event_id"].as_str().unwrap_or("")).is_ok(), "generated id");
        assert_eq!(json!([events[0]["global_position"], events[1]["global_position"]]), Value::Array(positions));

        // from_version and limit page through the stream.
        let page = http.get(&format!("{url}?from_version=2&limit=1")).await?;
        assert_eq!(page.json["events"].as_array().map(Vec::len), Some(1));
        assert_eq!(page.json["events"][0]["version"], 2);

        // The feed lists the tenant's events in position order, each with its store.
        let feed = http.get(&feed_url(&proxy.data, tenant)).await?;
        let feed_events = feed.json["events"].as_array().expect("feed");
        assert_eq!(feed_events.len(), 2);
        assert_eq!(feed_events[0]["store_id"], "shared");
        let first = feed_events[0]["global_position"].as_i64().unwrap_or_default();
        let after = http.get(&format!("{}?after_position={first}", feed_url(&proxy.data, tenant))).await?;
        assert_eq!(after.json["events"].as_array().map(Vec::len), Some(1));

        // A conflict names both versions and writes nothing.
        let conflict = http.post(&url, &events_body(Some(1), 1, "Late")).await?;
        assert_eq!(conflict.status, StatusCode::CONFLICT);
        assert_eq!(conflict.json["error"], "version_conflict");
        assert_eq!(conflict.json["expected_version"], 1);
        assert_eq!(conflict.json["actual_version"], 2);
        assert_eq!(count_events(env.store_url("shared"), Some(tenant)).await?, 2);

        // h2c on the same port.
        let h2 = Http::h2c().get(&url).await?;
        assert_eq!(h2.status, StatusCode::OK);
        assert_eq!(h2.json["events"].as_array().map(Vec::len), Some(2));
        Ok(())
    })
    .await
}

/// Writers racing on one stream with expected_version: every version has exactly one winner,
/// and the stream has no gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_have_one_winner_per_version() -> Result<()> {
    for_each_backend(|backend| async move {
        let (_env, proxy, http) = started(backend, &["shared"], "", &[]).await?;
        let (tenant, aggregate) = (Uuid::new_v4(), Uuid::new_v4());
        let url = Arc::new(stream_url(&proxy.data, tenant, "Account", aggregate));
        let won: Arc<Mutex<Vec<i64>>> = Arc::default();
        let target = 60;
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (http, url, won) = (http.clone(), Arc::clone(&url), Arc::clone(&won));
            tasks.push(tokio::spawn(async move {
                let mut version = 0i64;
                let mut conflicts = 0;
                while won.lock().await.len() < target {
                    let reply = http
                        .post(&url, &events_body(Some(version), 1, "Deposited"))
                        .await?;
                    match reply.status {
                        StatusCode::CREATED => {
                            let v = reply.json["first_version"].as_i64().unwrap_or(-1);
                            assert_eq!(v, version + 1);
                            won.lock().await.push(v);
                            version = v;
                        }
                        StatusCode::CONFLICT => {
                            conflicts += 1;
                            version = reply.json["actual_version"].as_i64().unwrap_or(version);
                        }
                        other => anyhow::bail!("unexpected {other}: {:?}", reply.json),
                    }
                }
                Ok::<_, anyhow::Error>(conflicts)
            }));
        }
        let mut conflicts = 0;
        for task in tasks {
            conflicts += task.await??;
        }
        let won = won.lock().await.clone();
        let distinct: BTreeSet<i64> = won.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            won.len(),
            "a version was won twice: {won:?}"
        );
        assert_eq!(
            distinct,
            (1..=won.len() as i64).collect(),
            "gaps in {won:?}"
        );
        assert!(
            conflicts > 0,
            "16 writers on one stream should have collided"
        );
        let read = http.get(&format!("{url}?limit=1000")).await?;
        let versions: Vec<i64> = read.json["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["version"].as_i64().unwrap_or(-1))
            .collect();
        assert_eq!(versions, (1..=won.len() as i64).collect::<Vec<_>>());
        Ok(())
    })
    .await
}

/// `expected_version: null` appends never surface a conflict, however many race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_version_appends_all_land_without_gaps() -> Result<()> {
    for_each_backend(|backend| async move {
        let (_env, proxy, http) = started(backend, &["shared"], "", &[]).await?;
        let url = Arc::new(stream_url(
            &proxy.data,
            Uuid::new_v4(),
            "Log",
            Uuid::new_v4(),
        ));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (http, url) = (http.clone(), Arc::clone(&url));
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    let reply = http.post(&url, &events_body(None, 2, "Line")).await?;
                    anyhow::ensure!(reply.status == StatusCode::CREATED, "{:?}", reply.json);
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        let read = http.get(&format!("{url}?limit=1000")).await?;
        let versions: Vec<i64> = read.json["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["version"].as_i64().unwrap_or(-1))
            .collect();
        assert_eq!(versions, (1..=160).collect::<Vec<_>>());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_idempotent_and_reused_ids_are_refused() -> Result<()> {
    for_each_backend(|backend| async move {
        let (env, proxy, http) = started(backend, &["shared"], "", &[]).await?;
        let tenant = Uuid::new_v4();
        let url = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
        let body = json!({"expected_version": 0, "events": [
            {"event_id": Uuid::new_v4(), "event_type": "A", "payload": {"k": 1}, "actor_id": "me"},
            {"event_id": Uuid::new_v4(), "event_type": "B", "payload": {"k": 2}, "timestamp": "2025-05-05T05:05:05.5Z"}
        ]});
        let first = http.post(&url, &body).await?;
        assert_eq!(first.status, StatusCode::CREATED);
        // The same append again (a client that timed out): the original answer, nothing new.
        let again = http.post(&url, &body).await?;
        assert_eq!(again.status, StatusCode::CREATED, "{:?}", again.json);
        assert_eq!(again.json, first.json);
        assert_eq!(count_events(env.store_url("shared"), Some(tenant)).await?, 2);

        // Same id, different content: refused.
        let mut changed = body.clone();
        changed["events"][0]["payload"] = json!({"k": 999});
        let refused = http.post(&url, &changed).await?;
        assert_eq!(refused.status, StatusCode::CONFLICT);
        assert_eq!(refused.json["error"], "event_id_conflict");
        // Same ids to another stream: refused too.
        let other_stream = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
        let refused = http.post(&other_stream, &body).await?;
        assert_eq!(refused.status, StatusCode::CONFLICT);
        assert_eq!(refused.json["error"], "event_id_conflict");
        // Part old, part new: refused whole.
        let mut partly = body.clone();
        partly["events"][1]["event_id"] = json!(Uuid::new_v4());
        partly["expected_version"] = json!(2);
        let refused = http.post(&url, &partly).await?;
        assert_eq!(refused.status, StatusCode::CONFLICT);
        assert_eq!(count_events(env.store_url("shared"), Some(tenant)).await?, 2);
        Ok(())
    })
    .await
}

/// `(name, method, url, body, status, error code)`.
type BadCase = (&'static str, Method, String, Vec<u8>, u16, &'static str);

/// Every bad input gets its status and JSON error code, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_its_status_and_writes_nothing() -> Result<()> {
    for_each_backend(|backend| async move {
        let extra = "[proxy]\nmax_body_bytes = 4096\nmax_events_per_append = 5\n";
        let (env, proxy, http) = started(backend, &["shared"], extra, &[]).await?;
        let tenant = Uuid::new_v4();
        let url = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
        let event = json!({"event_type": "A", "payload": {}});
        let many: Vec<Value> = (0..6).map(|_| event.clone()).collect();
        let cases: Vec<BadCase> = vec![
            ("malformed json", Method::POST, url.clone(), b"{\"events\": [".to_vec(), 400, "malformed_json"),
            ("not an object", Method::POST, url.clone(), b"[1,2]".to_vec(), 400, "invalid_body"),
            ("bad event id", Method::POST, url.clone(), br#"{"events":[{"event_id":"nope","event_type":"A","payload":{}}]}"#.to_vec(), 400, "invalid_body"),
            ("unknown field", Method::POST, url.clone(), br#"{"events":[],"expected":1}"#.to_vec(), 400, "invalid_body"),
            ("bad tenant id", Method::POST, url.replace(&tenant.to_string(), "not-a-uuid"), serde_json::to_vec(&json!({"events": [event]}))?, 400, "invalid_id"),
            ("bad aggregate id", Method::POST, format!("{}/v1/tenants/{tenant}/streams/Order/123/events", proxy.data), serde_json::to_vec(&json!({"events": [event]}))?, 400, "invalid_id"),
            ("empty event list", Method::POST, url.clone(), br#"{"events":[]}"#.to_vec(), 422, "empty_append"),
            ("too many events", Method::POST, url.clone(), serde_json::to_vec(&json!({"events": many}))?, 422, "too_many_events"),
            ("field too long", Method::POST, url.clone(), serde_json::to_vec(&json!({"events": [{"event_type": "x".repeat(256), "payload": {}}]}))?, 422, "invalid_event"),
            ("actor too long", Method::POST, url.clone(), serde_json::to_vec(&json!({"events": [{"event_type": "A", "actor_id": "x".repeat(256), "payload": {}}]}))?, 422, "invalid_event"),
            ("bad timestamp", Method::POST, url.clone(), serde_json::to_vec(&json!({"events": [{"event_type": "A", "payload": {}, "timestamp": "noon"}]}))?, 422, "invalid_event"),
            ("NUL in payload", Method::POST, url.clone(), br#"{"events":[{"event_type":"A","payload":{"x":"\u0000"}}]}"#.to_vec(), 422, "unstorable_payload"),
            ("oversized body", Method::POST, url.clone(), serde_json::to_vec(&json!({"events": [{"event_type": "A", "payload": {"x": "y".repeat(5000)}}]}))?, 413, "payload_too_large"),
            ("unknown path", Method::GET, format!("{}/v1/nothing", proxy.data), Vec::new(), 404, "not_found"),
            ("wrong method", Method::DELETE, url.clone(), Vec::new(), 405, "method_not_allowed"),
            ("wrong method on feed", Method::POST, feed_url(&proxy.data, tenant), serde_json::to_vec(&json!({"events": [event]}))?, 405, "method_not_allowed"),
            ("bad query", Method::GET, format!("{url}?limit=0"), Vec::new(), 400, "invalid_query"),
        ];
        for (name, method, target, body, status, code) in cases {
            let reply = http.request(method, &target, body, &[]).await?;
            assert_eq!(reply.status.as_u16(), status, "{name}: {:?}", reply.body);
            assert_eq!(reply.json["error"], code, "{name}: {:?}", reply.json);
            assert!(reply.json["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}");
        }
        assert_eq!(count_events(env.store_url("shared"), None).await?, 0, "nothing was written");
        Ok(())
    })
    .await
}

/// JSON that PostgreSQL's `jsonb` cannot hold is refused on every backend with 422
/// `unstorable_payload` and its path, and nothing of the append is written (a SQLite store
/// refuses it too, so the tenant can later move to PostgreSQL); the largest values it can hold
/// are stored and read back on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_payloads_are_refused_with_their_path_on_every_backend() -> Result<()> {
    for_each_backend(|backend| async move {
        let (env, proxy, http) = started(backend, &["shared"], "", &[]).await?;
        let tenant = Uuid::new_v4();
        let url = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
        let deep = format!("{}1{}", "[".repeat(120), "]".repeat(120));
        let cases: Vec<(&str, String, &str)> = vec![
            ("lone surrogate", r#"{"a":{"b":"\ud800"}}"#.to_owned(), "events[1].payload.a.b"),
            ("low surrogate first", r#"{"a":["x","\udc00\ud800"]}"#.to_owned(), "events[1].payload.a[1]"),
            ("number past numeric", r#"{"a":{"b":1e999999}}"#.to_owned(), "events[1].payload.a.b"),
            ("scale past numeric", r#"{"n":1e-16384}"#.to_owned(), "events[1].payload.n"),
            ("NUL in a key", r#"{"k\u0000":1}"#.to_owned(), r#"events[1].payload["k\u0000"]"#),
            ("too deep", format!(r#"{{"a":{deep}}}"#), "events[1].payload.a[0][0]"),
        ];
        for (name, payload, path) in cases {
            // A good event first: the append is all or nothing.
            let body = format!(
                r#"{{"events":[{{"event_type":"A","payload":{{}}}},{{"event_type":"B","payload":{payload}}}]}}"#
            );
            let reply = http.request(Method::POST, &url, body, &[]).await?;
            assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {:?}", reply.body);
            assert_eq!(reply.json["error"], "unstorable_payload", "{name}: {:?}", reply.json);
            assert_eq!(reply.json["retryable"], false, "{name}");
            assert!(reply.json["path"].as_str().is_some_and(|p| p.starts_with(path)), "{name}: {:?}", reply.json);
            assert_eq!(count_events(env.store_url("shared"), None).await?, 0, "{name}: nothing written");
        }
        // The edges every store holds: stored, and read back as the same JSON values.
        let edges = r#"{"zero":0e999999,"pair":"\ud83d\ude00","text":"\\u0000 is text","deep":[[[[[[[[[[1]]]]]]]]]]}"#;
        let body = format!(r#"{{"expected_version":0,"events":[{{"event_type":"A","payload":{edges}}},{{"event_type":"A","payload":{{"big":9e131071,"small":1e-16383}}}}]}}"#);
        let reply = http.request(Method::POST, &url, body, &[]).await?;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
        let read = http.get(&format!("{url}?limit=1")).await?;
        let stored = &read.json["events"][0]["payload"];
        assert_eq!(stored["pair"], "\u{1F600}", "{}", read.json);
        assert_eq!(stored["text"], "\\u0000 is text");
        assert_eq!(stored["deep"][0][0][0][0][0][0][0][0][0][0], 1);
        // Beyond f64, so compared as text: PostgreSQL writes the digits out, SQLite keeps them.
        let read = http.get(&format!("{url}?from_version=2")).await?;
        let raw = String::from_utf8_lossy(&read.body);
        assert!(
            raw.contains("9e131071") || raw.contains(&format!("9{}", "0".repeat(131_071))),
            "the big number is kept"
        );
        assert_eq!(count_events(env.store_url("shared"), None).await?, 2);
        Ok(())
    })
    .await
}

/// The decoder's rules are PostgreSQL's: each edge literal is accepted by the proxy exactly
/// when `'…'::jsonb` accepts it (measured, not assumed; nesting aside, which depends on the
/// server's `max_stack_depth` and where the proxy's limit is far below it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_rules_match_postgres() -> Result<()> {
    use sqlx::Connection;
    let mut pg = sqlx::PgConnection::connect(&switchyard_tests::pg_admin_url()).await?;
    let zeros = |n: usize| "0".repeat(n);
    let values: Vec<String> = [
        "0",
        "-0",
        "1.5",
        "-12.25e-3",
        "1E+5",
        "1e131071",
        "9.99e131071",
        "1e131072",
        "12345e131067",
        "12345e131068",
        "1e-16383",
        "1e-16384",
        "10e-16384",
        "0.00001e-16378",
        "0.00001e-16379",
        "0e999999",
        "0e-999999",
        "0e-16383",
        "0.0e-16383",
        "1e1073741822",
        "0e1073741822",
        "0e1073741823",
        "0e-1073741823",
        "1e00000000000000000000000005",
        "0e9999999999",
        r#""\ud800""#,
        r#""\udbff\udfff""#,
        r#""\udc00""#,
        r#""\ud800\u0041""#,
        r#""\ud800x""#,
        r#""\ud83d\ude00""#,
        r#""\u0000""#,
        r#""\\u0000""#,
        r#""\u0001\uffff\ufffe""#,
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([
        format!("1{}", zeros(131_071)),
        format!("1{}", zeros(131_072)),
        format!("0.{}1", zeros(16_382)),
        format!("0.{}1", zeros(16_383)),
        format!("1.{}", zeros(16_383)),
        format!("1.{}", zeros(16_384)),
    ])
    .collect();
    for value in values {
        for payload in [
            format!(r#"{{"v":{value}}}"#),
            format!(r#"{{"k{}":1}}"#, value.trim_matches('"')),
        ] {
            if !value.starts_with('"') && payload.contains("\"k") {
                continue;
            }
            let proxy_accepts = switchyard_proxy::payload::check(&payload, "p").is_ok();
            let pg_accepts = sqlx::query("SELECT $1::text::jsonb")
                .bind(&payload)
                .execute(&mut pg)
                .await
                .is_ok();
            let shown: String = payload.chars().take(60).collect();
            assert_eq!(proxy_accepts, pg_accepts, "{shown}");
        }
    }
    Ok(())
}

/// A value the tenant's store itself refuses (SQLSTATE class 22: here a character a LATIN1
/// database cannot encode) is the client's 422, not a 500, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refusing_a_value_is_a_422() -> Result<()> {
    use sqlx::Connection;
    let env = switchyard_tests::Env::new(Backend::Postgres, &["shared"], "").await?;
    let store = env.store_url("shared").to_owned();
    let name = store.rsplit('/').next().unwrap_or_default().to_owned();
    let mut admin = sqlx::PgConnection::connect(&switchyard_tests::pg_admin_url()).await?;
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!(
        "CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    ))
    .execute(&mut admin)
    .await?;
    env.control_json(&["init"])?;
    let proxy = env.proxy(&[])?;
    let http = Http::new();
    proxy.wait_ready(&http).await?;
    let url = stream_url(&proxy.data, Uuid::new_v4(), "Order", Uuid::new_v4());
    let reply = http
        .post(
            &url,
            &json!({"events": [{"event_type": "A", "payload": {"city": "Zürich"}}]}),
        )
        .await?;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "LATIN1 holds ü: {:?}",
        reply.json
    );
    for (name, body) in [
        (
            "payload",
            json!({"events": [{"event_type": "A", "payload": {"city": "\u{5317}\u{4eac}"}}]}),
        ),
        (
            "event type",
            json!({"events": [{"event_type": "\u{5317}", "payload": {}}]}),
        ),
    ] {
        let reply = http.post(&url, &body).await?;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{name}: {:?}",
            reply.json
        );
        assert_eq!(
            reply.json["error"], "unstorable_payload",
            "{name}: {:?}",
            reply.json
        );
        assert_eq!(reply.json["retryable"], false, "{name}");
    }
    assert_eq!(
        count_events(&store, None).await?,
        1,
        "only the first append landed"
    );
    Ok(())
}

/// A stream of one tenant is invisible through another tenant's path, and a tenant's feed
/// never shows another tenant's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated() -> Result<()> {
    for_each_backend(|backend| async move {
        let (env, proxy, http) = started(backend, &["shared"], "", &[]).await?;
        let (owner, intruder, aggregate) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let owned = stream_url(&proxy.data, owner, "Order", aggregate);
        assert_eq!(http.post(&owned, &events_body(Some(0), 3, "Secret")).await?.status, StatusCode::CREATED);
        assert_eq!(http.post(&stream_url(&proxy.data, intruder, "Order", Uuid::new_v4()), &events_body(None, 1, "Mine")).await?.status, StatusCode::CREATED);

        let foreign = stream_url(&proxy.data, intruder, "Order", aggregate);
        let read = http.get(&foreign).await?;
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.json["events"], json!([]), "another tenant's stream reads as empty");
        for expected in [json!(0), json!(3), Value::Null] {
            let body = json!({"expected_version": expected, "events": [{"event_type": "Hijack", "payload": {}}]});
            let append = http.post(&foreign, &body).await?;
            assert_eq!(append.status, StatusCode::NOT_FOUND, "{:?}", append.json);
            assert_eq!(append.json["error"], "stream_not_found");
            assert!(!append.body.windows(6).any(|w| w == b"Secret"), "nothing of the owner leaks");
        }
        let feed = http.get(&feed_url(&proxy.data, intruder)).await?;
        let types: Vec<&str> = feed.json["events"].as_array().expect("feed").iter().filter_map(|e| e["event_type"].as_str()).collect();
        assert_eq!(types, vec!["Mine"]);
        assert_eq!(count_events(env.store_url("shared"), Some(owner)).await?, 3);
        assert_eq!(count_events(env.store_url("shared"), Some(intruder)).await?, 1);
        Ok(())
    })
    .await
}

/// Not a backend matter, but the proxy must not hang on a body that never finishes: the
/// request deadline answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_store_hits_the_request_deadline() -> Result<()> {
    let extra = "[proxy]\nrequest_timeout_ms = 300\n";
    let (env, proxy, http) = started(Backend::Postgres, &["shared"], extra, &[]).await?;
    // Hold an exclusive lock on events so the append waits in the database.
    let mut blocker =
        <sqlx::PgConnection as sqlx::Connection>::connect(env.store_url("shared")).await?;
    sqlx::query("BEGIN").execute(&mut blocker).await?;
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await?;
    let reply = http
        .post(
            &stream_url(&proxy.data, Uuid::new_v4(), "A", Uuid::new_v4()),
            &events_body(None, 1, "E"),
        )
        .await?;
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{:?}",
        reply.json
    );
    assert_eq!(reply.json["error"], "timeout");
    assert_eq!(
        reply.json["retryable"], true,
        "every event had an event_id: a retry is safe"
    );
    // Without client event ids the append may commit after its timeout under ids the client
    // never saw (issue 14 item 14): a blind retry would store it twice, so it is not retryable.
    let anonymous =
        json!({"expected_version": null, "events": [{"event_type": "E", "payload": {}}]});
    let reply = http
        .post(
            &stream_url(&proxy.data, Uuid::new_v4(), "A", Uuid::new_v4()),
            &anonymous,
        )
        .await?;
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{:?}",
        reply.json
    );
    assert_eq!(reply.json["error"], "timeout");
    assert_eq!(reply.json["retryable"], false, "{:?}", reply.json);
    assert_eq!(reply.json["may_have_committed"], true, "{:?}", reply.json);
    assert!(
        reply.json["message"]
            .as_str()
            .unwrap_or("")
            .contains("event_id"),
        "{:?}",
        reply.json
    );
    sqlx::query("ROLLBACK").execute(&mut blocker).await?;
    Ok(())
}

/// An append body of one event with `expected_version` as given (a number or a kind's name).
fn expecting(expected: &Value) -> Value {
    json!({"expected_version": expected, "events": [
        {"event_id": Uuid::new_v4(), "event_type": "Step", "payload": {}}
    ]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_version_kinds_any_no_stream_stream_exists_and_exact() -> Result<()> {
    for_each_backend(|backend| async move {
        let (env, proxy, http) = started(backend, &["shared"], "", &[]).await?;
        let tenant = Uuid::new_v4();
        let url = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
        let status = |reply: &switchyard_tests::Reply| (reply.status, reply.json["error"].clone());

        // stream_exists on a stream without events: a conflict at version 0.
        let refused = http.post(&url, &expecting(&json!("stream_exists"))).await?;
        assert_eq!(
            status(&refused),
            (StatusCode::CONFLICT, json!("version_conflict"))
        );
        assert_eq!(refused.json["actual_version"], 0);
        let created = http.post(&url, &expecting(&json!("no_stream"))).await?;
        assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.json);
        let again = http.post(&url, &expecting(&json!("no_stream"))).await?;
        assert_eq!(
            status(&again),
            (StatusCode::CONFLICT, json!("version_conflict"))
        );
        assert_eq!(again.json["actual_version"], 1);
        for (expected, version) in [
            (json!("stream_exists"), 2),
            (json!("any"), 3),
            (json!(3), 4),
            (Value::Null, 5),
        ] {
            let reply = http.post(&url, &expecting(&expected)).await?;
            assert_eq!(
                reply.status,
                StatusCode::CREATED,
                "{expected}: {:?}",
                reply.json
            );
            assert_eq!(reply.json["last_version"], version, "{expected}");
        }
        // A retry of a committed stream_exists append answers what was stored.
        let body = expecting(&json!("stream_exists"));
        let first = http.post(&url, &body).await?;
        let retry = http.post(&url, &body).await?;
        assert_eq!(
            (first.status, retry.status),
            (StatusCode::CREATED, StatusCode::CREATED)
        );
        assert_eq!(first.json, retry.json);
        for bad in [
            json!("sometimes"),
            json!(-1),
            json!(true),
            json!({"exact": 1}),
        ] {
            let reply = http.post(&url, &expecting(&bad)).await?;
            assert_eq!(
                status(&reply),
                (StatusCode::BAD_REQUEST, json!("invalid_body")),
                "{bad}"
            );
        }
        assert_eq!(
            count_events(env.store_url("shared"), Some(tenant)).await?,
            6
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_for_client_libraries_version_lookup_ranges_category_type_feed_and_position(
) -> Result<()> {
    for_each_backend(|backend| async move {
        let (_env, proxy, http) = started(backend, &["shared"], "", &[]).await?;
        let (tenant, other) = (Uuid::new_v4(), Uuid::new_v4());
        let base = format!("{}/v1/tenants/{tenant}", proxy.data);
        let (order, invoice) = (Uuid::new_v4(), Uuid::new_v4());
        let order_url = stream_url(&proxy.data, tenant, "Order", order);

        // Nothing yet: version 0, no position, no event, empty category.
        let version = http
            .get(&format!("{base}/streams/Order/{order}/version"))
            .await?;
        assert_eq!(
            (version.status, version.json["version"].clone()),
            (StatusCode::OK, json!(0))
        );
        assert_eq!(
            http.get(&format!("{base}/position")).await?.json["position"],
            Value::Null
        );
        let missing = http
            .get(&format!("{base}/events/{}", Uuid::new_v4()))
            .await?;
        assert_eq!(
            (missing.status, missing.json["event"].clone()),
            (StatusCode::OK, Value::Null)
        );

        let appended = http
            .post(&order_url, &events_body(Some(0), 5, "OrderStep"))
            .await?;
        assert_eq!(appended.status, StatusCode::CREATED);
        let invoice_url = stream_url(&proxy.data, tenant, "Invoice", invoice);
        http.post(&invoice_url, &events_body(None, 2, "InvoiceStep"))
            .await?;
        // Another tenant's events of the same type stay out of every read.
        http.post(
            &stream_url(&proxy.data, other, "Order", Uuid::new_v4()),
            &events_body(None, 1, "OrderStep"),
        )
        .await?;
        let last = http
            .post(&order_url, &events_body(Some(5), 1, "OrderStep"))
            .await?;

        let version = http
            .get(&format!("{base}/streams/Order/{order}/version"))
            .await?;
        assert_eq!(version.json["version"], 6);
        assert_eq!(version.json["store_id"], "shared");

        let versions = |reply: &switchyard_tests::Reply| -> Vec<i64> {
            reply.json["events"]
                .as_array()
                .map(|e| e.iter().filter_map(|e| e["version"].as_i64()).collect())
                .unwrap_or_default()
        };
        let to = http.get(&format!("{order_url}?to_version=2")).await?;
        assert_eq!(versions(&to), [1, 2]);
        // A full page ending at to_version is the last one.
        let to = http
            .get(&format!("{order_url}?to_version=2&limit=2"))
            .await?;
        assert_eq!(
            (versions(&to), to.json["next"].clone()),
            (vec![1, 2], Value::Null)
        );
        let back = http.get(&format!("{order_url}?direction=backward")).await?;
        assert_eq!(versions(&back), [6, 5, 4, 3, 2, 1]);
        let page = http
            .get(&format!(
                "{order_url}?direction=backward&from_version=2&to_version=5&limit=2"
            ))
            .await?;
        assert_eq!(
            (versions(&page), page.json["next"].clone()),
            (vec![5, 4], json!(3))
        );
        let page = http
            .get(&format!(
                "{order_url}?direction=backward&from_version=2&to_version=3&limit=2"
            ))
            .await?;
        assert_eq!(
            (versions(&page), page.json["next"].clone()),
            (vec![3, 2], Value::Null)
        );
        for bad in ["direction=sideways", "to_version=-1", "colour=red"] {
            let reply = http.get(&format!("{order_url}?{bad}")).await?;
            assert_eq!(
                (reply.status, reply.json["error"].clone()),
                (StatusCode::BAD_REQUEST, json!("invalid_query")),
                "{bad}"
            );
        }

        // Lookup by id within the tenant only.
        let id = appended.json["global_positions"][0].clone();
        let read = http.get(&order_url).await?;
        let first_id = read.json["events"][0]["event_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let found = http.get(&format!("{base}/events/{first_id}")).await?;
        assert_eq!(found.json["event"]["global_position"], id);
        assert_eq!(found.json["event"]["version"], 1);
        let elsewhere = http
            .get(&format!(
                "{}/v1/tenants/{other}/events/{first_id}",
                proxy.data
            ))
            .await?;
        assert_eq!(elsewhere.json["event"], Value::Null);

        // The category: the tenant's Order events by persistence time, from an instant given in
        // any offset, inclusive, paged with next.
        let category = format!("{base}/categories/Order/events");
        let all = http.get(&category).await?;
        assert_eq!(versions(&all), [1, 2, 3, 4, 5, 6]);
        let stored_at = all.json["events"][5]["stored_at"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let instant = chrono::DateTime::parse_from_rfc3339(&stored_at)?;
        let shifted =
            instant.with_timezone(&chrono::FixedOffset::east_opt(5 * 3600).expect("offset"));
        let encoded = shifted
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
            .replace('+', "%2B");
        let from = http
            .get(&format!("{category}?from_timestamp={encoded}"))
            .await?;
        assert_eq!(versions(&from), [6], "{encoded}");
        let first_page = http.get(&format!("{category}?limit=4")).await?;
        assert_eq!(versions(&first_page), [1, 2, 3, 4]);
        let next = &first_page.json["next"];
        let ts = next["from_timestamp"]
            .as_str()
            .unwrap_or_default()
            .replace('+', "%2B");
        let rest = http
            .get(&format!(
                "{category}?from_timestamp={ts}&after_position={}",
                next["after_position"]
            ))
            .await?;
        assert_eq!(versions(&rest), [5, 6]);
        let bad = http
            .get(&format!("{category}?from_timestamp=yesterday"))
            .await?;
        assert_eq!(bad.json["error"], "invalid_query");

        // The feed filtered by type, and the position of the tenant's last event.
        let typed = http
            .get(&format!("{base}/events?aggregate_type=Invoice"))
            .await?;
        assert_eq!(typed.json["events"].as_array().map(Vec::len), Some(2));
        assert!(typed.json["events"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| e["aggregate_type"] == "Invoice"));
        let position = http.get(&format!("{base}/position")).await?;
        assert_eq!(position.json["position"], last.json["global_positions"][0]);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stream_exists_appends_all_land_at_distinct_versions() -> Result<()> {
    for_each_backend(|backend| async move {
        let (env, proxy, http) = started(backend, &["shared"], "", &[]).await?;
        let tenant = Uuid::new_v4();
        let url = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
        let created = http.post(&url, &expecting(&json!("no_stream"))).await?;
        assert_eq!(created.status, StatusCode::CREATED);
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let (http, url) = (http.clone(), url.clone());
                tokio::spawn(
                    async move { http.post(&url, &expecting(&json!("stream_exists"))).await },
                )
            })
            .collect();
        let mut versions = BTreeSet::new();
        for writer in writers {
            let reply = writer.await??;
            assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
            versions.insert(reply.json["last_version"].as_i64().unwrap_or_default());
        }
        assert_eq!(versions, (2..=9).collect::<BTreeSet<i64>>());
        assert_eq!(
            count_events(env.store_url("shared"), Some(tenant)).await?,
            9
        );
        Ok(())
    })
    .await
}
