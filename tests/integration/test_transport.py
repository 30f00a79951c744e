"""The transport through Kombu's API, against a real PostgreSQL (SPEC §1-§3)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import datetime, timezone

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from psycopg import sql

import river_broker
from river_broker import ConfigurationError, SchemaError
from tests.conftest import count_rows, wait_for


def connect(url, topts, **extra):
    return Connection(url, transport_options={**topts, **extra})


def rows(db, schema, columns="id, state, attempt, redelivered", where="true"):
    return db.execute(
        sql.SQL(f"SELECT {columns} FROM {{}}.message WHERE {where} ORDER BY id").format(
            sql.Identifier(schema))
    ).fetchall()


# -- plugging in (SPEC §1) -------------------------------------------------------------------

def test_river_url_alias_selects_the_transport(url, topts):
    with connect(url, topts) as conn:
        conn.connect()
        assert type(conn.transport).__module__ == "river_broker.transport"
        assert conn.transport.driver_type == "river"


def test_transport_path_with_plain_postgresql_url_needs_no_import(dsn, topts):
    with Connection(dsn, transport="river_broker:Transport", transport_options=topts) as conn:
        q = conn.SimpleQueue("plain")
        q.put({"n": 1})
        assert q.get(timeout=5).payload == {"n": 1}
        q.close()


def test_libpq_query_parameters_reach_the_server(dsn, topts, db):
    sep = "&" if "?" in dsn else "?"
    with Connection(f"river+{dsn}{sep}application_name=from_url_param",
                    transport_options={k: v for k, v in topts.items()
                                       if k != "application_name"}) as conn:
        conn.connect()
        names = {r[0] for r in db.execute("SELECT application_name FROM pg_stat_activity")}
        assert "from_url_param" in names


def test_driver_type_is_not_sql_and_connection_errors_include_psycopg(url, topts):
    with connect(url, topts) as conn:
        assert conn.transport.driver_type != "sql"
        assert psycopg.OperationalError in conn.connection_errors
        assert psycopg.InterfaceError in conn.connection_errors


def test_bad_url_scheme_is_a_clear_error(topts):
    with pytest.raises(ConfigurationError, match="postgresql:// URL"):
        Connection("river+mysql://u:pw@h/db", transport_options=topts).connect()


def test_unknown_transport_option_is_an_error(url, topts):
    with pytest.raises(ConfigurationError, match="unknown river_broker transport option 'schmea'"):
        Connection(url, transport_options={"schmea": "x"}).connect()


def test_missing_schema_with_auto_migrate_off_names_the_command(url, db):
    with pytest.raises(SchemaError, match=r"missing and auto_migrate is off: run `river-broker "
                                          r"migrate --schema never_created"):
        Connection(url, transport_options={"schema": "never_created",
                                           "auto_migrate": False}).connect()
    assert not db.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'never_created'").fetchone()


def test_unreachable_server_is_a_connection_error(topts):
    conn = Connection("river+postgresql://127.0.0.1:1/nowhere?connect_timeout=2",
                      transport_options=topts)
    with pytest.raises(psycopg.OperationalError):
        conn.transport.establish_connection()


def test_auto_migrate_creates_the_schema_on_first_connect(url, dsn, db):
    from river_broker import migrate

    name = "auto_" + str(int(time.time() * 1000))[-8:]
    try:
        with Connection(url, transport_options={"schema": name}) as conn:
            conn.connect()
        assert db.execute(sql.SQL("SELECT max(version) FROM {}.schema_migration").format(
            sql.Identifier(name))).fetchone()[0] == migrate.latest_version()
    finally:
        db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


# -- messages and delivery (SPEC §2) --------------------------------------------------------

def test_publish_is_durable_when_it_returns(url, topts, db, schema):
    with connect(url, topts) as conn:
        conn.SimpleQueue("durable").put({"x": 1})
        # another session sees the committed row at once
        assert count_rows(db, schema, "queue = 'durable'") == 1


def test_direct_exchange_routes_by_binding(url, topts):
    ex = Exchange("orders", type="direct")
    q = Queue("orders.created", ex, routing_key="created")
    with connect(url, topts) as conn:
        producer = Producer(conn, exchange=ex)
        producer.publish({"id": 7}, routing_key="created", declare=[q])
        got = []
        with Consumer(conn, [q], callbacks=[lambda body, m: (got.append(body), m.ack())]):
            conn.drain_events(timeout=5)
        assert got == [{"id": 7}]


def test_drain_events_is_woken_by_notify_not_by_polling(url, topts):
    # The fallback poll is 60 s: only LISTEN/NOTIFY can deliver within drain_events' 10 s.
    with connect(url, topts, polling_interval=60) as consumer_conn, \
            connect(url, topts) as producer_conn:
        q = Queue("wake")
        got = []
        with Consumer(consumer_conn, [q], callbacks=[lambda b, m: (got.append(b), m.ack())]):
            with pytest.raises(socket.timeout):
                consumer_conn.drain_events(timeout=0.3)  # nothing yet: blocks, then times out
            threading.Timer(0.2, lambda: producer_conn.SimpleQueue("wake").put("hi")).start()
            consumer_conn.drain_events(timeout=10)
        assert got == ["hi"]


def test_priority_orders_delivery_9_is_highest(url, topts):
    with connect(url, topts) as conn:
        q = conn.SimpleQueue("prio")
        for i, prio in enumerate([0, 9, 5, 9, 0, 5]):
            q.put({"i": i, "p": prio}, priority=prio)
        got = [q.get(timeout=5) for _ in range(6)]
        for m in got:
            m.ack()
        assert [(m.payload["p"], m.payload["i"]) for m in got] == [
            (9, 1), (9, 3), (5, 2), (5, 5), (0, 0), (0, 4)]


def test_prefetch_bounds_how_many_rows_are_leased(url, topts, db, schema):
    with connect(url, topts) as conn:
        sq = conn.SimpleQueue("qos")
        for i in range(50):
            sq.put(i)
        received = []
        consumer = Consumer(conn, [Queue("qos")], callbacks=[lambda b, m: received.append(m)])
        consumer.qos(prefetch_count=5)
        with consumer:
            conn.drain_events(timeout=5)
            assert len(received) == 5
            assert count_rows(db, schema, "state = 'reserved'") == 5
            for m in received:
                m.ack()
            conn.drain_events(timeout=5)  # acks free the slots: the next batch comes
            assert len(received) == 10
            for m in received[5:]:
                m.ack()
        conn.transport.consumer.flush_acks()
        assert count_rows(db, schema) == 40


def test_acks_are_batched_and_flushed_on_close(url, topts, db, schema):
    with connect(url, topts, ack_flush_interval=60) as conn:
        sq = conn.SimpleQueue("batch")
        for i in range(20):
            sq.put(i)
        for _ in range(20):
            sq.get(timeout=5).ack()
        assert conn.transport.consumer.completer.pending() > 0  # buffered, not yet written
    assert count_rows(db, schema) == 0  # close flushed them


def test_reject_requeue_puts_the_same_row_back_at_the_head(url, topts, db, schema):
    with connect(url, topts) as conn:
        sq = conn.SimpleQueue("requeue")
        for i in range(3):
            sq.put(i)
        first = sq.get_nowait()  # basic_get: one row, no consumer-side buffer
        first_id = int(first.delivery_tag.split(":")[0])
        first.requeue()
        again = sq.get_nowait()
        assert again.payload == 0
        assert int(again.delivery_tag.split(":")[0]) == first_id
        assert again.delivery_tag == f"{first_id}:2"
        assert again.delivery_info["redelivered"] is True
        assert count_rows(db, schema) == 3  # no copy was added
        again.ack()


def test_reject_without_requeue_discards(url, topts, db, schema):
    with connect(url, topts) as conn:
        sq = conn.SimpleQueue("discard")
        sq.put("x")
        sq.get(timeout=5).reject()
        assert count_rows(db, schema) == 0


def test_retention_keeps_finished_rows_as_completed_and_discarded(url, topts, db, schema):
    with connect(url, topts, retention=3600) as conn:
        sq = conn.SimpleQueue("keep")
        sq.put("a")
        sq.put("b")
        sq.get(timeout=5).ack()
        sq.get(timeout=5).reject()
    assert [r[1] for r in rows(db, schema)] == ["completed", "discarded"]


def test_restore_at_shutdown_returns_unacked_rows(url, topts, db, schema):
    conn = connect(url, topts)
    sq = conn.SimpleQueue("restore")
    for i in range(4):
        sq.put(i)
    got = []
    consumer = Consumer(conn, [Queue("restore")], callbacks=[lambda b, m: got.append(m)])
    consumer.qos(prefetch_count=4)
    consumer.consume()
    conn.drain_events(timeout=5)
    assert len(got) == 4
    got[0].ack()
    conn.close()  # three unacked: restored, same rows, marked redelivered
    left = rows(db, schema)
    assert [r[1] for r in left] == ["available"] * 3
    assert all(r[3] for r in left)


def test_eta_message_is_scheduled_not_delivered_early(url, topts, db, schema):
    with connect(url, topts) as conn:
        sq = conn.SimpleQueue("eta")
        due = time.time() + 1.5
        eta = datetime.fromtimestamp(due, timezone.utc).isoformat()
        sq.put("later", headers={"eta": eta})
        sq.put("now")
        assert [r[1] for r in rows(db, schema)] == ["scheduled", "available"]
        assert sq.get(timeout=5).payload == "now"
        m = sq.get(timeout=10)
        assert m.payload == "later"
        assert time.time() >= due - 0.01  # never before it is due (0.01: clock rounding)
        m.ack()


def test_expired_kombu_ttl_is_never_delivered(url, topts, db, schema):
    with connect(url, topts) as conn:
        sq = conn.SimpleQueue("ttl")
        sq.put("short", expiration=0.05)
        sq.put("long", expiration=60)
        time.sleep(0.2)  # let the first TTL pass (this sleep is the behaviour under test)
        assert sq.get(timeout=5).payload == "long"
        with pytest.raises(sq.Empty):
            sq.get(timeout=0.5)
        conn.transport.store.clean()
        assert count_rows(db, schema, "queue = 'ttl' AND state = 'available'") == 0


def test_size_purge_and_delete(url, topts, db, schema):
    with connect(url, topts) as conn:
        q = Queue("admin")
        ch = conn.channel()
        q(ch).declare()
        sq = conn.SimpleQueue("admin")
        for i in range(7):
            sq.put(i)
        assert q(ch).queue_declare(passive=True).message_count == 7
        assert q(ch).purge() == 7
        sq.put("x")
        q(ch).delete()
        assert count_rows(db, schema, "queue = 'admin'") == 0
        assert not db.execute(sql.SQL("SELECT 1 FROM {}.queue WHERE name = 'admin'").format(
            sql.Identifier(schema))).fetchone()


def test_acks_from_other_threads_are_safe(url, topts, db, schema):
    with connect(url, topts) as conn:
        sq = conn.SimpleQueue("threads")
        for i in range(400):
            sq.put(i)
        messages = [sq.get(timeout=5) for _ in range(400)]
        threads = [threading.Thread(target=lambda ms: [m.ack() for m in ms],
                                    args=(messages[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert count_rows(db, schema) == 0


# -- leases and fencing (SPEC §3) ---------------------------------------------------------

def test_two_competing_consumers_never_receive_the_same_message(url, topts):
    with connect(url, topts) as producer:
        sq = producer.SimpleQueue("compete")
        for i in range(2000):
            sq.put(i)
    seen: dict[int, list[str]] = {}
    lock = threading.Lock()

    def consume(name):
        with connect(url, topts) as conn:
            def on(body, m):
                with lock:
                    seen.setdefault(body, []).append(name)
                m.ack()
            with Consumer(conn, [Queue("compete")], callbacks=[on]) as c:
                c.qos(prefetch_count=50)
                while True:
                    try:
                        conn.drain_events(timeout=1)
                    except TimeoutError:
                        return

    threads = [threading.Thread(target=consume, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(2000))
    assert all(len(v) == 1 for v in seen.values())
    assert {n for v in seen.values() for n in v} == {"a", "b"}


def test_dead_consumers_lease_is_rescued_and_its_stale_ack_ignored(url, topts, db, schema, caplog):
    dead = connect(url, topts)
    dead.SimpleQueue("lease").put("job")
    msg = dead.SimpleQueue("lease").get(timeout=5)
    pid = dead.transport.store.conn.info.backend_pid
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))

    with connect(url, topts) as live:
        sq = live.SimpleQueue("lease")
        again = wait_for(lambda: _try_get(sq), 10, "the rescued message")
        assert again.payload == "job"
        assert again.delivery_tag.endswith(":2") and again.delivery_info["redelivered"]
        # The old delivery's ack arrives late (its session is gone): it must not finish
        # the new attempt.
        with caplog.at_level(logging.WARNING, logger="river_broker"):
            dead.transport._closed = True  # the old transport is closed: late-ack path
            msg.ack()
        assert "ack ignored" in caplog.text
        assert count_rows(db, schema, "state = 'reserved'") == 1
        again.ack()
    assert count_rows(db, schema) == 0


def _try_get(sq):
    try:
        return sq.get(timeout=0.2)
    except sq.Empty:
        return None


def test_live_consumers_lease_is_never_rescued(url, topts, db, schema):
    with connect(url, topts) as holder, connect(url, topts) as other:
        holder.SimpleQueue("held").put("long job")
        msg = holder.SimpleQueue("held").get(timeout=5)
        for _ in range(5):
            assert other.transport.store.rescue_orphaned_leases() == 0
        assert count_rows(db, schema, "state = 'reserved'") == 1
        msg.ack()


def test_concurrent_migrations_apply_once(dsn):
    from river_broker import migrate

    name = "mig_" + str(int(time.time() * 1000))[-8:]
    errors = []

    def run():
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                migrate.check_or_migrate(c, name, auto_migrate=True)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with psycopg.connect(dsn, autocommit=True) as c:
        try:
            versions = c.execute(sql.SQL("SELECT version FROM {}.schema_migration").format(
                sql.Identifier(name))).fetchall()
        finally:
            c.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    assert errors == []
    assert versions == [(v,) for v in range(1, migrate.latest_version() + 1)]


def test_package_registers_alias():
    from kombu.transport import TRANSPORT_ALIASES

    assert river_broker.__version__
    assert TRANSPORT_ALIASES["river"] == "river_broker.transport:Transport"
