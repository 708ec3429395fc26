-- Switchyard's additive objects in a SQLite event store (run after the eventsource-py DDL).
-- SQLite serialises writers, so positions are already a safe horizon: no txid column.

CREATE INDEX IF NOT EXISTS idx_switchyard_events_tenant_position
    ON events (tenant_id, global_position);

CREATE TABLE IF NOT EXISTS switchyard_fences (
    tenant_id  TEXT PRIMARY KEY,
    state      TEXT NOT NULL CHECK (state IN ('open', 'moved')),
    epoch      INTEGER NOT NULL DEFAULT 0,
    moved_to   TEXT,
    updated_at TEXT
);

CREATE TABLE IF NOT EXISTS switchyard_schema (
    component  TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    updated_at TEXT NOT NULL DEFAULT (datetime('now'))
);

INSERT INTO switchyard_schema (component, version) VALUES ('store', 1)
ON CONFLICT (component) DO UPDATE SET version = excluded.version, updated_at = datetime('now');
