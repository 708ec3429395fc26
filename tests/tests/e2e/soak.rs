//! A randomized soak on PostgreSQL: eight tenants written to through three proxies, two
//! `switchyard-control serve` workers, three stores behind fault-injecting TCP gates, and a
//! driver that, from a seeded RNG, starts migrations to random stores (and back), pauses,
//! resumes, aborts, cuts over (some with a budget too small to make it, so they roll back),
//! verifies, injects latency spikes, resets and short blackholes, and kills (`-9`) and restarts
//! proxies and workers. Operations that are illegal in the current state must be refused with
//! a clear error (exit 1 or 2 and a message), never a crash.
//!
//! Adversarial operations try to break "nothing lost" on purpose: a cutover raced by
//! `emergency-stop` or `abort` at a random offset (then every proxy must acknowledge an append
//! of the tenant again within the budget plus a margin), `routing set` raced against
//! `migrate start`, an acknowledged append retried with its events in another order, and rows
//! of a foreign tenant planted in other stores with a soak tenant's event ids or stream ids
//! (a later migration there must refuse or stop on the divergence; the foreign rows must
//! survive untouched). `cutover --force` meets those divergences too, and some cutovers lose
//! the answer to the next `COMMIT` on their source connection (an ambiguous fence move).
//!
//! At the end the faults stop, every remaining migration is cut over or aborted, and every
//! invariant the end state can show is checked against the writers' own record of what was
//! acknowledged (see [`check_invariants`] for the exact list and docs/reliability.md for how to
//! run it longer).
//!
//! `SWITCHYARD_SOAK_SEED` picks the seed (default [`DEFAULT_SEED`]); `SWITCHYARD_SOAK_SECS` how
//! long the random operations run (default [`DEFAULT_SECS`]). A failure prints the seed and the
//! log of every operation with its outcome.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::mem::ManuallyDrop;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use http::StatusCode;
use serde_json::Value;
use switchyard_tests::{
    assert_all_acked, bin, count_events, events_body, feed_url, fence, route_state, run_control,
    seed, stream_url, tenant_events, wait_for, Acked, Backend, Env, EventRow, GateMode, Http,
    ProxyProcess, Result, ServeProcess, TcpGate, Writers,
};
use uuid::Uuid;

const DEFAULT_SEED: u64 = 0x5eed_0009;
const DEFAULT_SECS: u64 = 90;
const STORES: [&str; 3] = ["shared", "dedicated-a", "dedicated-b"];
const TENANTS: usize = 8;
const PROXIES: usize = 3;
const SERVES: usize = 2;
/// Longer than any command takes on a loaded machine; a command still running then is hung.
const CLI_LIMIT: Duration = Duration::from_secs(120);

/// The whole soak, with the seed and the operation log printed when anything fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_soak_keeps_every_invariant() -> Result<()> {
    let seed = std::env::var("SWITCHYARD_SOAK_SEED")
        .ok()
        .map(|s| parse_seed(&s))
        .transpose()?
        .unwrap_or(DEFAULT_SEED);
    let secs = std::env::var("SWITCHYARD_SOAK_SECS")
        .ok()
        .map(|s| s.parse::<u64>())
        .transpose()
        .context("SWITCHYARD_SOAK_SECS must be a number of seconds")?
        .unwrap_or(DEFAULT_SECS);
    eprintln!("soak: seed {seed:#x} ({seed}), {secs} s of random operations");
    let log = OpLog::new(seed);
    let started = Instant::now();
    let outcome = soak(seed, Duration::from_secs(secs), &log).await;
    match outcome {
        Ok(summary) => {
            eprintln!(
                "soak: seed {seed:#x} passed in {:.1} s\n{summary}operation log:\n{}",
                started.elapsed().as_secs_f64(),
                log.dump()
            );
            Ok(())
        }
        Err(e) => {
            eprintln!(
                "soak FAILED with seed {seed:#x} (rerun with SWITCHYARD_SOAK_SEED={seed:#x} \
                 SWITCHYARD_SOAK_SECS={secs}) after {:.1} s: {e:#}\noperation log:\n{}",
                started.elapsed().as_secs_f64(),
                log.dump()
            );
            Err(e.context(format!("soak seed {seed:#x}")))
        }
    }
}

/// Found by the soak (seed 0x7): a proxy restarted by `kill -9` served appends before its
/// first routing table was loaded, so the empty table sent a tenant that lived on
/// `dedicated-b` to the default store, `shared` — whose fence a migration back to it had
/// reopened — and acknowledged them there. Now a proxy that cannot load its routing (here: the
/// control database refuses connections) holds appends and reads for `gate_wait_ms`, answers
/// 503 `routing_not_loaded`, and writes nothing; once the control database answers, the same
/// append lands on the tenant's store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_serves_nothing_before_its_routing_is_loaded() -> Result<()> {
    let env = Env::new(
        Backend::Postgres,
        &["shared", "dedicated"],
        "[proxy]\ngate_wait_ms = 300\nrouting_poll_ms = 100\n",
    )
    .await?;
    let init = run_control(&env.config_path, &["init"], &[])?;
    ensure!(init.code == 0, "init: {}", init.stderr);
    let tenant = Uuid::new_v4();
    let set = run_control(
        &env.config_path,
        &["routing", "set", &tenant.to_string(), "dedicated"],
        &[],
    )?;
    ensure!(set.code == 0, "routing set: {}", set.stderr);
    let gate = TcpGate::start("127.0.0.1:5432").await?;
    gate.close();
    let control = gate.url(&env.control_url);
    let http = Http::new();
    let proxy = env.proxy(&[("SWITCHYARD_CONTROL_URL", control.as_str())])?;

    let url = stream_url(&proxy.data, tenant, "Order", Uuid::new_v4());
    let body = events_body(Some(0), 2, "Early");
    let early = http.post(&url, &body).await?;
    assert_eq!(
        early.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        early.json
    );
    assert_eq!(early.json["error"], "routing_not_loaded");
    assert_eq!(early.json["retryable"], true);
    assert!(early.headers.contains_key("retry-after"));
    let read = http.get(&feed_url(&proxy.data, tenant)).await?;
    assert_eq!(read.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(read.json["error"], "routing_not_loaded");
    assert_eq!(
        count_events(env.store_url("shared"), Some(tenant)).await?,
        0
    );

    gate.open();
    proxy.wait_ready(&http).await?;
    let reply = http.post(&url, &body).await?;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    assert_eq!(reply.json["store_id"], "dedicated");
    assert_eq!(
        reply.json["first_version"], 1,
        "the early append never landed"
    );
    assert_eq!(
        count_events(env.store_url("shared"), Some(tenant)).await?,
        0
    );
    assert_eq!(
        count_events(env.store_url("dedicated"), Some(tenant)).await?,
        2
    );
    Ok(())
}

fn parse_seed(s: &str) -> Result<u64> {
    let s = s.trim();
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.with_context(|| format!("SWITCHYARD_SOAK_SEED {s:?} is not a number"))
}

/// splitmix64: small, seedable, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    /// True `pct` percent of the time.
    fn chance(&mut self, pct: usize) -> bool {
        self.below(100) < pct
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.next() % (high - low + 1))
    }
}

/// Every operation with its outcome, timestamped from the start.
struct OpLog {
    seed: u64,
    started: Instant,
    lines: Mutex<Vec<String>>,
}

impl OpLog {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            started: Instant::now(),
            lines: Mutex::new(Vec::new()),
        }
    }

    fn push(&self, line: impl Into<String>) {
        let line = format!(
            "[{:>7.3}s] {}",
            self.started.elapsed().as_secs_f64(),
            line.into()
        );
        if let Ok(mut lines) = self.lines.lock() {
            lines.push(line);
        }
    }

    fn elapsed_ms(&self) -> u128 {
        self.started.elapsed().as_millis()
    }

    fn dump(&self) -> String {
        let lines = self.lines.lock().map(|l| l.join("\n")).unwrap_or_default();
        format!("seed {:#x}\n{lines}", self.seed)
    }
}

