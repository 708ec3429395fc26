//! The data-plane API (DESIGN.md "Data-plane HTTP API"): path routing, request decoding and
//! validation, and the append handler (the reads are in `crate::reads`).

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use switchyard_store::{AppendError, EventStore, NewEvent, RoutingState, StoredEvent, StreamRef};
use uuid::Uuid;

use crate::error::{json_response, ApiError, Body};
use crate::gate::{self, Until};
use crate::mirror::MirrorJob;
use crate::routing::{Moved, Route, StoreIdx, UNKNOWN_STORE};
use crate::AppState;

/// Largest `limit` a read may ask for.
pub const MAX_READ_LIMIT: u32 = 10_000;
pub(crate) const DEFAULT_READ_LIMIT: u32 = 1000;
/// How many moved fences one append meets (each a hop to the store it names, or a re-route
/// after a routing reload) before it gives up with 503 `writes_paused`.
const MAX_REROUTES: usize = 3;

/// A parsed data-plane path.
#[derive(Debug, PartialEq, Eq)]
pub enum Endpoint {
    Stream {
        tenant: Uuid,
        aggregate_type: String,
        aggregate_id: Uuid,
    },
    Feed {
        tenant: Uuid,
    },
    /// `…/streams/{type}/{id}/version`
    StreamVersion {
        tenant: Uuid,
        aggregate_type: String,
        aggregate_id: Uuid,
    },
    /// `/v1/tenants/{t}/events/{event_id}`
    Event {
        tenant: Uuid,
        event_id: Uuid,
    },
    /// `/v1/tenants/{t}/categories/{type}/events`
    Category {
        tenant: Uuid,
        aggregate_type: String,
    },
    /// `/v1/tenants/{t}/position`
    Position {
        tenant: Uuid,
    },
}

impl Endpoint {
    /// The metric label of a request (bounded).
    pub fn operation(method: &Method, path: &str) -> &'static str {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, segments.len(), segments.last().copied()) {
            (&Method::POST, 7, _) => "append",
            (&Method::GET, 7, Some("version")) => "stream_version",
            (&Method::GET, 7, _) => "read_stream",
            (&Method::GET, 4, Some("position")) => "position",
            (&Method::GET, 4, _) => "read_feed",
            (&Method::GET, 5, _) => "lookup_event",
            (&Method::GET, 6, _) => "read_category",
            _ => "other",
        }
    }

    /// The tenant in the path.
    pub fn tenant(&self) -> Uuid {
        match self {
            Self::Stream { tenant, .. }
            | Self::Feed { tenant }
            | Self::StreamVersion { tenant, .. }
            | Self::Event { tenant, .. }
            | Self::Category { tenant, .. }
            | Self::Position { tenant } => *tenant,
        }
    }

    /// Parses `/v1/tenants/{t}/streams/{type}/{id}/events`, `…/{id}/version`,
    /// `/v1/tenants/{t}/events[/{event_id}]`, `/v1/tenants/{t}/categories/{type}/events` and
    /// `/v1/tenants/{t}/position`.
    pub fn parse(path: &str, max_field_bytes: usize) -> Result<Option<Self>, ApiError> {
        let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        match segments.as_slice() {
            ["v1", "tenants", tenant, "streams", aggregate_type, aggregate_id, last @ ("events" | "version")] =>
            {
                let tenant = parse_id(tenant, "tenant_id")?;
                let aggregate_type = parse_type(aggregate_type, max_field_bytes)?;
                let aggregate_id = parse_id(aggregate_id, "aggregate_id")?;
                Ok(Some(if *last == "events" {
                    Self::Stream {
                        tenant,
                        aggregate_type,
                        aggregate_id,
                    }
                } else {
                    Self::StreamVersion {
                        tenant,
                        aggregate_type,
                        aggregate_id,
                    }
                }))
            }
            ["v1", "tenants", tenant, "events"] => Ok(Some(Self::Feed {
                tenant: parse_id(tenant, "tenant_id")?,
            })),
            ["v1", "tenants", tenant, "events", event_id] => Ok(Some(Self::Event {
                tenant: parse_id(tenant, "tenant_id")?,
                event_id: parse_id(event_id, "event_id")?,
            })),
            ["v1", "tenants", tenant, "categories", aggregate_type, "events"] => {
                Ok(Some(Self::Category {
                    tenant: parse_id(tenant, "tenant_id")?,
                    aggregate_type: parse_type(aggregate_type, max_field_bytes)?,
                }))
            }
            ["v1", "tenants", tenant, "position"] => Ok(Some(Self::Position {
                tenant: parse_id(tenant, "tenant_id")?,
            })),
            _ => Ok(None),
        }
    }
}

/// An `aggregate_type` path segment: percent-decoded, 1 to `max_field_bytes` bytes, no NUL.
fn parse_type(segment: &str, max_field_bytes: usize) -> Result<String, ApiError> {
    let aggregate_type = percent_decode(segment).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_path",
            "aggregate_type is not valid percent-encoded UTF-8",
        )
    })?;
    if aggregate_type.is_empty() || aggregate_type.len() > max_field_bytes {
        return Err(ApiError::invalid(
            "invalid_event",
            format!("aggregate_type must be 1 to {max_field_bytes} bytes"),
        ));
    }
    if aggregate_type.contains('\0') {
        return Err(ApiError::invalid(
            "invalid_event",
            "aggregate_type contains a NUL character",
        ));
    }
    Ok(aggregate_type)
}

