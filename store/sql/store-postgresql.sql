-- Switchyard's additive objects in a PostgreSQL event store. Run by `switchyard-control init`
-- after the eventsource-py DDL (which is only run when the `events` table does not exist yet),
-- inside one transaction holding an advisory lock, so two concurrent inits cannot race.
-- Everything here is idempotent and never rewrites `events`: ALTERs that would take an
-- ACCESS EXCLUSIVE lock run only when their object is missing.

CREATE INDEX IF NOT EXISTS idx_switchyard_events_tenant_position
    ON events (tenant_id, global_position);

DO $$
BEGIN
    -- Stores made by eventsource-py 0.15.1 already carry txid; older ones do not. Added
    -- nullable without default (metadata only), then given its default (future rows only).
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                    WHERE table_schema = current_schema() AND table_name = 'events'
                      AND column_name = 'txid') THEN
        ALTER TABLE events ADD COLUMN txid xid8;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                    WHERE table_schema = current_schema() AND table_name = 'events'
                      AND column_name = 'txid' AND column_default IS NOT NULL) THEN
        ALTER TABLE events ALTER COLUMN txid SET DEFAULT pg_current_xact_id();
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS idx_switchyard_events_tenant_txid
    ON events (tenant_id, txid);

-- The tenant feed's order (store/src/events/feed.rs): by inserting transaction, then position,
-- a NULL txid (older than the column) first, so a page is one index range.
CREATE INDEX IF NOT EXISTS idx_switchyard_events_tenant_feed
    ON events (tenant_id, (coalesce(txid, '0'::xid8)), global_position);

-- Every inserted row carries its own transaction's id, whatever the writer set: a restore or an
-- `INSERT ... SELECT` copying every column (txid NULL, or an old value below a migration's
-- horizon) would otherwise fall outside every tail window and never be copied (issue 14 item
-- 13). The WHEN clause keeps the default path (txid already current) free of a PL/pgSQL call.
-- The value is the column's default, so eventsource-py sees what it always did.
CREATE OR REPLACE FUNCTION switchyard_stamp_txid() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    NEW.txid := pg_current_xact_id();
    RETURN NEW;
END
$fn$;

DROP TRIGGER IF EXISTS switchyard_txid ON events;
CREATE TRIGGER switchyard_txid
    BEFORE INSERT ON events
    FOR EACH ROW
    WHEN (NEW.txid IS DISTINCT FROM pg_current_xact_id())
    EXECUTE FUNCTION switchyard_stamp_txid();

-- The fence: the truth about whether a tenant may still write here (see DESIGN.md "Cutover").
--   open     everyone may write the tenant here (the store it lives in);
--   copiers  only Switchyard's copiers may (a migration's target before its cutover commits,
--            the store the tenant left while reverse replication keeps it current); everyone
--            else is refused as if moved, to `moved_to` (the store the tenant lives in);
--   moved    nobody may (`moved_to` names where the tenant went).
-- A copier says so with the transaction-local setting `switchyard.copier`, naming the fence
-- row versions its statement's snapshot saw (it is refused if the fence changed since).
CREATE TABLE IF NOT EXISTS switchyard_fences (
    tenant_id  UUID PRIMARY KEY,
    state      TEXT NOT NULL CHECK (state IN ('open', 'moved', 'copiers')),
    epoch      BIGINT NOT NULL DEFAULT 0,
    moved_to   TEXT,
    updated_at TIMESTAMPTZ DEFAULT NOW()
);

