// Run: cargo build --release -p switchyard-control && cargo run --release -p switchyard-benches --bin cutover -- --events 1000000 --writers 16 --proxies 2 --runs 1
// Paced: cargo run --release -p switchyard-benches --bin cutover -- --events 100000 --writers 8 --runs 5 --rate 800
// Smoke: cargo run --release -p switchyard-benches --bin cutover -- --smoke [--rate 200]
// Revert: cargo run --release -p switchyard-benches --bin cutover -- --events 100000 --runs 4 --revert

//! The write pause of a cutover under load (issue 4, "Performance"): a tenant of `--events`
//! events is migrated from the store `shared` to the store `dedicated` by the real
//! `switchyard-control` (`serve` as a process, `migrate start`, `cutover`), while `--writers`
//! writers spread over `--proxies` in-process proxies append to it continuously.
//!
//! The harness creates three fresh databases (`sy_co_<random>_control`, `…_shared`,
//! `…_dedicated`), writes a config file for them (`routing_poll_ms = 200`,
//! `gate_wait_ms = 10000`), runs `switchyard-control init`, seeds the tenant with one
//! `INSERT … SELECT` on the source, starts `switchyard-control serve` and the proxies, starts
//! the migration and waits for dual_write with lag 0. Then every writer appends one event per
//! request with `expected_version` to a few streams of its own, retrying a 503 with the same
//! body (appends are idempotent by event id). By default each writer sends its next append as
//! soon as the last one is acknowledged (closed loop: the saturated scenario); with `--rate R`
//! the writers share a fixed schedule of R appends/s (open loop: writer w's k-th append is due
//! at `(k + w / writers) · writers / R` seconds), and a latency runs from the append's *intended*
//! send time, so an append queued behind a paused one counts its wait too (no coordinated
//! omission). After `--steady-seconds` the harness runs
//! `switchyard-control cutover` and keeps writing `--after-seconds` more. It reports appends/s
//! before, during (the cutover command's wall-clock window) and after; client-observed latency
//! overall and of the appends that overlapped the window (their maximum is the longest writer
//! pause); the proxies' `switchyard_proxy_gate_wait_seconds` buckets (summed); and checks that
//! every acknowledged event id is in the target exactly once. With `--runs K` the tenant is then
//! migrated back (`--reset-target`) and cut over again, and so on. Output: one JSON line and a
//! Markdown table. The databases, the config file, `serve` and the proxies are removed or
//! stopped at the end, also after a failure or Ctrl-C.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use switchyard_benches::args::Common;
use switchyard_benches::report::{block_on, load_averages, quantile};
use switchyard_benches::{toml_string, wait_ready, with_database};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use switchyard_client::{
    AdminClient, DataClient, Load, LoadPlan, NewEvent, Pacing, Protocol, RoutingState, Transport,
};
use switchyard_config::Config;
use switchyard_proxy::App;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Targets from issue 4, printed beside the figures (a benchmark never fails on a time).
const TARGET_PAUSE_MS: f64 = 50.0;
const TARGET_WINDOW_P99_MS: f64 = 20.0;
const AGGREGATE_TYPE: &str = "BenchAccount";
const EVENT_TYPE: &str = "Deposited";
const ACTOR: &str = "cutover-bench";
/// Appends completing in the first this-long of a run are warm-up (not in the "before" rate).
const WARMUP: Duration = Duration::from_secs(1);
/// Cutover attempts per run before the run is reported as failed (a rolled-back attempt leaves
/// the migration dual-writing, so the next run could not start).
const CUTOVER_ATTEMPTS: usize = 5;
/// How long `migrate start` may take to reach dual_write with lag 0.
const MIGRATION_LIMIT: Duration = Duration::from_secs(1800);

