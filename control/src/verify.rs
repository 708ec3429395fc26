//! Consistency verification: does the target hold exactly the source's events of a tenant?
//!
//! Levels (DESIGN.md "Verification"):
//! - `count`: per stream, event count and last version;
//! - `hash`: per stream, a digest over `(event_id, version, event_type, payload, actor_id,
//!   timestamp)` computed inside each database (PostgreSQL on both sides; otherwise rows are
//!   hashed here over canonical JSON), then bisection over version ranges down to the first
//!   differing event;
//! - `full`: event by event.
//!
//! **What is compared while writes continue.** The source side is the tenant's rows below a
//! stable horizon ([`Scope::Window`], the tail's: every such row is final and must already be in
//! the target). For each stream that gives a last version `V`; since a stream's versions commit
//! in order, versions `1..=V` are all final, and the target's versions `1..=V` must equal them.
//! Target rows past `V` are newer writes (mirrored ahead of the tail); each of them must exist
//! in the source, or it is reported `extra`.
//!
//! Sampling keeps a stream when a stable hash of `type/id` falls under the percentage, so the
//! same streams are picked every run, on every backend.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::Serialize;
use switchyard_store::events::{json_equal, Digesting, StreamDigest, StreamKey};
use switchyard_store::{EventStore, PassWindow, StoreError, StoredEvent};
use uuid::Uuid;

/// Violations classified (bisected) in one run; the rest are counted.
const MAX_CLASSIFIED: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Count,
    Hash,
    Full,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Hash => "hash",
            Self::Full => "full",
        }
    }
}

/// Which source rows are compared.
#[derive(Debug, Clone)]
pub enum Scope {
    /// The source's rows in this pass window (the tail's horizon); target rows past it must
    /// exist in the source.
    Window(PassWindow),
    /// Every source row (the source is fenced: nothing more will land there); target rows past
    /// them are writes made after the cutover.
    Final,
    /// These streams' versions `lo..=hi`, on both sides (the cutover's checks of the streams
    /// its final delta touches: the versions below the delta before the gates close, the rest
    /// under the fence).
    Ranges(Vec<(StreamKey, i32, i32)>),
    /// Version ranges already counted on both sides, source then target (count and last
    /// version per stream; [`Level::Count`] only): the cutover's final delta, whose target
    /// counts come back with its copy in one round trip per store.
    Counted(
        HashMap<StreamKey, StreamDigest>,
        HashMap<StreamKey, StreamDigest>,
    ),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// The source has the version; the target does not.
    Missing,
    /// The target has an event the source does not.
    Extra,
    /// Both have the version with different contents (or a different event).
    Different,
    /// The target has the source's event at another version, or a stream's versions in an
    /// order its positions contradict.
    OutOfOrder,
}

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    /// `aggregate_type/aggregate_id`.
    pub stream: String,
    pub aggregate_type: String,
    pub aggregate_id: Uuid,
    pub kind: ViolationKind,
    /// The first version at which the two sides differ.
    pub first_version: Option<i32>,
    pub source_count: i64,
    pub target_count: i64,
    pub source_version: i32,
    pub target_version: i32,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub consistent: bool,
    pub level: Level,
    /// `in_database` or `canonical` (hash level), else null.
    pub digests: Option<&'static str>,
    pub sample_percent: Option<f64>,
    pub source_event_count: i64,
    /// Target events at the versions compared.
    pub target_event_count: i64,
    /// Target events past the compared versions (newer writes).
    pub target_events_past_horizon: i64,
    pub streams_verified: usize,
    pub streams_consistent: usize,
    pub violations: Vec<Violation>,
    /// Inconsistent streams beyond those classified in `violations`.
    pub violations_not_classified: usize,
    pub duration_ms: u64,
    pub events_per_second: f64,
}

impl Report {
    /// Streams that differ, for messages: `type/id (kind at version v)`, at most `n`.
    pub fn summary(&self, n: usize) -> String {
        let mut parts: Vec<String> = self
            .violations
            .iter()
            .take(n)
            .map(|v| {
                format!(
                    "{} ({:?} at version {})",
                    v.stream,
                    v.kind,
                    v.first_version
                        .map_or_else(|| "?".to_owned(), |x| x.to_string())
                )
            })
            .collect();
        let more = self.violations.len().saturating_sub(n) + self.violations_not_classified;
        if more > 0 {
            parts.push(format!("and {more} more"));
        }
        parts.join("; ")
    }
}

