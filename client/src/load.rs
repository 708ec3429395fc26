//! The one load writer: appends to streams of its own through a proxy, each append with
//! `expected_version` and event ids, retrying a retryable refusal or a lost connection with the
//! same body (the same event ids) until it is acknowledged, so each acknowledged event lands
//! exactly once; a conflict met by a retry whose first event is already in the stream is its
//! own earlier attempt and counts as acknowledged. Closed loop (the next append when the last
//! is acknowledged) or open loop (a fixed schedule; latency from each append's due time).
//!
//! [`LoadWriter`] is one writer; [`Load`] runs several until stopped and merges their
//! [`LoadReport`]s, with live [`LoadCounters`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

use crate::data::{Appended, DataClient, ExpectedVersion, NewEvent, StreamId};
use crate::error::{ClientError, ErrorCode};

/// Makes the events of a writer's `seq`-th append (`(writer, seq) -> events`, at least one).
pub type EventMaker = Arc<dyn Fn(usize, u64) -> Vec<NewEvent> + Send + Sync>;

/// How a writer paces its appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// Closed loop: the next append `pause` after the last one is acknowledged.
    Closed {
        /// The pause between appends (zero: saturate).
        pause: Duration,
    },
    /// Open loop: writer `i`'s `k`-th append is due at `origin + stagger × i + every × k`; a
    /// late writer never skips one, so queueing shows in the latencies (measured from due
    /// times). `n` writers together send `n / every` appends a second; `stagger = every / n`
    /// spreads them evenly.
    Open {
        /// The time between one writer's appends.
        every: Duration,
        /// How much later each writer starts than the one before.
        stagger: Duration,
    },
}

/// What the writers append, where and how.
#[derive(Clone)]
pub struct LoadPlan {
    /// The tenant written.
    pub tenant: Uuid,
    /// The aggregate type of the writers' streams.
    pub aggregate_type: String,
    /// Streams per writer, written round robin (each append expects the stream's version).
    pub streams: usize,
    /// Closed or open loop.
    pub pacing: Pacing,
    /// The wait before retrying a retryable failure.
    pub retry_pause: Duration,
    /// An append not acknowledged this long after its first send fails (`None`: retry until
    /// acknowledged).
    pub give_up_after: Option<Duration>,
    /// Whether every attempt (acknowledged or not) is kept in the report's `attempts`.
    pub record_attempts: bool,
    /// Times in the report are measured from it.
    pub origin: Instant,
    /// The events of each append.
    pub events: EventMaker,
}

impl std::fmt::Debug for LoadPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadPlan")
            .field("tenant", &self.tenant)
            .field("aggregate_type", &self.aggregate_type)
            .field("streams", &self.streams)
            .field("pacing", &self.pacing)
            .field("retry_pause", &self.retry_pause)
            .field("give_up_after", &self.give_up_after)
            .field("record_attempts", &self.record_attempts)
            .finish_non_exhaustive()
    }
}

impl LoadPlan {
    /// Closed-loop writers of `tenant` on two `Load` streams each, one `Written` event per
    /// append (`{"writer", "seq"}`), retrying 20 ms apart until acknowledged.
    pub fn new(tenant: Uuid) -> Self {
        Self {
            tenant,
            aggregate_type: "Load".to_owned(),
            streams: 2,
            pacing: Pacing::Closed {
                pause: Duration::ZERO,
            },
            retry_pause: Duration::from_millis(20),
            give_up_after: None,
            record_attempts: false,
            origin: Instant::now(),
            events: Arc::new(|writer, seq| {
                vec![NewEvent::new(
                    "Written",
                    json!({ "writer": writer, "seq": seq }),
                )]
            }),
        }
    }

    /// The same plan making each append's events with `events`.
    #[must_use]
    pub fn with_events(
        mut self,
        events: impl Fn(usize, u64) -> Vec<NewEvent> + Send + Sync + 'static,
    ) -> Self {
        self.events = Arc::new(events);
        self
    }
}

/// One acknowledged append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The writer.
    pub writer: usize,
    /// Its stream's aggregate id.
    pub aggregate_id: Uuid,
    /// Its events' ids, in order.
    pub event_ids: Vec<Uuid>,
    /// The first event's version.
    pub first_version: i64,
    /// The store that acknowledged it.
    pub store_id: String,
    /// When it was first sent (open loop: when it was due), since the plan's origin.
    pub sent: Duration,
    /// First send (open loop: due time) to acknowledgement, retries included.
    pub latency: Duration,
    /// Attempts before the acknowledged one.
    pub retries: u32,
    /// Acknowledged by finding its first event in the stream after a retry met a conflict
    /// (its earlier attempt had committed).
    pub found_after_conflict: bool,
}

/// One attempt of one append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The HTTP status, or 0 when there was no answer.
    pub status: u16,
    /// The error code of a refusal (`connection` when there was no answer, empty on 201).
    pub code: String,
    /// Whether the refusal said a retry may succeed.
    pub retryable: bool,
    /// How long the attempt took.
    pub took: Duration,
}

