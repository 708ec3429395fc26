//! The end-to-end test harness: fresh databases per test (a PostgreSQL database with a unique
//! name, or SQLite files in a temporary folder), config files for them, the real binaries
//! started as processes on random ports, and a small HTTP client.
//!
//! PostgreSQL is found at `SWITCHYARD_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); the test script makes sure one runs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sqlx::Connection;
use switchyard_store::{EventStore, NewEvent, StreamRef};
use uuid::Uuid;

pub use anyhow::Result;

pub mod pgcluster;

/// The admin URL of the test PostgreSQL server.
pub fn pg_admin_url() -> String {
    std::env::var("SWITCHYARD_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The URL of database `name` on the test server.
pub fn pg_url(name: &str) -> String {
    let admin = pg_admin_url();
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base);
    format!("{base}/{name}")
}

/// A PostgreSQL database that exists for one test and is dropped (with its connections) after.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create(label: &str) -> Result<Self> {
        let name = format!("sy_{label}_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let mut admin = sqlx::PgConnection::connect(&pg_admin_url())
            .await
            .with_context(|| format!("connecting to test PostgreSQL at {}", pg_admin_url()))?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(Self {
            url: pg_url(&name),
            name,
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside and outside runtimes alike: use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&pg_admin_url()).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                }
            });
        })
        .join();
    }
}

/// A folder removed after the test.
#[derive(Debug)]
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> Result<Self> {
        let path =
            std::env::temp_dir().join(format!("switchyard-{label}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Which database product a test environment uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub const ALL: [Self; 2] = [Self::Postgres, Self::Sqlite];
}

/// A control database and stores, fresh for one test, with a config file naming them.
#[derive(Debug)]
pub struct Env {
    pub backend: Backend,
    pub dir: TempDir,
    pub control_url: String,
    /// `(store id, url)` in config order; the first is the default store.
    pub stores: Vec<(String, String)>,
    pub config_path: PathBuf,
    _dbs: Vec<TestDb>,
}

impl Env {
    /// A control database plus `stores` (the first is the default), with `extra` appended to
    /// the config file (e.g. a `[proxy]` section).
    pub async fn new(backend: Backend, stores: &[&str], extra: &str) -> Result<Self> {
        let dir = TempDir::new("env")?;
        let mut dbs = Vec::new();
        let sqlite_url = |label: &str| {
            format!(
                "sqlite://{}",
                dir.path.join(format!("{label}.db")).display()
            )
        };
        let control_url;
        let mut store_urls = Vec::new();
        match backend {
            Backend::Sqlite => {
                control_url = sqlite_url("control");
                for id in stores {
                    store_urls.push(((*id).to_owned(), sqlite_url(id)));
                }
            }
            Backend::Postgres => {
                let db = TestDb::create("control").await?;
                control_url = db.url.clone();
                dbs.push(db);
                for id in stores {
                    let db = TestDb::create(&id.replace('-', "_")).await?;
                    store_urls.push(((*id).to_owned(), db.url.clone()));
                    dbs.push(db);
                }
            }
        }
        let mut toml = format!(
            "control_url = \"{control_url}\"\ndefault_store = \"{}\"\n",
            stores
                .first()
                .ok_or_else(|| anyhow!("an env needs a store"))?
        );
        for (id, url) in &store_urls {
            toml.push_str(&format!(
                "\n[[stores]]\nid = \"{id}\"\nurl = \"{url}\"\nmax_connections = 8\n"
            ));
        }
        toml.push('\n');
        toml.push_str(extra);
        let config_path = dir.path.join("switchyard.toml");
        std::fs::write(&config_path, toml)?;
        Ok(Self {
            backend,
            dir,
            control_url,
            stores: store_urls,
            config_path,
            _dbs: dbs,
        })
    }

    pub fn store_url(&self, id: &str) -> &str {
        self.stores
            .iter()
            .find(|(s, _)| s == id)
            .map_or("", |(_, url)| url.as_str())
    }

    /// Runs `switchyard-control --config <this env> ARGS` and returns its output.
    pub fn control(&self, args: &[&str]) -> Result<CommandOutput> {
        run_control(&self.config_path, args, &[])
    }

    /// Like [`Env::control`] but fails unless the command exits 0; parses `--json` output.
    pub fn control_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.control(&all)?;
        if out.code != 0 {
            bail!(
                "switchyard-control {args:?} exited {}: {}{}",
                out.code,
                out.stdout,
                out.stderr
            );
        }
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("parsing output of {args:?}: {}", out.stdout))
    }

    /// Starts a proxy on random ports with this env's config plus `env` variables.
    pub fn proxy(&self, env: &[(&str, &str)]) -> Result<ProxyProcess> {
        ProxyProcess::spawn(&self.config_path, env)
    }
}

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
    if env
        .iter()
        .any(|(k, _)| *k == switchyard_control::fault::CRASH_AT_VAR)
    {
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
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
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

/// A reply, with the body parsed as JSON when it is JSON.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub json: Value,
}