/// Whether `stream` is in a `pct`% sample: FNV-1a over `type/id`, stable everywhere.
pub fn sampled(stream: &StreamKey, pct: f64) -> bool {
    if pct >= 100.0 {
        return true;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let text = format!("{}/{}", stream.0, stream.1);
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Basis points: 0.01% resolution.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let limit = (pct * 100.0).round().max(0.0) as u64;
    h % 10_000 < limit
}

/// Compares the tenant's events in `source` and `target` (see the module docs).
pub async fn verify(
    source: &EventStore,
    target: &EventStore,
    tenant: Uuid,
    scope: &Scope,
    level: Level,
    sample_percent: Option<f64>,
) -> Result<Report, StoreError> {
    let started = Instant::now();
    let mode = match level {
        Level::Count | Level::Full => Digesting::Count,
        Level::Hash
            if source.backend_name() == "postgres" && target.backend_name() == "postgres" =>
        {
            Digesting::InDatabase
        }
        Level::Hash => Digesting::Canonical,
    };

    // The source side: per stream, the last final version and the digest of 1..=it. For a
    // whole-tenant scope the target's per-stream summaries over all its rows are computed at
    // the same time (both databases work at once); the few streams where the target is ahead
    // of the source's horizon (newer writes) are summarised again up to the bound below.
    let everything = PassWindow::first(i64::MAX);
    let (mut src, target_side) = match scope {
        Scope::Window(window) => {
            let (s, t) = tokio::try_join!(
                source.window_digests(tenant, *window, mode),
                target.window_digests(tenant, everything, mode)
            )?;
            (s, TargetSide::All(t))
        }
        Scope::Final => {
            let (s, t) = tokio::try_join!(
                source.window_digests(tenant, everything, mode),
                target.window_digests(tenant, everything, mode)
            )?;
            (s, TargetSide::All(t))
        }
        Scope::Ranges(ranges) => {
            // Both sides at once over the same version ranges: no bound depends on the source.
            let (mut s, t) = tokio::try_join!(
                source.range_digests(tenant, ranges, mode),
                target.range_digests(tenant, ranges, mode)
            )?;
            s.retain(|_, v| v.count > 0);
            (s, TargetSide::Compared(t))
        }
        Scope::Counted(s, t) => {
            let mut s = s.clone();
            s.retain(|_, v| v.count > 0);
            (s, TargetSide::Compared(t.clone()))
        }
    };
    // A stream whose window rows are not versions 1..=V (a version below V committed past the
    // horizon): take exactly 1..=V.
    let ragged: Vec<(StreamKey, i32)> = src
        .iter()
        .filter(|(_, d)| d.count != i64::from(d.last_version))
        .map(|(k, d)| (k.clone(), d.last_version))
        .collect();
    if !ragged.is_empty() && !matches!(scope, Scope::Ranges(_) | Scope::Counted(..)) {
        src.extend(source.bounded_digests(tenant, &ragged, false, mode).await?);
    }
    if let Some(pct) = sample_percent {
        src.retain(|k, _| sampled(k, pct));
    }
    let bounds: Vec<(StreamKey, i32)> = src
        .iter()
        .map(|(k, d)| (k.clone(), d.last_version))
        .collect();
    // Extra streams and events are looked for over the whole tenant while the source is
    // still authoritative and no sample narrows the check.
    let check_extras = matches!(scope, Scope::Window(_)) && sample_percent.is_none();
    let tgt = match target_side {
        TargetSide::Compared(t) => t,
        TargetSide::All(all) => narrow(target, tenant, &src, all, check_extras, mode).await?,
    };

    let mut report = Report {
        consistent: true,
        level,
        digests: match mode {
            Digesting::InDatabase => Some("in_database"),
            Digesting::Canonical => Some("canonical"),
            Digesting::Count => None,
        },
        sample_percent,
        source_event_count: src.values().map(|d| d.count).sum(),
        target_event_count: bounds
            .iter()
            .filter_map(|(k, _)| tgt.get(k))
            .map(|d| d.count)
            .sum(),
        target_events_past_horizon: tgt.values().map(|d| d.beyond).sum(),
        streams_verified: src.len(),
        streams_consistent: 0,
        violations: Vec::new(),
        violations_not_classified: 0,
        duration_ms: 0,
        events_per_second: 0.0,
    };

    let ordered: BTreeMap<&StreamKey, &StreamDigest> = src.iter().collect();
    let checker = Checker {
        source,
        target,
        tenant,
        mode,
    };
    for (key, s) in ordered {
        let t = tgt.get(key).copied().unwrap_or_default();
        let found = if level == Level::Full {
            checker.compare_events(key, s, &t).await?
        } else if s.count == t.count && s.last_version == t.last_version && s.digest == t.digest {
            None
        } else if report.violations.len() >= MAX_CLASSIFIED {
            report.violations_not_classified += 1;
            report.consistent = false;
            continue;
        } else {
            Some(checker.classify(key, s, &t).await?)
        };
        match found {
            None => report.streams_consistent += 1,
            Some(v) => {
                report.consistent = false;
                report.violations.push(v);
            }
        }
    }

    if check_extras {
        for (key, t) in tgt.iter().filter(|(_, t)| t.beyond > 0) {
            if report.violations.len() >= MAX_CLASSIFIED {
                report.violations_not_classified += 1;
                report.consistent = false;
                continue;
            }
            let bound = src.get(key).map_or(0, |d| d.last_version);
            if let Some(v) = checker.extras(key, bound, src.get(key), t).await? {
                if src.contains_key(key)
                    && !report
                        .violations
                        .iter()
                        .any(|x| x.aggregate_id == key.1 && x.aggregate_type == key.0)
                {
                    // Counted consistent over its compared versions above.
                    report.streams_consistent -= 1;
                }
                report.consistent = false;
                report.violations.push(v);
            }
        }
    }

    let elapsed = started.elapsed();
    report.duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    #[allow(clippy::cast_precision_loss)]
    {
        report.events_per_second =
            report.source_event_count as f64 / elapsed.as_secs_f64().max(1e-9);
    }
    Ok(report)
}

/// What the target side of a comparison starts from.
enum TargetSide {
    /// Summaries over all the tenant's rows, narrowed to the source's bounds.
    All(HashMap<StreamKey, StreamDigest>),
    /// Summaries over exactly the rows compared.
    Compared(HashMap<StreamKey, StreamDigest>),
}

/// The target's summaries up to each source stream's bound, from its summaries over all its
/// rows: a stream whose last version is within the bound is taken as it is; one that is ahead
/// is summarised again up to the bound, the rest counted as `beyond`. Streams the source does
/// not have are kept (all `beyond`) when `keep_unknown`.
async fn narrow(
    target: &EventStore,
    tenant: Uuid,
    src: &HashMap<StreamKey, StreamDigest>,
    mut all: HashMap<StreamKey, StreamDigest>,
    keep_unknown: bool,
    mode: Digesting,
) -> Result<HashMap<StreamKey, StreamDigest>, StoreError> {
    let ahead: Vec<(StreamKey, i32)> = src
        .iter()
        .filter(|(k, s)| all.get(*k).is_some_and(|t| t.last_version > s.last_version))
        .map(|(k, s)| (k.clone(), s.last_version))
        .collect();
    let bounded = if ahead.is_empty() {
        HashMap::new()
    } else {
        target.bounded_digests(tenant, &ahead, false, mode).await?
    };
    let mut out = HashMap::with_capacity(src.len());
    for (key, t) in all.drain() {
        if let Some(b) = bounded.get(&key) {
            out.insert(
                key,
                StreamDigest {
                    beyond: t.count - b.count,
                    ..*b
                },
            );
        } else if src.contains_key(&key) {
            out.insert(key, t);
        } else if keep_unknown {
            out.insert(
                key,
                StreamDigest {
                    count: 0,
                    last_version: 0,
                    digest: 0,
                    beyond: t.count,
                },
            );
        }
    }
    Ok(out)
}

struct Checker<'a> {
    source: &'a EventStore,
    target: &'a EventStore,
    tenant: Uuid,
    mode: Digesting,
}

