//! Fault injection: the harness's TCP gate does what each mode says, and a migration target
//! blackholed during dual-write never slows or fails an append, and the tail closes the gap
//! once it is back.

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use switchyard_tests::{
    assert_all_acked, events_body, route_state, stream_url, tenant_events, wait_for,
    wait_for_every, Backend, Env, GateMode, Http, Result, ServeProcess, TcpGate, Writers,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// An echo server; returns its address.
async fn echo_server() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Sends `msg` and waits up to `wait` for its echo: `Ok(Some(elapsed))`, `Ok(None)` when nothing
/// came back in time, `Err` when the connection was cut.
async fn echo(socket: &mut TcpStream, msg: &[u8], wait: Duration) -> Result<Option<Duration>> {
    let started = Instant::now();
    socket.write_all(msg).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < msg.len() {
        match tokio::time::timeout_at((started + wait).into(), socket.read(&mut buf)).await {
            Err(_) => return Ok(None),
            Ok(Ok(0)) => anyhow::bail!("connection closed"),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(e.into()),
        }
    }
    anyhow::ensure!(got == msg, "echo garbled: {got:?}");
    Ok(Some(started.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_injects_each_fault_on_command() -> Result<()> {
    let gate = TcpGate::start(&echo_server().await?).await?;
    let addr = format!("127.0.0.1:{}", gate.port);
    let mut a = TcpStream::connect(&addr).await?;
    assert!(echo(&mut a, b"pass", Duration::from_secs(2))
        .await?
        .is_some());

    gate.set(GateMode::Latency(Duration::from_millis(150)));
    let slow = echo(&mut a, b"late", Duration::from_secs(2))
        .await?
        .unwrap_or_default();
    assert!(
        slow >= Duration::from_millis(300),
        "two hops of 150 ms: {slow:?}"
    );

    gate.set(GateMode::Stall);
    assert_eq!(
        echo(&mut a, b"held", Duration::from_millis(300)).await?,
        None
    );
    gate.set(GateMode::Pass);
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), a.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"held", "a stall delays, it loses nothing");

    gate.set(GateMode::Blackhole);
    assert_eq!(
        echo(&mut a, b"void", Duration::from_millis(300)).await?,
        None
    );
    let mut b = TcpStream::connect(&addr).await?; // accepted, but nothing gets through
    assert_eq!(
        echo(&mut b, b"void", Duration::from_millis(300)).await?,
        None
    );
    gate.set(GateMode::Pass);
    for socket in [&mut a, &mut b] {
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(2), socket.read_to_end(&mut rest)).await?;
        assert!(
            read.is_err() || rest.is_empty(),
            "leaving a blackhole cuts its connections"
        );
    }

    // A reset is synchronous: nothing sent after it returns gets through, however the
    // connection's task is scheduled (seen once in CI as an echo that came back).
    for round in 0..50 {
        let mut c = TcpStream::connect(&addr).await?;
        assert!(echo(&mut c, b"again", Duration::from_secs(2))
            .await?
            .is_some());
        gate.reset();
        assert!(
            echo(&mut c, b"cut", Duration::from_secs(2)).await.is_err(),
            "reset cuts open connections (round {round})"
        );
    }
    gate.close();
    let mut d = TcpStream::connect(&addr).await?;
    assert!(
        echo(&mut d, b"refused", Duration::from_secs(2))
            .await
            .is_err(),
        "closed refuses"
    );
    gate.open();
    let mut e = TcpStream::connect(&addr).await?;
    assert!(echo(&mut e, b"open", Duration::from_secs(2))
        .await?
        .is_some());
    Ok(())
}

/// The gate's COMMIT trap against a real PostgreSQL: the connection that sends `COMMIT` is
/// cut before the answer comes back, yet the server committed; others pass; once only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_cuts_a_connection_right_after_its_commit() -> Result<()> {
    use sqlx::Connection as _;
    let db = switchyard_tests::TestDb::create("commitcut").await?;
    let gate = TcpGate::start("127.0.0.1:5432").await?;
    let mut direct = sqlx::PgConnection::connect(&db.url).await?;
    sqlx::query("CREATE TABLE t (x int)")
        .execute(&mut direct)
        .await?;
    let mut gated = sqlx::PgConnection::connect(&gate.url(&db.url)).await?;
    let mut tx = gated.begin().await?;
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&mut *tx)
        .await?;
    gate.cut_after_next_commit();
    let committed = tx.commit().await;
    assert!(committed.is_err(), "no answer to the COMMIT: {committed:?}");
    assert_eq!(gate.commit_cuts(), 1);
    // The server applies the COMMIT it received (after the cut, so perhaps not yet).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut direct)
            .await?;
        if rows == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the server never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Spent: the next commit through the gate is answered.
    let mut again = sqlx::PgConnection::connect(&gate.url(&db.url)).await?;
    let mut tx = again.begin().await?;
    sqlx::query("INSERT INTO t VALUES (2)")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    assert_eq!(gate.commit_cuts(), 1);
    Ok(())
}

