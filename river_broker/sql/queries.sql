-- Every statement river_broker runs, by name. Loaded by river_broker/sql/__init__.py.
-- {schema} is the quoted schema name; %(name)s are bind parameters (psycopg).
-- NOTIFY: every queue has its own channel, %(channel)s (the schema name and a dot) followed
-- by the first 12 hex digits of md5(queue); the payload names the queue ('a<queue>', or
-- 's<epoch> <queue>' for a message scheduled for later). Consumers LISTEN only on the
-- channels of the queues they consume (river_broker.options.TransportOptions.queue_channel).
-- Each query names the index that serves it.

-- name: insert_message
-- Publish one message, durable when the statement returns (autocommit on a publishing session).
-- A row due later is 'scheduled'. With a unique_key, a row holding the key in one of its
-- unique states makes this a duplicate: nothing is inserted and the holder's task id is
-- returned (duplicate_of). A retry (same task id) of a running unique message first releases
-- the key from the running row. The NOTIFY is sent in the same transaction (only when asked:
-- publishers throttle their notifications per queue).
-- Index: message_unique_idx (release, conflict, holder); queue primary key (x-message-ttl).
WITH released AS (
    UPDATE {schema}.message AS m
    SET unique_key = NULL
    WHERE m.unique_key = %(unique_key)s::text AND m.task_id = %(task_id)s::text
      AND m.state = 'reserved'
      AND m.unique_states IS NOT NULL AND (m.unique_states & {schema}.state_bit(m.state)) <> 0
    RETURNING m.id
), expired AS (
    -- A finished row kept for uniqueness whose period is over no longer holds the key, even
    -- before the cleaner removes it.
    DELETE FROM {schema}.message AS m
    WHERE m.unique_key = %(unique_key)s::text AND m.unique_until < now()
      AND m.state IN ('completed', 'discarded')
      AND m.unique_states IS NOT NULL AND (m.unique_states & {schema}.state_bit(m.state)) <> 0
    RETURNING m.id
), inserted AS (
    INSERT INTO {schema}.message
        (queue, state, priority, run_at, expires_at, task_id, task_name, payload,
         unique_key, unique_states, unique_until)
    SELECT
        %(queue)s,
        CASE WHEN %(run_at)s::timestamptz > now() THEN 'scheduled' ELSE 'available' END,
        %(priority)s,
        coalesce(%(run_at)s::timestamptz, now()),
        -- The message's own TTL or its queue's x-message-ttl, whichever ends first.
        least(CASE WHEN %(ttl)s::float8 IS NULL THEN NULL
                   ELSE now() + make_interval(secs => %(ttl)s::float8) END,
              (SELECT now() + q.message_ttl_ms * interval '1 millisecond'
               FROM {schema}.queue AS q WHERE q.name = %(queue)s)),
        %(task_id)s,
        %(task_name)s,
        %(payload)s,
        %(unique_key)s,
        %(unique_states)s,
        %(unique_until)s
    FROM (SELECT count(*) FROM released) AS after_release,
         (SELECT count(*) FROM expired) AS after_expiry
    -- Routed through a binding (%(bound)s): only while the queue exists. A binding read
    -- from a cache may outlive its queue (auto-delete, x-expires): such a message is
    -- unroutable and dropped, as AMQP does, instead of landing where nobody will consume it.
    WHERE NOT %(bound)s::boolean
       OR EXISTS (SELECT 1 FROM {schema}.queue AS bq WHERE bq.name = %(queue)s)
    ON CONFLICT DO NOTHING
    RETURNING id, state, run_at
)
SELECT id, state,
       CASE WHEN %(notify)s::boolean
            THEN pg_notify(%(channel)s || left(md5(%(queue)s), 12),
                           CASE WHEN state = 'scheduled'
                                THEN 's' || extract(epoch FROM run_at)::text || ' '
                                ELSE 'a' END || %(queue)s)
       END,
       NULL::text AS duplicate_of
FROM inserted
UNION ALL
SELECT NULL, NULL, NULL, h.task_id
FROM {schema}.message AS h
WHERE NOT EXISTS (SELECT 1 FROM inserted)
  AND h.unique_key = %(unique_key)s::text
  AND h.unique_states IS NOT NULL AND (h.unique_states & {schema}.state_bit(h.state)) <> 0;

-- name: find_unique_holder
-- The task id holding a unique key (after a conflict with a row committed meanwhile).
-- Index: message_unique_idx.
SELECT h.task_id
FROM {schema}.message AS h
WHERE h.unique_key = %(unique_key)s::text
  AND h.unique_states IS NOT NULL AND (h.unique_states & {schema}.state_bit(h.state)) <> 0;

