//! The data plane (docs/openapi/data-plane.yaml): appends with every kind of expected version,
//! stream reads forward or backward between versions, a stream's version, an event by id, a
//! category's events by time, the tenant's feed (all of it or one aggregate type) and its
//! position. Every call answers a typed reply or a [`ClientError`].

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use uuid::Uuid;

use crate::error::ClientError;
use crate::transport::Transport;

/// What a stream must be before an append; a mismatch is 409 `version_conflict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpectedVersion {
    /// Append at whatever version the stream has (`"any"`).
    #[default]
    Any,
    /// The stream has no events (`"no_stream"`, the same as `Exact(0)`).
    NoStream,
    /// The stream has at least one event (`"stream_exists"`).
    StreamExists,
    /// The stream is exactly at this version (0 = no events).
    Exact(u64),
}

impl Serialize for ExpectedVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Any => s.serialize_str("any"),
            Self::NoStream => s.serialize_str("no_stream"),
            Self::StreamExists => s.serialize_str("stream_exists"),
            Self::Exact(n) => s.serialize_u64(*n),
        }
    }
}

/// An event to append. Its id makes retries idempotent: an append sent again with the same
/// ids is answered as the first one was once it committed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewEvent {
    /// The event's id (a fresh v4 from [`NewEvent::new`]).
    pub event_id: Uuid,
    /// Its type, 1 to 255 bytes.
    pub event_type: String,
    /// A JSON object.
    pub payload: Value,
    /// Who caused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    /// When it happened; the store's clock when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<DateTime<Utc>>,
}

impl NewEvent {
    /// An event of `event_type` with `payload` and a fresh id.
    pub fn new(event_type: impl Into<String>, payload: Value) -> Self {
        Self {
            event_id: Uuid::new_v4(),
            event_type: event_type.into(),
            payload,
            actor_id: None,
            timestamp: None,
        }
    }

    /// The same event with `actor_id`.
    #[must_use]
    pub fn with_actor(mut self, actor_id: impl Into<String>) -> Self {
        self.actor_id = Some(actor_id.into());
        self
    }
}

/// One stream: a tenant's aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamId {
    /// The tenant.
    pub tenant: Uuid,
    /// The aggregate type (the stream's category).
    pub aggregate_type: String,
    /// The aggregate.
    pub aggregate_id: Uuid,
}

impl StreamId {
    /// The stream `aggregate_type`/`aggregate_id` of `tenant`.
    pub fn new(tenant: Uuid, aggregate_type: impl Into<String>, aggregate_id: Uuid) -> Self {
        Self {
            tenant,
            aggregate_type: aggregate_type.into(),
            aggregate_id,
        }
    }
}

/// An acknowledged append.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Appended {
    /// The store that committed it.
    pub store_id: String,
    /// The first event's version.
    pub first_version: i64,
    /// The last event's version (the stream's version after the append).
    pub last_version: i64,
    /// Each event's global position in that store.
    pub global_positions: Vec<i64>,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StoredEvent {
    /// Its position in the store's global order.
    pub global_position: i64,
    /// Its id.
    pub event_id: Uuid,
    /// Its stream's aggregate type.
    pub aggregate_type: String,
    /// Its stream's aggregate id.
    pub aggregate_id: Uuid,
    /// Its tenant.
    pub tenant_id: Option<Uuid>,
    /// Its type.
    pub event_type: String,
    /// Its version in its stream, from 1.
    pub version: i64,
    /// Who caused it.
    pub actor_id: Option<String>,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// The payload object.
    pub payload: Value,
    /// The store it was read from.
    pub store_id: String,
    /// When the store persisted it (kept by a migration).
    pub stored_at: DateTime<Utc>,
}

/// A page of a stream read or of the tenant feed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventPage {
    /// The store that served it.
    pub store_id: String,
    /// The events.
    pub events: Vec<StoredEvent>,
    /// Where the next page starts (`from_version` forward, `to_version` backward,
    /// `after_position` in the feed); `None` on the last page.
    pub next: Option<i64>,
}

/// A stream's version.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StreamVersion {
    /// The store that answered.
    pub store_id: String,
    /// The stream's event count (0 for an unknown stream).
    pub version: i64,
}

/// The answer to an event lookup.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventLookup {
    /// The store that answered.
    pub store_id: String,
    /// The tenant's event with the id, if it has one.
    pub event: Option<StoredEvent>,
}

/// Where a category read's next page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct CategoryCursor {
    /// Events persisted at or after this instant…
    pub from_timestamp: DateTime<Utc>,
    /// …and, persisted exactly at it, past this global position.
    pub after_position: i64,
}

/// A page of a category read.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CategoryPage {
    /// The store that served it.
    pub store_id: String,
    /// The events, by persistence time.
    pub events: Vec<StoredEvent>,
    /// The next page's cursor; `None` on the last page.
    pub next: Option<CategoryCursor>,
}

/// The tenant's position.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TenantPosition {
    /// The store whose positions it is.
    pub store_id: String,
    /// The global position of the tenant's last event; `None` without events.
    pub position: Option<i64>,
}

