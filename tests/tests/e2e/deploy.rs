//! The operator's view of real processes (issue 8): the metrics both admin ports export move
//! as documented while a migration and its cutover run, every metric the Prometheus rules and
//! the Grafana dashboard use is in a real scrape (and documented in docs/metrics.md), the
//! scrapes pass `promtool check metrics`, and logging is operable: JSON lines, request ids,
//! runtime level changes behind the admin token, no secrets or payloads at info.
//!
//! promtool comes from scripts/ensure-tools.sh (run by scripts/test.sh).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_tests::{
    bin, events_body, run_control, seed_sql, stream_url, wait_for, Backend, Env, Http, Result,
    ServeProcess, Writers,
};
use uuid::Uuid;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// One scrape, parsed: metric families with their types, and samples.
#[derive(Debug, Default)]
struct Scrape {
    text: String,
    types: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut scrape = Self {
            text: text.to_owned(),
            ..Self::default()
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    scrape.types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or((line, "NaN"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                .collect();
            scrape
                .samples
                .push((name.to_owned(), labels, value.parse().unwrap_or(f64::NAN)));
        }
        scrape
    }

    /// The sum of `name`'s samples whose labels include `labels`; `None` when there is none.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }
}

async fn scrape(http: &Http, admin: &str) -> Result<Scrape> {
    let reply = http.get(&format!("{admin}/metrics")).await?;
    anyhow::ensure!(reply.status == 200, "scrape of {admin}: {}", reply.status);
    let content_type = reply
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    anyhow::ensure!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    Ok(Scrape::parse(&String::from_utf8(reply.body.to_vec())?))
}

/// Scrapes `admin` every 50 ms until `done` holds; returns that scrape.
async fn poll_scrape(
    http: &Http,
    admin: &str,
    timeout: Duration,
    done: impl Fn(&Scrape) -> bool,
) -> Result<Scrape> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = scrape(http, admin).await?;
        if done(&s) {
            return Ok(s);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{admin}/metrics did not reach the expected state in {timeout:?}:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `promtool check metrics` on a scrape: exposition format and naming conventions.
fn promtool_check(scrape: &Scrape, what: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("promtool not runnable ({e}): run scripts/ensure-tools.sh"))?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(scrape.text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "promtool check metrics on the {what} scrape: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Metric family names (`switchyard_…`, histogram suffixes folded) used by the rules and the
/// dashboard.
fn metrics_used() -> Result<BTreeSet<String>> {
    let mut used = BTreeSet::new();
    for file in [
        "deploy/prometheus/rules.yaml",
        "deploy/grafana/switchyard.json",
    ] {
        let text = std::fs::read_to_string(format!("{REPO}/{file}"))?;
        let mut rest = text.as_str();
        while let Some(start) = rest.find("switchyard_") {
            let preceded = rest[..start]
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == ':' || c == '_');
            let tail = &rest[start..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            if !preceded {
                used.insert(tail[..end].to_owned());
            }
            rest = &tail[end..];
        }
    }
    Ok(used)
}

fn family_of(name: &str, types: &BTreeMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| t == "histogram") {
                return base.to_owned();
            }
        }
    }
    name.to_owned()
}

