-- Every statement river_broker runs, by name. Loaded by river_broker/sql/__init__.py.
-- {schema} is the quoted schema name; %(name)s are bind parameters (psycopg).
-- Each query names the index that serves it.

-- name: insert_message
-- Publish one message, durable when the statement returns (autocommit).
-- A row due later is 'scheduled'. The NOTIFY is sent in the same transaction
-- (only when asked: publishers throttle their notifications per queue).
WITH inserted AS (
    INSERT INTO {schema}.message
        (queue, state, priority, run_at, expires_at, task_id, task_name, payload)
    VALUES (
        %(queue)s,
        CASE WHEN %(run_at)s::timestamptz > now() THEN 'scheduled' ELSE 'available' END,
        %(priority)s,
        coalesce(%(run_at)s::timestamptz, now()),
        CASE WHEN %(ttl)s::float8 IS NULL THEN NULL
             ELSE now() + make_interval(secs => %(ttl)s::float8) END,
        %(task_id)s,
        %(task_name)s,
        %(payload)s
    )
    RETURNING id, state, run_at
)
SELECT id, state,
       CASE WHEN %(notify)s::boolean
            THEN pg_notify(%(channel)s, CASE WHEN state = 'scheduled'
                                             THEN 's' || extract(epoch FROM run_at)::text || ' '
                                             ELSE 'a' END || %(queue)s)
       END
FROM inserted;

