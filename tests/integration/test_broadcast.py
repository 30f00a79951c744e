"""Broadcast through Kombu's API (SPEC §6): exchanges and bindings shared through the database,
fanout and topic routing, no_ack consumers, queue lifetimes (x-message-ttl, x-expires,
auto-delete), against a real PostgreSQL. Every "process" here is its own Kombu connection,
hence its own database session and its own consumer id."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import ChannelError
from psycopg import sql

from river_broker import ConfigurationError
from river_broker.errors import MessageError
from tests.conftest import count_rows, wait_for

FANOUT = Exchange("bcast", type="fanout", durable=False)
EVENTS = Exchange("events", type="topic", durable=False)


def connect(url: str, topts: dict[str, Any], **extra: Any) -> Connection:
    return Connection(url, transport_options={**topts, **extra})


def queues(db, schema: str) -> set[str]:
    return {r[0] for r in db.execute(
        sql.SQL("SELECT name FROM {}.queue").format(sql.Identifier(schema)))}


def bindings(db, schema: str) -> set[tuple[str, str, str]]:
    return {tuple(r) for r in db.execute(sql.SQL(
        "SELECT exchange, routing_key, queue FROM {}.binding").format(sql.Identifier(schema)))}


def clean_queues(url: str, topts: dict[str, Any]) -> list[str]:
    """One pass of the queue cleaner (consumers run it every rescue_interval)."""
    with connect(url, topts) as conn:
        conn.connect()
        return conn.transport.store.clean_queues()


def drain(conn: Connection, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError, OSError):
            conn.drain_events(timeout=0.05)


class Collector:
    def __init__(self) -> None:
        self.bodies: list[Any] = []

    def __call__(self, body: Any, message: Any) -> None:
        self.bodies.append(body)
        if not message.acknowledged and message.delivery_info.get("no_ack") is not True:
            with contextlib.suppress(Exception):
                message.ack()


# -- routing shared across processes ----------------------------------------------------------

def test_transport_declares_fanout_and_topic_support(url, topts):
    """What Celery checks before it enables remote control (and Flower relies on)."""
    with connect(url, topts) as conn:
        assert conn.supports_exchange_type("fanout")
        assert conn.supports_exchange_type("topic")
        assert conn.supports_exchange_type("direct")
        assert not conn.supports_exchange_type("headers")
        assert conn.default_channel.supports_fanout


def test_fanout_reaches_every_bound_queue_of_every_process(url, topts, db, schema):
    got1, got2 = Collector(), Collector()
    with connect(url, topts) as c1, connect(url, topts) as c2, connect(url, topts) as pub:
        Consumer(c1.channel(), [Queue("node1", FANOUT)], callbacks=[got1], no_ack=True).consume()
        Consumer(c2.channel(), [Queue("node2", FANOUT)], callbacks=[got2]).consume()
        # Declared by nobody on the publishing side but the exchange itself.
        Producer(pub.channel()).publish({"cmd": "ping"}, exchange=FANOUT)
        wait_for(lambda: (drain(c1, 0.1), drain(c2, 0.1)) and got1.bodies and got2.bodies, 10,
                 "both nodes to receive the broadcast")
        assert got1.bodies == [{"cmd": "ping"}] and got2.bodies == [{"cmd": "ping"}]
    assert ("bcast", "", "node1") in bindings(db, schema)


def test_publish_to_fanout_without_bound_queues_stores_nothing(url, topts, db, schema):
    with connect(url, topts) as pub:
        Producer(pub.channel()).publish({"cmd": "lost"}, exchange=FANOUT)
    assert count_rows(db, schema) == 0


@pytest.mark.parametrize("delivery_mode", [1, 2], ids=["transient", "persistent"])
def test_topic_routing_matches_patterns_bound_by_other_processes(url, topts, delivery_mode):
    """Transient messages go through the background writer's batch statement, persistent ones
    through one statement each: both route the same way."""
    workers, tasks_ = Collector(), Collector()
    with connect(url, topts) as c1, connect(url, topts) as pub:
        Consumer(c1.channel(), [Queue("ev.workers", EVENTS, routing_key="worker.#"),
                                Queue("ev.done", EVENTS, routing_key="*.succeeded")],
                 callbacks=[lambda b, m: (workers if b["q"] == "w" else tasks_)(b, m)],
                 no_ack=True).consume()
        p = Producer(pub.channel())
        for body, key in (({"q": "w"}, "worker.heartbeat"), ({"q": "t"}, "task.succeeded"),
                          ({"q": "x"}, "task.received")):  # the last one matches no binding
            p.publish(body, exchange=EVENTS, routing_key=key, delivery_mode=delivery_mode)
        wait_for(lambda: drain(c1, 0.1) or (workers.bodies and tasks_.bodies), 10, "events")
        drain(c1, 0.3)
    assert workers.bodies == [{"q": "w"}]
    assert tasks_.bodies == [{"q": "t"}]


def test_direct_binding_made_by_another_process_routes_at_once(url, topts):
    """The `celery inspect` reply path: the client binds its reply queue, a worker (which never
    declared that binding) publishes to the reply exchange with the client's routing key."""
    reply_x = Exchange("reply.x", type="direct", durable=False)
    got = Collector()
    with connect(url, topts) as client, connect(url, topts) as worker:
        wp = Producer(worker.channel())
        wp.publish({"warm": 1}, exchange=reply_x, routing_key="nobody")  # caches an empty table
        Consumer(client.channel(), [Queue("client1.reply", reply_x, routing_key="client1")],
                 callbacks=[got], no_ack=True).consume()
        wp.publish({"pong": 1}, exchange=reply_x, routing_key="client1")
        wait_for(lambda: drain(client, 0.1) or got.bodies, 10, "the reply")
    assert got.bodies == [{"pong": 1}]


