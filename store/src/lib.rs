//! Everything of Switchyard that touches a database.
//!
//! Event stores (the eventsource-py `events` table on PostgreSQL or SQLite) with append, reads
//! and schema; and the control database (routing, migrations, audit). Every SQL string of the
//! project lives in this crate; nothing here knows about HTTP. The configuration both programs
//! share is `switchyard-config`'s: callers hand this crate database URLs and pool sizes, and it
//! takes from that crate only the URL types and the TLS rule its pools follow.

pub mod checkpoints;
pub mod control;
mod dialect;
pub mod error;
pub mod event;
pub mod events;
pub mod provision;
pub mod url;

pub use control::{
    AuditEntry, AuditNote, CleanupRecord, CleanupRole, CleanupState, ControlDb, MigrationError,
    MigrationRecord, MigrationState, NewMigration, RouteRecord, RouteUpdate, RoutingState,
};
pub use error::{ErrorKind, StoreError};
pub use event::{AppendError, Appended, NewEvent, StoredEvent, StreamRef};
pub use events::{
    fence_token, CategoryStart, Digesting, Divergence, EventStore, FeedStart, FenceLock,
    FenceState, Landing, OlderWriter, PassWindow, SchemaStatus, StreamDigest, StreamKey,
    StreamRange, FENCE_MARGIN,
};
