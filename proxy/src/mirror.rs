//! The dual-write mirror: after an append committed to the source (and its reply is settled),
//! the same events are queued for the migration target and written there by one worker per
//! target store, in batches, under the target-order rule.
//!
//! The mirror never slows or fails a client's append: queueing is a non-blocking `try_send`
//! into a queue bounded in appends and in bytes (`proxy.mirror_queue_bytes`, held from queueing
//! until the worker is done with the append, so a stalled target never holds more); a full
//! queue or an unreachable target is counted (metrics and per-tenant stats on the admin port)
//! and left to the migration's tail, which copies everything the mirror missed.
//!
//! **Healing.** An event that cannot land yet (its stream's previous version is not in the
//! target: written before the proxy learned of the migration, or missed above) would make every
//! later event of its stream wait for the tail too, so under steady writes the tail would carry
//! the whole load and a busy machine would never see the lag reach 0. The worker heals such a
//! stream once: it reads the missing versions from the tenant's source and lands them with the
//! waiting events, by identity under the same target-order rule. Bounded per batch; what is
//! left stays with the tail.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::IntGauge;
use serde::Serialize;
use switchyard_store::{Appended, EventStore, NewEvent, StoredEvent, StreamRange, StreamRef};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::metrics::ProxyMetrics;
use crate::routing::StoreIdx;

/// Appends one target's queue holds before new ones are dropped (and left to the tail).
const QUEUE_CAPACITY: usize = 4096;
/// Most events one target insert carries.
const MAX_BATCH_EVENTS: usize = 2000;
/// Bytes past which a batch is written without taking more appends: the insert's encoded
/// arguments (and the sorted copy `copy_in` may make) grow with the batch, beside the budget.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// How long one target insert may take before it counts as failed.
const INSERT_TIMEOUT: Duration = Duration::from_secs(2);
/// Streams listed per tenant in the failure stats.
const MAX_STREAMS_LISTED: usize = 64;
/// Streams one batch heals from the source; the others' waiting events stay with the tail.
const MAX_HEALED_STREAMS: usize = 64;
/// Source events one stream's heal copies at most (a longer gap is the tail's).
const MAX_HEAL_EVENTS: u32 = 1000;

/// Why a committed append was not queued for its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The queue holds `QUEUE_CAPACITY` appends.
    QueueFull,
    /// The append would take the queue past `proxy.mirror_queue_bytes`.
    QueueBytes,
    /// The target's worker is gone (it only ends when the mirror is dropped, or on a panic).
    Closed,
}

impl DropReason {
    pub const ALL: [Self; 3] = [Self::QueueFull, Self::QueueBytes, Self::Closed];

    /// The `reason` label of `switchyard_proxy_mirror_dropped_events_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::QueueBytes => "queue_bytes",
            Self::Closed => "closed",
        }
    }

    /// What the tenant's mirror stats show as its last error.
    fn message(self) -> &'static str {
        match self {
            Self::QueueFull => "mirror queue full",
            Self::QueueBytes => "mirror queue over proxy.mirror_queue_bytes",
            Self::Closed => "mirror worker stopped",
        }
    }
}

/// The byte budget of one target's queue: what is queued plus what its worker is writing.
#[derive(Debug)]
struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// `switchyard_proxy_mirror_queue_bytes{store}`.
    gauge: IntGauge,
}

impl Budget {
    /// Takes `bytes` from the budget if they fit; they return when the [`Held`] drops.
    fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Held> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .ok()?;
        self.gauge.add(gauge_value(bytes));
        Some(Held {
            budget: Arc::clone(self),
            bytes,
        })
    }

    fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

fn gauge_value(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// Bytes of one queued append, returned to its target's budget when dropped: after the worker
/// wrote it (or failed to), and also when a worker is aborted with it.
#[derive(Debug)]
struct Held {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.gauge.sub(gauge_value(self.bytes));
    }
}

/// A job in a target's queue, with the bytes it holds.
#[derive(Debug)]
struct Queued {
    job: MirrorJob,
    held: Held,
}