/// A keep-alive HTTP client (HTTP/1.1, or h2c with prior knowledge).
#[derive(Debug, Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// HTTP/2 over cleartext (prior knowledge), as the proxy serves on the same port.
    pub fn h2c() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    pub async fn request(
        &self,
        method: Method,
        url: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        let mut builder = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let body: Bytes = body.into();
        if !body.is_empty() {
            builder = builder.header("content-type", "application/json");
        }
        let response = self.client.request(builder.body(Full::new(body))?).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            headers,
            body,
            json,
        })
    }

    pub async fn get(&self, url: &str) -> Result<Reply> {
        self.request(Method::GET, url, Bytes::new(), &[]).await
    }

    pub async fn post(&self, url: &str, body: &Value) -> Result<Reply> {
        self.request(Method::POST, url, serde_json::to_vec(body)?, &[])
            .await
    }
}

/// Paths of the data-plane API.
pub fn stream_url(base: &str, tenant: Uuid, aggregate_type: &str, aggregate_id: Uuid) -> String {
    format!("{base}/v1/tenants/{tenant}/streams/{aggregate_type}/{aggregate_id}/events")
}

pub fn feed_url(base: &str, tenant: Uuid) -> String {
    format!("{base}/v1/tenants/{tenant}/events")
}

/// An append body of `n` events of type `kind` with fresh ids.
pub fn events_body(expected_version: Option<i64>, n: usize, kind: &str) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|i| serde_json::json!({ "event_id": Uuid::new_v4(), "event_type": kind, "payload": { "i": i, "note": "x" } }))
        .collect();
    serde_json::json!({ "expected_version": expected_version, "events": events })
}

/// Counts the rows of `events` in a store (any backend), optionally for one tenant.
pub async fn count_events(url: &str, tenant: Option<Uuid>) -> Result<i64> {
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        let n = match tenant {
            Some(t) => {
                sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant_id = ?1")
                    .bind(t.to_string())
                    .fetch_one(&mut conn)
                    .await?
            }
            None => {
                sqlx::query_scalar("SELECT count(*) FROM events")
                    .fetch_one(&mut conn)
                    .await?
            }
        };
        Ok(n)
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let n = match tenant {
            Some(t) => {
                sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant_id = $1")
                    .bind(t)
                    .fetch_one(&mut conn)
                    .await?
            }
            None => {
                sqlx::query_scalar("SELECT count(*) FROM events")
                    .fetch_one(&mut conn)
                    .await?
            }
        };
        Ok(n)
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

/// Runs `body` once per backend, naming the backend in any failure.
pub async fn for_each_backend<F, Fut>(mut body: F) -> Result<()>
where
    F: FnMut(Backend) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    for backend in Backend::ALL {
        body(backend)
            .await
            .with_context(|| format!("on {backend:?}"))?;
    }
    Ok(())
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
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
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

/// What a [`TcpGate`] does with traffic, set on command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Forward everything.
    Pass,
    /// Forward everything, each chunk held back this long (in both directions).
    Latency(Duration),
    /// Accept and hold, forward nothing; what was sent moves on when the mode changes back
    /// (a stalled network or a frozen server).
    Stall,
    /// Accept, then read and silently drop everything, in both directions (a firewall that
    /// drops packets). Leaving it cuts every connection it touched, as the peers' timeouts
    /// eventually would.
    Blackhole,
    /// Refuse new connections (accept and close at once).
    Closed,
}