-- name: fetch_available
-- Lease up to %(limit)s ready messages of one queue to consumer %(owner)s.
-- Index: message_fetch_idx (queue, priority DESC, id) WHERE state = 'available'.
WITH picked AS (
    SELECT id
    FROM {schema}.message
    WHERE state = 'available'
      AND queue = %(queue)s
      AND (expires_at IS NULL OR expires_at > now())
    ORDER BY priority DESC, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.message AS m
SET state = 'reserved',
    attempt = m.attempt + 1,
    lease_owner = %(owner)s,
    reserved_at = now()
FROM picked
WHERE m.id = picked.id
RETURNING m.id, m.attempt, m.redelivered, m.payload, m.priority;

-- name: ack_delete
-- Finish deliveries by their fencing tokens (id, attempt); stale tokens match nothing.
-- Index: primary key.
DELETE FROM {schema}.message AS m
USING unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
RETURNING m.id;

-- name: ack_retain
-- Same as ack_delete, keeping the row as 'completed' (retention > 0).
UPDATE {schema}.message AS m
SET state = 'completed', lease_owner = NULL, finished_at = now()
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
RETURNING m.id;

-- name: discard_delete
-- reject(requeue=False): the delivery is dropped.
DELETE FROM {schema}.message AS m
USING unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
RETURNING m.id;

-- name: discard_retain
UPDATE {schema}.message AS m
SET state = 'discarded', lease_owner = NULL, finished_at = now()
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
RETURNING m.id;

-- name: requeue
-- reject(requeue=True), recover, restore at shutdown: the same row goes back
-- (it keeps its id, hence its place at the head), marked redelivered; consumers are woken.
WITH requeued AS (
    UPDATE {schema}.message AS m
    SET state = 'available', lease_owner = NULL, reserved_at = NULL, redelivered = true
    FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
    WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
    RETURNING m.id, m.queue
)
SELECT requeued.id, pg_notify(%(channel)s, 'a' || requeued.queue)
FROM requeued;

-- name: register_consumer
-- A consuming session takes a consumer id and holds a session-level advisory lock on it
-- for as long as it lives: that lock is the liveness of every lease it owns.
SELECT id, pg_advisory_lock(%(ns)s, id)
FROM (SELECT nextval(%(sequence)s::regclass)::integer AS id) AS c;

-- name: rescue_orphaned_leases
-- Leases whose owner's session is gone (its advisory lock is free) go back to 'available'.
-- pg_try_advisory_xact_lock succeeds only for dead owners and is released at commit.
-- Index: message_reserved_idx (lease_owner) WHERE state = 'reserved'.
WITH owners AS (
    SELECT DISTINCT lease_owner AS owner
    FROM {schema}.message
    WHERE state = 'reserved' AND lease_owner <> %(self)s
), dead AS (
    SELECT owner FROM owners WHERE pg_try_advisory_xact_lock(%(ns)s, owner)
), rescued AS (
    UPDATE {schema}.message AS m
    SET state = 'available', lease_owner = NULL, reserved_at = NULL, redelivered = true
    FROM dead
    WHERE m.state = 'reserved' AND m.lease_owner = dead.owner
    RETURNING m.id, m.queue
)
SELECT count(*) AS rescued, (SELECT count(pg_notify(%(channel)s, 'a' || q.queue))
                             FROM (SELECT DISTINCT queue FROM rescued) AS q) AS woken
FROM rescued;

-- name: promote_due_scheduled
-- Scheduled rows that are due become available; consumers of their queues are woken.
-- Index: message_scheduled_idx (queue, run_at) WHERE state = 'scheduled'.
WITH due AS (
    SELECT id
    FROM {schema}.message
    WHERE state = 'scheduled' AND queue = ANY(%(queues)s::text[]) AND run_at <= now()
    ORDER BY run_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), promoted AS (
    UPDATE {schema}.message AS m
    SET state = 'available'
    FROM due
    WHERE m.id = due.id
    RETURNING m.queue
)
SELECT count(*) AS promoted, (SELECT count(pg_notify(%(channel)s, 'a' || q.queue))
                              FROM (SELECT DISTINCT queue FROM promoted) AS q) AS woken
FROM promoted;

-- name: next_scheduled
-- The earliest run_at among scheduled rows of these queues, in epoch seconds.
-- Index: message_scheduled_idx (one index probe per queue).
SELECT extract(epoch FROM min(n.run_at))::float8
FROM unnest(%(queues)s::text[]) AS q(name)
CROSS JOIN LATERAL (
    SELECT run_at FROM {schema}.message
    WHERE state = 'scheduled' AND queue = q.name
    ORDER BY run_at
    LIMIT 1
) AS n;

-- name: clean_finished
-- Retained finished rows older than the retention period.
-- Index: message_finished_idx (finished_at).
DELETE FROM {schema}.message
WHERE id IN (
    SELECT id FROM {schema}.message
    WHERE state IN ('completed', 'discarded')
      AND finished_at < now() - make_interval(secs => %(retention)s)
    LIMIT %(limit)s
);

-- name: clean_expired
-- Messages whose Kombu TTL passed before delivery are dropped (as RabbitMQ does).
-- Index: message_expires_idx (expires_at).
DELETE FROM {schema}.message
WHERE id IN (
    SELECT id FROM {schema}.message
    WHERE expires_at IS NOT NULL AND expires_at <= now()
      AND state IN ('available', 'scheduled')
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
);

-- name: declare_queue
-- Index: queue primary key.
INSERT INTO {schema}.queue (name, arguments)
VALUES (%(queue)s, %(arguments)s)
ON CONFLICT (name) DO NOTHING;

-- name: queue_exists
SELECT EXISTS (SELECT 1 FROM {schema}.queue WHERE name = %(queue)s)
    OR EXISTS (SELECT 1 FROM {schema}.message WHERE queue = %(queue)s);

-- name: queue_size
-- Messages waiting in a queue (ready or scheduled), as AMQP's message_count.
-- Index: message_fetch_idx and message_scheduled_idx (both lead with queue).
SELECT (SELECT count(*) FROM {schema}.message WHERE state = 'available' AND queue = %(queue)s)
     + (SELECT count(*) FROM {schema}.message WHERE state = 'scheduled' AND queue = %(queue)s);

-- name: purge_queue
-- Removes waiting messages (not the ones being worked), as AMQP's queue.purge.
DELETE FROM {schema}.message
WHERE queue = %(queue)s AND state IN ('available', 'scheduled');

-- name: delete_queue
DELETE FROM {schema}.queue WHERE name = %(queue)s;

-- name: delete_queue_messages
DELETE FROM {schema}.message
WHERE queue = %(queue)s AND state IN ('available', 'scheduled');
