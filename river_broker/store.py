"""All database access of river_broker: one psycopg connection and the named queries.

Nothing outside this module runs SQL (``river_broker.sql`` holds the statements). A ``Store`` is
safe to share between threads: every use of its connection holds ``self.lock``.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import migrate
from .conninfo import describe, with_defaults
from .errors import MessageError, SchemaError
from .message import OutgoingRow
from .options import TransportOptions
from .sql import queries_for

logger = logging.getLogger(__name__)

#: (row id, attempt, sequenced): the fencing token of one delivery, and whether finishing it
#: must promote the next message of its sequence.
Token = tuple[int, int, bool]


@dataclass(frozen=True)
class InsertResult:
    """What a publish did: the new row, or the task id already holding its unique key."""

    id: int | None
    duplicate_of: str | None = None
    #: Routed through a binding whose queue no longer exists: dropped, as AMQP does.
    unroutable: bool = False

    @property
    def inserted(self) -> bool:
        return self.id is not None


@dataclass(frozen=True)
class LeasedRow:
    id: int
    attempt: int
    redelivered: bool
    payload: str
    priority: int
    sequenced: bool = False


class Store:
    """One PostgreSQL session and every statement river_broker runs on it."""

    def __init__(
        self, conninfo: str, options: TransportOptions, *, connect_timeout: float | None = None
    ):
        self.options = options
        self.conninfo = with_defaults(
            conninfo,
            application_name=options.application_name,
            keepalives=1,
            keepalives_idle=options.keepalives_idle,
            keepalives_interval=options.keepalives_interval,
            keepalives_count=options.keepalives_count,
            tcp_user_timeout=options.dead_peer_timeout_ms,
            connect_timeout=max(1, int(connect_timeout)) if connect_timeout else None,
        )
        self.q = queries_for(options.schema)
        self.ns = migrate.lock_namespace(options.schema)
        self.lock = threading.RLock()
        self.conn: psycopg.Connection | None = None
        self.consumer_id: int | None = None
        #: Queues whose channels to LISTEN on, and the channels this session listens on.
        self._listen_queues: set[str] = set()
        self._listening: set[str] = set()
        self._async_session = False
        self._last_notify: dict[str, float] = {}
        #: Queues this session consumes (registered in queue_consumer under consumer_id).
        self.consuming: set[str] = set()
        self._notify_handler: Callable[[str], None] | None = None

    # -- session ---------------------------------------------------------------------------

    def connect(self) -> psycopg.Connection:
        with self.lock:
            if self.conn is not None and not self.conn.closed:
                return self.conn
            conn = psycopg.connect(self.conninfo, autocommit=True)
            try:
                o = self.options
                # Server-side keepalives: a vanished consumer's session (and its leases) ends
                # within about idle + interval * count seconds instead of hours.
                conn.execute(
                    "SELECT set_config('tcp_keepalives_idle', %s, false),"
                    " set_config('tcp_keepalives_interval', %s, false),"
                    " set_config('tcp_keepalives_count', %s, false),"
                    " set_config('tcp_user_timeout', %s, false)",
                    (str(o.keepalives_idle), str(o.keepalives_interval), str(o.keepalives_count),
                     str(o.dead_peer_timeout_ms)),
                )
                migrate.check_or_migrate(conn, o.schema, auto_migrate=o.auto_migrate)
            except BaseException:
                conn.close()
                raise
            conn.add_notify_handler(self._on_notify)
            self.conn = conn
            self.consumer_id = None
            self._listening = set()  # channels this session LISTENs on
            self._async_session = False
            return conn

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def close(self) -> None:
        with self.lock:
            conn, self.conn = self.conn, None
            if conn is not None:
                with contextlib.suppress(Exception):  # a broken connection: nothing to do
                    conn.close()

    def fileno(self) -> int:
        return self.connect().fileno()

    def _execute(self, name: str, params: dict[str, Any]) -> psycopg.Cursor:
        conn = self.connect()
        try:
            if name in _GIVE_UP_KEY and not conn.info.transaction_status:
                return self._execute_giving_up_key(conn, name, params)
            return conn.execute(self.q[name], params)
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaError(
                f"river_broker schema {self.options.schema!r} is missing in "
                f"{describe(self.conninfo)} (was it dropped?): run `river-broker migrate`"
            ) from exc

    def _execute_giving_up_key(self, conn: psycopg.Connection, name: str,
                               params: dict[str, Any]) -> psycopg.Cursor:
        """Statements that put messages back into a waiting state give a unique key up when a
        newer message holds it; if that newer message commits during the statement, the
        index refuses it once: run it again, and it gives the key up."""
        try:
            return conn.execute(self.q[name], params)
        except psycopg.errors.UniqueViolation:
            logger.info("river_broker: %s met a unique key taken meanwhile; retrying", name)
            return conn.execute(self.q[name], params)

    # -- notifications ---------------------------------------------------------------------

    def listen(self, handler: Callable[[str], None], queue: str) -> None:
        """LISTEN on ``queue``'s wake-up channel; ``handler(payload)`` gets each notification
        (the payload names the queue)."""
        with self.lock:
            self._notify_handler = handler
            self._listen_queues.add(queue)
            self._ensure_listening()

    def unlisten(self, queue: str) -> None:
        with self.lock:
            self._listen_queues.discard(queue)
            channel = self.options.queue_channel(queue)
            # Another queue may share the channel (12 hex digits of md5): keep it then.
            shared = any(self.options.queue_channel(q) == channel for q in self._listen_queues)
            if channel in self._listening and self.connected and not shared:
                assert self.conn is not None
                self.conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))
                self._listening.discard(channel)

    def _ensure_listening(self) -> None:
        """LISTEN on the channels of every queue asked for (again, on a new session)."""
        conn = self.connect()
        for queue in sorted(self._listen_queues):
            channel = self.options.queue_channel(queue)
            if channel not in self._listening:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                self._listening.add(channel)

    def _on_notify(self, notify: psycopg.Notify) -> None:
        if self._notify_handler is not None and notify.channel in self._listening:
            self._notify_handler(notify.payload)

    def consume_notifications(self) -> int:
        """Read what the server sent without blocking; dispatches notifications."""
        with self.lock:
            conn = self.conn
            if conn is None or conn.closed:
                raise psycopg.OperationalError("river_broker: connection is closed")
            pgconn = conn.pgconn
            pgconn.consume_input()  # raises OperationalError when the server went away
            count = 0
            while (n := pgconn.notifies()) is not None:
                count += 1
                if self._notify_handler is not None and n.relname.decode() in self._listening:
                    self._notify_handler(n.extra.decode())
            return count

    def wait_readable(self, timeout: float) -> bool:
        """Block until the server sends something (a notification) or ``timeout`` passes."""
        fd = self.fileno()
        try:
            readable, _, _ = select.select([fd], [], [], max(timeout, 0.0))
        except InterruptedError:
            return False
        if readable:
            self.consume_notifications()
        return bool(readable)

    # -- publishing ------------------------------------------------------------------------

    def _should_notify(self, queue: str) -> bool:
        """Throttle NOTIFY per queue: bursts need one wake-up, not one per message."""
        now = time.monotonic()
        last = self._last_notify.get(queue)
        if last is not None and now - last < self.options.notify_throttle:
            return False
        self._last_notify[queue] = now
        return True

    def insert(self, row: OutgoingRow, *, bound: bool = False) -> InsertResult:
        """Publish one message. ``bound``: the queue came from an exchange's bindings, so the
        message is dropped (``unroutable``) if the queue was deleted meanwhile."""
        params = row.params()
        params["notify"] = self._should_notify(row.queue)
        params["channel"] = self.options.notify_channel
        params["bound"] = bound and row.sequence_key is None
        with self.lock:
            try:
                if row.sequence_key is not None:
                    result = self._insert_sequenced(params)
                elif self._async_session:
                    conn = self.connect()
                    with conn.pipeline(), conn.transaction():
                        self._durable(conn)
                        cur = self._execute("insert_message", params)
                    result = cur.fetchone()
                else:
                    result = self._execute("insert_message", params).fetchone()
                if result is None and params["bound"] and not self.queue_exists(row.queue):
                    return InsertResult(None, unroutable=True)
                return self._insert_result(result, row)
            except (psycopg.errors.DataError, psycopg.errors.CheckViolation) as exc:
                raise MessageError(f"message for queue {row.queue!r} rejected: {exc}") from None

    def _insert_result(self, result: Any, row: OutgoingRow,
                       conn: psycopg.Connection | None = None) -> InsertResult:
        if result is not None and result[0] is not None:
            return InsertResult(int(result[0]))
        if result is not None and result[3] is not None:
            return InsertResult(None, result[3])
        # The holder committed after this statement's snapshot: look again.
        holder = self._holder(row.unique_key, conn)
        return InsertResult(None, holder)

    def _holder(self, unique_key: str | None, conn: psycopg.Connection | None) -> str | None:
        if unique_key is None:
            return None
        params = {"unique_key": unique_key}
        cur = conn.execute(self.q["find_unique_holder"], params) if conn is not None else \
            self._execute("find_unique_holder", params)
        row = cur.fetchone()
        return row[0] if row else None

    def _insert_sequenced(self, params: dict[str, Any]) -> Any:
        """Lock the key's row, then insert as head or pending: one round trip, one commit."""
        conn = self.connect()
        with conn.pipeline(), conn.transaction():
            self._durable(conn)
            self._execute("upsert_sequence", params)
            cur = self._execute("insert_sequenced_message", params)
        return cur.fetchone()

    def insert_many(self, rows: Sequence[OutgoingRow],
                    conn: psycopg.Connection | None = None) -> list[InsertResult]:
        """Publish many messages in one transaction and (in pipeline mode) one round trip.

        With ``conn`` (the caller's own psycopg connection) the rows are written in the
        caller's transaction: they exist, and consumers are woken, only when it commits.
        Every row needs a task id (the batch's results are matched by it).
        """
        channel = self.options.notify_channel
        plain = [r for r in rows if r.sequence_key is None]
        sequenced = [r for r in rows if r.sequence_key is not None]
        with self.lock:
            own = conn is None
            target = self.connect() if own else conn
            assert target is not None
            try:
                with contextlib.ExitStack() as stack:
                    if own:
                        stack.enter_context(target.pipeline())
                        stack.enter_context(target.transaction())
                        self._durable(target)
                    else:  # the caller's transaction (a savepoint in it), or one of its own
                        stack.enter_context(target.transaction())
                    batch_cur = None
                    if plain:
                        batch_cur = target.execute(self.q["insert_messages"],
                                                   _batch_params(plain, channel))
                    seq_curs = []
                    for row in sequenced:
                        params = {**row.params(), "notify": True, "channel": channel}
                        target.execute(self.q["upsert_sequence"], params)
                        seq_curs.append(target.execute(self.q["insert_sequenced_message"],
                                                       params))
                inserted = {r[0]: int(r[1]) for r in batch_cur.fetchall()} if batch_cur else {}
                seq_results = [cur.fetchone() for cur in seq_curs]
            except (psycopg.errors.DataError, psycopg.errors.CheckViolation) as exc:
                raise MessageError(f"batch rejected: {exc}") from None
            results: list[InsertResult] = []
            seq_iter = iter(seq_results)
            winners: dict[str, str] = {}  # unique key -> task id that took it in this batch
            for row in rows:
                if row.sequence_key is not None:
                    result = self._insert_result(next(seq_iter), row, target)
                elif row.task_id in inserted:
                    result = InsertResult(inserted.pop(row.task_id))
                else:
                    holder = winners.get(row.unique_key or "") or self._holder(row.unique_key,
                                                                              target)
                    result = InsertResult(None, holder)
                if result.inserted and row.unique_key is not None:
                    winners.setdefault(row.unique_key, row.task_id or "")
                results.append(result)
        return results

    # -- consuming -------------------------------------------------------------------------

    def register_consumer(self) -> int:
        """Take a consumer id whose advisory lock this session holds until it ends.

        A consuming session also commits asynchronously (async_ack_commit): leases, acks and
        requeues do not wait for the WAL flush. A lost ack or lease after a server crash means
        a redelivery, which at-least-once allows; publishes on the session stay durable.
        """
        with self.lock:
            conn = self.connect()
            if self.consumer_id is None:
                row = self._execute(
                    "register_consumer",
                    {"ns": self.ns, "sequence": f'"{self.options.schema}".consumer_id_seq'},
                ).fetchone()
                assert row is not None
                self.consumer_id = int(row[0])
                if self.consuming:  # a new session: its queues are registered again
                    self._execute("register_queue_consumers",
                                  {"queues": sorted(self.consuming), "owner": self.consumer_id})
                self._ensure_listening()  # and its channels listened to again
                # A queue table's statistics are always stale (empty a second ago, 1M rows
                # now, a queue ANALYZE never saw): with default selectivities the planner
                # expects a handful of rows and sorts the whole queue on every fetch (10 ms at
                # 20k waiting rows). This session runs only river_broker's statements, each
                # served by an index: take bitmap and sequential scans off the table.
                conn.execute("SET enable_bitmapscan TO OFF")
                conn.execute("SET enable_seqscan TO OFF")
                if self.options.async_ack_commit:
                    conn.execute("SET synchronous_commit TO OFF")
                    self._async_session = True
            return self.consumer_id

    def _durable(self, conn: psycopg.Connection) -> None:
        """Inside a transaction: commit durably even on a consumer session (see below)."""
        if self._async_session:
            conn.execute("SET LOCAL synchronous_commit TO ON")

    def ack_and_fetch(
        self, acks: Sequence[Token], queue: str | None, limit: int
    ) -> tuple[set[int], list[LeasedRow]]:
        """Finish ``acks`` and lease up to ``limit`` messages of ``queue``: one round trip.

        Returns the ids whose ack applied, and the leased rows. Finished sequence heads also
        promote the next message of their key, in the same transaction, before the fetch.
        """
        with self.lock:
            owner = self.register_consumer() if queue is not None and limit > 0 else 0
            params = {**_token_params(acks), "queue": queue or "", "limit": max(limit, 0),
                      "owner": owner, "channel": self.options.notify_channel,
                      "retain": self.options.retention > 0}
            heads = [t[0] for t in acks if t[2]]
            if not heads:  # the common case: a single statement
                result = self._execute("ack_and_fetch", params).fetchall()
                acked = set(result[0][0] or ()) if result else set()
                rows = [LeasedRow(*r[1:]) for r in result if r[1] is not None]
            else:
                conn = self.connect()
                with conn.pipeline(), conn.transaction():
                    ack_cur = conn.execute(self.q["ack_delete"], params)
                    self._promote_after(heads)  # the next of each key, before the fetch
                    fetch_cur = conn.execute(self.q["fetch_available"], params) if limit > 0 \
                        else None
                acked = {r[0] for r in ack_cur.fetchall()}
                rows = [LeasedRow(*r) for r in fetch_cur.fetchall()] if fetch_cur else []
        if acks and len(acked) != len(acks):
            _log_stale("ack", acks, acked)
        return acked, rows

    def _promote_after(self, head_ids: list[int]) -> None:
        """Promote the next message of every key these (finished) heads held.

        Must run inside the transaction that finished them, after it: the key rows are locked
        first, so a concurrent publisher of the key is either fully before or fully after.
        """
        params = {"ids": head_ids, "channel": self.options.notify_channel}
        self._execute("lock_sequences_of_heads", params)
        self._execute("promote_next_in_sequence", params)

    def discard(self, tokens: Sequence[Token]) -> set[int]:
        plain = [t for t in tokens if not t[2]]
        heads = [t for t in tokens if t[2]]
        done: set[int] = set()
        with self.lock:
            if plain:
                params = {**_token_params(plain), "retain": self.options.retention > 0}
                done |= {r[0] for r in self._execute("discard_delete", params).fetchall()}
            if heads:
                conn = self.connect()
                ids = {"ids": [t[0] for t in heads]}
                with conn.pipeline(), conn.transaction():
                    cur = self._execute("discard_sequenced", _token_params(heads))
                    self._execute("lock_sequences_of_heads", ids)
                    halted = self._execute("halt_sequences", ids)
                    self._promote_after(ids["ids"])  # keys whose head may continue
                    if self.options.retention <= 0:
                        self._execute("drop_continued_discards", ids)
                done |= {r[0] for r in cur.fetchall()}
                for (key,) in halted.fetchall():
                    logger.warning("river_broker: sequence %r halted: its head was discarded "
                                   "(resume or skip it with `river-broker sequences`)", key)
        if len(done) != len(tokens):
            _log_stale("reject", tokens, done)
        return done

    def repair_sequences(self, limit: int = 1000) -> int:
        """Promote past heads that vanished (purge, queue delete, manual deletes).

        Joins the caller's transaction when there is one (purge and delete repair in the
        transaction that removed the heads, so no publish can slip in between)."""
        with self.lock:
            stale = [r[0] for r in self._execute("stale_sequence_heads", {"limit": limit})]
            if stale:
                conn = self.connect()
                with conn.transaction():
                    self._promote_after(stale)
        return len(stale)

    def requeue(self, tokens: Sequence[Token]) -> set[int]:
        """Put the same rows back at the head of their queue, marked redelivered."""
        params = _token_params(tokens)
        params["channel"] = self.options.notify_channel
        with self.lock:
            done = {r[0] for r in self._execute("requeue", params).fetchall()}
        if len(done) != len(tokens):
            _log_stale("requeue", tokens, done)
        return done

    # -- maintenance -----------------------------------------------------------------------

    def rescue_orphaned_leases(self) -> int:
        with self.lock:
            owner = self.consumer_id if self.consumer_id is not None else 0
            row = self._execute(
                "rescue_orphaned_leases",
                {"self": owner, "ns": self.ns, "channel": self.options.notify_channel},
            ).fetchone()
        rescued = int(row[0]) if row else 0
        if rescued:
            logger.warning("river_broker: %d message(s) of dead consumers made available again",
                           rescued)
        return rescued

    def promote_due_scheduled(self, queues: Iterable[str], limit: int = 1000) -> int:
        with self.lock:
            row = self._execute(
                "promote_due_scheduled",
                {"queues": list(queues), "limit": limit, "channel": self.options.notify_channel},
            ).fetchone()
        return int(row[0]) if row else 0

    def next_scheduled(self, queues: Iterable[str]) -> float | None:
        """Epoch seconds of the earliest scheduled message of these queues."""
        with self.lock:
            row = self._execute("next_scheduled", {"queues": list(queues)}).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def clean(self, limit: int = 10_000) -> int:
        removed = 0
        with self.lock:
            removed += self._execute("clean_expired", {"limit": limit}).rowcount
            removed += self._execute(
                "clean_unique_finished", {"limit": limit, "retention": self.options.retention}
            ).rowcount
            if self.options.retention > 0:
                removed += self._execute(
                    "clean_finished", {"retention": self.options.retention, "limit": limit}
                ).rowcount
        self.repair_sequences()
        return removed

    # -- operating sequences ---------------------------------------------------------------

    def list_sequences(self, state: str | None, key: str | None, limit: int) -> list[tuple]:
        with self.lock:
            return self._execute(
                "list_sequences", {"state": state, "key": key, "limit": limit}
            ).fetchall()

    def resume_sequence(self, key: str) -> bool:
        params = {"key": key, "channel": self.options.notify_channel}
        with self.lock:
            conn = self.connect()
            for attempt in (1, 2):  # the second gives a unique key up to a newer holder
                try:
                    with conn.transaction():
                        self._execute("lock_sequence", params)
                        resumed = self._execute("resume_sequence", params).fetchall()
                    break
                except psycopg.errors.UniqueViolation:
                    if attempt == 2:
                        raise
        return bool(resumed)

    def skip_sequence(self, key: str) -> bool:
        params = {"key": key, "channel": self.options.notify_channel}
        with self.lock:
            conn = self.connect()
            with conn.transaction():
                self._execute("lock_sequence", params)
                skipped = [r[0] for r in self._execute("skip_sequence_head", params)]
                if skipped:
                    self._promote_after(skipped)
        return bool(skipped)

    # -- queues ----------------------------------------------------------------------------

    def declare_queue(self, queue: str, arguments: dict[str, Any] | None = None, *,
                      auto_delete: bool = False, expires_ms: int | None = None,
                      message_ttl_ms: int | None = None) -> None:
        with self.lock:
            self._execute("declare_queue", {
                "queue": queue, "arguments": Jsonb(arguments or {}), "auto_delete": auto_delete,
                "expires_ms": expires_ms, "message_ttl_ms": message_ttl_ms,
            })

    def queue_exists(self, queue: str) -> bool:
        with self.lock:
            row = self._execute("queue_exists", {"queue": queue}).fetchone()
        return bool(row and row[0])

    def queue_size(self, queue: str) -> int:
        with self.lock:
            row = self._execute("queue_size", {"queue": queue}).fetchone()
        return int(row[0]) if row else 0

    def purge_queue(self, queue: str) -> int:
        with self.lock:
            conn = self.connect()
            with conn.transaction():
                purged = self._execute("purge_queue", {"queue": queue}).rowcount
                self.repair_sequences()
        return purged

    def delete_queue(self, queue: str) -> None:
        with self.lock:
            conn = self.connect()
            with conn.transaction():
                self._execute("delete_queue_messages", {"queue": queue})
                self._execute("delete_queue", {"queue": queue})
                self.repair_sequences()


    # -- broadcast: exchanges, bindings, routed publishes, queue lifetimes -----------------

    def declare_exchange(self, exchange: str, kind: str) -> str:
        """Create the exchange (or find it); returns its stored type."""
        with self.lock:
            row = self._execute("declare_exchange",
                                {"exchange": exchange, "type": kind}).fetchone()
        return str(row[0]) if row else kind

    def exchange_type(self, exchange: str) -> str | None:
        with self.lock:
            row = self._execute("exchange_type", {"exchange": exchange}).fetchone()
        return str(row[0]) if row else None

    def delete_exchange(self, exchange: str) -> None:
        with self.lock:
            self._execute("delete_exchange", {"exchange": exchange})

    def bind_queue(self, exchange: str, routing_key: str, pattern: str | None,
                   queue: str) -> None:
        params = {"exchange": exchange, "routing_key": routing_key or "", "pattern": pattern,
                  "queue": queue}
        with self.lock:
            try:
                self._execute("bind_queue", params)
            except psycopg.errors.ForeignKeyViolation:
                raise MessageError(
                    f"cannot bind queue {queue!r} to exchange {exchange!r}: the queue does not "
                    "exist (declare it first)") from None

    def unbind_queue(self, exchange: str, routing_key: str, queue: str) -> None:
        with self.lock:
            self._execute("unbind_queue", {"exchange": exchange,
                                           "routing_key": routing_key or "", "queue": queue})

    def exchange_bindings(self, exchange: str) -> list[tuple[str, str | None, str]]:
        with self.lock:
            return [(r[0], r[1], r[2]) for r in
                    self._execute("exchange_bindings", {"exchange": exchange}).fetchall()]

    @staticmethod
    def routed_params(kind: str, exchange: str, routing_key: str,
                      row: OutgoingRow) -> dict[str, Any]:
        """One message of a publish_routed batch."""
        params = row.params()
        params.update(kind=kind, exchange=exchange, routing_key=routing_key or "")
        return params

    def publish_routed_many(self, batch: Sequence[dict[str, Any]], *,
                            durable: bool = False) -> int:
        """Route and write messages (routed_params) in one statement, in order; returns how
        many rows (copies) were written. Not durable: committed without the WAL flush."""
        def column(name: str) -> list[Any]:
            return [params[name] for params in batch]

        params = {
            "kinds": column("kind"), "exchanges": column("exchange"),
            "routing_keys": column("routing_key"), "priorities": column("priority"),
            "run_ats": column("run_at"), "ttls": column("ttl"), "task_ids": column("task_id"),
            "task_names": column("task_name"), "payloads": column("payload"),
            "durable": durable, "channel": self.options.notify_channel,
        }
        with self.lock:
            try:
                row = self._execute("publish_routed", params).fetchone()
            except (psycopg.errors.DataError, psycopg.errors.CheckViolation) as exc:
                exchanges = sorted({str(p["exchange"]) for p in batch})
                raise MessageError(f"message for exchange(s) {exchanges} rejected: {exc}") \
                    from None
        return int(row[0]) if row else 0

    def publish_routed(self, kind: str, exchange: str, routing_key: str, row: OutgoingRow,
                       *, durable: bool) -> int:
        """One row per queue bound to ``exchange`` that matches; returns how many."""
        return self.publish_routed_many(
            [self.routed_params(kind, exchange, routing_key, row)], durable=durable)

    def fetch_noack(self, queue: str, limit: int) -> list[LeasedRow]:
        """Take up to ``limit`` messages, finished as they are taken (no_ack consumers)."""
        params = {"queue": queue, "limit": max(limit, 0),
                  "retain": self.options.retention > 0}
        with self.lock:
            rows = [LeasedRow(*r) for r in self._execute("fetch_noack", params).fetchall()]
            heads = [r.id for r in rows if r.sequenced]
            if heads:  # the next message of their keys may run now
                conn = self.connect()
                with conn.transaction():
                    self._promote_after(heads)
        return rows

    def consume_queue(self, queue: str) -> bool:
        """Register this session as a consumer of ``queue`` (x-expires, auto-delete).
        Returns whether the queue exists."""
        with self.lock:
            self.consuming.add(queue)
            owner = self.register_consumer()
            rows = self._execute("register_queue_consumers",
                                 {"queues": [queue], "owner": owner}).fetchall()
        return bool(rows)

    def cancel_queue(self, queue: str) -> bool:
        """Unregister; an auto-delete queue without other consumers is deleted. Returns
        whether the queue was deleted."""
        with self.lock:
            self.consuming.discard(queue)
            if self.consumer_id is None or not self.connected:
                return False
            conn = self.connect()
            with conn.transaction():
                row = self._execute("unregister_queue_consumer",
                                    {"queue": queue, "owner": self.consumer_id}).fetchone()
                if not (row and row[0]):
                    return False
                self._drop_queues([queue])
        return True

    def clean_queues(self, limit: int = 100) -> list[str]:
        """Forget consumers whose session died; delete queues whose lifetime is over."""
        with self.lock:
            conn = self.connect()
            owner = self.consumer_id if self.consumer_id is not None else 0
            self._execute("reap_dead_queue_consumers", {"self": owner, "ns": self.ns})
            with conn.transaction():
                names = [r[0] for r in self._execute("unused_queues", {"limit": limit})]
                if names:
                    self._drop_queues(names)
        if names:
            logger.info("river_broker: deleted %d unused queue(s) (auto-delete or x-expires): %s",
                        len(names), ", ".join(names[:10]))
        return names

    def _drop_queues(self, names: list[str]) -> None:
        """Inside a transaction: delete these queues and their waiting messages."""
        rows = self._execute("drop_queues", {"queues": names}).fetchall()
        if any(r[1] for r in rows):  # messages went: maybe a sequence's head among them
            self.repair_sequences()


