//! The per-connection activity record that the accept loop's slow-client timeouts read: when
//! a request head started arriving, whether a request is in progress, and how long the
//! connection has been idle.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
