//! `switchyard-control demo`: the real binary, small numbers, on the embedded default and on
//! PostgreSQL; its summary must show a consistent migration with nothing lost or duplicated.

use std::process::{Command, Stdio};

use serde_json::Value;
use switchyard_tests::{bin, pg_admin_url, Result, TempDir};

/// Runs the demo in `cwd` with `args` and returns its `--json` summary.
fn demo(cwd: &std::path::Path, args: &[&str]) -> Result<Value> {
    let out = Command::new(bin("switchyard-control"))
        .current_dir(cwd)
        .args(["demo", "--json", "--events", "1500", "--writers", "2"])
        .args(args)
        .env_remove("SWITCHYARD_CONFIG")
        .stdin(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo exited {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status.code()
    );
    Ok(serde_json::from_str(&stdout)?)
}

fn check_summary(s: &Value) {
    assert_eq!(s["ok"], true, "{s:#}");
    assert_eq!(s["lost"], 0, "{s:#}");
    assert_eq!(s["duplicated"], 0, "{s:#}");
    assert_eq!(s["verification"]["consistent"], true, "{s:#}");
    assert_eq!(
        s["verification"]["streams"], s["verification"]["streams_consistent"],
        "{s:#}"
    );
    assert_eq!(s["cutover"]["success"], true, "{s:#}");
    assert_eq!(s["cutover"]["state"], "migrated", "{s:#}");
    let n = |k: &str| s[k].as_i64().unwrap_or(-1);
    assert!(
        n("events_copied") >= 1500,
        "copied fewer than seeded: {s:#}"
    );
    assert!(
        n("appends_acknowledged") > 0,
        "the writers wrote nothing: {s:#}"
    );
    assert!(
        n("appends_on_target") > 0,
        "no acknowledged append landed on the target after the cutover: {s:#}"
    );
    // Everything expected is there, and nothing else: seeded + acknowledged = present.
    assert_eq!(
        n("expected_events"),
        1500 + n("appends_acknowledged"),
        "{s:#}"
    );
    assert_eq!(n("target_events"), n("expected_events"), "{s:#}");
    assert!(s["writer_pause_longest_ms"].as_f64().is_some(), "{s:#}");
}

#[test]
fn demo_on_the_embedded_default_loses_and_duplicates_nothing() -> Result<()> {
    let dir = TempDir::new("demo")?;
    let summary = demo(&dir.path, &[])?;
    check_summary(&summary);
    assert_eq!(summary["backend"], "sqlite");
    // Without --keep the demo's files are gone, and so is the folder it made.
    assert!(
        !dir.path.join("switchyard-data").exists(),
        "the demo left its data behind"
    );
    Ok(())
}

#[test]
fn demo_on_postgresql_with_store_url_drops_its_databases() -> Result<()> {
    let dir = TempDir::new("demo-pg")?;
    let summary = demo(&dir.path, &["--store-url", &pg_admin_url()])?;
    check_summary(&summary);
    assert_eq!(summary["backend"], "postgres");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let left: i64 = rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&pg_admin_url()).await?;
        let names = summary["data"].as_str().unwrap_or_default().to_owned();
        let first = names.split(", ").next().unwrap_or_default().to_owned();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(first)
            .fetch_one(&mut conn)
            .await?;
        Ok::<_, anyhow::Error>(n)
    })?;
    assert_eq!(left, 0, "the demo's databases were not dropped");
    Ok(())
}
