// Run: cargo run --release -p switchyard-benches --bin append_overhead -- --writers 16 --seconds 10 [--protocol h2c]

//! What the proxy adds to an append: the same appends, from the same number of concurrent
//! writers, once through the real proxy over HTTP/1.1 keep-alive (or h2c: HTTP/2 with prior
//! knowledge, every writer multiplexed on one connection, `--protocol h2c`) and once straight
//! into the store with sqlx (`EventStore::append`), in one run against one fresh PostgreSQL database.
//!
//! The harness creates `sy_bench_<random>` through the admin URL, creates the store and control
//! schemas in it (the one database serves as both), seeds the store with `--seed-events`
//! events and analyses it (see that flag for why), starts the proxy in-process on
//! `127.0.0.1:0`, and for each mode lets every writer append one event at a time (about 230
//! bytes of JSON) to a stream of its own with `expected_version`, for a warm-up and then the
//! measured window. It prints latency percentiles per mode, the proxy's added latency and its
//! share of direct throughput, as one JSON line and as a Markdown table, then stops the proxy
//! and drops the database (also after a failure or Ctrl-C).

use std::fmt::Write as _;
use std::time::{Duration, Instant};
use switchyard_benches::args::Common;
use switchyard_benches::report::{block_on, latencies, load_averages, round1, Window};
use switchyard_benches::{redact, toml_string, wait_ready, with_database};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use switchyard_benches::writer::{StreamWriter, WriterResult};
use switchyard_client::{AdminClient, DataClient, StreamId, Transport};
use switchyard_config::Config;
use switchyard_proxy::App;
use switchyard_store::{ControlDb, EventStore, NewEvent, StreamRef};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use uuid::Uuid;

/// Targets from the performance issue, printed beside the figures (a benchmark never fails a
/// build on a time).
const TARGET_P50_DIFF_US: i64 = 150;
const TARGET_P99_DIFF_US: i64 = 500;
const TARGET_THROUGHPUT_RATIO: f64 = 0.85;
const AGGREGATE_TYPE: &str = "BenchOrder";
const EVENT_TYPE: &str = "OrderPlaced";
const ACTOR: &str = "append-overhead";

/// Measures the latency and throughput the proxy adds to appends over direct sqlx.
#[derive(Debug, Clone, Parser)]
#[command(name = "append_overhead")]
struct Args {
    /// Concurrent writers, each appending to a stream of its own.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Measured seconds per mode (per round).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured seconds per mode before the measured window (pools fill, statements get
    /// prepared).
    #[arg(long, default_value_t = 2.0)]
    warmup_seconds: f64,
    /// Connections in the proxy's store pool and in the direct pool.
    #[arg(long, default_value_t = 16)]
    pool_size: u32,
    /// Rounds of both modes; the order alternates (direct first in odd rounds) and each mode's
    /// histograms are merged, so slow drift in the database does not favour one mode.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Events written (100 per append, one stream each) and analysed before anything is
    /// measured. A store's `switchyard_append` plans are cached per connection: a connection
    /// whose first appends ran against a near-empty `events` table keeps a sequential-scan plan
    /// as the table grows, so both modes must start on a table of realistic size.
    #[arg(long, default_value_t = 50_000)]
    seed_events: u32,
    /// Proxy log filter, as the real binary takes it (its default is `info`; the per-request
    /// spans are created at info level, so this is part of what is measured).
    #[arg(long, default_value = "info")]
    log: String,
    /// How the proxy's appends travel: HTTP/1.1 keep-alive (a connection per writer) or h2c
    /// (HTTP/2 with prior knowledge, all writers multiplexed on one connection).
    #[arg(long, value_enum, default_value_t = Protocol::H1)]
    protocol: Protocol,
    /// How `switchyard_append` plans its queries: `auto` (PostgreSQL's default: a generic
    /// plan cached per connection once it looks no worse) or `custom` (`ALTER FUNCTION … SET
    /// plan_cache_mode = force_custom_plan`: planned afresh on every call), to measure both the
    /// per-call cost of custom plans and, with `--seed-events 0`, the cached-plan pitfall.
    #[arg(long, value_enum, default_value_t = AppendPlans::Auto)]
    append_plans: AppendPlans,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AppendPlans {
    Auto,
    Custom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Protocol {
    H1,
    H2c,
}

impl Args {
    fn effective(mut self) -> Self {
        if self.common.smoke {
            self.writers = 2;
            self.pool_size = 2;
            self.seconds = 1.0;
            self.warmup_seconds = 0.2;
            self.rounds = 1;
            self.seed_events = 1_000;
        }
        self
    }
}

/// The two ways an append is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Proxy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Proxy => "proxy",
        }
    }
}