fn parse_id(text: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request("invalid_id", format!("{what} {text:?} is not a UUID")))
}

pub(crate) fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Two hex digits and nothing else: `from_str_radix` alone also takes a sign, so
            // `%+41` decoded as 0x04 then `1`, a second spelling of another stream's type.
            let hex = segment.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The append body as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendBody {
    #[serde(default)]
    pub expected_version: Option<ExpectedVersion>,
    pub events: Vec<EventBody>,
}

/// `expected_version` as sent: a number (exactly that version; 0 for a stream without
/// events), `null` or `"any"`, `"no_stream"` (version 0) or `"stream_exists"` (1 or more).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ExpectedVersion {
    Exact(i64),
    Kind(ExpectedKind),
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedKind {
    Any,
    NoStream,
    StreamExists,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBody {
    #[serde(default)]
    pub event_id: Option<Uuid>,
    pub event_type: String,
    pub payload: Box<RawValue>,
    #[serde(default)]
    pub actor_id: Option<String>,
    #[serde(default)]
    pub timestamp: Option<String>,
}

/// Limits that decoding enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_events: usize,
    pub max_field_bytes: usize,
}

/// A decoded, validated append.
#[derive(Debug)]
pub struct AppendCommand {
    pub expected_version: Option<i32>,
    /// `expected_version: "stream_exists"`: the stream must hold an event already (then
    /// `expected_version` is `None`).
    pub stream_exists: bool,
    pub events: Vec<NewEvent>,
    /// Whether some event came without an `event_id` (one was generated here): then a failure
    /// that may have committed must not be called retryable.
    pub generated_ids: bool,
}

/// Decodes and validates an append body: 400 for what is not the right JSON, 422 for events
/// that are well-formed but not acceptable.
pub fn decode_append(body: &[u8], limits: Limits) -> Result<AppendCommand, ApiError> {
    let parsed: AppendBody = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::bad_request("malformed_json", format!("body is not valid JSON: {e}"))
        } else {
            ApiError::bad_request(
                "invalid_body",
                format!("body does not match the append schema: {e}"),
            )
        }
    })?;
    let stream_exists = matches!(
        parsed.expected_version,
        Some(ExpectedVersion::Kind(ExpectedKind::StreamExists))
    );
    let expected_version = match parsed.expected_version {
        None | Some(ExpectedVersion::Kind(ExpectedKind::Any | ExpectedKind::StreamExists)) => None,
        Some(ExpectedVersion::Kind(ExpectedKind::NoStream)) => Some(0),
        Some(ExpectedVersion::Exact(v)) => {
            Some(i32::try_from(v).ok().filter(|v| *v >= 0).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_body",
                    format!("expected_version {v} must be between 0 and {}", i32::MAX),
                )
            })?)
        }
    };
    if parsed.events.is_empty() {
        return Err(ApiError::invalid(
            "empty_append",
            "events must hold at least one event",
        ));
    }
    if parsed.events.len() > limits.max_events {
        return Err(ApiError::invalid(
            "too_many_events",
            format!(
                "{} events in one append; the limit is {}",
                parsed.events.len(),
                limits.max_events
            ),
        ));
    }
    let mut seen = HashSet::with_capacity(parsed.events.len());
    let mut events = Vec::with_capacity(parsed.events.len());
    let mut generated_ids = false;
    for (i, event) in parsed.events.into_iter().enumerate() {
        let field = |name: &str, value: &str, required: bool| -> Result<(), ApiError> {
            if (required && value.is_empty()) || value.len() > limits.max_field_bytes {
                return Err(ApiError::invalid(
                    "invalid_event",
                    format!(
                        "events[{i}].{name} must be 1 to {} bytes",
                        limits.max_field_bytes
                    ),
                ));
            }
            if value.contains('\0') {
                return Err(ApiError::invalid(
                    "invalid_event",
                    format!("events[{i}].{name} contains a NUL character"),
                ));
            }
            Ok(())
        };
        field("event_type", &event.event_type, true)?;
        if let Some(actor) = &event.actor_id {
            field("actor_id", actor, false)?;
        }
        if !event.payload.get().trim_start().starts_with('{') {
            return Err(ApiError::invalid(
                "invalid_event",
                format!("events[{i}].payload must be a JSON object"),
            ));
        }
        // Only what every store can hold (PostgreSQL's jsonb refuses some valid JSON), so the
        // tenant's events can later move to any store.
        // (The path's root is added only on a refusal: no allocation per accepted event.)
        crate::payload::check(event.payload.get(), "").map_err(|mut e| {
            e.path.insert_str(0, &format!("events[{i}].payload"));
            ApiError::from(e)
        })?;
        let timestamp = event
            .timestamp
            .as_deref()
            .map(|t| {
                DateTime::parse_from_rfc3339(t)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        ApiError::invalid(
                            "invalid_event",
                            format!("events[{i}].timestamp {t:?} is not RFC 3339: {e}"),
                        )
                    })
            })
            .transpose()?;
        generated_ids |= event.event_id.is_none();
        let event_id = event.event_id.unwrap_or_else(Uuid::now_v7);
        if !seen.insert(event_id) {
            return Err(ApiError::invalid(
                "duplicate_event_id",
                format!("event_id {event_id} appears twice in this append"),
            ));
        }
        events.push(NewEvent::new(
            event_id,
            event.event_type,
            event.payload,
            event.actor_id,
            timestamp,
        ));
    }
    Ok(AppendCommand {
        expected_version,
        stream_exists,
        events,
        generated_ids,
    })
}

