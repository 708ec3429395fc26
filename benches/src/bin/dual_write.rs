// Run: cargo run --release -p switchyard-benches --bin dual_write -- --writers 16 --seconds 10 --rounds 3

//! What the dual-write mirror costs a client: the same appends through the real proxy, from
//! the same concurrent writers, to one tenant routed `normal` (source only) and then routed
//! `dual_write` (source, then mirrored to a target store), in one run.
//!
//! The harness creates two fresh databases, `sy_dw_<random>` (control database and the source
//! store `shared`) and `sy_dw_<random>_target` (the target store `dedicated`), writes the same
//! `--seed-events` of the tenant's history into both (what a finished bulk copy leaves, so the
//! target's planner statistics are those of a real dual-write phase), starts the proxy
//! in-process on `127.0.0.1:0` with both stores, and alternates phases — normal, dual, normal,
//! dual, … (`--rounds` pairs) — so slow drift in the machine does not favour one routing.
//! Before each phase it writes the tenant's route with `ControlDb::set_route` and waits until
//! the proxy's `/admin/routes/{tenant}` reports it; each writer then appends one event (~200
//! bytes of JSON) at a time with `expected_version` to a new stream of the tenant, for a
//! warm-up and the measured window: as fast as replies come (closed loop: the machine
//! saturated, so any extra work shows as lost throughput) or paced at `--rate` appends/s in
//! total (below saturation, e.g. `--rate 1000`: what the mirror adds to latency). After a dual phase the harness
//! waits for the mirror to handle everything it was given (`switchyard_proxy_mirror_writes_total`
//! on `/metrics`) before the next phase, and reports how long that took. It prints latency
//! percentiles per routing, the mirror's outcome counters, the target's event count and how its
//! `events` table was scanned, as one JSON line and a Markdown table, then stops the proxy and
//! drops both databases (also after a failure or Ctrl-C).
//!
//! Source and target are databases of one PostgreSQL server on the same 2 cores here, so the
//! mirror's inserts compete with the source appends for CPU and WAL; with separate servers
//! they would not.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::time::{Duration, Instant};
use switchyard_benches::args::Common;
use switchyard_benches::report::{block_on, latencies, load_averages, round1, round3, Window};
use switchyard_benches::writer::StreamWriter;
use switchyard_benches::{counters, redact, toml_string, wait_ready, with_database};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use switchyard_client::{percent_encode, AdminClient, DataClient, Protocol, StreamId, Transport};
use switchyard_config::Config;
use switchyard_proxy::App;
use switchyard_store::{ControlDb, EventStore, RouteUpdate, RoutingState};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use uuid::Uuid;

/// Target from the performance issues: dual-write p99 within 10% of normal.
const TARGET_P99_RATIO: f64 = 1.10;
const AGGREGATE_TYPE: &str = "BenchOrder";
const EVENT_TYPE: &str = "OrderPlaced";
const ACTOR: &str = "dual-write-bench";
/// How long the mirror may take to catch up after a dual phase before the run fails.
const MIRROR_DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// Measures append latency and throughput through the proxy with the mirror on versus off.
#[derive(Debug, Clone, Parser)]
#[command(name = "dual_write")]
struct Args {
    /// Concurrent writers, each appending to a stream of its own.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured seconds at the start of each phase.
    #[arg(long, default_value_t = 2.0)]
    warmup_seconds: f64,
    /// Pairs of phases (normal, then dual); each routing's histograms are merged.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Total appends per second, spread evenly over the writers (each waits for its reply and
    /// then for its next turn; a writer behind schedule does not burst). 0: every writer
    /// appends again as soon as its reply arrives (closed loop, the machine saturated).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Events of the tenant already in both stores before the phases (the history a finished
    /// bulk copy leaves; also what the target's planner statistics see). 0: both start empty.
    #[arg(long, default_value_t = 200_000)]
    seed_events: u64,
    /// Connections in the proxy's pool to each store.
    #[arg(long, default_value_t = 16)]
    pool_size: u32,
    /// PostgreSQL `options` for the proxy's connections to the target store (e.g.
    /// `-c plan_cache_mode=force_custom_plan`), added to its URL; empty: none.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    target_options: String,
    /// Proxy log filter, as the real binary takes it (default `info`, as in production).
    #[arg(long, default_value = "info")]
    log: String,
    #[command(flatten)]
    common: Common,
}

