"""Sequences through Kombu against a real PostgreSQL (SPEC §4)."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from kombu import Connection
from psycopg import sql

from river_broker import MessageError, list_sequences, sequences
from river_broker.sql import queries_for
from tests.conftest import count_rows, wait_for


def connect(url, topts, **extra):
    return Connection(url, transport_options={**topts, **extra})


def put(conn, body, key=None, queue="seq", eta=None, task_id=None, **headers):
    if key is not None:
        headers["sequence_key"] = key
    if eta is not None:
        headers["eta"] = eta.isoformat()
    if task_id is not None:
        headers["id"] = task_id
    conn.SimpleQueue(queue).put(body, headers=headers)


def get_all(conn, queue="seq"):
    """Everything fetchable right now, one basic_get at a time (no consumer buffer)."""
    sq = conn.SimpleQueue(queue)
    out = []
    while True:
        try:
            out.append(sq.get_nowait())
        except sq.Empty:
            return out


def states(db, schema):
    return db.execute(sql.SQL(
        "SELECT task_id, state FROM {}.message ORDER BY id").format(
            sql.Identifier(schema))).fetchall()


def bodies(messages):
    return [m.payload for m in messages]


def test_one_at_a_time_per_key_pending_rows_are_never_fetched(url, topts, db, schema):
    with connect(url, topts) as conn:
        for i in range(4):
            put(conn, f"a{i}", key="A")
        for i in range(3):
            put(conn, f"b{i}", key="B")
        put(conn, "u0")
        got = get_all(conn)
        assert sorted(bodies(got)) == ["a0", "b0", "u0"]
        assert count_rows(db, schema, "state = 'pending'") == 5
        for m in got:
            m.ack()


def test_finishing_the_head_promotes_the_next_in_the_same_transaction(url, topts, db, schema):
    with connect(url, topts) as conn:
        for i in range(3):
            put(conn, f"a{i}", key="A")
        order = []
        for _ in range(3):
            (head,) = get_all(conn)
            order.append(head.payload)
            head.ack()
            conn.transport.consumer.flush_acks()  # the ack and the promotion commit together
        assert order == ["a0", "a1", "a2"]
        assert count_rows(db, schema) == 0
        assert not db.execute(sql.SQL("SELECT * FROM {}.sequence").format(
            sql.Identifier(schema))).fetchall()


def test_concurrent_publishers_of_one_key_keep_commit_order(url, topts):
    def publish(n):
        with connect(url, topts) as conn:
            for i in range(40):
                put(conn, {"p": n, "i": i}, key="hot")

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with connect(url, topts) as conn:
        seen = []
        while len(seen) < 240:
            (head,) = get_all(conn)
            row_id = int(head.delivery_tag.split(":")[0])
            seen.append((head.payload["p"], head.payload["i"], row_id))
            head.ack()
            conn.transport.consumer.flush_acks()
    ids = [s[2] for s in seen]
    assert ids == sorted(ids)  # delivered in id (= commit) order
    for n in range(6):  # and each publisher's messages in the order it published them
        assert [i for p, i, _ in seen if p == n] == list(range(40))


def test_requeue_returns_the_head_and_the_key_stays_blocked(url, topts):
    with connect(url, topts) as conn:
        put(conn, "a0", key="A")
        put(conn, "a1", key="A")
        (head,) = get_all(conn)
        head.requeue()
        (again,) = get_all(conn)
        assert again.payload == "a0" and again.delivery_info["redelivered"]
        again.ack()


def test_dead_consumers_head_comes_back_first(url, topts, db):
    dead = connect(url, topts)
    put(dead, "a0", key="A")
    put(dead, "a1", key="A")
    assert bodies(get_all(dead)) == ["a0"]  # leased to the consumer about to die
    db.execute("SELECT pg_terminate_backend(%s)", (dead.transport.store.conn.info.backend_pid,))
    with connect(url, topts) as live:
        def rescued():
            live.transport.store.rescue_orphaned_leases()  # what a consumer's poll runs
            return get_all(live)

        msgs = wait_for(rescued, 10, "the rescued head")
        assert bodies(msgs) == ["a0"]
        assert msgs[0].delivery_info["redelivered"]
        msgs[0].ack()
        live.transport.consumer.flush_acks()
        assert bodies(get_all(live)) == ["a1"]


def test_discard_halts_the_key_resume_reruns_and_skip_moves_on(url, dsn, topts, db, schema):
    with connect(url, topts) as conn:
        for i in range(3):
            put(conn, f"a{i}", key="A")
        put(conn, "b0", key="B")
        got = {m.payload: m for m in get_all(conn)}
        got["a0"].reject()  # discard: halts A
        got["b0"].ack()
        conn.transport.consumer.flush_acks()
        assert get_all(conn) == []  # A is halted, B is empty
        (info,) = list_sequences(dsn, schema=schema)
        assert (info.key, info.state, info.pending, info.head_state) == ("A", "halted", 2,
                                                                          "discarded")

        assert sequences.resume(dsn, "A", schema=schema)
        (rerun,) = get_all(conn)
        assert rerun.payload == "a0" and rerun.delivery_info["redelivered"]
        rerun.reject()  # fails again: halted again
        assert list_sequences(dsn, schema=schema, state="halted")[0].key == "A"

        assert sequences.skip(dsn, "A", schema=schema)
        (nxt,) = get_all(conn)
        assert nxt.payload == "a1"
        assert not sequences.skip(dsn, "A", schema=schema)  # not halted now
        nxt.ack()


def test_continue_on_discard_lets_the_key_move_on(url, topts, db, schema):
    with connect(url, topts) as conn:
        put(conn, "a0", key="A", sequence_continue_on_discard=True)
        put(conn, "a1", key="A")
        (head,) = get_all(conn)
        head.reject()
        assert bodies(get_all(conn)) == ["a1"]
        assert count_rows(db, schema, "state = 'discarded'") == 0  # retention 0: not kept


def test_retry_of_the_head_takes_over_its_place_and_keeps_the_key_blocked(url, topts, db,
                                                                          schema):
    with connect(url, topts) as conn:
        put(conn, "a0", key="A", task_id="t0")
        put(conn, "a1", key="A", task_id="t1")
        (head,) = get_all(conn)
        # What Celery's retry() does: publish the same task id (countdown 1 s), then ack.
        due = datetime.now(timezone.utc) + timedelta(seconds=1)
        put(conn, "a0-retry", key="A", task_id="t0", eta=due)
        head.ack()
        conn.transport.consumer.flush_acks()
        assert get_all(conn) == []  # the retry is the head, waiting for its countdown
        assert states(db, schema) == [("t1", "pending"), ("t0", "scheduled")]
        sq = conn.SimpleQueue("seq")
        retry = sq.get(timeout=10)
        assert retry.payload == "a0-retry"
        assert datetime.now(timezone.utc) >= due - timedelta(milliseconds=10)
        retry.ack()
        conn.transport.consumer.flush_acks()
        assert bodies(get_all(conn)) == ["a1"]


def test_eta_head_blocks_its_key_but_nothing_else(url, topts):
    later = datetime.now(timezone.utc) + timedelta(seconds=60)
    with connect(url, topts) as conn:
        put(conn, "a0-later", key="A", eta=later)
        put(conn, "a1", key="A")
        put(conn, "b0", key="B")
        put(conn, "u0")
        assert sorted(bodies(get_all(conn))) == ["b0", "u0"]


def test_eta_message_behind_the_head_blocks_only_once_it_is_the_head(url, topts):
    later = datetime.now(timezone.utc) + timedelta(seconds=60)
    with connect(url, topts) as conn:
        put(conn, "a0", key="A")
        put(conn, "a1-later", key="A", eta=later)
        put(conn, "a2", key="A")
        (head,) = get_all(conn)
        assert head.payload == "a0"
        head.ack()
        conn.transport.consumer.flush_acks()
        assert get_all(conn) == []  # a1 is now the head and not due: a2 waits behind it


@pytest.mark.parametrize(("value", "message"), [
    (42, "must be a string"), ("", "must not be empty"), ("k" * 600, "600 bytes"),
])
def test_bad_sequence_key_header_fails_at_publish(url, topts, db, schema, value, message):
    with connect(url, topts) as conn, pytest.raises(MessageError, match=message):
        put(conn, "x", key=value)
    assert count_rows(db, schema) == 0  # nothing half-written


def test_purge_repairs_keys_whose_head_went(url, topts, db, schema):
    with connect(url, topts) as conn:
        put(conn, "a0", key="A", queue="gone")
        put(conn, "a1", key="A", queue="kept")
        conn.SimpleQueue("gone").queue.purge()
        assert bodies(get_all(conn, "kept")) == ["a1"]


def test_hot_key_backlog_is_never_read_by_the_fetch(url, topts, db, schema):
    ident = sql.Identifier(schema)
    with connect(url, topts) as conn:
        put(conn, "hot-head", key="hot")
        db.execute(sql.SQL(
            "INSERT INTO {}.message (queue, state, sequence_key, payload) "
            "SELECT 'seq', 'pending', 'hot', '{{}}' FROM generate_series(1, 10000)").format(ident))
        db.execute(sql.SQL("ANALYZE {}.message").format(ident))
        put(conn, "u0")
        assert sorted(bodies(get_all(conn))) == ["hot-head", "u0"]
    # The plan of the fetch, executed and rolled back: it reads no pending row at all.
    with db.transaction(force_rollback=True):
        plan = db.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ")
                          + queries_for(schema)["fetch_available"],
                          {"queue": "seq", "limit": 10, "owner": 1}).fetchone()[0]
    text = json.dumps(plan)
    assert "message_fetch_idx" in text and "Seq Scan" not in text
    assert '"Rows Removed by Filter": 10000' not in text


def test_promotion_reads_one_pending_row_through_its_index(db, schema):
    ident = sql.Identifier(schema)
    db.execute(sql.SQL(
        "INSERT INTO {}.message (queue, state, sequence_key, payload) "
        "SELECT 'q', 'pending', 'k' || (g % 1000), '{{}}' FROM generate_series(1, 100000) g"
    ).format(ident))
    db.execute(sql.SQL("INSERT INTO {}.sequence (key, head_id) VALUES ('k1', 1)").format(ident))
    db.execute(sql.SQL("ANALYZE {}.message").format(ident))
    plan = json.dumps(db.execute(sql.SQL("EXPLAIN (FORMAT JSON) ")
                                 + queries_for(schema)["promote_next_in_sequence"],
                                 {"ids": [1], "channel": "x"}).fetchone()[0])
    assert "message_sequence_pending_idx" in plan
    assert "Seq Scan on message" not in plan


def test_unsequenced_messages_are_not_delayed_by_a_busy_key(url, topts):
    with connect(url, topts) as conn:
        for i in range(50):
            put(conn, f"a{i}", key="A")
        for i in range(5):
            put(conn, f"u{i}")
        t0 = time.monotonic()
        got = bodies(get_all(conn))
        assert sorted(got) == ["a0", "u0", "u1", "u2", "u3", "u4"]
        assert time.monotonic() - t0 < 30  # sanity bound only: no sleep, no polling involved


def test_finished_head_is_written_at_once_when_the_worker_would_wait(url, topts, db, schema):
    """Batched acks must not slow a hot key: with nothing else in hand, the ack of a head
    (and the promotion of the next) is due immediately, not after ack_flush_interval."""
    with connect(url, topts, ack_flush_interval=3600) as conn:
        put(conn, "a0", key="A")
        put(conn, "a1", key="A")
        consumer = conn.transport.consumer
        (head,) = get_all(conn)
        head.ack()
        assert consumer.completer.due(time.monotonic())
        assert consumer.next_wakeup() <= time.monotonic()
        consumer.pump()
        assert count_rows(db, schema, "state = 'available'") == 1  # a1 promoted already


def test_retention_cleaner_keeps_the_failed_head_of_a_halted_key(url, dsn, topts, schema):
    with connect(url, topts, retention=0.001) as conn:
        put(conn, "a0", key="A")
        put(conn, "a1", key="A")
        (head,) = get_all(conn)
        head.reject()  # halts A; the discarded head is retained as a finished row
        time.sleep(0.05)  # past the (tiny) retention period: the behaviour under test
        conn.transport.store.clean()
        assert sequences.resume(dsn, "A", schema=schema)
        (again,) = get_all(conn)
        assert again.payload == "a0"
        again.ack()


def test_a_vanished_head_never_lets_a_new_message_overtake_older_ones(url, topts, db, schema):
    with connect(url, topts) as conn:
        put(conn, "a0", key="A")
        put(conn, "a1", key="A")
        db.execute(sql.SQL("DELETE FROM {}.message WHERE state = 'available'").format(
            sql.Identifier(schema)))  # the head vanishes by hand
        put(conn, "a2", key="A")
        assert get_all(conn) == []  # a2 did not become the head ahead of a1
        conn.transport.store.repair_sequences()  # what the maintenance runs
        assert bodies(get_all(conn)) == ["a1"]
