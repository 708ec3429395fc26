//! The real binaries as processes: `switchyard-proxy` ([`ProxyProcess`]) and
//! `switchyard-control serve` ([`ServeProcess`]) on random ports, killed when dropped; one-shot
//! CLI runs ([`run_control`]); and polling with a deadline instead of sleeps ([`wait_for`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use http::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::*;

/// What a finished command printed.
#[derive(Debug)]
pub struct CommandOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A binary of this workspace, built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first \
         (cargo build --workspace --bins --features switchyard-control/fault-injection)",
        path.display()
    );
    path
}

/// Runs `switchyard-control` with `args` and the extra variables `env`, to its end.
pub fn run_control(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<CommandOutput> {
    if env.iter().any(|(k, _)| {
        *k == switchyard_control::fault::CRASH_AT_VAR
            || *k == switchyard_control::fault::PAUSE_AT_VAR
    }) {
        require_fault_injection()?;
    }
    let mut command = Command::new(bin("switchyard-control"));
    command.arg("--config").arg(config).args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.stdin(Stdio::null()).output()?;
    Ok(CommandOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Fails unless `switchyard-control` was built with the `fault-injection` feature (its
/// `--version` says so): without it `SWITCHYARD_CRASH_AT` is ignored, and a test would wait for
/// a crash that never comes.
fn require_fault_injection() -> Result<()> {
    let out = Command::new(bin("switchyard-control"))
        .arg("--version")
        .stdin(Stdio::null())
        .output()?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !version.contains("(fault-injection)") {
        bail!(
            "target/*/switchyard-control ({}) has no crash points: build it with \
             `cargo build --workspace --bins --features switchyard-control/fault-injection` \
             (scripts/test.sh does)",
            version.trim()
        );
    }
    Ok(())
}

/// A running `switchyard-proxy`, killed when dropped.
#[derive(Debug)]
pub struct ProxyProcess {
    child: Child,
    pub data: String,
    pub admin: String,
    stderr_path: PathBuf,
}

/// The first line the child prints on stdout (its listen addresses), sent when it comes; the
/// rest is drained so the child never blocks on a full pipe.
fn first_line(child: &mut std::process::Child) -> Result<std::sync::mpsc::Receiver<String>> {
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    Ok(rx)
}

impl ProxyProcess {
    pub fn spawn(config: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let stderr_path =
            std::env::temp_dir().join(format!("switchyard-proxy-{}.log", Uuid::new_v4().simple()));
        let mut command = Command::new(bin("switchyard-proxy"));
        command
            .arg("--config")
            .arg(config)
            .env("SWITCHYARD_PROXY_LISTEN", "127.0.0.1:0")
            .env("SWITCHYARD_PROXY_ADMIN_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path)?);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn()?;
        let rx = first_line(&mut child)?;
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                bail!("proxy did not report its ports within 20 s; stderr:\n{log}");
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("unexpected first line {line:?}"))
        };
        Ok(Self {
            data: format!("http://{}", field("data=")?),
            admin: format!("http://{}", field("admin=")?),
            child,
            stderr_path,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("proxy did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// A memory figure of the process from `/proc/<pid>/status`, in KiB: `VmRSS` (resident
    /// now) or `VmHWM` (the most it was ever resident).
    pub fn memory_kib(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse().ok())
            .ok_or_else(|| anyhow!("no {field} in /proc/{}/status", self.pid()))
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, http: &Http) -> Result<()> {
        let url = format!("{}/readyz", self.admin);
        wait_for(Duration::from_secs(20), || async {
            Ok(http
                .get(&url)
                .await
                .map(|r| r.status == StatusCode::OK)
                .unwrap_or(false))
        })
        .await
        .with_context(|| format!("proxy not ready; log:\n{}", self.log()))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// Polls `check` every 20 ms until it returns true or `timeout` passes.
pub async fn wait_for<F, Fut>(timeout: Duration, check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    wait_for_every(timeout, Duration::from_millis(20), check).await
}

/// Polls `check` every `interval` (for checks that cost a process or a table count) until it
/// returns true or `timeout` passes.
pub async fn wait_for_every<F, Fut>(
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(interval).await;
    }
}

/// An initialised env with one proxy running and ready: the common start of a data-plane test.
pub async fn started(
    backend: Backend,
    stores: &[&str],
    extra: &str,
    proxy_env: &[(&str, &str)],
) -> Result<(Env, ProxyProcess, Http)> {
    let env = Env::new(backend, stores, extra).await?;
    env.control_json(&["init"])?;
    let proxy = env.proxy(proxy_env)?;
    let http = Http::new();
    proxy.wait_ready(&http).await?;
    Ok((env, proxy, http))
}

/// A running `switchyard-control serve`, killed when dropped.
#[derive(Debug)]
pub struct ServeProcess {
    child: Child,
    pub admin: String,
    pub worker: String,
    stderr_path: PathBuf,
}

impl ServeProcess {
    pub fn spawn(config: &Path, worker: &str, env: &[(&str, &str)]) -> Result<Self> {
        let stderr_path =
            std::env::temp_dir().join(format!("switchyard-serve-{}.log", Uuid::new_v4().simple()));
        let mut command = Command::new(bin("switchyard-control"));
        command
            .arg("--config")
            .arg(config)
            .args(["serve", "--worker-id", worker])
            .env("SWITCHYARD_CONTROL_ADMIN_LISTEN", "127.0.0.1:0")
            .env("SWITCHYARD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path)?);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn()?;
        let rx = first_line(&mut child)?;
        let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            bail!(
                "serve did not start; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        };
        let admin = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .map(|a| format!("http://{a}"))
            .ok_or_else(|| anyhow!("unexpected first line {line:?}"))?;
        Ok(Self {
            child,
            admin,
            worker: worker.to_owned(),
            stderr_path,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, no goodbye: claims stay until their lease runs out.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// The first JSON value a `--json` command printed (a failed command, e.g. a failed cutover,
/// prints its outcome and then an error document).
pub fn first_json(stdout: &str) -> Result<Value> {
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<Value>()
        .next()
        .context("no JSON output")?
        .with_context(|| format!("parsing {stdout}"))
}