/// A 20,000-event tenant migrated at 4,000 events/s with writers on the proxy, then two
/// cutovers whose control process dies with the gates closed: the copy counter grows, the lag
/// falls to 0, the progress ratio passes between 0 and 1, mirror writes land, writers wait at
/// the gate (the gauge rises), serve's recoveries are counted by outcome, the proxy ends on
/// the control database's routing epoch — and every metric the rules and dashboard use was in
/// one of the scrapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_documented_while_a_migration_runs() -> Result<()> {
    let env = Env::new(
        Backend::Postgres,
        &["shared", "dedicated"],
        "[proxy]\nrouting_poll_ms = 100\ngate_wait_ms = 10000\n[control]\ncutover_timeout_ms = 500\n",
    )
    .await?;
    env.control_json(&["init"])?;
    let tenant = Uuid::new_v4();
    seed_sql(env.store_url("shared"), tenant, 20_000).await?;
    let http = Http::new();
    let proxy = env.proxy(&[])?;
    proxy.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "metrics", &[])?;
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut remember = |s: &Scrape| {
        for (name, kind) in &s.types {
            seen.insert(name.clone(), kind.clone());
        }
        for (name, _, _) in &s.samples {
            seen.entry(name.clone()).or_default();
        }
    };

    let before = scrape(&http, &serve.admin).await?;
    remember(&before);
    assert_eq!(
        before.value("switchyard_control_copy_events_total", &[]),
        Some(0.0)
    );
    assert_eq!(before.value("switchyard_control_up", &[]), Some(1.0));
    assert_eq!(
        before.value(
            "switchyard_build_info",
            &[
                ("program", "switchyard-control"),
                ("version", env!("CARGO_PKG_VERSION")),
                (
                    "commit",
                    option_env!("SWITCHYARD_GIT_COMMIT").unwrap_or("unknown")
                ),
            ]
        ),
        Some(1.0)
    );

    let writers = Writers::start(
        &http,
        std::slice::from_ref(&proxy.data),
        tenant,
        2,
        2,
        Duration::from_millis(10),
    );
    let started = env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        "dedicated",
        "--batch-size",
        "1000",
        "--max-rate",
        "4000",
        "--detach",
    ])?;
    let id = started["id"].as_str().unwrap_or_default().to_owned();
    let labels = [("migration_id", id.as_str())];

    // The bulk copy to dual_write with lag 0, scraped every 100 ms.
    let mut copied = Vec::new();
    let mut lags = Vec::new();
    let mut progress = Vec::new();
    let mut states = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = scrape(&http, &serve.admin).await?;
        remember(&s);
        copied.push(
            s.value("switchyard_control_copy_events_total", &[])
                .unwrap_or(0.0),
        );
        if let Some(lag) = s.value("switchyard_control_migration_lag_events", &labels) {
            lags.push(lag);
        }
        if let Some(p) = s.value("switchyard_control_copy_progress_ratio", &labels) {
            progress.push(p);
        }
        for (name, l, v) in &s.samples {
            if name == "switchyard_control_migration_info" && l.get("migration_id") == Some(&id) {
                assert_eq!(*v, 1.0);
                states.insert(l.get("state").cloned().unwrap_or_default());
            }
        }
        if states.contains("dual_write") && lags.last() == Some(&0.0) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no dual_write with lag 0 after 60 s: lags {lags:?}; serve log:\n{}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let growing = copied.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        growing >= 3,
        "the copy counter grew across {growing} scrapes: {copied:?}"
    );
    assert!(
        copied.last().copied().unwrap_or(0.0) >= 20_000.0,
        "{copied:?}"
    );
    assert!(
        lags.first().copied().unwrap_or(0.0) >= 5_000.0,
        "the lag starts near the tenant's size: {lags:?}"
    );
    assert!(
        lags.windows(2).filter(|w| w[1] < w[0]).count() >= 3,
        "the lag fell step by step: {lags:?}"
    );
    assert!(
        progress.iter().any(|p| *p > 0.0 && *p < 1.0),
        "progress between 0 and 1 was seen: {progress:?}"
    );
    assert!(states.contains("bulk_copy"), "{states:?}");
    poll_scrape(&http, &proxy.admin, Duration::from_secs(10), |s| {
        s.value("switchyard_proxy_mirror_writes_total", &[("outcome", "ok")])
            .unwrap_or(0.0)
            > 0.0
    })
    .await?;

    // Two cutovers whose control process dies (as kill -9 would) with the gates closed: the
    // writers wait at the gate until serve recovers the abandoned cutover — rolled back when
    // the fence had not moved yet, finished when it had.
    for (crash_at, outcome) in [
        ("after_gate_closed", "rolled_back"),
        ("after_fence", "migrated"),
    ] {
        let out = run_control(
            &env.config_path,
            &["cutover", &id],
            &[("SWITCHYARD_CRASH_AT", crash_at)],
        )?;
        assert_ne!(out.code, 0, "the control process died: {}", out.stderr);
        // Held at the gate; once the fence has moved, an append that meets it follows it to
        // the target instead (issue 17), so writers need not wait for the recovery at all.
        poll_scrape(&http, &proxy.admin, Duration::from_secs(10), |s| {
            s.value("switchyard_proxy_gate_writers", &[]).unwrap_or(0.0) >= 1.0
                || (crash_at == "after_fence"
                    && s.value("switchyard_proxy_appends_followed_total", &[])
                        .unwrap_or(0.0)
                        > 0.0)
        })
        .await?;
        let recovered = poll_scrape(&http, &serve.admin, Duration::from_secs(20), |s| {
            s.value("switchyard_control_cutovers_total", &[("outcome", outcome)]) == Some(1.0)
        })
        .await?;
        remember(&recovered);
        if outcome == "rolled_back" {
            wait_for(Duration::from_secs(5), || async {
                Ok(env.control_json(&["status", &id])?["state"] == "dual_write")
            })
            .await?;
        }
    }
    let last = poll_scrape(&http, &serve.admin, Duration::from_secs(5), |s| {
        s.value("switchyard_control_migrations", &[("state", "migrated")]) == Some(1.0)
    })
    .await?;
    remember(&last);
    // Reverse replication (the default) keeps the store the tenant left current: serve's
    // reverse tail reports its lag per tenant.
    let reversing = poll_scrape(&http, &serve.admin, Duration::from_secs(20), |s| {
        s.value(
            "switchyard_control_reverse_lag_events",
            &[("tenant", &tenant.to_string())],
        )
        .is_some()
    })
    .await?;
    remember(&reversing);
    let control_epoch = last
        .value("switchyard_control_routing_epoch", &[])
        .unwrap_or(0.0);
    assert!(control_epoch > 0.0);
    let _ = writers.stop().await?;

    let proxy_last = poll_scrape(&http, &proxy.admin, Duration::from_secs(5), |s| {
        s.value("switchyard_proxy_routing_epoch", &[]) >= Some(control_epoch)
    })
    .await?;
    remember(&proxy_last);
    assert_eq!(
        proxy_last.value("switchyard_proxy_gate_writers", &[]),
        Some(0.0)
    );
    assert!(
        proxy_last
            .value("switchyard_proxy_gate_wait_seconds_count", &[])
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        proxy_last
            .value(
                "switchyard_proxy_requests_total",
                &[("operation", "append"), ("outcome", "ok")]
            )
            .unwrap_or(0.0)
            > 0.0
    );
    assert_eq!(
        proxy_last.value(
            "switchyard_build_info",
            &[
                ("program", "switchyard-proxy"),
                ("version", env!("CARGO_PKG_VERSION"))
            ]
        ),
        Some(1.0)
    );
    promtool_check(&proxy_last, "proxy")?;
    promtool_check(&last, "serve")?;

    // Every metric the rules and the dashboard use was scraped, and every scraped family is
    // documented.
    let missing: Vec<String> = metrics_used()?
        .into_iter()
        .map(|name| family_of(&name, &seen))
        .filter(|name| !seen.contains_key(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "used by deploy/prometheus or deploy/grafana but never scraped: {missing:?}"
    );
    let doc = std::fs::read_to_string(format!("{REPO}/docs/metrics.md"))?;
    let undocumented: Vec<&String> = seen
        .iter()
        .filter(|(name, kind)| !kind.is_empty() && !doc.contains(&format!("`{name}`")))
        .map(|(name, _)| name)
        .collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/metrics.md: {undocumented:?}"
    );
    Ok(())
}

