// Run: cargo build --release -p switchyard-control && cargo run --release -p switchyard-benches --bin copy -- --events 1000000 --batch-sizes 1000,5000,10000 --variants binary,loop,loop-nomap,staged

//! Bulk copy throughput, PostgreSQL → PostgreSQL, against the floor any copier has to pay.
//!
//! The harness creates a fresh source store database and seeds one tenant with `--events`
//! events (streams of 100 versions, ~180-byte JSON payloads, one `INSERT … SELECT FROM
//! generate_series`; `--other-tenants-ratio R` interleaves R events of other tenants per event,
//! as in a shared store), then, for every batch size, measures on a fresh target store and a
//! fresh control database (`--variants`):
//!
//! - `binary`: the real `switchyard-control migrate start --tenant T --to dedicated
//!   --batch-size N` (position map on), run as a child process in the foreground until it
//!   reports the tenant dual-writing with lag 0. The copy phase is timed from the migration's
//!   audit log (`start_copy` → `copy_done`); the whole command's wall time is reported too.
//!   `binary-custom-plan` is the same with `plan_cache_mode=force_custom_plan` on the target
//!   store's connections (an operator-side workaround; it does not reliably help).
//! - `loop`: the engine's copy loop rebuilt in-process from the store calls it makes
//!   (`EventStore::read_window`, `EventStore::insert_copied`, `ControlDb::insert_position_map`,
//!   `ControlDb::update_progress`), timing each call, so the table shows where a batch's time
//!   goes; `loop-nomap` is the same without the position map.
//! - a prototype of a faster copy (the store is unchanged): `staged` (COPY into a temporary
//!   table, then the store's target-order insert from it, `pg_insert_copied_from`). The earlier
//!   `lean` (the store's insert without its join back to its own output) and `pipelined`
//!   (reads overlapping inserts) prototypes became the store's insert and the engine's loop.
//!
//! and once the floor: `COPY (SELECT … WHERE tenant_id = T) TO STDOUT` from the source piped
//! into `COPY events (…) FROM STDIN` on a fresh target (two `psql` processes), which maintains
//! the same indexes in the target but pays no per-batch round trip, commit, position map or
//! target-order rule.
//!
//! CPU: every PostgreSQL backend's user+system time is sampled from `/proc` (every 100 ms,
//! attributed by the database named in its process title), so the report splits the server's
//! CPU into source, target and control databases; the server's total (including anyone else
//! using it) and the copier's own CPU (the child process, or this process for the in-process
//! loops) are given too. Source and target are databases of the same PostgreSQL server here,
//! so they share its 2 cores, its WAL and its disk.
//!
//! Prints one JSON line and a Markdown table; drops every database it created at the end (also
//! after a failure or Ctrl-C).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use switchyard_benches::args::Common;
use switchyard_benches::report::{block_on, load_averages, round1, round3};
use switchyard_benches::{seed, toml_string, Databases};
use switchyard_store::control::Progress;
use switchyard_store::events::pg_insert_copied_from;
use switchyard_store::{AuditNote, ControlDb, EventStore, NewMigration, PassWindow, StoredEvent};
use uuid::Uuid;

/// Targets from the performance issues, printed beside the figures.
const TARGET_EVENTS_PER_S: f64 = 100_000.0;
const TARGET_FLOOR_SHARE: f64 = 0.5;
/// The columns a copy carries (the target allocates `global_position` and `txid`).
const COPY_COLUMNS: &str = "event_id, aggregate_id, aggregate_type, event_type, tenant_id, \
     actor_id, version, timestamp, payload, created_at";

/// The `staged` prototype's per-connection staging table (temporary: no WAL, no indexes).
const STAGE_DDL: &str = "CREATE TEMP TABLE copy_stage (
    event_id uuid, aggregate_id uuid, aggregate_type text, event_type text, tenant_id uuid,
    actor_id text, version int4, ts timestamptz, payload text, created_at timestamptz, ord int8
) ON COMMIT DELETE ROWS";

/// The store's target-order insert (`PG_INSERT_COPIED`) reading the batch from the staging
/// table: the store's own statement, so the prototype never drifts from it.
static STAGED_INSERT: LazyLock<String> =
    LazyLock::new(|| pg_insert_copied_from("SELECT * FROM copy_stage"));

/// Measures bulk copy events/s and its CPU cost against a COPY floor.
#[derive(Debug, Clone, Parser)]
#[command(name = "copy")]
struct Args {
    /// Events of the migrated tenant.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Batch sizes to measure (`--batch-size` of `migrate start`).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    batch_sizes: Vec<u32>,
    /// What to measure at every batch size.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "binary,loop,loop-nomap"
    )]
    variants: Vec<Variant>,
    /// Events of other tenants in the source per event of the migrated tenant, interleaved
    /// with it (a shared store); 0 = the source holds the migrated tenant only.
    #[arg(long, default_value_t = 0)]
    other_tenants_ratio: u64,
    /// Skip the COPY floor.
    #[arg(long)]
    no_floor: bool,
    /// The `switchyard-control` binary (default: beside this one, so build it in the same
    /// target directory with `cargo build --release -p switchyard-control`).
    #[arg(long)]
    control_bin: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
}

