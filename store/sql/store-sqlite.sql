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

-- The fence for everyone else (invariant 4): an INSERT into events (an application writing
-- directly, eventsource-py itself) for a tenant whose fence here has moved is refused. Appends
-- through Switchyard check the fence themselves, inside the same write transaction.
CREATE TRIGGER IF NOT EXISTS switchyard_fence
BEFORE INSERT ON events
FOR EACH ROW
WHEN NEW.tenant_id IS NOT NULL
 AND EXISTS (SELECT 1 FROM switchyard_fences f
              WHERE f.tenant_id = NEW.tenant_id AND f.state = 'moved')
BEGIN
    SELECT RAISE(ABORT, 'switchyard: tenant has moved to another store; write through the Switchyard proxy or to the new store');
END;

INSERT INTO switchyard_schema (component, version) VALUES ('store', 2)
ON CONFLICT (component) DO UPDATE SET version = excluded.version, updated_at = datetime('now');