/// The migration target is blackholed (packets dropped, connections hang) during dual-write
/// while writers append: appends keep their normal latency, mirror failures are counted, and
/// after the blackhole lifts the lag drains to 0 and the target equals the source, with every
/// acknowledged append in it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_target_during_dual_write_loses_nothing() -> Result<()> {
    let gate = TcpGate::start("127.0.0.1:5432").await?;
    let env = Env::new(
        Backend::Postgres,
        &["shared", "dedicated"],
        "[proxy]\nrouting_poll_ms = 100\n",
    )
    .await?;
    env.control_json(&["init"])?;
    let gated = gate.url(env.store_url("dedicated"));
    let via_gate = [("SWITCHYARD_STORE_DEDICATED_URL", gated.as_str())];
    let http = Http::new();
    let proxy = env.proxy(&via_gate)?;
    proxy.wait_ready(&http).await?;
    let _serve = ServeProcess::spawn(&env.config_path, "w", &via_gate)?;
    let tenant = Uuid::new_v4();
    let before = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
    assert_eq!(
        http.post(&before, &events_body(Some(0), 5, "Before"))
            .await?
            .status,
        StatusCode::CREATED
    );

    let started = env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        "dedicated",
        "--detach",
    ])?;
    let id = started["id"].as_str().unwrap_or_default().to_owned();
    let caught_up = |timeout: Duration| {
        let (env, id) = (&env, id.clone());
        wait_for_every(timeout, Duration::from_millis(250), move || {
            let id = id.clone();
            async move {
                let s: Value = env.control_json(&["status", &id])?;
                Ok(s["state"] == "dual_write" && s["lag"] == 0)
            }
        })
    };
    caught_up(Duration::from_secs(60)).await?;
    wait_for(Duration::from_secs(3), || async {
        Ok(route_state(&http, &proxy, tenant).await?["mirroring"] == true)
    })
    .await?;

    let writers = Writers::start(
        &http,
        std::slice::from_ref(&proxy.data),
        tenant,
        3,
        2,
        Duration::from_millis(20),
    );
    // A probe measures append latency before and during the blackhole.
    let probe_url = stream_url(&proxy.data, tenant, "Probe", Uuid::new_v4());
    let mut version = 0;
    let mut probe = |n: usize| {
        let (http, url) = (http.clone(), probe_url.clone());
        let first = version;
        version += n as i64;
        async move {
            let mut slowest = Duration::ZERO;
            for v in first..first + n as i64 {
                let t = Instant::now();
                let reply = http.post(&url, &events_body(Some(v), 1, "Probe")).await?;
                slowest = slowest.max(t.elapsed());
                anyhow::ensure!(
                    reply.status == StatusCode::CREATED,
                    "probe append: {} {:?}",
                    reply.status,
                    reply.json
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<_, anyhow::Error>(slowest)
        }
    };
    let normal = probe(10).await?;

    gate.set(GateMode::Blackhole);
    let during = probe(40).await?; // about 3 s, longer than the mirror's 2 s write timeout
    assert!(
        during < Duration::from_secs(1) && during < normal * 10 + Duration::from_millis(200),
        "appends slowed by the blackholed target: {during:?} (before: {normal:?})"
    );
    wait_for(Duration::from_secs(10), || async {
        let r = route_state(&http, &proxy, tenant).await?;
        Ok(r["mirror"]["total_failures"].as_u64().unwrap_or(0)
            + r["mirror"]["events_dropped"].as_u64().unwrap_or(0)
            >= 1)
    })
    .await?;
    let metrics = http.get(&format!("{}/metrics", proxy.admin)).await?;
    assert!(
        String::from_utf8_lossy(&metrics.body).lines().any(|l| l
            .starts_with("switchyard_proxy_mirror_writes_total{outcome=\"failed\"}")
            && !l.ends_with(" 0")),
        "mirror failures counted in the metrics"
    );

    gate.set(GateMode::Pass);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = writers.stop().await?;
    assert!(
        acked.len() >= 20,
        "the writers kept appending: {}",
        acked.len()
    );
    caught_up(Duration::from_secs(60)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let source = loop {
        let (source, target) = (
            tenant_events(env.store_url("shared"), tenant).await?,
            tenant_events(env.store_url("dedicated"), tenant).await?,
        );
        if source == target {
            break source;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "target never converged: source {}, target {}",
            source.len(),
            target.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_all_acked(&acked, &source);
    let acked_events: usize = acked.iter().map(|a| a.event_ids.len()).sum();
    assert_eq!(
        source.len(),
        5 + 50 + acked_events,
        "nothing but the acknowledged appends"
    );
    Ok(())
}