#: Statements that can move a message back into a unique state (see _execute_giving_up_key).
_GIVE_UP_KEY = frozenset({"requeue", "rescue_orphaned_leases"})


def _batch_params(rows: Sequence[OutgoingRow], channel: str) -> dict[str, Any]:
    return {
        "queues": [r.queue for r in rows],
        "priorities": [r.priority for r in rows],
        "run_ats": [r.run_at for r in rows],
        "ttls": [r.ttl_seconds for r in rows],
        "task_ids": [r.task_id for r in rows],
        "task_names": [r.task_name for r in rows],
        "payloads": [r.payload for r in rows],
        "unique_keys": [r.unique_key for r in rows],
        "unique_statess": [r.unique_states for r in rows],
        "unique_untils": [r.unique_until for r in rows],
        "channel": channel,
    }


def _token_params(tokens: Sequence[Token]) -> dict[str, Any]:
    return {"ids": [t[0] for t in tokens], "attempts": [t[1] for t in tokens]}


def _log_stale(what: str, tokens: Sequence[Token], applied: set[int]) -> None:
    stale = [t for t in tokens if t[0] not in applied]
    logger.warning(
        "river_broker: %s ignored for %d delivery(ies) whose lease was lost "
        "(message redelivered or already finished): %s",
        what, len(stale), ", ".join(f"{t[0]}:{t[1]}" for t in stale[:20]),
    )