/// What one `switchyard-control` command did.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }

    /// The message of a refusal or failure (the CLI's stderr line), for the log.
    fn message(&self) -> String {
        let line = self
            .stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("switchyard-control:"))
            .unwrap_or_else(|| self.stderr.lines().last().unwrap_or(""));
        line.chars().take(200).collect()
    }
}

/// The processes, gates and bookkeeping of one soak.
struct Soak<'a> {
    /// Dropped by hand: kept (leaked) for a post-mortem when asked.
    env: ManuallyDrop<Env>,
    http: Http,
    log: &'a OpLog,
    gates: Vec<Arc<TcpGate>>,
    /// `SWITCHYARD_STORE_<ID>_URL` overrides sending every store connection through its gate.
    gated: Vec<(String, String)>,
    proxies: Vec<ProxyProcess>,
    /// Each proxy's data listen address, kept across restarts so writers find it again.
    proxy_addrs: Vec<String>,
    serves: Vec<ServeProcess>,
    tenants: Vec<Uuid>,
    /// Migration ids started per tenant, oldest first.
    started: Vec<Vec<String>>,
    /// Operator operations that exited 0, by migration: `(migration, audit action)`.
    succeeded: Vec<(String, &'static str)>,
    /// `(operation, outcome)` → count, for the summary.
    tally: BTreeMap<(String, &'static str), usize>,
    faults: Vec<tokio::task::JoinHandle<()>>,
    /// Appends the adversarial operations had acknowledged (probes after a race, reordered
    /// retries), per tenant: checked like the writers' own.
    extra_acked: Vec<Vec<Acked>>,
    /// A tenant outside the soak's, whose rows are planted in other stores to collide with
    /// the soak tenants' stream and event ids.
    hostile: Uuid,
    /// The planted rows: `(store, event_id, aggregate_type, aggregate_id, version)`; every one
    /// must still be there, unchanged, at the end.
    collisions: Vec<(String, Uuid, String, Uuid, i32)>,
}

async fn soak(rng_seed: u64, duration: Duration, log: &OpLog) -> Result<String> {
    let mut rng = Rng(rng_seed);
    // cutover_max_lag_events 20: with writers going the lag is rarely exactly 0 when a random
    // cutover arrives; the final delta is copied under the fence either way.
    let env = Env::new(
        Backend::Postgres,
        &STORES,
        "[proxy]\nrouting_poll_ms = 200\ngate_wait_ms = 10000\n\n\
         [control]\nbatch_size = 200\ncutover_max_lag_events = 20\n",
    )
    .await?;
    // Two connections per store and process instead of the harness's eight: three proxies,
    // two workers and the commands would otherwise open well over the 100 connections the
    // test PostgreSQL allows (shared with the tests that run beside this one), and
    // "too many clients" then fails commands that are not under test.
    let config = std::fs::read_to_string(&env.config_path)?;
    std::fs::write(
        &env.config_path,
        config.replace("max_connections = 8", "max_connections = 2"),
    )?;
    let mut gates = Vec::new();
    let mut gated = Vec::new();
    for (id, url) in &env.stores {
        let gate = TcpGate::start("127.0.0.1:5432").await?;
        gated.push((
            format!(
                "SWITCHYARD_STORE_{}_URL",
                id.to_uppercase().replace('-', "_")
            ),
            gate.url(url),
        ));
        gates.push(Arc::new(gate));
    }
    let mut soak = Soak {
        env: ManuallyDrop::new(env),
        http: Http::new(),
        log,
        gates,
        gated,
        proxies: Vec::new(),
        proxy_addrs: Vec::new(),
        serves: Vec::new(),
        tenants: (0..TENANTS).map(|_| Uuid::new_v4()).collect(),
        started: vec![Vec::new(); TENANTS],
        succeeded: Vec::new(),
        tally: BTreeMap::new(),
        faults: Vec::new(),
        extra_acked: vec![Vec::new(); TENANTS],
        hostile: Uuid::new_v4(),
        collisions: Vec::new(),
    };
    let outcome = run(&mut soak, &mut rng, duration).await;
    if outcome.is_err() && std::env::var_os("SWITCHYARD_SOAK_KEEP").is_some() {
        soak.keep();
    } else {
        // Processes first, then the databases.
        soak.proxies.clear();
        soak.serves.clear();
        drop(ManuallyDrop::into_inner(soak.env));
    }
    outcome
}

/// Setup, the random operations, settling, and the checks.
async fn run(soak: &mut Soak<'_>, rng: &mut Rng, duration: Duration) -> Result<String> {
    let log = soak.log;
    let init = soak.control(&["init"]).await?;
    ensure!(init.code == 0, "init failed: {}", init.stderr);

    // Each tenant starts on the default store with a few seeded streams.
    let mut initial = Vec::new();
    for (i, tenant) in soak.tenants.iter().enumerate() {
        let streams = 1 + rng.below(3);
        let per_stream = 50 + rng.below(400);
        seed(soak.env.store_url(STORES[0]), *tenant, streams, per_stream).await?;
        log.push(format!(
            "seed tenant {i} ({tenant}): {streams} streams x {per_stream} events"
        ));
        initial.push(tenant_events(soak.env.store_url(STORES[0]), *tenant).await?);
    }

    for _ in 0..PROXIES {
        let env = soak.gated_env();
        let proxy = soak.env.proxy(&env)?;
        proxy.wait_ready(&soak.http).await?;
        soak.proxy_addrs.push(
            proxy
                .data
                .strip_prefix("http://")
                .unwrap_or(&proxy.data)
                .to_owned(),
        );
        soak.proxies.push(proxy);
    }
    for w in 0..SERVES {
        let serve = soak.spawn_serve(w)?;
        soak.serves.push(serve);
    }
    let bases: Vec<String> = soak.proxies.iter().map(|p| p.data.clone()).collect();
    // Two writers per tenant, on different proxies (rotated per tenant).
    let writers: Vec<Writers> = soak
        .tenants
        .iter()
        .enumerate()
        .map(|(i, tenant)| {
            let mut rotated = bases.clone();
            rotated.rotate_left(i % PROXIES);
            Writers::start(
                &soak.http,
                &rotated,
                *tenant,
                2,
                2,
                Duration::from_millis(40),
            )
        })
        .collect();

    let ops = soak.drive(rng, duration).await;
    // Whatever happened, the writers are stopped before anything is reported (a failed
    // operation must not leave them running into the drop of the databases).
    let settled = match ops {
        Ok(()) => soak.settle().await,
        Err(e) => Err(e),
    };
    let mut acked = Vec::new();
    let mut stop_error = None;
    for (i, w) in writers.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(60), w.stop()).await {
            Ok(Ok(a)) => acked.push(a),
            Ok(Err(e)) => {
                stop_error.get_or_insert(anyhow!("tenant {i}'s writers failed: {e:#}"));
                acked.push(Vec::new());
            }
            Err(_) => {
                stop_error.get_or_insert(anyhow!(
                    "tenant {i}'s writers were still blocked 60 s after stop"
                ));
                acked.push(Vec::new());
            }
        }
    }
    settled?;
    if let Some(e) = stop_error {
        return Err(e);
    }
    for (mine, extra) in acked.iter_mut().zip(&soak.extra_acked) {
        mine.extend(extra.iter().cloned());
    }
    let appends: usize = acked.iter().map(Vec::len).sum();
    log.push(format!("writers stopped: {appends} acknowledged appends"));
    let checked = soak.check_invariants(&initial, &acked).await?;
    let collisions = soak.check_collisions().await?;
    soak.check_process_logs()?;
    let mut summary =
        format!("acknowledged appends: {appends}\n{checked}\n{collisions}\noperations:\n");
    for ((op, outcome), n) in &soak.tally {
        let _ = writeln!(summary, "  {op:<22} {outcome:<8} {n}");
    }
    Ok(summary)
}

