//! Input hardening of the real proxy over real sockets: size and count limits, slow clients,
//! connection and rate limits, a cancelled append — and after every refused request the store
//! holds exactly the acknowledged events (nothing lost, nothing half-written).

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;
use switchyard_tests::{
    count_events, events_body, started, stream_url, wait_for, Backend, Http, ProxyProcess, Result,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

/// `host:port` of a proxy URL.
fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

/// Reads one HTTP/1.1 response (status, headers, body by Content-Length) from `stream`.
async fn read_response(stream: &mut TcpStream) -> Result<(u16, String, Value)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(
            n > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed inside a response body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_end..head_end + length];
    Ok((
        status,
        head,
        serde_json::from_slice(body).unwrap_or(Value::Null),
    ))
}

/// Waits until the server closes `stream` (EOF or reset) and returns how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut sink = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut sink)).await {
            Err(_) => anyhow::bail!("connection still open after {limit:?}"),
            Ok(Ok(0) | Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n")
}

/// One event id list per acknowledged append, in order.
async fn stream_ids(http: &Http, url: &str) -> Result<Vec<Value>> {
    let read = http.get(url).await?;
    Ok(read.json["events"]
        .as_array()
        .map(|a| a.iter().map(|e| e["event_id"].clone()).collect())
        .unwrap_or_default())
}

fn ids_of(body: &Value) -> Vec<Value> {
    body["events"]
        .as_array()
        .map(|a| a.iter().map(|e| e["event_id"].clone()).collect())
        .unwrap_or_default()
}

/// Every limit answers with its status and JSON error, and the store keeps exactly the
/// acknowledged events across all the refused requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_bad_requests_and_lose_nothing() -> Result<()> {
    let extra = "[proxy]\nmax_body_bytes = 4096\nmax_events_per_append = 5\nmax_field_bytes = 64\nmax_header_bytes = 8192\n";
    let (env, proxy, http) = started(Backend::Postgres, &["shared"], extra, &[]).await?;
    let store = env.store_url("shared").to_owned();
    let tenant = Uuid::new_v4();
    let aggregate = Uuid::new_v4();
    let url = stream_url(&proxy.data, tenant, "Order", aggregate);
    let path = url.trim_start_matches(&proxy.data).to_owned();
    let mut acked: Vec<Value> = Vec::new();

    let first = events_body(Some(0), 2, "Created");
    let reply = http.post(&url, &first).await?;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    acked.extend(ids_of(&first));

    let event = |ty: &str| json!({"event_type": ty, "payload": {}});
    let six: Vec<Value> = (0..6).map(|_| event("A")).collect();
    let long = "x".repeat(65);
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "body over the limit",
            url.clone(),
            serde_json::to_vec(
                &json!({"events": [{"event_type": "A", "payload": {"x": "y".repeat(5000)}}]}),
            )?,
            413,
            "payload_too_large",
        ),
        (
            "too many events",
            url.clone(),
            serde_json::to_vec(&json!({"events": six}))?,
            422,
            "too_many_events",
        ),
        (
            "event_type too long",
            url.clone(),
            serde_json::to_vec(&json!({"events": [event(&long)]}))?,
            422,
            "invalid_event",
        ),
        (
            "actor_id too long",
            url.clone(),
            serde_json::to_vec(
                &json!({"events": [{"event_type": "A", "actor_id": long, "payload": {}}]}),
            )?,
            422,
            "invalid_event",
        ),
        (
            "aggregate_type too long",
            stream_url(&proxy.data, tenant, &long, aggregate),
            serde_json::to_vec(&json!({"events": [event("A")]}))?,
            422,
            "invalid_event",
        ),
        (
            "tenant id not a UUID",
            url.replace(&tenant.to_string(), &"7".repeat(300)),
            serde_json::to_vec(&json!({"events": [event("A")]}))?,
            400,
            "invalid_id",
        ),
        (
            "stream id not a UUID",
            url.replace(&aggregate.to_string(), &"f".repeat(300)),
            serde_json::to_vec(&json!({"events": [event("A")]}))?,
            400,
            "invalid_id",
        ),
        // The last event is bad: nothing of the append may land.
        (
            "bad event after good ones",
            url.clone(),
            serde_json::to_vec(
                &json!({"expected_version": 2, "events": [event("A"), event("B"), event(&long)]}),
            )?,
            422,
            "invalid_event",
        ),
    ];
    for (name, target, body, status, code) in cases {
        let reply = http.request(Method::POST, &target, body, &[]).await?;
        assert_eq!(reply.status.as_u16(), status, "{name}: {:?}", reply.json);
        assert_eq!(reply.json["error"], code, "{name}: {:?}", reply.json);
        assert!(
            reply.json["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert_eq!(
            count_events(&store, None).await?,
            2,
            "{name}: nothing written"
        );
    }

    // A chunked body (no Content-Length) over the limit is cut off while reading: 413 too.
    let mut socket = TcpStream::connect(addr(&proxy.data)).await?;
    let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n");
    socket.write_all(head.as_bytes()).await?;
    let chunk = format!(
        "{{\"events\":[{{\"event_type\":\"A\",\"payload\":{{\"x\":\"{}\"}}}}]}}",
        "y".repeat(6000)
    );
    socket
        .write_all(format!("{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len()).as_bytes())
        .await?;
    let (status, _, body) = read_response(&mut socket).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );
    assert_eq!(body["limit_bytes"], 4096);

    // A head over max_header_bytes: 431, or the connection closed; never a request.
    let mut socket = TcpStream::connect(addr(&proxy.data)).await?;
    let huge = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nx-filler: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        "h".repeat(20_000)
    );
    let _ = socket.write_all(huge.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );

    // The store still has exactly the acknowledged events, and appends go on normally.
    assert_eq!(count_events(&store, None).await?, 2);
    let second = events_body(Some(2), 3, "More");
    let reply = http.post(&url, &second).await?;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    assert_eq!(reply.json["first_version"], 3);
    acked.extend(ids_of(&second));
    assert_eq!(stream_ids(&http, &url).await?, acked);
    assert_eq!(count_events(&store, None).await?, 5);
    Ok(())
}