-- Stores initialised before the `copiers` state: widen the check (the table is one row per
-- tenant; only when the old check is still there).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_constraint
                WHERE conrelid = 'switchyard_fences'::regclass AND contype = 'c'
                  AND conname = 'switchyard_fences_state_check'
                  AND pg_get_constraintdef(oid) NOT LIKE '%copiers%') THEN
        ALTER TABLE switchyard_fences DROP CONSTRAINT switchyard_fences_state_check;
        ALTER TABLE switchyard_fences ADD CONSTRAINT switchyard_fences_state_check
            CHECK (state IN ('open', 'moved', 'copiers'));
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS switchyard_schema (
    component  TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- One append, one round trip: fence check, idempotent-retry check, optimistic concurrency,
-- insert. Errors carry SQLSTATEs of our own so the caller can tell them apart:
--   SWF01 fence moved (DETAIL = the store the tenant moved to)
--   SWI01 an event id is already used by a different event
--   SWI02 a retry of a committed append sends its events in another order
--   SWS01 the stream belongs to another tenant
--   SWV01 version conflict (DETAIL = the stream's actual version)
--   SWV02 lost a race: a concurrent append took the version or inserted the same ids; the whole
--         statement is rolled back and the caller retries (DETAIL = the actual version)
-- Returns what the caller needs to mirror the events exactly: each stored row's event id (so
-- the caller pairs rows with its events by id, never by index), position, version, and the
-- timestamps the store filled in.
-- The result type grew a column (out_event_id); CREATE OR REPLACE cannot change it, so the old
-- function is dropped first, inside init's transaction (callers never see it missing).
DROP FUNCTION IF EXISTS switchyard_append(UUID, TEXT, UUID, INTEGER, UUID[], TEXT[], JSONB[],
                                          TEXT[], TIMESTAMPTZ[]);
CREATE FUNCTION switchyard_append(
    p_tenant         UUID,
    p_aggregate_type TEXT,
    p_aggregate_id   UUID,
    p_expected       INTEGER,
    p_event_ids      UUID[],
    p_event_types    TEXT[],
    p_payloads       JSONB[],
    p_actors         TEXT[],
    p_timestamps     TIMESTAMPTZ[]
) RETURNS TABLE (out_position BIGINT, out_version INTEGER, out_timestamp TIMESTAMPTZ,
                out_created_at TIMESTAMPTZ, out_event_id UUID)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_n        INTEGER := cardinality(p_event_ids);
    v_state    TEXT;
    v_moved_to TEXT;
    v_owner    UUID;
    v_current  INTEGER;
    v_existing INTEGER;
    v_matching INTEGER;
    v_inserted INTEGER;
BEGIN
    -- FOR SHARE: a cutover's FOR UPDATE waits for this append to commit, and this append
    -- waits for a cutover in progress.
    SELECT f.state, f.moved_to INTO v_state, v_moved_to
      FROM switchyard_fences f WHERE f.tenant_id = p_tenant FOR SHARE;
    -- This transaction holds the fence now: the statement trigger need not check it again.
    PERFORM set_config('switchyard.fenced_tenant', p_tenant::text, true);
    -- Appends to one stream take turns (always after the fence lock, so the order of locks is
    -- the same everywhere): an `expected_version = null` append never starves in a retry loop,
    -- and a conflict is decided by the version check below rather than by a lost race.
    PERFORM pg_advisory_xact_lock(hashtextextended(p_aggregate_type || '/' || p_aggregate_id::text, 7));
    -- Appends are never a copier's (copiers land rows through the copy statement).
    IF v_state IN ('moved', 'copiers') THEN
        RAISE EXCEPTION 'tenant % has moved to store %', p_tenant, v_moved_to
              USING ERRCODE = 'SWF01', DETAIL = coalesce(v_moved_to, '');
    END IF;

    SELECT count(*) INTO v_existing FROM events e WHERE e.event_id = ANY (p_event_ids);
    IF v_existing > 0 THEN
        SELECT count(*) INTO v_matching
          FROM events e
          JOIN unnest(p_event_ids, p_event_types, p_payloads, p_actors, p_timestamps)
               AS u(id, typ, payload, actor, ts) ON e.event_id = u.id
         WHERE e.tenant_id = p_tenant
           AND e.aggregate_type = p_aggregate_type
           AND e.aggregate_id = p_aggregate_id
           AND e.event_type = u.typ
           AND e.payload = u.payload
           AND e.actor_id IS NOT DISTINCT FROM u.actor
           AND (u.ts IS NULL OR e.timestamp = u.ts);
        IF v_existing = v_n AND v_matching = v_n THEN
            -- A retry answers the original result in the request's order. The same events in
            -- another order are another append (event i would be answered, and mirrored, at
            -- the version of event j): refused, keyed by event id, never paired by index.
            IF (SELECT count(DISTINCT e.version - u.ord::INTEGER)
                  FROM unnest(p_event_ids) WITH ORDINALITY AS u(id, ord)
                  JOIN events e ON e.event_id = u.id) > 1 THEN
                RAISE EXCEPTION 'a retry must send the events in the order of the original append'
                      USING ERRCODE = 'SWI02';
            END IF;
            RETURN QUERY SELECT e.global_position, e.version, e.timestamp, e.created_at,
                                e.event_id
                           FROM unnest(p_event_ids) WITH ORDINALITY AS u(id, ord)
                           JOIN events e ON e.event_id = u.id
                          ORDER BY u.ord;
            RETURN;
        END IF;
        RAISE EXCEPTION 'event id already used by a different event' USING ERRCODE = 'SWI01';
    END IF;

    SELECT e.version, e.tenant_id INTO v_current, v_owner
      FROM events e
     WHERE e.aggregate_id = p_aggregate_id AND e.aggregate_type = p_aggregate_type
     ORDER BY e.version DESC LIMIT 1;
    IF v_current IS NOT NULL AND v_owner IS DISTINCT FROM p_tenant THEN
        RAISE EXCEPTION 'stream not found' USING ERRCODE = 'SWS01';
    END IF;
    v_current := coalesce(v_current, 0);
    IF p_expected IS NOT NULL AND p_expected <> v_current THEN
        RAISE EXCEPTION 'version conflict' USING ERRCODE = 'SWV01', DETAIL = v_current::text;
    END IF;

    RETURN QUERY
    INSERT INTO events AS e (event_id, aggregate_id, aggregate_type, event_type, tenant_id,
                             actor_id, version, timestamp, payload)
    SELECT u.id, p_aggregate_id, p_aggregate_type, u.typ, p_tenant, u.actor,
           v_current + u.ord::INTEGER, coalesce(u.ts, now()), u.payload
      FROM unnest(p_event_ids, p_event_types, p_payloads, p_actors, p_timestamps)
           WITH ORDINALITY AS u(id, typ, payload, actor, ts, ord)
    ON CONFLICT DO NOTHING
    RETURNING e.global_position, e.version, e.timestamp, e.created_at, e.event_id;
    GET DIAGNOSTICS v_inserted = ROW_COUNT;
    IF v_inserted < v_n THEN
        SELECT max(e.version) INTO v_current FROM events e
         WHERE e.aggregate_id = p_aggregate_id AND e.aggregate_type = p_aggregate_type;
        RAISE EXCEPTION 'lost a race for the stream''s next version' USING ERRCODE = 'SWV02',
              DETAIL = coalesce(v_current, 0)::text;
    END IF;
END
$fn$;

-- The fence for everyone else: every INSERT into events (an application writing directly,
-- eventsource-py itself) takes FOR SHARE on the fence rows of the tenants it inserts and fails
-- with a clear error if one has moved. Statement-level, so a bulk insert pays once. Rows are
-- already inserted when it runs; the error rolls the statement back.
CREATE OR REPLACE FUNCTION switchyard_fence_check() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    v_fence RECORD;
    v_checked TEXT := current_setting('switchyard.fenced_tenant', true);
    -- A copier's statement names the fence row versions its snapshot saw ('tenant@xmin,' each;
    -- see the store's landing statement): it computed its stream heads from that snapshot.
    v_copier  TEXT := coalesce(current_setting('switchyard.copier', true), '');
BEGIN
    -- Lock every fence row of the tenants inserted, open or moved: holding FOR SHARE until
    -- commit is what makes a cutover's FOR UPDATE wait for this writer (and its final
    -- catch-up see these rows), or this writer wait for the cutover and then fail.
    FOR v_fence IN
        SELECT f.tenant_id, f.state, f.moved_to, f.xmin::text AS version
          FROM switchyard_fences f
         WHERE f.tenant_id IN (SELECT DISTINCT n.tenant_id FROM switchyard_new_rows n
                                WHERE n.tenant_id IS NOT NULL
                                  AND n.tenant_id::text IS DISTINCT FROM v_checked)
         ORDER BY f.tenant_id
           FOR SHARE
    LOOP
        -- A copiers-only fence admits a copier only if the fence is still the row version
        -- its statement's snapshot saw: a fence that changed meanwhile (moved, the tenant's
        -- rows deleted, copiers admitted again) means its heads may count rows that are gone,
        -- and what it inserts could sit above a missing version. It is refused; it copies
        -- again from a fresh snapshot.
        IF v_fence.state = 'moved'
           OR (v_fence.state = 'copiers'
               AND position(v_fence.tenant_id::text || '@' || v_fence.version || ',' IN v_copier) = 0)
        THEN
            RAISE EXCEPTION 'switchyard: tenant % has moved to store %; write through the Switchyard proxy or to the new store',
                  v_fence.tenant_id, v_fence.moved_to
                  USING ERRCODE = 'SWF01', DETAIL = coalesce(v_fence.moved_to, ''),
                        HINT = 'the tenant was migrated; its events are no longer accepted here';
        END IF;
    END LOOP;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS switchyard_fence ON events;
CREATE TRIGGER switchyard_fence
    AFTER INSERT ON events
    REFERENCING NEW TABLE AS switchyard_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION switchyard_fence_check();

INSERT INTO switchyard_schema (component, version) VALUES ('store', 3)
ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, updated_at = NOW();