/// `--version`, JSON logs with the request id, runtime log-level changes behind the admin
/// token on both admin ports, and no secret or payload in the logs at info.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_structured_and_their_level_changes_at_run_time() -> Result<()> {
    for program in ["switchyard-proxy", "switchyard-control"] {
        let out = Command::new(bin(program)).arg("--version").output()?;
        assert!(out.status.success());
        // The tests' build of switchyard-control carries the fault-injection mark (a release
        // build has none: `control/src/fault.rs`).
        let version = String::from_utf8(out.stdout)?;
        let expected = format!("{program} {}", env!("CARGO_PKG_VERSION"));
        assert!(
            version.trim() == expected || version.trim() == format!("{expected} (fault-injection)"),
            "{version}"
        );
    }
    // PostgreSQL trusts the test user, so a password in the URL is accepted and ignored: it
    // stands for a real secret that must never reach the logs.
    let secret = "s3cret-Pw-7f1c";
    let token = "adm1n-t0ken-9d2e";
    let env = Env::new(
        Backend::Postgres,
        &["shared"],
        "[proxy]\nadmin_token = \"${SY_TEST_ADMIN_TOKEN}\"\n[control]\nadmin_token = \"${SY_TEST_ADMIN_TOKEN}\"\n",
    )
    .await?;
    let with_password = std::fs::read_to_string(&env.config_path)?.replace(
        "postgres://postgres@",
        &format!("postgres://postgres:{secret}@"),
    );
    anyhow::ensure!(
        with_password.contains(secret),
        "the test needs a URL to put a password in"
    );
    std::fs::write(&env.config_path, with_password)?;
    let vars = [
        ("SY_TEST_ADMIN_TOKEN", token),
        ("SWITCHYARD_LOG_FORMAT", "json"),
    ];
    let init = run_control(&env.config_path, &["init"], &vars)?;
    assert_eq!(init.code, 0, "{}", init.stderr);
    let http = Http::new();
    let proxy = env.proxy(&vars)?;
    proxy.wait_ready(&http).await?;
    let serve = ServeProcess::spawn(&env.config_path, "logs", &vars)?;

    let tenant = Uuid::new_v4();
    let marker = "PAYLOAD-MARKER-31337";
    let append = |request_id: &'static str| {
        let http = http.clone();
        let url = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
        async move {
            let body = serde_json::json!({"expected_version": 0, "events": [
                {"event_type": "Placed", "payload": {"secret_note": marker}}]});
            http.request(
                http::Method::POST,
                &url,
                serde_json::to_vec(&body)?,
                &[("x-request-id", request_id)],
            )
            .await
        }
    };
    let reply = append("req-info-1").await?;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.headers["x-request-id"], "req-info-1");
    // Without one, the proxy makes one up and returns it.
    let reply = http
        .post(
            &stream_url(&proxy.data, tenant, "Order", Uuid::new_v4()),
            &events_body(Some(0), 1, "E"),
        )
        .await?;
    let generated = reply.headers["x-request-id"].to_str()?.to_owned();
    assert!(Uuid::parse_str(&generated).is_ok(), "{generated}");

    // Reading the level needs the token too on the proxy (every admin call but the probes').
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let level = |url: String| {
        let http = http.clone();
        async move {
            http.request(http::Method::GET, &url, Vec::new(), &auth)
                .await
        }
    };
    for admin in [&proxy.admin, &serve.admin] {
        let url = format!("{admin}/admin/log-level");
        let now = level(url.clone()).await?;
        assert_eq!(now.json["filter"], "info", "{admin}");
        for path in ["/admin/log-level", "/admin/nothing"] {
            let unread = http.get(&format!("{admin}{path}")).await?;
            assert_eq!(unread.status, 401, "GET {admin}{path} without the token");
            assert_eq!(unread.json["error"], "unauthorized", "{admin}{path}");
        }
        let body = br#"{"level":"debug"}"#.to_vec();
        let denied = http
            .request(http::Method::PUT, &url, body.clone(), &[])
            .await?;
        assert_eq!(denied.status, 401, "{admin}");
        let wrong = http
            .request(
                http::Method::PUT,
                &url,
                body.clone(),
                &[("authorization", "Bearer nope")],
            )
            .await?;
        assert_eq!(wrong.status, 401, "{admin}");
        let typo = http
            .request(
                http::Method::PUT,
                &url,
                br#"{"level":"debgu"}"#.to_vec(),
                &[("authorization", &format!("Bearer {token}"))],
            )
            .await?;
        assert_eq!(typo.status, 400, "{admin}");
        assert_eq!(level(url.clone()).await?.json["filter"], "info");
        let ok = http
            .request(
                http::Method::PUT,
                &url,
                body,
                &[("authorization", &format!("Bearer {token}"))],
            )
            .await?;
        assert_eq!(ok.status, 200, "{admin}: {:?}", ok.json);
        assert_eq!(level(url.clone()).await?.json["filter"], "debug");
    }
    let info_log = proxy.log();
    let reply = append("req-debug-2").await?;
    assert_eq!(reply.status, 201);
    let mut debug_line = None;
    wait_for(Duration::from_secs(3), || {
        let line = proxy
            .log()
            .lines()
            .find(|l| l.contains("req-debug-2") && l.contains("request done"))
            .map(str::to_owned);
        let found = line.is_some();
        debug_line = line.or(debug_line.take());
        async move { Ok(found) }
    })
    .await?;
    let line: serde_json::Value = serde_json::from_str(debug_line.as_deref().unwrap_or("{}"))?;
    assert_eq!(line["level"], "DEBUG");
    assert_eq!(line["span"]["request_id"], "req-debug-2");
    assert_eq!(line["span"]["route"], "append");
    assert_eq!(line["status"], 201);

    // At info: JSON lines only, no request-level chatter, no secret, no payload.
    let serve_log = serve.log();
    for (who, log) in [("proxy", &info_log), ("serve", &serve_log)] {
        assert!(!log.trim().is_empty(), "{who} logged nothing");
        for l in log.lines() {
            let parsed: serde_json::Value = serde_json::from_str(l)
                .map_err(|e| anyhow::anyhow!("{who}: not a JSON line ({e}): {l}"))?;
            assert!(parsed["level"].is_string(), "{l}");
        }
        assert!(!log.contains(secret), "{who} logged the store password");
        assert!(!log.contains(token), "{who} logged the admin token");
        assert!(!log.contains(marker), "{who} logged a payload at info");
        assert!(!log.contains("req-info-1"), "{who}: request lines at info");
    }
    let full = proxy.log();
    assert!(!full.contains(secret) && !full.contains(marker));
    Ok(())
}