def test_another_queue_on_the_same_routing_key_is_seen_within_the_cache_ttl(url, topts):
    x = Exchange("jobs", type="direct")
    first, second = Collector(), Collector()
    with connect(url, topts, routing_cache_ttl=0.1) as c1, connect(url, topts) as c2, \
            connect(url, topts, routing_cache_ttl=0.1) as pub:
        Consumer(c1.channel(), [Queue("jobs.a", x, routing_key="job")], callbacks=[first]).consume()
        p = Producer(pub.channel())
        p.publish({"n": 1}, exchange=x, routing_key="job")
        Consumer(c2.channel(), [Queue("jobs.b", x, routing_key="job")],
                 callbacks=[second]).consume()
        time.sleep(0.2)
        p.publish({"n": 2}, exchange=x, routing_key="job")
        wait_for(lambda: (drain(c1, 0.1), drain(c2, 0.1)) and len(first.bodies) == 2
                 and second.bodies, 10, "both queues")
    assert second.bodies == [{"n": 2}]


def test_exchange_type_is_known_to_processes_that_did_not_declare_it(url, topts):
    with connect(url, topts) as c1, connect(url, topts) as c2:
        Queue("typed", EVENTS, routing_key="a.*")(c1.channel()).declare()
        chan = c2.channel()
        assert chan.typeof("events").type == "topic"
        chan.exchange_declare("events", "topic", passive=True)  # found in the database
        with pytest.raises(ChannelError, match="NOT_FOUND"):
            chan.exchange_declare("never.declared", "fanout", passive=True)


def test_redeclaring_an_exchange_with_another_type_is_refused(url, topts):
    with connect(url, topts) as c1, connect(url, topts) as c2:
        Exchange("kind", type="fanout")(c1.channel()).declare()
        with pytest.raises(ChannelError, match="exists with type 'fanout'"):
            Exchange("kind", type="direct")(c2.channel()).declare()


