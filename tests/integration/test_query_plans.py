"""The hot queries use their indexes on a table with 100k waiting rows."""

from __future__ import annotations

import json

import psycopg
from psycopg import sql

from river_broker.sql import queries_for


def _plan(db: psycopg.Connection, query: sql.Composed, params: dict) -> str:
    # EXPLAIN (no ANALYZE): the fetch is an UPDATE, planning must not change rows.
    rows = db.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params).fetchone()
    return json.dumps(rows[0])


def _fill(db: psycopg.Connection, schema: str) -> None:
    ident = sql.Identifier(schema)
    db.execute(sql.SQL(
        "INSERT INTO {}.message (queue, state, priority, run_at, payload) "
        "SELECT CASE WHEN g % 10 = 0 THEN 'other' ELSE 'celery' END, "
        "       CASE WHEN g % 7 = 0 THEN 'scheduled' ELSE 'available' END, "
        "       g % 10, now() + CASE WHEN g % 7 = 0 THEN interval '1 hour' ELSE interval '0' END,"
        "       '{{}}' FROM generate_series(1, 100000) AS g").format(ident))
    db.execute(sql.SQL("ANALYZE {}.message").format(ident))


def test_fetch_query_uses_its_index_on_100k_waiting_rows(db, schema):
    _fill(db, schema)
    plan = _plan(db, queries_for(schema)["fetch_available"],
                 {"queue": "celery", "limit": 10, "owner": 1})
    assert "message_fetch_idx" in plan
    assert "Seq Scan" not in plan


def test_maintenance_queries_use_their_indexes(db, schema):
    _fill(db, schema)
    q = queries_for(schema)
    promote = _plan(db, q["promote_due_scheduled"],
                    {"queues": ["celery"], "limit": 100, "channel": "x"})
    assert "message_scheduled_idx" in promote and "Seq Scan" not in promote
    rescue = _plan(db, q["rescue_orphaned_leases"], {"self": 1, "ns": 1, "channel": "x"})
    assert "message_reserved_idx" in rescue and "Seq Scan on message" not in rescue
    nxt = _plan(db, q["next_scheduled"], {"queues": ["celery", "other"]})
    assert "message_scheduled_idx" in nxt


def test_consumer_fetch_uses_the_index_on_a_never_analyzed_table(dsn, schema):
    """Stale statistics (the normal state of a queue table) must not turn the fetch into a
    scan-and-sort of the whole queue: consumer sessions rule out bitmap and seq scans."""
    from river_broker.options import TransportOptions
    from river_broker.store import Store

    store = Store(dsn, TransportOptions.from_transport_options({"schema": schema}))
    try:
        store.register_consumer()
        conn = store.conn
        with conn.cursor() as cur:  # many rows, never analyzed: reltuples = -1
            cur.executemany(
                sql.SQL("INSERT INTO {}.message (queue, payload) VALUES ('q', '{{}}')").format(
                    sql.Identifier(schema)), [()] * 5000)
        for name in ("ack_and_fetch", "fetch_available"):
            plan = _plan(conn, queries_for(schema)[name],
                         {"ids": [], "attempts": [], "queue": "q", "limit": 4, "owner": 1,
                          "retain": False})
            assert "message_fetch_idx" in plan
            assert "Bitmap" not in plan and "Seq Scan" not in plan and '"Sort"' not in plan
    finally:
        store.close()


def test_broadcast_queries_use_their_indexes(dsn, schema):
    """Routed publishes, no_ack fetches and queue cleaning on a 100k-row table, planned in a
    consumer session (where the cleaner and the no_ack fetch run)."""
    from river_broker.options import TransportOptions
    from river_broker.store import Store

    store = Store(dsn, TransportOptions.from_transport_options({"schema": schema}))
    try:
        store.register_consumer()
        conn = store.conn
        _fill(conn, schema)
        q = queries_for(schema)
        row = {"priority": 0, "run_at": None, "ttl": None, "task_id": None, "task_name": None,
               "payload": "{}", "durable": False, "notify": True, "channel": "x"}
        for kind in ("fanout", "topic", "direct"):
            routed = _plan(conn, q["publish_routed"], {
                "kinds": [kind, kind], "exchanges": ["celeryev", "celery.pidbox"],
                "routing_keys": ["task.multi", ""], "priorities": [0, 0],
                "run_ats": [None, None], "ttls": [None, None], "task_ids": [None, None],
                "task_names": [None, None], "payloads": ["{}", "{}"], "durable": False,
                "channel": "x"})
            assert "binding_pkey" in routed and "Seq Scan" not in routed
        noack = _plan(conn, q["fetch_noack"], {"queue": "celery", "limit": 10, "retain": False})
        assert "message_fetch_idx" in noack and "Seq Scan" not in noack
        drop = _plan(conn, q["drop_queues"], {"queues": ["other"]})
        assert "message_fetch_idx" in drop and "message_scheduled_idx" in drop
        assert "Seq Scan on message" not in drop
        unused = _plan(conn, q["unused_queues"], {"limit": 100})
        assert "queue_lifetime_idx" in unused
        reap = _plan(conn, q["reap_dead_queue_consumers"], {"self": 1, "ns": 1})
        assert "queue_consumer_owner_idx" in reap
        insert = _plan(conn, q["insert_message"],
                       {**row, "queue": "celery", "bound": True, "unique_key": None,
                        "unique_states": None,
                        "unique_until": None})
        assert "queue_pkey" in insert  # the queue's x-message-ttl: one primary-key probe
    finally:
        store.close()