/// A TCP forwarder in front of a database that injects faults on command: latency, stall,
/// blackhole, reset of the open connections, refusing connections, and a connection cut
/// right after it forwarded a PostgreSQL `COMMIT` ([`TcpGate::cut_after_next_commit`]).
#[derive(Debug)]
pub struct TcpGate {
    pub port: u16,
    mode: tokio::sync::watch::Sender<GateMode>,
    generation: tokio::sync::watch::Sender<u64>,
    commit_cut: Arc<CommitCut>,
    task: tokio::task::JoinHandle<()>,
}

/// The gate's `COMMIT` trap: armed on command, spent by the first connection that sends one.
#[derive(Debug, Default)]
struct CommitCut {
    armed: AtomicBool,
    done: AtomicUsize,
}

/// Follows what a PostgreSQL client sends (the untyped startup messages, then typed ones) far
/// enough to see where a `COMMIT` ends: a simple-protocol `Query` whose text is `COMMIT`, or an
/// extended-protocol `Parse` of `COMMIT` up to the `Sync` that runs it.
#[derive(Debug, Default)]
struct PgClientStream {
    /// Bytes of the message being read that came in earlier chunks (already forwarded).
    pending: Vec<u8>,
    started: bool,
    commit_parsed: bool,
}

impl PgClientStream {
    /// Feeds `chunk`; answers the offset in it just past the end of the first `COMMIT` that
    /// completes in it.
    fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        let before = self.pending.len();
        self.pending.extend_from_slice(chunk);
        let mut at = 0;
        let mut found = None;
        loop {
            let rest = &self.pending[at..];
            let (header, typed) = if self.started { (5, true) } else { (4, false) };
            if rest.len() < header {
                break;
            }
            let len_at = usize::from(typed);
            let len = u32::from_be_bytes([
                rest[len_at],
                rest[len_at + 1],
                rest[len_at + 2],
                rest[len_at + 3],
            ]) as usize;
            let total = len + len_at;
            if rest.len() < total {
                break;
            }
            let message = &rest[..total];
            if typed {
                let body = &message[5..];
                let is_commit = |text: &[u8]| {
                    let text = String::from_utf8_lossy(text);
                    text.trim_matches(|c: char| c == '\0' || c.is_whitespace() || c == ';')
                        .eq_ignore_ascii_case("commit")
                };
                let commit_ends_here = match message[0] {
                    b'Q' => is_commit(body),
                    b'P' => {
                        // name\0 query\0 …
                        let mut parts = body.split(|b| *b == 0);
                        let _name = parts.next();
                        self.commit_parsed = parts.next().is_some_and(is_commit);
                        false
                    }
                    b'S' => std::mem::take(&mut self.commit_parsed),
                    _ => false,
                };
                if commit_ends_here && found.is_none() {
                    found = Some(at + total);
                }
            } else {
                // SSLRequest and GSSENCRequest keep the stream in its startup phase.
                let code = u32::from_be_bytes([message[4], message[5], message[6], message[7]]);
                self.started = !(len == 8 && (code == 80_877_103 || code == 80_877_104));
            }
            at += total;
        }
        self.pending.drain(..at);
        found.and_then(|end| end.checked_sub(before))
    }
}