impl Args {
    fn effective(mut self) -> Self {
        if self.common.smoke {
            self.writers = 2;
            self.pool_size = 2;
            self.seconds = 1.0;
            self.warmup_seconds = 0.2;
            self.rounds = 1;
            self.seed_events = self.seed_events.min(1000);
        }
        self
    }
}

/// How the tenant is routed in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routing {
    Normal,
    Dual,
}

impl Routing {
    fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Dual => "dual_write",
        }
    }
}

/// One routing's measurements, merged over writers and phases.
struct Outcome {
    latencies_us: Histogram<u64>,
    /// Appends completed inside the measured windows.
    count: u64,
    /// Appends sent in the phases, warm-up included (what the mirror is given in dual phases).
    sent: u64,
    /// Total length of the measured windows.
    window: Duration,
    /// CPU seconds this process (proxy, writers, harness) used in the phases.
    cpu_seconds: f64,
}

impl Outcome {
    fn new() -> Result<Self> {
        Ok(Self {
            latencies_us: latencies()?,
            count: 0,
            sent: 0,
            window: Duration::ZERO,
            cpu_seconds: 0.0,
        })
    }

    fn rate(&self) -> f64 {
        self.count as f64 / self.window.as_secs_f64().max(1e-9)
    }

    fn quantile(&self, q: f64) -> u64 {
        self.latencies_us.value_at_quantile(q)
    }

    fn summary(&self) -> Value {
        json!({
            "count": self.count,
            "appends_per_s": round1(self.rate()),
            "p50_us": self.quantile(0.50),
            "p90_us": self.quantile(0.90),
            "p99_us": self.quantile(0.99),
            "p999_us": self.quantile(0.999),
            "max_us": self.latencies_us.max(),
            "process_cpu_s_per_s": round3(self.cpu_seconds / self.window.as_secs_f64().max(1e-9)),
        })
    }
}

/// A JSON object of about 200 bytes, different per event.
fn payload(writer: usize, seq: u64) -> Value {
    json!({
        "order_id": Uuid::new_v4(),
        "customer": format!("customer-{writer:04}"),
        "seq": seq,
        "amount_cents": 12_345 + seq % 1000,
        "currency": "EUR",
        "items": [{"sku": "SKU-0001", "qty": 2}, {"sku": "SKU-0042", "qty": 1}],
        "note": "benchmark payload padding.....",
    })
}

/// Writes the same `events` events of `tenant` (streams of 100 versions, identical ids and
/// timestamps) into a store and analyzes it: source and target as a finished bulk copy leaves
/// them, before the mirror starts.
async fn seed_history(url: &str, tenant: Uuid, events: u64) -> Result<()> {
    // Seconds-long statements on purpose: not worth a slow-statement warning.
    let options = PgConnectOptions::from_str(url)?.disable_statement_logging();
    let mut conn = PgConnection::connect_with(&options).await?;
    sqlx::query(
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id,
                             actor_id, version, timestamp, payload, created_at)
         SELECT md5($1::text || ':event:' || g)::uuid,
                md5($1::text || ':stream:' || (g / 100))::uuid,
                $3, $4, $1, $5, (g % 100 + 1)::int,
                timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second',
                jsonb_build_object('seq', g, 'customer', 'customer-' || (g % 1000),
                                   'amount_cents', 1000 + g % 90000, 'currency', 'EUR',
                                   'note', 'seeded history padding............'),
                timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second'
           FROM generate_series(0, $2 - 1) AS g
          ORDER BY g",
    )
    .bind(tenant)
    .bind(i64::try_from(events).context("--seed-events fits i64")?)
    .bind(AGGREGATE_TYPE)
    .bind(EVENT_TYPE)
    .bind(ACTOR)
    .execute(&mut conn)
    .await
    .context("seeding history")?;
    sqlx::query("VACUUM (ANALYZE) events")
        .execute(&mut conn)
        .await
        .context("vacuuming")?;
    conn.close().await?;
    Ok(())
}