/// The order of a stream read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// Oldest first.
    #[default]
    Forward,
    /// Newest first (`limit` then takes the newest).
    Backward,
}

/// What part of a stream to read; the default is all of it (up to 1000 events), forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamQuery {
    /// The lowest version (inclusive).
    pub from_version: Option<u64>,
    /// The highest version (inclusive).
    pub to_version: Option<u64>,
    /// Forward or backward.
    pub direction: Direction,
    /// At most this many events (1 to 10000).
    pub limit: Option<u32>,
}

/// What part of the tenant feed to read; the default is from the start (up to 1000 events).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FeedQuery {
    /// Events after this global position.
    pub after_position: Option<i64>,
    /// The store `after_position` belongs to (the `store_id` of the page that gave it): when
    /// the tenant has since been migrated elsewhere, the proxy translates the cursor to its
    /// current store (never skipping an event; some near the cursor may come again). Without
    /// it the position is taken as one of the tenant's current store.
    pub after_store: Option<String>,
    /// Only events of this aggregate type.
    pub aggregate_type: Option<String>,
    /// At most this many events.
    pub limit: Option<u32>,
}

impl FeedQuery {
    /// This query continued after `page` (its `next`, a position of the store that served
    /// it), or `None` when `page` was the last.
    #[must_use]
    pub fn continued_after(&self, page: &EventPage) -> Option<Self> {
        page.next.map(|next| Self {
            after_position: Some(next),
            after_store: Some(page.store_id.clone()),
            ..self.clone()
        })
    }
}

/// What part of a category to read; the default is from its first event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CategoryQuery {
    /// Events persisted at or after this instant.
    pub from_timestamp: Option<DateTime<Utc>>,
    /// With `from_timestamp`, those persisted exactly at it only past this position.
    pub after_position: Option<i64>,
    /// At most this many events.
    pub limit: Option<u32>,
}

impl CategoryQuery {
    /// The query of the page after `cursor`.
    pub fn after(cursor: CategoryCursor, limit: Option<u32>) -> Self {
        Self {
            from_timestamp: Some(cursor.from_timestamp),
            after_position: Some(cursor.after_position),
            limit,
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (a path segment or a
/// query value).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string of the pairs that are set (`?a=1&b=2`, or empty).
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let set: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", percent_encode(v))))
        .collect();
    if set.is_empty() {
        String::new()
    } else {
        format!("?{}", set.join("&"))
    }
}

/// The body of an append.
#[derive(Serialize)]
struct AppendBody<'a> {
    expected_version: ExpectedVersion,
    events: &'a [NewEvent],
}

/// The data-plane calls against one proxy (its data URL, e.g. `http://127.0.0.1:7070`).
///
/// ```no_run
/// use serde_json::json;
/// use switchyard_client::{DataClient, ExpectedVersion, NewEvent, StreamId, StreamQuery};
/// use uuid::Uuid;
///
/// # async fn demo() -> Result<(), switchyard_client::ClientError> {
/// let client = DataClient::new("http://127.0.0.1:7070");
/// let order = StreamId::new(Uuid::new_v4(), "Order", Uuid::new_v4());
/// let created = NewEvent::new("OrderCreated", json!({ "total": 12 }));
/// client.append(&order, ExpectedVersion::NoStream, &[created]).await?;
/// let page = client.read_stream(&order, &StreamQuery::default()).await?;
/// assert_eq!(page.events.len(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DataClient {
    transport: Transport,
    base: Arc<str>,
}

impl DataClient {
    /// A client of the proxy at `base` over HTTP/1.1.
    pub fn new(base: &str) -> Self {
        Self::with_transport(Transport::default(), base)
    }

    /// A client of the proxy at `base` sharing `transport`'s pool, protocol and token.
    pub fn with_transport(transport: Transport, base: &str) -> Self {
        Self {
            transport,
            base: Arc::from(base.trim_end_matches('/')),
        }
    }

    /// The proxy's data URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The transport the calls go through.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The URL of a stream's events.
    pub fn stream_url(&self, stream: &StreamId) -> String {
        format!(
            "{}/v1/tenants/{}/streams/{}/{}/events",
            self.base,
            stream.tenant,
            percent_encode(&stream.aggregate_type),
            stream.aggregate_id
        )
    }

    /// The URL of a tenant's feed.
    pub fn feed_url(&self, tenant: Uuid) -> String {
        format!("{}/v1/tenants/{tenant}/events", self.base)
    }

    /// Appends `events` to `stream` if it is at `expected` (201).
    pub async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Appended, ClientError> {
        let url = self.stream_url(stream);
        let body = AppendBody {
            expected_version: expected,
            events,
        };
        self.transport
            .post_json(&url, &body)
            .await?
            .expect(StatusCode::CREATED, &url)
    }