/// Slow-loris heads and silent connections are cut at the header timeout; a slow body gets
/// 408; an idle keep-alive connection stays usable past the header timeout, until its own
/// idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_and_idle_keep_alive_survives() -> Result<()> {
    let extra = "[proxy]\nheader_read_timeout_ms = 800\nkeep_alive_idle_ms = 2500\nbody_read_timeout_ms = 800\n";
    let (env, proxy, http) = started(Backend::Postgres, &["shared"], extra, &[]).await?;
    let store = env.store_url("shared").to_owned();
    let tenant = Uuid::new_v4();
    let url = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
    let path = url.trim_start_matches(&proxy.data).to_owned();
    let data = addr(&proxy.data);

    // Slow loris: a head sent a byte every 100 ms is cut about 800 ms after its first byte.
    let loris = {
        let (data, path) = (data.clone(), path.clone());
        tokio::spawn(async move {
            let mut socket = TcpStream::connect(&data).await?;
            let head = format!(
                "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 60\r\nx-slow: {}\r\n\r\n",
                "s".repeat(100)
            );
            let started = Instant::now();
            for byte in head.as_bytes() {
                if socket.write_all(&[*byte]).await.is_err() {
                    break;
                }
                let mut probe = [0u8; 64];
                match tokio::time::timeout(Duration::from_millis(100), socket.read(&mut probe))
                    .await
                {
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(_)) => anyhow::bail!("the server answered a head that never finished"),
                    Err(_) => {}
                }
            }
            Ok::<_, anyhow::Error>(started.elapsed())
        })
    };
    // A connection that never sends anything is cut at the header timeout too.
    let mut silent = TcpStream::connect(&data).await?;
    let silent_for = closed_within(&mut silent, Duration::from_secs(5)).await?;
    let loris_for = loris.await??;
    assert!(
        loris_for >= Duration::from_millis(700) && loris_for < Duration::from_millis(2500),
        "slow loris cut after {loris_for:?}"
    );
    assert!(
        silent_for >= Duration::from_millis(700) && silent_for < Duration::from_millis(2500),
        "silent cut after {silent_for:?}"
    );

    // A body that stops half-way: 408 body_timeout, connection closed, nothing written.
    let mut socket = TcpStream::connect(&data).await?;
    let started = Instant::now();
    socket
        .write_all(format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"events\":[").as_bytes())
        .await?;
    let (status, head, body) = read_response(&mut socket).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (408, Some("body_timeout")),
        "{body}"
    );
    assert!(head.contains("connection: close"), "{head}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    closed_within(&mut socket, Duration::from_secs(2)).await?;

    // Keep-alive: a request, 1.2 s of silence (past the header timeout), another request on
    // the same connection; then silence past the idle timeout closes it.
    let mut socket = TcpStream::connect(&data).await?;
    socket.write_all(get_request(&path).as_bytes()).await?;
    assert_eq!(read_response(&mut socket).await?.0, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let body = serde_json::to_string(&events_body(Some(0), 1, "Kept"))?;
    socket
        .write_all(format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes())
        .await?;
    let (status, _, reply) = read_response(&mut socket).await?;
    assert_eq!(status, 201, "{reply}");
    let idle = closed_within(&mut socket, Duration::from_secs(6)).await?;
    assert!(
        idle >= Duration::from_millis(2000),
        "idle connection closed after {idle:?}"
    );

    assert_eq!(
        count_events(&store, None).await?,
        1,
        "only the acknowledged append landed"
    );
    assert_eq!(
        http.get(&url).await?.json["events"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    Ok(())
}

/// Past `max_connections` a connection gets 503 `too_many_connections` and is closed; when one
/// closes, a new one is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_is_enforced() -> Result<()> {
    let (_env, proxy, _http) = started(
        Backend::Sqlite,
        &["shared"],
        "[proxy]\nmax_connections = 4\n",
        &[],
    )
    .await?;
    let data = addr(&proxy.data);
    let path = format!("/v1/tenants/{}/events", Uuid::new_v4());
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut socket = TcpStream::connect(&data).await?;
        socket.write_all(get_request(&path).as_bytes()).await?;
        assert_eq!(read_response(&mut socket).await?.0, 200);
        open.push(socket);
    }
    let mut fifth = TcpStream::connect(&data).await?;
    let _ = fifth.write_all(get_request(&path).as_bytes()).await;
    let (status, head, body) = read_response(&mut fifth).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("too_many_connections")),
        "{body}"
    );
    assert!(head.contains("retry-after: 1"), "{head}");
    closed_within(&mut fifth, Duration::from_secs(2)).await?;

    drop(open.pop());
    wait_for(Duration::from_secs(5), || async {
        let mut socket = TcpStream::connect(&data).await?;
        socket.write_all(get_request(&path).as_bytes()).await?;
        Ok(read_response(&mut socket).await?.0 == 200)
    })
    .await?;
    // The ones kept open still work.
    for socket in &mut open {
        socket.write_all(get_request(&path).as_bytes()).await?;
        assert_eq!(read_response(socket).await?.0, 200);
    }
    Ok(())
}