/// One mode's measurements, merged over writers and rounds.
struct Outcome {
    latencies_us: Histogram<u64>,
    /// Appends completed inside the measured windows.
    count: u64,
    /// Total length of the measured windows.
    window: Duration,
}

impl Outcome {
    fn new() -> Result<Self> {
        Ok(Self {
            latencies_us: latencies()?,
            count: 0,
            window: Duration::ZERO,
        })
    }

    fn rate(&self) -> f64 {
        self.count as f64 / self.window.as_secs_f64()
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
        })
    }
}

/// A JSON object of about 230 bytes, different per event.
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

/// The stream a writer appends to in one run: new each run, so versions start at 1.
fn new_stream() -> (Uuid, Uuid) {
    (Uuid::new_v4(), Uuid::new_v4())
}

async fn direct_writer(store: EventStore, writer: usize, window: Window) -> Result<WriterResult> {
    let mut result = WriterResult::new()?;
    let (tenant_id, aggregate_id) = new_stream();
    let stream = StreamRef {
        tenant_id,
        aggregate_type: AGGREGATE_TYPE,
        aggregate_id,
    };
    let mut version: u64 = 0;
    loop {
        let started = Instant::now();
        if started >= window.end {
            return Ok(result);
        }
        let events = [NewEvent::new(
            Uuid::now_v7(),
            EVENT_TYPE,
            RawValue::from_string(payload(writer, version).to_string())
                .context("payload is JSON")?,
            Some(ACTOR.to_owned()),
            None,
        )];
        let expected = i32::try_from(version).context("stream version fits i32")?;
        let appended = store
            .append(stream, Some(expected), &events)
            .await
            .with_context(|| format!("direct append, writer {writer}, version {version}"))?;
        result
            .acknowledged(&window, started, version, appended.last_version.into())
            .with_context(|| format!("direct writer {writer}"))?;
        version += 1;
    }
}

/// Everything a run of one mode needs.
struct Harness {
    args: Args,
    direct: EventStore,
    proxy: DataClient,
}

impl Harness {
    /// Runs one mode once (warm-up plus window) with every writer, and merges into `into`.
    async fn run(&self, mode: Mode, into: &mut Outcome) -> Result<()> {
        let start = Instant::now();
        let window = Window {
            measure_from: start + Duration::from_secs_f64(self.args.warmup_seconds),
            end: start + Duration::from_secs_f64(self.args.warmup_seconds + self.args.seconds),
        };
        let mut tasks = tokio::task::JoinSet::new();
        for writer in 0..self.args.writers {
            match mode {
                Mode::Direct => {
                    tasks.spawn(direct_writer(self.direct.clone(), writer, window));
                }
                Mode::Proxy => {
                    let (tenant_id, aggregate_id) = new_stream();
                    let writer = StreamWriter {
                        proxy: self.proxy.clone(),
                        stream: StreamId::new(tenant_id, AGGREGATE_TYPE, aggregate_id),
                        writer,
                        event_type: EVENT_TYPE,
                        actor: ACTOR,
                        pace: None,
                    };
                    tasks.spawn(writer.run(window, payload));
                }
            }
        }
        while let Some(joined) = tasks.join_next().await {
            let result = joined.context("writer task panicked")??;
            into.latencies_us
                .add(&result.latencies_us)
                .context("merging histograms")?;
            into.count += result.count;
        }
        into.window += Duration::from_secs_f64(self.args.seconds);
        eprintln!(
            "{}: {} appends in the window so far",
            mode.name(),
            into.count
        );
        Ok(())
    }
}

fn proxy_config(db_url: &str, pool_size: u32) -> Result<Config> {
    let url = toml_string(db_url);
    let text = format!(
        "control_url = {url}\n\
         default_store = \"shared\"\n\
         \n\
         [[stores]]\n\
         id = \"shared\"\n\
         url = {url}\n\
         max_connections = {pool_size}\n\
         \n\
         [proxy]\n\
         listen = \"127.0.0.1:0\"\n\
         admin_listen = \"127.0.0.1:0\"\n\
         proxy_id = \"append-overhead-bench\"\n"
    );
    Config::from_parts(Some(&text), None, &[]).context("benchmark proxy config")
}