/// Events of one committed append, for one target.
#[derive(Debug)]
pub struct MirrorJob {
    pub tenant: Uuid,
    /// The store the append committed on: where a stream's missing versions are read when the
    /// target cannot take its events yet.
    pub source: StoreIdx,
    pub events: Vec<StoredEvent>,
}

impl MirrorJob {
    /// The committed append as the source stored it: each request event with the stored row
    /// of the same event id (position, version and the timestamps the store filled in). An
    /// event the store did not report is left out (the tail copies it): rows are paired by
    /// identity, never by index.
    pub fn from_append(
        source: StoreIdx,
        stream: StreamRef<'_>,
        events: Vec<NewEvent>,
        appended: &Appended,
    ) -> Self {
        let rows: HashMap<Uuid, usize> = appended
            .event_ids
            .iter()
            .enumerate()
            .map(|(row, id)| (*id, row))
            .collect();
        let events = events
            .into_iter()
            .filter_map(|e| {
                let row = *rows.get(&e.event_id)?;
                Some(StoredEvent {
                    global_position: *appended.global_positions.get(row)?,
                    event_id: e.event_id,
                    aggregate_type: stream.aggregate_type.to_owned(),
                    aggregate_id: stream.aggregate_id,
                    tenant_id: Some(stream.tenant_id),
                    event_type: e.event_type,
                    version: *appended.versions.get(row)?,
                    actor_id: e.actor_id,
                    timestamp: *appended.timestamps.get(row)?,
                    created_at: *appended.created_at.get(row)?,
                    payload: e.payload,
                })
            })
            .collect();
        Self {
            tenant: stream.tenant_id,
            source,
            events,
        }
    }

    /// What the job's events hold in memory: payloads, the other variable-length fields and
    /// each event's fixed part.
    pub fn bytes(&self) -> usize {
        self.events
            .iter()
            .map(|e| {
                std::mem::size_of::<StoredEvent>()
                    + e.payload.get().len()
                    + e.aggregate_type.len()
                    + e.event_type.len()
                    + e.actor_id.as_ref().map_or(0, String::len)
            })
            .sum()
    }
}

/// What the admin port shows about one tenant's mirroring on this proxy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TenantMirrorStats {
    /// Events written to the target.
    pub events_mirrored: u64,
    /// Events that could not land yet (their predecessor is not in the target) and that the
    /// heal did not land either; the tail copies them.
    pub events_deferred: u64,
    /// Events that landed once the mirror copied their stream's missing versions from the
    /// source (those versions are not counted).
    pub events_healed: u64,
    /// Events whose target write failed (error or timeout).
    pub total_failures: u64,
    /// Events dropped because the target's queue was full.
    pub events_dropped: u64,
    pub first_failure_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// Streams (`type/id`) with a failed, dropped or deferred event (at most 64 listed).
    pub streams_affected: BTreeSet<String>,
}

impl TenantMirrorStats {
    fn note_failure(&mut self, events: &[StoredEvent], error: Option<&str>) {
        let now = Utc::now();
        self.first_failure_at.get_or_insert(now);
        self.last_failure_at = Some(now);
        if let Some(error) = error {
            self.last_error = Some(error.to_owned());
        }
        for e in events {
            if self.streams_affected.len() >= MAX_STREAMS_LISTED {
                break;
            }
            self.streams_affected
                .insert(format!("{}/{}", e.aggregate_type, e.aggregate_id));
        }
    }
}

/// The mirror of one proxy: a queue, a byte budget and a worker per store that is a migration
/// target.
#[derive(Debug)]
pub struct Mirror {
    queues: Vec<mpsc::Sender<Queued>>,
    budgets: Vec<Arc<Budget>>,
    receivers: Mutex<Vec<Option<mpsc::Receiver<Queued>>>>,
    stats: Arc<Mutex<HashMap<Uuid, TenantMirrorStats>>>,
    metrics: ProxyMetrics,
}

