//! Access: the admin port's exposure rules, TLS on both listeners, database passwords kept
//! out of every log and reply, and tenant isolation by event id.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use sqlx::Connection;
use switchyard_tests::{
    bin, count_events, events_body, feed_url, started, stream_url, wait_for, Backend, Env, Http,
    Result, TempDir,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

/// Runs the proxy with `config` and `env` until it exits or `limit` passes; returns the exit
/// code (None if it was still running and got killed) and stdout + stderr.
fn run_proxy_for(
    config: &Path,
    env: &[(&str, &str)],
    limit: Duration,
) -> Result<(Option<i32>, String)> {
    let dir = TempDir::new("proxy-out")?;
    let (out, err) = (dir.path.join("out"), dir.path.join("err"));
    let mut command = Command::new(bin("switchyard-proxy"));
    command
        .arg("--config")
        .arg(config)
        .env("SWITCHYARD_PROXY_LISTEN", "127.0.0.1:0")
        .env("SWITCHYARD_PROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn()?;
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait()? {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        std::fs::read_to_string(&out)?,
        std::fs::read_to_string(&err)?
    );
    Ok((code, text))
}

/// The admin port binds to loopback by default; bound anywhere else without a token the proxy
/// refuses to start; with a token it starts, and mutating calls need that token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_exposure_needs_a_token() -> Result<()> {
    let defaults = switchyard_store::Config::default();
    let admin: std::net::SocketAddr = defaults.proxy.admin_listen.parse()?;
    assert!(admin.ip().is_loopback(), "{admin}");

    let env = Env::new(Backend::Sqlite, &["shared"], "").await?;
    env.control_json(&["init"])?;
    let (code, output) = run_proxy_for(
        &env.config_path,
        &[("SWITCHYARD_PROXY_ADMIN_LISTEN", "0.0.0.0:0")],
        Duration::from_secs(10),
    )?;
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {output}");
    assert!(
        output.contains("admin_token") && output.contains("0.0.0.0:0"),
        "{output}"
    );
    assert!(!output.contains("listening"), "{output}");

    let token = "t0ken-for-the-test";
    let proxy = env.proxy(&[
        ("SWITCHYARD_PROXY_ADMIN_LISTEN", "0.0.0.0:0"),
        ("SWITCHYARD_PROXY_ADMIN_TOKEN", token),
    ])?;
    let admin = proxy.admin.replace("0.0.0.0", "127.0.0.1");
    let http = Http::new();
    wait_for(Duration::from_secs(20), || async {
        Ok(http
            .get(&format!("{admin}/readyz"))
            .await
            .is_ok_and(|r| r.status == StatusCode::OK))
    })
    .await?;
    let reload = format!("{admin}/admin/routes/reload");
    let refused = http
        .request(Method::POST, &reload, Bytes::new(), &[])
        .await?;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.json["error"], "unauthorized");
    let wrong = http
        .request(
            Method::POST,
            &reload,
            Bytes::new(),
            &[("authorization", "Bearer t0ken-for-the-tesT")],
        )
        .await?;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let bearer = format!("Bearer {token}");
    let allowed = http
        .request(
            Method::POST,
            &reload,
            Bytes::new(),
            &[("authorization", bearer.as_str())],
        )
        .await?;
    assert_eq!(allowed.status, StatusCode::OK, "{:?}", allowed.json);
    Ok(())
}

/// A CA and a `localhost`/127.0.0.1 certificate it signed: `(ca DER, cert PEM, key PEM)`.
fn test_certificates() -> Result<(Vec<u8>, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "switchyard test CA");
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    Ok((ca.der().to_vec(), cert.pem(), key.serialize_pem()))
}