impl Checker<'_> {
    fn violation(
        key: &StreamKey,
        kind: ViolationKind,
        first_version: Option<i32>,
        s: &StreamDigest,
        t: &StreamDigest,
        detail: String,
    ) -> Violation {
        Violation {
            stream: format!("{}/{}", key.0, key.1),
            aggregate_type: key.0.clone(),
            aggregate_id: key.1,
            kind,
            first_version,
            source_count: s.count,
            target_count: t.count,
            source_version: s.last_version,
            target_version: t.last_version,
            detail,
        }
    }

    /// Names the first differing version of a stream whose summaries differ, and what differs.
    async fn classify(
        &self,
        key: &StreamKey,
        s: &StreamDigest,
        t: &StreamDigest,
    ) -> Result<Violation, StoreError> {
        let bound = s.last_version;
        if self.mode == Digesting::InDatabase {
            // Bisection: the smallest v whose prefix 1..=v differs.
            let (mut lo, mut hi) = (1, bound.max(1));
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let (a, b) = tokio::try_join!(
                    self.source.range_digest(self.tenant, key, 1, mid),
                    self.target.range_digest(self.tenant, key, 1, mid)
                )?;
                if a == b {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            let (a, b) = tokio::try_join!(
                self.source.stream_slice(self.tenant, key, lo, lo),
                self.target.stream_slice(self.tenant, key, lo, lo)
            )?;
            return self.at_version(key, lo, a.first(), b.first(), s, t).await;
        }
        let (a, b) = tokio::try_join!(
            self.source.stream_slice(self.tenant, key, 1, bound),
            self.target.stream_slice(self.tenant, key, 1, bound)
        )?;
        match first_difference(&a, &b) {
            Some((v, x, y)) => self.at_version(key, v, x, y, s, t).await,
            // Same events (the digests differed by representation only, e.g. a JSON number
            // written differently): report it rather than hide it.
            None => Ok(Self::violation(
                key,
                ViolationKind::Different,
                None,
                s,
                t,
                "summaries differ but no event differs when compared one by one".to_owned(),
            )),
        }
    }

    /// What differs at version `v`, given each side's event there.
    async fn at_version(
        &self,
        key: &StreamKey,
        v: i32,
        a: Option<&StoredEvent>,
        b: Option<&StoredEvent>,
        s: &StreamDigest,
        t: &StreamDigest,
    ) -> Result<Violation, StoreError> {
        let (kind, detail) = match (a, b) {
            (Some(a), None) => (
                ViolationKind::Missing,
                format!("event {} (version {v}) is not in the target", a.event_id),
            ),
            (None, Some(b)) => (
                ViolationKind::Extra,
                format!("event {} (version {v}) is not in the source", b.event_id),
            ),
            (None, None) => (
                ViolationKind::Missing,
                format!("version {v} is in neither store's range"),
            ),
            (Some(a), Some(b)) if a.event_id == b.event_id => (
                ViolationKind::Different,
                format!(
                    "event {} differs in {}",
                    a.event_id,
                    differing_fields(a, b).join(", ")
                ),
            ),
            (Some(a), Some(b)) => {
                let elsewhere = self.target.positions_of(&[a.event_id]).await?;
                if elsewhere.is_empty() {
                    (
                        ViolationKind::Different,
                        format!(
                            "version {v} is event {} in the source but {} in the target",
                            a.event_id, b.event_id
                        ),
                    )
                } else {
                    (
                        ViolationKind::OutOfOrder,
                        format!(
                            "event {} is version {v} in the source but another version in the target \
                             (the target has {} at version {v})",
                            a.event_id, b.event_id
                        ),
                    )
                }
            }
        };
        Ok(Self::violation(key, kind, Some(v), s, t, detail))
    }

    /// Full level: event by event over versions `1..=V`, plus the target's position order.
    async fn compare_events(
        &self,
        key: &StreamKey,
        s: &StreamDigest,
        t: &StreamDigest,
    ) -> Result<Option<Violation>, StoreError> {
        let bound = s.last_version;
        let (a, b) = tokio::try_join!(
            self.source.stream_slice(self.tenant, key, 1, bound),
            self.target.stream_slice(self.tenant, key, 1, bound)
        )?;
        if let Some((v, x, y)) = first_difference(&a, &b) {
            return self.at_version(key, v, x, y, s, t).await.map(Some);
        }
        if let Some(w) = b
            .windows(2)
            .find(|w| w[1].global_position < w[0].global_position)
        {
            return Ok(Some(Self::violation(
                key,
                ViolationKind::OutOfOrder,
                Some(w[1].version),
                s,
                t,
                format!(
                    "in the target, version {} (position {}) precedes version {} (position {})",
                    w[1].version, w[1].global_position, w[0].version, w[0].global_position
                ),
            )));
        }
        Ok(None)
    }

    /// Target rows past the stream's compared versions must exist in the source.
    async fn extras(
        &self,
        key: &StreamKey,
        bound: i32,
        s: Option<&StreamDigest>,
        t: &StreamDigest,
    ) -> Result<Option<Violation>, StoreError> {
        let rows = self
            .target
            .stream_slice(self.tenant, key, bound.saturating_add(1), i32::MAX)
            .await?;
        let ids: Vec<Uuid> = rows.iter().map(|e| e.event_id).collect();
        let known = self.source.positions_of(&ids).await?;
        let Some(first) = rows.iter().find(|e| !known.contains_key(&e.event_id)) else {
            return Ok(None);
        };
        let s = s.copied().unwrap_or_default();
        Ok(Some(Self::violation(
            key,
            ViolationKind::Extra,
            Some(first.version),
            &s,
            t,
            format!(
                "event {} (version {}) is in the target but not in the source",
                first.event_id, first.version
            ),
        )))
    }
}

