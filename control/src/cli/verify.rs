//! `verify MIGRATION [--level count|hash|full] [--sample PCT]`: does the target hold exactly the
//! source's events of the tenant? (The runbook's "handle consistency failure" investigation.)
//! Exit 1 when it does not.

use uuid::Uuid;

use super::{emit, CliError};
use crate::context::Context;
use crate::verify::{Level, Report};

#[derive(Debug, clap::Args)]
pub struct Args {
    pub migration: Uuid,
    /// count: per-stream counts and last versions; hash: per-stream digests, then bisection to
    /// the first differing event; full: event by event.
    #[arg(long, value_enum, default_value = "hash")]
    pub level: Level,
    /// Verify this percentage of the streams (the same streams every run).
    #[arg(long, value_name = "PCT", value_parser = percentage)]
    pub sample: Option<f64>,
}

fn percentage(text: &str) -> Result<f64, String> {
    let pct: f64 = text
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage"))?;
    if pct > 0.0 && pct <= 100.0 {
        Ok(pct)
    } else {
        Err(format!(
            "{text}: a sample is more than 0 and at most 100 percent"
        ))
    }
}

pub(super) async fn run(ctx: &mut Context, args: &Args, json: bool) -> Result<(), CliError> {
    let engine = ctx.engine().await?;
    let record = engine.control.migration(args.migration).await?;
    let report = engine.verify(&record, args.level, args.sample).await?;
    emit(json, &report, render);
    if report.consistent {
        Ok(())
    } else {
        Err(CliError::Reported(format!(
            "migration {}: the target differs from the source: {}",
            record.id,
            report.summary(5)
        )))
    }
}

/// The runbook's consistency report.
pub(super) fn render(r: &Report) -> String {
    let mut out = format!(
        "Consistency Report\n  Level: {}{}\n  Source events: {}\n  Target events: {}{}\n  \
         Streams verified: {}\n  Streams consistent: {}\n  Duration: {} ms ({:.0} events/s)\n  Consistent: {}\n",
        r.level.as_str(),
        r.digests
            .map_or_else(String::new, |d| format!(" (digests {})", d.replace('_', " "))),
        r.source_event_count,
        r.target_event_count,
        if r.target_events_past_horizon > 0 {
            format!(" (+{} newer, past the verified horizon)", r.target_events_past_horizon)
        } else {
            String::new()
        },
        r.streams_verified,
        r.streams_consistent,
        r.duration_ms,
        r.events_per_second,
        if r.consistent { "yes" } else { "NO" },
    );
    if let Some(pct) = r.sample_percent {
        out.push_str(&format!("  Sample: {pct}% of the streams\n"));
        if r.streams_verified == 0 {
            out.push_str(
                "  (no stream fell in the sample: nothing was compared; raise --sample)\n",
            );
        }
    }
    if !r.violations.is_empty() {
        out.push_str("\nInconsistent streams:\n");
        for v in &r.violations {
            out.push_str(&format!(
                "  {}: {:?} at version {} (source {} events, last version {}; target {} events, last version {}): {}\n",
                v.stream,
                v.kind,
                v.first_version
                    .map_or_else(|| "?".to_owned(), |x| x.to_string()),
                v.source_count,
                v.source_version,
                v.target_count,
                v.target_version,
                v.detail
            ));
        }
        if r.violations_not_classified > 0 {
            out.push_str(&format!(
                "  … and {} more inconsistent streams (not classified)\n",
                r.violations_not_classified
            ));
        }
    }
    out
}
