//! The demo's findings: the target read back and verified against the frozen source, every
//! seeded and acknowledged event checked to be there exactly once, the latencies summarised,
//! and the summary as text.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use switchyard_store::{EventStore, StoredEvent};
use uuid::Uuid;

use super::migrate::Migrated;
use super::{DemoError, Options, Summary, Verification};
use switchyard_client::{Ack, LoadReport};

/// The tenant's events in a store, in global order.
pub(super) async fn read_all(
    store: &EventStore,
    tenant: Uuid,
) -> Result<Vec<StoredEvent>, DemoError> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .read_tenant(tenant, after, 10_000)
            .await
            .map_err(|e| DemoError::Failed(format!("reading store {}: {e}", store.id())))?;
        let Some(last) = page.last() else { break };
        after = last.global_position;
        out.extend(page);
    }
    Ok(out)
}

/// `verify --level hash` after the cutover: the source is frozen by its moved fence, so every
/// source event is compared (the same code as `switchyard-control verify`).
pub(super) async fn verify(
    source: &EventStore,
    target: &EventStore,
    tenant: Uuid,
) -> Result<Verification, DemoError> {
    let report = crate::verify::verify(
        source,
        target,
        tenant,
        &crate::verify::Scope::Final,
        crate::verify::Level::Hash,
        None,
    )
    .await
    .map_err(|e| DemoError::Failed(format!("verification: {e}")))?;
    Ok(Verification {
        consistent: report.consistent,
        source_events: usize::try_from(report.source_event_count).unwrap_or(0),
        streams: report.streams_verified,
        streams_consistent: report.streams_consistent,
        violations: report
            .violations
            .iter()
            .take(10)
            .map(|v| {
                format!(
                    "{}: {:?} at version {:?}: {}",
                    v.stream, v.kind, v.first_version, v.detail
                )
            })
            .collect(),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

#[allow(clippy::too_many_arguments)]
pub(super) fn summarise(
    options: &Options,
    label: &str,
    tenant: Uuid,
    source_id: &str,
    target_id: &str,
    seeded: Vec<Uuid>,
    migrated: Migrated,
    writers: &LoadReport,
    verification: Verification,
    target_events: &[StoredEvent],
    backend: &'static str,
    started: Instant,
) -> Summary {
    let acked: Vec<&Ack> = writers.acked.iter().collect();
    let retried = writers.retries;
    let (from, to) = migrated.window;
    let mut during: Vec<f64> = acked
        .iter()
        .filter(|a| a.sent < to && a.sent + a.latency > from)
        .map(|a| millis(a.latency))
        .collect();
    during.sort_by(f64::total_cmp);
    let mut all: Vec<f64> = acked.iter().map(|a| millis(a.latency)).collect();
    all.sort_by(f64::total_cmp);

    // Every seeded and acknowledged event exactly once in the target, where it was acked.
    let mut counts: HashMap<Uuid, (usize, &StoredEvent)> = HashMap::new();
    for e in target_events {
        counts.entry(e.event_id).or_insert((0, e)).0 += 1;
    }
    let mut lost = seeded.iter().filter(|id| !counts.contains_key(id)).count();
    for a in &acked {
        for (i, id) in a.event_ids.iter().enumerate() {
            let version = a.first_version + i64::try_from(i).unwrap_or(i64::MAX);
            let landed = counts.get(id).is_some_and(|(_, e)| {
                e.aggregate_id == a.aggregate_id && i64::from(e.version) == version
            });
            if !landed {
                lost += 1;
            }
        }
    }
    let mut duplicated = counts.values().filter(|(n, _)| *n > 1).count();
    // A retry that had been written under another id would show as a second (writer, seq).
    let mut logical = HashSet::new();
    for e in target_events.iter().filter(|e| e.event_type == "Deposited") {
        let p: serde_json::Value = serde_json::from_str(e.payload.get()).unwrap_or_default();
        if !logical.insert((p["writer"].as_u64(), p["seq"].as_u64())) {
            duplicated += 1;
        }
    }
    let expected = seeded.len() + acked.len();
    let cutover_ok = migrated.outcome.success;
    #[allow(clippy::cast_precision_loss)]
    let rate = if migrated.copy_seconds > 0.0 {
        (migrated.bulk_copied as f64 / migrated.copy_seconds).round()
    } else {
        0.0
    };
    Summary {
        ok: cutover_ok && verification.consistent && lost == 0 && duplicated == 0,
        backend,
        data: label.to_owned(),
        kept: options.keep,
        tenant_id: tenant,
        migration_id: migrated.id,
        source_store: source_id.to_owned(),
        target_store: target_id.to_owned(),
        seeded_events: options.events,
        writers: options.writers,
        events_copied: migrated.events_copied,
        bulk_copied: migrated.bulk_copied,
        copy_seconds: (migrated.copy_seconds * 1000.0).round() / 1000.0,
        copy_rate_events_per_second: rate,
        lag_at_cutover: migrated.outcome.lag_before,
        cutover_attempts: migrated.attempts,
        cutover: migrated.outcome,
        writer_pause_longest_ms: during.last().copied().unwrap_or(0.0),
        writer_pause_p99_ms: percentile(&during, 99.0),
        appends_during_cutover: during.len(),
        append_latency_p99_ms: percentile(&all, 99.0),
        appends_acknowledged: acked.len(),
        appends_retried: retried,
        appends_on_target: acked.iter().filter(|a| a.store_id == target_id).count(),
        verification,
        expected_events: expected,
        target_events: target_events.len(),
        lost,
        duplicated,
        total_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    }
}

/// The summary as text.
pub fn text(s: &Summary) -> String {
    let v = &s.verification;
    let c = &s.cutover;
    format!(
        "Switchyard demo on {backend} ({data}{kept})\n\
         tenant {tenant}: {seeded} events seeded in store {source}; {writers} writers appending through the in-process proxy\n\
         copy: {copied} events copied to {target} (bulk copy {bulk} events in {secs:.2} s, {rate:.0} events/s; then the tail)\n\
         cutover: {result} after {attempts} attempt(s); lag at cutover {lag}; write pause {pause} ms (whole cutover {dur} ms); final delta {delta} events; writers held by the fence {held}\n\
         writers: {appends} appends acknowledged ({on_target} on {target} after the cutover, {retried} retried); during the cutover {during} appends, longest {longest} ms, p99 {p99} ms; p99 of all appends {p99all} ms\n\
         verification: {consistent} ({streams_ok}/{streams} streams, {source_events} source events){violations}\n\
         acknowledged events in the target: {expected} expected, {target_events} present; lost {lost}, duplicated {dup}\n\
         result: {ok} in {total:.1} s",
        backend = s.backend,
        data = s.data,
        kept = if s.kept { ", kept" } else { ", removed" },
        tenant = s.tenant_id,
        seeded = s.seeded_events,
        source = s.source_store,
        writers = s.writers,
        copied = s.events_copied,
        target = s.target_store,
        bulk = s.bulk_copied,
        secs = s.copy_seconds,
        rate = s.copy_rate_events_per_second,
        result = if c.success { "done" } else { "ROLLED BACK" },
        attempts = s.cutover_attempts,
        lag = s.lag_at_cutover,
        pause = c.pause_ms,
        dur = c.duration_ms,
        delta = c.delta_events,
        held = c.blocked_writers,
        appends = s.appends_acknowledged,
        on_target = s.appends_on_target,
        retried = s.appends_retried,
        during = s.appends_during_cutover,
        longest = s.writer_pause_longest_ms,
        p99 = s.writer_pause_p99_ms,
        p99all = s.append_latency_p99_ms,
        consistent = if v.consistent { "consistent" } else { "INCONSISTENT" },
        streams_ok = v.streams_consistent,
        streams = v.streams,
        source_events = v.source_events,
        violations = if v.violations.is_empty() {
            String::new()
        } else {
            format!("\n  {}", v.violations.join("\n  "))
        },
        expected = s.expected_events,
        target_events = s.target_events,
        lost = s.lost,
        dup = s.duplicated,
        ok = if s.ok { "OK" } else { "FAILED" },
        total = s.total_seconds,
    )
}
