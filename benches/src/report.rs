//! What every load harness reports the same way: latencies in an HDR histogram (µs, recorded
//! only inside the measured window), percentiles and medians, rounding for the JSON line, the
//! machine's load around the measurement, and the `main` that starts the runtime.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use switchyard_runtime::telemetry::{self, LogFormat};

/// The slowest latency a histogram holds (60 s); slower ones are recorded as this.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// An empty latency histogram: 1 µs to [`MAX_LATENCY_US`], 3 significant digits.
pub fn latencies() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("histogram bounds")
}

/// Records `took` in µs, clamped to the histogram's bounds.
pub fn record_latency(latencies: &mut Histogram<u64>, took: Duration) {
    let us = u64::try_from(took.as_micros()).unwrap_or(MAX_LATENCY_US);
    latencies.saturating_record(us.clamp(1, MAX_LATENCY_US));
}

/// The window every writer of one run or phase shares.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Appends that complete before this are warm-up.
    pub measure_from: Instant,
    /// No append starts at or after this; appends that complete after it are not counted.
    pub end: Instant,
}

impl Window {
    /// Records an append that ran from `started` to `finished` if it completed in the window;
    /// answers whether it did.
    pub fn record(
        self,
        started: Instant,
        finished: Instant,
        latencies: &mut Histogram<u64>,
    ) -> bool {
        let inside = finished >= self.measure_from && finished <= self.end;
        if inside {
            record_latency(latencies, finished.duration_since(started));
        }
        inside
    }
}

/// The value at quantile `q` of `sorted` (nearest rank); 0 when empty.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `values` (the upper one of an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `x` to one decimal, for the JSON line.
pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// `x` to three decimals, for the JSON line.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The 1, 5 and 15-minute load averages (Linux; NaN where unreadable), printed beside the
/// figures measured on a shared machine.
pub fn load_averages() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [f64::NAN; 3];
    for (slot, field) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = field.parse().unwrap_or(f64::NAN);
    }
    out
}

/// A harness's `main` after its arguments are checked: logs at `log` (the in-process proxies'
/// filter; `None`: no subscriber) and `run` on a multi-threaded runtime.
pub fn block_on(log: Option<&str>, run: impl Future<Output = Result<()>>) -> Result<()> {
    if let Some(log) = log {
        telemetry::init(LogFormat::Text, log);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run)
}
