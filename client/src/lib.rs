//! A typed Rust client of Switchyard's HTTP APIs.
//!
//! - [`DataClient`]: the data plane — appends with every kind of [`ExpectedVersion`], stream
//!   reads ([`StreamQuery`]), a stream's version, an event by id, a category read, the tenant
//!   feed and its position — each answering a typed reply or a [`ClientError`] whose
//!   [`ApiError`] carries the API's `{error, message, retryable}` as [`ErrorCode`],
//!   [`ErrorKind`], status and message.
//! - [`AdminClient`]: a proxy's admin port — readiness, routes, metrics, reload.
//! - [`Load`] / [`LoadWriter`]: the one retrying, idempotent load writer the demo, the tests
//!   and the benchmarks use.
//!
//! Everything goes through one pooled [`Transport`] (hyper, HTTP/1.1 or h2c); clones share it.
//!
//! ```no_run
//! use serde_json::json;
//! use switchyard_client::{DataClient, ErrorCode, ExpectedVersion, NewEvent, StreamId};
//! use uuid::Uuid;
//!
//! # async fn app() -> Result<(), switchyard_client::ClientError> {
//! let proxy = DataClient::new("http://127.0.0.1:7070");
//! let order = StreamId::new(Uuid::new_v4(), "Order", Uuid::new_v4());
//! let placed = NewEvent::new("OrderPlaced", json!({ "total": 12 }));
//! let appended = proxy.append(&order, ExpectedVersion::NoStream, &[placed]).await?;
//! // The same append again meets the version it expected moved on: a typed 409.
//! let again = NewEvent::new("OrderPlaced", json!({ "total": 12 }));
//! let refused = proxy.append(&order, ExpectedVersion::NoStream, &[again]).await;
//! assert_eq!(refused.unwrap_err().code(), Some(&ErrorCode::VersionConflict));
//! println!("at version {} on {}", appended.last_version, appended.store_id);
//! # Ok(()) }
//! ```

/// The README's examples, compiled as doc-tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeExamples;

mod admin;
mod data;
mod error;
mod load;
mod transport;

pub use admin::{
    metric_by_label, metric_sum, AdminClient, Readiness, Route, RouteDetail, RouteList,
    RoutingState, StoreHealth,
};
pub use data::{
    percent_encode, Appended, CategoryCursor, CategoryPage, CategoryQuery, DataClient, Direction,
    EventLookup, EventPage, ExpectedVersion, FeedQuery, NewEvent, StoredEvent, StreamId,
    StreamQuery, StreamVersion, TenantPosition,
};
pub use error::{ApiError, ClientError, ErrorCode, ErrorKind};
pub use load::{
    Ack, Attempt, EventMaker, Failure, Load, LoadCounters, LoadPlan, LoadReport, LoadWriter, Pacing,
};
pub use transport::{Protocol, RawReply, Transport};
