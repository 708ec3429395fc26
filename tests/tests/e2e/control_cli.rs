//! The operator CLI as a process: exit codes (0 ok, 1 refused or failed, 2 usage), config
//! checking, store checks, and routing by hand.

use switchyard_tests::{bin, run_control, Backend, Env, Result};
use uuid::Uuid;

#[test]
fn every_command_has_help() -> Result<()> {
    for args in [
        vec!["--help"],
        vec!["init", "--help"],
        vec!["check-config", "--help"],
        vec!["stores", "list", "--help"],
        vec!["stores", "check", "--help"],
        vec!["routing", "get", "--help"],
        vec!["routing", "set", "--help"],
        vec!["routing", "set-default", "--help"],
        vec!["complete", "--help"],
        vec!["cleanup", "--help"],
    ] {
        let out = std::process::Command::new(bin("switchyard-control"))
            .args(&args)
            .output()?;
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
    let out = std::process::Command::new(bin("switchyard-control"))
        .args(["routing", "set", "not-a-uuid", "x"])
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed argument is a usage error"
    );
    let out = std::process::Command::new(bin("switchyard-proxy"))
        .arg("--version")
        .output()?;
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_says_what_is_wrong() -> Result<()> {
    let env = Env::new(Backend::Sqlite, &["shared", "dedicated"], "").await?;
    let ok = env.control_json(&["check-config"])?;
    assert_eq!(ok["valid"], true);
    assert_eq!(ok["stores"], 2);

    let bad = env.dir.path.join("bad.toml");
    for (text, needle) in [
        (
            "[proxy]\nlisten_adress = \"127.0.0.1:1\"\n",
            "listen_adress",
        ),
        ("default_store = \"nowhere\"\n", "nowhere"),
        ("[control]\nbatch_size = \"many\"\n", "batch_size"),
        (
            "[[stores]]\nid = \"a\"\nurl = \"mysql://root:hunter2@db/x\"\n",
            "unsupported",
        ),
    ] {
        std::fs::write(&bad, text)?;
        let out = run_control(
            &env.config_path,
            &["check-config", bad.to_str().unwrap_or_default()],
            &[],
        )?;
        assert_eq!(out.code, 1, "{text}");
        assert!(out.stderr.contains(needle), "{text}: {}", out.stderr);
        assert!(
            !out.stderr.contains("hunter2"),
            "secrets stay out of errors"
        );
        // Any other command with a bad config is a usage error.
        let out = run_control(&bad, &["stores", "list"], &[])?;
        assert_eq!(out.code, 2, "{text}: {}", out.stderr);
    }
    let out = run_control(
        &env.config_path,
        &["stores", "list"],
        &[("SWITCHYARD_PROXY_GATE_WAIT", "5")],
    )?;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("SWITCHYARD_PROXY_GATE_WAIT"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_check_finds_an_unreachable_store() -> Result<()> {
    let extra = "[[stores]]\nid = \"gone\"\nurl = \"postgres://postgres:pw-never-shown@127.0.0.1:1/nothing\"\n";
    let env = Env::new(Backend::Postgres, &["shared"], extra).await?;
    let out = env.control(&["init", "--store", "shared"])?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list = env.control_json(&["stores", "list"])?;
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    assert_eq!(list[0]["default"], true);
    let out = env.control(&["--json", "stores", "check"])?;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("gone"), "{}", out.stderr);
    assert!(!out.stdout.contains("pw-never-shown") && !out.stderr.contains("pw-never-shown"));
    let report: serde_json::Value = serde_json::from_str(
        out.stdout
            .lines()
            .take_while(|l| !l.starts_with("{\"error\""))
            .collect::<Vec<_>>()
            .join("\n")
            .as_str(),
    )?;
    assert_eq!(report[0]["reachable"], true);
    assert_eq!(report[1]["reachable"], false);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_by_hand() -> Result<()> {
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    env.control_json(&["init"])?;
    let tenant = Uuid::new_v4().to_string();
    let shown = env.control_json(&["routing", "get", &tenant])?;
    assert_eq!(shown["store_id"], "shared");
    assert_eq!(shown["has_row"], false);

    let out = env.control(&["routing", "set", &tenant, "nowhere"])?;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("nowhere") && out.stderr.contains("dedicated"),
        "{}",
        out.stderr
    );

    env.control_json(&["routing", "set", &tenant, "dedicated"])?;
    let shown = env.control_json(&["routing", "get", &tenant])?;
    assert_eq!(shown["store_id"], "dedicated");
    assert_eq!(shown["migration_state"], "normal");
    assert_eq!(shown["epoch"], 1);
    let all = env.control_json(&["routing", "get"])?;
    assert_eq!(all.as_array().map(Vec::len), Some(1));
    Ok(())
}

/// Puts a moved fence for `tenant` into a store, as a cutover away from it leaves.
async fn moved_fence(env: &Env, store: &str, tenant: Uuid) -> Result<()> {
    use sqlx::Connection;
    let url = env.store_url(store);
    match env.backend {
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(url).await?;
            sqlx::query(
                "INSERT INTO switchyard_fences (tenant_id, state, epoch, moved_to, updated_at)
                 VALUES ($1, 'moved', 1, 'dedicated', now())",
            )
            .bind(tenant)
            .execute(&mut c)
            .await?;
        }
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(url).await?;
            sqlx::query(
                "INSERT INTO switchyard_fences (tenant_id, state, epoch, moved_to, updated_at)
                 VALUES (?1, 'moved', 1, 'dedicated', '2026-01-01T00:00:00Z')",
            )
            .bind(tenant.to_string())
            .execute(&mut c)
            .await?;
        }
    }
    Ok(())
}

