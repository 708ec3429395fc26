-- The control database on SQLite (the embedded default). Idempotent. Routing changes are
-- polled: SQLite has no NOTIFY.

CREATE TABLE IF NOT EXISTS switchyard_routing_epoch (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    epoch     INTEGER NOT NULL
);
INSERT INTO switchyard_routing_epoch (singleton, epoch) VALUES (1, 0) ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS tenant_routing (
    tenant_id           TEXT PRIMARY KEY,
    store_id            TEXT NOT NULL,
    migration_state     TEXT NOT NULL DEFAULT 'normal'
                        CHECK (migration_state IN ('normal', 'bulk_copy', 'dual_write', 'cutover_paused')),
    target_store_id     TEXT,
    active_migration_id TEXT,
    epoch               INTEGER NOT NULL,
    updated_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS idx_tenant_routing_epoch ON tenant_routing (epoch);

CREATE TABLE IF NOT EXISTS switchyard_schema (
    component  TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    updated_at TEXT NOT NULL DEFAULT (datetime('now'))
);
INSERT INTO switchyard_schema (component, version) VALUES ('control', 1)
ON CONFLICT (component) DO UPDATE SET version = excluded.version, updated_at = datetime('now');