def test_unbind_and_exchange_delete_reach_the_database(url, topts, db, schema):
    with connect(url, topts) as conn:
        chan = conn.channel()
        q = Queue("unbind.me", EVENTS, routing_key="a.b")(chan)
        q.declare()
        assert ("events", "a.b", "unbind.me") in bindings(db, schema)
        q.unbind_from(EVENTS, routing_key="a.b")
        assert ("events", "a.b", "unbind.me") not in bindings(db, schema)
        q.bind_to(EVENTS, routing_key="a.c")
        chan.exchange_delete("events")
        assert bindings(db, schema) == set()
        assert not db.execute(sql.SQL("SELECT 1 FROM {}.exchange WHERE name = 'events'").format(
            sql.Identifier(schema))).fetchone()


def test_binding_is_rewritten_when_the_database_lost_it(url, topts, db, schema):
    """Kombu remembers bindings per process; a queue that expired meanwhile (its bindings went
    with it) must be bound again when the process declares it again."""
    with connect(url, topts) as conn:
        q = Queue("rebind", FANOUT)(conn.channel())
        q.declare()
        db.execute(sql.SQL("DELETE FROM {}.queue WHERE name = 'rebind'").format(
            sql.Identifier(schema)))
        assert bindings(db, schema) == set()
        q.declare()
    assert ("bcast", "", "rebind") in bindings(db, schema)


# -- no_ack consumers ---------------------------------------------------------------------------

def test_no_ack_consumer_leaves_no_reserved_row(url, topts, db, schema):
    got = Collector()
    with connect(url, topts) as conn:
        q = Queue("noack", Exchange("noack", type="direct"), routing_key="noack")
        with conn.Producer() as p:
            for n in range(5):
                p.publish({"n": n}, exchange=q.exchange, routing_key="noack", declare=[q])
        Consumer(conn.channel(), [q], callbacks=[got], no_ack=True).consume()
        wait_for(lambda: drain(conn, 0.1) or len(got.bodies) == 5, 10, "five messages")
        assert count_rows(db, schema) == 0  # taken means finished: nothing reserved, no lease
    assert [b["n"] for b in got.bodies] == [0, 1, 2, 3, 4]


def test_basic_get_no_ack_finishes_the_message(url, topts, db, schema):
    with connect(url, topts) as conn:
        q = conn.SimpleQueue("getnoack", no_ack=True)
        q.put({"n": 1})
        assert q.get(timeout=5).payload == {"n": 1}
        assert count_rows(db, schema) == 0
        q.close()


def test_no_ack_delivery_of_a_sequence_head_lets_the_next_run(url, topts, db, schema):
    with connect(url, topts) as conn:
        q = Queue("seqnoack", Exchange("seqnoack", type="direct"), routing_key="seqnoack")
        with conn.Producer() as p:
            for n in range(3):
                p.publish({"n": n}, exchange=q.exchange, routing_key="seqnoack", declare=[q],
                          headers={"sequence_key": "k"})
        got = Collector()
        Consumer(conn.channel(), [q], callbacks=[got], no_ack=True).consume()
        wait_for(lambda: drain(conn, 0.1) or len(got.bodies) == 3, 10, "the whole sequence")
    assert [b["n"] for b in got.bodies] == [0, 1, 2]
    assert count_rows(db, schema) == 0


# -- queue lifetimes ---------------------------------------------------------------------------

def test_queue_message_ttl_expires_messages(url, topts, db, schema):
    with connect(url, topts) as conn:
        q = Queue("short", Exchange("short", type="direct"), routing_key="short",
                  message_ttl=0.2)
        with conn.Producer() as p:
            p.publish({"n": 1}, exchange=q.exchange, routing_key="short", declare=[q])
        assert count_rows(db, schema, "expires_at IS NOT NULL") == 1
        time.sleep(0.4)
        got = Collector()
        Consumer(conn.channel(), [q], callbacks=[got]).consume()
        drain(conn, 0.5)
        assert got.bodies == []
        conn.transport.store.clean()
    assert count_rows(db, schema) == 0