/// [`decode_append`] with the properties every answer must have, for the fuzz target and the
/// property tests: panics when one is broken. A refusal is 400, 413 or 422 (never a 5xx); an
/// accepted append has 1 to `max_events` events with distinct ids, each `event_type` 1 to
/// `max_field_bytes` bytes, an `actor_id` within the limit, no NUL in any field, a JSON-object
/// payload that every store can hold (no `\u0000`, no lone surrogate, nested at most
/// [`crate::payload::MAX_DEPTH`] levels: it parses as a `serde_json::Value` unless one of its
/// numbers is beyond `f64`), and a non-negative expected version.
pub fn check_decode_append(body: &[u8], limits: Limits) {
    match decode_append(body, limits) {
        Err(e) => {
            let status = e.into_response().status().as_u16();
            assert!(
                matches!(status, 400 | 413 | 422),
                "decoding answered {status}"
            );
        }
        Ok(command) => {
            assert!(command.expected_version.is_none_or(|v| v >= 0));
            assert!(!command.events.is_empty() && command.events.len() <= limits.max_events);
            let mut ids = HashSet::new();
            for event in &command.events {
                assert!(ids.insert(event.event_id), "duplicate event id accepted");
                let ty = &event.event_type;
                assert!(!ty.is_empty() && ty.len() <= limits.max_field_bytes && !ty.contains('\0'));
                if let Some(actor) = &event.actor_id {
                    assert!(actor.len() <= limits.max_field_bytes && !actor.contains('\0'));
                }
                assert!(
                    event.payload.get().trim_start().starts_with('{'),
                    "payload is an object"
                );
                match serde_json::from_str::<serde_json::Value>(event.payload.get()) {
                    Ok(payload) => {
                        assert!(payload.is_object(), "payload is an object");
                        assert!(!has_nul(&payload), "payload holds U+0000");
                        assert!(
                            depth(&payload) <= crate::payload::MAX_DEPTH,
                            "payload too deep"
                        );
                    }
                    // Only a number past f64 (PostgreSQL's numeric holds it) may fail here.
                    Err(e) => assert!(
                        e.to_string().contains("number out of range"),
                        "accepted payload does not parse: {e}"
                    ),
                }
            }
        }
    }
}

/// [`Endpoint::parse`] and the read query parser on an arbitrary path and query, with the
/// properties every answer must have, for the fuzz target `parse_path` and the property tests:
/// panics when one is broken. A refusal is 400 or 422; a stream path's `aggregate_type` is its
/// segment percent-decoded by RFC 3986 (`%` and two hex digits, nothing else), 1 to
/// `max_field_bytes` bytes without NUL, and its ids are the segments' UUIDs; an accepted query
/// has a start >= 0 and a limit of 1 to [`MAX_READ_LIMIT`].
#[doc(hidden)]
pub fn check_parse_request(path: &str, query: &str, max_field_bytes: usize) {
    let _ = Endpoint::operation(&Method::GET, path);
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    match Endpoint::parse(path, max_field_bytes) {
        Err(e) => {
            let status = e.into_response().status().as_u16();
            assert!(
                matches!(status, 400 | 422),
                "parsing {path:?} answered {status}"
            );
        }
        Ok(None) => {}
        Ok(Some(
            Endpoint::Feed { tenant }
            | Endpoint::Position { tenant }
            | Endpoint::Event { tenant, .. }
            | Endpoint::Category { tenant, .. },
        )) => {
            assert_eq!(Uuid::parse_str(segments[2]).ok(), Some(tenant));
        }
        Ok(Some(
            Endpoint::Stream {
                tenant,
                aggregate_type,
                aggregate_id,
            }
            | Endpoint::StreamVersion {
                tenant,
                aggregate_type,
                aggregate_id,
            },
        )) => {
            assert_eq!(segments.len(), 7, "{path:?}");
            assert_eq!(Uuid::parse_str(segments[2]).ok(), Some(tenant));
            assert_eq!(Uuid::parse_str(segments[5]).ok(), Some(aggregate_id));
            assert_eq!(
                rfc3986_decode(segments[4]).as_deref(),
                Some(aggregate_type.as_str()),
                "{path:?}"
            );
            assert!(!aggregate_type.is_empty() && aggregate_type.len() <= max_field_bytes);
            assert!(!aggregate_type.contains('\0'));
        }
    }
    for start_name in ["from_version", "after_position"] {
        match read_params(query, start_name) {
            Err(e) => {
                let status = e.into_response().status().as_u16();
                assert_eq!(status, 400, "query {query:?} answered {status}");
            }
            Ok((start, limit)) => {
                assert!(start >= 0, "{query:?}");
                assert!((1..=MAX_READ_LIMIT).contains(&limit), "{query:?}");
            }
        }
    }
}