impl Soak<'_> {
    /// For a post-mortem (`SWITCHYARD_SOAK_KEEP=1`): stops the processes but keeps their logs,
    /// the config and the databases.
    fn keep(&mut self) {
        for i in 0..self.proxies.len() {
            self.proxies[i].kill9();
            self.save_log(&format!("proxy-{i}-last"), &self.proxies[i].log());
        }
        for i in 0..self.serves.len() {
            self.serves[i].kill9();
            self.save_log(&format!("serve-{i}-last"), &self.serves[i].log());
        }
        eprintln!(
            "soak: kept config {} (databases: control {}, stores {:?})",
            self.env.config_path.display(),
            self.env.control_url,
            self.env.stores
        );
        std::mem::forget(std::mem::take(&mut self.proxies));
        std::mem::forget(std::mem::take(&mut self.serves));
    }

    /// Keeps a process's log in the env's folder (removed after a run unless kept).
    fn save_log(&self, name: &str, log: &str) {
        let _ = std::fs::write(self.env.dir.path.join(format!("{name}.log")), log);
    }

    fn gated_env(&self) -> Vec<(&str, &str)> {
        self.gated
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    fn spawn_serve(&self, w: usize) -> Result<ServeProcess> {
        ServeProcess::spawn(
            &self.env.config_path,
            &format!("soak-w{w}"),
            &self.gated_env(),
        )
    }

    /// Runs `switchyard-control --json ARGS` with store connections through the gates
    /// (`gated`) or straight to the databases. Any exit but 0, 1 (refused or failed) and 2
    /// (usage) is a crash and fails the soak, as is a non-zero exit without a message.
    async fn run_control(&self, args: &[&str], gated: bool) -> Result<Out> {
        let mut command = tokio::process::Command::new(bin("switchyard-control"));
        command
            .arg("--config")
            .arg(&self.env.config_path)
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if gated {
            for (k, v) in &self.gated {
                command.env(k, v);
            }
        }
        let out = tokio::time::timeout(CLI_LIMIT, command.output())
            .await
            .map_err(|_| anyhow!("switchyard-control {args:?} still running after {CLI_LIMIT:?}"))?
            .with_context(|| format!("running switchyard-control {args:?}"))?;
        let out = Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        ensure!(
            matches!(out.code, 0..=2) && !out.stderr.contains("panicked"),
            "switchyard-control {args:?} crashed (exit {}): {}{}",
            out.code,
            out.stdout,
            out.stderr
        );
        ensure!(
            out.code == 0 || out.message().len() > "switchyard-control: ".len(),
            "switchyard-control {args:?} exited {} without saying why: {}{}",
            out.code,
            out.stdout,
            out.stderr
        );
        Ok(out)
    }

    async fn control(&self, args: &[&str]) -> Result<Out> {
        self.run_control(args, true).await
    }

    /// A read straight to the databases, which fails the soak unless it succeeds. A
    /// connection-level failure of one of these reads (the test PostgreSQL out of connections,
    /// shared as it is with whatever else runs) is retried for up to 60 s, logged: they observe
    /// the system and are not under test.
    async fn control_ok(&self, args: &[&str]) -> Result<Value> {
        let mut out = self.run_control(args, false).await?;
        let until = Instant::now() + Duration::from_secs(60);
        while out.code != 0 && out.stderr.contains("store unavailable") && Instant::now() < until {
            self.log.push(format!(
                "(harness read {args:?} failed, retrying: {})",
                out.message()
            ));
            tokio::time::sleep(Duration::from_secs(2)).await;
            out = self.run_control(args, false).await?;
        }
        ensure!(
            out.code == 0,
            "switchyard-control {args:?} exited {}: {}",
            out.code,
            out.stderr
        );
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("parsing output of {args:?}: {}", out.stdout))
    }

    /// Logs and tallies an operation's outcome.
    fn record(&mut self, op: &str, what: &str, out: &Out) {
        let outcome = match out.code {
            0 => "ok",
            1 => "refused",
            _ => "usage",
        };
        *self.tally.entry((op.to_owned(), outcome)).or_default() += 1;
        if out.code == 0 {
            self.log.push(format!("{op} {what} -> ok"));
        } else {
            self.log.push(format!(
                "{op} {what} -> exit {}: {}",
                out.code,
                out.message()
            ));
        }
    }

    /// Records the migration a `migrate start` that exited 0 created for tenant `t`.
    fn note_started(&mut self, t: usize, out: &Out) -> Result<()> {
        if out.code != 0 {
            return Ok(());
        }
        let id = out.json()["id"]
            .as_str()
            .ok_or_else(|| anyhow!("migrate start printed no id: {}", out.stdout))?
            .to_owned();
        self.log.push(format!("  tenant {t} migration {id}"));
        self.started[t].push(id);
        Ok(())
    }

    fn latest(&self, tenant: usize) -> Option<String> {
        self.started[tenant].last().cloned()
    }

    /// The random operations, until `duration` has passed.
    async fn drive(&mut self, rng: &mut Rng, duration: Duration) -> Result<()> {
        let until = Instant::now() + duration;
        let mut n = 0usize;
        while Instant::now() < until {
            n += 1;
            tokio::time::sleep(rng.millis(50, 400)).await;
            let t = rng.below(TENANTS);
            let pick = rng.below(100);
            // Operations on a migration go to a tenant that has one.
            let with_migration: Vec<usize> = (0..TENANTS)
                .filter(|i| !self.started[*i].is_empty())
                .collect();
            let m = if with_migration.is_empty() {
                t
            } else {
                with_migration[rng.below(with_migration.len())]
            };
            match pick {
                0..=13 => self.op_start(rng, t).await?,
                14..=19 => self.op_simple(m, "pause", &[]).await?,
                20..=25 => self.op_simple(m, "resume", &[]).await?,
                26..=32 => self.op_simple(m, "abort", &["--reason", "soak"]).await?,
                33..=44 => self.op_cutover(rng, m).await?,
                45..=50 => self.op_verify(m).await?,
                51..=66 => self.op_fault(rng),
                67..=70 => self.op_kill_proxy(rng).await?,
                71..=74 => self.op_kill_serve(rng).await?,
                75..=78 => self.op_invalid(rng).await?,
                79..=84 => {
                    let d = self.dual_writing(rng).await?.unwrap_or(m);
                    self.op_race_cutover(rng, d).await?;
                }
                85..=88 => self.op_race_routing_start(rng, t).await?,
                89..=95 => {
                    // Mostly a dual-writing tenant: its mirror is what a reordered retry
                    // could mislead.
                    let d = if rng.chance(80) {
                        self.dual_writing(rng).await?.unwrap_or(t)
                    } else {
                        t
                    };
                    self.op_reordered_retry(rng, d).await?;
                }
                _ => self.op_collision(rng, t).await?,
            }
            if n.is_multiple_of(10) {
                self.check_one_active_per_tenant().await?;
            }
        }
        self.log.push(format!("random operations done: {n}"));
        Ok(())
    }

    async fn op_start(&mut self, rng: &mut Rng, t: usize) -> Result<()> {
        let tenant = self.tenants[t].to_string();
        // Mostly a store the tenant is not on (now and then its own: refused).
        let route = self.control_ok(&["routing", "get", &tenant]).await?;
        let others: Vec<&str> = STORES
            .iter()
            .copied()
            .filter(|s| route["store_id"] != *s)
            .collect();
        let to = if rng.chance(10) || others.is_empty() {
            STORES[rng.below(STORES.len())]
        } else {
            others[rng.below(others.len())]
        };
        let mut args = vec![
            "migrate",
            "start",
            "--tenant",
            &tenant,
            "--to",
            to,
            "--detach",
            "--batch-size",
            "100",
        ];
        // Most starts reset the target (a store the tenant left, or an aborted copy, holds its
        // events, and a start without it must be refused then).
        if rng.chance(75) {
            args.push("--reset-target");
        }
        if rng.chance(50) {
            args.extend(["--max-rate", "500"]);
        }
        if rng.chance(25) {
            args.extend(["--cutover", "auto"]);
        }
        let out = self.control(&args).await?;
        let what = format!("tenant {t} to {to} {:?}", &args[9..]);
        self.record("migrate start", &what, &out);
        self.note_started(t, &out)?;
        Ok(())
    }

    /// `pause`, `resume` or `abort` of the tenant's latest migration.
    async fn op_simple(&mut self, t: usize, op: &'static str, extra: &[&str]) -> Result<()> {
        let Some(id) = self.latest(t) else {
            return Ok(());
        };
        let mut args = vec![op, id.as_str()];
        args.extend_from_slice(extra);
        let out = self.control(&args).await?;
        self.record(op, &format!("tenant {t} {id}"), &out);
        if out.code == 0 {
            self.succeeded.push((id, op));
        }
        Ok(())
    }

    async fn op_cutover(&mut self, rng: &mut Rng, t: usize) -> Result<()> {
        let Some(id) = self.latest(t) else {
            return Ok(());
        };
        let mut args = vec!["cutover".to_owned(), id.clone()];
        // A third get a budget too small to finish, so they roll back.
        if rng.chance(33) {
            args.push("--timeout-ms".to_owned());
            args.push((1 + rng.below(30)).to_string());
        }
        if rng.chance(20) {
            args.push("--force".to_owned());
        }
        // Now and then the answer to the next COMMIT through the source's gate is lost (most
        // likely the fence move's): the cutover must settle it by what the fence says.
        if rng.chance(15) {
            let source = self
                .migrations(true)
                .await?
                .into_iter()
                .find(|m| m["id"] == id.as_str())
                .and_then(|m| m["source_store_id"].as_str().map(str::to_owned));
            if let Some(g) = source.and_then(|s| STORES.iter().position(|x| *x == s)) {
                self.gates[g].cut_after_next_commit();
                self.log.push(format!(
                    "fault on {}: the next COMMIT's answer is lost",
                    STORES[g]
                ));
                *self
                    .tally
                    .entry(("fault commit cut".to_owned(), "ok"))
                    .or_default() += 1;
            }
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.control(&refs).await?;
        self.record("cutover", &format!("tenant {t} {:?}", &args[1..]), &out);
        if out.code == 0 {
            ensure!(
                out.json()["state"] == "migrated",
                "a successful cutover left state {}",
                out.json()["state"]
            );
            self.succeeded.push((id, "cutover"));
        }
        Ok(())
    }

    /// A cutover of the tenant's latest migration with `emergency-stop` or `abort` of it
    /// started beside it at a random offset (either may win). Whatever the outcome, the tenant
    /// must be writable again through every proxy within the budget plus a margin, on the
    /// store its routing names (the final check finds each probe there).
    async fn op_race_cutover(&mut self, rng: &mut Rng, t: usize) -> Result<()> {
        let Some(id) = self.latest(t) else {
            return Ok(());
        };
        let tenant = self.tenants[t].to_string();
        let stop = rng.chance(60);
        // Wide enough to land anywhere in the cutover: its lag checks, the gates, the fence.
        let offset = rng.millis(0, 600);
        let cutover_first = rng.chance(70);
        let cut = ["cutover", id.as_str(), "--timeout-ms", "2000"];
        let other: Vec<&str> = if stop {
            vec![
                "emergency-stop",
                "--tenant",
                &tenant,
                "--reason",
                "soak race",
            ]
        } else {
            vec!["abort", &id, "--reason", "soak race"]
        };
        let delayed = |first: bool| async move {
            if !first {
                tokio::time::sleep(offset).await;
            }
        };
        let (c, o) = tokio::join!(
            async {
                delayed(cutover_first).await;
                self.control(&cut).await
            },
            async {
                delayed(!cutover_first).await;
                self.control(&other).await
            }
        );
        let (c, o) = (c?, o?);
        let what = if stop { "emergency-stop" } else { "abort" };
        self.record(
            &format!("race: cutover vs {what}"),
            &format!(
                "tenant {t} {id} (cutover {})",
                if cutover_first { "first" } else { "second" }
            ),
            &c,
        );
        self.record(
            &format!("race: {what} vs cutover"),
            &format!("tenant {t} {id} +{offset:?}"),
            &o,
        );
        if c.code == 0 && c.json()["success"] == true {
            self.succeeded.push((id.clone(), "cutover"));
        }
        if o.code == 0 && !stop {
            self.succeeded.push((id.clone(), "abort"));
        }
        if stop && o.code == 0 {
            let stopped = o.json();
            let mine = stopped
                .as_array()
                .and_then(|a| a.iter().find(|s| s["tenant_id"] == tenant.as_str()))
                .cloned()
                .unwrap_or(Value::Null);
            ensure!(
                mine["error"].is_null(),
                "emergency stop of tenant {t} beside a cutover reported an error: {mine}"
            );
        }
        self.probe(t, "after a race").await
    }

    /// A random tenant whose latest migration is dual-writing, if any: races with a cutover
    /// mean something only there.
    async fn dual_writing(&self, rng: &mut Rng) -> Result<Option<usize>> {
        let active = self.migrations(true).await?;
        let ready: Vec<usize> = active
            .iter()
            .filter(|m| m["state"] == "dual_write")
            .filter_map(|m| {
                self.tenants
                    .iter()
                    .position(|t| m["tenant_id"] == t.to_string())
            })
            .collect();
        Ok((!ready.is_empty()).then(|| ready[rng.below(ready.len())]))
    }

    /// One append of a fresh stream through every proxy: each must be acknowledged within the
    /// cutover budget plus a margin for a loaded machine (faults may be running).
    async fn probe(&mut self, t: usize, why: &str) -> Result<()> {
        let tenant = self.tenants[t];
        let limit = Duration::from_secs(15);
        for p in 0..self.proxies.len() {
            let base = self.proxies[p].data.clone();
            let body = events_body(Some(0), 1, "Probed");
            let ids = body_ids(&body);
            let stream = Uuid::new_v4();
            let url = stream_url(&base, tenant, "Probe", stream);
            let until = Instant::now() + limit;
            let mut last = String::new();
            let acked = loop {
                match self.http.post(&url, &body).await {
                    Ok(r) if r.status == StatusCode::CREATED => break Some(r.json),
                    Ok(r) if r.status.is_server_error() => {
                        last = format!("{} {}", r.status, r.json)
                    }
                    Ok(r) => bail!(
                        "tenant {t}: probe through proxy {p} {why} refused: {} {}",
                        r.status,
                        r.json
                    ),
                    Err(e) => last = format!("{e:#}"),
                }
                if Instant::now() > until {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let reply = acked.ok_or_else(|| {
                anyhow!("tenant {t}: no append acknowledged through proxy {p} for {limit:?} {why}; last: {last}")
            })?;
            self.extra_acked[t].push(acked_from(stream, ids, &reply));
        }
        self.log.push(format!(
            "  probe tenant {t} {why}: every proxy acknowledged"
        ));
        Ok(())
    }

    /// `routing set` (to the store the tenant is on, so no data is stranded whoever wins)
    /// beside `migrate start`, for a tenant without an active migration: one of them must be
    /// refused or both must leave a consistent route (the final check).
    async fn op_race_routing_start(&mut self, rng: &mut Rng, t: usize) -> Result<()> {
        let tenant = self.tenants[t].to_string();
        let active = self.migrations(true).await?;
        if active.iter().any(|m| m["tenant_id"] == tenant.as_str()) {
            return Ok(());
        }
        let route = self.control_ok(&["routing", "get", &tenant]).await?;
        let here = route["store_id"].as_str().unwrap_or(STORES[0]).to_owned();
        let others: Vec<&str> = STORES.iter().copied().filter(|s| *s != here).collect();
        let to = others[rng.below(others.len())];
        let offset = rng.millis(0, 40);
        let start = [
            "migrate",
            "start",
            "--tenant",
            &tenant,
            "--to",
            to,
            "--detach",
            "--reset-target",
            "--batch-size",
            "100",
        ];
        let set = ["routing", "set", tenant.as_str(), here.as_str()];
        let (a, b) = tokio::join!(self.control(&start), async {
            tokio::time::sleep(offset).await;
            self.control(&set).await
        });
        let (a, b) = (a?, b?);
        self.record(
            "race: migrate start vs routing set",
            &format!("tenant {t} to {to}"),
            &a,
        );
        self.record(
            "race: routing set vs migrate start",
            &format!("tenant {t} on {here} +{offset:?}"),
            &b,
        );
        self.note_started(t, &a)?;
        Ok(())
    }

    /// An append with client ids, then the same events again in another order (a client that
    /// rebuilt its batch before retrying): the retry must be refused (409) or answered with
    /// what was stored; either way the events stay at the versions first acknowledged.
    async fn op_reordered_retry(&mut self, rng: &mut Rng, t: usize) -> Result<()> {
        let tenant = self.tenants[t];
        let p = rng.below(self.proxies.len());
        let q = rng.below(self.proxies.len());
        let stream = Uuid::new_v4();
        let n = 2 + rng.below(3);
        let body = events_body(Some(0), n, "Retried");
        let ids = body_ids(&body);
        // Half the time, cut the connections to the tenant's migration target right after the
        // reply, so the mirror of the first append likely fails and the retry's mirror is the
        // first to reach the target.
        let target = self
            .migrations(true)
            .await?
            .into_iter()
            .find(|m| m["tenant_id"] == tenant.to_string() && m["state"] == "dual_write")
            .and_then(|m| m["target_store_id"].as_str().map(str::to_owned));
        let cut = target
            .and_then(|s| STORES.iter().position(|x| *x == s))
            .filter(|_| rng.chance(50));
        let Some(first) = self.post_until_answered(p, tenant, stream, &body).await? else {
            self.log.push(format!(
                "reordered retry tenant {t}: first append never answered (faults)"
            ));
            return Ok(());
        };
        ensure!(
            first.status == StatusCode::CREATED,
            "tenant {t}: a fresh append was refused: {} {}",
            first.status,
            first.json
        );
        if let Some(g) = cut {
            self.gates[g].reset();
        }
        self.extra_acked[t].push(acked_from(stream, ids.clone(), &first.json));
        let mut reordered = body.clone();
        if let Some(events) = reordered["events"].as_array_mut() {
            events.reverse();
        }
        let Some(retry) = self
            .post_until_answered(q, tenant, stream, &reordered)
            .await?
        else {
            self.log.push(format!(
                "reordered retry tenant {t}: retry never answered (faults)"
            ));
            return Ok(());
        };
        let outcome = match retry.status {
            StatusCode::CONFLICT => "refused",
            StatusCode::CREATED => {
                // Answered: it must describe what was stored (the first append's result),
                // event by event where the reply says which event is where.
                ensure!(
                    retry.json["first_version"] == first.json["first_version"]
                        && retry.json["last_version"] == first.json["last_version"],
                    "tenant {t}: a reordered retry was answered {} but the append stored {}",
                    retry.json,
                    first.json
                );
                if let Some(events) = retry.json["events"].as_array() {
                    let first_version = first.json["first_version"].as_i64().unwrap_or(-1);
                    for e in events {
                        let id = e["event_id"].as_str().and_then(|s| Uuid::parse_str(s).ok());
                        let at = id.and_then(|id| ids.iter().position(|x| *x == id));
                        ensure!(
                            at.is_some_and(
                                |i| e["version"].as_i64() == Some(first_version + i as i64)
                            ),
                            "tenant {t}: a reordered retry reported {e} but the append stored {}",
                            first.json
                        );
                    }
                }
                "ok"
            }
            status => bail!(
                "tenant {t}: a reordered retry answered {status} {}",
                retry.json
            ),
        };
        *self
            .tally
            .entry(("reordered retry".to_owned(), outcome))
            .or_default() += 1;
        self.log.push(format!(
            "reordered retry tenant {t} ({n} events, proxies {p} then {q}) -> {}",
            retry.status
        ));
        Ok(())
    }

    /// Posts until a non-5xx answer (15 s at most; `None` then).
    async fn post_until_answered(
        &self,
        p: usize,
        tenant: Uuid,
        stream: Uuid,
        body: &Value,
    ) -> Result<Option<switchyard_tests::Reply>> {
        let url = stream_url(&self.proxies[p].data, tenant, "Retry", stream);
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            match self.http.post(&url, body).await {
                Ok(r) if !r.status.is_server_error() => return Ok(Some(r)),
                _ if Instant::now() > until => return Ok(None),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Plants a row of another tenant in a store the tenant is not on: either with the event
    /// id of one of the tenant's events, or on one of its streams. A later migration of the
    /// tenant there must be refused or stop with the divergence named — never count the
    /// foreign row as its own, splice onto it, or delete it.
    async fn op_collision(&mut self, rng: &mut Rng, t: usize) -> Result<()> {
        if self.collisions.len() >= 4 {
            return Ok(());
        }
        let tenant = self.tenants[t];
        let route = self
            .control_ok(&["routing", "get", &tenant.to_string()])
            .await?;
        let here = route["store_id"].as_str().unwrap_or(STORES[0]).to_owned();
        let others: Vec<&str> = STORES.iter().copied().filter(|s| *s != here).collect();
        let there = others[rng.below(others.len())];
        let theirs = tenant_events(self.env.store_url(&here), tenant).await?;
        let seeded: Vec<&EventRow> = theirs
            .iter()
            .filter(|e| e.digest.starts_with("Seed|"))
            .collect();
        let Some(pick) = seeded.get(rng.below(seeded.len().max(1))) else {
            return Ok(());
        };
        let (kind, event_id, aggregate_type, aggregate_id) = if rng.chance(50) {
            (
                "event id",
                pick.event_id,
                "Hostile".to_owned(),
                Uuid::new_v4(),
            )
        } else {
            (
                "stream",
                Uuid::new_v4(),
                "Seed".to_owned(),
                pick.aggregate_id,
            )
        };
        let planted = plant(
            self.env.store_url(there),
            self.hostile,
            event_id,
            &aggregate_type,
            aggregate_id,
        )
        .await?;
        *self
            .tally
            .entry((
                format!("collision: {kind}"),
                if planted { "ok" } else { "refused" },
            ))
            .or_default() += 1;
        self.log.push(format!(
            "collision: a foreign row with tenant {t}'s {kind} in {there} ({event_id} {aggregate_type}/{aggregate_id}) -> {}",
            if planted { "planted" } else { "already taken there" }
        ));
        if !planted {
            return Ok(());
        }
        self.collisions
            .push((there.to_owned(), event_id, aggregate_type, aggregate_id, 1));
        // Then move the tenant there (when it is not migrating): the start must refuse, naming
        // the collision; a migration that starts anyway is left to the rest of the soak, and
        // the final checks find what it lost.
        let active = self.migrations(true).await?;
        if active.iter().any(|m| m["tenant_id"] == tenant.to_string()) {
            return Ok(());
        }
        let tenant = tenant.to_string();
        let args = [
            "migrate",
            "start",
            "--tenant",
            &tenant,
            "--to",
            there,
            "--detach",
            "--reset-target",
            "--batch-size",
            "100",
        ];
        let out = self.control(&args).await?;
        self.record(
            "collision: migrate start",
            &format!("tenant {t} to {there}"),
            &out,
        );
        self.note_started(t, &out)?;
        Ok(())
    }

    /// Every planted foreign row is still where it was planted, unchanged.
    async fn check_collisions(&self) -> Result<String> {
        use sqlx::Connection as _;
        for (store, event_id, aggregate_type, aggregate_id, version) in &self.collisions {
            let mut conn = sqlx::PgConnection::connect(self.env.store_url(store)).await?;
            let row: Option<(Option<Uuid>, String, Uuid, i32)> = sqlx::query_as(
                "SELECT tenant_id, aggregate_type, aggregate_id, version FROM events WHERE event_id = $1",
            )
            .bind(event_id)
            .fetch_optional(&mut conn)
            .await?;
            conn.close().await?;
            ensure!(
                row == Some((
                    Some(self.hostile),
                    aggregate_type.clone(),
                    *aggregate_id,
                    *version
                )),
                "the foreign row {event_id} planted in {store} changed or vanished: {row:?}"
            );
        }
        Ok(format!(
            "foreign rows planted and found unchanged: {}",
            self.collisions.len()
        ))
    }

    /// Verifies the tenant's latest migration: whatever its state, a report must say
    /// consistent (before cutover it compares what the tail has reached; after, everything).
    /// A refusal (no bulk copy yet, a store behind a fault) is fine.
    async fn op_verify(&mut self, t: usize) -> Result<()> {
        let Some(id) = self.latest(t) else {
            return Ok(());
        };
        let out = self.control(&["verify", &id, "--level", "hash"]).await?;
        self.record("verify", &format!("tenant {t} {id}"), &out);
        let report = out.json();
        ensure!(
            report["consistent"] != false,
            "verify of migration {id} (tenant {t}) found a difference: {report}"
        );
        Ok(())
    }

    /// Commands that can never succeed: each must be refused with a message.
    async fn op_invalid(&mut self, rng: &mut Rng) -> Result<()> {
        let unknown = Uuid::new_v4().to_string();
        let (op, args): (&str, Vec<&str>) = match rng.below(5) {
            0 => ("invalid: pause", vec!["pause", &unknown]),
            1 => ("invalid: cutover", vec!["cutover", &unknown]),
            2 => (
                "invalid: abort",
                vec!["abort", "not-a-uuid", "--reason", "x"],
            ),
            3 => (
                "invalid: routing set",
                vec!["routing", "set", &unknown, "no-such-store"],
            ),
            _ => (
                "invalid: start",
                vec!["migrate", "start", "--tenant", &unknown, "--to", "nowhere"],
            ),
        };
        let out = self.control(&args).await?;
        self.record(op, "", &out);
        ensure!(out.code != 0, "{args:?} succeeded");
        Ok(())
    }

    /// A latency spike, a reset or a short blackhole on one store's gate.
    fn op_fault(&mut self, rng: &mut Rng) {
        let g = rng.below(self.gates.len());
        let gate = Arc::clone(&self.gates[g]);
        let (what, mode, lasts) = match rng.below(3) {
            0 => {
                let delay = rng.millis(20, 200);
                (
                    format!("latency {delay:?}"),
                    Some(GateMode::Latency(delay)),
                    rng.millis(300, 1500),
                )
            }
            1 => ("reset".to_owned(), None, Duration::ZERO),
            _ => (
                "blackhole".to_owned(),
                Some(GateMode::Blackhole),
                rng.millis(300, 1200),
            ),
        };
        *self
            .tally
            .entry((
                format!("fault {}", what.split(' ').next().unwrap_or("")),
                "ok",
            ))
            .or_default() += 1;
        self.log
            .push(format!("fault on {}: {what} for {lasts:?}", STORES[g]));
        self.faults.retain(|f| !f.is_finished());
        match mode {
            None => gate.reset(),
            Some(mode) => {
                gate.set(mode);
                self.faults.push(tokio::spawn(async move {
                    tokio::time::sleep(lasts).await;
                    gate.set(GateMode::Pass);
                }));
            }
        }
    }

    async fn op_kill_proxy(&mut self, rng: &mut Rng) -> Result<()> {
        let p = rng.below(PROXIES);
        let down = rng.millis(0, 500);
        self.proxies[p].kill9();
        let old = self.proxies[p].log();
        self.save_log(&format!("proxy-{p}-{}", self.log.elapsed_ms()), &old);
        self.check_log("proxy", &old)?;
        self.log
            .push(format!("kill -9 proxy {p}; restart after {down:?}"));
        *self
            .tally
            .entry(("kill -9 proxy".to_owned(), "ok"))
            .or_default() += 1;
        tokio::time::sleep(down).await;
        let listen = self.proxy_addrs[p].clone();
        let mut env = self.gated_env();
        env.push(("SWITCHYARD_PROXY_LISTEN", &listen));
        // The port was just released; a restart on it may race the kernel for a moment.
        let mut tries = 0;
        let proxy = loop {
            match ProxyProcess::spawn(&self.env.config_path, &env) {
                Ok(proxy) => break proxy,
                Err(e) if tries < 20 => {
                    tries += 1;
                    self.log.push(format!("  proxy {p} restart failed: {e:#}"));
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e.context(format!("restarting proxy {p} on {listen}"))),
            }
        };
        // Not waiting for readiness: a proxy that cannot reach a store yet (a fault, or the
        // server out of connections) is unready but serves what it can; settling waits.
        self.proxies[p] = proxy;
        Ok(())
    }

    async fn op_kill_serve(&mut self, rng: &mut Rng) -> Result<()> {
        let w = rng.below(SERVES);
        let down = rng.millis(0, 3000);
        self.serves[w].kill9();
        let old = self.serves[w].log();
        self.save_log(&format!("serve-{w}-{}", self.log.elapsed_ms()), &old);
        self.check_log("serve", &old)?;
        self.log
            .push(format!("kill -9 serve {w}; restart after {down:?}"));
        *self
            .tally
            .entry(("kill -9 serve".to_owned(), "ok"))
            .or_default() += 1;
        tokio::time::sleep(down).await;
        self.serves[w] = self.spawn_serve(w)?;
        Ok(())
    }

    fn check_log(&self, what: &str, log: &str) -> Result<()> {
        ensure!(
            !log.contains("panicked"),
            "a {what} panicked; its log:\n{log}"
        );
        Ok(())
    }

    fn check_process_logs(&self) -> Result<()> {
        for p in &self.proxies {
            self.check_log("proxy", &p.log())?;
        }
        for s in &self.serves {
            self.check_log("serve", &s.log())?;
        }
        Ok(())
    }

    /// Every migration record, oldest first.
    async fn migrations(&self, active: bool) -> Result<Vec<Value>> {
        let mut args = vec!["list"];
        if active {
            args.push("--active");
        }
        let list = self.control_ok(&args).await?;
        let mut records = list
            .as_array()
            .cloned()
            .ok_or_else(|| anyhow!("list printed no array: {list}"))?;
        records.sort_by_key(|r| {
            chrono::DateTime::parse_from_rfc3339(r["created_at"].as_str().unwrap_or_default()).ok()
        });
        Ok(records)
    }

    async fn check_one_active_per_tenant(&self) -> Result<()> {
        let mut per_tenant: HashMap<String, usize> = HashMap::new();
        for m in self.migrations(true).await? {
            *per_tenant
                .entry(m["tenant_id"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        ensure!(
            per_tenant.values().all(|n| *n <= 1),
            "a tenant has two non-terminal migrations: {per_tenant:?}"
        );
        Ok(())
    }

    /// Stops the faults and brings every migration to a terminal state: paused ones resume,
    /// dual-writing ones are cut over (aborted after five refused tries or 75 s), the rest get
    /// time to reach dual-write and are aborted if they do not.
    async fn settle(&mut self) -> Result<()> {
        for f in self.faults.drain(..) {
            f.abort();
        }
        for gate in &self.gates {
            gate.set(GateMode::Pass);
        }
        self.log.push("settle: faults stopped");
        for (i, proxy) in self.proxies.iter().enumerate() {
            let mut tries = 0;
            while let Err(e) = proxy.wait_ready(&self.http).await {
                tries += 1;
                ensure!(
                    tries < 3,
                    "proxy {i} not ready 60 s after the faults stopped: {e:#}"
                );
            }
        }
        let started = Instant::now();
        let mut cutover_tries: HashMap<String, usize> = HashMap::new();
        loop {
            let active = self.migrations(true).await?;
            if active.is_empty() {
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(150),
                "migrations still active 150 s into settling: {:?}",
                active
                    .iter()
                    .map(|m| format!("{} {}", m["id"], m["state"]))
                    .collect::<Vec<_>>()
            );
            let late = started.elapsed() > Duration::from_secs(75);
            for m in active {
                let id = m["id"].as_str().unwrap_or_default().to_owned();
                let t = self
                    .tenants
                    .iter()
                    .position(|x| m["tenant_id"] == x.to_string())
                    .unwrap_or(usize::MAX);
                let tries = cutover_tries.get(&id).copied().unwrap_or(0);
                match m["state"].as_str().unwrap_or_default() {
                    "paused" => {
                        let out = self.control(&["resume", &id]).await?;
                        self.record("settle: resume", &format!("tenant {t} {id}"), &out);
                        if out.code == 0 {
                            self.succeeded.push((id, "resume"));
                        }
                    }
                    "dual_write" if !late && tries < 5 => {
                        let out = self
                            .control(&["cutover", &id, "--timeout-ms", "5000"])
                            .await?;
                        self.record("settle: cutover", &format!("tenant {t} {id}"), &out);
                        *cutover_tries.entry(id.clone()).or_default() += 1;
                        if out.code == 0 {
                            self.succeeded.push((id, "cutover"));
                        }
                    }
                    "pending" | "bulk_copy" | "cutover" if !late => {}
                    _ => {
                        let out = self
                            .control(&["abort", &id, "--reason", "soak settle"])
                            .await?;
                        self.record("settle: abort", &format!("tenant {t} {id}"), &out);
                        if out.code == 0 {
                            self.succeeded.push((id, "abort"));
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.log.push(format!(
            "settle: every migration terminal after {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        // Let the writers append on the final routes for a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }

    /// The invariants the end state can show, each against the writers' record:
    ///
    /// 1. no migration is left non-terminal, and the tenant's migrations form a chain: each one's
    ///    source is where the tenant lived when it was created (the default store, or the
    ///    target of its last `migrated` migration) — the authoritative store;
    /// 2. the control routing and every proxy route the tenant to that store, `normal`;
    /// 3. the authoritative store holds exactly the seeded events (unchanged) plus every
    ///    acknowledged append, each once, at its acknowledged stream and versions; no event id
    ///    twice; every stream's versions are 1..n without a gap;
    /// 4. every acknowledged append was acknowledged by a store that was the tenant's
    ///    authoritative one at some time;
    /// 5. any other store holding the tenant's events is one its migrations named (a source it
    ///    left, or a target it was copied to and then aborted), and holds a stale copy only:
    ///    every event there is in the authoritative store identically (same stream, version,
    ///    id, type, payload, actor, timestamp), and each stream there is a gapless prefix
    ///    1..k (the target-order rule);
    /// 6. fences: open (or absent) in the authoritative store; `moved` in a store the tenant
    ///    left by a cutover unless a later migration targeted it (starting one reopens it);
    /// 7. the audit log of every migration is an unbroken chain of state changes from `create`
    ///    (→ pending) to its final state, and holds every operator action that exited 0;
    /// 8. `verify --level full` is consistent for every migrated migration whose source no later
    ///    migration of the tenant targeted (a later `--reset-target` rewrites it).
    async fn check_invariants(
        &self,
        initial: &[Vec<EventRow>],
        acked: &[Vec<Acked>],
    ) -> Result<String> {
        let all = self.migrations(false).await?;
        ensure!(
            all.iter().all(|m| matches!(
                m["state"].as_str(),
                Some("migrated" | "rolled_back" | "failed")
            )),
            "a migration is not terminal after settling"
        );
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        let mut verified = 0;
        let (mut stale_copies, mut stale_events, mut moved_fences) = (0, 0, 0);
        for (t, tenant) in self.tenants.iter().enumerate() {
            let mine: Vec<&Value> = all
                .iter()
                .filter(|m| m["tenant_id"] == tenant.to_string())
                .collect();
            let ids: Vec<&str> = mine.iter().filter_map(|m| m["id"].as_str()).collect();
            let started: Vec<&str> = self.started[t].iter().map(String::as_str).collect();
            ensure!(
                ids == started,
                "tenant {t}: migrations in the control database {ids:?} are not the ones \
                 started {started:?}"
            );
            // 1. The chain of authority.
            let mut auth = STORES[0].to_owned();
            let mut lived = vec![auth.clone()];
            let mut named: HashSet<String> = HashSet::new();
            for m in &mine {
                *states
                    .entry(m["state"].as_str().unwrap_or_default().to_owned())
                    .or_default() += 1;
                ensure!(
                    m["source_store_id"] == auth.as_str(),
                    "tenant {t}: migration {} left from {} while the tenant lived on {auth}",
                    m["id"],
                    m["source_store_id"]
                );
                named.insert(m["source_store_id"].as_str().unwrap_or_default().to_owned());
                named.insert(m["target_store_id"].as_str().unwrap_or_default().to_owned());
                if m["state"] == "migrated" {
                    auth = m["target_store_id"].as_str().unwrap_or_default().to_owned();
                    lived.push(auth.clone());
                }
            }
            // 2. Routing, in the control database and in every proxy.
            let route = self
                .control_ok(&["routing", "get", &tenant.to_string()])
                .await?;
            ensure!(
                route["store_id"] == auth.as_str() && route["migration_state"] == "normal",
                "tenant {t}: control routing {route} but it lives on {auth}"
            );
            for (p, proxy) in self.proxies.iter().enumerate() {
                wait_for(Duration::from_secs(10), || async {
                    let r = route_state(&self.http, proxy, *tenant).await?;
                    Ok(r["store_id"] == auth.as_str() && r["state"] == "normal")
                })
                .await
                .with_context(|| format!("tenant {t}: proxy {p} never routed it to {auth}"))?;
            }
            // 3. The authoritative store: seeded + acknowledged, exactly.
            let events = tenant_events(self.env.store_url(&auth), *tenant).await?;
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                assert_all_acked(&acked[t], &events);
            }));
            if let Err(panic) = caught {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                bail!("tenant {t} on {auth}: {msg}");
            }
            let mut expected: HashSet<Uuid> = initial[t].iter().map(|e| e.event_id).collect();
            let seeded = expected.len();
            for a in &acked[t] {
                expected.extend(a.event_ids.iter().copied());
            }
            let held: HashSet<Uuid> = events.iter().map(|e| e.event_id).collect();
            ensure!(
                held == expected && events.len() == expected.len(),
                "tenant {t} on {auth}: holds {} events, expected {} (seeded {seeded} + \
                 acknowledged); {} unexpected, {} missing",
                events.len(),
                expected.len(),
                held.difference(&expected).count(),
                expected.difference(&held).count()
            );
            let by_id: HashMap<Uuid, &EventRow> = events.iter().map(|e| (e.event_id, e)).collect();
            for e in &initial[t] {
                ensure!(
                    by_id.get(&e.event_id) == Some(&e),
                    "tenant {t}: seeded event {} changed on {auth}",
                    e.event_id
                );
            }
            ensure_gapless(&events).with_context(|| format!("tenant {t} on {auth}"))?;
            // 4. Acknowledged by a store the tenant lived on.
            for a in &acked[t] {
                ensure!(
                    lived.contains(&a.store_id),
                    "tenant {t}: an append was acknowledged by {} but the tenant lived on \
                     {lived:?}",
                    a.store_id
                );
            }
            // 5. Stale copies elsewhere.
            for (store, url) in &self.env.stores {
                if *store == auth {
                    continue;
                }
                let copy = tenant_events(url, *tenant).await?;
                if copy.is_empty() {
                    continue;
                }
                ensure!(
                    named.contains(store),
                    "tenant {t}: {} events in {store}, which none of its migrations named",
                    copy.len()
                );
                for e in &copy {
                    ensure!(
                        by_id.get(&e.event_id) == Some(&e),
                        "tenant {t}: {store} holds event {} (stream {} version {}) that the \
                         authoritative {auth} does not hold identically",
                        e.event_id,
                        e.aggregate_id,
                        e.version
                    );
                }
                ensure_gapless(&copy).with_context(|| format!("tenant {t}'s copy in {store}"))?;
                stale_copies += 1;
                stale_events += copy.len();
            }
            // 6. Fences.
            ensure!(
                matches!(
                    fence(self.env.store_url(&auth), *tenant).await?.as_deref(),
                    None | Some("open")
                ),
                "tenant {t}: its fence in the authoritative {auth} is not open"
            );
            for (i, m) in mine.iter().enumerate() {
                let left = m["source_store_id"].as_str().unwrap_or_default();
                if m["state"] == "migrated"
                    && left != auth
                    && !mine[i + 1..]
                        .iter()
                        .any(|later| later["target_store_id"] == left)
                {
                    let state = fence(self.env.store_url(left), *tenant).await?;
                    ensure!(
                        matches!(state.as_deref(), Some("moved" | "copiers")),
                        "tenant {t}: it left {left} by migration {} but the fence there is \
                         {state:?}",
                        m["id"]
                    );
                    moved_fences += 1;
                }
            }
            // 7. Audit, and 8. verification.
            for (i, m) in mine.iter().enumerate() {
                let id = m["id"].as_str().unwrap_or_default();
                let audit = self.control_ok(&["audit", id]).await?;
                check_audit(&audit, m, &self.succeeded)
                    .with_context(|| format!("tenant {t}: audit log of migration {id}"))?;
                let source = m["source_store_id"].as_str().unwrap_or_default();
                if m["state"] == "migrated"
                    && !mine[i + 1..]
                        .iter()
                        .any(|later| later["target_store_id"] == source)
                {
                    let report = self.control_ok(&["verify", id, "--level", "full"]).await?;
                    ensure!(
                        report["consistent"] == true,
                        "tenant {t}: verify of migrated {id}: {report}"
                    );
                    verified += 1;
                }
            }
            self.log.push(format!(
                "check tenant {t}: on {auth} with {} events ({seeded} seeded), lived on \
                 {lived:?}, {} migrations",
                events.len(),
                mine.len()
            ));
        }
        Ok(format!(
            "migrations by final state: {states:?}; migrated ones verified (full): {verified}; \
             stale copies checked: {stale_copies} ({stale_events} events); moved fences \
             checked: {moved_fences}"
        ))
    }
}

/// Each stream's versions are exactly 1..n (events sorted by stream and version).
fn ensure_gapless(events: &[EventRow]) -> Result<()> {
    let mut last: Option<(Uuid, i32)> = None;
    for EventRow {
        aggregate_id: stream,
        version,
        event_id: id,
        ..
    } in events
    {
        let want = match last {
            Some((s, v)) if s == *stream => v + 1,
            _ => 1,
        };
        ensure!(
            *version == want,
            "stream {stream}: version {version} (event {id}) where {want} was due"
        );
        last = Some((*stream, *version));
    }
    Ok(())
}

/// The audit entries that change state chain from `create` (→ pending) to the migration's
/// final state, each starting where the one before ended; every operator action that exited 0
/// is there.
fn check_audit(audit: &Value, migration: &Value, succeeded: &[(String, &str)]) -> Result<()> {
    let entries = audit
        .as_array()
        .ok_or_else(|| anyhow!("audit printed no array: {audit}"))?;
    let changes: Vec<&Value> = entries
        .iter()
        .filter(|e| !e["to_state"].is_null())
        .collect();
    let first = changes.first().ok_or_else(|| anyhow!("no state change"))?;
    ensure!(
        first["action"] == "create"
            && first["from_state"].is_null()
            && first["to_state"] == "pending",
        "the first change is not the creation: {first}"
    );
    for pair in changes.windows(2) {
        ensure!(
            pair[1]["from_state"] == pair[0]["to_state"],
            "a state change is missing between {} and {}",
            pair[0],
            pair[1]
        );
    }
    let last = changes.last().map_or(&Value::Null, |e| &e["to_state"]);
    ensure!(
        *last == migration["state"],
        "the log ends in {last} but the migration is {}",
        migration["state"]
    );
    let id = migration["id"].as_str().unwrap_or_default();
    let mut wanted: HashMap<&str, usize> = HashMap::new();
    for (m, action) in succeeded {
        if m == id {
            *wanted.entry(action).or_default() += 1;
        }
    }
    for (action, n) in wanted {
        let logged = entries.iter().filter(|e| e["action"] == action).count();
        ensure!(
            logged >= n,
            "{n} successful `{action}` commands but {logged} `{action}` entries"
        );
    }
    Ok(())
}

/// The client event ids of an append body, in order.
fn body_ids(body: &Value) -> Vec<Uuid> {
    body["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["event_id"].as_str().and_then(|s| Uuid::parse_str(s).ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// An acknowledged append as the writers record it.
fn acked_from(stream: Uuid, event_ids: Vec<Uuid>, reply: &Value) -> Acked {
    Acked {
        aggregate_id: stream,
        event_ids,
        first_version: reply["first_version"].as_i64().unwrap_or(-1),
        store_id: reply["store_id"].as_str().unwrap_or_default().to_owned(),
    }
}

/// Inserts one row of `tenant` straight into a store (as a restore or another application
/// would); false when the id or the stream's version 1 is taken there.
async fn plant(
    url: &str,
    tenant: Uuid,
    event_id: Uuid,
    aggregate_type: &str,
    aggregate_id: Uuid,
) -> Result<bool> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let inserted = sqlx::query(
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, version, timestamp, payload)
         VALUES ($1, $2, $3, 'Planted', $4, 1, now(), '{\"foreign\": true}')
         ON CONFLICT DO NOTHING",
    )
    .bind(event_id)
    .bind(aggregate_id)
    .bind(aggregate_type)
    .bind(tenant)
    .execute(&mut conn)
    .await?
    .rows_affected();
    conn.close().await?;
    Ok(inserted == 1)
}