def test_message_ttl_shorter_than_the_queue_ttl_wins(url, topts, db, schema):
    with connect(url, topts) as conn:
        q = Queue("both", Exchange("both", type="direct"), routing_key="both", message_ttl=60)
        with conn.Producer() as p:
            p.publish({"n": 1}, exchange=q.exchange, routing_key="both", declare=[q],
                      expiration=0.2)
        time.sleep(0.4)
        assert q(conn.channel()).get() is None


def test_unused_queue_is_deleted_after_x_expires(url, topts, db, schema):
    with connect(url, topts) as conn:
        Queue("ephemeral", FANOUT, expires=0.3)(conn.channel()).declare()
        Queue("kept", FANOUT)(conn.channel()).declare()
    assert clean_queues(url, topts) == []  # not yet
    time.sleep(0.4)
    assert clean_queues(url, topts) == ["ephemeral"]
    assert queues(db, schema) == {"kept"}
    assert bindings(db, schema) == {("bcast", "", "kept")}


def test_consumed_queue_does_not_expire_until_its_consumer_is_gone(url, topts, db, schema):
    conn = connect(url, topts)
    Consumer(conn.channel(), [Queue("busy", FANOUT, expires=0.3)], callbacks=[Collector()],
             no_ack=True).consume()
    time.sleep(0.5)
    assert clean_queues(url, topts) == []
    # The consumer's session dies without cancelling (a SIGKILLed worker, a lost machine).
    pid = conn.transport.store.conn.info.backend_pid
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(lambda: not db.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                    (pid,)).fetchone(), 10, "the session to end")
    assert clean_queues(url, topts) == []  # reaped now: x-expires counts from here
    time.sleep(0.4)
    assert clean_queues(url, topts) == ["busy"]
    with contextlib.suppress(Exception):
        conn.release()


def test_auto_delete_queue_goes_with_its_last_consumer(url, topts, db, schema):
    q = Queue("autodel", FANOUT, auto_delete=True)
    with connect(url, topts) as c1, connect(url, topts) as c2:
        cons1 = Consumer(c1.channel(), [q], callbacks=[Collector()], no_ack=True)
        cons2 = Consumer(c2.channel(), [q], callbacks=[Collector()], no_ack=True)
        cons1.consume()
        cons2.consume()
        cons1.cancel()
        assert "autodel" in queues(db, schema)  # another consumer remains
        cons2.cancel()
        assert "autodel" not in queues(db, schema)
        assert bindings(db, schema) == set()


def test_auto_delete_queue_of_a_dead_consumer_is_removed_by_the_cleaner(url, topts, db, schema):
    conn = connect(url, topts)
    Consumer(conn.channel(), [Queue("orphan", FANOUT, auto_delete=True)],
             callbacks=[Collector()], no_ack=True).consume()
    with connect(url, topts) as pub:  # a broadcast waits in it when the consumer dies
        Producer(pub.channel()).publish({"cmd": "x"}, exchange=FANOUT)
    db.execute("SELECT pg_terminate_backend(%s)", (conn.transport.store.conn.info.backend_pid,))
    wait_for(lambda: "orphan" in clean_queues(url, topts), 10, "the orphaned queue to go")
    assert count_rows(db, schema) == 0  # its waiting message went with it
    with contextlib.suppress(Exception):
        conn.release()


def test_queue_not_auto_deleted_before_it_had_a_consumer(url, topts, db, schema):
    with connect(url, topts) as conn:
        Queue("declared.only", FANOUT, auto_delete=True)(conn.channel()).declare()
    assert clean_queues(url, topts) == []
    assert "declared.only" in queues(db, schema)


def test_redeclaring_restarts_the_expiry_clock(url, topts, db, schema):
    with connect(url, topts) as conn:
        q = Queue("renewed", FANOUT, expires=0.4)(conn.channel())
        q.declare()
        time.sleep(0.25)
        q.declare()
        time.sleep(0.25)
        assert clean_queues(url, topts) == []


