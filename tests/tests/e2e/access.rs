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
    let defaults = switchyard_config::Config::default();
    let admin = defaults.proxy.admin_listen;
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

/// One request over TLS (HTTP/1.1 or, by ALPN, HTTP/2) trusting only `ca`, presenting
/// `client` (certificate PEM, key PEM) when given.
async fn tls_request(
    addr: &str,
    ca: &[u8],
    client: Option<&(String, String)>,
    h2: bool,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Value)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(ca.to_vec()))?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            use rustls::pki_types::pem::PemObject;
            builder.with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_slice(
                    cert.as_bytes(),
                )?],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())?,
            )?
        }
    };
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

/// Waits until the admin port answers `/readyz` 200 over TLS (no client certificate).
async fn wait_ready_over_tls(
    proxy: &switchyard_tests::ProxyProcess,
    admin: &str,
    ca: &[u8],
) -> Result<()> {
    wait_for(Duration::from_secs(20), || async {
        Ok(
            tls_request(admin, ca, None, false, Method::GET, "/readyz", Vec::new())
                .await
                .is_ok_and(|(s, _)| s == StatusCode::OK),
        )
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", proxy.log()))
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
    wait_ready_over_tls(&proxy, &admin, &ca).await?;

    let (tenant, aggregate) = (Uuid::new_v4(), Uuid::new_v4());
    let path = format!("/v1/tenants/{tenant}/streams/Order/{aggregate}/events");
    let body = serde_json::to_vec(&events_body(Some(0), 2, "OverTls"))?;
    let (status, reply) = tls_request(&data, &ca, None, false, Method::POST, &path, body).await?;
    assert_eq!(status, StatusCode::CREATED, "{reply}");
    assert_eq!(reply["last_version"], 2);
    let (status, reply) =
        tls_request(&data, &ca, None, true, Method::GET, &path, Vec::new()).await?;
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
    assert!(tls_request(
        &data,
        &other_ca,
        None,
        false,
        Method::GET,
        &path,
        Vec::new()
    )
    .await
    .is_err());
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

/// The value of one series (`name` or `name{labels}`, as exported) in a proxy's scrape.
async fn metric(http: &Http, admin: &str, series: &str) -> Result<Option<f64>> {
    let text = String::from_utf8(http.get(&format!("{admin}/metrics")).await?.body.to_vec())?;
    Ok(text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    }))
}

/// A request with `token` as its bearer token (none when empty).
async fn with_token(
    http: &Http,
    method: Method,
    url: &str,
    body: &Value,
    token: &str,
) -> Result<switchyard_tests::Reply> {
    let bearer = format!("Bearer {token}");
    let headers: &[(&str, &str)] = if token.is_empty() {
        &[]
    } else {
        &[("authorization", bearer.as_str())]
    };
    let body = if method == Method::POST {
        Bytes::from(serde_json::to_vec(body)?)
    } else {
        Bytes::new()
    };
    http.request(method, url, body, headers).await
}

/// With `proxy.data_tokens_file`, every data-plane request needs a bearer token allowed its
/// tenant: none or an unknown one is 401 `unauthenticated` (with `WWW-Authenticate: Bearer`,
/// whatever the path), a token of other tenants 403 `forbidden_tenant` and nothing is written.
/// Rewriting the file adds and removes tokens without a restart; a rewrite that does not parse
/// keeps the tokens in use and is counted. No token reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_tokens_allow_their_tenants_only() -> Result<()> {
    let dir = TempDir::new("tokens")?;
    let (mine, other) = (Uuid::new_v4(), Uuid::new_v4());
    let (app, ops, added) = (
        "app-token-Secret-0001",
        "ops-token-Secret-0002",
        "new-token-Secret-0003",
    );
    let tokens = dir.path.join("data-tokens");
    std::fs::write(
        &tokens,
        format!("# the orders app\n{app} {mine}\n{ops} *  # operators\n"),
    )?;
    let extra = format!(
        "[proxy]\ndata_tokens_file = \"{}\"\ndata_tokens_poll_ms = 50\n",
        tokens.display()
    );
    let (env, proxy, http) = started(
        Backend::Sqlite,
        &["shared"],
        &extra,
        &[("SWITCHYARD_LOG", "debug")],
    )
    .await?;
    let append = |tenant| stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
    let body = events_body(Some(0), 1, "E");

    for (method, url) in [
        (Method::POST, append(mine)),
        (Method::GET, append(mine)),
        (Method::GET, feed_url(&proxy.data, mine)),
        (Method::GET, format!("{}/v1/nothing", proxy.data)),
    ] {
        for token in ["", "app-token-Secret-000", "app-token-Secret-00011"] {
            let refused = with_token(&http, method.clone(), &url, &body, token).await?;
            assert_eq!(
                refused.status,
                StatusCode::UNAUTHORIZED,
                "{method} {url} {token:?}"
            );
            assert_eq!(
                refused.json["error"], "unauthenticated",
                "{:?}",
                refused.json
            );
            assert_eq!(refused.headers["www-authenticate"], "Bearer");
        }
        let basic = http
            .request(
                method.clone(),
                &url,
                Bytes::new(),
                &[("authorization", app)],
            )
            .await?;
        assert_eq!(basic.status, StatusCode::UNAUTHORIZED, "no Bearer scheme");
    }
    for (method, url) in [
        (Method::POST, append(other)),
        (Method::GET, append(other)),
        (Method::GET, feed_url(&proxy.data, other)),
    ] {
        let refused = with_token(&http, method.clone(), &url, &body, app).await?;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{method} {url}");
        assert_eq!(
            refused.json["error"], "forbidden_tenant",
            "{:?}",
            refused.json
        );
    }
    assert_eq!(count_events(env.store_url("shared"), None).await?, 0);
    // Each append that lands has fresh event ids (an id is unique across tenants).
    let fresh = || events_body(Some(0), 1, "E");
    let ok = with_token(&http, Method::POST, &append(mine), &fresh(), app).await?;
    assert_eq!(ok.status, StatusCode::CREATED, "{:?}", ok.json);
    let ok = with_token(&http, Method::POST, &append(other), &fresh(), ops).await?;
    assert_eq!(ok.status, StatusCode::CREATED, "{:?}", ok.json);
    let read = with_token(&http, Method::GET, &feed_url(&proxy.data, mine), &body, app).await?;
    assert_eq!(read.status, StatusCode::OK);

    // A rewrite: `added` for the other tenant, `app` gone. No restart.
    std::fs::write(&tokens, format!("{ops} *\n{added} {other},{mine}\n"))?;
    let feed = feed_url(&proxy.data, other);
    wait_for(Duration::from_secs(10), || async {
        Ok(with_token(&http, Method::GET, &feed, &body, added)
            .await?
            .status
            == StatusCode::OK)
    })
    .await?;
    let gone = with_token(&http, Method::POST, &append(mine), &body, app).await?;
    assert_eq!(gone.status, StatusCode::UNAUTHORIZED, "a removed token");
    assert_eq!(
        metric(
            &http,
            &proxy.admin,
            "switchyard_proxy_data_token_reloads_total{outcome=\"ok\"}"
        )
        .await?,
        Some(1.0)
    );
    assert_eq!(
        metric(&http, &proxy.admin, "switchyard_proxy_data_tokens").await?,
        Some(2.0)
    );

    // A rewrite that does not parse: counted, logged by line, and the tokens in use stay.
    std::fs::write(&tokens, format!("{ops} *\n{app} not-a-tenant\n"))?;
    wait_for(Duration::from_secs(10), || async {
        Ok(metric(
            &http,
            &proxy.admin,
            "switchyard_proxy_data_token_reloads_total{outcome=\"error\"}",
        )
        .await?
            == Some(1.0))
    })
    .await?;
    let kept = with_token(&http, Method::POST, &append(other), &fresh(), added).await?;
    assert_eq!(kept.status, StatusCode::CREATED, "{:?}", kept.json);
    let log = proxy.log();
    assert!(log.contains("line 2"), "{log}");
    for token in [app, ops, added] {
        assert!(!log.contains(token), "a token in the log:\n{log}");
    }
    Ok(())
}