/// The oracle's percent-decoding, written from RFC 3986 rather than shared with the parser.
fn rfc3986_decode(segment: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut bytes = segment.bytes();
    while let Some(byte) = bytes.next() {
        if byte == b'%' {
            let high = char::from(bytes.next()?).to_digit(16)?;
            let low = char::from(bytes.next()?).to_digit(16)?;
            out.push(u8::try_from(high * 16 + low).ok()?);
        } else {
            out.push(byte);
        }
    }
    String::from_utf8(out).ok()
}

fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

#[derive(Debug, Serialize)]
struct AppendReply<'a> {
    store_id: &'a str,
    first_version: i32,
    last_version: i32,
    global_positions: &'a [i64],
}

#[derive(Debug, Serialize)]
struct EventReply<'a> {
    #[serde(flatten)]
    event: &'a StoredEvent,
    store_id: &'a str,
    /// When the store persisted the event (`created_at`, kept across a migration).
    stored_at: DateTime<Utc>,
}

/// One event as every read answers it.
pub(crate) fn event_json(event: &StoredEvent, store_id: &str) -> serde_json::Value {
    serde_json::to_value(EventReply {
        event,
        store_id,
        stored_at: event.created_at,
    })
    .unwrap_or_default()
}

#[derive(Debug, Serialize)]
struct ReadReply<'a> {
    store_id: &'a str,
    events: Vec<EventReply<'a>>,
    /// Where the next page starts: the next version (streams) or position (feed).
    next: Option<i64>,
}

/// Set by an append whose event ids were (partly) generated here, for the server's request
/// timeout, which answers after this handler is gone: a timed-out append of that kind may have
/// committed and is not safe to retry as is (see [`ApiError::of_append`]).
#[derive(Debug, Clone, Default)]
pub struct UnconfirmedOnTimeout(pub Arc<std::sync::atomic::AtomicBool>);

/// Handles one data-plane request; every failure is already a reply.
pub async fn handle(
    state: Arc<AppState>,
    request: Request<hyper::body::Incoming>,
) -> Response<Body> {
    match route(&state, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn route(
    state: &AppState,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    // Before anything else, so a caller without a token learns nothing, not even which
    // paths exist.
    let grant = state
        .data_tokens
        .as_ref()
        .map(|tokens| tokens.authenticate(request.headers()))
        .transpose()?;
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let Some(endpoint) = Endpoint::parse(&path, state.config.proxy.max_field_bytes)? else {
        return Err(ApiError::NotFound {
            method: method.to_string(),
            path,
        });
    };
    if let Some(grant) = &grant {
        grant.check(endpoint.tenant())?;
    }
    let query = request.uri().query().unwrap_or("").to_owned();
    match (endpoint, method) {
        (
            Endpoint::Stream {
                tenant,
                aggregate_type,
                aggregate_id,
            },
            Method::POST,
        ) => {
            let unconfirmed_on_timeout =
                request.extensions().get::<UnconfirmedOnTimeout>().cloned();
            let body = read_body(state, request).await?;
            let command = decode_append(
                &body,
                Limits {
                    max_events: state.config.proxy.max_events_per_append,
                    max_field_bytes: state.config.proxy.max_field_bytes,
                },
            )?;
            let stream = StreamRef {
                tenant_id: tenant,
                aggregate_type: &aggregate_type,
                aggregate_id,
            };
            // A guard, not inc/dec around the call: a request cancelled mid-append (client
            // gone, deadline passed) drops this future and must still leave the gauge.
            let _in_flight = InFlight::enter(&state.metrics.appends_in_flight);
            let generated_ids = command.generated_ids;
            if let (true, Some(marker)) = (generated_ids, unconfirmed_on_timeout) {
                marker.0.store(true, std::sync::atomic::Ordering::Release);
            }
            append(state, stream, command)
                .await
                .map_err(|e| e.of_append(generated_ids))
        }
        (
            Endpoint::Stream {
                tenant,
                aggregate_type,
                aggregate_id,
            },
            Method::GET,
        ) => {
            let stream = StreamRef {
                tenant_id: tenant,
                aggregate_type: &aggregate_type,
                aggregate_id,
            };
            crate::reads::stream(state, stream, &query).await
        }
        (
            Endpoint::StreamVersion {
                tenant,
                aggregate_type,
                aggregate_id,
            },
            Method::GET,
        ) => {
            let stream = StreamRef {
                tenant_id: tenant,
                aggregate_type: &aggregate_type,
                aggregate_id,
            };
            crate::reads::stream_version(state, stream).await
        }
        (Endpoint::Feed { tenant }, Method::GET) => crate::reads::feed(state, tenant, &query).await,
        (Endpoint::Event { tenant, event_id }, Method::GET) => {
            crate::reads::event(state, tenant, event_id).await
        }
        (
            Endpoint::Category {
                tenant,
                aggregate_type,
            },
            Method::GET,
        ) => crate::reads::category(state, tenant, &aggregate_type, &query).await,
        (Endpoint::Position { tenant }, Method::GET) => crate::reads::position(state, tenant).await,
        (Endpoint::Stream { .. }, method) => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: "GET, POST",
        }),
        (
            Endpoint::Feed { .. }
            | Endpoint::StreamVersion { .. }
            | Endpoint::Event { .. }
            | Endpoint::Category { .. }
            | Endpoint::Position { .. },
            method,
        ) => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: "GET",
        }),
    }
}