async fn fence_state(env: &Env, store: &str, tenant: Uuid) -> Result<Option<String>> {
    let store = switchyard_store::EventStore::connect(store, env.store_url(store), 1)?;
    let state = store.fence(tenant).await?.map(|(state, _)| state);
    store.close().await;
    Ok(state)
}

/// Issue 14 item 11: `routing set` is refused while the tenant has any migration that is not
/// over — a pending one too, which has no routing row yet (the old check looked at the
/// routing state only) — and allowed again once it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_set_is_refused_while_any_migration_of_the_tenant_is_not_over() -> Result<()> {
    for backend in Backend::ALL {
        let env = Env::new(backend, &["shared", "dedicated"], "").await?;
        env.control_json(&["init"])?;
        let tenant = Uuid::new_v4().to_string();
        let started = env.control_json(&[
            "migrate",
            "start",
            "--tenant",
            &tenant,
            "--to",
            "dedicated",
            "--detach",
        ])?;
        assert_eq!(started["state"], "pending", "{backend:?}: no serve runs it");
        let id = started["id"].as_str().unwrap_or_default().to_owned();
        let out = env.control(&["routing", "set", &tenant, "dedicated"])?;
        assert_eq!(out.code, 1, "{backend:?}: {}{}", out.stdout, out.stderr);
        assert!(out.stderr.contains(&id), "{backend:?}: {}", out.stderr);
        let shown = env.control_json(&["routing", "get", &tenant])?;
        assert_eq!(shown["has_row"], false, "{backend:?}: nothing was written");

        env.control_json(&["abort", &id, "--reason", "test"])?;
        env.control_json(&["routing", "set", &tenant, "dedicated"])?;
        let shown = env.control_json(&["routing", "get", &tenant])?;
        assert_eq!(shown["store_id"], "dedicated", "{backend:?}");
    }
    Ok(())
}