/// Measures a cutover's write pause under continuous load over several proxies.
#[derive(Debug, Clone, Parser)]
#[command(name = "cutover")]
struct Args {
    /// Events seeded in the tenant before the migration.
    #[arg(long, default_value_t = 1_000_000)]
    events: i64,
    /// Concurrent writers, spread round-robin over the proxies.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// In-process proxies.
    #[arg(long, default_value_t = 2)]
    proxies: usize,
    /// Cutovers (run 2 migrates back to `shared` with --reset-target, and so on).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Runs after the first undo the last one with `revert` (issue 19: the cutover back to the
    /// store the tenant left, kept current by reverse replication) instead of migrating back
    /// with `--reset-target`: its pause beside the forward cutover's, same scenario.
    #[arg(long)]
    revert: bool,
    /// Streams each writer appends to, round robin.
    #[arg(long, default_value_t = 3)]
    streams_per_writer: usize,
    /// Seconds of writing before the cutover command.
    #[arg(long, default_value_t = 5.0)]
    steady_seconds: f64,
    /// Before each run's writers start, `VACUUM (ANALYZE) events` in both stores. Migrating
    /// the same tenant back and forth with `--reset-target` deletes and re-inserts a million
    /// rows with the same keys in each store every two runs; without a vacuum, the dead index
    /// entries pile up faster than autovacuum removes them and every lookup by event id or
    /// stream walks them. Off by default: the default measures what autovacuum leaves.
    #[arg(long)]
    vacuum_between_runs: bool,
    /// Seconds of writing after the cutover command returns.
    #[arg(long, default_value_t = 4.0)]
    after_seconds: f64,
    /// `max_connections` of every store pool (each proxy and each control process has one per
    /// store).
    #[arg(long, default_value_t = 8)]
    pool_size: u32,
    /// The `switchyard-control` binary (default: `$CARGO_TARGET_DIR/release/…`, else the
    /// workspace's `target/release/…`).
    #[arg(long)]
    control_bin: Option<PathBuf>,
    /// Log filter of the in-process proxies.
    #[arg(long, default_value = "warn")]
    log: String,
    /// Open loop: the writers together send this many appends per second on a fixed schedule
    /// (latency from each append's intended send time). Without it, closed loop (saturated).
    #[arg(long)]
    rate: Option<f64>,
    #[command(flatten)]
    common: Common,
}

impl Args {
    fn effective(mut self) -> Self {
        if self.common.smoke {
            self.events = 20_000;
            self.writers = 4;
            self.runs = if self.revert { 2 } else { 1 };
            self.steady_seconds = 2.0;
            self.after_seconds = 2.0;
        }
        self
    }

    fn control_bin(&self) -> PathBuf {
        if let Some(bin) = &self.control_bin {
            return bin.clone();
        }
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
            || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")),
            PathBuf::from,
        );
        target.join("release").join("switchyard-control")
    }
}

// ---------------------------------------------------------------------------------------------
// Writers

/// One append as the client saw it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// When it was first sent (open loop: when it was due), µs since the run's origin.
    sent_us: u64,
    /// First send (open loop: its intended send time) to the acknowledgement, retries
    /// included, µs.
    latency_us: u64,
    retries: u32,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The writers' plan: `streams` streams each, one event per append with a fresh v7 id,
/// retrying 5 ms apart until acknowledged (a refusal that is not retryable abandons the
/// stream for a new one); open loop at `rate` appends/s shared by `writers`, else closed.
fn load_plan(
    tenant: Uuid,
    streams: usize,
    writers: usize,
    rate: Option<f64>,
    origin: Instant,
) -> LoadPlan {
    let pacing = match rate {
        Some(rate) => Pacing::Open {
            every: Duration::from_secs_f64(writers as f64 / rate),
            stagger: Duration::from_secs_f64(1.0 / rate),
        },
        None => Pacing::Closed {
            pause: Duration::ZERO,
        },
    };
    LoadPlan {
        aggregate_type: AGGREGATE_TYPE.to_owned(),
        streams: streams.max(1),
        pacing,
        retry_pause: Duration::from_millis(5),
        origin,
        ..LoadPlan::new(tenant)
    }
    .with_events(|writer, seq| {
        vec![NewEvent {
            event_id: Uuid::now_v7(),
            ..NewEvent::new(
                EVENT_TYPE,
                json!({
                    "writer": writer,
                    "seq": seq,
                    "amount_cents": 1000 + seq % 997,
                    "note": "cutover benchmark padding........",
                }),
            )
            .with_actor(ACTOR)
        }]
    })
}

// ---------------------------------------------------------------------------------------------
// Processes and HTTP helpers