/// Starts the proxy, runs every round, stops the proxy. The database exists already.
/// Fills the new store with `events` events through a pool that is closed afterwards, then
/// refreshes the planner's statistics, so that no measured connection ever plans against a
/// near-empty table.
async fn seed(db_url: &str, events: u32, plans: AppendPlans) -> Result<()> {
    const PER_APPEND: u32 = 100;
    let store = EventStore::connect("shared", db_url, 2).context("seeding pool")?;
    store
        .ensure_schema()
        .await
        .context("creating the store schema")?;
    if plans == AppendPlans::Custom {
        let mut conn = PgConnection::connect(db_url).await?;
        sqlx::query(
            "ALTER FUNCTION switchyard_append(uuid, text, uuid, integer, uuid[], text[], jsonb[],
                                             text[], timestamptz[])
               SET plan_cache_mode = force_custom_plan",
        )
        .execute(&mut conn)
        .await
        .context("setting plan_cache_mode on switchyard_append")?;
        conn.close().await?;
    }
    for n in 0..events.div_ceil(PER_APPEND) {
        let batch: Vec<NewEvent> = (0..PER_APPEND.min(events - n * PER_APPEND))
            .map(|i| {
                Ok(NewEvent::new(
                    Uuid::now_v7(),
                    EVENT_TYPE,
                    RawValue::from_string(payload(0, u64::from(i)).to_string())
                        .context("payload is JSON")?,
                    Some(ACTOR.to_owned()),
                    None,
                ))
            })
            .collect::<Result<_>>()?;
        let stream = StreamRef {
            tenant_id: Uuid::new_v4(),
            aggregate_type: AGGREGATE_TYPE,
            aggregate_id: Uuid::new_v4(),
        };
        store
            .append(stream, Some(0), &batch)
            .await
            .context("seeding the store")?;
    }
    store.close().await;
    // Planner statistics are maintenance, not data access: the store crate has no call for it.
    let mut conn = PgConnection::connect(db_url).await?;
    sqlx::query("ANALYZE").execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

async fn measure(args: Args, db_url: &str) -> Result<(Outcome, Outcome)> {
    seed(db_url, args.seed_events, args.append_plans).await?;
    ControlDb::connect(db_url, 2)
        .context("control pool")?
        .ensure_schema()
        .await
        .context("creating the control schema")?;

    let app = App::build(proxy_config(db_url, args.pool_size)?).context("building the proxy")?;
    let data = TcpListener::bind("127.0.0.1:0").await?;
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_base = format!("http://{}", data.local_addr()?);
    let admin_base = format!("http://{}", admin.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let proxy = tokio::spawn(app.run(data, admin, async {
        let _ = stopped.await;
    }));

    // TCP_NODELAY, as any latency-minded client (the proxy sets it on its side too).
    wait_ready(&AdminClient::new(&admin_base)).await?;
    let transport = match args.protocol {
        Protocol::H1 => Transport::with_pool(
            switchyard_client::Protocol::Http1,
            Some(args.writers.max(1)),
        ),
        Protocol::H2c => Transport::new(switchyard_client::Protocol::H2c),
    };

    let direct = EventStore::connect("shared", db_url, args.pool_size).context("direct pool")?;
    let rounds = args.rounds.max(1);
    let harness = Harness {
        args,
        direct,
        proxy: DataClient::with_transport(transport, &proxy_base),
    };
    let mut direct_outcome = Outcome::new()?;
    let mut proxy_outcome = Outcome::new()?;
    let mut result = Ok(());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Mode::Direct, Mode::Proxy]
        } else {
            [Mode::Proxy, Mode::Direct]
        };
        for mode in order {
            let into = match mode {
                Mode::Direct => &mut direct_outcome,
                Mode::Proxy => &mut proxy_outcome,
            };
            result = harness.run(mode, into).await;
            if result.is_err() {
                break;
            }
        }
        if result.is_err() {
            break;
        }
    }

    let _ = stop.send(());
    drop(harness.proxy);
    harness.direct.close().await;
    match tokio::time::timeout(Duration::from_secs(15), proxy).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("the proxy task ended abnormally: {e}"),
        Err(_) => eprintln!("the proxy did not stop within 15 s"),
    }
    result.map(|()| (direct_outcome, proxy_outcome))
}