/// Over the per-client rate a request gets 429 `rate_limited` with Retry-After and is not
/// handled (a refused append writes nothing); the bucket refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_and_refills() -> Result<()> {
    let extra = "[proxy]\nrate_limit_per_second = 2\nrate_limit_burst = 3\n";
    let (env, proxy, http) = started(Backend::Sqlite, &["shared"], extra, &[]).await?;
    let tenant = Uuid::new_v4();
    let url = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(http.get(&url).await?.status.as_u16());
    }
    let refused = http.post(&url, &events_body(None, 1, "Refused")).await?;
    assert_eq!(statuses, vec![200, 200, 200]);
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        refused.json
    );
    assert_eq!(refused.json["error"], "rate_limited");
    assert_eq!(refused.json["retryable"], true);
    let retry_after: u64 = refused
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(retry_after >= 1, "{:?}", refused.headers);
    assert_eq!(count_events(env.store_url("shared"), None).await?, 0);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let accepted = http.post(&url, &events_body(None, 1, "Later")).await?;
    assert_eq!(accepted.status, StatusCode::CREATED, "{:?}", accepted.json);
    assert_eq!(count_events(env.store_url("shared"), None).await?, 1);
    // The admin port is not rate limited.
    for _ in 0..10 {
        assert_eq!(
            http.get(&format!("{}/healthz", proxy.admin)).await?.status,
            StatusCode::OK
        );
    }
    Ok(())
}

/// The appends-in-flight gauge returns to 0 when a client disconnects mid-append, and the
/// abandoned append lands whole or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_append_leaves_no_gauge_drift() -> Result<()> {
    let (env, proxy, http) = started(Backend::Postgres, &["shared"], "", &[]).await?;
    let gauge = |proxy: &ProxyProcess, http: &Http| {
        let url = format!("{}/metrics", proxy.admin);
        let http = http.clone();
        async move {
            let m = http.get(&url).await?;
            Ok::<_, anyhow::Error>(
                String::from_utf8_lossy(&m.body)
                    .lines()
                    .find_map(|l| l.strip_prefix("switchyard_proxy_appends_in_flight "))
                    .map(str::to_owned)
                    .unwrap_or_default(),
            )
        }
    };
    let mut blocker = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    sqlx::query("BEGIN").execute(&mut blocker).await?;
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await?;
    let url = stream_url(&proxy.data, Uuid::new_v4(), "Order", Uuid::new_v4());
    let path = url.trim_start_matches(&proxy.data).to_owned();
    let body = serde_json::to_string(&events_body(Some(0), 3, "Abandoned"))?;
    let mut socket = TcpStream::connect(addr(&proxy.data)).await?;
    socket
        .write_all(format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes())
        .await?;
    wait_for(Duration::from_secs(5), || async {
        Ok(gauge(&proxy, &http).await? == "1")
    })
    .await?;
    drop(socket);
    wait_for(Duration::from_secs(5), || async {
        Ok(gauge(&proxy, &http).await? == "0")
    })
    .await
    .map_err(|e| anyhow::anyhow!("gauge stuck after the client left: {e}"))?;
    sqlx::query("ROLLBACK").execute(&mut blocker).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let landed = count_events(env.store_url("shared"), None).await?;
    assert!(
        landed == 0 || landed == 3,
        "an abandoned append landed half: {landed}"
    );
    Ok(())
}