/// Runs `switchyard-control --config FILE --json ARGS…`, answering its JSON and exit status.
async fn control(bin: &PathBuf, config: &PathBuf, args: &[&str]) -> Result<(bool, Value)> {
    let output = Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .or_else(|| serde_json::from_str::<Value>(stdout.trim()).ok());
    match value {
        Some(v) => Ok((output.status.success(), v)),
        None if output.status.success() => Ok((true, Value::Null)),
        None => bail!(
            "switchyard-control {}: {}\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

async fn control_ok(bin: &PathBuf, config: &PathBuf, args: &[&str]) -> Result<Value> {
    let (ok, value) = control(bin, config, args).await?;
    if !ok {
        bail!("switchyard-control {} failed: {value}", args.join(" "));
    }
    Ok(value)
}

/// Waits until the proxy's route for `tenant` is `state`.
async fn wait_route(admin: &AdminClient, tenant: Uuid, state: RoutingState) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(route) = admin.route(tenant).await {
            if route.route.state == state {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("a proxy did not route {tenant} as {state:?} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The proxy's gate-wait histogram (cumulative buckets by `le`, then count and sum) and its
/// fence rejections, from `/metrics`.
#[derive(Debug, Clone, Default)]
struct GateMetrics {
    buckets: BTreeMap<String, f64>,
    count: f64,
    sum: f64,
    fence_rejections: f64,
}

impl GateMetrics {
    fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.trim().parse().unwrap_or(0.0);
            if let Some(rest) = name.strip_prefix("switchyard_proxy_gate_wait_seconds_bucket{") {
                let le = rest
                    .split(',')
                    .find_map(|l| l.strip_prefix("le=\""))
                    .and_then(|v| v.strip_suffix("\"}").or_else(|| v.strip_suffix('"')))
                    .unwrap_or(rest)
                    .to_owned();
                out.buckets.insert(le, value);
            } else if name == "switchyard_proxy_gate_wait_seconds_count" {
                out.count = value;
            } else if name == "switchyard_proxy_gate_wait_seconds_sum" {
                out.sum = value;
            } else if name == "switchyard_proxy_fence_rejections_total" {
                out.fence_rejections = value;
            }
        }
        out
    }

    fn add(&mut self, other: &Self, sign: f64) {
        for (le, v) in &other.buckets {
            *self.buckets.entry(le.clone()).or_default() += sign * v;
        }
        self.count += sign * other.count;
        self.sum += sign * other.sum;
        self.fence_rejections += sign * other.fence_rejections;
    }

    /// Buckets in increasing `le` order.
    fn sorted(&self) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = self.buckets.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort_by(|a, b| {
            let f = |s: &str| s.parse::<f64>().unwrap_or(f64::INFINITY);
            f(&a.0).total_cmp(&f(&b.0))
        });
        v
    }
}

async fn gate_metrics(admins: &[AdminClient]) -> Result<GateMetrics> {
    let mut total = GateMetrics::default();
    for admin in admins {
        let text = admin.metrics().await?;
        total.add(&GateMetrics::parse(&text), 1.0);
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// Configuration and databases

struct Databases {
    control: String,
    shared: String,
    dedicated: String,
}

/// The config text; `proxy_extra` adds keys to `[proxy]` (the in-process proxies' listeners).
fn config_text(dbs: &Databases, pool_size: u32, proxy_extra: &str) -> String {
    format!(
        "control_url = {}\n\
         default_store = \"shared\"\n\
         \n\
         [[stores]]\n\
         id = \"shared\"\n\
         url = {}\n\
         max_connections = {pool_size}\n\
         \n\
         [[stores]]\n\
         id = \"dedicated\"\n\
         url = {}\n\
         max_connections = {pool_size}\n\
         \n\
         [proxy]\n\
         routing_poll_ms = 200\n\
         gate_wait_ms = 10000\n\
         {proxy_extra}",
        toml_string(&dbs.control),
        toml_string(&dbs.shared),
        toml_string(&dbs.dedicated),
    )
}

async fn seed(url: &str, tenant: Uuid, events: i64) -> Result<()> {
    let mut conn = PgConnection::connect(url).await?;
    sqlx::query(
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, actor_id, version, timestamp, payload)
         SELECT gen_random_uuid(), (md5($1::text || (g / 100)::text))::uuid, 'Seed', 'Seeded', $1, 'seeder',
                (g % 100) + 1, now(), jsonb_build_object('g', g, 'pad', repeat('x', 60))
           FROM generate_series(0, $2 - 1) g",
    )
    .bind(tenant)
    .bind(events)
    .execute(&mut conn)
    .await
    .context("seeding the tenant")?;
    sqlx::query("ANALYZE events").execute(&mut conn).await?;
    let _ = conn.close().await;
    Ok(())
}

/// How many of `ids` the store at `url` holds for `tenant`, and how many it holds twice or more.
async fn count_ids(url: &str, tenant: Uuid, ids: &[Uuid]) -> Result<(u64, u64)> {
    let mut conn = PgConnection::connect(url).await?;
    let mut found = 0u64;
    let mut duplicated = 0u64;
    for chunk in ids.chunks(20_000) {
        let (f, d): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE n > 1) FROM (
                 SELECT count(*) AS n FROM events WHERE tenant_id = $1 AND event_id = ANY($2)
                  GROUP BY event_id) c",
        )
        .bind(tenant)
        .bind(chunk)
        .fetch_one(&mut conn)
        .await?;
        found += u64::try_from(f).unwrap_or(0);
        duplicated += u64::try_from(d).unwrap_or(0);
    }
    let _ = conn.close().await;
    Ok((found, duplicated))
}

// ---------------------------------------------------------------------------------------------
// One run

/// What one cutover run measured.
struct RunResult {
    direction: String,
    migration_id: String,
    /// `migrate start` to dual_write with lag 0, seconds.
    migration_s: f64,
    cutover: Value,
    cutover_ok: bool,
    /// Attempts before the last that rolled back (their `cutover --json` reports).
    rolled_back: Vec<Value>,
    /// The cutover commands' wall-clock window (every attempt), µs since the run's origin.
    window_us: (u64, u64),
    /// Writing stopped, µs since the run's origin.
    end_us: u64,
    samples: Vec<Sample>,
    errors: Vec<String>,
    gate: GateMetrics,
    acked: u64,
    acked_on_target: u64,
    /// The store the tenant ends the run in, where every acknowledged id is looked for.
    ends_in: String,
    /// Acknowledged ids found in `ends_in` (the target unless the cutover failed).
    found_in_target: u64,
    duplicated_in_target: u64,
    target_acked_found_in_source: u64,
}

struct Setup {
    args: Args,
    bin: PathBuf,
    config: PathBuf,
    dbs: Databases,
    /// Writer `w` appends through `proxies[w % len]`.
    proxies: Vec<DataClient>,
    admins: Vec<AdminClient>,
    tenant: Uuid,
}

fn ms(us: u64) -> f64 {
    (us as f64 / 100.0).round() / 10.0
}

impl Setup {
    /// Run `index`: migrates the tenant (back) and cuts over under load; with `undo`, reverts
    /// that migration instead (`revert` is then the command measured).
    async fn run(&self, index: usize, undo: Option<&str>) -> Result<RunResult> {
        let (to, from) = if index.is_multiple_of(2) {
            ("dedicated", "shared")
        } else {
            ("shared", "dedicated")
        };
        let began = Instant::now();
        let id = match undo {
            Some(undo) => {
                eprintln!(
                    "run {}: reverting migration {undo} ({from} → {to})",
                    index + 1
                );
                undo.to_owned()
            }
            None => self.start(index, from, to).await?,
        };
        if undo.is_none() {
            self.until_dual_write(index, &id, began).await?;
        }
        let migration_s = began.elapsed().as_secs_f64();
        for admin in &self.admins {
            let state = if undo.is_some() {
                RoutingState::Normal
            } else {
                RoutingState::DualWrite
            };
            wait_route(admin, self.tenant, state).await?;
        }
        self.cut_over_under_load(index, (from, to), &id, undo.is_some(), migration_s)
            .await
    }

    /// `migrate start` of the tenant to `to` (with `--reset-target` after the first run).
    async fn start(&self, index: usize, from: &str, to: &str) -> Result<String> {
        let tenant = self.tenant.to_string();
        let mut start_args = vec!["migrate", "start", "--tenant", &tenant, "--to", to];
        if index > 0 {
            start_args.push("--reset-target");
        }
        start_args.push("--detach");
        let started = control_ok(&self.bin, &self.config, &start_args).await?;
        let id = started["id"]
            .as_str()
            .ok_or_else(|| anyhow!("migrate start answered no id: {started}"))?
            .to_owned();
        eprintln!("run {}: migration {id} {from} → {to} started", index + 1);
        Ok(id)
    }

    /// Waits for migration `id` to dual-write with lag 0.
    async fn until_dual_write(&self, index: usize, id: &str, began: Instant) -> Result<()> {
        loop {
            let (_, status) = control(&self.bin, &self.config, &["status", id]).await?;
            if status["state"] == "dual_write" && status["lag"] == 0 {
                break;
            }
            if status["state"] == "failed" {
                bail!("migration {id} failed: {status}");
            }
            if began.elapsed() > MIGRATION_LIMIT {
                bail!("migration {id} did not reach dual_write with lag 0: {status}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!(
            "run {}: dual_write, lag 0 after {:.1} s",
            index + 1,
            began.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Starts the writers, runs the cutover (or, `reverting`, `revert` of migration `id`)
    /// after `steady_seconds`, stops them `after_seconds` later, and checks every acknowledged
    /// id in the store the tenant ends in.
    async fn cut_over_under_load(
        &self,
        index: usize,
        (from, to): (&str, &str),
        id: &str,
        reverting: bool,
        migration_s: f64,
    ) -> Result<RunResult> {
        if self.args.vacuum_between_runs {
            for url in [&self.dbs.shared, &self.dbs.dedicated] {
                let mut conn = PgConnection::connect(url).await?;
                sqlx::query("VACUUM (ANALYZE) events")
                    .execute(&mut conn)
                    .await
                    .context("vacuuming a store between runs")?;
                conn.close().await?;
            }
        }
        let gate_before = gate_metrics(&self.admins).await?;

        let origin = Instant::now();
        let plan = load_plan(
            self.tenant,
            self.args.streams_per_writer,
            self.args.writers,
            self.args.rate,
            origin,
        );
        let load = Load::start(&self.proxies, plan, self.args.writers);
        tokio::time::sleep(Duration::from_secs_f64(self.args.steady_seconds)).await;
        let window_start = origin.elapsed();
        // As an operator would: an attempt that rolled back (budget, lag) leaves the migration
        // dual-writing, and is tried again while the writers go on; each is reported.
        let mut rolled_back = Vec::new();
        let mut id = id.to_owned();
        let outcome = loop {
            if reverting {
                // `revert` answers its own report; the cutover back's is inside it.
                let reverted = control(
                    &self.bin,
                    &self.config,
                    &["revert", &id, "--reason", "cutover benchmark"],
                )
                .await;
                if let Ok((_, r)) = &reverted {
                    if let Some(back) = r["revert_migration_id"].as_str() {
                        id = back.to_owned();
                    }
                }
                break reverted.map(|(ok, r)| (ok, r["cutover"].clone()));
            }
            let outcome = control(&self.bin, &self.config, &["cutover", &id]).await;
            let Ok((false, attempt)) = &outcome else {
                break outcome;
            };
            let (_, status) = control(&self.bin, &self.config, &["status", &id]).await?;
            if status["state"] != "dual_write" || rolled_back.len() + 1 >= CUTOVER_ATTEMPTS {
                break outcome;
            }
            eprintln!(
                "run {}: cutover attempt rolled back ({}); trying again",
                index + 1,
                attempt["error"]
            );
            rolled_back.push(attempt.clone());
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let window_end = origin.elapsed();
        tokio::time::sleep(Duration::from_secs_f64(self.args.after_seconds)).await;
        let report = load.stop().await;
        let end = origin.elapsed();
        let samples: Vec<Sample> = report
            .acked
            .iter()
            .map(|a| Sample {
                sent_us: micros(a.sent),
                latency_us: micros(a.latency),
                retries: a.retries,
            })
            .collect();
        let acked: Vec<(Uuid, bool)> = report
            .acked
            .iter()
            .flat_map(|a| a.event_ids.iter().map(|id| (*id, a.store_id == to)))
            .collect();
        let errors: Vec<String> = report
            .failed
            .iter()
            .map(|f| format!("writer {}: {}", f.writer, f.error))
            .collect();
        let (cutover_ok, cutover) = outcome?;
        eprintln!("run {}: cutover {cutover}", index + 1);
        let mut gate = gate_metrics(&self.admins).await?;
        gate.add(&gate_before, -1.0);

        let (target_url, source_url) = if to == "dedicated" {
            (&self.dbs.dedicated, &self.dbs.shared)
        } else {
            (&self.dbs.shared, &self.dbs.dedicated)
        };
        let ids: Vec<Uuid> = acked.iter().map(|(id, _)| *id).collect();
        let on_target: Vec<Uuid> = acked.iter().filter(|a| a.1).map(|a| a.0).collect();
        // Every acknowledged id must be in the store the tenant ends in: the target after a
        // cutover, the source after one that rolled back for good (then the target, the store
        // a revert would have returned to, is only kept current by reverse replication).
        let ends_in = if cutover_ok { to } else { from };
        let lives_url = if cutover_ok { target_url } else { source_url };
        let (found, duplicated) = count_ids(lives_url, self.tenant, &ids).await?;
        let (in_source, _) = count_ids(source_url, self.tenant, &on_target).await?;
        Ok(RunResult {
            direction: if reverting {
                format!("{from}→{to} (revert)")
            } else {
                format!("{from}→{to}")
            },
            migration_id: id,
            migration_s,
            cutover,
            cutover_ok,
            rolled_back,
            window_us: (micros(window_start), micros(window_end)),
            end_us: micros(end),
            samples,
            errors,
            gate,
            acked: ids.len() as u64,
            acked_on_target: on_target.len() as u64,
            ends_in: ends_in.to_owned(),
            found_in_target: found,
            duplicated_in_target: duplicated,
            target_acked_found_in_source: in_source,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Figures

struct Figures {
    before_rate: f64,
    during_rate: f64,
    after_rate: f64,
    overall: [u64; 4],
    window: [u64; 4],
    window_appends: usize,
    retries: u64,
}

/// p50, p99, p99.9 and max of `latencies`.
fn percentiles(mut latencies: Vec<u64>) -> [u64; 4] {
    latencies.sort_unstable();
    [
        quantile(&latencies, 0.50),
        quantile(&latencies, 0.99),
        quantile(&latencies, 0.999),
        latencies.last().copied().unwrap_or(0),
    ]
}

fn figures(r: &RunResult) -> Figures {
    let (w0, w1) = r.window_us;
    let warm = micros(WARMUP);
    let done = |s: &Sample| s.sent_us + s.latency_us;
    let rate = |from: u64, to: u64| {
        let n = r
            .samples
            .iter()
            .filter(|s| done(s) >= from && done(s) < to)
            .count();
        n as f64 / ((to.saturating_sub(from)) as f64 / 1e6).max(1e-9)
    };
    let overlapping: Vec<u64> = r
        .samples
        .iter()
        .filter(|s| s.sent_us < w1 && done(s) > w0)
        .map(|s| s.latency_us)
        .collect();
    Figures {
        before_rate: rate(warm, w0),
        during_rate: rate(w0, w1),
        after_rate: rate(w1, r.end_us),
        overall: percentiles(
            r.samples
                .iter()
                .filter(|s| done(s) >= warm)
                .map(|s| s.latency_us)
                .collect(),
        ),
        window_appends: overlapping.len(),
        window: percentiles(overlapping),
        retries: r.samples.iter().map(|s| u64::from(s.retries)).sum(),
    }
}

fn stats(values: &[f64]) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    json!({
        "min": v[0],
        "median": v[v.len() / 2],
        "p90": v[(v.len() * 9 / 10).min(v.len() - 1)],
        "max": v[v.len() - 1],
        "values": values,
    })
}

fn report(
    args: &Args,
    version: &str,
    load: ([f64; 3], [f64; 3]),
    seed_s: f64,
    runs: &[RunResult],
) -> String {
    let mut run_json = Vec::new();
    let mut table = String::from(
        "| run | direction | cutover ok | duration ms | pause ms | delta events | blocked writers | \
         cutover window ms | appends/s before | during | after | p50 ms | p99 ms | max ms | \
         window appends | window p50 ms | window p99 ms | longest pause ms | 503 retries | \
         acked | lost | duplicated |\n\
         |---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut pauses = Vec::new();
    // `--revert`: the reverts' pauses and longest writer pauses apart from the cutovers'.
    let (mut revert_pauses, mut revert_longest) = (Vec::new(), Vec::new());
    let mut durations = Vec::new();
    let mut longest = Vec::new();
    let mut window_p99 = Vec::new();
    let mut steps: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut all_met = true;
    for (i, r) in runs.iter().enumerate() {
        let f = figures(r);
        let c = &r.cutover;
        let lost = r.acked.saturating_sub(r.found_in_target);
        let reverted = r.direction.ends_with("(revert)");
        if reverted {
            revert_pauses.push(c["pause_ms"].as_f64().unwrap_or(f64::NAN));
            revert_longest.push(ms(f.window[3]));
        } else {
            pauses.push(c["pause_ms"].as_f64().unwrap_or(f64::NAN));
        }
        for (step, ms) in c["steps_ms"].as_object().into_iter().flatten() {
            steps
                .entry(step.clone())
                .or_default()
                .push(ms.as_f64().unwrap_or(f64::NAN));
        }
        durations.push(c["duration_ms"].as_f64().unwrap_or(f64::NAN));
        longest.push(ms(f.window[3]));
        window_p99.push(ms(f.window[1]));
        all_met &= ms(f.window[3]) <= TARGET_PAUSE_MS && ms(f.window[1]) <= TARGET_WINDOW_P99_MS;
        let gate: Vec<Value> = r
            .gate
            .sorted()
            .into_iter()
            .map(|(le, v)| json!([le, v.round()]))
            .collect();
        run_json.push(json!({
            "run": i + 1,
            "direction": r.direction,
            "migration_id": r.migration_id,
            "migration_to_dual_write_lag0_s": (r.migration_s * 10.0).round() / 10.0,
            "cutover": c,
            "cutover_exit_ok": r.cutover_ok,
            "cutover_attempts_rolled_back": r.rolled_back,
            "cutover_window_ms": ms(r.window_us.1 - r.window_us.0),
            "appends_per_s": {"before": f.before_rate.round(), "during": f.during_rate.round(), "after": f.after_rate.round()},
            "latency_ms": {"p50": ms(f.overall[0]), "p99": ms(f.overall[1]), "p999": ms(f.overall[2]), "max": ms(f.overall[3])},
            "window_latency_ms": {"appends": f.window_appends, "p50": ms(f.window[0]), "p99": ms(f.window[1]), "p999": ms(f.window[2]), "max": ms(f.window[3])},
            "retries_503": f.retries,
            "errors": r.errors.len(),
            "first_errors": r.errors.iter().take(3).collect::<Vec<_>>(),
            "gate_wait_seconds": {"buckets_cumulative": gate, "count": r.gate.count.round(), "sum_s": (r.gate.sum * 1e4).round() / 1e4},
            "fence_rejections": r.gate.fence_rejections.round(),
            "acked": r.acked,
            "acked_by_target": r.acked_on_target,
            "ends_in": r.ends_in,
            "found_in_target": r.found_in_target,
            "lost": lost,
            "duplicated_in_target": r.duplicated_in_target,
            "target_acked_found_in_source": r.target_acked_found_in_source,
        }));
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            r.direction,
            if r.rolled_back.is_empty() {
                c["success"].to_string()
            } else {
                format!("{} ({} rolled back first)", c["success"], r.rolled_back.len())
            },
            c["duration_ms"],
            c["pause_ms"],
            c["delta_events"],
            c["blocked_writers"],
            ms(r.window_us.1 - r.window_us.0),
            f.before_rate,
            f.during_rate,
            f.after_rate,
            ms(f.overall[0]),
            ms(f.overall[1]),
            ms(f.overall[3]),
            f.window_appends,
            ms(f.window[0]),
            ms(f.window[1]),
            ms(f.window[3]),
            f.retries,
            r.acked,
            lost,
            r.duplicated_in_target,
        );
    }
    let summary = json!({
        "bench": "cutover",
        "events": args.events,
        "writers": args.writers,
        "proxies": args.proxies,
        "runs": args.runs,
        "streams_per_writer": args.streams_per_writer,
        "steady_seconds": args.steady_seconds,
        "vacuum_between_runs": args.vacuum_between_runs,
        "after_seconds": args.after_seconds,
        "pool_size": args.pool_size,
        "load": args.rate.map_or_else(|| json!("closed loop (saturated)"), |r| json!({"open_loop_rate_per_s": r})),
        "smoke": args.common.smoke,
        "postgres": version,
        "load_average_before": load.0,
        "load_average_after": load.1,
        "seed_s": (seed_s * 10.0).round() / 10.0,
        "pause_ms": stats(&pauses),
        "revert": args.revert,
        "revert_pause_ms": stats(&revert_pauses),
        "revert_longest_writer_pause_ms": stats(&revert_longest),
        "cutover_duration_ms": stats(&durations),
        "longest_writer_pause_ms": stats(&longest),
        "window_p99_ms": stats(&window_p99),
        "steps_ms": steps.iter().map(|(k, v)| (k.clone(), stats(v))).collect::<serde_json::Map<_, _>>(),
        "targets_met": all_met,
        "per_run": run_json,
    });
    let mut out = format!("{summary}\n\n{table}");
    out.push_str(
        "\n| cutover step (ms, over the runs) | min | median | p90 | max |\n|---|---:|---:|---:|---:|\n",
    );
    for (step, values) in &steps {
        let s = stats(values);
        let _ = writeln!(
            out,
            "| {step} | {} | {} | {} | {} |",
            s["min"], s["median"], s["p90"], s["max"]
        );
    }
    for (i, r) in runs.iter().enumerate() {
        let _ = write!(
            out,
            "\nrun {}: proxies' switchyard_proxy_gate_wait_seconds (summed over {} proxies, this run): count {}, sum {:.4} s; cumulative buckets:",
            i + 1,
            args.proxies,
            r.gate.count,
            r.gate.sum
        );
        for (le, v) in r.gate.sorted() {
            let _ = write!(out, " le={le}: {v}");
        }
        let _ = writeln!(out, "; fence rejections {}", r.gate.fence_rejections);
    }
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let max_longest = longest.iter().copied().fold(0.0, f64::max);
    let max_p99 = window_p99.iter().copied().fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "\nlongest writer pause {max_longest} ms (target ≤ {TARGET_PAUSE_MS}: {}); p99 in the cutover window {max_p99} ms (target ≤ {TARGET_WINDOW_P99_MS}: {})\n\
         load average before {:?}, after {:?}",
        verdict(max_longest <= TARGET_PAUSE_MS),
        verdict(max_p99 <= TARGET_WINDOW_P99_MS),
        load.0,
        load.1,
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Orchestration

/// Everything started that must be stopped.
struct Running {
    serve: Option<Child>,
    proxies: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

async fn start_serve(bin: &PathBuf, config: &PathBuf) -> Result<Child> {
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("SWITCHYARD_CONTROL_ADMIN_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting switchyard-control serve")?;
    let stdout = child.stdout.take().context("serve's stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("serve did not say it was listening within 30 s")??
        .context("serve exited before listening")?;
    if !first.starts_with("switchyard-control serve listening") {
        bail!("serve said {first:?}");
    }
    eprintln!("{first}");
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

async fn measure(
    args: &Args,
    dbs: Databases,
    config: PathBuf,
    running: &mut Running,
) -> Result<(f64, Vec<RunResult>)> {
    let bin = args.control_bin();
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p switchyard-control` or pass --control-bin",
            bin.display()
        );
    }
    std::fs::write(&config, config_text(&dbs, args.pool_size, ""))
        .context("writing the config file")?;
    control_ok(&bin, &config, &["init"]).await?;
    let tenant = Uuid::new_v4();
    let seeding = Instant::now();
    seed(&dbs.shared, tenant, args.events).await?;
    let seed_s = seeding.elapsed().as_secs_f64();
    eprintln!("seeded {} events in {seed_s:.1} s", args.events);

    running.serve = Some(start_serve(&bin, &config).await?);

    // One pool for every proxy, an idle connection kept per writer.
    let transport = Transport::with_pool(Protocol::Http1, Some(args.writers + 4));
    let mut proxies = Vec::new();
    let mut admins = Vec::new();
    for p in 0..args.proxies {
        let text = config_text(
            &dbs,
            args.pool_size,
            &format!(
                "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nproxy_id = \"cutover-bench-{p}\"\n"
            ),
        );
        let app = App::build(
            Config::from_parts(Some(&text), None, &[]).context("benchmark proxy config")?,
        )
        .context("building a proxy")?;
        let data = TcpListener::bind("127.0.0.1:0").await?;
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        proxies.push(DataClient::with_transport(
            transport.clone(),
            &format!("http://{}", data.local_addr()?),
        ));
        admins.push(AdminClient::with_transport(
            transport.clone(),
            &format!("http://{}", admin.local_addr()?),
        ));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(data, admin, async {
            let _ = stopped.await;
        }));
        running.proxies.push((stop, task));
    }
    for admin in &admins {
        wait_ready(admin).await?;
    }
    let setup = Setup {
        args: args.clone(),
        bin,
        config,
        dbs,
        proxies,
        admins,
        tenant,
    };
    let mut runs: Vec<RunResult> = Vec::new();
    for i in 0..args.runs.max(1) {
        let undo = runs
            .last()
            .filter(|_| args.revert)
            .map(|r| r.migration_id.clone());
        runs.push(setup.run(i, undo.as_deref()).await?);
    }
    Ok((seed_s, runs))
}

async fn run(args: Args) -> Result<()> {
    let mut admin = PgConnection::connect(&args.common.pg_url)
        .await
        .context("connecting to --pg-url")?;
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut admin)
        .await?;
    let name = format!("sy_co_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let names = [
        format!("{name}_control"),
        format!("{name}_shared"),
        format!("{name}_dedicated"),
    ];
    for db in &names {
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {db}"))?;
    }
    eprintln!("created databases {}", names.join(", "));
    let dbs = Databases {
        control: with_database(&args.common.pg_url, &names[0])?,
        shared: with_database(&args.common.pg_url, &names[1])?,
        dedicated: with_database(&args.common.pg_url, &names[2])?,
    };
    let config = std::env::temp_dir().join(format!("{name}.toml"));
    let load_before = load_averages();
    let mut running = Running {
        serve: None,
        proxies: Vec::new(),
    };
    let measured = tokio::select! {
        m = measure(&args, dbs, config.clone(), &mut running) => m,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let load_after = load_averages();

    for (stop, task) in running.proxies.drain(..) {
        let _ = stop.send(());
        if tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .is_err()
        {
            eprintln!("a proxy did not stop within 15 s");
        }
    }
    if let Some(mut serve) = running.serve.take() {
        let _ = serve.start_kill();
        let _ = serve.wait().await;
    }
    let _ = std::fs::remove_file(&config);
    let mut dropped = Ok(());
    for db in &names {
        if let Err(e) = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await
        {
            dropped = Err(anyhow!("dropping {db}: {e}"));
        }
    }
    let _ = admin.close().await;
    if dropped.is_ok() {
        eprintln!("dropped databases {}", names.join(", "));
    }
    let (seed_s, runs) = measured?;
    dropped?;
    print!(
        "{}",
        report(&args, &version, (load_before, load_after), seed_s, &runs)
    );
    if args.common.smoke {
        eprintln!("(smoke: the figures mean little)");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse().effective();
    if args.writers == 0 || args.proxies == 0 || args.events < 0 {
        bail!("--writers and --proxies must be > 0, --events >= 0");
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be a positive number of appends per second");
    }
    let log = args.log.clone();
    block_on(Some(&log), run(args))
}
