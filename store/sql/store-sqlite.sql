-- Switchyard's additive objects in a SQLite event store (run after the eventsource-py DDL).
-- SQLite serialises writers, so positions are already a safe horizon: no txid column.

CREATE INDEX IF NOT EXISTS idx_switchyard_events_tenant_position
    ON events (tenant_id, global_position);

-- The fence (see store-postgresql.sql for the states). This script runs only when the recorded
-- version is older than this one, so the table is rebuilt with the current check each time
-- (a store of version 2 has the check without `copiers`, which SQLite cannot alter).
DROP TRIGGER IF EXISTS switchyard_fence;
CREATE TABLE IF NOT EXISTS switchyard_fences (
    tenant_id  TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    epoch      INTEGER NOT NULL DEFAULT 0,
    moved_to   TEXT,
    updated_at TEXT
);
CREATE TABLE switchyard_fences_v3 (
    tenant_id  TEXT PRIMARY KEY,
    state      TEXT NOT NULL CHECK (state IN ('open', 'moved', 'copiers')),
    epoch      INTEGER NOT NULL DEFAULT 0,
    moved_to   TEXT,
    updated_at TEXT
);
INSERT INTO switchyard_fences_v3 (tenant_id, state, epoch, moved_to, updated_at)
SELECT tenant_id, state, epoch, moved_to, updated_at FROM switchyard_fences;
DROP TABLE switchyard_fences;
ALTER TABLE switchyard_fences_v3 RENAME TO switchyard_fences;

-- A copier's pass: SQLite has no session settings, so a copier's write transaction inserts
-- this row first and deletes it before it commits. Writers are serialised, so nobody else
-- ever sees it.
CREATE TABLE IF NOT EXISTS switchyard_copier (
    id INTEGER PRIMARY KEY CHECK (id = 1)
);

CREATE TABLE IF NOT EXISTS switchyard_schema (
    component  TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    updated_at TEXT NOT NULL DEFAULT (datetime('now'))
);

-- The fence for everyone else (invariants 4 and 8): an INSERT into events (an application
-- writing directly, eventsource-py itself) for a tenant whose fence here has moved, or admits
-- copiers only and this is not one, is refused. Appends through Switchyard check the fence
-- themselves, inside the same write transaction.
CREATE TRIGGER switchyard_fence
BEFORE INSERT ON events
FOR EACH ROW
WHEN NEW.tenant_id IS NOT NULL
 AND EXISTS (SELECT 1 FROM switchyard_fences f
              WHERE f.tenant_id = NEW.tenant_id
                AND (f.state = 'moved'
                     OR (f.state = 'copiers'
                         AND NOT EXISTS (SELECT 1 FROM switchyard_copier))))
BEGIN
    SELECT RAISE(ABORT, 'switchyard: tenant has moved to another store; write through the Switchyard proxy or to the new store');
END;

INSERT INTO switchyard_schema (component, version) VALUES ('store', 3)
ON CONFLICT (component) DO UPDATE SET version = excluded.version, updated_at = datetime('now');
