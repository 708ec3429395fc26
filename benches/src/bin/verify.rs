// Run: cargo run --release -p switchyard-benches --bin verify -- --events 1000000 --runs 3

//! Verification throughput, PostgreSQL ↔ PostgreSQL, against plain SQL over the same rows.
//!
//! The harness creates a source and a target store database and seeds both alike with
//! `--events` events of one tenant (streams of 100 versions, ~180-byte JSON payloads; event ids
//! and timestamps fixed by row number, so the two stores hold the same events), VACUUM
//! ANALYZEs them, then measures, `--runs` times each, warm:
//!
//! - baselines: `count(*)` of the tenant's rows on both sides at once, and
//!   `md5(string_agg(event_id || version || event_type || payload …) ORDER BY global_position)`
//!   on both sides at once (one digest over the tenant, no per-stream answer);
//! - `count` and `hash` verification as `switchyard-control verify` runs them
//!   (`switchyard_control::verify::verify`, scope: every source row);
//! - bisection: one event's payload changed in the target (a stream in the middle, version
//!   50), then `hash` verification, timed to the report naming that stream and version.
//!
//! Prints one JSON line and a Markdown table; drops its databases at the end.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use switchyard_benches::args::Common;
use switchyard_benches::report::median;
use switchyard_benches::{seed, Databases, SEED_STREAM_LEN};
use switchyard_control::verify::{verify, Level, Scope, ViolationKind};
use switchyard_store::EventStore;
use uuid::Uuid;

const TARGET_EVENTS_PER_S: f64 = 500_000.0;

#[derive(Debug, Parser)]
#[command(name = "verify")]
struct Args {
    /// Events of the verified tenant.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Measurements of each kind (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[command(flatten)]
    common: Common,
}

struct Sample {
    name: &'static str,
    seconds: Vec<f64>,
    events: u64,
}

impl Sample {
    fn median(&self) -> f64 {
        median(&self.seconds)
    }

    #[allow(clippy::cast_precision_loss)]
    fn rate(&self) -> f64 {
        self.events as f64 / self.median()
    }
}

async fn time<F, Fut, T>(runs: usize, mut f: F) -> Result<(Vec<f64>, T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut seconds = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(f().await?);
        seconds.push(started.elapsed().as_secs_f64());
    }
    Ok((seconds, last.context("at least one run")?))
}

async fn scalar_both(
    source: &str,
    target: &str,
    sql: &str,
    tenant: Uuid,
) -> Result<(String, String)> {
    let one = |url: String| {
        let sql = sql.to_owned();
        async move {
            let mut c = PgConnection::connect(&url).await?;
            let v: String = sqlx::query_scalar(&sql)
                .bind(tenant)
                .fetch_one(&mut c)
                .await?;
            c.close().await?;
            anyhow::Ok(v)
        }
    };
    Ok(tokio::try_join!(
        one(source.to_owned()),
        one(target.to_owned())
    )?)
}