/// One request over TLS (HTTP/1.1 or, by ALPN, HTTP/2) trusting only `ca`.
async fn tls_request(
    addr: &str,
    ca: &[u8],
    h2: bool,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Value)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(ca.to_vec()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let request = Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    };
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// With a certificate and key configured, both listeners speak TLS (HTTP/1.1 and h2 by ALPN)
/// and nothing else; an append over HTTPS lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_data_and_admin_listeners() -> Result<()> {
    let dir = TempDir::new("tls")?;
    let (ca, cert, key) = test_certificates()?;
    let (cert_path, key_path) = (dir.path.join("cert.pem"), dir.path.join("key.pem"));
    std::fs::write(&cert_path, cert)?;
    std::fs::write(&key_path, key)?;
    let extra = format!(
        "[proxy]\ntls_cert_path = \"{}\"\ntls_key_path = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    let env = Env::new(Backend::Postgres, &["shared"], &extra).await?;
    env.control_json(&["init"])?;
    let proxy = env.proxy(&[])?;
    let (data, admin) = (
        proxy.data.trim_start_matches("http://").to_owned(),
        proxy.admin.trim_start_matches("http://").to_owned(),
    );
    wait_for(Duration::from_secs(20), || async {
        Ok(
            tls_request(&admin, &ca, false, Method::GET, "/readyz", Vec::new())
                .await
                .is_ok_and(|(s, _)| s == StatusCode::OK),
        )
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", proxy.log()))?;

    let (tenant, aggregate) = (Uuid::new_v4(), Uuid::new_v4());
    let path = format!("/v1/tenants/{tenant}/streams/Order/{aggregate}/events");
    let body = serde_json::to_vec(&events_body(Some(0), 2, "OverTls"))?;
    let (status, reply) = tls_request(&data, &ca, false, Method::POST, &path, body).await?;
    assert_eq!(status, StatusCode::CREATED, "{reply}");
    assert_eq!(reply["last_version"], 2);
    let (status, reply) = tls_request(&data, &ca, true, Method::GET, &path, Vec::new()).await?;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(
        reply["events"].as_array().map(Vec::len),
        Some(2),
        "h2 over TLS reads the append"
    );
    assert_eq!(
        count_events(env.store_url("shared"), Some(tenant)).await?,
        2
    );

    // Plain HTTP on either TLS port gets no HTTP answer.
    for port in [&data, &admin] {
        let mut socket = TcpStream::connect(port).await?;
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer)).await;
        assert!(
            !answer.starts_with(b"HTTP/"),
            "plaintext answered on {port}: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    // A client that does not trust the CA fails the handshake.
    let (other_ca, _, _) = test_certificates()?;
    assert!(
        tls_request(&data, &other_ca, false, Method::GET, &path, Vec::new())
            .await
            .is_err()
    );
    Ok(())
}

/// Store and control URLs with passwords, to databases that refuse or do not exist: the
/// passwords appear in no log line, no error reply, no admin output, and not in check-config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_passwords_never_leak() -> Result<()> {
    let dir = TempDir::new("secrets")?;
    let secrets = ["CtlSecret-4711", "StoreSecret-0815", "OtherSecret-42"];
    let missing = format!("sy_missing_{}", Uuid::new_v4().simple());
    let pg = switchyard_tests::pg_url("x");
    let host = pg
        .trim_start_matches("postgres://")
        .split('@')
        .nth(1)
        .and_then(|h| h.split('/').next())
        .unwrap_or("127.0.0.1:5432")
        .to_owned();
    let config = format!(
        "control_url = \"postgres://postgres:{}@{host}/{missing}\"\ndefault_store = \"other\"\n\n\
         [[stores]]\nid = \"shared\"\nurl = \"postgres://postgres:{}@127.0.0.1:1/events\"\n\n\
         [[stores]]\nid = \"other\"\nurl = \"postgres://postgres:{}@{host}/{missing}\"\n",
        secrets[0], secrets[1], secrets[2]
    );
    let config_path = dir.path.join("switchyard.toml");
    std::fs::write(&config_path, config)?;
    let leaks = |text: &str| {
        secrets
            .iter()
            .filter(|s| text.contains(*s))
            .copied()
            .collect::<Vec<_>>()
    };

    let check = switchyard_tests::run_control(&config_path, &["check-config"], &[])?;
    assert!(
        leaks(&check.stdout).is_empty() && leaks(&check.stderr).is_empty(),
        "check-config: {}{}",
        check.stdout,
        check.stderr
    );
    assert!(
        check.stdout.contains("***") || check.stderr.contains("***"),
        "{}{}",
        check.stdout,
        check.stderr
    );
    let stores = switchyard_tests::run_control(&config_path, &["stores", "check"], &[])?;
    assert!(
        leaks(&stores.stdout).is_empty() && leaks(&stores.stderr).is_empty(),
        "stores check: {}{}",
        stores.stdout,
        stores.stderr
    );

    let proxy =
        switchyard_tests::ProxyProcess::spawn(&config_path, &[("SWITCHYARD_LOG", "debug")])?;
    let http = Http::new();
    let tenant = Uuid::new_v4();
    let mut replies = String::new();
    // Let the routing watcher and readiness fail a few times, and ask everything there is
    // (the default store is the missing database, which fails fast; `shared` is a closed port).
    for round in 0..2 {
        for url in [
            format!("{}/readyz", proxy.admin),
            format!("{}/healthz", proxy.admin),
            format!("{}/metrics", proxy.admin),
            format!("{}/admin/routes", proxy.admin),
            format!("{}/admin/routes/{tenant}", proxy.admin),
            feed_url(&proxy.data, tenant),
            stream_url(&proxy.data, tenant, "Order", Uuid::new_v4()),
        ] {
            replies.push_str(&String::from_utf8_lossy(&http.get(&url).await?.body));
        }
        let append = http
            .post(
                &stream_url(&proxy.data, tenant, "Order", Uuid::new_v4()),
                &events_body(None, 1, "E"),
            )
            .await?;
        assert!(append.status.is_server_error(), "{:?}", append.json);
        replies.push_str(&String::from_utf8_lossy(&append.body));
        let reload = http
            .request(
                Method::POST,
                &format!("{}/admin/routes/reload", proxy.admin),
                Bytes::new(),
                &[],
            )
            .await?;
        replies.push_str(&String::from_utf8_lossy(&reload.body));
        if round == 0 {
            assert_eq!(
                reload.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{:?}",
                reload.json
            );
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let log = proxy.log();
    assert!(
        log.contains("sy_missing_") || log.contains("127.0.0.1:1") || log.contains("shared"),
        "the failures were logged:\n{log}"
    );
    assert!(
        replies.contains("unavailable") || replies.contains("unreachable"),
        "{replies}"
    );
    assert!(leaks(&log).is_empty(), "password in the log:\n{log}");
    assert!(
        leaks(&replies).is_empty(),
        "password in a reply:\n{replies}"
    );

    // A config error names the URL without its password too.
    let (code, output) = run_proxy_for(
        &config_path,
        &[(
            "SWITCHYARD_STORE_OTHER_URL",
            "mysql://root:OtherSecret-42@h/db",
        )],
        Duration::from_secs(10),
    )?;
    assert!(code.is_some_and(|c| c != 0), "{output}");
    assert!(
        leaks(&output).is_empty(),
        "password in a config error: {output}"
    );
    Ok(())
}

/// Known secrets, in every form a configuration carries them — a `${VAR}` password holding URL
/// delimiters (which must be percent-encoded to reach the database at all), a literal
/// password holding `@`, a `?password=` parameter, an admin token — go through every path
/// and are found nowhere: config errors (a TOML line that does not parse, a value of the wrong
/// type), `check-config`, `stores list/check`, the CLI's and the proxy's logs at debug,
/// `/admin/*`, `/readyz`, `/metrics`, error replies, and the control database's audit rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_found_nowhere() -> Result<()> {
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    // (value, what to look for: its alphanumeric core, unchanged by percent-encoding)
    let expanded = "Pw1Secret@/?#%&:x";
    let literal = "p@Ss2Secret";
    let query = "Qu3rySecret";
    let token = "Adm1nSecret";
    let cores = ["Pw1Secret", "Ss2Secret", "Qu3rySecret", "Adm1nSecret"];
    let leaks = |text: &str| -> Vec<&str> {
        cores
            .iter()
            .filter(|c| text.contains(*c))
            .copied()
            .collect()
    };
    let with_password = |url: &str, password: &str| {
        url.replacen(
            "postgres://postgres@",
            &format!("postgres://postgres:{password}@"),
            1,
        )
    };
    let config = format!(
        "control_url = \"{}?sslmode=disable&password={query}\"\ndefault_store = \"shared\"\n\n\
         [proxy]\nadmin_token = \"${{SY_TEST_TOKEN}}\"\n\n\
         [[stores]]\nid = \"shared\"\nurl = \"{}\"\n\n[[stores]]\nid = \"dedicated\"\nurl = \"{}\"\n",
        env.control_url,
        with_password(env.store_url("shared"), "${SY_TEST_PW}"),
        with_password(env.store_url("dedicated"), literal),
    );
    std::fs::write(&env.config_path, &config)?;
    let vars = [
        ("SY_TEST_PW", expanded),
        ("SY_TEST_TOKEN", token),
        ("SWITCHYARD_LOG", "debug"),
    ];
    let mut seen = String::new();
    let mut control = |args: &[&str]| -> Result<switchyard_tests::CommandOutput> {
        let out = switchyard_tests::run_control(&env.config_path, args, &vars)?;
        seen.push_str(&format!("\n$ {args:?}\n{}{}", out.stdout, out.stderr));
        Ok(out)
    };

    // The expanded password reaches PostgreSQL as one password (trust auth ignores its value,
    // but a raw '@' or '/' would have moved the host and the database).
    let init = control(&["init"])?;
    assert_eq!(init.code, 0, "{}{}", init.stdout, init.stderr);
    for args in [
        &["check-config"][..],
        &["--json", "check-config"][..],
        &["stores", "list"][..],
        &["--json", "stores", "list"][..],
        &["stores", "check"][..],
        &["--json", "stores", "check"][..],
    ] {
        let out = control(args)?;
        assert_eq!(out.code, 0, "{args:?}: {}{}", out.stdout, out.stderr);
    }

    let proxy = env.proxy(&vars)?;
    let http = Http::new();
    proxy.wait_ready(&http).await?;
    let tenant = Uuid::new_v4();
    let stream = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
    let reply = http
        .post(&stream, &events_body(Some(0), 3, "Created"))
        .await?;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    let started = control(&[
        "--json",
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        "dedicated",
        "--detach",
        "--reason",
        "secrets test",
    ])?;
    let migration: Value = serde_json::from_str(&started.stdout).unwrap_or_default();
    let migration = migration["id"].as_str().unwrap_or_default().to_owned();
    assert!(
        !migration.is_empty(),
        "{}{}",
        started.stdout,
        started.stderr
    );
    control(&["abort", &migration, "--reason", "secrets test"])?;
    control(&["audit", &migration])?;
    control(&["status", &migration])?;

    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let mut replies = String::new();
    for (method, url, body, headers) in [
        (
            Method::GET,
            format!("{}/readyz", proxy.admin),
            Bytes::new(),
            &[][..],
        ),
        (
            Method::GET,
            format!("{}/metrics", proxy.admin),
            Bytes::new(),
            &[][..],
        ),
        (
            Method::GET,
            format!("{}/admin/routes", proxy.admin),
            Bytes::new(),
            &[][..],
        ),
        (
            Method::GET,
            format!("{}/admin/routes/{tenant}", proxy.admin),
            Bytes::new(),
            &[][..],
        ),
        (
            Method::GET,
            format!("{}/admin/log-level", proxy.admin),
            Bytes::new(),
            &[][..],
        ),
        (
            Method::POST,
            format!("{}/admin/routes/reload", proxy.admin),
            Bytes::new(),
            &[][..],
        ),
        (
            Method::POST,
            format!("{}/admin/routes/reload", proxy.admin),
            Bytes::new(),
            &auth[..],
        ),
        (
            Method::POST,
            format!("{}/admin/routes/reload", proxy.admin),
            Bytes::new(),
            &[("authorization", "Bearer Adm1nSecreT")][..],
        ),
        (
            Method::GET,
            format!("{}/admin/nothing", proxy.admin),
            Bytes::new(),
            &[][..],
        ),
        (Method::GET, stream.clone(), Bytes::new(), &[][..]),
        (
            Method::GET,
            feed_url(&proxy.data, tenant),
            Bytes::new(),
            &[][..],
        ),
        (
            Method::POST,
            stream.clone(),
            Bytes::from_static(b"{\"events\":["),
            &[][..],
        ),
        (
            Method::POST,
            stream.clone(),
            Bytes::from(serde_json::to_vec(&events_body(Some(0), 1, "E"))?),
            &[][..],
        ),
        (
            Method::GET,
            format!("{}/v1/nothing", proxy.data),
            Bytes::new(),
            &[][..],
        ),
    ] {
        let reply = http.request(method, &url, body, headers).await?;
        replies.push_str(&format!(
            "\n{url}: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        ));
    }
    assert!(
        replies.contains("switchyard_proxy_requests_total"),
        "{replies}"
    );
    assert!(
        replies.contains("unauthorized") && replies.contains("version_conflict"),
        "{replies}"
    );

    // The audit rows and the migration record, as text.
    let mut db = sqlx::PgConnection::connect(&env.control_url).await?;
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT t::text FROM migration_audit_log t UNION ALL SELECT m::text FROM tenant_migrations m",
    )
    .fetch_all(&mut db)
    .await?;
    assert!(rows.len() >= 2, "{rows:?}");
    let rows = rows.join("\n");

    // Config errors: a line that does not parse, a secret where a number belongs, a bad
    // environment override; from check-config and from the proxy.
    let broken = [
        config.replacen(
            &format!("password={query}\""),
            &format!("password={query}"),
            1,
        ),
        format!("{config}max_connections = \"{literal}\"\n"),
        config.replacen(
            "default_store = \"shared\"",
            &format!("default_store = [\"{literal}\""),
            1,
        ),
    ];
    let mut errors = String::new();
    for text in &broken {
        std::fs::write(&env.config_path, text)?;
        let out = switchyard_tests::run_control(&env.config_path, &["check-config"], &vars)?;
        assert_ne!(out.code, 0, "{text}");
        errors.push_str(&format!("\n{}{}", out.stdout, out.stderr));
        let (code, output) = run_proxy_for(&env.config_path, &vars, Duration::from_secs(10))?;
        assert!(code.is_some_and(|c| c != 0), "{output}");
        errors.push_str(&output);
    }
    std::fs::write(&env.config_path, &config)?;
    let out = switchyard_tests::run_control(
        &env.config_path,
        &["check-config"],
        &[
            ("SY_TEST_PW", expanded),
            ("SY_TEST_TOKEN", token),
            ("SWITCHYARD_PROXY_GATE_WAIT_MS", literal),
        ],
    )?;
    assert_ne!(out.code, 0);
    errors.push_str(&format!("\n{}{}", out.stdout, out.stderr));
    assert!(errors.contains("line"), "{errors}");

    let log = proxy.log();
    assert!(
        log.contains("DEBUG") || log.contains("debug"),
        "the proxy logged at debug:\n{log}"
    );
    for (what, text) in [
        ("CLI output", &seen),
        ("proxy log", &log),
        ("replies", &replies),
        ("audit rows", &rows),
        ("config errors", &errors),
    ] {
        assert!(
            leaks(text).is_empty(),
            "{:?} in the {what}:\n{text}",
            leaks(text)
        );
    }
    Ok(())
}

/// An event id that belongs to another tenant's event is refused, whether sent to the
/// owner's stream path or the intruder's own stream, and reveals nothing; reads through a
/// tenant's path never return another tenant's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ids_of_another_tenant_are_refused() -> Result<()> {
    for backend in Backend::ALL {
        let (env, proxy, http) = started(backend, &["shared"], "", &[]).await?;
        let store = env.store_url("shared").to_owned();
        let (owner, intruder, aggregate) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let event_id = Uuid::new_v4();
        let event = json!({"event_id": event_id, "event_type": "Secret", "payload": {"card": "4111"}, "actor_id": "alice"});
        let owned = stream_url(&proxy.data, owner, "Order", aggregate);
        let first = http
            .post(&owned, &json!({"expected_version": 0, "events": [event]}))
            .await?;
        assert_eq!(
            first.status,
            StatusCode::CREATED,
            "{backend:?}: {:?}",
            first.json
        );
        // The owner's idempotent retry answers with the original result.
        let retry = http
            .post(&owned, &json!({"expected_version": 0, "events": [event]}))
            .await?;
        assert_eq!(
            (retry.status, &retry.json["global_positions"]),
            (StatusCode::CREATED, &first.json["global_positions"])
        );

        let same_stream_other_tenant = stream_url(&proxy.data, intruder, "Order", aggregate);
        let own_stream = stream_url(&proxy.data, intruder, "Order", Uuid::new_v4());
        for (url, expected) in [
            (&same_stream_other_tenant, None),
            (&same_stream_other_tenant, Some(0)),
            (&own_stream, None),
            (&own_stream, Some(0)),
        ] {
            let reply = http
                .post(
                    url,
                    &json!({"expected_version": expected, "events": [event]}),
                )
                .await?;
            assert!(
                matches!(reply.status, StatusCode::CONFLICT | StatusCode::NOT_FOUND),
                "{backend:?} {url} {expected:?}: {} {:?}",
                reply.status,
                reply.json
            );
            assert!(
                reply.json["global_positions"].is_null(),
                "{backend:?}: the owner's result leaked: {:?}",
                reply.json
            );
            let text = String::from_utf8_lossy(&reply.body);
            assert!(
                !text.contains("4111") && !text.contains("alice"),
                "{backend:?}: {text}"
            );
        }
        // A fresh id in the intruder's own stream is fine: only the reused id was refused.
        let own = http
            .post(&own_stream, &events_body(Some(0), 1, "Mine"))
            .await?;
        assert_eq!(
            own.status,
            StatusCode::CREATED,
            "{backend:?}: {:?}",
            own.json
        );

        for url in [
            same_stream_other_tenant.clone(),
            format!("{same_stream_other_tenant}?from_version=1&limit=10"),
            feed_url(&proxy.data, intruder),
        ] {
            let read = http.get(&url).await?;
            assert_eq!(read.status, StatusCode::OK);
            let ids: Vec<&str> = read.json["events"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e["event_id"].as_str()).collect())
                .unwrap_or_default();
            assert!(
                !ids.contains(&event_id.to_string().as_str()),
                "{backend:?}: {url} returned the owner's event"
            );
            assert!(
                read.json["events"]
                    .as_array()
                    .is_some_and(|a| a.iter().all(|e| e["tenant_id"] == json!(intruder))),
                "{backend:?}: {:?}",
                read.json
            );
        }
        assert_eq!(count_events(&store, Some(owner)).await?, 1);
        assert_eq!(count_events(&store, Some(intruder)).await?, 1);
    }
    Ok(())
}