impl Mirror {
    /// One queue per store of `store_ids` (in store index order), each holding at most
    /// `queue_bytes` bytes of appends.
    pub fn new(store_ids: &[&str], queue_bytes: usize, metrics: ProxyMetrics) -> Self {
        let (queues, receivers) = store_ids
            .iter()
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                (tx, Some(rx))
            })
            .unzip();
        let budgets = store_ids
            .iter()
            .map(|id| {
                Arc::new(Budget {
                    limit: queue_bytes,
                    used: AtomicUsize::new(0),
                    gauge: metrics.mirror_queue_bytes.with_label_values(&[id]),
                })
            })
            .collect();
        Self {
            queues,
            budgets,
            receivers: Mutex::new(receivers),
            stats: Arc::default(),
            metrics,
        }
    }

    /// Queues a committed append for `target` without waiting. A job that finds the queue full
    /// or its byte budget spent is dropped (counted; the tail copies it).
    pub fn enqueue(&self, target: StoreIdx, job: MirrorJob) {
        let (Some(queue), Some(budget)) = (
            self.queues.get(usize::from(target)),
            self.budgets.get(usize::from(target)),
        ) else {
            return;
        };
        let Some(held) = budget.reserve(job.bytes()) else {
            return self.drop_job(&job, DropReason::QueueBytes);
        };
        if let Err(e) = queue.try_send(Queued { job, held }) {
            let (queued, reason) = match e {
                mpsc::error::TrySendError::Full(queued) => (queued, DropReason::QueueFull),
                mpsc::error::TrySendError::Closed(queued) => (queued, DropReason::Closed),
            };
            self.drop_job(&queued.job, reason);
        }
    }

    fn drop_job(&self, job: &MirrorJob, reason: DropReason) {
        let n = job.events.len() as u64;
        self.metrics
            .mirror_writes
            .with_label_values(&["dropped"])
            .inc_by(n);
        self.metrics
            .mirror_dropped
            .with_label_values(&[reason.label()])
            .inc_by(n);
        let mut stats = self
            .stats
            .lock()
            .expect("mirror stats lock is never poisoned");
        let entry = stats.entry(job.tenant).or_default();
        entry.events_dropped += n;
        entry.note_failure(&job.events, Some(reason.message()));
    }

    /// This proxy's mirror stats for a tenant, if it ever mirrored for it.
    pub fn stats(&self, tenant: &Uuid) -> Option<TenantMirrorStats> {
        self.stats
            .lock()
            .expect("mirror stats lock is never poisoned")
            .get(tenant)
            .cloned()
    }

    /// Bytes queued for `target` or being written there now.
    pub fn queued_bytes(&self, target: StoreIdx) -> usize {
        self.budgets
            .get(usize::from(target))
            .map_or(0, |budget| budget.used())
    }

    /// Starts one worker per store (`stores` in store index order: a worker heals from any of
    /// them); they run until their queue closes (shutdown).
    pub fn start(&self, stores: &[EventStore]) -> Vec<tokio::task::JoinHandle<()>> {
        let all: Arc<[EventStore]> = stores.into();
        let mut receivers = self
            .receivers
            .lock()
            .expect("mirror receivers lock is never poisoned");
        stores
            .iter()
            .zip(receivers.iter_mut())
            .filter_map(|(store, rx)| rx.take().map(|rx| (store.clone(), rx)))
            .map(|(store, rx)| {
                tokio::spawn(worker(
                    store,
                    Arc::clone(&all),
                    rx,
                    Arc::clone(&self.stats),
                    self.metrics.clone(),
                ))
            })
            .collect()
    }

    /// Waits up to `timeout` for every queue to empty and every worker to finish its batch
    /// (shutdown hands back what is left to the tail). Returns whether they did.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.queues.iter().all(|q| q.capacity() == q.max_capacity())
                && self.budgets.iter().all(|b| b.used() == 0)
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn worker(
    store: EventStore,
    stores: Arc<[EventStore]>,
    mut rx: mpsc::Receiver<Queued>,
    stats: Arc<Mutex<HashMap<Uuid, TenantMirrorStats>>>,
    metrics: ProxyMetrics,
) {
    let mut jobs = Vec::new();
    let target = Target {
        store: &store,
        sources: &stores,
        stats: &stats,
        metrics: &metrics,
    };
    while rx.recv_many(&mut jobs, 256).await > 0 {
        // One insert per batch of jobs: fewer round trips when appends come fast.
        let mut batch: Vec<StoredEvent> = Vec::new();
        let mut owners: Vec<(Uuid, StoreIdx)> = Vec::new();
        // The batch's bytes stay held until its write ended, whatever the outcome.
        let mut held: Vec<Held> = Vec::new();
        let mut batch_bytes = 0;
        for queued in jobs.drain(..) {
            owners.extend(std::iter::repeat_n(
                (queued.job.tenant, queued.job.source),
                queued.job.events.len(),
            ));
            batch.extend(queued.job.events);
            batch_bytes += queued.held.bytes;
            held.push(queued.held);
            if batch.len() >= MAX_BATCH_EVENTS || batch_bytes >= MAX_BATCH_BYTES {
                target.write(&mut batch, &mut owners).await;
                held.clear();
                batch_bytes = 0;
            }
        }
        target.write(&mut batch, &mut owners).await;
        held.clear();
    }
}