/// The configs shipped in deploy/ are valid configs for the real binaries, with the
/// environment the manifests give them: the Kubernetes ConfigMap with the example Secret's
/// keys and the sidecar's overrides, and the compose file's config with its variables.
#[test]
fn the_shipped_configs_pass_check_config() -> Result<()> {
    let read = |path: &str| std::fs::read_to_string(format!("{REPO}/{path}"));
    // The ConfigMap's `switchyard.toml: |` block and the example Secret's stringData.
    let configmap = read("deploy/kubernetes/configmap.yaml")?;
    let toml: String = configmap
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("switchyard.toml: |"))
        .skip(1)
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l.trim())))
        .collect();
    anyhow::ensure!(toml.contains("[[stores]]"), "no config in the ConfigMap");
    let secret = read("deploy/kubernetes/secret.example.yaml")?;
    let mut vars: Vec<(String, String)> = secret
        .lines()
        .skip_while(|l| !l.starts_with("stringData:"))
        .skip(1)
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    anyhow::ensure!(vars.len() >= 3, "{vars:?}");
    vars.extend(
        [
            ("SWITCHYARD_PROXY_LISTEN", "127.0.0.1:7070"),
            ("SWITCHYARD_PROXY_ADMIN_LISTEN", "0.0.0.0:7071"),
            ("SWITCHYARD_PROXY_PROXY_ID", "orders-7d9f-abcde"),
            ("SWITCHYARD_CONTROL_ADMIN_LISTEN", "0.0.0.0:7072"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let dir = switchyard_tests::TempDir::new("deploy-config")?;
    let k8s = dir.path.join("k8s.toml");
    std::fs::write(&k8s, toml)?;
    let compose = std::path::PathBuf::from(format!("{REPO}/deploy/compose/switchyard.toml"));
    let compose_vars = [
        ("POSTGRES_PASSWORD", "switchyard-local"),
        ("ADMIN_TOKEN", "local-admin-token"),
    ];
    for (config, env) in [
        (
            &k8s,
            vars.iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
        ),
        (&compose, compose_vars.to_vec()),
    ] {
        let out = run_control(config, &["check-config"], &env)?;
        assert!(
            out.stdout.contains("admin_token = \"<redacted>\""),
            "{}",
            out.stdout
        );
        assert_eq!(
            out.code,
            0,
            "{}: {}{}",
            config.display(),
            out.stdout,
            out.stderr
        );
        let shown = &out.stdout;
        for (_, value) in &env {
            if value.starts_with("change-me") || value.contains("local") {
                assert!(!shown.contains(*value), "a secret is shown: {shown}");
            }
        }
        // Without the Secret's variables the config is refused, not silently empty.
        let bare = run_control(config, &["check-config"], &[])?;
        assert_ne!(bare.code, 0, "{}", bare.stdout);
    }
    Ok(())
}
