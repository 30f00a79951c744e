-- river_broker schema, version 1.
-- {schema} is replaced by the quoted schema name (transport option `schema`).
-- See docs/state_machine.md for the meaning of every state and who moves a row between them.

CREATE TABLE {schema}.message (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue        text        NOT NULL,
    state        text        NOT NULL DEFAULT 'available',
    priority     smallint    NOT NULL DEFAULT 0,
    -- When the message may run: Celery's eta/countdown. Rows due later are 'scheduled'.
    run_at       timestamptz NOT NULL DEFAULT now(),
    -- Kombu's per-message TTL (`expiration` property): never delivered after this instant.
    expires_at   timestamptz,
    -- Incremented on every delivery; (id, attempt) is the fencing token of a delivery.
    attempt      integer     NOT NULL DEFAULT 0,
    redelivered  boolean     NOT NULL DEFAULT false,
    -- Consumer id holding the lease; alive while its session holds advisory lock (ns, lease_owner).
    lease_owner  integer,
    reserved_at  timestamptz,
    finished_at  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    task_id      text,
    task_name    text,
    -- Reserved for sequences and unique messages (later migrations add their indexes).
    sequence_key text,
    unique_key   text,
    -- The Kombu message (body, headers, properties) as JSON text.
    payload      text        NOT NULL,
    CONSTRAINT message_state_valid CHECK (
        state IN ('available', 'scheduled', 'pending', 'reserved', 'completed', 'discarded')
    ),
    CONSTRAINT message_lease_only_when_reserved CHECK ((state = 'reserved') = (lease_owner IS NOT NULL)),
    CONSTRAINT message_priority_range CHECK (priority BETWEEN 0 AND 9)
) WITH (
    -- A queue table churns: vacuum it early so dead tuples do not slow the fetch scan.
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);

-- Serves fetch_available: highest priority first, then publish order, only ready rows.
CREATE INDEX message_fetch_idx ON {schema}.message (queue, priority DESC, id)
    WHERE state = 'available';

-- Serves promote_due_scheduled and next_scheduled.
CREATE INDEX message_scheduled_idx ON {schema}.message (queue, run_at)
    WHERE state = 'scheduled';

-- Serves rescue_orphaned_leases (the distinct lease owners) and the lease checks.
CREATE INDEX message_reserved_idx ON {schema}.message (lease_owner)
    WHERE state = 'reserved';

-- Serves clean_finished (only used when finished rows are retained).
CREATE INDEX message_finished_idx ON {schema}.message (finished_at)
    WHERE state IN ('completed', 'discarded');

-- Serves clean_expired.
CREATE INDEX message_expires_idx ON {schema}.message (expires_at)
    WHERE expires_at IS NOT NULL AND state IN ('available', 'scheduled');

CREATE TABLE {schema}.queue (
    name        text        PRIMARY KEY,
    arguments   jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Consumer ids: each consuming session takes one and holds a session advisory lock on it.
CREATE SEQUENCE {schema}.consumer_id_seq AS integer MINVALUE 1 CYCLE;