impl Args {
    fn effective(mut self) -> Self {
        if self.common.smoke {
            self.events = 20_000;
            self.batch_sizes.truncate(1);
            if let Some(first) = self.batch_sizes.first_mut() {
                *first = 1000;
            }
        }
        self
    }
}

/// One way of copying the tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Variant {
    /// The real `switchyard-control migrate start` (position map on).
    Binary,
    /// `binary` with the target store's URL carrying
    /// `options=-c plan_cache_mode=force_custom_plan`: a workaround an operator can apply
    /// today, since the store's copy insert degrades under a generic plan.
    BinaryCustomPlan,
    /// The engine's loop in-process: read_window, insert_copied, insert_position_map,
    /// update_progress, one after the other.
    Loop,
    /// `loop` without the position map.
    LoopNomap,
    /// Prototype: each batch `COPY`'d into a temporary staging table, then `INSERT … SELECT`
    /// from it under the target-order rule (see `STAGED_INSERT`).
    Staged,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Binary => "binary",
            Self::BinaryCustomPlan => "binary-custom-plan",
            Self::Loop => "loop",
            Self::LoopNomap => "loop-nomap",
            Self::Staged => "staged",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc

/// Clock ticks per second of `/proc/*/stat` times (`getconf CLK_TCK`; 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// `(ppid, utime + stime, cutime + cstime)` in ticks of process `pid`.
fn proc_times(pid: &str) -> Option<(u32, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it do not.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let ppid = fields.get(1)?.parse().ok()?;
    Some((ppid, num(11)? + num(12)?, num(13)? + num(14)?))
}

/// This process's own CPU and its reaped children's, in seconds.
fn self_cpu() -> (f64, f64) {
    proc_times("self").map_or((0.0, 0.0), |(_, own, children)| {
        (own as f64 / CLK_TCK, children as f64 / CLK_TCK)
    })
}

/// The postmaster's pid (the parent of the server's processes), from its data directory's
/// `postmaster.pid` if readable, else the oldest process titled `postgres` with pid 1 or a
/// non-postgres parent.
fn postmaster_pid() -> Option<String> {
    let mut best: Option<u32> = None;
    for entry in std::fs::read_dir("/proc").ok()? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if comm.trim() != "postgres" {
            continue;
        }
        let Ok(cmdline) = std::fs::read_to_string(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        // Children rewrite their title to "postgres: …"; the postmaster keeps its argv.
        if cmdline.starts_with("postgres:") {
            continue;
        }
        best = Some(best.map_or(pid, |b| b.min(pid)));
    }
    best.map(|p| p.to_string())
}

/// The whole server's CPU so far, in ticks: the postmaster's own and its reaped children's,
/// plus its live children's.
fn server_ticks(postmaster: &str) -> Option<u64> {
    let (_, own, reaped) = proc_times(postmaster)?;
    let parent: u32 = postmaster.parse().ok()?;
    let mut live = 0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str() else { continue };
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some((ppid, ticks, _)) = proc_times(pid) {
            if ppid == parent {
                live += ticks;
            }
        }
    }
    Some(own + reaped + live)
}

/// Samples the backends of some databases every 100 ms and tallies their CPU per database.
struct CpuSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<HashMap<String, u64>>,
    postmaster: Option<String>,
    server_before: Option<u64>,
    self_before: (f64, f64),
}

/// What a sampler measured, in seconds.
#[derive(Debug, Clone, Default)]
struct CpuReport {
    /// Per database (the benchmark's own: source, target, control).
    by_database: HashMap<String, f64>,
    /// Every PostgreSQL process, whoever it served (other users of the server included).
    server: Option<f64>,
    /// This process.
    this_process: f64,
    /// This process's children that exited meanwhile (the control binary, psql).
    children: f64,
}

impl CpuSampler {
    fn start(databases: &[String]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let postmaster = postmaster_pid();
        let server_before = postmaster.as_deref().and_then(server_ticks);
        let self_before = self_cpu();
        let databases = databases.to_vec();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || sample_backends(&databases, &stop))
        };
        Self {
            stop,
            thread,
            postmaster,
            server_before,
            self_before,
        }
    }

    fn finish(self) -> CpuReport {
        self.stop.store(true, Ordering::Release);
        let ticks = self.thread.join().unwrap_or_default();
        let server_after = self.postmaster.as_deref().and_then(server_ticks);
        let (own, children) = self_cpu();
        CpuReport {
            by_database: ticks
                .into_iter()
                .map(|(db, t)| (db, t as f64 / CLK_TCK))
                .collect(),
            server: match (self.server_before, server_after) {
                (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / CLK_TCK),
                _ => None,
            },
            this_process: own - self.self_before.0,
            children: children - self.self_before.1,
        }
    }
}

