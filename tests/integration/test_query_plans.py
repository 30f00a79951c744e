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