-- name: insert_messages
-- Batch publish in one statement: one row per array element, uniqueness per row (a duplicate
-- inside the batch included: ON CONFLICT sees the rows this statement inserted). Returns the
-- inserted rows by task id; the caller maps them back and looks up the holders of the rest.
-- One NOTIFY per queue that received ready messages.
-- Index: message_unique_idx (conflicts).
WITH input AS (
    SELECT *
    -- The arrays are sent in binary format (the b placeholders): no per-element escaping.
    FROM unnest(%(queues)b::text[], %(priorities)b::smallint[], %(run_ats)b::timestamptz[],
                %(ttls)b::float8[], %(task_ids)b::text[], %(task_names)b::text[],
                %(payloads)b::text[], %(unique_keys)b::text[], %(unique_statess)b::smallint[],
                %(unique_untils)b::timestamptz[])
         WITH ORDINALITY
         AS t(queue, priority, run_at, ttl, task_id, task_name, payload, unique_key,
              unique_states, unique_until, ord)
), expired AS (
    DELETE FROM {schema}.message AS m
    WHERE m.unique_key IN (SELECT unique_key FROM input WHERE unique_key IS NOT NULL)
      AND m.unique_until < now() AND m.state IN ('completed', 'discarded')
      AND m.unique_states IS NOT NULL AND (m.unique_states & {schema}.state_bit(m.state)) <> 0
    RETURNING m.id
), inserted AS (
    INSERT INTO {schema}.message
        (queue, state, priority, run_at, expires_at, task_id, task_name, payload,
         unique_key, unique_states, unique_until)
    SELECT queue,
           CASE WHEN run_at > now() THEN 'scheduled' ELSE 'available' END,
           priority,
           coalesce(run_at, now()),
           least(CASE WHEN ttl IS NULL THEN NULL ELSE now() + make_interval(secs => ttl) END,
                 (SELECT now() + q.message_ttl_ms * interval '1 millisecond'
                  FROM {schema}.queue AS q WHERE q.name = input.queue)),
           task_id, task_name, payload, unique_key, unique_states, unique_until
    FROM input, (SELECT count(*) FROM expired) AS after_expiry
    ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id, task_id, state, queue, run_at
), woken AS (
    SELECT pg_notify(%(channel)s || left(md5(q.queue), 12), 'a' || q.queue)
    FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'available') AS q
), scheduled AS (
    SELECT pg_notify(%(channel)s || left(md5(queue), 12),
                     's' || extract(epoch FROM min(run_at))::text || ' ' || queue)
    FROM inserted WHERE state = 'scheduled' GROUP BY queue
)
SELECT i.task_id, i.id, (SELECT count(*) FROM woken) + (SELECT count(*) FROM scheduled)
FROM inserted AS i;

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
RETURNING m.id, m.attempt, m.redelivered, m.payload, m.priority,
          m.sequence_key IS NOT NULL AS sequenced;

-- name: ack_and_fetch
-- The consumer's hot path in one statement and one round trip: finish deliveries by their
-- fencing tokens (id, attempt; stale tokens match nothing), then lease up to %(limit)s ready
-- messages of one queue to consumer %(owner)s. The first column lists the ids whose ack
-- applied (the same on every row); with nothing fetched, one row carries it alone.
-- Index: primary key (acks); message_fetch_idx (fetch).
WITH deleted AS (
    DELETE FROM {schema}.message AS m
    USING unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
    WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
      AND NOT %(retain)s::boolean AND coalesce(m.unique_states & 16, 0) = 0
    RETURNING m.id
), kept AS (
    -- Kept as 'completed': retention > 0, or unique while completed (until unique_until).
    UPDATE {schema}.message AS m
    SET state = 'completed', lease_owner = NULL, finished_at = now()
    FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
    WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
      AND (%(retain)s::boolean OR coalesce(m.unique_states & 16, 0) <> 0)
    RETURNING m.id
), acked AS (
    SELECT id FROM deleted UNION ALL SELECT id FROM kept
), picked AS (
    SELECT id
    FROM {schema}.message
    WHERE state = 'available'
      AND queue = %(queue)s
      AND (expires_at IS NULL OR expires_at > now())
    ORDER BY priority DESC, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), fetched AS (
    UPDATE {schema}.message AS m
    SET state = 'reserved',
        attempt = m.attempt + 1,
        lease_owner = %(owner)s,
        reserved_at = now()
    FROM picked
    WHERE m.id = picked.id
    RETURNING m.id, m.attempt, m.redelivered, m.payload, m.priority,
              m.sequence_key IS NOT NULL AS sequenced
)
SELECT (SELECT array_agg(id) FROM acked) AS acked, f.*
FROM (SELECT 1) AS one
LEFT JOIN fetched AS f ON true;