/// A tokens file that cannot be read or does not parse is a start-up error naming the file
/// and the line, never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_tokens_file_is_a_start_error() -> Result<()> {
    let env = Env::new(Backend::Sqlite, &["shared"], "").await?;
    env.control_json(&["init"])?;
    let tokens = env.dir.path.join("data-tokens");
    let secret = "start-token-Secret-9";
    let path = tokens.display().to_string();
    for (content, says) in [
        (None, "No such file"),
        (Some(format!("# ok\n{secret} *\n{secret}\n")), "line 3"),
        (
            Some(format!("{secret} {}\n{secret} *\n", Uuid::new_v4())),
            "line 2",
        ),
        (Some(format!("{} {secret}\n", Uuid::new_v4())), "line 1"),
        (Some("short *\n".to_owned()), "line 1"),
    ] {
        if let Some(content) = &content {
            std::fs::write(&tokens, content)?;
        }
        let (code, output) = run_proxy_for(
            &env.config_path,
            &[("SWITCHYARD_PROXY_DATA_TOKENS_FILE", &path)],
            Duration::from_secs(10),
        )?;
        assert!(
            code.is_some_and(|c| c != 0),
            "{content:?}: exit {code:?}: {output}"
        );
        assert!(
            output.contains(&path) && output.contains(says),
            "{content:?}: {output}"
        );
        assert!(
            !output.contains(secret),
            "{content:?}: the token is shown: {output}"
        );
        assert!(!output.contains("listening"), "{output}");
    }
    Ok(())
}

