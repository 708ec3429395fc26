//! The Python adapter (clients/python, `switchyard-eventsource`) against the real proxy on
//! PostgreSQL and on SQLite: eventsource-py 0.15.1's five store conformance suites, retries
//! with the same event ids, and (PostgreSQL) interop both ways with eventsource-py's own
//! `PostgreSQLEventStore` on the store behind the proxy; and an application on the adapter that
//! keeps appending and reading while its tenant is migrated and cut over.
//!
//! Creates a virtualenv under `target/python-venv` on first run (pip from PyPI) and reuses it
//! while `clients/python/pyproject.toml` is unchanged. Needs Python 3.13 (`SWITCHYARD_PYTHON`,
//! else `python3.13` on PATH, else pyenv's 3.13): without it the test fails, never skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use switchyard_tests::{started, Backend, Result};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// A Python 3.13 interpreter, or an error saying where it was looked for.
fn python313() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(path) = std::env::var("SWITCHYARD_PYTHON") {
        candidates.push(path.into());
    }
    candidates.push("python3.13".into());
    if let Some(home) = std::env::var_os("HOME") {
        let versions = Path::new(&home).join(".pyenv/versions");
        if let Ok(entries) = std::fs::read_dir(&versions) {
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("3.13"))
                })
                .map(|p| p.join("bin/python"))
                .collect();
            found.sort();
            candidates.extend(found);
        }
    }
    for candidate in &candidates {
        let version = Command::new(candidate)
            .args(["-c", "import sys; print(sys.version_info[:2] == (3, 13))"])
            .output();
        if version.is_ok_and(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "True"
        }) {
            return Ok(candidate.clone());
        }
    }
    bail!("Python 3.13 not found (tried {candidates:?}); eventsource-py 0.15.1 needs it: install it or set SWITCHYARD_PYTHON")
}

fn run(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{command:?} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

/// The cached virtualenv with the package and its test dependencies installed.
fn venv() -> Result<PathBuf> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from);
    let venv = target.join("python-venv");
    let package = repo().join("clients/python");
    let stamp = venv.join("switchyard-stamp");
    let wanted = std::fs::read_to_string(package.join("pyproject.toml"))?;
    // nextest runs each test in its own process: the first to get here builds the
    // environment, the others wait on the lock and then find the stamp.
    std::fs::create_dir_all(&target)?;
    let lock = std::fs::File::create(target.join("python-venv.lock"))?;
    lock.lock()?;
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&venv);
        run(Command::new(python313()?).arg("-m").arg("venv").arg(&venv))?;
        run(Command::new(venv.join("bin/python"))
            .args(["-m", "pip", "install", "--quiet", "--editable"])
            .arg(format!("{}[test]", package.display())))?;
        std::fs::write(&stamp, wanted)?;
    }
    Ok(venv.join("bin/python"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventsource_py_conformance_and_interop_pass_through_the_proxy() -> Result<()> {
    let python = venv()?;
    for backend in Backend::ALL {
        let (env, proxy, _http) = started(backend, &["shared"], "", &[]).await?;
        let mut files = vec![
            "tests/test_conformance.py",
            "tests/test_retries.py",
            "tests/test_positions.py",
        ];
        if backend == Backend::Postgres {
            files.push("tests/test_interop.py");
        }
        let out = Command::new(&python)
            .current_dir(repo().join("clients/python"))
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA"])
            .args(&files)
            .env("SWITCHYARD_URL", &proxy.data)
            .env("SWITCHYARD_STORE_URL", env.store_url("shared"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!(
            "{backend:?}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "pytest failed on {backend:?}; proxy log:\n{}",
            proxy.log()
        );
        assert!(
            !text.contains("skipped"),
            "pytest skipped tests on {backend:?}"
        );
    }
    Ok(())
}

/// An application on the adapter keeps appending and reading while its tenant is migrated to
/// another store and cut over (`clients/python/tests/test_migration_app.py`): no error reaches
/// it and every acknowledged append is there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_on_the_adapter_runs_through_its_tenants_migration() -> Result<()> {
    use std::time::Duration;
    use switchyard_tests::{tenant_events, wait_for_every, ServeProcess};

    let python = venv()?;
    let (env, proxy, _http) = started(Backend::Postgres, &["shared", "dedicated"], "", &[]).await?;
    let tenant = uuid::Uuid::new_v4();
    let (ready, stop) = (env.dir.path.join("ready"), env.dir.path.join("stop"));
    let app = Command::new(&python)
        .current_dir(repo().join("clients/python"))
        .args([
            "-m",
            "pytest",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "tests/test_migration_app.py",
        ])
        .env("SWITCHYARD_URL", &proxy.data)
        .env("SWITCHYARD_TENANT", tenant.to_string())
        .env("SWITCHYARD_READY_FILE", &ready)
        .env("SWITCHYARD_STOP_FILE", &stop)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let appending = wait_for_every(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async { Ok(ready.exists()) },
    )
    .await;
    let result = async {
        appending?;
        let _serve = ServeProcess::spawn(&env.config_path, "w", &[])?;
        let started = env.control_json(&[
            "migrate",
            "start",
            "--tenant",
            &tenant.to_string(),
            "--to",
            "dedicated",
            "--cutover",
            "auto",
            "--detach",
        ])?;
        let id = started["id"].as_str().unwrap_or_default().to_owned();
        wait_for_every(
            Duration::from_secs(120),
            Duration::from_millis(250),
            || async { Ok(env.control_json(&["status", &id])?["state"] == "migrated") },
        )
        .await
        .with_context(|| format!("status {:?}", env.control_json(&["status", &id])))?;
        // More appends after the cutover, into the target.
        let at_cutover = tenant_events(env.store_url("dedicated"), tenant)
            .await?
            .len();
        wait_for_every(
            Duration::from_secs(60),
            Duration::from_millis(100),
            || async {
                Ok(tenant_events(env.store_url("dedicated"), tenant)
                    .await?
                    .len()
                    >= at_cutover + 20)
            },
        )
        .await?;
        anyhow::Ok(())
    }
    .await;
    std::fs::write(&stop, "stop")?;
    let out = app.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    result.with_context(|| text.clone())?;
    assert!(
        out.status.success(),
        "the application failed:\n{text}\nproxy log:\n{}",
        proxy.log()
    );
    Ok(())
}
