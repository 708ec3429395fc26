// Run: cargo run --release -p switchyard-benches --bin fairness -- --seconds 10 --rounds 3
// Smoke: cargo run --release -p switchyard-benches --bin fairness -- --smoke

//! Fairness during a hot tenant's cutover (issue 15, item 8): another tenant's append latency
//! through a proxy, with a hot tenant on the same source store, at baseline and while a
//! cutover holds the hot tenant's fence and the proxy has not heard of it.
//!
//! The harness creates three fresh databases (`sy_fair_<random>_control`, `…_shared`,
//! `…_dedicated`), starts the proxy in-process on `127.0.0.1:0` with both stores
//! (`--pool-size` connections each, `--max-requests` request slots, `--share` as
//! `proxy.migrating_tenant_share`), and routes the hot tenant `dual_write` (shared →
//! dedicated) with `ControlDb::set_route`. `--writers` writers append to the other tenant (one
//! event each with `expected_version`, closed loop) in every phase. It alternates phases
//! (`--rounds` pairs): baseline (the other tenant alone; with `--hot-in-baseline` the hot
//! writers append too) and cutover (a session holds the hot tenant's source fence row `FOR
//! UPDATE`, as a cutover does, for the whole phase, while `--hot-writers` writers append to the
//! hot tenant without pause, one event each, retrying 20 ms after a 503; the proxy's route
//! stays `dual_write`, as in a proxy whose control link is down, so its hot appends block on
//! the fence row inside PostgreSQL). Each phase is `--warmup-seconds`
//! unmeasured, then `--seconds` measured. It reports the other tenant's latency percentiles
//! and failures per phase (merged over rounds), the hot tenant's answers, and the proxy's
//! `switchyard_proxy_shed_requests_total`, as one JSON line and a Markdown table. `--share 1`
//! is the proxy without the bound (as before issue 15 item 8). The databases are dropped at
//! the end, also after a failure or Ctrl-C.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use http::StatusCode;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use switchyard_benches::args::Common;
use switchyard_benches::report::{block_on, latencies, load_averages, record_latency};
use switchyard_benches::{counters, toml_string, Databases, InProcessProxy};
use switchyard_client::{
    AdminClient, ClientError, DataClient, ExpectedVersion, NewEvent, Protocol,
    RoutingState as ClientRoutingState, StreamId, Transport,
};
use switchyard_config::Config;
use switchyard_store::{ControlDb, EventStore, RouteUpdate, RoutingState};
use tokio::sync::{watch, Mutex};
use uuid::Uuid;

/// The target: the other tenant's p99 within 20 % of its baseline.
const TARGET_P99_RATIO: f64 = 1.20;

/// Measures another tenant's appends at baseline and during a hot tenant's cutover.
#[derive(Debug, Clone, Parser)]
#[command(name = "fairness")]
struct Args {
    /// Writers of the other tenant, each on a stream of its own.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Writers of the hot tenant (more than the pool and the request slots).
    #[arg(long, default_value_t = 64)]
    hot_writers: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured seconds at the start of each phase.
    #[arg(long, default_value_t = 2.0)]
    warmup_seconds: f64,
    /// Pairs of phases (baseline, then cutover).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connections in the proxy's pool to each store.
    #[arg(long, default_value_t = 16)]
    pool_size: u32,
    /// `proxy.max_concurrent_requests`.
    #[arg(long, default_value_t = 32)]
    max_requests: usize,
    /// Let the hot tenant append in the baseline phases too (without it the baseline is the
    /// other tenant alone).
    #[arg(long)]
    hot_in_baseline: bool,
    /// `proxy.migrating_tenant_share`; 1 is no bound.
    #[arg(long, default_value_t = 0.5)]
    share: f64,
    /// Proxy log filter.
    #[arg(long, default_value = "warn")]
    log: String,
    #[command(flatten)]
    common: Common,
}

impl Args {
    fn effective(mut self) -> Self {
        if self.common.smoke {
            self.seconds = 1.0;
            self.warmup_seconds = 0.2;
            self.rounds = 1;
            self.hot_writers = self.hot_writers.min(24);
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Baseline,
    Cutover,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Cutover => "cutover",
        }
    }
}

/// The other tenant's appends in one kind of phase, merged over rounds.
struct Outcome {
    latencies_us: Histogram<u64>,
    /// Answers other than 201, by status and error code.
    failures: BTreeMap<String, u64>,
    window: Duration,
}