/// Holds one unit of a gauge from creation until drop.
#[derive(Debug)]
pub struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    pub fn enter(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Holds a request until the proxy's first routing table is loaded (up to the gate wait), then
/// 503 `routing_not_loaded`. Before that load the empty table sends every tenant to the default
/// store: a proxy just (re)started would write a migrated tenant's events into the store it
/// left — accepted there if a later migration back has reopened its fence — and read from the
/// wrong store.
async fn routes_loaded(state: &AppState) -> Result<(), ApiError> {
    let limit = state.config.proxy.gate_wait;
    if state.routes.is_loaded() || state.routes.wait_loaded(limit).await {
        Ok(())
    } else {
        Err(ApiError::RoutingNotLoaded)
    }
}

/// The store a read of `tenant` goes to: its route's, unless an append through this proxy met
/// the tenant's fence moved off that store before routing said so (the control database out
/// of reach, a reload still to come): then the store the fence named, which holds everything
/// the source held when the fence moved and every append since, or 503 `route_stale` when
/// this proxy has not configured it. Never the source it left, which is stale.
pub(crate) async fn read_store(
    state: &AppState,
    tenant: Uuid,
) -> Result<(&EventStore, Option<tokio::sync::OwnedSemaphorePermit>), ApiError> {
    routes_loaded(state).await?;
    let route = *state.routes.load().get(&tenant);
    let slot = state.fairness.request_slot(&route)?;
    let store = match state.routes.moved_to(&tenant, &route) {
        None => state.store(route.store),
        Some(UNKNOWN_STORE) => Err(ApiError::RouteStale),
        Some(to) => state.store(to),
    }?;
    Ok((store, slot))
}

/// Appends along the tenant's route: waits at a closed gate, and follows a moved fence, so the
/// client sees only latency. While the route is migrating the append holds a request slot of
/// the migrating tenants' share (also at the gate) and, around the store call, one of their
/// share of the store's connections (`crate::fairness`).
///
/// A source fence that answers "moved to the route's migration target" (a store this proxy
/// has) sends the append there at once, and on along that store's own moved fence to any
/// store this proxy has, at most [`MAX_REROUTES`] hops: a fence moves only once its target
/// holds every event of the tenant, and a committed move only goes forward (the recoverer and
/// the emergency stop finish such a cutover on the target), so the store the fence names is
/// authoritative whether or not routing says so yet — a proxy that cannot reach the control
/// database keeps the tenant writable. The move is noted beside the table
/// ([`crate::routing::Routes::note_moved`]): the tenant's next appends and reads go there
/// directly (one atomic load while no move is known), past a `cutover_paused` gate of the same
/// move. An append that followed a fence is never mirrored: it is on the authoritative store.
/// The target's fence opens to writers only after the source's moved (never both open), so a
/// followed store may still send the append back, naming the store it came from: the append
/// then goes back and forth with a short backoff ([`TargetOpening`], bounded by the gate's
/// limit) until one of the two takes it. Any other moved fence (to a store this proxy lacks, or not the route's target) reloads
/// routing and waits for a newer open route.
async fn append(
    state: &AppState,
    stream: StreamRef<'_>,
    mut command: AppendCommand,
) -> Result<Response<Body>, ApiError> {
    routes_loaded(state).await?;
    let tenant = stream.tenant_id;
    let mut route: Route = *state.routes.load().get(&tenant);
    let mut reroutes = 0;
    // Taken on the first migrating route this append sees, kept to the end.
    let mut slot = None;
    // The store a moved fence named, when the append follows it rather than its route.
    let mut follow = followed_store(state, tenant, &route);
    // The store the append followed a moved fence from (see `opening` below).
    let mut followed_from = follow.map(|_| route.store);
    // Set once a followed store's fence sent the append back to the store it came from (the
    // cutover opens the target right after the source's fence moved): bounds the retries.
    let mut opening: Option<TargetOpening> = None;
    loop {
        if slot.is_none() {
            slot = state.fairness.request_slot(&route)?;
        }
        if follow.is_none() && route.state == RoutingState::CutoverPaused {
            route = gate::wait(state, tenant, Until::Open).await?;
            follow = followed_store(state, tenant, &route);
        }
        let to = follow.unwrap_or(route.store);
        let store = state.store(to)?;
        let connection = state.fairness.connection(&route, to).await?;
        let appended = if command.stream_exists {
            store.append_to_existing(stream, &command.events).await
        } else {
            store
                .append(stream, command.expected_version, &command.events)
                .await
        };
        drop(connection);
        match appended {
            Ok(appended) => {
                if follow.is_some() {
                    state.metrics.appends_followed.inc();
                } else {
                    // This store's fence is open: a move noted earlier was undone.
                    state.routes.forget_moved(&tenant, route.store);
                }
                let reply = json_response(
                    StatusCode::CREATED,
                    &AppendReply {
                        store_id: store.id(),
                        first_version: appended.first_version,
                        last_version: appended.last_version,
                        global_positions: &appended.global_positions,
                    },
                );
                // The reply is settled before the mirror sees the events; queueing never waits.
                // Dual write mirrors to the migration's target; a normal route with a target
                // is reverse replication: the store the tenant left, kept current (a copier).
                if let (None, RoutingState::DualWrite | RoutingState::Normal, Some(target)) =
                    (follow, route.state, route.target)
                {
                    let events = std::mem::take(&mut command.events);
                    state.mirror.enqueue(
                        target,
                        MirrorJob::from_append(route.store, stream, events, &appended),
                    );
                }
                return Ok(reply);
            }
            Err(AppendError::Fenced { moved_to }) => {
                state.metrics.fence_rejections.inc();
                let next = state.store_index(&moved_to);
                if follow == Some(to) && next.is_some() && next == followed_from {
                    // The store a moved fence named sends the append back where it came from.
                    // Either the cutover moved that fence and opens this one right after (this
                    // one admits copiers only until then), or the tenant moved back since the
                    // note this proxy followed. After a short wait the append goes back; the
                    // store that is open takes it, and the two fences are never both open.
                    let waiting = opening.get_or_insert_with(|| {
                        TargetOpening::new(
                            tokio::time::Instant::now() + state.config.proxy.gate_wait,
                        )
                    });
                    if waiting.wait().await {
                        (follow, followed_from) = (next, Some(to));
                        continue;
                    }
                    tracing::warn!(tenant.id = %tenant, store.id = store.id(), %moved_to,
                        "the store a moved fence named did not open to writers in time");
                    return Err(ApiError::WritesPaused { retry_after_s: 1 });
                }
                // The first hop only to the route's own migration target; later hops along the
                // fences of stores this proxy has.
                let expected = next.is_some() && (follow.is_some() || next == route.target);
                // Reads follow the fence from now on, whether or not routing can be reloaded.
                state.routes.note_moved(
                    tenant,
                    Moved {
                        from: route.store,
                        to: next.unwrap_or(UNKNOWN_STORE),
                        epoch: route.epoch,
                    },
                );
                reroutes += 1;
                if reroutes > MAX_REROUTES {
                    return Err(ApiError::WritesPaused { retry_after_s: 1 });
                }
                if expected {
                    tracing::info!(tenant.id = %tenant, store.id = store.id(), %moved_to,
                        "fence moved; following it with the append");
                    // Routing catches up in the background (the append does not wait for it).
                    state.reload_now.notify_one();
                    followed_from = Some(to);
                    follow = next;
                    continue;
                }
                tracing::info!(tenant.id = %tenant, store.id = store.id(), %moved_to,
                    "fence moved; reloading routing and re-routing the append");
                let _ = crate::watcher::reload(state, "fence").await;
                route = gate::wait(state, tenant, Until::OpenAfter { epoch: route.epoch }).await?;
                follow = followed_store(state, tenant, &route);
                followed_from = follow.map(|_| route.store);
            }
            Err(other) => return Err(ApiError::from_append(store.id(), other)),
        }
    }
}

/// An append's retries between the store a moved fence named and the store it came from, until
/// the cutover opens the first to writers (it does so right after the source's fence moved):
/// a backoff from 2 ms doubling up to 50 ms, until `until` (the gate's limit).
struct TargetOpening {
    until: tokio::time::Instant,
    backoff: std::time::Duration,
}

impl TargetOpening {
    fn new(until: tokio::time::Instant) -> Self {
        Self {
            until,
            backoff: std::time::Duration::from_millis(2),
        }
    }

    /// Sleeps before the next try; false when the limit is reached (no try left).
    async fn wait(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now >= self.until {
            return false;
        }
        tokio::time::sleep(self.backoff.min(self.until - now)).await;
        self.backoff = (self.backoff * 2).min(std::time::Duration::from_millis(50));
        true
    }
}

/// Where a moved fence this proxy met sends `tenant`'s appends instead of `route`'s store (the
/// same note its reads follow), when this proxy has that store.
fn followed_store(state: &AppState, tenant: Uuid, route: &Route) -> Option<StoreIdx> {
    state
        .routes
        .moved_to(&tenant, route)
        .filter(|&to| to != UNKNOWN_STORE)
}

pub(crate) fn read_reply(
    store_id: &str,
    events: &[StoredEvent],
    next: Option<i64>,
) -> Response<Body> {
    let reply = ReadReply {
        store_id,
        events: events
            .iter()
            .map(|event| EventReply {
                event,
                store_id,
                stored_at: event.created_at,
            })
            .collect(),
        next,
    };
    json_response(StatusCode::OK, &reply)
}

/// Parses `{start_name}=N&limit=M`; unknown parameters are an error (a typo would otherwise
/// silently read from the start).
fn read_params(query: &str, start_name: &str) -> Result<(i64, u32), ApiError> {
    let query = crate::reads::Query::parse(query, &[start_name, "limit"])?;
    Ok((
        query.number::<i64>(start_name)?.unwrap_or(0),
        query.limit()?,
    ))
}

/// Reads the body under the size limit and the body read timeout: a declared length over the
/// limit is refused before reading.
async fn read_body(
    state: &AppState,
    request: Request<hyper::body::Incoming>,
) -> Result<Bytes, ApiError> {
    let limit = state.config.proxy.max_body_bytes;
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let timeout = state.config.proxy.body_read_timeout;
    let collecting = Limited::new(request.into_body(), limit).collect();
    let Ok(collected) = tokio::time::timeout(timeout, collecting).await else {
        return Err(ApiError::BodyTimeout(
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        ));
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Err(e) => Err(ApiError::bad_request(
            "body_read_failed",
            format!("reading the body failed: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_events: 3,
        max_field_bytes: 16,
    };

    fn code(e: ApiError) -> (u16, String) {
        let response = e.into_response();
        let status = response.status().as_u16();
        (status, format!("{response:?}"))
    }

    /// A proxy that noted the tenant's fence moved from its default store to the other one
    /// (SQLite stores): both fences admit copiers only, each naming the other, as between a
    /// cutover's move and its opening of the target. Returns (app, tenant, from, to).
    async fn between_move_and_open(
        gate_wait: std::time::Duration,
    ) -> anyhow::Result<(crate::testing::TestApp, Uuid, StoreIdx, StoreIdx)> {
        let test = crate::testing::TestApp::start(|c| c.proxy.gate_wait = gate_wait).await?;
        let state = Arc::clone(test.state());
        let from = state.default_store;
        let to = (0..StoreIdx::try_from(state.stores.len())?)
            .find(|&i| i != from)
            .expect("the default config has two stores");
        state
            .routes
            .store(crate::routing::RoutingTable::empty(from));
        let tenant = Uuid::new_v4();
        let (source, target) = (state.store(from)?, state.store(to)?);
        source.admit_copiers_only(tenant, 1, target.id()).await?;
        target.admit_copiers_only(tenant, 1, source.id()).await?;
        state
            .routes
            .note_moved(tenant, Moved { from, to, epoch: 0 });
        Ok((test, tenant, from, to))
    }

    /// How many events of `stream` store `idx` holds.
    async fn events_in(
        state: &AppState,
        idx: StoreIdx,
        stream: StreamRef<'_>,
    ) -> anyhow::Result<usize> {
        Ok(state.store(idx)?.read_stream(stream, 1, 10).await?.len())
    }

    fn one_event() -> anyhow::Result<AppendCommand> {
        Ok(AppendCommand {
            expected_version: Some(0),
            stream_exists: false,
            events: vec![NewEvent::new(
                Uuid::new_v4(),
                "Placed",
                RawValue::from_string("{}".to_owned())?,
                None,
                None,
            )],
            generated_ids: false,
        })
    }

    /// Issue 19: the target's fence opens only after the source's moved. An append that
    /// follows the moved fence meanwhile is sent back by the target (copiers only, naming the
    /// source) and by the source again; it waits with a short backoff instead of failing, and
    /// lands in the target once the target opens (in it only).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_following_a_moved_fence_waits_until_the_target_opens() -> anyhow::Result<()>
    {
        let (test, tenant, from, to) =
            between_move_and_open(std::time::Duration::from_secs(10)).await?;
        let state = Arc::clone(test.state());
        let opener = {
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                state.store(to)?.open_fence(tenant, 2).await?;
                anyhow::Ok(())
            })
        };
        let aggregate_id = Uuid::new_v4();
        let stream = StreamRef {
            tenant_id: tenant,
            aggregate_type: "Order",
            aggregate_id,
        };
        let reply = append(&state, stream, one_event()?).await;
        opener.await??;
        let reply = reply.map_err(|e| anyhow::anyhow!("{:?}", code(e)))?;
        assert_eq!(reply.status(), StatusCode::CREATED);
        assert_eq!(events_in(&state, to, stream).await?, 1);
        assert_eq!(events_in(&state, from, stream).await?, 0);
        Ok(())
    }

    /// The wait is bounded by the gate's limit: a target that never opens gives the client
    /// 503 `writes_paused` (retry later), and nothing lands anywhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_following_a_moved_fence_gives_up_at_the_gate_limit() -> anyhow::Result<()> {
        let (test, tenant, from, to) =
            between_move_and_open(std::time::Duration::from_millis(200)).await?;
        let state = Arc::clone(test.state());
        let stream = StreamRef {
            tenant_id: tenant,
            aggregate_type: "Order",
            aggregate_id: Uuid::new_v4(),
        };
        match append(&state, stream, one_event()?).await {
            Err(e @ ApiError::WritesPaused { .. }) => {
                assert_eq!(code(e).0, 503);
            }
            Err(e) => panic!("expected writes_paused, got {:?}", code(e)),
            Ok(reply) => panic!("the append landed: {}", reply.status()),
        }
        for idx in [from, to] {
            assert_eq!(events_in(&state, idx, stream).await?, 0);
        }
        Ok(())
    }

    #[test]
    fn paths_parse_and_reject() {
        let t = Uuid::new_v4();
        let a = Uuid::new_v4();
        assert_eq!(
            Endpoint::parse(
                &format!("/v1/tenants/{t}/streams/Order%20Line/{a}/events"),
                64
            )
            .ok()
            .flatten(),
            Some(Endpoint::Stream {
                tenant: t,
                aggregate_type: "Order Line".into(),
                aggregate_id: a
            })
        );
        assert_eq!(
            Endpoint::parse(&format!("/v1/tenants/{t}/events"), 64)
                .ok()
                .flatten(),
            Some(Endpoint::Feed { tenant: t })
        );
        assert!(matches!(Endpoint::parse("/v2/x", 64), Ok(None)));
        for escape in ["%+41", "%-1", "%4", "%4g"] {
            assert!(
                matches!(
                    Endpoint::parse(&format!("/v1/tenants/{t}/streams/A{escape}/{a}/events"), 64),
                    Err(ApiError::BadRequest { .. })
                ),
                "{escape}"
            );
        }
        assert!(matches!(
            Endpoint::parse("/v1/tenants/nope/events", 64),
            Err(ApiError::BadRequest { .. })
        ));
        assert!(matches!(
            Endpoint::parse(
                &format!("/v1/tenants/{t}/streams/{}/{a}/events", "x".repeat(65)),
                64
            ),
            Err(ApiError::Invalid { .. })
        ));
    }

    #[test]
    fn decoding_sorts_errors_into_400_and_422() {
        let cases: &[(&str, u16)] = &[
            ("{", 400),
            ("[]", 400),
            (
                r#"{"events":[{"event_type":"A","payload":{}}],"extra":1}"#,
                400,
            ),
            (
                r#"{"events":[{"event_id":"nope","event_type":"A","payload":{}}]}"#,
                400,
            ),
            (
                r#"{"expected_version":-1,"events":[{"event_type":"A","payload":{}}]}"#,
                400,
            ),
            (r#"{"events":[]}"#, 422),
            (
                r#"{"events":[{"event_type":"A","payload":{}},{"event_type":"A","payload":{}},{"event_type":"A","payload":{}},{"event_type":"A","payload":{}}]}"#,
                422,
            ),
            (r#"{"events":[{"event_type":"","payload":{}}]}"#, 422),
            (
                r#"{"events":[{"event_type":"AAAAAAAAAAAAAAAAA","payload":{}}]}"#,
                422,
            ),
            (r#"{"events":[{"event_type":"A","payload":[1]}]}"#, 422),
            (
                r#"{"events":[{"event_type":"A","payload":{"x":"\u0000"}}]}"#,
                422,
            ),
            (
                r#"{"events":[{"event_type":"A","payload":{"x":"\ud800"}}]}"#,
                422,
            ),
            (
                r#"{"events":[{"event_type":"A","payload":{"x":1e999999}}]}"#,
                422,
            ),
            (
                r#"{"events":[{"event_type":"A","payload":{},"timestamp":"yesterday"}]}"#,
                422,
            ),
            (
                r#"{"events":[{"event_id":"0190a6e0-0000-7000-8000-000000000001","event_type":"A","payload":{}},{"event_id":"0190a6e0-0000-7000-8000-000000000001","event_type":"A","payload":{}}]}"#,
                422,
            ),
        ];
        for (body, status) in cases {
            let err = decode_append(body.as_bytes(), LIMITS).expect_err(body);
            assert_eq!(code(err).0, *status, "{body}");
        }
        let ok = decode_append(
            br#"{"expected_version":null,"events":[{"event_type":"A","payload":{"a":1},"actor_id":"me","timestamp":"2024-01-15T10:30:00.1234567Z"}]}"#,
            LIMITS,
        )
        .expect("valid");
        assert_eq!(ok.expected_version, None);
        assert_eq!(
            ok.events[0].timestamp.map(|t| t.timestamp_subsec_nanos()),
            Some(123_456_000)
        );
    }

    #[test]
    fn read_params_validate() {
        assert_eq!(
            read_params("", "from_version").ok(),
            Some((0, DEFAULT_READ_LIMIT))
        );
        assert_eq!(
            read_params("from_version=5&limit=2", "from_version").ok(),
            Some((5, 2))
        );
        for bad in [
            "limit=0",
            "limit=100001",
            "from_version=-1",
            "from_version=x",
            "colour=red",
        ] {
            assert!(read_params(bad, "from_version").is_err(), "{bad}");
        }
    }

    proptest! {
        /// Decoding never panics, whatever the bytes.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_append(&bytes, LIMITS);
        }

        /// Every valid event list decodes with its ids kept and its count intact.
        #[test]
        fn valid_events_decode(n in 1usize..=3, ty in "[A-Za-z]{1,16}") {
            let events: Vec<String> = (0..n).map(|_| format!(r#"{{"event_id":"{}","event_type":"{ty}","payload":{{"k":1}}}}"#, Uuid::new_v4())).collect();
            let body = format!(r#"{{"events":[{}]}}"#, events.join(","));
            let decoded = decode_append(body.as_bytes(), LIMITS).expect("valid");
            prop_assert_eq!(decoded.events.len(), n);
        }
    }
}