/// The 1-minute load average, `None` where unreadable.
fn load_average_1m() -> Option<f64> {
    Some(load_averages()[0]).filter(|l| l.is_finite())
}

/// What the machine was doing around the measurement.
struct Conditions<'a> {
    database_version: &'a str,
    load_before: Option<f64>,
    load_after: Option<f64>,
}

fn report(args: &Args, conditions: &Conditions<'_>, direct: &Outcome, proxy: &Outcome) -> String {
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let diff_p50 = to_i64(proxy.quantile(0.50)) - to_i64(direct.quantile(0.50));
    let diff_p99 = to_i64(proxy.quantile(0.99)) - to_i64(direct.quantile(0.99));
    let ratio = proxy.rate() / direct.rate();
    let summary = json!({
        "bench": "append_overhead",
        "writers": args.writers,
        "protocol": match args.protocol {
            Protocol::H1 => "http/1.1",
            Protocol::H2c => "h2c",
        },
        "pool_size": args.pool_size,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup_seconds,
        "rounds": args.rounds.max(1),
        "seed_events": args.seed_events,
        "append_plans": format!("{:?}", args.append_plans).to_lowercase(),
        "smoke": args.common.smoke,
        "postgres": conditions.database_version,
        "load_average_1m_before": conditions.load_before,
        "load_average_1m_after": conditions.load_after,
        "direct": direct.summary(),
        "proxy": proxy.summary(),
        "proxy_minus_direct_p50_us": diff_p50,
        "proxy_minus_direct_p99_us": diff_p99,
        "throughput_ratio": (ratio * 1000.0).round() / 1000.0,
    });
    let mut out = format!("{summary}\n\n");
    out.push_str(
        "| mode | appends | appends/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (mode, o) in [(Mode::Direct, direct), (Mode::Proxy, proxy)] {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} |",
            mode.name(),
            o.count,
            o.rate(),
            o.quantile(0.50),
            o.quantile(0.90),
            o.quantile(0.99),
            o.quantile(0.999),
            o.latencies_us.max(),
        );
    }
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let _ = write!(
        out,
        "\nproxy − direct: p50 {diff_p50:+} µs (target ≤ {TARGET_P50_DIFF_US}: {}), \
         p99 {diff_p99:+} µs (target ≤ {TARGET_P99_DIFF_US}: {}); \
         throughput {:.1}% of direct (target ≥ {:.0}%: {})\n",
        verdict(diff_p50 <= TARGET_P50_DIFF_US),
        verdict(diff_p99 <= TARGET_P99_DIFF_US),
        ratio * 100.0,
        TARGET_THROUGHPUT_RATIO * 100.0,
        verdict(ratio >= TARGET_THROUGHPUT_RATIO),
    );
    out
}

/// Creates the database, measures, and drops the database whatever happened.
async fn run(args: Args) -> Result<()> {
    let mut admin = PgConnection::connect(&args.common.pg_url)
        .await
        .with_context(|| format!("connecting to --pg-url {}", redact(&args.common.pg_url)))?;
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut admin)
        .await?;
    let name = format!("sy_bench_{}", &Uuid::new_v4().simple().to_string()[..12]);
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .with_context(|| format!("creating database {name}"))?;
    eprintln!("created database {name}");
    let db_url = with_database(&args.common.pg_url, &name)?;

    let load_before = load_average_1m();
    let measured = tokio::select! {
        measured = measure(args.clone(), &db_url) => measured,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };

    let load_after = load_average_1m();
    let dropped = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .with_context(|| format!("dropping database {name}"));
    let _ = admin.close().await;
    if dropped.is_ok() {
        eprintln!("dropped database {name}");
    }
    let (direct, proxy) = measured?;
    dropped?;
    eprintln!(
        "writers {} ({:?}), {} s measured + {} s warm-up per mode, {} round(s){}",
        args.writers,
        args.protocol,
        args.seconds,
        args.warmup_seconds,
        args.rounds.max(1),
        if args.common.smoke {
            " (smoke: the figures mean nothing)"
        } else {
            ""
        }
    );
    let conditions = Conditions {
        database_version: &version,
        load_before,
        load_after,
    };
    print!("{}", report(&args, &conditions, &direct, &proxy));
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