    /// Reads a stream in version order.
    pub async fn read_stream(
        &self,
        stream: &StreamId,
        q: &StreamQuery,
    ) -> Result<EventPage, ClientError> {
        let direction = match q.direction {
            Direction::Forward => None,
            Direction::Backward => Some("backward".to_owned()),
        };
        let url = format!(
            "{}{}",
            self.stream_url(stream),
            query(&[
                ("from_version", q.from_version.map(|v| v.to_string())),
                ("to_version", q.to_version.map(|v| v.to_string())),
                ("direction", direction),
                ("limit", q.limit.map(|v| v.to_string())),
            ])
        );
        self.get(&url).await
    }

    /// A stream's current version.
    pub async fn stream_version(&self, stream: &StreamId) -> Result<StreamVersion, ClientError> {
        let url = format!(
            "{}/v1/tenants/{}/streams/{}/{}/version",
            self.base,
            stream.tenant,
            percent_encode(&stream.aggregate_type),
            stream.aggregate_id
        );
        self.get(&url).await
    }

    /// The tenant's event with id `event_id`, if it has one.
    pub async fn lookup_event(
        &self,
        tenant: Uuid,
        event_id: Uuid,
    ) -> Result<EventLookup, ClientError> {
        let url = format!("{}/v1/tenants/{tenant}/events/{event_id}", self.base);
        self.get(&url).await
    }

    /// The tenant's events of `aggregate_type` across its streams, by persistence time.
    pub async fn read_category(
        &self,
        tenant: Uuid,
        aggregate_type: &str,
        q: &CategoryQuery,
    ) -> Result<CategoryPage, ClientError> {
        let url = format!(
            "{}/v1/tenants/{tenant}/categories/{}/events{}",
            self.base,
            percent_encode(aggregate_type),
            query(&[
                (
                    "from_timestamp",
                    q.from_timestamp
                        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
                ),
                ("after_position", q.after_position.map(|v| v.to_string())),
                ("limit", q.limit.map(|v| v.to_string())),
            ])
        );
        self.get(&url).await
    }

    /// The tenant's events in its store's global order.
    pub async fn read_feed(&self, tenant: Uuid, q: &FeedQuery) -> Result<EventPage, ClientError> {
        let url = format!(
            "{}{}",
            self.feed_url(tenant),
            query(&[
                ("after_position", q.after_position.map(|v| v.to_string())),
                ("after_store", q.after_store.clone()),
                ("aggregate_type", q.aggregate_type.clone()),
                ("limit", q.limit.map(|v| v.to_string())),
            ])
        );
        self.get(&url).await
    }

    /// The global position of the tenant's last event.
    pub async fn position(&self, tenant: Uuid) -> Result<TenantPosition, ClientError> {
        let url = format!("{}/v1/tenants/{tenant}/position", self.base);
        self.get(&url).await
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, ClientError> {
        self.transport.get(url).await?.expect(StatusCode::OK, url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expected_versions_are_sent_as_the_api_spells_them() {
        let spelled: Vec<Value> = [
            ExpectedVersion::Any,
            ExpectedVersion::NoStream,
            ExpectedVersion::StreamExists,
            ExpectedVersion::Exact(7),
        ]
        .iter()
        .map(|v| serde_json::to_value(v).expect("serialises"))
        .collect();
        assert_eq!(
            spelled,
            [
                json!("any"),
                json!("no_stream"),
                json!("stream_exists"),
                json!(7)
            ]
        );
    }

    #[test]
    fn paths_and_queries_are_percent_encoded() {
        let client = DataClient::new("http://proxy/");
        let t = Uuid::nil();
        let url = client.stream_url(&StreamId::new(t, "Ord er/ü", t));
        assert!(url.starts_with("http://proxy/v1/tenants/"), "{url}");
        assert!(url.contains("/streams/Ord%20er%2F%C3%BC/"), "{url}");
        assert_eq!(
            query(&[
                ("a", Some("1+2".into())),
                ("b", None),
                ("c", Some("x".into()))
            ]),
            "?a=1%2B2&c=x"
        );
        assert_eq!(query(&[("a", None)]), "");
    }

    #[test]
    fn a_continued_feed_query_carries_the_pages_store_with_its_next() {
        let query = FeedQuery {
            aggregate_type: Some("Order".into()),
            limit: Some(2),
            ..FeedQuery::default()
        };
        let page = |next| EventPage {
            store_id: "dedicated".into(),
            events: Vec::new(),
            next,
        };
        let next = query.continued_after(&page(Some(9))).expect("a next page");
        assert_eq!(next.after_position, Some(9));
        assert_eq!(next.after_store.as_deref(), Some("dedicated"));
        assert_eq!(
            (next.aggregate_type, next.limit),
            (query.aggregate_type.clone(), Some(2))
        );
        assert_eq!(query.continued_after(&page(None)), None);
    }

    #[test]
    fn a_new_event_leaves_out_what_it_does_not_set() {
        let e = NewEvent::new("Done", json!({"a": 1}));
        let v = serde_json::to_value(&e).expect("serialises");
        assert_eq!(v["event_type"], "Done");
        assert!(v.get("actor_id").is_none() && v.get("timestamp").is_none());
        let v = serde_json::to_value(e.with_actor("me")).expect("serialises");
        assert_eq!(v["actor_id"], "me");
    }
}
