-- river_broker schema, version 4: broadcast (SPEC §6).
-- Exchanges and bindings live in the database, so every process routes the same way: Celery's
-- remote control (fanout), its events (topic) and the replies of `celery inspect` (direct, to
-- a queue another process declared). A message published to a fanout or topic exchange becomes
-- one row per bound queue, written by one statement (publish_routed).
-- Queues get RabbitMQ's lifetimes: x-message-ttl, x-expires and auto-delete.

-- Queue lifetimes, from the declaration (queue_declare's auto_delete and arguments).
ALTER TABLE {schema}.queue
    ADD COLUMN auto_delete    boolean     NOT NULL DEFAULT false,
    -- x-expires: the queue is deleted after this long without consumers or declarations.
    ADD COLUMN expires_ms     bigint,
    -- x-message-ttl: a message published to the queue expires this long after publishing.
    ADD COLUMN message_ttl_ms bigint,
    -- Last declaration, or the moment the last consumer left (x-expires counts from it).
    ADD COLUMN last_used_at   timestamptz NOT NULL DEFAULT now(),
    -- Had a consumer at some point: an auto-delete queue goes away with its last consumer.
    ADD COLUMN consumed       boolean     NOT NULL DEFAULT false;

-- Serves delete_unused_queues: only queues that can end are looked at.
CREATE INDEX queue_lifetime_idx ON {schema}.queue (name)
    WHERE expires_ms IS NOT NULL OR auto_delete;

CREATE TABLE {schema}.exchange (
    name        text        PRIMARY KEY,
    type        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT exchange_type_valid CHECK (type IN ('direct', 'topic', 'fanout'))
);

CREATE TABLE {schema}.binding (
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL DEFAULT '',
    queue        text        NOT NULL REFERENCES {schema}.queue (name) ON DELETE CASCADE,
    -- Topic exchanges: the binding key as a regular expression (Kombu's translation of
    -- `*` and `#`), matched with ~ in publish_routed.
    pattern      text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Serves every routing lookup (exchange_bindings, publish_routed: exchange first).
    PRIMARY KEY (exchange, routing_key, queue)
);

-- Serves the cascade from queue deletion and queue_unbind_all.
CREATE INDEX binding_queue_idx ON {schema}.binding (queue);

-- Who consumes which queue: consumer ids are the advisory-locked ids of consuming sessions
-- (register_consumer), so a row whose session died is found like an orphaned lease.
CREATE TABLE {schema}.queue_consumer (
    queue        text        NOT NULL,
    consumer_id  integer     NOT NULL,
    since        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, consumer_id)
);

-- Serves reap_dead_queue_consumers (the distinct consumer ids).
CREATE INDEX queue_consumer_owner_idx ON {schema}.queue_consumer (consumer_id);
