-- Version 3 of the SQLite control schema (issue 19), run after control-sqlite.sql on a database
-- below version 3: see control-postgresql.sql for what `migration_cleanups` holds. The column
-- it adds, `tenant_migrations.finished_at TEXT`, is added by `ensure_sqlite_schema` when
-- missing (SQLite has no ADD COLUMN IF NOT EXISTS): `SQLITE_COLUMNS_V3` in control/mod.rs.

CREATE TABLE IF NOT EXISTS migration_cleanups (
    migration_id  TEXT PRIMARY KEY REFERENCES tenant_migrations (id),
    tenant_id     TEXT NOT NULL,
    store_id      TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('source', 'target')),
    state         TEXT NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done')),
    rows_total    INTEGER NOT NULL,
    rows_deleted  INTEGER NOT NULL DEFAULT 0,
    claimed_by    TEXT,
    claimed_until TEXT,
    started_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at   TEXT
);

INSERT INTO switchyard_schema (component, version) VALUES ('control', 3)
ON CONFLICT (component) DO UPDATE SET version = excluded.version, updated_at = datetime('now');