-- name: ack_delete
-- Finish deliveries by their fencing tokens (id, attempt); stale tokens match nothing. Rows are
-- kept as 'completed' when retain is true (retention > 0) or when unique while completed.
-- Index: primary key.
WITH deleted AS (
    DELETE FROM {schema}.message AS m
    USING unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
    WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
      AND NOT %(retain)s::boolean AND coalesce(m.unique_states & 16, 0) = 0
    RETURNING m.id
), kept AS (
    UPDATE {schema}.message AS m
    SET state = 'completed', lease_owner = NULL, finished_at = now()
    FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
    WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
      AND (%(retain)s::boolean OR coalesce(m.unique_states & 16, 0) <> 0)
    RETURNING m.id
)
SELECT id FROM deleted UNION ALL SELECT id FROM kept;

-- name: discard_delete
-- reject(requeue=False): the delivery is dropped (kept as 'discarded' when retain is true, i.e.
-- retention > 0, or when its key is unique while discarded, until unique_until).
WITH deleted AS (
    DELETE FROM {schema}.message AS m
    USING unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
    WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
      AND NOT %(retain)s::boolean AND coalesce(m.unique_states & 32, 0) = 0
    RETURNING m.id
), kept AS (
    UPDATE {schema}.message AS m
    SET state = 'discarded', lease_owner = NULL, finished_at = now()
    FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
    WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
      AND (%(retain)s::boolean OR coalesce(m.unique_states & 32, 0) <> 0)
    RETURNING m.id
)
SELECT id FROM deleted UNION ALL SELECT id FROM kept;

