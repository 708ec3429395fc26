//! The dual-write mirror: after an append committed to the source (and its reply is settled),
//! the same events are queued for the migration target and written there by one worker per
//! target store, in batches, under the target-order rule.
//!
//! The mirror never slows or fails a client's append: queueing is a non-blocking `try_send`
//! into a bounded queue; a full queue, an unreachable target or an event that cannot land yet
//! is counted (metrics and per-tenant stats on the admin port) and left to the migration's
//! tail, which copies everything the mirror missed.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use switchyard_store::{Appended, EventStore, NewEvent, StoredEvent, StreamRef};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::metrics::ProxyMetrics;
use crate::routing::StoreIdx;

/// Appends one target's queue holds before new ones are dropped (and left to the tail).
const QUEUE_CAPACITY: usize = 4096;
/// Most events one target insert carries.
const MAX_BATCH_EVENTS: usize = 2000;
/// How long one target insert may take before it counts as failed.
const INSERT_TIMEOUT: Duration = Duration::from_secs(2);
/// Streams listed per tenant in the failure stats.
const MAX_STREAMS_LISTED: usize = 64;

/// Events of one committed append, for one target.
#[derive(Debug)]
pub struct MirrorJob {
    pub tenant: Uuid,
    pub events: Vec<StoredEvent>,
}

impl MirrorJob {
    /// The committed append as the source stored it: each request event with the stored row
    /// of the same event id (position, version and the timestamps the store filled in). An
    /// event the store did not report is left out (the tail copies it): rows are paired by
    /// identity, never by index.
    pub fn from_append(stream: StreamRef<'_>, events: Vec<NewEvent>, appended: &Appended) -> Self {
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
            events,
        }
    }
}

/// What the admin port shows about one tenant's mirroring on this proxy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TenantMirrorStats {
    /// Events written to the target.
    pub events_mirrored: u64,
    /// Events that could not land yet (their predecessor is not in the target); the tail
    /// copies them.
    pub events_deferred: u64,
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

/// The mirror of one proxy: a queue and a worker per store that is a migration target.
#[derive(Debug)]
pub struct Mirror {
    queues: Vec<mpsc::Sender<MirrorJob>>,
    receivers: Mutex<Vec<Option<mpsc::Receiver<MirrorJob>>>>,
    stats: Arc<Mutex<HashMap<Uuid, TenantMirrorStats>>>,
    metrics: ProxyMetrics,
}

impl Mirror {
    pub fn new(stores: usize, metrics: ProxyMetrics) -> Self {
        let (queues, receivers) = (0..stores)
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                (tx, Some(rx))
            })
            .unzip();
        Self {
            queues,
            receivers: Mutex::new(receivers),
            stats: Arc::default(),
            metrics,
        }
    }

    /// Queues a committed append for `target` without waiting. A full queue drops the job
    /// (counted; the tail copies it).
    pub fn enqueue(&self, target: StoreIdx, job: MirrorJob) {
        let Some(queue) = self.queues.get(usize::from(target)) else {
            return;
        };
        if let Err(e) = queue.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job) => {
                    job
                }
            };
            let n = job.events.len() as u64;
            self.metrics
                .mirror_writes
                .with_label_values(&["dropped"])
                .inc_by(n);
            let mut stats = self
                .stats
                .lock()
                .expect("mirror stats lock is never poisoned");
            let entry = stats.entry(job.tenant).or_default();
            entry.events_dropped += n;
            entry.note_failure(&job.events, Some("mirror queue full"));
        }
    }

    /// This proxy's mirror stats for a tenant, if it ever mirrored for it.
    pub fn stats(&self, tenant: &Uuid) -> Option<TenantMirrorStats> {
        self.stats
            .lock()
            .expect("mirror stats lock is never poisoned")
            .get(tenant)
            .cloned()
    }

    /// Starts one worker per store; they run until their queue closes (shutdown).
    pub fn start(&self, stores: &[EventStore]) -> Vec<tokio::task::JoinHandle<()>> {
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
                    rx,
                    Arc::clone(&self.stats),
                    self.metrics.clone(),
                ))
            })
            .collect()
    }

    /// Waits up to `timeout` for every queue to empty (shutdown hands back what is left to
    /// the tail). Returns whether they emptied.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.queues.iter().all(|q| q.capacity() == q.max_capacity()) {
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
    mut rx: mpsc::Receiver<MirrorJob>,
    stats: Arc<Mutex<HashMap<Uuid, TenantMirrorStats>>>,
    metrics: ProxyMetrics,
) {
    let mut jobs = Vec::new();
    while rx.recv_many(&mut jobs, 256).await > 0 {
        // One insert per batch of jobs: fewer round trips when appends come fast.
        let mut batch: Vec<StoredEvent> = Vec::new();
        let mut owners: Vec<Uuid> = Vec::new();
        for job in jobs.drain(..) {
            owners.extend(std::iter::repeat_n(job.tenant, job.events.len()));
            batch.extend(job.events);
            if batch.len() >= MAX_BATCH_EVENTS {
                write(&store, &mut batch, &mut owners, &stats, &metrics).await;
            }
        }
        write(&store, &mut batch, &mut owners, &stats, &metrics).await;
    }
}

async fn write(
    store: &EventStore,
    batch: &mut Vec<StoredEvent>,
    owners: &mut Vec<Uuid>,
    stats: &Mutex<HashMap<Uuid, TenantMirrorStats>>,
    metrics: &ProxyMetrics,
) {
    if batch.is_empty() {
        return;
    }
    let result = tokio::time::timeout(INSERT_TIMEOUT, store.insert_copied(batch)).await;
    let mut stats = stats.lock().expect("mirror stats lock is never poisoned");
    match result {
        Ok(Ok(landed)) => {
            for ((event, owner), position) in batch.iter().zip(owners.iter()).zip(landed) {
                let entry = stats.entry(*owner).or_default();
                if position.is_some() {
                    entry.events_mirrored += 1;
                    metrics.mirror_writes.with_label_values(&["ok"]).inc();
                } else {
                    entry.events_deferred += 1;
                    entry.note_failure(std::slice::from_ref(event), None);
                    metrics.mirror_writes.with_label_values(&["deferred"]).inc();
                }
            }
        }
        Ok(Err(e)) => note_failed(&mut stats, batch, owners, metrics, &e.to_string()),
        Err(_) => note_failed(&mut stats, batch, owners, metrics, "target write timed out"),
    }
    batch.clear();
    owners.clear();
}

fn note_failed(
    stats: &mut HashMap<Uuid, TenantMirrorStats>,
    batch: &[StoredEvent],
    owners: &[Uuid],
    metrics: &ProxyMetrics,
    error: &str,
) {
    tracing::debug!(
        events = batch.len(),
        error,
        "mirror write failed; the tail will copy these events"
    );
    metrics
        .mirror_writes
        .with_label_values(&["failed"])
        .inc_by(batch.len() as u64);
    for (event, owner) in batch.iter().zip(owners) {
        let entry = stats.entry(*owner).or_default();
        entry.total_failures += 1;
        entry.note_failure(std::slice::from_ref(event), Some(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;
    use serde_json::value::RawValue;

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
