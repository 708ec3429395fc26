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
INSERT INTO switchyard_schema (component, version) VALUES ('control', 1)
ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, updated_at = NOW();