impl Outcome {
    fn new() -> Result<Self> {
        Ok(Self {
            latencies_us: latencies()?,
            failures: BTreeMap::new(),
            window: Duration::ZERO,
        })
    }

    fn quantile(&self, q: f64) -> u64 {
        self.latencies_us.value_at_quantile(q)
    }

    fn summary(&self) -> Value {
        json!({
            "count": self.latencies_us.len(),
            "appends_per_s": (self.latencies_us.len() as f64 / self.window.as_secs_f64().max(1e-9)).round(),
            "p50_us": self.quantile(0.50),
            "p90_us": self.quantile(0.90),
            "p99_us": self.quantile(0.99),
            "max_us": self.latencies_us.max(),
            "failures": self.failures,
        })
    }
}

/// Appends one event to `stream` (at `expected`, or at any version), answering the status and
/// the error code (empty on success). No answer at all ends the run.
async fn append_one(
    proxy: &DataClient,
    stream: &StreamId,
    expected: Option<u64>,
) -> Result<(StatusCode, String)> {
    let mut event = NewEvent::new(
        "Deposited",
        json!({"amount_cents": 1234, "note": "fairness bench"}),
    );
    event.event_id = Uuid::now_v7();
    let expected = expected.map_or(ExpectedVersion::Any, ExpectedVersion::Exact);
    match proxy.append(stream, expected, &[event]).await {
        Ok(_) => Ok((StatusCode::CREATED, String::new())),
        Err(ClientError::Api(refused)) => Ok((refused.status, refused.code.as_str().to_owned())),
        Err(e) => Err(e).context("append"),
    }
}

