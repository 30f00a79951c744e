"""Unique messages, batch and transactional enqueue, against a real PostgreSQL (SPEC §5)."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from kombu import Connection, Consumer, Queue
from psycopg import sql

import river_broker
from river_broker import ConfigurationError, MessageError, Unique, enqueue, enqueue_many
from river_broker.unique import period_of
from tests.conftest import count_rows


def connect(url, topts, **extra):
    return Connection(url, transport_options={**topts, **extra})


def put(conn, body, queue="uq", **headers):
    conn.SimpleQueue(queue).put(body, headers=headers)


def rows(db, schema):
    return db.execute(sql.SQL("SELECT task_id, state, unique_key FROM {}.message ORDER BY id")
                      .format(sql.Identifier(schema))).fetchall()


def test_duplicate_is_not_inserted_and_does_not_raise(url, topts, db, schema):
    before = river_broker.duplicates_total()
    with connect(url, topts) as conn:
        put(conn, "a", unique_key="k1", id="t1")
        put(conn, "b", unique_key="k1", id="t2")  # refused, silently for the caller
        put(conn, "c", unique_key="k2", id="t3")
    assert [r[0] for r in rows(db, schema)] == ["t1", "t3"]
    assert river_broker.duplicates_total() == before + 1


def test_default_states_refuse_while_waiting_or_running_and_allow_after(url, topts, db, schema):
    with connect(url, topts) as conn:
        put(conn, "a", unique_key="k", id="t1")
        sq = conn.SimpleQueue("uq")
        msg = sq.get_nowait()  # reserved (running)
        put(conn, "b", unique_key="k", id="t2")
        assert count_rows(db, schema) == 1
        msg.ack()
        conn.transport.consumer.flush_acks()
        put(conn, "c", unique_key="k", id="t3")  # finished: a new one is welcome
        assert [r[0] for r in rows(db, schema)] == ["t3"]


WAITING = ["available", "scheduled", "pending"]


def test_custom_states_at_most_one_waiting(url, topts, db, schema):
    with connect(url, topts) as conn:
        put(conn, "a", unique_key="k", unique_states=WAITING, id="t1")
        put(conn, "b", unique_key="k", unique_states=WAITING, id="t2")  # refused
        running = conn.SimpleQueue("uq").get_nowait()  # t1 runs: it no longer holds the key
        put(conn, "c", unique_key="k", unique_states=WAITING, id="t3")  # allowed
        assert [r[0] for r in rows(db, schema)] == ["t1", "t3"]
        running.requeue()  # t1 comes back while t3 waits: t1 gives its key up, nothing fails
        assert rows(db, schema) == [("t1", "available", None), ("t3", "available", "k")]


def test_completed_state_refuses_repeats_until_the_period_ends(url, topts, db, schema):
    until = datetime.now(timezone.utc) + timedelta(hours=1)
    states = [*WAITING, "reserved", "completed"]
    with connect(url, topts) as conn:
        put(conn, "a", unique_key="rep", unique_states=states, unique_until=until.isoformat(),
            id="t1")
        conn.SimpleQueue("uq").get_nowait().ack()
        conn.transport.consumer.flush_acks()
        assert rows(db, schema) == [("t1", "completed", "rep")]  # kept, as completed
        put(conn, "b", unique_key="rep", unique_states=states, unique_until=until.isoformat(),
            id="t2")
        assert [r[0] for r in rows(db, schema)] == ["t1"]
        db.execute(sql.SQL("UPDATE {}.message SET unique_until = now() - interval '1 s'").format(
            sql.Identifier(schema)))  # the period is over
        conn.transport.store.clean()
        assert rows(db, schema) == []


@pytest.mark.parametrize(("headers", "message"), [
    ({"unique_key": 5}, "'unique_key' must be a string"),
    ({"unique_key": "k", "unique_states": ["available", "runing"]}, "unknown unique state"),
    ({"unique_key": "k", "unique_states": ["available"]}, "every waiting state"),
    ({"unique_key": "k", "unique_states": [*WAITING, "completed"]}, "must include 'reserved'"),
    ({"unique_key": "k", "unique_states": [*WAITING, "reserved", "completed"]}, "need an end"),
])
def test_bad_unique_headers_fail_at_publish(url, topts, db, schema, headers, message):
    with connect(url, topts) as conn, pytest.raises(MessageError, match=message):
        put(conn, "x", **headers)
    assert count_rows(db, schema) == 0


def _race(url, topts, n, barrier):
    barrier.wait()
    with connect(url, topts) as conn:
        for i in range(20):
            put(conn, i, unique_key="raced", id=f"p{n}-{i}")


def test_racing_publishers_in_several_processes_enqueue_a_key_once(url, topts, db, schema):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=_race, args=(url, topts, n, barrier)) for n in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert count_rows(db, schema, "unique_key = 'raced'") == 1


def test_period_buckets_are_utc_aligned():
    start, end = period_of(datetime(2026, 12, 4, 10, 59, 59, tzinfo=timezone.utc), 3600)
    assert (start, end) == (datetime(2026, 12, 4, 10, tzinfo=timezone.utc),
                            datetime(2026, 12, 4, 11, tzinfo=timezone.utc))
    assert period_of(datetime(2026, 12, 4, 11, tzinfo=timezone.utc), 3600)[0] == end
    local = datetime(2026, 12, 4, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    assert period_of(local, 3600)[0] == datetime(2026, 12, 4, 10, tzinfo=timezone.utc)


def test_bad_unique_options_fail_clearly():
    with pytest.raises(ConfigurationError, match="unknown state"):
        Unique(states=["available", "done"])
    with pytest.raises(ConfigurationError, match="by_period"):
        Unique(by_period=0)
    with pytest.raises(ConfigurationError, match="give it a by_period"):
        Unique(states=[*WAITING, "reserved", "completed"])
    with pytest.raises(ConfigurationError, match="every waiting state"):
        Unique(states=["available", "reserved"])


# -- the Celery integration, batch and transactional enqueue ---------------------------------

def test_delay_twice_enqueues_once_and_the_api_says_which(celery_app, db, schema):
    from tests.apps.tasks import sync_account

    first = enqueue(sync_account.s(7))
    second = enqueue(sync_account.s(7, note="again"))
    sync_account.delay(7)  # plain delay: no error
    other = enqueue(sync_account.s(8))
    assert first.inserted and other.inserted
    assert (second.inserted, second.duplicate_of) == (False, first.task_id)
    assert count_rows(db, schema) == 2


def test_key_period_follows_the_eta(celery_app, db, schema):
    from tests.apps.tasks import hourly_report

    # ETAs inside one period, whatever the time of day the test runs at.
    next_period = period_of(datetime.now(timezone.utc), 3600)[1] + timedelta(hours=1)
    a = enqueue(hourly_report.s(1))
    b = enqueue(hourly_report.s(1).set(eta=next_period + timedelta(minutes=10)))
    c = enqueue(hourly_report.s(1).set(eta=next_period + timedelta(minutes=20)))
    assert a.inserted and b.inserted
    assert (c.inserted, c.duplicate_of) == (False, b.task_id)
    keys = [r[2] for r in rows(db, schema)]
    assert all("period=" in k for k in keys) and keys[0] != keys[1]


def test_batch_keeps_uniqueness_per_row_inside_and_across_batches(celery_app, db, schema):
    from tests.apps.tasks import sync_account, work

    first = enqueue_many([sync_account.s(1), sync_account.s(2), sync_account.s(1),
                          work.s("plain")])
    assert [r.inserted for r in first] == [True, True, False, True]
    assert first[2].duplicate_of == first[0].task_id  # a duplicate inside the batch
    second = enqueue_many([sync_account.s(2), sync_account.s(3)])
    assert [r.inserted for r in second] == [False, True]
    assert second[0].duplicate_of == first[1].task_id  # across batches
    assert count_rows(db, schema) == 4


def test_batch_of_sequenced_and_plain_messages_keeps_order(celery_app, url, topts, schema):
    from tests.apps.tasks import seq_step

    results = enqueue_many([seq_step.s("c1", n) for n in range(5)])
    assert all(r.inserted for r in results)
    with connect(url, topts) as conn:
        got = conn.SimpleQueue("celery").get_nowait()
        assert got.headers["id"] == results[0].task_id
        assert conn.SimpleQueue("celery").qsize() == 4  # the rest wait behind it


def _wait_for_one(url, topts, queue, timeout):
    with connect(url, topts, polling_interval=60) as conn:
        got = []
        callbacks = [lambda b, m: (got.append(m), m.ack())]
        with Consumer(conn, [Queue(queue)], callbacks=callbacks), \
                contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=timeout)
        return got


def test_transactional_enqueue_rolled_back_leaves_nothing_and_wakes_nobody(
        celery_app, dsn, url, topts, db, schema):
    from tests.apps.tasks import work

    woken = []
    waiter = threading.Thread(target=lambda: woken.extend(_wait_for_one(url, topts, "celery",
                                                                        1.5)))
    waiter.start()
    with psycopg.connect(dsn) as conn, pytest.raises(RuntimeError), conn.transaction():
        enqueue(work.s("never"), connection=conn)
        raise RuntimeError("the caller's transaction fails")
    waiter.join()
    assert woken == []
    assert count_rows(db, schema) == 0


def test_transactional_enqueue_committed_wakes_a_waiting_worker(celery_app, dsn, url, topts, db,
                                                                schema):
    from tests.apps.tasks import work

    woken = []
    waiter = threading.Thread(target=lambda: woken.extend(_wait_for_one(url, topts, "celery",
                                                                        20)))
    waiter.start()
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("CREATE TEMP TABLE orders (id int)")
        conn.execute("INSERT INTO orders VALUES (1)")
        result = enqueue(work.s("receipt"), connection=conn)
        assert count_rows(db, schema) == 0  # not visible before the caller commits
    waiter.join()
    assert [m.headers["id"] for m in woken] == [result.task_id]


def test_unique_and_sequence_compose(celery_app, db, schema):
    from tests.apps.tasks import sync_customer

    a = enqueue(sync_customer.s("cus_1", 0))  # head (available): unique state
    b = enqueue(sync_customer.s("cus_1", 1))  # duplicate of a
    assert a.inserted and (b.inserted, b.duplicate_of) == (False, a.task_id)
    assert db.execute(sql.SQL("SELECT count(*) FROM {}.sequence").format(
        sql.Identifier(schema))).fetchone()[0] == 1


def test_raw_kombu_messages_batch_with_per_row_results(url, topts, db, schema):
    from river_broker import RawMessage, enqueue_messages

    with connect(url, topts) as conn:
        results = enqueue_messages(conn, "raw", [
            {"n": 1},
            RawMessage({"n": 2}, headers={"unique_key": "u"}, priority=9),
            RawMessage({"n": 3}, headers={"unique_key": "u"}),  # duplicate inside the batch
        ])
        assert [r.inserted for r in results] == [True, True, False]
        assert results[2].duplicate_of == results[1].task_id
        sq = conn.SimpleQueue("raw")
        got = [sq.get(timeout=5) for _ in range(2)]
        assert [m.payload for m in got] == [{"n": 2}, {"n": 1}]  # priority 9 first
        for m in got:
            m.ack()


def test_a_finished_holder_past_its_period_does_not_block_before_cleaning(url, topts, db,
                                                                           schema):
    states = [*WAITING, "reserved", "completed"]
    until = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    with connect(url, topts) as conn:
        put(conn, "a", unique_key="p", unique_states=states, unique_until=until, id="t1")
        conn.SimpleQueue("uq").get_nowait().ack()
        conn.transport.consumer.flush_acks()
        db.execute(sql.SQL("UPDATE {}.message SET unique_until = now() - interval '1 s'")
                   .format(sql.Identifier(schema)))  # period over; the cleaner has not run
        put(conn, "b", unique_key="p", unique_states=states, unique_until=until, id="t2")
    assert [r[0] for r in rows(db, schema)] == ["t2"]


def test_retention_and_uniqueness_each_keep_what_they_promise(url, topts, db, schema):
    past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    with connect(url, topts, retention=3600) as conn:
        # unique only while unfinished, with a period: retention alone decides after the ack
        put(conn, "a", unique_key="x", unique_until=past, id="t1")
        conn.SimpleQueue("uq").get_nowait().ack()
        conn.transport.consumer.flush_acks()
        conn.transport.store.clean()
        assert [r[:2] for r in rows(db, schema)] == [("t1", "completed")]


def test_unique_option_refuses_an_always_empty_key():
    with pytest.raises(ConfigurationError, match="every task would share one key"):
        Unique(by_args=False, exclude_task_name=True)


def test_batch_duplicates_are_counted_and_logged_too(celery_app, caplog):
    from tests.apps.tasks import sync_account

    before = river_broker.duplicates_total()
    with caplog.at_level("INFO", logger="river_broker"):
        results = enqueue_many([sync_account.s(5), sync_account.s(5)])
    assert [r.inserted for r in results] == [True, False]
    assert river_broker.duplicates_total() == before + 1
    assert f"duplicate of task {results[0].task_id}" in caplog.text
