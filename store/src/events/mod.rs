//! An event store: one database holding an eventsource-py `events` table, on PostgreSQL or
//! SQLite. Append (with optimistic concurrency and idempotent retries), stream reads, tenant
//! reads (the whole tenant in position order here, the commit-safe feed in `feed.rs`), and the
//! store's schema.

mod cleanup;
mod copy;
mod feed;
mod fence;
mod postgres;
mod reads;
mod sqlite;
mod verify;

pub use copy::{fence_token, pg_insert_copied_from, Divergence, Landing, PassWindow};
pub use feed::FeedStart;
pub use fence::{FenceLock, FenceState, OlderWriter, FENCE_MARGIN};
pub use reads::{CategoryStart, StreamRange};
pub use verify::{canonical_json, json_equal, Digesting, StreamDigest, StreamKey};

use std::sync::Arc;

use uuid::Uuid;

use crate::dialect::{on_backend, AsBackend, Backend};
use crate::event::{AppendError, Appended, NewEvent, StoreError, StoredEvent, StreamRef};
use crate::url::Planning;

/// How many times an append that lost a race for its stream's next version is retried before
/// the conflict is reported. Only `expected_version = null` appends can keep losing.
const MAX_RACE_RETRIES: usize = 16;

/// One try of an append: a lost race is retried by the caller, anything else is final.
enum Attempt {
    LostRace { actual: i32 },
    Failed(AppendError),
}

impl From<StoreError> for Attempt {
    fn from(e: StoreError) -> Self {
        Self::Failed(AppendError::Store(e))
    }
}

impl From<sqlx::Error> for Attempt {
    fn from(e: sqlx::Error) -> Self {
        Self::Failed(AppendError::Store(e.into()))
    }
}

/// A connected event store. Cheap to clone (pools are shared).
#[derive(Clone, Debug)]
pub struct EventStore {
    id: Arc<str>,
    backend: Backend,
}

impl AsBackend for EventStore {
    fn as_backend(&self) -> &Backend {
        &self.backend
    }
}

/// What `stores check` reports about a store's schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaStatus {
    /// No `events` table: `init` will create it.
    Empty,
    /// An `events` table without Switchyard's objects (a store eventsource-py made): run `init`.
    NeedsInit,
    /// Ready for Switchyard.
    Ready,
}

impl EventStore {
    /// Opens a lazily connecting pool on `url`, for the data plane (appends and reads; a
    /// proxy's mirror too): sessions keep PostgreSQL's plan caching ([`Planning::Cached`]).
    pub fn connect(id: &str, url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::connect_planning(id, url, max_connections, Planning::Cached)
    }

    /// Opens a lazily connecting pool on `url` for the control plane (copies, tails,
    /// verification, cutovers): every statement planned for the store as it is when it runs
    /// ([`Planning::EachRun`]).
    pub fn connect_copier(id: &str, url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::connect_planning(id, url, max_connections, Planning::EachRun)
    }

    fn connect_planning(
        id: &str,
        url: &str,
        max_connections: u32,
        planning: Planning,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            id: Arc::from(id),
            backend: Backend::connect(url, max_connections, planning)?,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Connections the pool opens at most (a SQLite pool's size is capped below the config's).
    pub fn max_connections(&self) -> u32 {
        on_backend!(self, |pool, _d| pool.options().get_max_connections())
    }

    /// Whether this is an embedded (SQLite) store, whose schema programs create on start.
    pub fn is_embedded(&self) -> bool {
        self.backend.is_sqlite()
    }

    /// `postgres` or `sqlite`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Postgres(_) => "postgres",
            Backend::Sqlite(_) => "sqlite",
        }
    }

    /// Creates the store's schema or adds what Switchyard needs to an existing one. Idempotent,
    /// safe to run concurrently, never rewrites the `events` table.
    pub async fn ensure_schema(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => postgres::ensure_schema(pool).await,
            Backend::Sqlite(pool) => sqlite::ensure_schema(pool).await,
        }
    }

    pub async fn schema_status(&self) -> Result<SchemaStatus, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => postgres::schema_status(pool).await,
            Backend::Sqlite(pool) => sqlite::schema_status(pool).await,
        }
    }

    /// One cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.backend.ping().await
    }

    /// Appends `events` to the stream as one unit. With `expected_version` the stream must be
    /// at exactly that version; `None` appends at whatever the version is. A retry of an
    /// append that already committed (same event ids, same stream, same content) answers the
    /// original result.
    #[tracing::instrument(level = "debug", skip_all, fields(store.id = %self.id, stream.id = %stream.aggregate_id, events = events.len()))]
    pub async fn append(
        &self,
        stream: StreamRef<'_>,
        expected_version: Option<i32>,
        events: &[NewEvent],
    ) -> Result<Appended, AppendError> {
        let mut attempt = 0;
        loop {
            let result = match &self.backend {
                Backend::Postgres(pool) => {
                    postgres::append(pool, stream, expected_version, events).await
                }
                Backend::Sqlite(pool) => {
                    sqlite::append(pool, stream, expected_version, events).await
                }
            };
            match result {
                Err(Attempt::LostRace { actual }) => {
                    attempt += 1;
                    if attempt >= MAX_RACE_RETRIES {
                        return Err(AppendError::VersionConflict {
                            expected: expected_version,
                            actual,
                        });
                    }
                }
                Err(Attempt::Failed(e)) => return Err(e),
                Ok(appended) => return Ok(appended),
            }
        }
    }

    /// The stream's events from `from_version` on, at most `limit`, in version order. Events of
    /// the same stream id under another tenant are not returned.
    pub async fn read_stream(
        &self,
        stream: StreamRef<'_>,
        from_version: i32,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                postgres::read_stream(pool, stream, from_version, limit).await
            }
            Backend::Sqlite(pool) => sqlite::read_stream(pool, stream, from_version, limit).await,
        }
    }

    /// The tenant's committed events after `after_position`, at most `limit`, in global
    /// position order: a scan of what the store holds now, not a feed to follow (on PostgreSQL
    /// a later commit may land below a position read; see [`EventStore::read_feed`]).
    pub async fn read_tenant(
        &self,
        tenant_id: Uuid,
        after_position: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                postgres::read_tenant(pool, tenant_id, after_position, limit).await
            }
            Backend::Sqlite(pool) => {
                sqlite::read_tenant(pool, tenant_id, after_position, limit).await
            }
        }
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.backend.close().await;
    }
}