impl TcpGate {
    /// Forwards a random local port to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (mode, _) = tokio::sync::watch::channel(GateMode::Pass);
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let upstream = upstream.to_owned();
        let (mode2, generation2) = (mode.clone(), generation.clone());
        let commit_cut = Arc::new(CommitCut::default());
        let commit_cut2 = Arc::clone(&commit_cut);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                let now = *mode2.borrow();
                if now == GateMode::Closed {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = generation2.subscribe();
                let modes = mode2.subscribe();
                let commit_cut = Arc::clone(&commit_cut2);
                tokio::spawn(async move {
                    let server = if now == GateMode::Blackhole {
                        None // nothing reaches the server while blackholed
                    } else {
                        match tokio::net::TcpStream::connect(&upstream).await {
                            Ok(server) => Some(server),
                            Err(_) => return,
                        }
                    };
                    let (client_read, client_write) = client.into_split();
                    match server {
                        Some(server) => {
                            let _ = server.set_nodelay(true);
                            let (server_read, server_write) = server.into_split();
                            let cutting = Arc::new(AtomicBool::new(false));
                            let upstream_side = Watch {
                                commit_cut: Some(commit_cut),
                                cutting: Arc::clone(&cutting),
                            };
                            let downstream_side = Watch {
                                commit_cut: None,
                                cutting,
                            };
                            tokio::select! {
                                () = pump(client_read, Some(server_write), modes.clone(), upstream_side) => {}
                                () = pump(server_read, Some(client_write), modes, downstream_side) => {}
                                _ = cut.changed() => {}
                            }
                        }
                        None => {
                            tokio::select! {
                                () = pump(client_read, None, modes, Watch::default()) => {}
                                _ = cut.changed() => {}
                            }
                            drop(client_write);
                        }
                    }
                });
            }
        });
        Ok(Self {
            port,
            mode,
            generation,
            commit_cut,
            task,
        })
    }

    /// The next connection that sends a `COMMIT` has it forwarded to the server and is cut
    /// at once, before the server's answer can come back: the client cannot tell whether its
    /// transaction committed. Once only; later connections pass.
    pub fn cut_after_next_commit(&self) {
        self.commit_cut.armed.store(true, Ordering::SeqCst);
    }

    /// How many connections were cut after their `COMMIT`.
    pub fn commit_cuts(&self) -> usize {
        self.commit_cut.done.load(Ordering::SeqCst)
    }

    /// Sets the mode. Leaving `Blackhole` cuts every open connection.
    pub fn set(&self, mode: GateMode) {
        let before = self.mode.send_replace(mode);
        if before == GateMode::Blackhole && mode != GateMode::Blackhole {
            self.reset();
        }
    }

    pub fn mode(&self) -> GateMode {
        *self.mode.borrow()
    }

    /// Cuts every open connection now; new ones are accepted as the mode says.
    pub fn reset(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Refuses new connections and cuts the open ones.
    pub fn close(&self) {
        self.set(GateMode::Closed);
        self.reset();
    }

    /// Back to forwarding everything.
    pub fn open(&self) {
        self.set(GateMode::Pass);
    }

    /// `url` (a PostgreSQL URL on 127.0.0.1:5432) rewritten to go through this gate, in
    /// cleartext (`sslmode=disable`): the `COMMIT` trap reads the PostgreSQL stream, which TLS
    /// would hide (the test server offers TLS, and the default `prefer` takes it).
    pub fn url(&self, url: &str) -> String {
        let gated = url.replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", self.port), 1);
        let separator = if gated.contains('?') { '&' } else { '?' };
        format!("{gated}{separator}sslmode=disable")
    }
}

/// What one direction of a connection watches for: the client's side follows the PostgreSQL
/// stream for the `COMMIT` trap; both stop forwarding once the connection is being cut.
#[derive(Debug, Default)]
struct Watch {
    commit_cut: Option<Arc<CommitCut>>,
    cutting: Arc<AtomicBool>,
}

