//! The proxy process's life: readiness, graceful shutdown on SIGTERM with a request in
//! flight, a store that is down, and the embedded default with no config at all.

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use sqlx::Connection;
use switchyard_tests::{
    bin, events_body, started, stream_url, wait_for, Backend, Env, Http, Result, TempDir,
};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_reports_unready() -> Result<()> {
    let (env, mut proxy, http) = started(Backend::Postgres, &["shared"], "", &[]).await?;
    let mut blocker = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    sqlx::query("BEGIN").execute(&mut blocker).await?;
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await?;
    let url = stream_url(&proxy.data, Uuid::new_v4(), "Order", Uuid::new_v4());
    let in_flight = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move { http.post(&url, &events_body(Some(0), 1, "E")).await })
    };
    wait_for(Duration::from_secs(5), || async {
        let m = http.get(&format!("{}/metrics", proxy.admin)).await?;
        Ok(String::from_utf8_lossy(&m.body).contains("switchyard_proxy_appends_in_flight 1"))
    })
    .await?;
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(proxy.pid().to_string())
        .status()?;
    wait_for(Duration::from_secs(5), || async {
        Ok(http.get(&format!("{}/readyz", proxy.admin)).await?.status
            == StatusCode::SERVICE_UNAVAILABLE)
    })
    .await?;
    // New connections are refused while the old one drains.
    assert!(
        Http::new().get(&url).await.is_err(),
        "the data port stopped accepting"
    );
    sqlx::query("COMMIT").execute(&mut blocker).await?;
    let reply = in_flight.await??;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "the in-flight append finished: {:?}",
        reply.json
    );
    let status = proxy.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "{status:?}");
    Ok(())
}

/// A store that is down does not make the proxy unready (each sidecar gates its application
/// pod, and most tenants are on other stores): readiness is routing loaded and not draining;
/// the store's health is in `/readyz`'s body and in `switchyard_proxy_store_up`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_shows_in_readyz_and_metrics_but_the_proxy_stays_ready() -> Result<()>
{
    let extra = "[[stores]]\nid = \"down\"\nurl = \"postgres://postgres@127.0.0.1:1/nothing\"\n";
    let env = Env::new(Backend::Postgres, &["shared"], extra).await?;
    env.control(&["init", "--store", "shared"])?;
    let proxy = env.proxy(&[])?;
    let http = Http::new();
    proxy.wait_ready(&http).await?;
    let ready = http.get(&format!("{}/readyz", proxy.admin)).await?;
    assert_eq!(ready.status, StatusCode::OK, "{:?}", ready.json);
    assert_eq!(ready.json["problems"], json!([]), "{:?}", ready.json);
    let stores = ready.json["stores"].as_array().cloned().unwrap_or_default();
    let store = |id: &str| {
        stores
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(store("shared")["reachable"], true, "{:?}", ready.json);
    assert_eq!(store("down")["reachable"], false, "{:?}", ready.json);
    assert!(store("down")["problem"]
        .as_str()
        .is_some_and(|p| !p.is_empty()));
    let metrics =
        String::from_utf8_lossy(&http.get(&format!("{}/metrics", proxy.admin)).await?.body)
            .into_owned();
    assert!(
        metrics.contains("switchyard_proxy_store_up{store=\"down\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_proxy_store_up{store=\"shared\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        http.get(&format!("{}/healthz", proxy.admin)).await?.status,
        StatusCode::OK
    );
    let reply = http
        .post(
            &stream_url(&proxy.data, Uuid::new_v4(), "A", Uuid::new_v4()),
            &events_body(None, 1, "E"),
        )
        .await?;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "the healthy store still serves"
    );

    // What readiness is about: a proxy that cannot load its routing is not ready.
    let blind = env.proxy(&[(
        "SWITCHYARD_CONTROL_URL",
        "postgres://postgres@127.0.0.1:1/nothing",
    )])?;
    let ready = http.get(&format!("{}/readyz", blind.admin)).await?;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        ready.json
    );
    assert!(
        ready.json["problems"].as_array().is_some_and(|p| p
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.contains("routing")))),
        "{:?}",
        ready.json
    );
    Ok(())
}

/// No config, no `init`: the proxy runs on SQLite files under ./switchyard-data/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_needs_no_config() -> Result<()> {
    let dir = TempDir::new("embedded")?;
    let mut child = std::process::Command::new(bin("switchyard-proxy"))
        .current_dir(&dir.path)
        .env("SWITCHYARD_PROXY_LISTEN", "127.0.0.1:0")
        .env("SWITCHYARD_PROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env_remove("SWITCHYARD_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(|a| format!("http://{a}"))
    };
    let (data, admin) = (
        field("data=").expect("data"),
        field("admin=").expect("admin"),
    );
    let http = Http::new();
    wait_for(Duration::from_secs(10), || async {
        Ok(http.get(&format!("{admin}/readyz")).await?.status == StatusCode::OK)
    })
    .await?;
    let reply = http
        .post(
            &stream_url(&data, Uuid::new_v4(), "A", Uuid::new_v4()),
            &events_body(Some(0), 2, "E"),
        )
        .await?;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.json["store_id"], "shared");
    for file in ["control.db", "shared.db", "dedicated.db"] {
        assert!(
            dir.path.join("switchyard-data").join(file).exists(),
            "{file}"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