/// A data listener beyond loopback with neither tokens nor client certificates refuses to
/// start; `proxy.allow_unauthenticated = true` starts it with a warning and a gauge at 1; with
/// a tokens file it starts and the gauge stays 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_data_plane_needs_authentication() -> Result<()> {
    let env = Env::new(Backend::Sqlite, &["shared"], "").await?;
    env.control_json(&["init"])?;
    let exposed = ("SWITCHYARD_PROXY_LISTEN", "0.0.0.0:0");
    let (code, output) = run_proxy_for(&env.config_path, &[exposed], Duration::from_secs(10))?;
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {output}");
    assert!(
        output.contains("0.0.0.0:0")
            && output.contains("data_tokens_file")
            && output.contains("allow_unauthenticated"),
        "{output}"
    );
    assert!(!output.contains("listening"), "{output}");

    let http = Http::new();
    let gauge = "switchyard_proxy_data_plane_unauthenticated";
    let allowed = env.proxy(&[exposed, ("SWITCHYARD_PROXY_ALLOW_UNAUTHENTICATED", "true")])?;
    allowed.wait_ready(&http).await?;
    let log = allowed.log();
    assert!(
        log.contains("WARN") && log.contains("unauthenticated data plane on 0.0.0.0:"),
        "{log}"
    );
    assert_eq!(metric(&http, &allowed.admin, gauge).await?, Some(1.0));
    let data = allowed.data.replace("0.0.0.0", "127.0.0.1");
    let tenant = Uuid::new_v4();
    let reply = http.get(&feed_url(&data, tenant)).await?;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.json);
    drop(allowed);

    let tokens = env.dir.path.join("data-tokens");
    std::fs::write(&tokens, format!("exposed-token-0123 {tenant}\n"))?;
    let path = tokens.display().to_string();
    let guarded = env.proxy(&[exposed, ("SWITCHYARD_PROXY_DATA_TOKENS_FILE", &path)])?;
    guarded.wait_ready(&http).await?;
    assert_eq!(metric(&http, &guarded.admin, gauge).await?, Some(0.0));
    assert!(!guarded.log().contains("unauthenticated data plane"));
    let data = guarded.data.replace("0.0.0.0", "127.0.0.1");
    assert_eq!(
        http.get(&feed_url(&data, tenant)).await?.status,
        StatusCode::UNAUTHORIZED
    );
    Ok(())
}

