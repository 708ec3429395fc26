//! The appending writer of the throughput benchmarks (`append_overhead`, `dual_write`): one
//! event per append, to a stream of its own, at exactly the stream's version, through
//! `switchyard-client`; closed loop (the next append when the reply comes) or paced. Any
//! refusal ends the run: these benchmarks measure a healthy path, and a writer that retried
//! would hide what went wrong. (The cutover benchmark's writers retry through the client's
//! `LoadWriter`, since refusals are part of a cutover.)

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde_json::Value;
use switchyard_client::{DataClient, ExpectedVersion, NewEvent, StreamId};
use uuid::Uuid;

use crate::report::{latencies, Window};

/// What one writer did in one phase.
#[derive(Debug)]
pub struct WriterResult {
    /// Latencies of the appends acknowledged inside the measured window.
    pub latencies_us: Histogram<u64>,
    /// Appends acknowledged inside the measured window.
    pub count: u64,
    /// Appends acknowledged in all (warm-up included).
    pub sent: u64,
}

impl WriterResult {
    /// Nothing done yet.
    pub fn new() -> Result<Self> {
        Ok(Self {
            latencies_us: latencies()?,
            count: 0,
            sent: 0,
        })
    }

    /// Counts an append of one event at `version`, sent at `started` and acknowledged now with
    /// the stream at `landed`, which must be `version + 1` (anything else ends the run).
    pub fn acknowledged(
        &mut self,
        window: &Window,
        started: Instant,
        version: u64,
        landed: i64,
    ) -> Result<()> {
        let finished = Instant::now();
        if u64::try_from(landed).ok() != Some(version + 1) {
            bail!(
                "an append landed at version {landed} instead of {}",
                version + 1
            );
        }
        self.sent += 1;
        if window.record(started, finished, &mut self.latencies_us) {
            self.count += 1;
        }
        Ok(())
    }
}

/// One writer: where it appends and what.
#[derive(Debug, Clone)]
pub struct StreamWriter {
    /// The proxy it appends through.
    pub proxy: DataClient,
    /// Its stream; new per phase, so versions start at 1.
    pub stream: StreamId,
    /// Its number (passed to the payload).
    pub writer: usize,
    /// The events' type.
    pub event_type: &'static str,
    /// The events' actor.
    pub actor: &'static str,
    /// Paced: one append every `.0`, the first `.1` after the start (so paced writers are
    /// spread over one interval rather than arriving in bursts). `None`: closed loop.
    pub pace: Option<(Duration, Duration)>,
}

impl StreamWriter {
    /// Appends until the window ends; `payload(writer, seq)` is each event's payload.
    pub async fn run(
        self,
        window: Window,
        payload: impl Fn(usize, u64) -> Value,
    ) -> Result<WriterResult> {
        let mut result = WriterResult::new()?;
        let mut version: u64 = 0;
        let mut next_send = self.pace.map(|(_, offset)| Instant::now() + offset);
        loop {
            if let (Some(at), Some((every, _))) = (next_send.as_mut(), self.pace) {
                tokio::time::sleep_until((*at).into()).await;
                // Behind schedule (a slow append): carry on from now rather than burst.
                *at = (*at + every).max(Instant::now());
            }
            let started = Instant::now();
            if started >= window.end {
                return Ok(result);
            }
            let mut event = NewEvent::new(self.event_type, payload(self.writer, version))
                .with_actor(self.actor);
            event.event_id = Uuid::now_v7();
            let appended = self
                .proxy
                .append(&self.stream, ExpectedVersion::Exact(version), &[event])
                .await
                .with_context(|| format!("append, writer {}, version {version}", self.writer))?;
            result
                .acknowledged(&window, started, version, appended.last_version)
                .with_context(|| format!("writer {}", self.writer))?;
            version += 1;
        }
    }
}