/// What one target's worker writes with.
struct Target<'a> {
    store: &'a EventStore,
    /// Every store, in store index order: the sources a heal reads.
    sources: &'a [EventStore],
    stats: &'a Mutex<HashMap<Uuid, TenantMirrorStats>>,
    metrics: &'a ProxyMetrics,
}

impl Target<'_> {
    async fn write(&self, batch: &mut Vec<StoredEvent>, owners: &mut Vec<(Uuid, StoreIdx)>) {
        if batch.is_empty() {
            return;
        }
        let result = tokio::time::timeout(INSERT_TIMEOUT, self.store.insert_copied(batch)).await;
        match result {
            Ok(Ok(landed)) => {
                let mut waiting = Vec::new();
                {
                    let mut stats = self
                        .stats
                        .lock()
                        .expect("mirror stats lock is never poisoned");
                    for ((event, (tenant, source)), position) in
                        batch.iter().zip(owners.iter()).zip(landed)
                    {
                        if position.is_some() {
                            stats.entry(*tenant).or_default().events_mirrored += 1;
                            self.metrics.mirror_writes.with_label_values(&["ok"]).inc();
                        } else {
                            waiting.push((event, *tenant, *source));
                        }
                    }
                }
                self.heal(waiting).await;
            }
            Ok(Err(e)) => self.note_failed(batch, owners, &e.to_string()),
            Err(_) => self.note_failed(batch, owners, "target write timed out"),
        }
        batch.clear();
        owners.clear();
    }

    /// Lands events that could not land yet, each stream once: the versions the target lacks
    /// below them are read from the stream's source and landed with them. What still does not
    /// land (a longer gap, another tenant's stream, an unreachable store) is deferred.
    async fn heal(&self, waiting: Vec<(&StoredEvent, Uuid, StoreIdx)>) {
        let mut streams: Vec<(StoreIdx, Uuid, &str, Uuid, i32)> = Vec::new();
        for (event, tenant, source) in &waiting {
            let key = (
                *source,
                *tenant,
                event.aggregate_type.as_str(),
                event.aggregate_id,
            );
            match streams
                .iter_mut()
                .find(|(s, t, ty, id, _)| (*s, *t, *ty, *id) == key)
            {
                Some(stream) => stream.4 = stream.4.max(event.version),
                None => streams.push((key.0, key.1, key.2, key.3, event.version)),
            }
        }
        let mut healed: std::collections::HashSet<Uuid> = std::collections::HashSet::new();
        for (source, tenant, aggregate_type, aggregate_id, last) in
            streams.into_iter().take(MAX_HEALED_STREAMS)
        {
            let stream = StreamRef {
                tenant_id: tenant,
                aggregate_type,
                aggregate_id,
            };
            let landed =
                tokio::time::timeout(INSERT_TIMEOUT, self.heal_stream(source, stream, last))
                    .await
                    .unwrap_or_else(|_| Err("heal timed out".to_owned()));
            match landed {
                Ok(ids) => healed.extend(ids),
                Err(e) => {
                    tracing::debug!(error = %e, "mirror heal failed; the tail will copy the stream")
                }
            }
        }
        let mut stats = self
            .stats
            .lock()
            .expect("mirror stats lock is never poisoned");
        for (event, tenant, _) in waiting {
            let entry = stats.entry(tenant).or_default();
            if healed.contains(&event.event_id) {
                entry.events_healed += 1;
                self.metrics
                    .mirror_writes
                    .with_label_values(&["healed"])
                    .inc();
            } else {
                entry.events_deferred += 1;
                entry.note_failure(std::slice::from_ref(event), None);
                self.metrics
                    .mirror_writes
                    .with_label_values(&["deferred"])
                    .inc();
            }
        }
    }

    /// Copies `stream`'s versions after the target's last, up to `last`, from `source`; the ids
    /// of the events that are in the target afterwards.
    async fn heal_stream(
        &self,
        source: StoreIdx,
        stream: StreamRef<'_>,
        last: i32,
    ) -> Result<Vec<Uuid>, String> {
        let source = self
            .sources
            .get(usize::from(source))
            .ok_or_else(|| format!("no store at index {source}"))?;
        let have = self
            .store
            .stream_version(stream)
            .await
            .map_err(|e| e.to_string())?;
        if have >= last {
            return Ok(Vec::new());
        }
        let rows = source
            .read_stream_range(
                stream,
                StreamRange {
                    from_version: have + 1,
                    to_version: Some(last),
                    backward: false,
                    limit: MAX_HEAL_EVENTS,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        let landed = self
            .store
            .insert_copied(&rows)
            .await
            .map_err(|e| e.to_string())?;
        Ok(rows
            .iter()
            .zip(landed)
            .filter_map(|(row, position)| position.map(|_| row.event_id))
            .collect())
    }

    fn note_failed(&self, batch: &[StoredEvent], owners: &[(Uuid, StoreIdx)], error: &str) {
        tracing::debug!(
            events = batch.len(),
            error,
            "mirror write failed; the tail will copy these events"
        );
        self.metrics
            .mirror_writes
            .with_label_values(&["failed"])
            .inc_by(batch.len() as u64);
        let mut stats = self
            .stats
            .lock()
            .expect("mirror stats lock is never poisoned");
        for (event, (tenant, _)) in batch.iter().zip(owners) {
            let entry = stats.entry(*tenant).or_default();
            entry.total_failures += 1;
            entry.note_failure(std::slice::from_ref(event), Some(error));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;
    use serde_json::value::RawValue;

    /// A job of one event, first of a new stream, with a payload of about `payload_bytes`.
    fn job(tenant: Uuid, position: i64, payload_bytes: usize) -> MirrorJob {
        let payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(payload_bytes));
        let now = Utc::now();
        MirrorJob {
            tenant,
            source: 0,
            events: vec![StoredEvent {
                global_position: position,
                event_id: Uuid::new_v4(),
                aggregate_type: "Order".to_owned(),
                aggregate_id: Uuid::new_v4(),
                tenant_id: Some(tenant),
                event_type: "Placed".to_owned(),
                version: 1,
                actor_id: None,
                timestamp: now,
                created_at: now,
                payload: RawValue::from_string(payload).expect("valid JSON"),
            }],
        }
    }

    /// A mirror of one target store whose budget holds `jobs` jobs of 10,000-byte payloads,
    /// its metrics, the store (a fresh SQLite file, with its schema or without: then every
    /// write fails), the file and one job's bytes.
    async fn mirror_of(
        jobs: usize,
        with_schema: bool,
    ) -> (Mirror, ProxyMetrics, EventStore, std::path::PathBuf, usize) {
        let (store, path) = sqlite_store(with_schema).await;
        let metrics = ProxyMetrics::new();
        let one = job(Uuid::nil(), 0, 10_000).bytes();
        let mirror = Mirror::new(&["target"], jobs * one, metrics.clone());
        (mirror, metrics, store, path, one)
    }

    /// A SQLite store in a fresh file.
    async fn sqlite_store(with_schema: bool) -> (EventStore, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("switchyard-mirror-{}.db", Uuid::new_v4()));
        let store = EventStore::connect("target", &format!("sqlite://{}", path.display()), 1)
            .expect("a SQLite URL");
        if with_schema {
            store.ensure_schema().await.expect("schema");
        }
        (store, path)
    }

    /// Stops the workers and removes the store's files.
    async fn finish(
        workers: Vec<tokio::task::JoinHandle<()>>,
        store: EventStore,
        path: &std::path::Path,
    ) {
        for worker in workers {
            worker.abort();
        }
        store.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    /// Polls until the target's budget is empty again.
    async fn wait_released(mirror: &Mirror) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while mirror.queued_bytes(0) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "bytes never released: {}",
                mirror.queued_bytes(0)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn metric(metrics: &ProxyMetrics, line: &str) -> bool {
        metrics.render().lines().any(|l| l == line)
    }

    /// Appends hold their bytes from queueing until the worker wrote them; one that does not
    /// fit is dropped and counted by reason; once written, the budget is whole again.
    #[tokio::test]
    async fn queued_bytes_are_bounded_and_returned_once_the_worker_wrote_them() {
        let (mirror, metrics, store, path, one) = mirror_of(3, true).await;
        let tenant = Uuid::new_v4();
        // No worker yet: the queue only fills.
        for position in 1..=4 {
            mirror.enqueue(0, job(tenant, position, 10_000));
        }
        assert_eq!(mirror.queued_bytes(0), 3 * one, "three fit, the fourth not");
        assert!(metric(
            &metrics,
            &format!(
                "switchyard_proxy_mirror_queue_bytes{{store=\"target\"}} {}",
                3 * one
            )
        ));
        assert!(metric(
            &metrics,
            "switchyard_proxy_mirror_dropped_events_total{reason=\"queue_bytes\"} 1"
        ));
        assert!(metric(
            &metrics,
            "switchyard_proxy_mirror_writes_total{outcome=\"dropped\"} 1"
        ));
        let stats = mirror.stats(&tenant).expect("stats");
        assert_eq!(stats.events_dropped, 1);
        assert_eq!(
            stats.last_error.as_deref(),
            Some("mirror queue over proxy.mirror_queue_bytes")
        );

        let workers = mirror.start(std::slice::from_ref(&store));
        wait_released(&mirror).await;
        assert_eq!(mirror.stats(&tenant).expect("stats").events_mirrored, 3);
        assert!(metric(
            &metrics,
            "switchyard_proxy_mirror_queue_bytes{store=\"target\"} 0"
        ));
        // The budget is whole again: the next append is queued and written.
        mirror.enqueue(0, job(tenant, 5, 10_000));
        wait_released(&mirror).await;
        assert_eq!(mirror.stats(&tenant).expect("stats").events_mirrored, 4);
        assert_eq!(mirror.stats(&tenant).expect("stats").events_dropped, 1);
        finish(workers, store, &path).await;
    }

    /// A write that fails returns its bytes just the same.
    #[tokio::test]
    async fn queued_bytes_are_returned_when_the_write_fails() {
        let (mirror, metrics, store, path, one) = mirror_of(2, false).await;
        let tenant = Uuid::new_v4();
        mirror.enqueue(0, job(tenant, 1, 10_000));
        mirror.enqueue(0, job(tenant, 2, 10_000));
        assert_eq!(mirror.queued_bytes(0), 2 * one);
        let workers = mirror.start(std::slice::from_ref(&store));
        wait_released(&mirror).await;
        let stats = mirror.stats(&tenant).expect("stats");
        assert_eq!((stats.total_failures, stats.events_mirrored), (2, 0));
        assert!(mirror.drain(Duration::from_secs(1)).await);
        mirror.enqueue(0, job(tenant, 3, 10_000));
        mirror.enqueue(0, job(tenant, 4, 10_000));
        wait_released(&mirror).await;
        assert_eq!(mirror.stats(&tenant).expect("stats").total_failures, 4);
        assert!(metric(
            &metrics,
            "switchyard_proxy_mirror_dropped_events_total{reason=\"queue_bytes\"} 0"
        ));
        finish(workers, store, &path).await;
    }

    /// A stream the target lacks the start of (written before the proxy learned of the
    /// migration): the mirror copies the missing versions from the source and lands the new
    /// one at once, instead of leaving every later event of the stream to the tail.
    #[tokio::test]
    async fn an_event_whose_predecessors_the_target_lacks_is_healed_from_the_source() {
        let (source, source_path) = sqlite_store(true).await;
        let (target, target_path) = sqlite_store(true).await;
        let metrics = ProxyMetrics::new();
        let mirror = Mirror::new(&["source", "target"], 1 << 20, metrics.clone());
        let stream = StreamRef {
            tenant_id: Uuid::new_v4(),
            aggregate_type: "Order",
            aggregate_id: Uuid::new_v4(),
        };
        // Versions 1..=3 were written before dual-write: only the source has them.
        let early: Vec<NewEvent> = (1..=3).map(|n| event(Uuid::new_v4(), n)).collect();
        source.append(stream, Some(0), &early).await.expect("early");
        let late = vec![event(Uuid::new_v4(), 4)];
        let appended = source.append(stream, Some(3), &late).await.expect("late");
        mirror.enqueue(
            1,
            MirrorJob::from_append(0, stream, late.clone(), &appended),
        );
        let workers = mirror.start(&[source.clone(), target.clone()]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while mirror.queued_bytes(1) > 0 {
            assert!(tokio::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let range = StreamRange {
            from_version: 1,
            to_version: None,
            backward: false,
            limit: 100,
        };
        let ids = |events: Vec<StoredEvent>| -> Vec<(i32, Uuid)> {
            events.iter().map(|e| (e.version, e.event_id)).collect()
        };
        assert_eq!(
            ids(target
                .read_stream_range(stream, range)
                .await
                .expect("target")),
            ids(source
                .read_stream_range(stream, range)
                .await
                .expect("source")),
            "the target holds the source's stream, version by version"
        );
        let stats = mirror.stats(&stream.tenant_id).expect("stats");
        assert_eq!((stats.events_healed, stats.events_deferred), (1, 0));
        assert!(metric(
            &metrics,
            "switchyard_proxy_mirror_writes_total{outcome=\"healed\"} 1"
        ));
        for worker in workers {
            worker.abort();
        }
        finish(Vec::new(), source, &source_path).await;
        finish(Vec::new(), target, &target_path).await;
    }

    fn event(id: Uuid, n: u32) -> NewEvent {
        let payload = RawValue::from_string(format!("{{\"n\":{n}}}")).expect("valid JSON");
        NewEvent::new(id, format!("E{n}"), payload, None, None)
    }

    /// Each mirrored event carries the stored row of its own id, whatever order the store
    /// reports the rows in; an event the store did not report is left to the tail.
    #[test]
    fn a_mirror_job_pairs_rows_with_events_by_id_never_by_index() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let at = |s: i64| {
            Utc.timestamp_opt(1_700_000_000 + s, 0)
                .single()
                .expect("valid")
        };
        // The store reports b's row first (b at version 7), then a's (version 8); c is missing.
        let appended = Appended {
            first_version: 7,
            last_version: 8,
            global_positions: vec![70, 80],
            timestamps: vec![at(7), at(8)],
            created_at: vec![at(17), at(18)],
            event_ids: vec![b, a],
            versions: vec![7, 8],
        };
        let stream = StreamRef {
            tenant_id: Uuid::new_v4(),
            aggregate_type: "Order",
            aggregate_id: Uuid::new_v4(),
        };
        let job = MirrorJob::from_append(
            0,
            stream,
            vec![event(a, 1), event(b, 2), event(c, 3)],
            &appended,
        );
        let got: Vec<(Uuid, i32, i64, DateTime<Utc>, &str)> = job
            .events
            .iter()
            .map(|e| {
                (
                    e.event_id,
                    e.version,
                    e.global_position,
                    e.timestamp,
                    e.event_type.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![(a, 8, 80, at(8), "E1"), (b, 7, 70, at(7), "E2")],
            "each event with its own row; the unreported one left out"
        );
    }
}