/// Moves bytes from `from` to `to` as the gate's mode says, until either side closes. `to` is
/// `None` for a connection accepted while blackholed (it has no server).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: Option<tokio::net::tcp::OwnedWriteHalf>,
    mut modes: tokio::sync::watch::Receiver<GateMode>,
    watch: Watch,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    let mut stream = PgClientStream::default();
    loop {
        // A stalled gate reads nothing either, so the sender's buffers fill up as on a real
        // stalled network.
        while *modes.borrow_and_update() == GateMode::Stall {
            if modes.changed().await.is_err() {
                return;
            }
        }
        let mut n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if watch.cutting.load(Ordering::SeqCst) {
            return; // the other direction forwarded a COMMIT: nothing more either way
        }
        let mut cut_now = false;
        if let Some(trap) = &watch.commit_cut {
            if let Some(end) = stream.feed(&buf[..n]) {
                if trap.armed.swap(false, Ordering::SeqCst) {
                    watch.cutting.store(true, Ordering::SeqCst);
                    n = end;
                    cut_now = true;
                }
            }
        }
        loop {
            let mode = *modes.borrow_and_update();
            match mode {
                GateMode::Stall => {
                    if modes.changed().await.is_err() {
                        return;
                    }
                }
                GateMode::Blackhole => break, // dropped
                GateMode::Latency(delay) => {
                    tokio::time::sleep(delay).await;
                    let Some(to) = to.as_mut() else { break };
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    break;
                }
                GateMode::Pass | GateMode::Closed => {
                    let Some(to) = to.as_mut() else { break };
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
        if cut_now {
            if let (Some(trap), Some(to)) = (&watch.commit_cut, to.as_mut()) {
                let _ = to.flush().await;
                trap.done.fetch_add(1, Ordering::SeqCst);
            }
            return; // both halves are dropped: the server has the COMMIT, the client no answer
        }
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.task.abort();
        self.reset();
    }
}

/// Writers appending through proxies until stopped, each recording what was acknowledged.
#[derive(Debug)]
pub struct Writers {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<Vec<Acked>>>>,
}

/// One acknowledged append: which events, in which stream, at which versions, on which store.
#[derive(Debug, Clone)]
pub struct Acked {
    pub aggregate_id: Uuid,
    pub event_ids: Vec<Uuid>,
    pub first_version: i64,
    pub store_id: String,
}

impl Writers {
    /// `n` writers for `tenant`, writer `i` through `proxies[i % len]`, each on its own streams
    /// (`streams_each`, round robin) with `expected_version`, pausing `pause` between appends.
    pub fn start(
        http: &Http,
        proxies: &[String],
        tenant: Uuid,
        n: usize,
        streams_each: usize,
        pause: Duration,
    ) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let tasks = (0..n)
            .map(|i| {
                let http = http.clone();
                let base = proxies[i % proxies.len()].clone();
                let rx = rx.clone();
                tokio::spawn(async move {
                    let streams: Vec<Uuid> = (0..streams_each).map(|_| Uuid::new_v4()).collect();
                    let mut versions = vec![0i64; streams_each];
                    let mut acked = Vec::new();
                    let mut k = 0usize;
                    while !*rx.borrow() {
                        let s = k % streams_each;
                        k += 1;
                        let body = events_body(Some(versions[s]), 1 + k % 2, "Written");
                        let ids: Vec<Uuid> = body["events"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|e| {
                                        e["event_id"].as_str().and_then(|s| Uuid::parse_str(s).ok())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        let url = stream_url(&base, tenant, "Load", streams[s]);
                        // Retry the same body until it is acknowledged: appends are idempotent.
                        loop {
                            match http.post(&url, &body).await {
                                Ok(reply) if reply.status == StatusCode::CREATED => {
                                    versions[s] =
                                        reply.json["last_version"].as_i64().unwrap_or(versions[s]);
                                    acked.push(Acked {
                                        aggregate_id: streams[s],
                                        event_ids: ids.clone(),
                                        first_version: reply.json["first_version"]
                                            .as_i64()
                                            .unwrap_or(-1),
                                        store_id: reply.json["store_id"]
                                            .as_str()
                                            .unwrap_or_default()
                                            .to_owned(),
                                    });
                                    break;
                                }
                                Ok(reply) if reply.status.is_server_error() => {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                Ok(reply) => {
                                    bail!("append refused: {} {:?}", reply.status, reply.json)
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                            }
                        }
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    Ok(acked)
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the writers and returns every acknowledged append.
    pub async fn stop(self) -> Result<Vec<Acked>> {
        let _ = self.stop.send(true);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await??);
        }
        Ok(all)
    }
}

/// A tenant's events in a store as `(aggregate_id, version, event_id)`, plus a digest of
/// everything a migration must keep, sorted by stream and version.
pub async fn tenant_events(url: &str, tenant: Uuid) -> Result<Vec<(Uuid, i32, Uuid, String)>> {
    let store = switchyard_store::EventStore::connect("check", url, 2)?;
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_tenant(tenant, after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = last.global_position;
        for e in &page {
            let payload: Value = serde_json::from_str(e.payload.get())?;
            let digest = format!(
                "{}|{}|{:?}|{}|{}",
                e.aggregate_type,
                e.event_type,
                e.actor_id,
                e.timestamp.to_rfc3339(),
                payload
            );
            out.push((e.aggregate_id, e.version, e.event_id, digest));
        }
    }
    store.close().await;
    out.sort();
    Ok(out)
}

/// A proxy's admin view of a tenant's route (`GET /admin/routes/{tenant}`).
pub async fn route_state(http: &Http, proxy: &ProxyProcess, tenant: Uuid) -> Result<Value> {
    route_state_with(http, proxy, tenant, None).await
}

/// [`route_state`] from a proxy with an admin token (every admin read needs it).
pub async fn route_state_with(
    http: &Http,
    proxy: &ProxyProcess,
    tenant: Uuid,
    admin_token: Option<&str>,
) -> Result<Value> {
    let bearer = admin_token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    let url = format!("{}/admin/routes/{tenant}", proxy.admin);
    Ok(http
        .request(http::Method::GET, &url, Bytes::new(), &headers)
        .await?
        .json)
}

/// Every acknowledged append is in `events` (as [`tenant_events`] lists them) exactly once, at
/// its acknowledged stream and versions.
pub fn assert_all_acked(acked: &[Acked], events: &[(Uuid, i32, Uuid, String)]) {
    let by_id: std::collections::HashMap<Uuid, (Uuid, i32)> =
        events.iter().map(|(a, v, id, _)| (*id, (*a, *v))).collect();
    assert_eq!(by_id.len(), events.len(), "an event id appears twice");
    for append in acked {
        for (i, id) in append.event_ids.iter().enumerate() {
            let version =
                i32::try_from(append.first_version).unwrap_or(-1) + i32::try_from(i).unwrap_or(0);
            assert_eq!(
                by_id.get(id),
                Some(&(append.aggregate_id, version)),
                "acknowledged event {id} lost or moved"
            );
        }
    }
}

/// Seeds `events` events of `tenant` in a PostgreSQL store (streams of 100 versions, ~80-byte
/// payloads) with one `INSERT … SELECT`: fast for the big tenants the end-to-end tests need.
pub async fn seed_sql(url: &str, tenant: Uuid, events: i64) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::query(
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, actor_id, version, timestamp, payload)
         SELECT gen_random_uuid(),
                (md5($1::text || (g / 100)::text))::uuid,
                'Seed', 'Seeded', $1, 'seeder', (g % 100) + 1, now(),
                jsonb_build_object('g', g, 'pad', repeat('x', 60))
           FROM generate_series(0, $2 - 1) AS g",
    )
    .bind(tenant)
    .bind(events)
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// Seeds `streams` streams of `per_stream` events for `tenant` straight into a store.
pub async fn seed(url: &str, tenant: Uuid, streams: usize, per_stream: usize) -> Result<()> {
    let store = EventStore::connect("seed", url, 4)?;
    for _ in 0..streams {
        let aggregate_id = Uuid::new_v4();
        let events: Vec<NewEvent> = (0..per_stream)
            .map(|i| {
                let payload = serde_json::value::RawValue::from_string(
                    json!({"i": i, "pad": "x".repeat(40)}).to_string(),
                )?;
                Ok(NewEvent::new(
                    Uuid::new_v4(),
                    "Seeded",
                    payload,
                    Some("seeder".into()),
                    None,
                ))
            })
            .collect::<Result<_>>()?;
        store
            .append(
                StreamRef {
                    tenant_id: tenant,
                    aggregate_type: "Seed",
                    aggregate_id,
                },
                Some(0),
                &events,
            )
            .await?;
    }
    store.close().await;
    Ok(())
}
