//! Every benchmark harness runs end to end on small sizes (`--smoke`), so the harnesses cannot
//! rot between benchmark runs. Nothing is timed here: each run must exit 0 and print its JSON
//! summary (with the harness's own checks — every acknowledged event in the target, the
//! verification naming the corrupted event, … — passed on the way).

use std::process::Command;

use serde_json::Value;
use switchyard_tests::{bin, pg_admin_url, Result};

fn smoke(name: &str, extra: &[&str]) -> Result<Value> {
    let mut command = Command::new(bin(name));
    command.args(["--smoke", "--pg-url", &pg_admin_url()]);
    command.args(extra);
    if matches!(name, "copy" | "cutover") {
        // The debug build's control binary, beside the test's (the harnesses default to the
        // release one).
        command.arg("--control-bin").arg(bin("switchyard-control"));
    }
    let out = command.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} --smoke failed: {stdout}\n{stderr}"
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow::anyhow!("{name} printed no JSON summary: {stdout}"))?;
    let summary: Value = serde_json::from_str(summary)?;
    assert_eq!(summary["bench"], name, "{summary}");
    assert!(
        stdout.contains("|---"),
        "{name} printed no Markdown table: {stdout}"
    );
    Ok(summary)
}

#[test]
fn copy_smoke() -> Result<()> {
    let s = smoke("copy", &[])?;
    assert!(s["runs"].as_array().is_some_and(|r| !r.is_empty()), "{s}");
    Ok(())
}

#[test]
fn verify_smoke() -> Result<()> {
    smoke("verify", &[]).map(drop)
}

#[test]
fn dual_write_smoke() -> Result<()> {
    let s = smoke("dual_write", &[])?;
    assert_eq!(s["mirror_writes_total"]["failed"], 0, "{s}");
    Ok(())
}

#[test]
fn append_overhead_smoke() -> Result<()> {
    for protocol in ["h1", "h2c"] {
        let s = smoke("append_overhead", &["--protocol", protocol])?;
        let expected = if protocol == "h1" { "http/1.1" } else { "h2c" };
        assert_eq!(s["protocol"], expected, "{s}");
        assert!(s["proxy"]["count"].as_u64().unwrap_or(0) > 0, "{s}");
    }
    Ok(())
}

#[test]
fn cutover_smoke() -> Result<()> {
    smoke("cutover", &[]).map(drop)
}

/// The open-loop (`--rate`) mode runs end to end and says so in its summary.
#[test]
fn cutover_smoke_with_a_paced_open_loop_load() -> Result<()> {
    let s = smoke("cutover", &["--rate", "200"])?;
    assert_eq!(s["load"]["open_loop_rate_per_s"], 200.0, "{s}");
    Ok(())
}

/// `--revert`: the second run undoes the first with `revert`, under the same load, and its
/// pause is reported apart; every acknowledged append is in the store the tenant went back to.
#[test]
fn cutover_smoke_with_a_revert() -> Result<()> {
    let s = smoke("cutover", &["--revert"])?;
    let runs = s["per_run"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    assert_eq!(runs.len(), 2, "{s}");
    assert_eq!(runs[1]["direction"], "dedicated→shared (revert)", "{s}");
    assert_eq!(runs[1]["cutover"]["success"], true, "{s}");
    assert_eq!(
        (
            runs[1]["lost"].as_u64(),
            runs[1]["duplicated_in_target"].as_u64()
        ),
        (Some(0), Some(0)),
        "{s}"
    );
    assert!(runs[1]["acked"].as_u64().unwrap_or(0) > 0, "{s}");
    assert_eq!(
        s["revert_pause_ms"]["values"].as_array().map(Vec::len),
        Some(1),
        "{s}"
    );
    Ok(())
}

#[test]
fn fairness_smoke() -> Result<()> {
    let s = smoke("fairness", &[])?;
    assert!(s["cutover"]["count"].as_u64().unwrap_or(0) > 0, "{s}");
    Ok(())
}