async fn measure(args: &Args, dbs: &mut Databases) -> Result<serde_json::Value> {
    let (_, source_url) = dbs.create("src").await?;
    let (_, target_url) = dbs.create("tgt").await?;
    let source = EventStore::connect("source", &source_url, 4)?;
    let target = EventStore::connect("target", &target_url, 4)?;
    source.ensure_schema().await?;
    target.ensure_schema().await?;
    let tenant = Uuid::new_v4();
    eprintln!("seeding {} events into both stores …", args.events);
    let (a, b) = tokio::try_join!(
        seed(&source_url, tenant, args.events, 0, true),
        seed(&target_url, tenant, args.events, 0, true)
    )?;
    eprintln!(
        "seeded in {:.1} s / {:.1} s (payload {:.0} bytes)",
        a.0, b.0, a.1
    );
    let runs = args.runs;
    let n = args.events;
    // Warm both caches once.
    verify(&source, &target, tenant, &Scope::Final, Level::Count, None).await?;

    let (s, (x, y)) = time(runs, || {
        scalar_both(
            &source_url,
            &target_url,
            "SELECT count(*)::text FROM events WHERE tenant_id = $1",
            tenant,
        )
    })
    .await?;
    ensure!(x == y && x == n.to_string(), "baseline counts {x} / {y}");
    let count_sql = Sample {
        name: "baseline count(*)",
        seconds: s,
        events: n,
    };

    let md5 = "SELECT md5(string_agg(event_id::text || ':' || version || ':' || event_type || ':' \
               || coalesce(actor_id, '') || ':' || (timestamp AT TIME ZONE 'UTC')::text || ':' || payload::text, \
               '|' ORDER BY global_position)) FROM events WHERE tenant_id = $1";
    let (s, (x, y)) = time(runs, || scalar_both(&source_url, &target_url, md5, tenant)).await?;
    ensure!(x == y, "baseline digests differ");
    let md5_sql = Sample {
        name: "baseline md5(string_agg)",
        seconds: s,
        events: n,
    };

    let mut samples = vec![count_sql, md5_sql];
    for (name, level) in [("verify count", Level::Count), ("verify hash", Level::Hash)] {
        let (s, report) = time(runs, || async {
            Ok(verify(&source, &target, tenant, &Scope::Final, level, None).await?)
        })
        .await?;
        ensure!(report.consistent, "{name}: {:?}", report.violations);
        ensure!(
            u64::try_from(report.source_event_count)? == n,
            "{name} counted {}",
            report.source_event_count
        );
        samples.push(Sample {
            name,
            seconds: s,
            events: n,
        });
    }

    // One changed event in a stream in the middle.
    let streams = n / SEED_STREAM_LEN;
    let middle = streams / 2;
    let stream: Uuid = sqlx::query_scalar("SELECT md5($1::text || ':' || $2)::uuid")
        .bind(tenant.to_string())
        .bind(i64::try_from(middle)?)
        .fetch_one(&mut PgConnection::connect(&target_url).await?)
        .await?;
    let mut c = PgConnection::connect(&target_url).await?;
    let changed = sqlx::query(
        "UPDATE events SET payload = payload || '{\"tampered\": true}' WHERE aggregate_id = $1 AND version = 50",
    )
    .bind(stream)
    .execute(&mut c)
    .await?
    .rows_affected();
    ensure!(changed == 1, "corrupted {changed} rows");
    let (s, report) = time(runs, || async {
        Ok(verify(&source, &target, tenant, &Scope::Final, Level::Hash, None).await?)
    })
    .await?;
    ensure!(
        !report.consistent && report.violations.len() == 1,
        "{:?}",
        report.violations
    );
    let v = &report.violations[0];
    ensure!(
        v.aggregate_id == stream
            && v.first_version == Some(50)
            && v.kind == ViolationKind::Different,
        "named {v:?}"
    );
    let bisect = Sample {
        name: "verify hash, one event differs (bisection)",
        seconds: s,
        events: n,
    };

    source.close().await;
    target.close().await;
    samples.push(bisect);

    let mut table = String::from(
        "| measurement | events | runs (s) | median s | events/s |\n|---|---:|---|---:|---:|\n",
    );
    for s in &samples {
        table.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.0} |\n",
            s.name,
            s.events,
            s.seconds
                .iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            s.median(),
            s.rate()
        ));
    }
    let hash = &samples[3];
    table.push_str(&format!(
        "\nhash verification: {:.0} events/s (target ≥ {TARGET_EVENTS_PER_S:.0}: {}); {:.0}% of the md5(string_agg) baseline's time\n",
        hash.rate(),
        if hash.rate() >= TARGET_EVENTS_PER_S { "met" } else { "missed" },
        100.0 * hash.median() / samples[1].median()
    ));
    println!("{table}");
    Ok(json!({
        "bench": "verify",
        "events": n,
        "runs": runs,
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "results": samples.iter().map(|s| json!({
            "name": s.name, "seconds": s.seconds, "median_s": s.median(), "events_per_s": s.rate()
        })).collect::<Vec<_>>(),
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.common.smoke {
        args.events = 20_000;
        args.runs = 1;
    }
    ensure!(
        args.events >= 2 * SEED_STREAM_LEN,
        "--events: at least two streams"
    );
    let mut dbs = Databases::connect(&args.common.pg_url, "verify").await?;
    let result = tokio::select! {
        r = measure(&args, &mut dbs) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    dbs.drop_all().await?;
    let summary = result?;
    println!("{summary}");
    Ok(())
}