/// Issue 14 item 11: starting a migration never reopens a moved source fence (the tenant's
/// writes left that store; reopening it lets appends land where nothing reads them). The
/// migration fails before copying, saying why, and the fence stays moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_a_migration_never_reopens_a_moved_source_fence() -> Result<()> {
    for backend in Backend::ALL {
        let env = Env::new(backend, &["shared", "dedicated"], "").await?;
        env.control_json(&["init"])?;
        let tenant = Uuid::new_v4();
        moved_fence(&env, "shared", tenant).await?;
        let out = env.control(&[
            "--json",
            "migrate",
            "start",
            "--tenant",
            &tenant.to_string(),
            "--to",
            "dedicated",
        ])?;
        assert_eq!(out.code, 1, "{backend:?}: {}{}", out.stdout, out.stderr);
        assert!(out.stderr.contains("moved"), "{backend:?}: {}", out.stderr);
        assert_eq!(
            fence_state(&env, "shared", tenant).await?.as_deref(),
            Some("moved"),
            "{backend:?}: the source fence stays moved"
        );
        let listed = env.control_json(&["list"])?;
        let record = listed
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or_default();
        assert_eq!(record["state"], "failed", "{backend:?}: {listed}");
    }
    Ok(())
}

/// Issue 14 item 12: the default store is recorded in the control database by `init`; a
/// process whose config names another default refuses to start (control commands, `init`,
/// the proxy) and says why; `routing set-default` changes it, refused while a tenant without
/// a routing row has a migration that is not over, and a running proxy follows the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_store_is_recorded_once_and_every_process_agrees_on_it() -> Result<()> {
    let env = Env::new(
        Backend::Postgres,
        &["shared", "dedicated"],
        "[proxy]\nrouting_poll_ms = 200\n",
    )
    .await?;
    let init = env.control_json(&["init"])?;
    assert_eq!(init["default_store"], "shared", "{init}");
    let text = std::fs::read_to_string(&env.config_path)?;
    let other = env.dir.path.join("other-default.toml");
    std::fs::write(
        &other,
        text.replace(
            "default_store = \"shared\"",
            "default_store = \"dedicated\"",
        ),
    )?;

    // Another default: refused everywhere, with the reason.
    let tenant = Uuid::new_v4().to_string();
    for args in [vec!["init"], vec!["routing", "get", &tenant]] {
        let out = run_control(&other, &args, &[])?;
        assert_eq!(out.code, 1, "{args:?}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stderr.contains("records \"shared\""),
            "{args:?}: {}",
            out.stderr
        );
    }
    let refused = switchyard_tests::ProxyProcess::spawn(&other, &[])
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(
        refused.contains("records \"shared\""),
        "the proxy refuses to start: {refused:?}"
    );

    // A proxy on the recorded default; a row-less tenant's append lands there.
    let proxy = env.proxy(&[])?;
    let http = switchyard_tests::Http::new();
    proxy.wait_ready(&http).await?;
    let append = |tenant: Uuid| {
        let http = http.clone();
        let url = switchyard_tests::stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
        async move {
            let reply = http
                .post(&url, &switchyard_tests::events_body(Some(0), 1, "E"))
                .await?;
            anyhow::ensure!(reply.status == 201, "{:?}", reply.json);
            Ok(reply.json["store_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned())
        }
    };
    assert_eq!(append(Uuid::new_v4()).await?, "shared");

    // Not while a row-less tenant has a migration that is not over.
    let pending = env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &Uuid::new_v4().to_string(),
        "--to",
        "dedicated",
        "--detach",
    ])?;
    let pending_id = pending["id"].as_str().unwrap_or_default().to_owned();
    let out = env.control(&["routing", "set-default", "dedicated"])?;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains(&pending_id), "{}", out.stderr);
    env.control_json(&["abort", &pending_id, "--reason", "test"])?;

    let changed = env.control_json(&["routing", "set-default", "dedicated"])?;
    assert_eq!(changed["previous"], "shared", "{changed}");
    // The running proxy follows the control database, not its config.
    switchyard_tests::wait_for(std::time::Duration::from_secs(10), || async {
        Ok(append(Uuid::new_v4()).await? == "dedicated")
    })
    .await?;
    // Now the old config is the one refused, and the new one works.
    let out = run_control(&env.config_path, &["routing", "get", &tenant], &[])?;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("records \"dedicated\""),
        "{}",
        out.stderr
    );
    let out = run_control(&other, &["--json", "routing", "get", &tenant], &[])?;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("\"dedicated\""), "{}", out.stdout);
    assert!(switchyard_tests::ProxyProcess::spawn(&env.config_path, &[]).is_err());
    Ok(())
}
