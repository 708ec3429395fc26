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