/// An append that failed for good (the writer moves on to a fresh stream).
#[derive(Debug)]
pub struct Failure {
    /// The writer.
    pub writer: usize,
    /// Its stream's aggregate id.
    pub aggregate_id: Uuid,
    /// Its events' ids.
    pub event_ids: Vec<Uuid>,
    /// Why: a refusal that is not retryable, or the last error when `give_up_after` passed.
    pub error: ClientError,
}

/// What writers did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Every acknowledged append, each writer's in order.
    pub acked: Vec<Ack>,
    /// Every append that failed for good.
    pub failed: Vec<Failure>,
    /// Every attempt, when the plan records them.
    pub attempts: Vec<Attempt>,
    /// Attempts that were retried.
    pub retries: u64,
}

impl LoadReport {
    /// Events acknowledged.
    pub fn acked_events(&self) -> usize {
        self.acked.iter().map(|a| a.event_ids.len()).sum()
    }

    /// Adds `other`'s appends and attempts.
    pub fn merge(&mut self, other: LoadReport) {
        self.acked.extend(other.acked);
        self.failed.extend(other.failed);
        self.attempts.extend(other.attempts);
        self.retries += other.retries;
    }
}

/// Live counts of running writers.
#[derive(Debug, Default)]
pub struct LoadCounters {
    /// Appends acknowledged.
    pub acked: AtomicU64,
    /// Appends failed for good.
    pub failed: AtomicU64,
    /// Attempts retried.
    pub retries: AtomicU64,
}

/// One writer of a [`LoadPlan`] through one proxy.
#[derive(Debug)]
pub struct LoadWriter {
    client: DataClient,
    plan: LoadPlan,
    index: usize,
    counters: Arc<LoadCounters>,
}

/// How one append ended.
enum Outcome {
    Acked(Appended, bool),
    Failed(ClientError),
}

impl LoadWriter {
    /// Writer `index` of `plan` through `client`, counting into `counters`.
    pub fn new(
        client: DataClient,
        plan: LoadPlan,
        index: usize,
        counters: Arc<LoadCounters>,
    ) -> Self {
        Self {
            client,
            plan,
            index,
            counters,
        }
    }