/// The sampler's loop: pid → (database, ticks when first seen, ticks when last seen). A
/// backend that existed at the first scan counts from its ticks then; one that appeared later
/// counts from 0. A backend's last <100 ms before it exits is lost (the pools of the copier
/// stay connected until the end, so that is only the disconnect).
fn sample_backends(databases: &[String], stop: &AtomicBool) -> HashMap<String, u64> {
    let mut seen: HashMap<u32, (usize, u64, u64)> = HashMap::new();
    let mut first_scan = true;
    loop {
        let last_round = stop.load(Ordering::Acquire);
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(|p| p.parse::<u32>().ok()) else {
                    continue;
                };
                let db = match seen.get(&pid) {
                    Some(&(db, _, _)) => Some(db),
                    None => std::fs::read(format!("/proc/{pid}/cmdline"))
                        .ok()
                        .filter(|c| c.starts_with(b"postgres: "))
                        .and_then(|c| {
                            let title = String::from_utf8_lossy(&c).into_owned();
                            databases
                                .iter()
                                .position(|d| title.split_whitespace().any(|t| t == d))
                        }),
                };
                let Some(db) = db else { continue };
                let Some((_, ticks, _)) = proc_times(&pid.to_string()) else {
                    continue;
                };
                seen.entry(pid).and_modify(|e| e.2 = ticks).or_insert((
                    db,
                    if first_scan { ticks } else { 0 },
                    ticks,
                ));
            }
        }
        first_scan = false;
        if last_round {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out: HashMap<String, u64> = HashMap::new();
    for (db, first, last) in seen.into_values() {
        *out.entry(databases[db].clone()).or_default() += last.saturating_sub(first);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Where an in-process loop's time went, summed over its batches.
#[derive(Debug, Clone, Default)]
struct Phases {
    batches: u64,
    read: Duration,
    insert: Duration,
    map: Duration,
    progress: Duration,
}

impl Phases {
    fn summary(&self) -> Value {
        let ms = |d: Duration| round1(d.as_secs_f64() * 1000.0);
        json!({
            "batches": self.batches,
            "read_ms": ms(self.read),
            "insert_ms": ms(self.insert),
            "map_ms": ms(self.map),
            "progress_ms": ms(self.progress),
        })
    }

    fn shares(&self) -> String {
        let total = (self.read + self.insert + self.map + self.progress).as_secs_f64();
        if total <= 0.0 {
            return String::new();
        }
        let pct = |d: Duration| d.as_secs_f64() / total * 100.0;
        let per_batch = |d: Duration| d.as_secs_f64() * 1000.0 / self.batches.max(1) as f64;
        format!(
            "read {:.0}% ({:.1} ms/batch), insert {:.0}% ({:.1}), map {:.0}% ({:.1}), progress {:.0}% ({:.1})",
            pct(self.read),
            per_batch(self.read),
            pct(self.insert),
            per_batch(self.insert),
            pct(self.map),
            per_batch(self.map),
            pct(self.progress),
            per_batch(self.progress),
        )
    }
}

/// One measured copy.
#[derive(Debug, Clone)]
struct Measured {
    variant: &'static str,
    batch_size: Option<u32>,
    events: u64,
    /// The copy itself (for `binary`: start_copy → copy_done in the audit log).
    copy_seconds: f64,
    /// The whole command or loop, set-up and catch-up included.
    wall_seconds: f64,
    cpu: CpuReport,
    /// Which of `cpu.by_database` is which.
    source_db: String,
    target_db: String,
    control_db: Option<String>,
    /// CPU of the copier itself: the child process or this process.
    copier_cpu: f64,
    phases: Option<Phases>,
    load_before: [f64; 3],
    load_after: [f64; 3],
}

impl Measured {
    fn rate(&self) -> f64 {
        self.events as f64 / self.copy_seconds.max(1e-9)
    }

    fn db_cpu(&self, db: Option<&String>) -> f64 {
        db.and_then(|d| self.cpu.by_database.get(d))
            .copied()
            .unwrap_or(0.0)
    }

    /// CPU seconds per million events.
    fn per_million(&self, seconds: f64) -> f64 {
        seconds * 1_000_000.0 / self.events.max(1) as f64
    }

    fn summary(&self, floor_rate: Option<f64>) -> Value {
        json!({
            "variant": self.variant,
            "batch_size": self.batch_size,
            "events": self.events,
            "copy_seconds": round3(self.copy_seconds),
            "wall_seconds": round3(self.wall_seconds),
            "events_per_s": round1(self.rate()),
            "share_of_floor": floor_rate.map(|f| round3(self.rate() / f)),
            "cpu_seconds": {
                "source_db": round3(self.db_cpu(Some(&self.source_db))),
                "target_db": round3(self.db_cpu(Some(&self.target_db))),
                "control_db": round3(self.db_cpu(self.control_db.as_ref())),
                "postgres_server_total": self.cpu.server.map(round3),
                "copier": round3(self.copier_cpu),
            },
            "source_db_cpu_s_per_million_events": round3(self.per_million(self.db_cpu(Some(&self.source_db)))),
            "phases": self.phases.as_ref().map(Phases::summary),
            "load_average_before": self.load_before,
            "load_average_after": self.load_after,
        })
    }
}

/// Everything a measurement needs to know about the source.
struct Source {
    name: String,
    url: String,
    tenant: Uuid,
    events: u64,
}

/// The target store's and control database's schemas on fresh databases.
async fn prepare_target(target_url: &str, control_url: Option<&str>) -> Result<()> {
    let target = EventStore::connect("dedicated", target_url, 1)?;
    target
        .ensure_schema()
        .await
        .context("creating the target store schema")?;
    target.close().await;
    if let Some(control_url) = control_url {
        let control = ControlDb::connect(control_url, 1)?;
        control
            .ensure_schema()
            .await
            .context("creating the control schema")?;
        control.close().await;
    }
    Ok(())
}

/// How many of the tenant's events the target holds.
async fn target_count(target_url: &str, tenant: Uuid) -> Result<i64> {
    let mut conn = PgConnection::connect(target_url).await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok(n)
}

/// The real `switchyard-control migrate start`, foreground, until dual-writing with lag 0.
async fn measure_binary(
    variant: Variant,
    bin: &PathBuf,
    dbs: &mut Databases,
    source: &Source,
    batch_size: u32,
) -> Result<Measured> {
    let suffix = format!("{}{batch_size}", variant.name().replace('-', ""));
    let (target_db, target_url) = dbs.create(&format!("t{suffix}")).await?;
    let (control_db, control_url) = dbs.create(&format!("c{suffix}")).await?;
    prepare_target(&target_url, Some(&control_url)).await?;
    let store_url = if variant == Variant::BinaryCustomPlan {
        let sep = if target_url.contains('?') { '&' } else { '?' };
        format!("{target_url}{sep}options=-c%20plan_cache_mode%3Dforce_custom_plan")
    } else {
        target_url.clone()
    };
    let config = format!(
        "control_url = {}\ndefault_store = \"shared\"\n\n\
         [[stores]]\nid = \"shared\"\nurl = {}\n\n\
         [[stores]]\nid = \"dedicated\"\nurl = {}\n",
        toml_string(&control_url),
        toml_string(&source.url),
        toml_string(&store_url),
    );
    let config_path = std::env::temp_dir().join(format!("{}.toml", control_db));
    std::fs::write(&config_path, config).context("writing the control config")?;
    dbs.checkpoint().await?;

    let load_before = load_averages();
    let sampler = CpuSampler::start(&[source.name.clone(), target_db.clone(), control_db.clone()]);
    let started = Instant::now();
    let output = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&config_path)
        .arg("--json")
        .args(["migrate", "start", "--tenant"])
        .arg(source.tenant.to_string())
        .args(["--to", "dedicated", "--batch-size"])
        .arg(batch_size.to_string())
        .args(["--reason", "copy benchmark"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = sampler.finish();
    let load_after = load_averages();
    let _ = std::fs::remove_file(&config_path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "migrate start exited with {}:\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let reply: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("migrate start --json printed {stdout:?}"))?;
    ensure!(
        reply["state"] == "dual_write",
        "migrate start ended in state {} (expected dual_write)",
        reply["state"]
    );
    let id: Uuid = reply["id"]
        .as_str()
        .context("migrate start printed no id")?
        .parse()?;

    let mut control = PgConnection::connect(&control_url).await?;
    let (total, copied): (i64, i64) =
        sqlx::query_as("SELECT events_total, events_copied FROM tenant_migrations WHERE id = $1")
            .bind(id)
            .fetch_one(&mut control)
            .await?;
    let copy_seconds: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(at) FILTER (WHERE action = 'copy_done')
                                 - max(at) FILTER (WHERE action = 'start_copy'))::float8
           FROM migration_audit_log WHERE migration_id = $1",
    )
    .bind(id)
    .fetch_one(&mut control)
    .await?;
    let mapped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM migration_position_map WHERE migration_id = $1")
            .bind(id)
            .fetch_one(&mut control)
            .await?;
    control.close().await?;
    let in_target = target_count(&target_url, source.tenant).await?;
    let expected = i64::try_from(source.events)?;
    ensure!(
        total == expected && copied == expected && mapped == expected && in_target == expected,
        "binary copy at batch size {batch_size}: events_total {total}, events_copied {copied}, \
         mapped {mapped}, in target {in_target}, expected {expected} (a transaction held open \
         elsewhere on the server keeps the copy horizon below the seed?)"
    );
    dbs.drop_one(&target_db).await?;
    dbs.drop_one(&control_db).await?;
    Ok(Measured {
        variant: variant.name(),
        batch_size: Some(batch_size),
        events: source.events,
        copy_seconds: copy_seconds.context("no start_copy/copy_done in the audit log")?,
        wall_seconds: wall,
        copier_cpu: cpu.children,
        cpu,
        source_db: source.name.clone(),
        target_db,
        control_db: Some(control_db),
        phases: None,
        load_before,
        load_after,
    })
}

/// How a loop inserts a batch into the target.
enum Inserter {
    /// `EventStore::insert_copied`, as the engine does.
    Store(EventStore),
    /// `COPY` into `copy_stage`, then `STAGED_INSERT`, in one transaction on one connection.
    Staged(PgConnection),
}

/// Appends `s` to a COPY text-format row, escaped.
fn copy_text(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// The batch as COPY text-format rows of `copy_stage`.
fn copy_rows(events: &[StoredEvent]) -> String {
    let mut out = String::with_capacity(events.len() * 400);
    for (ord, e) in events.iter().enumerate() {
        let _ = write!(out, "{}\t{}\t", e.event_id, e.aggregate_id);
        copy_text(&mut out, &e.aggregate_type);
        out.push('\t');
        copy_text(&mut out, &e.event_type);
        out.push('\t');
        match e.tenant_id {
            Some(t) => {
                let _ = write!(out, "{t}");
            }
            None => out.push_str("\\N"),
        }
        out.push('\t');
        match &e.actor_id {
            Some(a) => copy_text(&mut out, a),
            None => out.push_str("\\N"),
        }
        let _ = write!(out, "\t{}\t{}\t", e.version, e.timestamp.to_rfc3339());
        copy_text(&mut out, e.payload.get());
        let _ = writeln!(out, "\t{}\t{}", e.created_at.to_rfc3339(), ord + 1);
    }
    out
}

/// Each input's target position from what the insert returned, asking the target once more
/// for rows it did not insert (already there: their position; else `None`).
async fn match_positions(
    conn: &mut PgConnection,
    events: &[StoredEvent],
    inserted: Vec<(Uuid, i64)>,
) -> Result<Vec<Option<i64>>> {
    let mut by_id: HashMap<Uuid, i64> = inserted.into_iter().collect();
    let missing: Vec<Uuid> = events
        .iter()
        .map(|e| e.event_id)
        .filter(|id| !by_id.contains_key(id))
        .collect();
    if !missing.is_empty() {
        let present: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT event_id, global_position FROM events WHERE event_id = ANY($1)")
                .bind(&missing)
                .fetch_all(&mut *conn)
                .await?;
        by_id.extend(present);
    }
    Ok(events
        .iter()
        .map(|e| by_id.get(&e.event_id).copied())
        .collect())
}

impl Inserter {
    async fn new(variant: Variant, target_url: &str) -> Result<Self> {
        Ok(match variant {
            Variant::Staged => {
                let mut conn = PgConnection::connect(target_url).await?;
                sqlx::query(STAGE_DDL).execute(&mut conn).await?;
                Self::Staged(conn)
            }
            Variant::Binary | Variant::BinaryCustomPlan | Variant::Loop | Variant::LoopNomap => {
                Self::Store(EventStore::connect("dedicated", target_url, 2)?)
            }
        })
    }

    async fn insert(&mut self, events: &[StoredEvent]) -> Result<Vec<Option<i64>>> {
        match self {
            Self::Store(store) => Ok(store.insert_copied(events).await?),
            Self::Staged(conn) => {
                let mut tx = conn.begin().await?;
                let mut copy = tx.copy_in_raw("COPY copy_stage FROM STDIN").await?;
                copy.send(copy_rows(events).into_bytes()).await?;
                copy.finish().await?;
                let inserted: Vec<(Uuid, i64)> = sqlx::query_as(STAGED_INSERT.as_str())
                    .fetch_all(&mut *tx)
                    .await?;
                let positions = match_positions(&mut tx, events, inserted).await?;
                tx.commit().await?;
                Ok(positions)
            }
        }
    }

    async fn close(self) {
        match self {
            Self::Store(store) => store.close().await,
            Self::Staged(conn) => {
                let _ = conn.close().await;
            }
        }
    }
}

/// Runs `f` and answers its output and how long it took.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = f.await;
    (out, started.elapsed())
}

/// What a landed batch leaves to record: its position map and checkpoint.
struct Checkpoint {
    map: Vec<(i64, i64, Uuid)>,
    copied: i64,
    after: i64,
}

/// Writes a landed batch's position map (unless `with_map` is off) and checkpoint.
async fn record_batch(
    control: &ControlDb,
    id: Uuid,
    with_map: bool,
    c: Checkpoint,
    phases: &mut Phases,
) -> Result<()> {
    if with_map {
        let (mapped, took) = timed(control.insert_position_map(id, &c.map)).await;
        mapped?;
        phases.map += took;
    }
    let (updated, took) = timed(control.update_progress(
        id,
        None,
        &Progress {
            events_copied: Some(c.copied),
            copy_position: Some(c.after),
            ..Progress::default()
        },
    ))
    .await;
    updated?;
    phases.progress += took;
    Ok(())
}

/// The landed batch's checkpoint; fails unless the whole batch landed (a fresh target).
fn landed(batch: &[StoredEvent], positions: &[Option<i64>], copied: i64) -> Result<Checkpoint> {
    let map: Vec<(i64, i64, Uuid)> = batch
        .iter()
        .zip(positions)
        .filter_map(|(e, p)| p.map(|p| (e.global_position, p, e.event_id)))
        .collect();
    ensure!(
        map.len() == batch.len(),
        "a batch did not land whole in a fresh target ({} of {})",
        map.len(),
        batch.len()
    );
    Ok(Checkpoint {
        copied: copied + i64::try_from(map.len())?,
        after: batch.last().map_or(0, |e| e.global_position),
        map,
    })
}

/// The engine's copy loop, rebuilt from the store calls (or a prototype of a faster one),
/// timed per call.
async fn measure_loop(
    variant: Variant,
    dbs: &mut Databases,
    source: &Source,
    batch_size: u32,
) -> Result<Measured> {
    let suffix = format!("{}{batch_size}", variant.name().replace('-', ""));
    let (target_db, target_url) = dbs.create(&format!("t{suffix}")).await?;
    let (control_db, control_url) = dbs.create(&format!("c{suffix}")).await?;
    prepare_target(&target_url, Some(&control_url)).await?;
    dbs.checkpoint().await?;

    let source_store = EventStore::connect("shared", &source.url, 2)?;
    let control = ControlDb::connect(&control_url, 2)?;
    let record = control
        .create_migration(
            &NewMigration {
                tenant_id: source.tenant,
                source_store_id: "shared".to_owned(),
                target_store_id: "dedicated".to_owned(),
                config: json!({ "batch_size": batch_size }),
                route_epoch: None,
                claim: None,
            },
            &AuditNote::new("copy-benchmark"),
        )
        .await
        .context("creating the migration row")?;
    let with_map = variant != Variant::LoopNomap;

    let load_before = load_averages();
    let sampler = CpuSampler::start(&[source.name.clone(), target_db.clone(), control_db.clone()]);
    let started = Instant::now();
    let mut inserter = Inserter::new(variant, &target_url).await?;
    let horizon = source_store.horizon().await?;
    let window = PassWindow::first(horizon);
    let mut phases = Phases::default();
    let mut copied = 0i64;
    let mut after = 0i64;
    loop {
        let (batch, took) =
            timed(source_store.read_window(source.tenant, window, after, batch_size)).await;
        phases.read += took;
        let batch = batch?;
        if batch.is_empty() {
            break;
        }
        let (positions, took) = timed(inserter.insert(&batch)).await;
        phases.insert += took;
        let checkpoint = landed(&batch, &positions?, copied)?;
        copied = checkpoint.copied;
        after = checkpoint.after;
        record_batch(&control, record.id, with_map, checkpoint, &mut phases).await?;
        phases.batches += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = sampler.finish();
    let load_after = load_averages();
    source_store.close().await;
    inserter.close().await;
    control.close().await;
    let in_target = target_count(&target_url, source.tenant).await?;
    ensure!(
        copied == i64::try_from(source.events)? && in_target == copied,
        "{} copied {copied}, target holds {in_target}, expected {}",
        variant.name(),
        source.events
    );
    if with_map {
        let mut conn = PgConnection::connect(&control_url).await?;
        let mapped: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM migration_position_map WHERE migration_id = $1",
        )
        .bind(record.id)
        .fetch_one(&mut conn)
        .await?;
        conn.close().await?;
        ensure!(
            mapped == copied,
            "{}: {mapped} positions mapped of {copied}",
            variant.name()
        );
    }
    dbs.drop_one(&target_db).await?;
    dbs.drop_one(&control_db).await?;
    Ok(Measured {
        variant: variant.name(),
        batch_size: Some(batch_size),
        events: source.events,
        copy_seconds: seconds,
        wall_seconds: seconds,
        copier_cpu: cpu.this_process,
        cpu,
        source_db: source.name.clone(),
        target_db,
        control_db: Some(control_db),
        phases: Some(phases),
        load_before,
        load_after,
    })
}

/// The floor: `COPY … TO STDOUT` from the source piped into `COPY … FROM STDIN` on the target,
/// one statement each, through two `psql` processes.
async fn measure_floor(dbs: &mut Databases, source: &Source) -> Result<Measured> {
    let (target_db, target_url) = dbs.create("tfloor").await?;
    prepare_target(&target_url, None).await?;
    dbs.checkpoint().await?;
    let out_sql = format!(
        "COPY (SELECT {COPY_COLUMNS} FROM events WHERE tenant_id = '{}' ORDER BY global_position) TO STDOUT",
        source.tenant
    );
    let in_sql = format!("COPY events ({COPY_COLUMNS}) FROM STDIN");
    let psql = |url: &str, sql: &str| {
        let mut cmd = tokio::process::Command::new("psql");
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql]);
        cmd
    };

    let load_before = load_averages();
    let sampler = CpuSampler::start(&[source.name.clone(), target_db.clone()]);
    let started = Instant::now();
    let mut reader = psql(&source.url, &out_sql)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting psql (is the PostgreSQL client installed?)")?;
    let pipe: Stdio = reader
        .stdout
        .take()
        .context("psql's stdout")?
        .try_into()
        .context("piping psql into psql")?;
    let writer = psql(&target_url, &in_sql).stdin(pipe).spawn()?;
    let (read, written) = tokio::join!(reader.wait(), writer.wait_with_output());
    let seconds = started.elapsed().as_secs_f64();
    let cpu = sampler.finish();
    let load_after = load_averages();
    let (read, written) = (read?, written?);
    ensure!(
        read.success() && written.status.success(),
        "COPY floor: psql exited with {read} / {}",
        written.status
    );
    let in_target = target_count(&target_url, source.tenant).await?;
    ensure!(
        in_target == i64::try_from(source.events)?,
        "COPY floor: target holds {in_target}, expected {}",
        source.events
    );
    dbs.drop_one(&target_db).await?;
    Ok(Measured {
        variant: "copy-floor",
        batch_size: None,
        events: source.events,
        copy_seconds: seconds,
        wall_seconds: seconds,
        copier_cpu: cpu.children,
        cpu,
        source_db: source.name.clone(),
        target_db,
        control_db: None,
        phases: None,
        load_before,
        load_after,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn report(args: &Args, facts: &Value, floor: Option<&Measured>, runs: &[Measured]) -> String {
    let floor_rate = floor.map(Measured::rate);
    let summary = json!({
        "bench": "copy",
        "events": args.events,
        "other_tenant_events": args.events * args.other_tenants_ratio,
        "batch_sizes": args.batch_sizes,
        "smoke": args.common.smoke,
        "machine": facts,
        "floor": floor.map(|f| f.summary(None)),
        "runs": runs.iter().map(|r| r.summary(floor_rate)).collect::<Vec<_>>(),
    });
    let mut out = format!("{summary}\n\n");
    out.push_str(
        "| copy | batch | events | copy s | wall s | events/s | % of floor | source DB CPU s/M ev | target DB CPU s/M | control DB CPU s/M | copier CPU s/M | PG server CPU s | load 1m before→after |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for m in floor.into_iter().chain(runs) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {:.2} | {:.0} | {} | {:.2} | {:.2} | {} | {:.2} | {} | {:.2}→{:.2} |",
            m.variant,
            m.batch_size.map_or_else(|| "–".to_owned(), |b| b.to_string()),
            m.events,
            m.copy_seconds,
            m.wall_seconds,
            m.rate(),
            floor_rate.map_or_else(|| "–".to_owned(), |f| format!("{:.0}%", m.rate() / f * 100.0)),
            m.per_million(m.db_cpu(Some(&m.source_db))),
            m.per_million(m.db_cpu(Some(&m.target_db))),
            m.control_db
                .as_ref()
                .map_or_else(|| "–".to_owned(), |c| format!("{:.2}", m.per_million(m.db_cpu(Some(c))))),
            m.per_million(m.copier_cpu),
            m.cpu.server.map_or_else(|| "?".to_owned(), |s| format!("{s:.1}")),
            m.load_before[0],
            m.load_after[0],
        );
    }
    let loops: Vec<&Measured> = runs.iter().filter(|r| r.phases.is_some()).collect();
    if !loops.is_empty() {
        out.push_str("\nwhere an in-process loop's time goes (client-side wall time per call):\n");
        for m in loops {
            if let Some(p) = &m.phases {
                let _ = writeln!(
                    out,
                    "- {} batch {}: {}",
                    m.variant,
                    m.batch_size.unwrap_or_default(),
                    p.shares()
                );
            }
        }
    }
    let verdict = |met: bool| if met { "met" } else { "missed" };
    if let Some(best) = runs
        .iter()
        .filter(|r| r.variant == Variant::Binary.name())
        .max_by(|a, b| a.rate().total_cmp(&b.rate()))
    {
        let _ = writeln!(
            out,
            "\nbest binary copy: {:.0} events/s at batch {} (target ≥ {TARGET_EVENTS_PER_S:.0}: {}){}",
            best.rate(),
            best.batch_size.unwrap_or_default(),
            verdict(best.rate() >= TARGET_EVENTS_PER_S),
            floor_rate.map_or_else(String::new, |f| format!(
                "; {:.0}% of the COPY floor's {f:.0} events/s (target ≥ {:.0}%: {})",
                best.rate() / f * 100.0,
                TARGET_FLOOR_SHARE * 100.0,
                verdict(best.rate() / f >= TARGET_FLOOR_SHARE)
            )),
        );
    }
    out
}

/// Facts about the machine and server, for the report.
async fn machine_facts(admin: &mut PgConnection) -> Result<Value> {
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut *admin)
        .await?;
    let mut settings = serde_json::Map::new();
    for name in [
        "shared_buffers",
        "work_mem",
        "maintenance_work_mem",
        "synchronous_commit",
        "fsync",
        "wal_level",
        "max_wal_size",
        "checkpoint_timeout",
        "effective_io_concurrency",
    ] {
        let value: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut *admin)
            .await?;
        settings.insert(name.to_owned(), Value::String(value));
    }
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        })
        .and_then(|v| v.parse::<u64>().ok());
    Ok(json!({
        "cores": cores,
        "memory_gib": mem_kb.map(|k| round1(k as f64 / 1024.0 / 1024.0)),
        "postgres": version,
        "settings": settings,
    }))
}

