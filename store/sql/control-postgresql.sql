-- The control database on PostgreSQL (see DESIGN.md "Control database"). Idempotent.

-- One row: the routing epoch. Every routing change increments it in its own transaction, so
-- changes commit in epoch order and a reader that has seen epoch E finds every later change
-- with `epoch > E`.
CREATE TABLE IF NOT EXISTS switchyard_routing_epoch (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    epoch     BIGINT NOT NULL
);
INSERT INTO switchyard_routing_epoch (singleton, epoch) VALUES (TRUE, 0) ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS tenant_routing (
    tenant_id           UUID PRIMARY KEY,
    store_id            TEXT NOT NULL,
    migration_state     TEXT NOT NULL DEFAULT 'normal'
                        CHECK (migration_state IN ('normal', 'bulk_copy', 'dual_write', 'cutover_paused')),
    target_store_id     TEXT,
    active_migration_id UUID,
    epoch               BIGINT NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_tenant_routing_epoch ON tenant_routing (epoch);

CREATE TABLE IF NOT EXISTS switchyard_schema (
    component  TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
INSERT INTO switchyard_schema (component, version) VALUES ('control', 3)
ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, updated_at = NOW();

-- Migrations (DESIGN.md "Migration lifecycle"). `state` changes only by a compare-and-set on its
-- current value, each change with its row in migration_audit_log. `revision` counts every change
-- of the row (state, progress, error) so a watcher can tell that something moved.
--
-- Horizons are BIGINT. On PostgreSQL `copy_horizon` and `tail_horizon` hold transaction-id
-- watermarks: an xid8 from `pg_snapshot_xmin(pg_current_snapshot())` (epoch << 32 | xid, always
-- below 2^63, so it fits a BIGINT unchanged). The bulk copy takes the tenant's rows with
-- `txid < copy_horizon` (or NULL txid); the tail has copied every row with
-- `txid < tail_horizon`. On SQLite, whose writers are serialised, both hold a global_position.
-- `copy_position` and `tail_position` are the checkpoint inside a pass: the last source
-- global_position copied.
--
-- `claimed_by` / `claimed_until`: the `serve` worker driving the migration and its lease.
CREATE TABLE IF NOT EXISTS tenant_migrations (
    id              UUID PRIMARY KEY,
    tenant_id       UUID NOT NULL,
    source_store_id TEXT NOT NULL,
    target_store_id TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'bulk_copy', 'dual_write', 'cutover', 'migrated',
                                     'paused', 'failed', 'rolled_back')),
    paused_from     TEXT CHECK (paused_from IN ('bulk_copy', 'dual_write')),
    events_total    BIGINT NOT NULL DEFAULT 0,
    events_copied   BIGINT NOT NULL DEFAULT 0,
    copy_horizon    BIGINT,
    copy_position   BIGINT,
    tail_horizon    BIGINT,
    tail_position   BIGINT,
    error_message   TEXT,
    config          JSONB NOT NULL DEFAULT '{}'::jsonb,
    revision        BIGINT NOT NULL DEFAULT 0,
    claimed_by      TEXT,
    claimed_until   TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    started_at      TIMESTAMPTZ,
    completed_at    TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    finished_at     TIMESTAMPTZ,
    CHECK ((state = 'paused') = (paused_from IS NOT NULL)),
    CHECK (source_store_id <> target_store_id)
);
-- At most one non-terminal migration per tenant; two racing creators get one winner.
CREATE UNIQUE INDEX IF NOT EXISTS tenant_migrations_one_active ON tenant_migrations (tenant_id)
    WHERE state NOT IN ('migrated', 'failed', 'rolled_back');
CREATE INDEX IF NOT EXISTS tenant_migrations_by_tenant ON tenant_migrations (tenant_id, created_at);
-- Version 3 (issue 19): `finished_at` is set by `complete` (or by `serve` once
-- `reverse_replication_hours` passed since the cutover) on a `migrated` migration: the store the
-- tenant left is no longer kept current and the cutover can no longer be reverted. NULL until
-- then. `completed_at` stays the cutover's time (set when the migration became terminal).
ALTER TABLE tenant_migrations ADD COLUMN IF NOT EXISTS finished_at TIMESTAMPTZ;

-- Every operator action and every state change. `to_state` is NULL for actions that change no
-- state (then `from_state` is the state the action found).
CREATE TABLE IF NOT EXISTS migration_audit_log (
    id           BIGSERIAL PRIMARY KEY,
    migration_id UUID NOT NULL REFERENCES tenant_migrations (id),
    tenant_id    UUID NOT NULL,
    at           TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    actor        TEXT NOT NULL,
    action       TEXT NOT NULL,
    from_state   TEXT,
    to_state     TEXT,
    reason       TEXT,
    details      JSONB
);
CREATE INDEX IF NOT EXISTS migration_audit_log_by_migration ON migration_audit_log (migration_id, id);
CREATE INDEX IF NOT EXISTS migration_audit_log_by_tenant ON migration_audit_log (tenant_id, id);

-- Source → target positions of every copied event, for translating subscription checkpoints.
-- The primary key's index also serves "nearest source_position at or below P" (a backward scan
-- from P), so there is no second index; and no foreign key, to keep bulk inserts cheap.
CREATE TABLE IF NOT EXISTS migration_position_map (
    migration_id    UUID NOT NULL,
    source_position BIGINT NOT NULL,
    target_position BIGINT NOT NULL,
    event_id        UUID NOT NULL,
    PRIMARY KEY (migration_id, source_position)
);

-- Heartbeat of live proxies: the routing epoch each has applied.
CREATE TABLE IF NOT EXISTS proxies (
    proxy_id      TEXT PRIMARY KEY,
    admin_url     TEXT NOT NULL,
    routing_epoch BIGINT NOT NULL,
    last_seen     TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    details       JSONB
);

-- Settings every process must agree on (issue 14 item 12), by name. `default_store`: the store
-- of every tenant without a `tenant_routing` row. `init` records the config's value when none
-- is recorded; `routing set-default` changes it (refused while a tenant without a row has a
-- migration that is not over, and bumping the routing epoch so proxies reload); a process whose
-- config names another default refuses to start.
CREATE TABLE IF NOT EXISTS switchyard_settings (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- The deletion of a tenant's rows from a store it no longer uses (issue 19): the source of a
-- completed migration (`role` 'source', `complete --cleanup`) or the target of an aborted or
-- failed one (`role` 'target', `cleanup`). One per migration. Deleted in throttled batches of
-- the tenant's rows only; `rows_deleted` is recorded after each batch, and a driver that
-- starts (again) first recounts what is left, so a crash between a batch and its record loses
-- nothing. `claimed_by` / `claimed_until`: the lease of the process deleting, as for
-- migrations. The tenant's fence row in that store is never deleted.
CREATE TABLE IF NOT EXISTS migration_cleanups (
    migration_id  UUID PRIMARY KEY REFERENCES tenant_migrations (id),
    tenant_id     UUID NOT NULL,
    store_id      TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('source', 'target')),
    state         TEXT NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done')),
    rows_total    BIGINT NOT NULL,
    rows_deleted  BIGINT NOT NULL DEFAULT 0,
    claimed_by    TEXT,
    claimed_until TIMESTAMPTZ,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    finished_at   TIMESTAMPTZ
);
