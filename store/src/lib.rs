//! Everything of Switchyard that touches a database.
//!
//! Event stores (the eventsource-py `events` table on PostgreSQL or SQLite) with append, reads
//! and schema; the control database (routing now, migrations later); and the configuration both
//! programs share. Every SQL string of the project lives in this crate; nothing here knows
//! about HTTP.

pub mod checkpoints;
pub mod config;
pub mod control;
mod dialect;
pub mod error;
pub mod event;
pub mod events;
pub mod provision;
pub mod tls;
pub mod url;

pub use config::Config;
pub use control::{
    AuditEntry, AuditNote, ControlDb, MigrationError, MigrationRecord, MigrationState,
    NewMigration, RouteRecord, RouteUpdate, RoutingState,
};
pub use error::{ErrorKind, StoreError};
pub use event::{AppendError, Appended, NewEvent, StoredEvent, StreamRef};
pub use events::{
    Digesting, Divergence, EventStore, FenceLock, Landing, OlderWriter, PassWindow, SchemaStatus,
    StreamDigest, StreamKey, FENCE_MARGIN,
};