# -- bad input ---------------------------------------------------------------------------------

def test_sequence_key_on_a_fanout_publish_is_refused(url, topts, db, schema):
    with connect(url, topts) as conn:
        Queue("seqfan", FANOUT)(conn.channel()).declare()
        with pytest.raises(MessageError, match="cannot carry them"):
            Producer(conn.channel()).publish({"n": 1}, exchange=FANOUT,
                                             headers={"sequence_key": "k"})
    assert count_rows(db, schema) == 0


def test_unsupported_exchange_type_is_a_clear_error(url, topts):
    with connect(url, topts) as conn, \
            pytest.raises(ConfigurationError, match="type 'headers' is not supported"):
        Exchange("hdr", type="headers")(conn.channel()).declare()


def test_bad_queue_expiry_is_a_clear_error(url, topts):
    with connect(url, topts) as conn, \
            pytest.raises(ConfigurationError, match="'x-expires' must be a positive"):
        Queue("badexp", FANOUT, queue_arguments={"x-expires": "soon"})(conn.channel()).declare()


def test_binding_an_undeclared_queue_is_a_clear_error(url, topts):
    with connect(url, topts) as conn:
        chan = conn.channel()
        FANOUT(chan).declare()
        with pytest.raises(MessageError, match="the queue does not exist"):
            chan.queue_bind("ghost", "bcast", "")


def test_batched_enqueue_refuses_fanout_publishes(url, topts, db, schema):
    """river_broker.enqueue_many collects publishes into one batch of queue rows; a task
    routed to a fanout exchange cannot be one of them."""
    with connect(url, topts) as conn:
        Queue("fanbatch", FANOUT)(conn.channel()).declare()
        conn.transport.collecting = []  # what enqueue_many sets while it collects
        with pytest.raises(MessageError, match="direct exchanges only"):
            Producer(conn.channel()).publish({"n": 1}, exchange=FANOUT)
        conn.transport.collecting = None
    assert count_rows(db, schema) == 0


def test_queue_deleted_between_declare_and_consume_is_declared_again(url, topts, db,
                                                                            schema):
    """A worker killed and restarted under the same name: its pidbox queue (auto-delete) still
    exists, consumed by nobody alive. A cleaner pass between the new declaration and the new
    consumer deletes it (its last consumer died); consuming declares it again, bindings too."""
    q = Queue("node.pidbox", FANOUT, auto_delete=True)
    dead = connect(url, topts)
    Consumer(dead.channel(), [q], callbacks=[Collector()], no_ack=True).consume()
    db.execute("SELECT pg_terminate_backend(%s)", (dead.transport.store.conn.info.backend_pid,))
    with connect(url, topts) as restarted:
        q(restarted.channel()).declare()
        assert clean_queues(url, topts) == ["node.pidbox"]  # the dead consumer was its last
        got = Collector()
        Consumer(restarted.channel(), [q], callbacks=[got], no_ack=True).consume()
        with connect(url, topts) as pub:
            Producer(pub.channel()).publish({"cmd": "ping"}, exchange=FANOUT)
        wait_for(lambda: drain(restarted, 0.1) or got.bodies, 10, "the broadcast")
    with contextlib.suppress(Exception):
        dead.release()


def test_direct_publish_through_a_stale_binding_is_dropped_not_orphaned(url, topts, db, schema):
    """A late `celery inspect` reply: the client's reply queue (auto-delete) went away, the
    worker still has its binding cached. The reply is unroutable, as in RabbitMQ: no row is
    left in a queue that no longer exists."""
    reply_x = Exchange("reply.stale", type="direct", durable=False)
    q = Queue("client.reply", reply_x, routing_key="client", auto_delete=True)
    with connect(url, topts) as client, connect(url, topts, routing_cache_ttl=60) as worker:
        cons = Consumer(client.channel(), [q], callbacks=[Collector()], no_ack=True)
        cons.consume()
        wp = Producer(worker.channel())
        wp.publish({"reply": 1}, exchange=reply_x, routing_key="client")  # caches the binding
        wait_for(lambda: drain(client, 0.1) or count_rows(db, schema) == 0, 10, "the reply")
        cons.cancel()  # the client leaves: its auto-delete reply queue is deleted
        assert "client.reply" not in queues(db, schema)
        wp.publish({"reply": "late"}, exchange=reply_x, routing_key="client")
    assert count_rows(db, schema) == 0