    /// Appends until `stop` says true (an append in progress is finished first).
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> LoadReport {
        let plan = &self.plan;
        let mut report = LoadReport::default();
        let mut streams: Vec<(StreamId, u64)> = (0..plan.streams.max(1))
            .map(|_| (self.fresh_stream(), 0))
            .collect();
        let mut seq: u64 = 0;
        while !*stop.borrow() {
            let started = match plan.pacing {
                Pacing::Closed { .. } => Instant::now(),
                Pacing::Open { every, stagger } => {
                    let k = u32::try_from(seq).unwrap_or(u32::MAX);
                    let i = u32::try_from(self.index).unwrap_or(u32::MAX);
                    let due = plan.origin + stagger * i + every * k;
                    tokio::select! {
                        () = tokio::time::sleep_until(due.into()) => {}
                        _ = stop.changed() => continue,
                    }
                    due
                }
            };
            let s = usize::try_from(seq % streams.len() as u64).unwrap_or(0);
            let events = (plan.events)(self.index, seq);
            seq += 1;
            let (stream, version) = &streams[s];
            let expected = ExpectedVersion::Exact(*version);
            let (outcome, retries) = self.append(stream, expected, &events, &mut report).await;
            let event_ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
            match outcome {
                Outcome::Acked(appended, found) => {
                    self.counters.acked.fetch_add(1, Ordering::Relaxed);
                    streams[s].1 = u64::try_from(appended.last_version).unwrap_or(0);
                    report.acked.push(Ack {
                        writer: self.index,
                        aggregate_id: streams[s].0.aggregate_id,
                        event_ids,
                        first_version: appended.first_version,
                        store_id: appended.store_id,
                        sent: started.saturating_duration_since(plan.origin),
                        latency: started.elapsed(),
                        retries,
                        found_after_conflict: found,
                    });
                }
                Outcome::Failed(error) => {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    report.failed.push(Failure {
                        writer: self.index,
                        aggregate_id: streams[s].0.aggregate_id,
                        event_ids,
                        error,
                    });
                    // The stream's version is unknown now: go on with a fresh one.
                    streams[s] = (self.fresh_stream(), 0);
                }
            }
            if let Pacing::Closed { pause } = plan.pacing {
                if !pause.is_zero() {
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
        report
    }

    fn fresh_stream(&self) -> StreamId {
        StreamId::new(
            self.plan.tenant,
            self.plan.aggregate_type.clone(),
            Uuid::new_v4(),
        )
    }

    /// One append, retried with the same body until it is acknowledged or fails for good;
    /// answers how it ended and how many retries it took.
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        report: &mut LoadReport,
    ) -> (Outcome, u32) {
        let plan = &self.plan;
        let first_sent = Instant::now();
        let mut retries = 0u32;
        loop {
            let began = Instant::now();
            let result = self.client.append(stream, expected, events).await;
            if plan.record_attempts {
                report.attempts.push(attempt_of(&result, began.elapsed()));
            }
            let error = match result {
                Ok(appended) => return (Outcome::Acked(appended, false), retries),
                Err(e) => e,
            };
            // A conflict met by a retry may be this append's own earlier attempt, which
            // committed though its answer was lost: then its first event is in the stream.
            let own_conflict = retries > 0
                && matches!(
                    error.code(),
                    Some(
                        ErrorCode::VersionConflict
                            | ErrorCode::EventIdConflict
                            | ErrorCode::RetryOrderMismatch
                    )
                );
            if own_conflict {
                if let Some(appended) = self.committed_earlier(stream, events).await {
                    return (Outcome::Acked(appended, true), retries);
                }
            }
            let out_of_time = plan
                .give_up_after
                .is_some_and(|limit| first_sent.elapsed() >= limit);
            if !error.is_retryable() || out_of_time {
                return (Outcome::Failed(error), retries);
            }
            retries += 1;
            report.retries += 1;
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(plan.retry_pause).await;
        }
    }

    /// The append's events as committed in `stream`, if its first one is there (looked up
    /// by id, retried like the append while the lookup's failure is retryable).
    async fn committed_earlier(&self, stream: &StreamId, events: &[NewEvent]) -> Option<Appended> {
        let first = events.first()?;
        let deadline = Instant::now() + self.plan.give_up_after.unwrap_or(Duration::from_secs(30));
        let found = loop {
            match self
                .client
                .lookup_event(stream.tenant, first.event_id)
                .await
            {
                Ok(found) => break found,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(self.plan.retry_pause).await;
                }
                Err(_) => return None,
            }
        };
        let event = found.event?;
        if event.aggregate_id != stream.aggregate_id
            || event.aggregate_type != stream.aggregate_type
        {
            return None;
        }
        let n = i64::try_from(events.len()).ok()?;
        Some(Appended {
            store_id: found.store_id,
            first_version: event.version,
            last_version: event.version + n - 1,
            global_positions: Vec::new(),
        })
    }
}

/// The [`Attempt`] of an append's result.
fn attempt_of(result: &Result<Appended, ClientError>, took: Duration) -> Attempt {
    match result {
        Ok(_) => Attempt {
            status: 201,
            code: String::new(),
            retryable: false,
            took,
        },
        Err(ClientError::Api(e)) => Attempt {
            status: e.status.as_u16(),
            code: e.code.as_str().to_owned(),
            retryable: e.retryable,
            took,
        },
        Err(e) => Attempt {
            status: 0,
            code: "connection".to_owned(),
            retryable: e.is_retryable(),
            took,
        },
    }
}

/// Several [`LoadWriter`]s running until stopped.
///
/// ```no_run
/// use std::time::Duration;
/// use switchyard_client::{DataClient, Load, LoadPlan};
/// use uuid::Uuid;
///
/// # async fn demo() {
/// let proxy = DataClient::new("http://127.0.0.1:7070");
/// let load = Load::start(&[proxy], LoadPlan::new(Uuid::new_v4()), 4);
/// tokio::time::sleep(Duration::from_secs(1)).await;
/// let report = load.stop().await;
/// assert!(report.failed.is_empty());
/// println!("{} appends acknowledged, {} retries", report.acked.len(), report.retries);
/// # }
/// ```
#[derive(Debug)]
pub struct Load {
    stop: watch::Sender<bool>,
    counters: Arc<LoadCounters>,
    tasks: Vec<tokio::task::JoinHandle<LoadReport>>,
}

impl Load {
    /// `n` writers of `plan`, writer `i` through `proxies[i % len]`. Panics without proxies.
    pub fn start(proxies: &[DataClient], plan: LoadPlan, n: usize) -> Self {
        assert!(!proxies.is_empty(), "a load needs a proxy to write through");
        let (stop, rx) = watch::channel(false);
        let counters = Arc::new(LoadCounters::default());
        let tasks = (0..n)
            .map(|i| {
                let writer = LoadWriter::new(
                    proxies[i % proxies.len()].clone(),
                    plan.clone(),
                    i,
                    Arc::clone(&counters),
                );
                tokio::spawn(writer.run(rx.clone()))
            })
            .collect();
        Self {
            stop,
            counters,
            tasks,
        }
    }

    /// The writers' live counts.
    pub fn counters(&self) -> &LoadCounters {
        &self.counters
    }

    /// Appends acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.counters.acked.load(Ordering::Relaxed)
    }

    /// Stops the writers (each finishes its append in progress) and merges their reports.
    /// A writer task that panicked re-raises its panic here.
    pub async fn stop(self) -> LoadReport {
        let _ = self.stop.send(true);
        let mut all = LoadReport::default();
        for task in self.tasks {
            match task.await {
                Ok(report) => all.merge(report),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        all
    }
}