/// A CA, and a certificate it signed for `localhost`/127.0.0.1 (server) or for a client.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(name: &str) -> Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca_key = KeyPair::generate()?;
        let ca = params.self_signed(&ca_key)?;
        Ok(Self { ca, ca_key })
    }

    /// `(cert PEM, key PEM)`; a server's names `localhost` and 127.0.0.1.
    fn issue(&self, server: bool) -> Result<(String, String)> {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
        let mut params = CertificateParams::new(if server {
            vec!["localhost".to_owned()]
        } else {
            vec!["orders-app".to_owned()]
        })?;
        if server {
            params
                .subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        } else {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca, &self.ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// With `proxy.tls_client_ca_path`, the data listener serves only clients with a certificate
/// that CA signed: none, or one from another CA, fails the handshake; the admin listener still
/// answers probes without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_good_certificate() -> Result<()> {
    let dir = TempDir::new("mtls")?;
    let (pki, stranger) = (Pki::new("switchyard test CA")?, Pki::new("another CA")?);
    let (cert, key) = pki.issue(true)?;
    let paths = ["cert.pem", "key.pem", "clients.pem"].map(|f| dir.path.join(f));
    std::fs::write(&paths[0], cert)?;
    std::fs::write(&paths[1], key)?;
    std::fs::write(&paths[2], pki.ca.pem())?;
    let extra = format!(
        "[proxy]\ntls_cert_path = \"{}\"\ntls_key_path = \"{}\"\ntls_client_ca_path = \"{}\"\n",
        paths[0].display(),
        paths[1].display(),
        paths[2].display()
    );
    let env = Env::new(Backend::Sqlite, &["shared"], &extra).await?;
    env.control_json(&["init"])?;
    // Beyond loopback: client certificates are authentication enough to start.
    let proxy = env.proxy(&[("SWITCHYARD_PROXY_LISTEN", "0.0.0.0:0")])?;
    let data = proxy
        .data
        .trim_start_matches("http://")
        .replace("0.0.0.0", "127.0.0.1");
    let admin = proxy.admin.trim_start_matches("http://").to_owned();
    let ca = pki.ca.der().to_vec();
    wait_ready_over_tls(&proxy, &admin, &ca).await?;

    let tenant = Uuid::new_v4();
    let path = format!(
        "/v1/tenants/{tenant}/streams/Order/{}/events",
        Uuid::new_v4()
    );
    let body = serde_json::to_vec(&events_body(Some(0), 1, "OverMtls"))?;
    let foreign = stranger.issue(false)?;
    for (client, what) in [(None, "no certificate"), (Some(&foreign), "another CA's")] {
        let refused =
            tls_request(&data, &ca, client, false, Method::POST, &path, body.clone()).await;
        assert!(refused.is_err(), "{what}: {refused:?}");
    }
    assert_eq!(
        count_events(env.store_url("shared"), Some(tenant)).await?,
        0
    );
    let good = pki.issue(false)?;
    let (status, reply) =
        tls_request(&data, &ca, Some(&good), false, Method::POST, &path, body).await?;
    assert_eq!(status, StatusCode::CREATED, "{reply}");
    assert_eq!(
        count_events(env.store_url("shared"), Some(tenant)).await?,
        1
    );
    Ok(())
}

/// With `proxy.admin_token` set, every admin call but `/healthz`, `/readyz` and `/metrics`
/// needs it, reads included (the routing table lists tenant ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reads_need_the_token_when_one_is_set() -> Result<()> {
    let token = "admin-read-token";
    let extra = format!("[proxy]\nadmin_token = \"{token}\"\n");
    let (_env, proxy, http) = started(Backend::Sqlite, &["shared"], &extra, &[]).await?;
    let admin = &proxy.admin;
    let tenant = Uuid::new_v4();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let open = http.get(&format!("{admin}{path}")).await?;
        assert_eq!(open.status, StatusCode::OK, "{path}");
    }
    for (path, with_token) in [
        ("/admin/routes".to_owned(), StatusCode::OK),
        (format!("/admin/routes/{tenant}"), StatusCode::OK),
        (
            "/admin/routes/not-a-uuid".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        ("/admin/log-level".to_owned(), StatusCode::OK),
        ("/admin/nothing".to_owned(), StatusCode::NOT_FOUND),
    ] {
        let url = format!("{admin}{path}");
        for wrong in ["", "Bearer admin-read-tokeN", "admin-read-token"] {
            let headers: &[(&str, &str)] = if wrong.is_empty() {
                &[]
            } else {
                &[("authorization", wrong)]
            };
            let refused = http
                .request(Method::GET, &url, Bytes::new(), headers)
                .await?;
            assert_eq!(
                refused.status,
                StatusCode::UNAUTHORIZED,
                "GET {path} {wrong:?}"
            );
            assert_eq!(refused.json["error"], "unauthorized");
            assert!(!String::from_utf8_lossy(&refused.body).contains(&tenant.to_string()));
        }
        let bearer = format!("Bearer {token}");
        let allowed = http
            .request(
                Method::GET,
                &url,
                Bytes::new(),
                &[("authorization", bearer.as_str())],
            )
            .await?;
        assert_eq!(allowed.status, with_token, "GET {path}: {:?}", allowed.json);
    }
    Ok(())
}
