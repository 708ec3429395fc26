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
INSERT INTO switchyard_schema (component, version) VALUES ('control', 2)
ON CONFLICT (component) DO UPDATE SET version = excluded.version, updated_at = datetime('now');

-- Migrations; see control-postgresql.sql for what each column holds. UUIDs and timestamps are
-- TEXT (timestamps as '%Y-%m-%dT%H:%M:%fZ', so they compare as text); horizons hold
-- global_positions (SQLite serialises writers, so positions are already a stable horizon).
CREATE TABLE IF NOT EXISTS tenant_migrations (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    source_store_id TEXT NOT NULL,
    target_store_id TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'bulk_copy', 'dual_write', 'cutover', 'migrated',
                                     'paused', 'failed', 'rolled_back')),
    paused_from     TEXT CHECK (paused_from IN ('bulk_copy', 'dual_write')),
    events_total    INTEGER NOT NULL DEFAULT 0,
    events_copied   INTEGER NOT NULL DEFAULT 0,
    copy_horizon    INTEGER,
    copy_position   INTEGER,
    tail_horizon    INTEGER,
    tail_position   INTEGER,
    error_message   TEXT,
    config          TEXT NOT NULL DEFAULT '{}',
    revision        INTEGER NOT NULL DEFAULT 0,
    claimed_by      TEXT,
    claimed_until   TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at      TEXT,
    completed_at    TEXT,
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CHECK ((state = 'paused') = (paused_from IS NOT NULL)),
    CHECK (source_store_id <> target_store_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS tenant_migrations_one_active ON tenant_migrations (tenant_id)
    WHERE state NOT IN ('migrated', 'failed', 'rolled_back');
CREATE INDEX IF NOT EXISTS tenant_migrations_by_tenant ON tenant_migrations (tenant_id, created_at);

CREATE TABLE IF NOT EXISTS migration_audit_log (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id TEXT NOT NULL REFERENCES tenant_migrations (id),
    tenant_id    TEXT NOT NULL,
    at           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    actor        TEXT NOT NULL,
    action       TEXT NOT NULL,
    from_state   TEXT,
    to_state     TEXT,
    reason       TEXT,
    details      TEXT
);
CREATE INDEX IF NOT EXISTS migration_audit_log_by_migration ON migration_audit_log (migration_id, id);
CREATE INDEX IF NOT EXISTS migration_audit_log_by_tenant ON migration_audit_log (tenant_id, id);

CREATE TABLE IF NOT EXISTS migration_position_map (
    migration_id    TEXT NOT NULL,
    source_position INTEGER NOT NULL,
    target_position INTEGER NOT NULL,
    event_id        TEXT NOT NULL,
    PRIMARY KEY (migration_id, source_position)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS proxies (
    proxy_id      TEXT PRIMARY KEY,
    admin_url     TEXT NOT NULL,
    routing_epoch INTEGER NOT NULL,
    last_seen     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    details       TEXT
);

-- Settings every process must agree on (issue 14 item 12), by name. `default_store`: the store
-- of every tenant without a `tenant_routing` row. `init` records the config's value when none
-- is recorded; `routing set-default` changes it (refused while a tenant without a row has a
-- migration that is not over, and bumping the routing epoch so proxies reload); a process whose
-- config names another default refuses to start.
CREATE TABLE IF NOT EXISTS switchyard_settings (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