/// `switchyard_proxy_mirror_writes_total` by outcome, from the proxy's `/metrics`.
async fn mirror_counters(admin: &AdminClient) -> Result<BTreeMap<String, u64>> {
    counters(admin, "switchyard_proxy_mirror_writes_total", "outcome").await
}

/// Everything a phase needs.
struct Harness {
    args: Args,
    proxy: DataClient,
    admin: AdminClient,
    control: ControlDb,
    tenant: Uuid,
}

impl Harness {
    /// Routes the tenant and waits until the proxy's table says so.
    async fn route(&self, routing: Routing) -> Result<Duration> {
        let update = match routing {
            Routing::Normal => RouteUpdate::normal(self.tenant, "shared"),
            Routing::Dual => RouteUpdate {
                tenant_id: self.tenant,
                store_id: "shared".to_owned(),
                migration_state: RoutingState::DualWrite,
                target_store_id: Some("dedicated".to_owned()),
                active_migration_id: Some(Uuid::new_v4()),
            },
        };
        let started = Instant::now();
        let epoch = self
            .control
            .set_route(&update)
            .await
            .context("writing the route")?;
        let deadline = started + Duration::from_secs(10);
        let state = match routing {
            Routing::Normal => switchyard_client::RoutingState::Normal,
            Routing::Dual => switchyard_client::RoutingState::DualWrite,
        };
        loop {
            if let Ok(detail) = self.admin.route(self.tenant).await {
                if detail.route.state == state && detail.route.epoch >= epoch {
                    return Ok(started.elapsed());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the proxy did not apply route {} (epoch {epoch}) within 10 s",
                    routing.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// One phase: every writer, warm-up plus window; merged into `into`.
    async fn run(&self, routing: Routing, into: &mut Outcome) -> Result<()> {
        let cpu_before = process_cpu();
        let start = Instant::now();
        let window = Window {
            measure_from: start + Duration::from_secs_f64(self.args.warmup_seconds),
            end: start + Duration::from_secs_f64(self.args.warmup_seconds + self.args.seconds),
        };
        // `--rate` appends/s over all writers: each writer sends one every `writers / rate` s.
        let pace = (self.args.rate > 0.0)
            .then(|| Duration::from_secs_f64(self.args.writers as f64 / self.args.rate));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..self.args.writers {
            // A new stream every phase, so its versions start at 1 and the mirror can land them.
            let writer = StreamWriter {
                proxy: self.proxy.clone(),
                stream: StreamId::new(self.tenant, AGGREGATE_TYPE, Uuid::new_v4()),
                writer: w,
                event_type: EVENT_TYPE,
                actor: ACTOR,
                pace: pace.map(|p| (p, p.mul_f64(w as f64 / self.args.writers as f64))),
            };
            tasks.spawn(writer.run(window, payload));
        }
        while let Some(joined) = tasks.join_next().await {
            let result = joined.context("writer task panicked")??;
            into.latencies_us
                .add(&result.latencies_us)
                .context("merging histograms")?;
            into.count += result.count;
            into.sent += result.sent;
        }
        into.window += Duration::from_secs_f64(self.args.seconds);
        // Warm-up included; the mirror's catch-up after the phase is not.
        into.cpu_seconds +=
            (process_cpu() - cpu_before) * self.args.seconds / start.elapsed().as_secs_f64();
        eprintln!(
            "{}: {} appends in the window so far (p99 {} µs)",
            routing.name(),
            into.count,
            into.quantile(0.99)
        );
        Ok(())
    }

    /// Waits until the mirror has handled `expected` events (any outcome); answers how long.
    async fn wait_mirror(&self, expected: u64) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let counters = mirror_counters(&self.admin).await?;
            let handled: u64 = counters.values().sum();
            if handled >= expected {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= MIRROR_DRAIN_LIMIT {
                bail!(
                    "the mirror handled {handled} of {expected} events within {} s",
                    MIRROR_DRAIN_LIMIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// This process's CPU seconds so far (user + system), from `/proc/self/stat`.
fn process_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Clock ticks of 1/100 s (`getconf CLK_TCK` on Linux).
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn proxy_config(source_url: &str, target_url: &str, pool_size: u32) -> Result<Config> {
    let source = toml_string(source_url);
    let target = toml_string(target_url);
    let text = format!(
        "control_url = {source}\n\
         default_store = \"shared\"\n\
         \n\
         [[stores]]\n\
         id = \"shared\"\n\
         url = {source}\n\
         max_connections = {pool_size}\n\
         \n\
         [[stores]]\n\
         id = \"dedicated\"\n\
         url = {target}\n\
         max_connections = {pool_size}\n\
         \n\
         [proxy]\n\
         listen = \"127.0.0.1:0\"\n\
         admin_listen = \"127.0.0.1:0\"\n\
         proxy_id = \"dual-write-bench\"\n"
    );
    Config::from_parts(Some(&text), None, &[]).context("benchmark proxy config")
}

/// What a run measured.
struct Measured {
    normal: Outcome,
    dual: Outcome,
    mirror: BTreeMap<String, u64>,
    /// How long the mirror took to catch up after each dual phase.
    drains: Vec<Duration>,
    /// How long each route change took to reach the proxy.
    route_changes: Vec<Duration>,
    target_events: i64,
    /// The target `events` table's `(seq_scan, seq_tup_read, idx_scan)` at the end.
    target_scans: Option<(i64, i64, i64)>,
}

/// Starts the proxy, runs every phase, stops the proxy. The databases exist already.
async fn measure(args: Args, source_url: &str, target_url: &str) -> Result<Measured> {
    for url in [source_url, target_url] {
        EventStore::connect("store", url, 1)
            .context("store pool")?
            .ensure_schema()
            .await
            .context("creating a store schema")?;
    }
    let control = ControlDb::connect(source_url, 2).context("control pool")?;
    control
        .ensure_schema()
        .await
        .context("creating the control schema")?;
    let tenant = Uuid::new_v4();
    if args.seed_events > 0 {
        let started = Instant::now();
        for url in [source_url, target_url] {
            seed_history(url, tenant, args.seed_events).await?;
        }
        eprintln!(
            "seeded {} events of the tenant into both stores in {:.1} s",
            args.seed_events,
            started.elapsed().as_secs_f64()
        );
    }
    control
        .set_route(&RouteUpdate::normal(tenant, "shared"))
        .await
        .context("routing the tenant")?;

    let proxy_target_url = if args.target_options.is_empty() {
        target_url.to_owned()
    } else {
        let sep = if target_url.contains('?') { '&' } else { '?' };
        format!(
            "{target_url}{sep}options={}",
            percent_encode(&args.target_options)
        )
    };
    let app = App::build(proxy_config(source_url, &proxy_target_url, args.pool_size)?)
        .context("building the proxy")?;
    let data = TcpListener::bind("127.0.0.1:0").await?;
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_base = format!("http://{}", data.local_addr()?);
    let admin_base = format!("http://{}", admin.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let proxy = tokio::spawn(app.run(data, admin, async {
        let _ = stopped.await;
    }));

    let transport = Transport::with_pool(Protocol::Http1, Some(args.writers.max(1) + 2));
    let admin = AdminClient::with_transport(transport.clone(), &admin_base);
    wait_ready(&admin).await?;

    let harness = Harness {
        args: args.clone(),
        proxy: DataClient::with_transport(transport, &proxy_base),
        admin,
        control,
        tenant,
    };
    let result = phases(&harness, args.rounds.max(1)).await;

    let _ = stop.send(());
    let Harness {
        proxy: data,
        admin,
        control,
        ..
    } = harness;
    drop((data, admin));
    match tokio::time::timeout(Duration::from_secs(15), proxy).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("the proxy task ended abnormally: {e}"),
        Err(_) => eprintln!("the proxy did not stop within 15 s"),
    }
    control.close().await;
    let mut measured = result?;
    let mut target = PgConnection::connect(target_url).await?;
    measured.target_events = sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&mut target)
        .await?;
    // How the mirror's inserts reached the target table (a sequential scan per mirror batch
    // would show here).
    let scans: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT seq_scan, seq_tup_read, coalesce(idx_scan, 0)
           FROM pg_stat_user_tables WHERE relname = 'events'",
    )
    .fetch_optional(&mut target)
    .await?;
    measured.target_scans = scans;
    target.close().await?;
    Ok(measured)
}

/// normal, dual, normal, dual, … with the mirror drained after each dual phase.
async fn phases(harness: &Harness, rounds: usize) -> Result<Measured> {
    let mut measured = Measured {
        normal: Outcome::new()?,
        dual: Outcome::new()?,
        mirror: BTreeMap::new(),
        drains: Vec::new(),
        route_changes: Vec::new(),
        target_events: 0,
        target_scans: None,
    };
    for _ in 0..rounds {
        for routing in [Routing::Normal, Routing::Dual] {
            measured.route_changes.push(harness.route(routing).await?);
            match routing {
                Routing::Normal => harness.run(routing, &mut measured.normal).await?,
                Routing::Dual => {
                    harness.run(routing, &mut measured.dual).await?;
                    measured
                        .drains
                        .push(harness.wait_mirror(measured.dual.sent).await?);
                }
            }
        }
    }
    measured.mirror = mirror_counters(&harness.admin).await?;
    Ok(measured)
}

fn report(args: &Args, version: &str, load: ([f64; 3], [f64; 3]), m: &Measured) -> String {
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let (normal, dual) = (&m.normal, &m.dual);
    let diff_p50 = to_i64(dual.quantile(0.50)) - to_i64(normal.quantile(0.50));
    let diff_p99 = to_i64(dual.quantile(0.99)) - to_i64(normal.quantile(0.99));
    let p99_ratio = dual.quantile(0.99) as f64 / normal.quantile(0.99).max(1) as f64;
    let rate_ratio = dual.rate() / normal.rate().max(1e-9);
    let ms = |d: &Duration| round1(d.as_secs_f64() * 1000.0);
    let summary = json!({
        "bench": "dual_write",
        "writers": args.writers,
        "pool_size": args.pool_size,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup_seconds,
        "rate": args.rate,
        "seed_events": args.seed_events,
        "rounds": args.rounds.max(1),
        "smoke": args.common.smoke,
        "target_options": args.target_options,
        "postgres": version,
        "load_average_before": load.0,
        "load_average_after": load.1,
        "normal": normal.summary(),
        "dual_write": dual.summary(),
        "dual_minus_normal_p50_us": diff_p50,
        "dual_minus_normal_p99_us": diff_p99,
        "p99_ratio": round3(p99_ratio),
        "throughput_ratio": round3(rate_ratio),
        "mirror_writes_total": m.mirror,
        "events_sent_in_dual_phases": dual.sent,
        "target_events": m.target_events,
        "target_events_table_scans": m.target_scans.map(|(seq, tup, idx)| json!({
            "seq_scan": seq, "seq_tup_read": tup, "idx_scan": idx,
        })),
        "mirror_drain_ms": m.drains.iter().map(ms).collect::<Vec<_>>(),
        "route_change_ms": m.route_changes.iter().map(ms).collect::<Vec<_>>(),
    });
    let mut out = format!("{summary}\n\n");
    out.push_str(
        "| routing | appends | appends/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | harness+proxy CPU s/s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (routing, o) in [(Routing::Normal, normal), (Routing::Dual, dual)] {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {:.2} |",
            routing.name(),
            o.count,
            o.rate(),
            o.quantile(0.50),
            o.quantile(0.90),
            o.quantile(0.99),
            o.quantile(0.999),
            o.latencies_us.max(),
            o.cpu_seconds / o.window.as_secs_f64().max(1e-9),
        );
    }
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let counters: Vec<String> = m.mirror.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = write!(
        out,
        "\ndual − normal: p50 {diff_p50:+} µs, p99 {diff_p99:+} µs (dual p99 {:.1}% of normal; \
         target ≤ {:.0}%: {}); throughput {:.1}% of normal\n\
         mirror: {} events sent in dual phases; switchyard_proxy_mirror_writes_total: {}; \
         target holds {} of the tenant's events; mirror caught up {} ms after each dual phase\n",
        p99_ratio * 100.0,
        TARGET_P99_RATIO * 100.0,
        verdict(p99_ratio <= TARGET_P99_RATIO),
        rate_ratio * 100.0,
        dual.sent,
        if counters.is_empty() {
            "none".to_owned()
        } else {
            counters.join(", ")
        },
        m.target_events,
        m.drains
            .iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", "),
    );
    if let Some((seq, tup, idx)) = m.target_scans {
        let _ = writeln!(
            out,
            "target events table: {seq} sequential scans reading {tup} rows, {idx} index scans"
        );
    }
    out
}

/// Creates the databases, measures, and drops the databases whatever happened.
async fn run(args: Args) -> Result<()> {
    let mut admin = PgConnection::connect(&args.common.pg_url)
        .await
        .with_context(|| format!("connecting to --pg-url {}", redact(&args.common.pg_url)))?;
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut admin)
        .await?;
    let name = format!("sy_dw_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let target_name = format!("{name}_target");
    let source_url = with_database(&args.common.pg_url, &name)?;
    let target_url = with_database(&args.common.pg_url, &target_name)?;
    let mut created = Vec::new();
    let mut result = Ok(());
    for db in [&name, &target_name] {
        if let Err(e) = sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&mut admin)
            .await
        {
            result = Err(anyhow::Error::from(e).context(format!("creating database {db}")));
            break;
        }
        eprintln!("created database {db}");
        created.push(db.clone());
    }

    let load_before = load_averages();
    let measured = match result {
        Ok(()) => tokio::select! {
            measured = measure(args.clone(), &source_url, &target_url) => measured,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        },
        Err(e) => Err(e),
    };
    let load_after = load_averages();

    let mut dropped = Ok(());
    for db in created {
        match sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await
        {
            Ok(_) => eprintln!("dropped database {db}"),
            Err(e) => dropped = Err(anyhow::Error::from(e).context(format!("dropping {db}"))),
        }
    }
    let _ = admin.close().await;
    let measured = measured?;
    dropped?;
    eprintln!(
        "writers {}, {} s measured + {} s warm-up per phase, {} round(s) of normal + dual{}",
        args.writers,
        args.seconds,
        args.warmup_seconds,
        args.rounds.max(1),
        if args.common.smoke {
            " (smoke: the figures mean nothing)"
        } else {
            ""
        }
    );
    print!(
        "{}",
        report(&args, &version, (load_before, load_after), &measured)
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse().effective();
    if args.writers == 0 || args.seconds <= 0.0 || args.warmup_seconds < 0.0 {
        bail!("--writers and --seconds must be > 0 and --warmup-seconds >= 0");
    }
    let log = args.log.clone();
    block_on(Some(&log), run(args))
}