/// The first version at which two version-ordered slices differ, with each side's event there.
fn first_difference<'a>(
    a: &'a [StoredEvent],
    b: &'a [StoredEvent],
) -> Option<(i32, Option<&'a StoredEvent>, Option<&'a StoredEvent>)> {
    let by_version = |rows: &'a [StoredEvent]| -> HashMap<i32, &'a StoredEvent> {
        rows.iter().map(|e| (e.version, e)).collect()
    };
    let (x, y) = (by_version(a), by_version(b));
    let mut versions: Vec<i32> = x.keys().chain(y.keys()).copied().collect();
    versions.sort_unstable();
    versions.dedup();
    versions.into_iter().find_map(|v| {
        let (p, q) = (x.get(&v).copied(), y.get(&v).copied());
        let same = match (p, q) {
            (Some(p), Some(q)) => differing_fields(p, q).is_empty(),
            _ => false,
        };
        (!same).then_some((v, p, q))
    })
}

/// The compared fields in which two events differ.
pub fn differing_fields(a: &StoredEvent, b: &StoredEvent) -> Vec<&'static str> {
    let mut out = Vec::new();
    if a.event_id != b.event_id {
        out.push("event_id");
    }
    if a.version != b.version {
        out.push("version");
    }
    if a.event_type != b.event_type {
        out.push("event_type");
    }
    if !json_equal(a.payload.get(), b.payload.get()) {
        out.push("payload");
    }
    if a.actor_id != b.actor_id {
        out.push("actor_id");
    }
    if a.timestamp.timestamp_micros() != b.timestamp.timestamp_micros() {
        out.push("timestamp");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_deterministic_and_proportional() {
        let keys: Vec<StreamKey> = (0..20_000u128)
            .map(|i| ("Order".to_owned(), Uuid::from_u128(i * 7919 + 13)))
            .collect();
        let picked: Vec<bool> = keys.iter().map(|k| sampled(k, 10.0)).collect();
        let again: Vec<bool> = keys.iter().map(|k| sampled(k, 10.0)).collect();
        assert_eq!(picked, again);
        let n = picked.iter().filter(|p| **p).count();
        assert!((1_600..=2_400).contains(&n), "10% of 20000 picked {n}");
        assert!(keys.iter().all(|k| sampled(k, 100.0)));
        assert!(!keys.iter().any(|k| sampled(k, 0.0)));
        // A smaller sample is a subset of a larger one.
        assert!(keys.iter().all(|k| !sampled(k, 5.0) || sampled(k, 10.0)));
    }
}
