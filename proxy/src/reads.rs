//! The data plane's read handlers (DESIGN.md "Data-plane HTTP API", issue 18): a stream read
//! with `from_version`, `to_version` and a direction; a stream's version; one event by id;
//! a category read across the tenant's streams from a timestamp; the tenant feed, optionally
//! filtered by aggregate type; and the tenant's current position. Each read goes to the store
//! the tenant's route names, or the store a moved fence named (`api::read_store`), so reads
//! follow a tenant through a cutover like appends do.

use chrono::{DateTime, Utc};
use http::{Response, StatusCode};
use serde::Serialize;
use switchyard_store::{
    CategoryStart, FeedStart, MigrationError, RoutingState, StreamRange, StreamRef,
};
use uuid::Uuid;

use crate::api::{percent_decode, read_reply, read_store, DEFAULT_READ_LIMIT, MAX_READ_LIMIT};
use crate::error::{json_response, ApiError, Body};
use crate::AppState;

/// A read's query string: `key=value` pairs, values percent-decoded; a key the read does not
/// know is refused (a typo would otherwise silently read everything).
pub(crate) struct Query<'a> {
    pairs: Vec<(&'a str, String)>,
}

impl<'a> Query<'a> {
    pub(crate) fn parse(query: &'a str, known: &[&str]) -> Result<Self, ApiError> {
        let mut pairs = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !known.contains(&key) {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "unknown query parameter {key:?} (expected {})",
                        known.join(", ")
                    ),
                ));
            }
            let value = percent_decode(value).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("{key} is not valid percent-encoded UTF-8"),
                )
            })?;
            pairs.push((key, value));
        }
        Ok(Self { pairs })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A whole number >= 0 that fits `T`.
    pub(crate) fn number<T: TryFrom<i64>>(&self, key: &str) -> Result<Option<T>, ApiError> {
        self.get(key)
            .map(|value| {
                value
                    .parse::<i64>()
                    .ok()
                    .filter(|v| *v >= 0)
                    .and_then(|v| T::try_from(v).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_query",
                            format!("{key} {value:?} is not a whole number >= 0 in range"),
                        )
                    })
            })
            .transpose()
    }

    pub(crate) fn limit(&self) -> Result<u32, ApiError> {
        match self.get("limit") {
            None => Ok(DEFAULT_READ_LIMIT),
            Some(value) => value
                .parse()
                .ok()
                .filter(|v| (1..=MAX_READ_LIMIT).contains(v))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_query",
                        format!("limit {value:?} must be 1 to {MAX_READ_LIMIT}"),
                    )
                }),
        }
    }

    fn text(&self, key: &str, max_bytes: usize) -> Result<Option<&str>, ApiError> {
        match self.get(key) {
            Some(v) if v.is_empty() || v.len() > max_bytes || v.contains('\0') => {
                Err(ApiError::bad_request(
                    "invalid_query",
                    format!("{key} must be 1 to {max_bytes} bytes"),
                ))
            }
            other => Ok(other),
        }
    }

    /// An RFC 3339 timestamp with any offset, as the instant it names.
    fn instant(&self, key: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.get(key)
            .map(|value| {
                DateTime::parse_from_rfc3339(value)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        ApiError::bad_request(
                            "invalid_query",
                            format!("{key} {value:?} is not an RFC 3339 timestamp: {e}"),
                        )
                    })
            })
            .transpose()
    }
}

