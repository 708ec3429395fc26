//! Events as the stores hold them, and what an append asks and answers.

use chrono::{DateTime, SubsecRound, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::error::ErrorKind;
pub use crate::error::StoreError;

/// One event of an append, validated by the caller.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    /// Kept as the client's JSON text: the store parses it once (jsonb) or keeps it (SQLite).
    pub payload: Box<RawValue>,
    pub actor_id: Option<String>,
    /// Truncated to microseconds, the precision both backends keep, so an idempotent retry
    /// compares equal. `None` means "now" in the store.
    pub timestamp: Option<DateTime<Utc>>,
}

impl NewEvent {
    pub fn new(
        event_id: Uuid,
        event_type: impl Into<String>,
        payload: Box<RawValue>,
        actor_id: Option<String>,
        timestamp: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            event_id,
            event_type: event_type.into(),
            payload,
            actor_id,
            timestamp: timestamp.map(|t| t.trunc_subsecs(6)),
        }
    }
}

/// A stream: `(aggregate_type, aggregate_id)`, owned by one tenant.
#[derive(Debug, Clone, Copy)]
pub struct StreamRef<'a> {
    pub tenant_id: Uuid,
    pub aggregate_type: &'a str,
    pub aggregate_id: Uuid,
}

/// What a successful append answers (also for an idempotent retry: the original result).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Appended {
    pub first_version: i32,
    pub last_version: i32,
    pub global_positions: Vec<i64>,
    /// Each event's `timestamp` as stored (the store's clock where the client gave none), so
    /// a mirror can copy the events exactly.
    #[serde(skip)]
    pub timestamps: Vec<DateTime<Utc>>,
    /// Each event's `created_at` as stored.
    #[serde(skip)]
    pub created_at: Vec<DateTime<Utc>>,
    /// Each stored row's event id, as the store reports it: whoever pairs the rows with the
    /// request's events (the mirror) does it by id, never by index.
    #[serde(skip)]
    pub event_ids: Vec<Uuid>,
    /// Each stored row's version.
    #[serde(skip)]
    pub versions: Vec<i32>,
}

/// An event read back from a store.
#[derive(Debug, Clone, Serialize)]
pub struct StoredEvent {
    pub global_position: i64,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: Uuid,
    pub tenant_id: Option<Uuid>,
    pub event_type: String,
    pub version: i32,
    pub actor_id: Option<String>,
    pub timestamp: DateTime<Utc>,
    /// When the store persisted it (kept across a migration; not part of the API replies).
    #[serde(skip)]
    pub created_at: DateTime<Utc>,
    pub payload: Box<RawValue>,
}

/// Why an append did not land. Nothing of it was written in any case.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("version conflict: expected version {}, stream is at version {actual}", expected.map_or_else(|| "any".to_owned(), |v| v.to_string()))]
    VersionConflict { expected: Option<i32>, actual: i32 },
    #[error("an event id of this append is already used by a different event")]
    EventIdReused,
    /// A retry of a committed append sent its events in another order: answering it would
    /// pair event i with the version of event j.
    #[error("a retry must send the events in the order of the original append")]
    RetryReordered,
    /// The stream exists under another tenant; callers answer as if it did not exist.
    #[error("stream not found for this tenant")]
    StreamOfOtherTenant,
    /// The tenant's fence in this store is moved: it lives in `moved_to` now.
    #[error("tenant moved to store {moved_to:?}")]
    Fenced { moved_to: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AppendError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::VersionConflict { .. } | Self::EventIdReused | Self::RetryReordered => {
                ErrorKind::Conflict
            }
            Self::StreamOfOtherTenant => ErrorKind::Client,
            // The tenant lives elsewhere now: once routing catches up, the same append lands.
            Self::Fenced { .. } => ErrorKind::Unavailable,
            Self::Store(e) => e.kind(),
        }
    }
}

/// Reads timestamps as stored by either backend or by eventsource-py on SQLite (ISO 8601 with
/// or without offset, `T` or space).
pub(crate) fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, StoreError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M:%S%.f%z"] {
        if let Ok(t) = DateTime::parse_from_str(text, format) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc());
        }
    }
    Err(StoreError::Corrupt(format!(
        "unreadable timestamp {text:?}"
    )))
}

/// The text form timestamps take in SQLite: Python's `datetime.isoformat()` of a UTC time with
/// microseconds, which is what eventsource-py writes.
pub(crate) fn format_timestamp(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_in_every_stored_form() {
        let t = parse_timestamp("2024-01-15T10:30:00.123456+00:00").expect("rfc3339");
        assert_eq!(format_timestamp(&t), "2024-01-15T10:30:00.123456+00:00");
        for text in [
            "2024-01-15T10:30:00.123456Z",
            "2024-01-15 10:30:00.123456+00:00",
            "2024-01-15T10:30:00.123456",
            "2024-01-15 12:30:00.123456+02:00",
        ] {
            assert_eq!(parse_timestamp(text).expect(text), t, "{text}");
        }
        assert!(parse_timestamp("yesterday").is_err());
        // SQLite's datetime('now'), eventsource-py's created_at default.
        assert_eq!(
            parse_timestamp("2024-01-15 10:30:00")
                .map(|t| format_timestamp(&t))
                .ok(),
            Some("2024-01-15T10:30:00.000000+00:00".to_owned())
        );
    }
}