# -- transient broadcasts are written in the background ---------------------------------------

def test_transient_broadcasts_are_all_written_by_close(url, topts, db, schema):
    with connect(url, topts) as conn:
        Queue("events.all", EVENTS, routing_key="#")(conn.channel()).declare()
        producer = Producer(conn.channel())
        for i in range(300):
            producer.publish({"i": i}, exchange=EVENTS, routing_key="task.multi",
                             delivery_mode=1)
    assert count_rows(db, schema) == 300  # the connection's close waited for the writer


def test_transient_broadcasts_keep_their_order(url, topts):
    got = Collector()
    with connect(url, topts) as sub, connect(url, topts) as pub:
        Consumer(sub.channel(), [Queue("ordered", EVENTS, routing_key="#")], callbacks=[got],
                 no_ack=True).consume()
        producer = Producer(pub.channel())
        for i in range(200):
            producer.publish({"i": i}, exchange=EVENTS, routing_key="worker.x", delivery_mode=1)
        wait_for(lambda: drain(sub, 0.1) or len(got.bodies) == 200, 20, "every event")
    assert [b["i"] for b in got.bodies] == list(range(200))


def test_short_script_exiting_without_close_still_broadcasts(url, topts, db, schema):
    """`app.control.broadcast(...)` from a script that exits at once: written at exit."""
    import subprocess
    import sys

    with connect(url, topts) as conn:
        Queue("exit.flush", FANOUT)(conn.channel()).declare()
    script = (
        "import river_broker, kombu\n"
        f"c = kombu.Connection({url!r}, transport_options={topts!r})\n"
        "p = kombu.Producer(c.channel())\n"
        "x = kombu.Exchange('bcast', type='fanout', durable=False)\n"
        "for i in range(50): p.publish({'i': i}, exchange=x, delivery_mode=1)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert count_rows(db, schema) == 50


def test_broadcasts_resume_after_the_publisher_session_is_terminated(url, topts, db, schema,
                                                                     caplog):
    """A transient broadcast may be lost with its session (as RabbitMQ loses transient
    messages with the connection); the publisher must go on and later ones must arrive."""
    got = Collector()
    with connect(url, topts) as sub, connect(url, topts) as pub:
        Consumer(sub.channel(), [Queue("after.kill", FANOUT)], callbacks=[got],
                 no_ack=True).consume()
        producer = Producer(pub.channel())
        producer.publish({"n": "before"}, exchange=FANOUT, delivery_mode=1)
        pub.transport.broadcaster.flush()
        db.execute("SELECT pg_terminate_backend(%s)",
                   (pub.transport.store.conn.info.backend_pid,))
        sent = 0

        def arrived() -> bool:
            nonlocal sent
            producer.publish({"n": sent}, exchange=FANOUT, delivery_mode=1)
            sent += 1
            drain(sub, 0.1)
            return any(b["n"] != "before" for b in got.bodies)

        wait_for(arrived, 20, "a broadcast after the session was terminated")
    assert got.bodies[0] == {"n": "before"}


def test_synchronous_transient_publish_when_switched_off(url, topts, db, schema):
    with connect(url, topts, async_transient_publish=False) as conn:
        Queue("sync.events", EVENTS, routing_key="#")(conn.channel()).declare()
        Producer(conn.channel()).publish({"i": 1}, exchange=EVENTS, routing_key="a",
                                         delivery_mode=1)
        assert count_rows(db, schema) == 1  # written when publish() returned
        assert conn.transport._broadcaster is None