/// `GET …/streams/{type}/{id}/events?from_version&to_version&direction&limit`.
pub async fn stream(
    state: &AppState,
    stream: StreamRef<'_>,
    query: &str,
) -> Result<Response<Body>, ApiError> {
    let query = Query::parse(query, &["from_version", "to_version", "direction", "limit"])?;
    let from_version = query.number::<i32>("from_version")?.unwrap_or(1).max(1);
    let to_version = query.number::<i32>("to_version")?;
    let backward = match query.get("direction") {
        None | Some("forward") => false,
        Some("backward") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("direction {other:?} must be forward or backward"),
            ))
        }
    };
    let limit = query.limit()?;
    let (store, _slot) = read_store(state, stream.tenant_id).await?;
    let range = StreamRange {
        from_version,
        to_version,
        backward,
        limit,
    };
    let events = store
        .read_stream_range(stream, range)
        .await
        .map_err(|e| ApiError::from_store(store.id(), e))?;
    // Forward: the next page's from_version; backward: its to_version.
    let next = (events.len() == limit as usize)
        .then(|| events.last().map(|e| i64::from(e.version)))
        .flatten()
        .map(|v| if backward { v - 1 } else { v + 1 })
        .filter(|v| {
            *v >= i64::from(from_version) && to_version.is_none_or(|to| *v <= i64::from(to))
        });
    Ok(read_reply(store.id(), &events, next))
}

#[derive(Serialize)]
struct VersionReply<'a> {
    store_id: &'a str,
    version: i32,
}

/// `GET …/streams/{type}/{id}/version`: the stream's version, 0 when it has no events.
pub async fn stream_version(
    state: &AppState,
    stream: StreamRef<'_>,
) -> Result<Response<Body>, ApiError> {
    let (store, _slot) = read_store(state, stream.tenant_id).await?;
    let version = store
        .stream_version(stream)
        .await
        .map_err(|e| ApiError::from_store(store.id(), e))?;
    Ok(json_response(
        StatusCode::OK,
        &VersionReply {
            store_id: store.id(),
            version,
        },
    ))
}

/// `GET /v1/tenants/{t}/events/{event_id}`: the tenant's event with that id, or `null`.
pub async fn event(
    state: &AppState,
    tenant: Uuid,
    event_id: Uuid,
) -> Result<Response<Body>, ApiError> {
    let (store, _slot) = read_store(state, tenant).await?;
    let event = store
        .find_event(tenant, event_id)
        .await
        .map_err(|e| ApiError::from_store(store.id(), e))?;
    let reply = serde_json::json!({
        "store_id": store.id(),
        "event": event.as_ref().map(|e| crate::api::event_json(e, store.id())),
    });
    Ok(json_response(StatusCode::OK, &reply))
}

/// `GET /v1/tenants/{t}/categories/{type}/events?from_timestamp&after_position&limit`.
pub async fn category(
    state: &AppState,
    tenant: Uuid,
    aggregate_type: &str,
    query: &str,
) -> Result<Response<Body>, ApiError> {
    let query = Query::parse(query, &["from_timestamp", "after_position", "limit"])?;
    let start = CategoryStart {
        from: query.instant("from_timestamp")?,
        after_position: query.number::<i64>("after_position")?,
    };
    if start.after_position.is_some() && start.from.is_none() {
        return Err(ApiError::bad_request(
            "invalid_query",
            "after_position needs from_timestamp (both come from a previous page's next)",
        ));
    }
    let limit = query.limit()?;
    let (store, _slot) = read_store(state, tenant).await?;
    let events = store
        .read_category(tenant, aggregate_type, start, limit)
        .await
        .map_err(|e| ApiError::from_store(store.id(), e))?;
    let next = (events.len() == limit as usize)
        .then(|| events.last())
        .flatten()
        .map(|e| {
            serde_json::json!({
                "from_timestamp": e.created_at,
                "after_position": e.global_position,
            })
        });
    let reply = serde_json::json!({
        "store_id": store.id(),
        "events": events.iter().map(|e| crate::api::event_json(e, store.id())).collect::<Vec<_>>(),
        "next": next,
    });
    Ok(json_response(StatusCode::OK, &reply))
}

