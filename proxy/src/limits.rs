//! Per-client request rate limiting (a token bucket per client IP address) and the per-
//! connection activity record that the slow-client timeouts read.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept before full (idle) ones are forgotten.
const MAX_TRACKED_CLIENTS: usize = 65_536;

/// A token bucket per client IP: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `None` when `per_second` is 0 (no limit). A `burst` of 0 means `per_second`.
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            rate: f64::from(per_second),
            burst: f64::from(if burst == 0 { per_second } else { burst }),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a token for `client`, or says how long until one is there.
    pub fn check(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED_CLIENTS && !buckets.contains_key(&client) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(client).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

/// What the slow-client watchdog knows of one connection. Times are milliseconds since the
/// connection opened; `NONE` is "not running".
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    /// Requests being handled now.
    active: AtomicUsize,
    /// When the first byte of the next request head arrived (the head timer), or `NONE`.
    head_started: AtomicU64,
    /// When the connection last became idle (opened, or its last response was produced).
    idle_since: AtomicU64,
    /// HTTP/2: bytes between requests are pings and window updates, not a request head.
    h2: AtomicBool,
}

const NONE: u64 = u64::MAX;

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// A request head took longer than the header read timeout.
    HeaderTimeout,
    /// No request for the keep-alive idle timeout.
    IdleTimeout,
}

impl Expired {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_read_timeout",
            Self::IdleTimeout => "keep_alive_idle_timeout",
        }
    }
}

impl Activity {
    /// A new connection: the head timer runs from now (the first request must come in time).
    pub fn new() -> Self {
        Self {
            opened: Instant::now(),
            active: AtomicUsize::new(0),
            head_started: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    pub fn set_h2(&self) {
        self.h2.store(true, Ordering::Release);
    }

    /// Bytes arrived. On an idle HTTP/1 connection they start the next request's head timer.
    pub fn on_read(&self) {
        if self.active.load(Ordering::Acquire) == 0 && !self.h2.load(Ordering::Acquire) {
            let _ = self.head_started.compare_exchange(
                NONE,
                self.now_ms(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// A request reached the service: its head is complete. Ends when the guard drops.
    pub fn begin(&self) -> Busy<'_> {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(NONE, Ordering::Release);
        Busy(self)
    }

    fn end(&self) {
        self.idle_since.store(self.now_ms(), Ordering::Release);
        self.head_started.store(NONE, Ordering::Release);
        self.active.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether the connection has outlived a timeout, and otherwise how long until it might.
    pub fn check(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<Duration, Expired> {
        if self.active.load(Ordering::Acquire) > 0 {
            return Ok(Duration::from_secs(1));
        }
        let now = self.now_ms();
        let head = self.head_started.load(Ordering::Acquire);
        let (since, limit, reason) = if head == NONE {
            (
                self.idle_since.load(Ordering::Acquire),
                idle_timeout,
                Expired::IdleTimeout,
            )
        } else {
            (head, header_timeout, Expired::HeaderTimeout)
        };
        let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(NONE);
        let elapsed = now.saturating_sub(since);
        if elapsed >= limit_ms {
            Err(reason)
        } else {
            Ok(Duration::from_millis(limit_ms - elapsed))
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// A request in progress on a connection (see [`Activity::begin`]).
#[derive(Debug)]
pub struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_the_rate_and_cap_at_the_burst() {
        let limiter = RateLimiter::new(10, 3).expect("on");
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check(a, t0).is_ok());
        }
        let wait = limiter.check(a, t0).expect_err("burst spent");
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(limiter.check(b, t0).is_ok(), "clients are counted apart");
        assert!(limiter.check(a, t0 + Duration::from_millis(100)).is_ok());
        assert!(limiter.check(a, t0 + Duration::from_millis(100)).is_err());
        // A long pause saves up the burst, no more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.check(a, later).is_ok());
        }
        assert!(limiter.check(a, later).is_err());
        assert!(RateLimiter::new(0, 5).is_none());
    }

    #[test]
    fn activity_runs_the_head_timer_only_between_requests() {
        let activity = Activity::new();
        let (head, idle) = (Duration::from_millis(50), Duration::from_secs(60));
        assert!(activity.check(head, idle).is_ok());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            activity.check(head, idle),
            Err(Expired::HeaderTimeout),
            "first request late"
        );
        {
            let _busy = activity.begin();
            activity.on_read();
            assert!(
                activity.check(head, idle).is_ok(),
                "a request in progress never expires"
            );
        }
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            activity.check(head, idle).is_ok(),
            "idle between requests: the long timer"
        );
        activity.on_read();
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(activity.check(head, idle), Err(Expired::HeaderTimeout));
        let h2 = Activity::new();
        h2.set_h2();
        drop(h2.begin());
        h2.on_read();
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            h2.check(head, idle).is_ok(),
            "h2 pings between requests are not a head"
        );
        assert_eq!(
            h2.check(head, Duration::from_millis(50)),
            Err(Expired::IdleTimeout)
        );
    }
}