/// One writer of the other tenant, for one phase: its latencies and failures.
async fn other_writer(
    proxy: DataClient,
    stream: StreamId,
    measure_from: Instant,
    end: Instant,
) -> Result<(Histogram<u64>, BTreeMap<String, u64>)> {
    let mut latencies = latencies()?;
    let mut failures = BTreeMap::new();
    let mut version = 0u64;
    // When the current version was first tried: a latency runs from there to its 201, across
    // the 503s between (what the client waited for its event to be stored).
    let mut first_try = None;
    loop {
        let now = Instant::now();
        if now >= end {
            return Ok((latencies, failures));
        }
        let started = *first_try.get_or_insert(now);
        // After a 503 (nothing written) the retry carries a new event id; one that did write
        // would end in a 409 on the next try, and the harness stops.
        let (status, code) = append_one(&proxy, &stream, Some(version)).await?;
        let finished = Instant::now();
        let measured = finished >= measure_from && finished <= end;
        if status == StatusCode::CREATED {
            version += 1;
            first_try = None;
            if measured {
                record_latency(&mut latencies, finished.duration_since(started));
            }
        } else {
            if measured {
                *failures
                    .entry(format!("{} {code}", status.as_u16()))
                    .or_insert(0) += 1;
            }
            // A 504 may have committed: read the version back from the next conflict.
            if status == StatusCode::CONFLICT || status == StatusCode::GATEWAY_TIMEOUT {
                bail!("the other tenant's append was answered {status} {code}; the harness cannot go on");
            }
            // A client backing off before it retries.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One hot writer: appends until `stop`, counting answers by status and code.
async fn hot_writer(
    proxy: DataClient,
    stream: StreamId,
    mut stop: watch::Receiver<bool>,
    answers: Arc<Mutex<BTreeMap<String, u64>>>,
) -> Result<()> {
    while !*stop.borrow() {
        let sent = append_one(&proxy, &stream, None);
        let (status, code) = tokio::select! {
            answered = sent => answered?,
            _ = stop.changed() => return Ok(()),
        };
        *answers
            .lock()
            .await
            .entry(format!("{} {code}", status.as_u16()))
            .or_insert(0) += 1;
        if status != StatusCode::CREATED {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// `switchyard_proxy_shed_requests_total` by reason.
async fn shed_counters(admin: &AdminClient) -> Result<BTreeMap<String, u64>> {
    counters(admin, "switchyard_proxy_shed_requests_total", "reason").await
}

struct Harness {
    args: Args,
    proxy: DataClient,
    source_url: String,
    hot: Uuid,
    other: Uuid,
    /// The hot writers' answers, by status and code, over every phase.
    hot_answers: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Harness {
    /// One phase: the other tenant's writers, each on a new stream, merged into `into`; during
    /// a cutover phase (and with `--hot-in-baseline` in a baseline one) the hot writers, and a
    /// session holding the hot tenant's fence row in a cutover phase.
    async fn run(&self, phase: Phase, into: &mut Outcome) -> Result<()> {
        let mut holder = None;
        if phase == Phase::Cutover {
            let mut session = PgConnection::connect(&self.source_url).await?;
            sqlx::query("BEGIN").execute(&mut session).await?;
            let held =
                sqlx::query("SELECT 1 FROM switchyard_fences WHERE tenant_id = $1 FOR UPDATE")
                    .bind(self.hot)
                    .execute(&mut session)
                    .await?;
            if held.rows_affected() != 1 {
                bail!("the hot tenant has no fence row");
            }
            holder = Some(session);
        }
        let (stop_hot, hot_stopped) = watch::channel(false);
        let mut hot_tasks = tokio::task::JoinSet::new();
        if phase == Phase::Cutover || self.args.hot_in_baseline {
            for _ in 0..self.args.hot_writers {
                hot_tasks.spawn(hot_writer(
                    self.proxy.clone(),
                    StreamId::new(self.hot, "BenchAccount", Uuid::new_v4()),
                    hot_stopped.clone(),
                    Arc::clone(&self.hot_answers),
                ));
            }
        }
        let start = Instant::now();
        let measure_from = start + Duration::from_secs_f64(self.args.warmup_seconds);
        let end = measure_from + Duration::from_secs_f64(self.args.seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.args.writers {
            let stream = StreamId::new(self.other, "BenchAccount", Uuid::new_v4());
            tasks.spawn(other_writer(self.proxy.clone(), stream, measure_from, end));
        }
        while let Some(done) = tasks.join_next().await {
            let (latencies, failures) = done??;
            into.latencies_us.add(&latencies)?;
            for (k, n) in failures {
                *into.failures.entry(k).or_insert(0) += n;
            }
        }
        into.window += end.duration_since(measure_from);
        let _ = stop_hot.send(true);
        while let Some(done) = hot_tasks.join_next().await {
            if let Ok(Err(e)) = done {
                eprintln!("a hot writer failed: {e:#}");
            }
        }
        if let Some(mut session) = holder {
            sqlx::query("ROLLBACK").execute(&mut session).await?;
            session.close().await?;
        }
        Ok(())
    }
}

fn proxy_config(args: &Args, control: &str, shared: &str, dedicated: &str) -> Result<Config> {
    let text = format!(
        "control_url = {}\ndefault_store = \"shared\"\n\n\
         [[stores]]\nid = \"shared\"\nurl = {}\nmax_connections = {pool}\n\n\
         [[stores]]\nid = \"dedicated\"\nurl = {}\nmax_connections = {pool}\n\n\
         [proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         proxy_id = \"fairness-bench\"\nmax_concurrent_requests = {}\n\
         migrating_tenant_share = {}\nrequest_timeout_ms = 60000\n",
        toml_string(control),
        toml_string(shared),
        toml_string(dedicated),
        args.max_requests,
        args.share,
        pool = args.pool_size,
    );
    Config::from_parts(Some(&text), None, &[]).context("benchmark proxy config")
}

struct Measured {
    baseline: Outcome,
    cutover: Outcome,
    hot: BTreeMap<String, u64>,
    shed: BTreeMap<String, u64>,
}

async fn measure(args: &Args, dbs: &mut Databases) -> Result<Measured> {
    let (_, control_url) = dbs.create("control").await?;
    let (_, shared_url) = dbs.create("shared").await?;
    let (_, dedicated_url) = dbs.create("dedicated").await?;
    for url in [&shared_url, &dedicated_url] {
        let store = EventStore::connect("store", url, 1)?;
        store.ensure_schema().await.context("store schema")?;
        store.close().await;
    }
    let control = ControlDb::connect(&control_url, 2)?;
    control.ensure_schema().await.context("control schema")?;
    let (hot, other) = (Uuid::new_v4(), Uuid::new_v4());
    control
        .set_route(&RouteUpdate {
            tenant_id: hot,
            store_id: "shared".to_owned(),
            migration_state: RoutingState::DualWrite,
            target_store_id: Some("dedicated".to_owned()),
            active_migration_id: Some(Uuid::new_v4()),
        })
        .await?;
    control.close().await;
    // The fence row a migration's start writes, which the cutover takes.
    let mut source = PgConnection::connect(&shared_url).await?;
    sqlx::query(
        "INSERT INTO switchyard_fences (tenant_id, state, epoch, updated_at)
         VALUES ($1, 'open', 1, now())",
    )
    .bind(hot)
    .execute(&mut source)
    .await?;
    source.close().await?;

    let proxy = InProcessProxy::start(proxy_config(
        args,
        &control_url,
        &shared_url,
        &dedicated_url,
    )?)
    .await?;
    let (proxy_base, admin_base) = (proxy.data.clone(), proxy.admin.clone());
    let transport =
        Transport::with_pool(Protocol::Http1, Some(args.writers + args.hot_writers + 2));
    let admin = AdminClient::with_transport(transport.clone(), &admin_base);
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(detail) = admin.route(hot).await {
            if detail.route.state == ClientRoutingState::DualWrite {
                break;
            }
        }
        if Instant::now() >= ready_by {
            bail!("the proxy never routed the hot tenant dual_write");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let harness = Harness {
        args: args.clone(),
        proxy: DataClient::with_transport(transport, &proxy_base),
        source_url: shared_url.clone(),
        hot,
        other,
        hot_answers: Arc::default(),
    };
    let mut measured = Measured {
        baseline: Outcome::new()?,
        cutover: Outcome::new()?,
        hot: BTreeMap::new(),
        shed: BTreeMap::new(),
    };
    let mut result = Ok(());
    for _ in 0..args.rounds.max(1) {
        for phase in [Phase::Baseline, Phase::Cutover] {
            let into = match phase {
                Phase::Baseline => &mut measured.baseline,
                Phase::Cutover => &mut measured.cutover,
            };
            if let Err(e) = harness.run(phase, into).await {
                result = Err(e.context(format!("{} phase", phase.name())));
                break;
            }
        }
    }
    measured.hot = harness.hot_answers.lock().await.clone();
    measured.shed = shed_counters(&admin).await.unwrap_or_default();
    drop((harness, admin));
    proxy.stop().await;
    result.map(|()| measured)
}

fn report(args: &Args, load: ([f64; 3], [f64; 3]), m: &Measured) -> String {
    let ratio = m.cutover.quantile(0.99) as f64 / m.baseline.quantile(0.99).max(1) as f64;
    let line = json!({
        "bench": "fairness",
        "writers": args.writers,
        "hot_writers": args.hot_writers,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "pool_size": args.pool_size,
        "max_requests": args.max_requests,
        "share": args.share,
        "hot_in_baseline": args.hot_in_baseline,
        "smoke": args.common.smoke,
        "baseline": m.baseline.summary(),
        "cutover": m.cutover.summary(),
        "p99_ratio": (ratio * 1000.0).round() / 1000.0,
        "target_p99_ratio": TARGET_P99_RATIO,
        "hot_answers": m.hot,
        "shed_requests": m.shed,
        "load_before": load.0,
        "load_after": load.1,
    });
    let ms = |us: u64| us as f64 / 1000.0;
    let row = |name: &str, o: &Outcome| {
        format!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:?} |\n",
            o.latencies_us.len(),
            ms(o.quantile(0.50)),
            ms(o.quantile(0.90)),
            ms(o.quantile(0.99)),
            ms(o.latencies_us.max()),
            o.failures
        )
    };
    format!(
        "{line}\n\n| other tenant | appends | p50 ms | p90 ms | p99 ms | max ms | failures |\n\
         |---|---|---|---|---|---|---|\n{}{}\np99 cutover / baseline: {ratio:.3} (target ≤ {TARGET_P99_RATIO})\n\
         hot tenant's answers: {:?}\nshed requests by reason: {:?}\n",
        row("baseline", &m.baseline),
        row("cutover, stale proxy", &m.cutover),
        m.hot,
        m.shed
    )
}

async fn run(args: Args) -> Result<()> {
    let mut dbs = Databases::connect(&args.common.pg_url, "fair").await?;
    let load_before = load_averages();
    let measured = tokio::select! {
        measured = measure(&args, &mut dbs) => measured,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let load_after = load_averages();
    let dropped = dbs.drop_all().await;
    let measured = measured?;
    dropped?;
    print!("{}", report(&args, (load_before, load_after), &measured));
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse().effective();
    if args.writers == 0 || args.seconds <= 0.0 {
        bail!("--writers and --seconds must be > 0");
    }
    let log = args.log.clone();
    block_on(Some(&log), run(args))
}