/// `GET /v1/tenants/{t}/events?after_position&after_store&aggregate_type&limit`: the
/// commit-safe feed (`switchyard_store`'s `read_feed`); `next` is the last event's position.
///
/// `after_store` names the store the cursor's position belongs to (the `store_id` of the
/// reply that gave it). When it is not the store the tenant now reads from, the tenant was
/// migrated since: the cursor is translated through the migrations' position maps in the
/// control database ([`switchyard_store::ControlDb::translate_feed_cursor`]) to the first
/// position the consumer may not have seen, and the feed continues from there — every event
/// it has not seen is delivered, some it has may come again. A cursor no migration of the
/// tenant leads from is 422 `cursor_not_translatable`, never a silent restart.
pub async fn feed(state: &AppState, tenant: Uuid, query: &str) -> Result<Response<Body>, ApiError> {
    let query = Query::parse(
        query,
        &["after_position", "after_store", "aggregate_type", "limit"],
    )?;
    let after = query.number::<i64>("after_position")?.unwrap_or(0);
    let after_store = query.text("after_store", state.config.proxy.max_field_bytes)?;
    let aggregate_type = query.text("aggregate_type", state.config.proxy.max_field_bytes)?;
    let limit = query.limit()?;
    let (store, _slot) = read_store(state, tenant).await?;
    let start = match after_store {
        // Position 0 is the start in every store.
        Some(from) if from != store.id() && after > 0 => {
            FeedStart::From(translate_cursor(state, tenant, from, after, store.id()).await?)
        }
        _ => FeedStart::After(after),
    };
    let events = store
        .read_feed(tenant, start, aggregate_type, limit)
        .await
        .map_err(|e| ApiError::from_store(store.id(), e))?;
    let next = (events.len() == limit as usize)
        .then(|| events.last().map(|e| e.global_position))
        .flatten();
    Ok(read_reply(store.id(), &events, next))
}

/// The first position of `to_store` a feed cursor at `position` of `from_store` may not have
/// seen; 503 when the control database does not answer. No migration of the tenant leading
/// there: 503 `route_stale` (retryable) when the control database routes the tenant
/// elsewhere than `to_store`, or is cutting it over to `from_store` — the cursor came from a
/// proxy that saw the move, this one has not yet (its routing reload is woken) — else 422
/// `cursor_not_translatable`.
async fn translate_cursor(
    state: &AppState,
    tenant: Uuid,
    from_store: &str,
    position: i64,
    to_store: &str,
) -> Result<i64, ApiError> {
    let control_error = |e: MigrationError| match e {
        MigrationError::Store(e) => ApiError::from_store("control", e),
        other => ApiError::Internal(Box::new(other)),
    };
    let translated = state
        .control
        .translate_feed_cursor(tenant, from_store, position, to_store)
        .await
        .map_err(control_error)?;
    let outcome = |name: &str| {
        state
            .metrics
            .feed_cursor_translations
            .with_label_values(&[name])
            .inc();
    };
    if let Some(first) = translated {
        outcome("translated");
        return Ok(first);
    }
    let route = state
        .control
        .route(tenant)
        .await
        .map_err(|e| control_error(MigrationError::Store(e)))?;
    let behind = route.is_some_and(|r| {
        r.store_id != to_store
            || (r.migration_state == RoutingState::CutoverPaused
                && r.target_store_id.as_deref() == Some(from_store))
    });
    if behind {
        outcome("route_stale");
        state.reload_now.notify_one();
        return Err(ApiError::RouteStale);
    }
    outcome("not_translatable");
    Err(ApiError::invalid(
        "cursor_not_translatable",
        format!(
            "the cursor's store {from_store:?} is not one this tenant was migrated from to \
             {to_store:?} (where it now reads): its position {position} cannot be translated; \
             read the feed from the start, or give a cursor of {to_store:?}"
        ),
    ))
}

#[derive(Serialize)]
struct PositionReply<'a> {
    store_id: &'a str,
    position: Option<i64>,
}

/// `GET /v1/tenants/{t}/position`: the global position of the tenant's last event in its
/// current store's feed order (a cursor for the feed), `null` when it has none.
pub async fn position(state: &AppState, tenant: Uuid) -> Result<Response<Body>, ApiError> {
    let (store, _slot) = read_store(state, tenant).await?;
    let position = store
        .feed_position(tenant)
        .await
        .map_err(|e| ApiError::from_store(store.id(), e))?;
    Ok(json_response(
        StatusCode::OK,
        &PositionReply {
            store_id: store.id(),
            position,
        },
    ))
}