async fn measure_all(args: &Args, dbs: &mut Databases) -> Result<String> {
    let facts = machine_facts(&mut dbs.admin).await?;
    let control_bin = match &args.control_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("switchyard-control"),
    };
    let needs_binary = args
        .variants
        .iter()
        .any(|v| matches!(v, Variant::Binary | Variant::BinaryCustomPlan));
    if needs_binary && !control_bin.exists() {
        bail!(
            "{} does not exist: build it in the same target directory first \
             (`cargo build --release -p switchyard-control`) or pass --control-bin",
            control_bin.display()
        );
    }

    let (source_name, source_url) = dbs.create("src").await?;
    let store = EventStore::connect("shared", &source_url, 1)?;
    store
        .ensure_schema()
        .await
        .context("creating the source store schema")?;
    store.close().await;
    let tenant = Uuid::new_v4();
    eprintln!(
        "seeding {} events of tenant {tenant} (and {} of other tenants) into {source_name} …",
        args.events,
        args.events * args.other_tenants_ratio
    );
    let (seed_seconds, payload_bytes) = seed(
        &source_url,
        tenant,
        args.events,
        args.other_tenants_ratio,
        false,
    )
    .await?;
    eprintln!("seeded in {seed_seconds:.1} s (average payload {payload_bytes:.0} bytes)");
    let source = Source {
        name: source_name,
        url: source_url,
        tenant,
        events: args.events,
    };
    let mut facts = facts;
    facts["payload_bytes_avg"] = json!(round1(payload_bytes));

    let floor = if args.no_floor {
        None
    } else {
        let m = measure_floor(dbs, &source).await?;
        eprintln!(
            "copy-floor: {:.0} events/s in {:.2} s",
            m.rate(),
            m.copy_seconds
        );
        Some(m)
    };
    let mut runs = Vec::new();
    for &batch_size in &args.batch_sizes {
        for &variant in &args.variants {
            let m = match variant {
                Variant::Binary | Variant::BinaryCustomPlan => {
                    measure_binary(variant, &control_bin, dbs, &source, batch_size).await?
                }
                Variant::Loop | Variant::LoopNomap | Variant::Staged => {
                    measure_loop(variant, dbs, &source, batch_size).await?
                }
            };
            eprintln!(
                "{} batch {batch_size}: {:.0} events/s (copy {:.2} s, wall {:.2} s)",
                m.variant,
                m.rate(),
                m.copy_seconds,
                m.wall_seconds
            );
            runs.push(m);
        }
    }
    Ok(report(args, &facts, floor.as_ref(), &runs))
}

async fn run(args: Args) -> Result<()> {
    let mut dbs = Databases::connect(&args.common.pg_url, "copy").await?;
    let measured = tokio::select! {
        measured = measure_all(&args, &mut dbs) => measured,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let dropped = dbs.drop_all().await;
    let _ = dbs.admin.close().await;
    let out = measured?;
    dropped?;
    if args.common.smoke {
        eprintln!("(smoke: the figures mean nothing)");
    }
    print!("{out}");
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse().effective();
    if args.events == 0 || args.batch_sizes.is_empty() || args.batch_sizes.contains(&0) {
        bail!("--events and every --batch-sizes value must be > 0");
    }
    block_on(None, run(args))
}