-- name: requeue
-- reject(requeue=True), recover, restore at shutdown: the same row goes back
-- (it keeps its id, hence its place at the head), marked redelivered; consumers are woken.
WITH requeued AS (
    UPDATE {schema}.message AS m
    SET state = 'available', lease_owner = NULL, reserved_at = NULL, redelivered = true,
        -- Back into a waiting state: if a newer message took the key meanwhile (possible
        -- when 'reserved' is not a unique state), this one gives the key up.
        unique_key = CASE WHEN m.unique_key IS NOT NULL AND EXISTS (
                         SELECT 1 FROM {schema}.message AS h
                         WHERE h.unique_key = m.unique_key AND h.id <> m.id
                           AND h.unique_states IS NOT NULL
                           AND (h.unique_states & {schema}.state_bit(h.state)) <> 0)
                     THEN NULL ELSE m.unique_key END
    FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
    WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
    RETURNING m.id, m.queue
)
SELECT requeued.id, pg_notify(%(channel)s || left(md5(requeued.queue), 12),
                             'a' || requeued.queue)
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
    SET state = 'available', lease_owner = NULL, reserved_at = NULL, redelivered = true,
        unique_key = CASE WHEN m.unique_key IS NOT NULL AND EXISTS (
                         SELECT 1 FROM {schema}.message AS h
                         WHERE h.unique_key = m.unique_key AND h.id <> m.id
                           AND h.unique_states IS NOT NULL
                           AND (h.unique_states & {schema}.state_bit(h.state)) <> 0)
                     THEN NULL ELSE m.unique_key END
    FROM dead
    WHERE m.state = 'reserved' AND m.lease_owner = dead.owner
    RETURNING m.id, m.queue
)
SELECT count(*) AS rescued, (SELECT count(pg_notify(%(channel)s || left(md5(q.queue), 12),
                                                    'a' || q.queue))
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
SELECT count(*) AS promoted, (SELECT count(pg_notify(%(channel)s || left(md5(q.queue), 12),
                                                     'a' || q.queue))
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
-- Retained finished rows older than the retention period; never the failed head of a halted
-- sequence (it is what resume re-runs, and what keeps the key blocked).
-- Index: message_finished_idx (finished_at); sequence_head_idx.
DELETE FROM {schema}.message AS m
WHERE m.id IN (
    SELECT f.id FROM {schema}.message AS f
    WHERE f.state IN ('completed', 'discarded')
      AND f.finished_at < now() - make_interval(secs => %(retention)s)
      AND (f.unique_until IS NULL OR f.unique_until < now()
           OR coalesce(f.unique_states & {schema}.state_bit(f.state), 0) = 0)
      AND NOT EXISTS (SELECT 1 FROM {schema}.sequence AS s WHERE s.head_id = f.id)
    LIMIT %(limit)s
);

-- name: clean_unique_finished
-- Finished rows kept for uniqueness, once their period is over and retention has passed.
-- Index: message_unique_until_idx.
DELETE FROM {schema}.message AS m
WHERE m.id IN (
    SELECT f.id FROM {schema}.message AS f
    WHERE f.unique_until IS NOT NULL AND f.unique_until < now()
      AND f.state IN ('completed', 'discarded')
      AND f.unique_states IS NOT NULL AND (f.unique_states & {schema}.state_bit(f.state)) <> 0
      AND f.finished_at < now() - make_interval(secs => %(retention)s)
      AND NOT EXISTS (SELECT 1 FROM {schema}.sequence AS s WHERE s.head_id = f.id)
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
-- queue.declare: creates the queue or takes the latest declaration's lifetimes; a declaration
-- counts as use (the x-expires clock starts again), as in RabbitMQ.
-- Index: queue primary key.
INSERT INTO {schema}.queue AS q (name, arguments, auto_delete, expires_ms, message_ttl_ms)
VALUES (%(queue)s, %(arguments)s, %(auto_delete)s, %(expires_ms)s, %(message_ttl_ms)s)
ON CONFLICT (name) DO UPDATE
SET arguments = EXCLUDED.arguments, auto_delete = EXCLUDED.auto_delete,
    expires_ms = EXCLUDED.expires_ms, message_ttl_ms = EXCLUDED.message_ttl_ms,
    last_used_at = now();

-- name: queue_exists
SELECT EXISTS (SELECT 1 FROM {schema}.queue WHERE name = %(queue)s)
    OR EXISTS (SELECT 1 FROM {schema}.message WHERE queue = %(queue)s);

-- name: queue_size
-- Messages waiting in a queue (ready, scheduled, or pending in a sequence), as AMQP's
-- message_count. Index: message_fetch_idx and message_scheduled_idx (both lead with queue);
-- pending rows are counted by a scan of the pending index.
SELECT (SELECT count(*) FROM {schema}.message WHERE state = 'available' AND queue = %(queue)s)
     + (SELECT count(*) FROM {schema}.message WHERE state = 'scheduled' AND queue = %(queue)s)
     + (SELECT count(*) FROM {schema}.message WHERE state = 'pending' AND queue = %(queue)s);

-- name: purge_queue
-- Removes waiting messages (not the ones being worked), as AMQP's queue.purge. Keys whose
-- head went are repaired afterwards (stale_sequence_heads + promote_next_in_sequence).
DELETE FROM {schema}.message
WHERE queue = %(queue)s AND state IN ('available', 'scheduled', 'pending');

-- name: delete_queue
DELETE FROM {schema}.queue WHERE name = %(queue)s;

-- name: delete_queue_messages
DELETE FROM {schema}.message
WHERE queue = %(queue)s AND state IN ('available', 'scheduled', 'pending');

-- name: upsert_sequence
-- First statement of a sequenced publish: creates the key or locks its row until commit, so
-- concurrent publishers of one key are serialized and id order equals commit order.
-- Index: sequence primary key.
INSERT INTO {schema}.sequence AS s (key) VALUES (%(sequence_key)s)
ON CONFLICT (key) DO UPDATE SET updated_at = now();

-- name: insert_sequenced_message
-- Second statement of a sequenced publish (the key's row is locked by upsert_sequence).
-- The message becomes the head when the key has none (or its head row is gone), otherwise it
-- waits as 'pending'. A retry of the running head (same task id) takes over the head's
-- position. The head is written back to the key in the same statement.
WITH released AS (
    UPDATE {schema}.message AS m
    SET unique_key = NULL
    WHERE m.unique_key = %(unique_key)s::text AND m.task_id = %(task_id)s::text
      AND m.state = 'reserved'
      AND m.unique_states IS NOT NULL AND (m.unique_states & {schema}.state_bit(m.state)) <> 0
    RETURNING m.id
), expired AS (
    -- A finished row kept for uniqueness whose period is over no longer holds the key, even
    -- before the cleaner removes it.
    DELETE FROM {schema}.message AS m
    WHERE m.unique_key = %(unique_key)s::text AND m.unique_until < now()
      AND m.state IN ('completed', 'discarded')
      AND m.unique_states IS NOT NULL AND (m.unique_states & {schema}.state_bit(m.state)) <> 0
    RETURNING m.id
), seq AS (
    SELECT s.head_id FROM {schema}.sequence AS s WHERE s.key = %(sequence_key)s
), head AS (
    SELECT m.id, m.task_id, coalesce(m.seq_order, m.id) AS position
    FROM {schema}.message AS m
    WHERE m.id = (SELECT head_id FROM seq)
), decided AS (
    -- Head only when the key has no head row and nothing waiting: a vanished head (purge,
    -- manual delete) must not let a new message overtake older pending ones; the repair
    -- (stale_sequence_heads) promotes the oldest instead.
    SELECT NOT EXISTS (SELECT 1 FROM head)
           AND NOT EXISTS (SELECT 1 FROM {schema}.message AS p
                           WHERE p.state = 'pending' AND p.sequence_key = %(sequence_key)s)
           AS becomes_head,
           CASE WHEN %(task_id)s::text IS NOT NULL
                     AND (SELECT task_id FROM head) = %(task_id)s::text
                THEN (SELECT position FROM head) END AS takeover_position
), inserted AS (
    INSERT INTO {schema}.message
        (queue, state, priority, run_at, task_id, task_name, payload, sequence_key, seq_order,
         continue_on_discard, unique_key, unique_states, unique_until)
    SELECT %(queue)s,
           CASE WHEN NOT d.becomes_head THEN 'pending'
                WHEN %(run_at)s::timestamptz > now() THEN 'scheduled'
                ELSE 'available' END,
           %(priority)s,
           coalesce(%(run_at)s::timestamptz, now()),
           %(task_id)s,
           %(task_name)s,
           %(payload)s,
           %(sequence_key)s,
           d.takeover_position,
           %(continue_on_discard)s,
           %(unique_key)s,
           %(unique_states)s,
           %(unique_until)s
    FROM decided AS d, (SELECT count(*) FROM released) AS after_release,
         (SELECT count(*) FROM expired) AS after_expiry
    ON CONFLICT DO NOTHING
    RETURNING id, state, run_at
), set_head AS (
    UPDATE {schema}.sequence AS s
    SET head_id = i.id, updated_at = now()
    FROM inserted AS i, decided AS d
    WHERE s.key = %(sequence_key)s AND d.becomes_head
), dropped_empty AS (
    -- A duplicate refused on a key that this publish created: do not leave it behind.
    DELETE FROM {schema}.sequence AS s
    WHERE s.key = %(sequence_key)s AND s.head_id IS NULL
      AND NOT EXISTS (SELECT 1 FROM inserted)
)
SELECT id, state,
       CASE WHEN state <> 'pending' THEN
            pg_notify(%(channel)s || left(md5(%(queue)s), 12),
                      CASE WHEN state = 'scheduled'
                           THEN 's' || extract(epoch FROM run_at)::text || ' '
                           ELSE 'a' END || %(queue)s)
       END,
       NULL::text AS duplicate_of
FROM inserted
UNION ALL
SELECT NULL, NULL, NULL, h.task_id
FROM {schema}.message AS h
WHERE NOT EXISTS (SELECT 1 FROM inserted)
  AND h.unique_key = %(unique_key)s::text
  AND h.unique_states IS NOT NULL AND (h.unique_states & {schema}.state_bit(h.state)) <> 0;

-- name: lock_sequences_of_heads
-- Before promoting: lock the keys whose head is one of these messages, in key order (no
-- deadlock between finishers), waiting for any publisher of those keys to commit.
-- Index: sequence_head_idx.
SELECT key FROM {schema}.sequence
WHERE head_id = ANY(%(ids)s::bigint[])
ORDER BY key
FOR UPDATE;

-- name: halt_sequences
-- A discarded head halts its key (unless the message says continue_on_discard).
UPDATE {schema}.sequence AS s
SET state = 'halted', halted_at = now(), updated_at = now()
FROM {schema}.message AS m
WHERE s.head_id = ANY(%(ids)s::bigint[]) AND m.id = s.head_id
  AND m.state = 'discarded' AND NOT m.continue_on_discard
RETURNING s.key;

-- name: discard_sequenced
-- reject(requeue=False) of a sequenced delivery: the row stays, as 'discarded', so a halted
-- key can be resumed (run it again) or skipped.
UPDATE {schema}.message AS m
SET state = 'discarded', lease_owner = NULL, finished_at = now()
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
WHERE m.id = t.id AND m.attempt = t.attempt AND m.state = 'reserved'
  AND m.sequence_key IS NOT NULL
RETURNING m.id;

-- name: promote_next_in_sequence
-- The heads %(ids)s finished: for each active key they held, the first pending message
-- becomes the head (available, or scheduled when its ETA is later); a key with nothing
-- pending is removed. Runs after lock_sequences_of_heads in the same transaction.
-- Index: sequence_head_idx, message_sequence_pending_idx (one probe per key).
WITH keys AS (
    SELECT s.key
    FROM {schema}.sequence AS s
    WHERE s.head_id = ANY(%(ids)s::bigint[]) AND s.state = 'active'
      AND NOT EXISTS (SELECT 1 FROM {schema}.message AS h
                      WHERE h.id = s.head_id AND h.state IN ('available', 'scheduled', 'reserved'))
), next AS (
    SELECT n.id, k.key
    FROM keys AS k
    CROSS JOIN LATERAL (
        SELECT m.id FROM {schema}.message AS m
        WHERE m.state = 'pending' AND m.sequence_key = k.key
        ORDER BY coalesce(m.seq_order, m.id), m.id
        LIMIT 1
    ) AS n
), promoted AS (
    UPDATE {schema}.message AS m
    SET state = CASE WHEN m.run_at > now() THEN 'scheduled' ELSE 'available' END
    FROM next
    WHERE m.id = next.id
    RETURNING m.id, m.sequence_key, m.queue, m.state, m.run_at
), moved AS (
    UPDATE {schema}.sequence AS s
    SET head_id = p.id, updated_at = now()
    FROM promoted AS p
    WHERE s.key = p.sequence_key
), emptied AS (
    DELETE FROM {schema}.sequence AS s
    USING keys AS k
    WHERE s.key = k.key AND NOT EXISTS (SELECT 1 FROM next WHERE next.key = k.key)
)
SELECT p.id,
       pg_notify(%(channel)s || left(md5(p.queue), 12),
                 CASE WHEN p.state = 'scheduled'
                      THEN 's' || extract(epoch FROM p.run_at)::text || ' '
                      ELSE 'a' END || p.queue)
FROM promoted AS p;

-- name: stale_sequence_heads
-- Safety net (maintenance, admin operations): heads of active keys that are no longer live
-- (their row was deleted by purge, queue delete or by hand).
SELECT s.head_id
FROM {schema}.sequence AS s
WHERE s.state = 'active'
  AND NOT EXISTS (SELECT 1 FROM {schema}.message AS h
                  WHERE h.id = s.head_id AND h.state IN ('available', 'scheduled', 'reserved'))
LIMIT %(limit)s;

-- name: list_sequences
-- Operating sequences: every key with its head and how many wait behind it.
-- Index: sequence primary key; message primary key; message_sequence_pending_idx.
SELECT s.key,
       CASE WHEN s.state = 'halted' THEN 'halted'
            WHEN h.state = 'reserved' THEN 'running'
            ELSE 'waiting' END AS state,
       h.id AS head_id, h.task_id, h.task_name, h.queue, h.state AS head_state, h.attempt,
       extract(epoch FROM now() - h.created_at)::float8 AS head_age,
       (SELECT count(*) FROM {schema}.message AS p
        WHERE p.state = 'pending' AND p.sequence_key = s.key) AS pending,
       s.halted_at
FROM {schema}.sequence AS s
LEFT JOIN {schema}.message AS h ON h.id = s.head_id
WHERE (%(state)s::text IS NULL
       OR %(state)s::text = CASE WHEN s.state = 'halted' THEN 'halted'
                                 WHEN h.state = 'reserved' THEN 'running'
                                 ELSE 'waiting' END)
  AND (%(key)s::text IS NULL OR s.key = %(key)s::text)
ORDER BY s.key
LIMIT %(limit)s;

-- name: lock_sequence
-- Index: sequence primary key.
SELECT key, state, head_id FROM {schema}.sequence WHERE key = %(key)s FOR UPDATE;

-- name: resume_sequence
-- Run a halted key's failed head again (the same row, marked redelivered).
WITH head AS (
    UPDATE {schema}.message AS m
    SET state = CASE WHEN m.run_at > now() THEN 'scheduled' ELSE 'available' END,
        finished_at = NULL, redelivered = true,
        unique_key = CASE WHEN m.unique_key IS NOT NULL AND EXISTS (
                         SELECT 1 FROM {schema}.message AS h
                         WHERE h.unique_key = m.unique_key AND h.id <> m.id
                           AND h.unique_states IS NOT NULL
                           AND (h.unique_states & {schema}.state_bit(h.state)) <> 0)
                     THEN NULL ELSE m.unique_key END
    FROM {schema}.sequence AS s
    WHERE s.key = %(key)s AND s.state = 'halted' AND m.id = s.head_id AND m.state = 'discarded'
    RETURNING m.id, m.queue
), resumed AS (
    UPDATE {schema}.sequence AS s
    SET state = 'active', halted_at = NULL, updated_at = now()
    FROM head
    WHERE s.key = %(key)s
)
SELECT head.id, pg_notify(%(channel)s || left(md5(head.queue), 12), 'a' || head.queue)
FROM head;

-- name: skip_sequence_head
-- Drop a halted key's failed head and let the key move on (promote_next_in_sequence follows).
WITH reactivated AS (
    UPDATE {schema}.sequence AS s
    SET state = 'active', halted_at = NULL, updated_at = now()
    WHERE s.key = %(key)s AND s.state = 'halted'
    RETURNING s.head_id
)
DELETE FROM {schema}.message AS m
USING reactivated AS r
WHERE m.id = r.head_id
RETURNING m.id;

-- name: drop_continued_discards
-- A discarded head whose key moved on (continue_on_discard) is not kept when retention is 0.
DELETE FROM {schema}.message
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'discarded' AND continue_on_discard;

-- ---------------------------------------------------------------------------------------------
-- Broadcast (SPEC §6): exchanges, bindings, routed publishes, queue lifetimes.
-- ---------------------------------------------------------------------------------------------

-- name: declare_exchange
-- exchange.declare: returns the type the exchange has (the stored one when it existed).
-- Index: exchange primary key.
WITH created AS (
    INSERT INTO {schema}.exchange (name, type) VALUES (%(exchange)s, %(type)s)
    ON CONFLICT (name) DO NOTHING
    RETURNING type
)
SELECT type FROM created
UNION ALL
SELECT e.type FROM {schema}.exchange AS e
WHERE e.name = %(exchange)s AND NOT EXISTS (SELECT 1 FROM created);

-- name: exchange_type
-- Index: exchange primary key.
SELECT type FROM {schema}.exchange WHERE name = %(exchange)s;

-- name: delete_exchange
-- exchange.delete: the exchange and its bindings (the queues stay).
-- Index: exchange primary key; binding primary key (exchange first).
WITH unbound AS (
    DELETE FROM {schema}.binding WHERE exchange = %(exchange)s
)
DELETE FROM {schema}.exchange WHERE name = %(exchange)s;

-- name: bind_queue
-- queue.bind. The queue must exist (foreign key): binding an undeclared queue is an error.
-- Index: binding primary key.
INSERT INTO {schema}.binding (exchange, routing_key, queue, pattern)
VALUES (%(exchange)s, %(routing_key)s, %(queue)s, %(pattern)s)
ON CONFLICT (exchange, routing_key, queue) DO UPDATE SET pattern = EXCLUDED.pattern;

-- name: unbind_queue
-- Index: binding primary key.
DELETE FROM {schema}.binding
WHERE exchange = %(exchange)s AND routing_key = %(routing_key)s AND queue = %(queue)s;

-- name: exchange_bindings
-- The routing table of one exchange, as Kombu's get_table: (routing_key, pattern, queue).
-- Index: binding primary key (exchange first).
SELECT routing_key, pattern, queue FROM {schema}.binding WHERE exchange = %(exchange)s;

-- name: fetch_noack
-- basic_consume / basic_get with no_ack: the messages are finished as they are taken (deleted,
-- or kept as 'completed' when retained or unique while completed); at most once, as AMQP's
-- no_ack. Sequenced rows come back flagged: the caller promotes the next of their keys.
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
), deleted AS (
    DELETE FROM {schema}.message AS m
    USING picked
    WHERE m.id = picked.id
      AND NOT %(retain)s::boolean AND coalesce(m.unique_states & 16, 0) = 0
    RETURNING m.id, m.attempt + 1 AS attempt, m.redelivered, m.payload, m.priority,
              m.sequence_key IS NOT NULL AS sequenced
), kept AS (
    UPDATE {schema}.message AS m
    SET state = 'completed', attempt = m.attempt + 1, reserved_at = now(), finished_at = now()
    FROM picked
    WHERE m.id = picked.id
      AND (%(retain)s::boolean OR coalesce(m.unique_states & 16, 0) <> 0)
    RETURNING m.id, m.attempt, m.redelivered, m.payload, m.priority,
              m.sequence_key IS NOT NULL AS sequenced
)
SELECT * FROM (SELECT * FROM deleted UNION ALL SELECT * FROM kept) AS taken
ORDER BY priority DESC, id;

-- name: register_queue_consumers
-- basic_consume: this session (consumer %(owner)s, advisory-locked) consumes these queues.
-- Returns the queues that exist; the caller declares the missing ones again (the cleaner may
-- have deleted a queue between its declaration and this registration).
-- Index: queue_consumer primary key; queue primary key.
WITH registered AS (
    INSERT INTO {schema}.queue_consumer (queue, consumer_id)
    SELECT name, %(owner)s FROM unnest(%(queues)s::text[]) AS q(name)
    ON CONFLICT (queue, consumer_id) DO NOTHING
)
UPDATE {schema}.queue
SET consumed = true, last_used_at = now()
WHERE name = ANY(%(queues)s::text[])
RETURNING name;

-- name: unregister_queue_consumer
-- basic_cancel: returns whether the queue is now to be deleted (auto-delete, and no other
-- consumer is registered).
-- Index: queue_consumer primary key; queue primary key.
WITH gone AS (
    DELETE FROM {schema}.queue_consumer
    WHERE queue = %(queue)s AND consumer_id = %(owner)s
    RETURNING queue
), touched AS (
    UPDATE {schema}.queue AS q
    SET last_used_at = now()
    WHERE q.name = %(queue)s AND EXISTS (SELECT 1 FROM gone)
    RETURNING q.auto_delete
)
SELECT t.auto_delete
       AND NOT EXISTS (SELECT 1 FROM {schema}.queue_consumer AS c
                       WHERE c.queue = %(queue)s AND c.consumer_id <> %(owner)s)
FROM touched AS t;

-- name: reap_dead_queue_consumers
-- Consumer registrations whose session is gone (its advisory lock is free, as for orphaned
-- leases) are removed; their queues count as used until now (x-expires starts from here).
-- Index: queue_consumer_owner_idx; queue primary key.
WITH owners AS (
    SELECT DISTINCT consumer_id AS owner
    FROM {schema}.queue_consumer
    WHERE consumer_id <> %(self)s
), dead AS (
    SELECT owner FROM owners WHERE pg_try_advisory_xact_lock(%(ns)s, owner)
), reaped AS (
    DELETE FROM {schema}.queue_consumer AS c
    USING dead
    WHERE c.consumer_id = dead.owner
    RETURNING c.queue
)
UPDATE {schema}.queue AS q
SET last_used_at = now()
FROM (SELECT DISTINCT queue FROM reaped) AS r
WHERE q.name = r.queue
RETURNING q.name;

-- name: unused_queues
-- Queues whose lifetime is over: x-expires passed without consumers or declarations, or
-- auto-delete queues whose consumers all left. Locked until the caller drops them.
-- Index: queue_lifetime_idx; queue_consumer primary key.
SELECT q.name
FROM {schema}.queue AS q
WHERE (q.expires_ms IS NOT NULL OR q.auto_delete)
  AND ((q.expires_ms IS NOT NULL
        AND q.last_used_at + q.expires_ms * interval '1 millisecond' <= now())
       OR (q.auto_delete AND q.consumed))
  AND NOT EXISTS (SELECT 1 FROM {schema}.queue_consumer AS c WHERE c.queue = q.name)
ORDER BY q.name
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: drop_queues
-- Delete queues that ended (auto-delete, x-expires): the queue, its bindings (cascade), its
-- consumer registrations and its waiting messages. Sequence keys whose head went are
-- repaired by the caller (stale_sequence_heads).
-- Index: queue primary key; queue_consumer primary key; message_fetch_idx and
-- message_scheduled_idx (both lead with queue).
WITH gone AS (
    DELETE FROM {schema}.queue WHERE name = ANY(%(queues)s::text[]) RETURNING name
), consumers AS (
    DELETE FROM {schema}.queue_consumer WHERE queue = ANY(%(queues)s::text[])
), ready AS (
    DELETE FROM {schema}.message AS m
    USING gone
    WHERE m.state = 'available' AND m.queue = gone.name
    RETURNING m.id
), later AS (
    DELETE FROM {schema}.message AS m
    USING gone
    WHERE m.state = 'scheduled' AND m.queue = gone.name
    RETURNING m.id
)
SELECT name, (SELECT count(*) FROM ready) + (SELECT count(*) FROM later) AS dropped
FROM gone;

-- name: publish_routed
-- Publish to fanout and topic exchanges (or a direct one, for callers that route in SQL): for
-- each message of the arrays, one row per bound queue whose binding matches, in one statement,
-- so routing is what the database holds at that instant. A topic binding matches by its pattern
-- (a regular expression, ~). Rows are inserted in publishing order (ids follow ord). Used for a
-- single persistent message, and for the background writer's batches of transient ones
-- (river_broker.broadcaster), which commit without waiting for the WAL flush (durable false).
-- The queue's x-message-ttl applies. One NOTIFY per queue that received messages.
-- Index: binding primary key (exchange first); queue primary key.
WITH commit_mode AS (
    SELECT set_config('synchronous_commit',
                      CASE WHEN %(durable)s::boolean THEN 'on' ELSE 'off' END, true) AS mode
), input AS (
    SELECT *
    FROM unnest(%(kinds)b::text[], %(exchanges)b::text[], %(routing_keys)b::text[],
                %(priorities)b::smallint[], %(run_ats)b::timestamptz[], %(ttls)b::float8[],
                %(task_ids)b::text[], %(task_names)b::text[], %(payloads)b::text[])
         WITH ORDINALITY
         AS t(kind, exchange, routing_key, priority, run_at, ttl, task_id, task_name, payload,
              ord)
), targets AS (
    SELECT DISTINCT i.ord, b.queue
    FROM input AS i
    JOIN {schema}.binding AS b
      ON b.exchange = i.exchange
     AND CASE i.kind
             WHEN 'fanout' THEN true
             WHEN 'topic' THEN i.routing_key ~ b.pattern
             ELSE b.routing_key = i.routing_key
         END
), inserted AS (
    INSERT INTO {schema}.message
        (queue, state, priority, run_at, expires_at, task_id, task_name, payload)
    SELECT t.queue,
           CASE WHEN i.run_at > now() THEN 'scheduled' ELSE 'available' END,
           i.priority,
           coalesce(i.run_at, now()),
           least(CASE WHEN i.ttl IS NULL THEN NULL ELSE now() + make_interval(secs => i.ttl) END,
                 now() + q.message_ttl_ms * interval '1 millisecond'),
           i.task_id,
           i.task_name,
           i.payload
    FROM targets AS t
    JOIN input AS i ON i.ord = t.ord
    CROSS JOIN commit_mode
    LEFT JOIN {schema}.queue AS q ON q.name = t.queue
    ORDER BY t.ord, t.queue
    RETURNING queue, state, run_at
), woken AS (
    SELECT pg_notify(%(channel)s || left(md5(w.queue), 12), 'a' || w.queue)
    FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'available') AS w
), scheduled AS (
    SELECT pg_notify(%(channel)s || left(md5(queue), 12),
                     's' || extract(epoch FROM min(run_at))::text || ' ' || queue)
    FROM inserted WHERE state = 'scheduled' GROUP BY queue
)
SELECT count(*) AS delivered,
       (SELECT count(*) FROM woken) + (SELECT count(*) FROM scheduled) AS woken
FROM inserted;
