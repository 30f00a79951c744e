"""The Kombu transport: a thin adapter from Kombu's vocabulary to river_broker's store.

Select it with ``river+postgresql://...`` (after ``import river_broker``) or with
``transport="river_broker:Transport"`` and a plain ``postgresql://`` URL.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from functools import partial
from queue import Empty
from typing import Any

import psycopg
from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.transport.virtual import exchange as virtual_exchange

from .broadcaster import Broadcaster
from .conninfo import conninfo_from_client
from .consumer import Consumer, QueueSlot
from .errors import ConfigurationError, MessageError, SchemaError
from .message import from_row, parse_delivery_tag, to_row
from .options import TransportOptions
from .store import LeasedRow, Store, Token
from .unique import record_duplicate

logger = logging.getLogger(__name__)


class QoS(virtual.QoS):
    """Prefetch accounting (Kombu's) plus acks and rejects written to the database.

    An ack frees its prefetch slot at once and is written in a batch; rejects and restores are
    written immediately. Every write carries the delivery's fencing token, so one from a
    consumer that lost its lease is ignored (and logged) rather than applied to a redelivery.
    """

    def __init__(self, channel: Channel, prefetch_count: int = 0):
        super().__init__(channel, prefetch_count)
        # Kept after the channel closes: a late ack still reaches the database.
        self._transport: Transport = channel.connection

    def ack(self, delivery_tag: str) -> None:
        self._quick_ack(delivery_tag)
        self._transport.on_ack(parse_delivery_tag(delivery_tag))

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self._quick_ack(delivery_tag)
        token = parse_delivery_tag(delivery_tag)
        if requeue:
            self._transport.requeue([token])
        else:
            self._transport.discard([token])

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Put every unacked delivery back (same rows, at the head), in one statement."""
        self._flush()
        delivered = list(self._delivered.items())  # type: ignore[attr-defined]
        self._delivered.clear()  # type: ignore[attr-defined]
        tokens = [parse_delivery_tag(tag) for tag, _ in delivered]
        if not tokens:
            return []
        try:
            self._transport.requeue(tokens)
        except Transport.connection_errors as exc:
            # The rows are still leased to this session, which is gone or going: the lease
            # rescue makes them available again. Nothing is lost, so no emergency dump.
            logger.info("river_broker: could not restore %d message(s) (%s); they are "
                        "recovered when their lease expires", len(tokens), exc)
        return []


class DirectExchange(virtual_exchange.DirectExchange):
    """Direct routing from the bindings (cached for routing_cache_ttl): a queue deleted since
    they were read makes the message unroutable, not an orphan row."""

    def deliver(self, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> None:
        for queue in self.channel._lookup(exchange, routing_key):
            self.channel._put(queue, message, bound=True, **kwargs)


class TopicExchange(virtual_exchange.TopicExchange):
    """Topic routing happens in the database: the bindings of every process count."""

    def deliver(self, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> None:
        self.channel._put_routed("topic", exchange, message, routing_key)


EXCHANGE_TYPES = {**virtual_exchange.STANDARD_EXCHANGE_TYPES, "direct": DirectExchange,
                  "topic": TopicExchange}


class Channel(virtual.Channel):
    """Kombu channel over the river_broker store."""

    QoS = QoS
    do_restore = True
    connection: Transport
    #: Bindings are shared through the database (Kombu calls _queue_bind and _put_fanout).
    supports_fanout = True
    exchange_types = EXCHANGE_TYPES

    @property
    def store(self) -> Store:
        return self.connection.store

    # -- publishing ------------------------------------------------------------------------

    def _put(self, queue: str, message: dict[str, Any], bound: bool = False,
             **kwargs: Any) -> None:
        row = to_row(queue, message)
        collecting = self.connection.collecting
        if collecting is not None:  # river_broker.enqueue_many: written later, in one batch
            collecting.append(row)
            return
        result = self.store.insert(row, bound=bound)
        if result.unroutable:
            self.connection.forget_routes()
            logger.info("river_broker: message to queue %r dropped: the queue was deleted "
                        "(auto-delete or x-expires) after this process read its binding", queue)
        elif not result.inserted:
            record_duplicate(row, result.duplicate_of)

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str,
                    **kwargs: Any) -> None:
        self._put_routed("fanout", exchange, message, routing_key)

    def _put_routed(self, kind: str, exchange: str, message: dict[str, Any],
                    routing_key: str) -> None:
        """Fanout and topic publishes: one row per bound queue, routed by the database."""
        if self.connection.collecting is not None:
            raise MessageError(
                f"river_broker.enqueue_many cannot publish to the {kind} exchange "
                f"{exchange!r}: batches go to queues through direct exchanges only")
        row = to_row("", message)
        if row.sequence_key is not None or row.unique_key is not None:
            raise MessageError(
                f"sequence and unique keys apply to one queue: a message published to the "
                f"{kind} exchange {exchange!r} (one copy per bound queue) cannot carry them")
        delivery_mode = (message.get("properties") or {}).get("delivery_mode")
        transient = delivery_mode in (1, "transient")
        if transient and self.store.options.async_transient_publish:
            self.connection.broadcaster.submit(
                self.store.routed_params(kind, exchange, routing_key, row))
            return
        self.store.publish_routed(kind, exchange, routing_key, row, durable=not transient)

    # -- exchanges and bindings (shared through the database) ------------------------------

    def exchange_declare(self, exchange: str | None = None, type: str = "direct",
                         durable: bool = False, auto_delete: bool = False,
                         arguments: Any = None, nowait: bool = False,
                         passive: bool = False) -> None:
        type = type or "direct"
        exchange = exchange or f"amq.{type}"
        if type not in self.exchange_types:
            raise ConfigurationError(
                f"exchange {exchange!r}: type {type!r} is not supported by river_broker "
                f"(supported: {', '.join(sorted(self.exchange_types))})")
        if passive:
            if exchange not in self.state.exchanges:
                stored = self.connection.exchange_kind(exchange)
                if stored is None:
                    return super().exchange_declare(exchange, type, durable, auto_delete,
                                                    arguments, nowait, passive)
                self.state.exchanges[exchange] = {
                    "type": stored, "durable": durable, "auto_delete": auto_delete,
                    "arguments": arguments or {}, "table": [],
                }
            return None
        super().exchange_declare(exchange, type, durable, auto_delete, arguments, nowait,
                                 passive)
        self.connection.declare_exchange(exchange, type)
        return None

    def exchange_delete(self, exchange: str, if_unused: bool = False,
                        nowait: bool = False) -> None:
        super().exchange_delete(exchange, if_unused=if_unused, nowait=nowait)
        self.store.delete_exchange(exchange)
        self.connection.forget_exchange(exchange)

    def queue_bind(self, queue: str, exchange: str | None = None, routing_key: str = "",
                   arguments: Any = None, **kwargs: Any) -> None:
        exchange = exchange or "amq.direct"
        if exchange not in self.state.exchanges:
            self.exchange_declare(exchange, passive=True)  # known in the database?
        super().queue_bind(queue, exchange, routing_key, arguments, **kwargs)
        # Written every time, not only when this process first binds: Kombu's binding state
        # is per process and outlives the database rows (a queue that expired meanwhile).
        rkey, pattern, _ = self.typeof(exchange).prepare_bind(queue, exchange, routing_key,
                                                              arguments)
        self.store.bind_queue(exchange, rkey, pattern, queue)
        self.connection.forget_routes(exchange)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str | None,
                    queue: str) -> None:
        """Written by queue_bind above (every time, not only on the first local bind)."""

    def queue_unbind(self, queue: str, exchange: str | None = None, routing_key: str = "",
                     arguments: Any = None, **kwargs: Any) -> None:
        exchange = exchange or "amq.direct"
        with contextlib.suppress(KeyError):  # not bound in this process: the database counts
            super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        self.store.unbind_queue(exchange, routing_key, queue)
        self.connection.forget_routes(exchange)

    def get_table(self, exchange: str) -> list[tuple[str, str | None, str]]:
        """The bindings of ``exchange`` in the database (every process's)."""
        return self.connection.routing_table(exchange)

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        if exchange and exchange not in self.state.exchanges:
            stored = self.connection.exchange_kind(exchange)
            if stored is not None:
                return self.exchange_types[stored]
        return super().typeof(exchange, default)

    def _lookup(self, exchange: str, routing_key: str, default: str | None = None) -> list[str]:
        """Queues for a direct publish: the cached bindings; on a miss, read them again (a
        queue another process bound a moment ago, such as a ``celery inspect`` reply
        queue), then Kombu's dead-letter handling."""
        if exchange:
            kind = self.typeof(exchange)
            found = kind.lookup(self.get_table(exchange), exchange, routing_key, default)
            if not found:
                self.connection.forget_routes(exchange)
                found = kind.lookup(self.get_table(exchange), exchange, routing_key, default)
            if found:
                return list(found)
        return list(super()._lookup(exchange, routing_key, default))

    def list_bindings(self) -> Any:
        return ((queue, exchange, rkey)
                for exchange in self.state.exchanges
                for rkey, _, queue in self.get_table(exchange))

    def after_reply_message_received(self, queue: str) -> None:
        """Kombu's virtual transports delete a reply queue here; like RabbitMQ, river_broker
        leaves that to the queue's auto-delete (when its consumer is cancelled) and
        x-expires, so a reply queue declared once per connection is not lost."""

    # -- consuming -------------------------------------------------------------------------

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        _, rows = self.store.ack_and_fetch(self.connection.consumer.completer.take(), queue, 1)
        if not rows:
            raise Empty()
        return self._to_message(rows[0])

    def _to_message(self, row: LeasedRow) -> dict[str, Any]:
        return from_row(
            row.payload, id=row.id, attempt=row.attempt,
            redelivered=row.redelivered, priority=row.priority, sequenced=row.sequenced,
        )

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        if not no_ack:
            return super().basic_get(queue, no_ack, **kwargs)
        rows = self.store.fetch_noack(queue, 1)
        return self.Message(self._to_message(rows[0]), channel=self) if rows else None

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str,
                      **kwargs: Any) -> Any:
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        # Registered, so x-expires and auto-delete see the consumer. A queue this process
        # declared may have been deleted since (the cleaner saw only a dead consumer of an
        # auto-delete queue, as when a worker restarts under the same name): declare it and
        # its bindings again, as this process knows them.
        if not self.store.consume_queue(queue) and queue in self._declarations:
            self._new_queue(queue, **self._declarations[queue])
            for exchange, routing_key, arguments in self.state.queue_bindings(queue):
                self.queue_bind(queue, exchange, routing_key, arguments)
            self.store.consume_queue(queue)
        self.connection.consumer.add_queue(
            QueueSlot(name=queue, limit=self._room, deliver=partial(self._deliver_row, queue),
                      prefetch=lambda: self.qos.prefetch_count or 0, no_ack=no_ack)
        )
        return result

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and self.connection is not None:
            self.connection.consumer.remove_queue(queue)
            try:
                if self.store.cancel_queue(queue):  # auto-delete: its last consumer left
                    self.connection.forget_routes()
            except Transport.connection_errors as exc:
                # Closing a broken connection: the registration is reaped with the session.
                logger.debug("river_broker: consumer of %s not unregistered (%s)", queue, exc)
        return result

    def _room(self) -> int:
        estimate = self.qos.can_consume_max_estimate()
        if estimate is None:  # prefetch unlimited
            return self.store.options.fetch_batch_size
        return estimate

    def _deliver_row(self, queue: str, row: LeasedRow) -> None:
        self.connection._deliver(self._to_message(row), queue)

    # -- queues ----------------------------------------------------------------------------

    def prepare_queue_arguments(self, arguments: Any, **kwargs: Any) -> Any:
        """Queue(expires=..., message_ttl=...) become x-expires / x-message-ttl (ms)."""
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    @property
    def _declarations(self) -> dict[str, dict[str, Any]]:
        """The latest declaration of each queue by this connection (its _new_queue kwargs)."""
        return self.connection.declarations

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self._declarations[queue] = dict(kwargs)
        arguments = kwargs.get("arguments") or {}
        self.store.declare_queue(
            queue, _json_safe(arguments), auto_delete=bool(kwargs.get("auto_delete")),
            expires_ms=_milliseconds(queue, "x-expires", arguments.get("x-expires")),
            message_ttl_ms=_milliseconds(queue, "x-message-ttl",
                                         arguments.get("x-message-ttl")),
        )

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self.store.queue_exists(queue)

    def _size(self, queue: str) -> int:
        return self.store.queue_size(queue)

    def _purge(self, queue: str) -> int:
        return self.store.purge_queue(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        """queue_delete removes the queue's row, its bindings and its waiting messages."""

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False,
                     **kwargs: Any) -> None:
        if if_empty and self._size(queue):
            return
        super().queue_delete(queue, if_unused=if_unused, if_empty=if_empty, **kwargs)
        self.store.delete_queue(queue)
        self.connection.forget_routes()


class Transport(virtual.Transport):
    """PostgreSQL transport with leases, LISTEN/NOTIFY wake-ups and batched acks."""

    Channel = Channel

    driver_type = "river"
    driver_name = "psycopg"
    default_port = 5432  # type: ignore[assignment]  # kombu annotates it as None
    #: The whole URL (with its libpq query parameters) goes to psycopg as it is.
    can_parse_url = True
    polling_interval = 1.0

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        # fanout makes Celery enable remote control (pidbox) and events consumers.
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    connection_errors = (  # type: ignore[assignment]  # kombu's annotation is tuple[Any]
        *virtual.Transport.connection_errors,
        psycopg.OperationalError,
        psycopg.InterfaceError,
    )
    # MessageError (bad input) is deliberately not a channel error: Kombu would wrap it and
    # retry the publish; it must reach the caller at once, as itself.

    def __init__(self, client: Any, **kwargs: Any):
        super().__init__(client, **kwargs)
        self.options = TransportOptions.from_transport_options(client.transport_options)
        self.polling_interval = self.options.polling_interval
        self.conninfo = conninfo_from_client(client)
        self.store = Store(self.conninfo, self.options, connect_timeout=client.connect_timeout)
        self.consumer = Consumer(self.store)
        self._loop: Any = None
        self._loop_thread: int | None = None
        self._timer_at = math.inf
        self._closed = False
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        #: Set by river_broker.enqueue_many: publishes are collected here, not inserted.
        self.collecting: list[Any] | None = None
        # Routing read from the database: exchange -> (read at, bindings) and -> (read at,
        # type); exchanges this connection declared in the database.
        self._tables: dict[str, tuple[float, list[tuple[str, str | None, str]]]] = {}
        self._kinds: dict[str, tuple[float, str | None]] = {}
        self._declared: set[str] = set()
        #: Queue declarations made through this connection: queue -> _new_queue kwargs.
        self.declarations: dict[str, dict[str, Any]] = {}
        self._broadcaster: Broadcaster | None = None

    # -- connection ------------------------------------------------------------------------

    def establish_connection(self) -> Transport:
        self.store.connect()
        self._closed = False
        return super().establish_connection()

    def verify_connection(self, connection: Any) -> bool:
        return self.store.connected

    def close_connection(self, connection: Any) -> None:
        try:
            super().close_connection(connection)  # closes channels: restores unacked messages
        finally:
            try:
                if self.store.connected:
                    self.consumer.flush_acks()
            except self.connection_errors as exc:
                logger.info("river_broker: acks not written at close (%s); the messages "
                            "will be redelivered", exc)
            self._unregister_from_loop()
            if self._broadcaster is not None:  # transient broadcasts still pending
                self._broadcaster.close()
                self._broadcaster = None
            self.store.close()
            self._closed = True

    def driver_version(self) -> str:
        return psycopg.__version__

    @property
    def broadcaster(self) -> Broadcaster:
        """The background writer of this connection's transient broadcasts (started lazily)."""
        if self._broadcaster is None:
            self._broadcaster = Broadcaster(self.store.publish_routed_many)
        return self._broadcaster

    # -- routing ---------------------------------------------------------------------------

    def declare_exchange(self, exchange: str, kind: str) -> None:
        if exchange in self._declared:
            return
        stored = self.store.declare_exchange(exchange, kind)
        if stored != kind:
            raise ChannelError(
                f"PRECONDITION_FAILED - exchange {exchange!r} exists with type {stored!r}, "
                f"declared here as {kind!r}")
        self._declared.add(exchange)
        self._kinds[exchange] = (time.monotonic(), kind)

    def forget_exchange(self, exchange: str) -> None:
        self._declared.discard(exchange)
        self._kinds.pop(exchange, None)
        self._tables.pop(exchange, None)

    def exchange_kind(self, exchange: str) -> str | None:
        """The type of an exchange this process did not declare (cached; None: unknown)."""
        now = time.monotonic()
        cached = self._kinds.get(exchange)
        if cached is not None and (cached[1] is not None
                                   or now - cached[0] < self.options.routing_cache_ttl):
            return cached[1]
        kind = self.store.exchange_type(exchange)
        self._kinds[exchange] = (now, kind)
        return kind

    def routing_table(self, exchange: str) -> list[tuple[str, str | None, str]]:
        now = time.monotonic()
        cached = self._tables.get(exchange)
        if cached is not None and now - cached[0] < self.options.routing_cache_ttl:
            return cached[1]
        table = self.store.exchange_bindings(exchange)
        self._tables[exchange] = (now, table)
        return table

    def forget_routes(self, exchange: str | None = None) -> None:
        if exchange is None:
            self._tables.clear()
        else:
            self._tables.pop(exchange, None)

    # -- acks ------------------------------------------------------------------------------

    def on_ack(self, token: Token) -> None:
        if self._closed:
            self._late_ack(token)
            return
        self.consumer.completer.add(token)
        if self._loop is not None and (token[2] or threading.get_ident() != self._loop_thread):
            # An ack from a pool thread, or a finished sequence head (its key's next message
            # waits for it): wake the event loop so it is written and the slot refilled now.
            self._poke()

    def _late_ack(self, token: Token) -> None:
        """An ack after the connection closed (a task outlived a reconnect): apply it if the
        delivery still holds its lease, on a short-lived session."""
        store = Store(self.conninfo, self.options)
        try:
            store.ack_and_fetch([token], None, 0)
        except self.connection_errors as exc:
            logger.warning("river_broker: late ack of %s:%s failed (%s); the message will be "
                           "redelivered", token[0], token[1], exc)
        finally:
            store.close()

    def requeue(self, tokens: list[Token]) -> None:
        self.store.requeue(tokens)

    def discard(self, tokens: list[Token]) -> None:
        self.store.discard(tokens)

    # -- consuming without an event loop ---------------------------------------------------

    def drain_events(  # type: ignore[override]  # kombu's base takes **kwargs
        self, connection: Any, timeout: float | None = None
    ) -> None:
        """Deliver what is ready; block on the session's socket (notifications), not on sleep."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.consumer.pump():
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError()
            wait = self.consumer.next_wakeup() - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            self.store.wait_readable(max(wait, 0.0))

    # -- Celery's event loop ---------------------------------------------------------------

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self._unregister_from_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._fd = self.store.fileno()
        loop.add_reader(self._fd, self._on_readable)
        # A self-pipe: lets acks from pool threads, and a pump that left work behind, wake
        # the loop instead of waiting for its next timer.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        loop.add_reader(self._wake_r, self._on_poked)
        loop.on_tick.add(self._on_tick)
        self._poke()  # first fetch as soon as the loop runs

    def _unregister_from_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.on_tick.discard(self._on_tick)
        for fd in (getattr(self, "_fd", None), self._wake_r):
            if fd is not None:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    loop.remove_reader(fd)
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None

    def _poke(self) -> None:
        wake_w = self._wake_w
        if wake_w is not None:
            # A full pipe means a wake-up is already pending; a closed one, we are closing.
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(wake_w, b"\0")

    # Deliveries happen only in reader callbacks (after the hub's poll), never in timers or
    # on_tick (before the poll): Celery reacts to a delivery with hub.call_soon (the solo pool
    # runs the task that way), and work queued before the poll would wait for its timeout.
    # Timers and ticks only poke the self-pipe, whose reader then pumps.

    def _on_readable(self) -> None:
        self.store.consume_notifications()  # marks the queues named by notifications
        self._pump()

    def _on_poked(self) -> None:
        try:
            while os.read(self._wake_r, 512) if self._wake_r is not None else b"":
                pass
        except (BlockingIOError, OSError):
            pass
        self._pump()

    def _on_tick(self) -> None:
        # Room freed since the last pump (acks from the pool's result handler): go again.
        if self._loop is not None and self.consumer.has_ready_work():
            self._poke()

    def _on_timer(self) -> None:
        self._timer_at = math.inf
        self._poke()

    def _pump(self) -> None:
        if self._loop is None or self._closed:
            return
        self.consumer.pump()
        if self.consumer.has_ready_work():
            self._poke()  # the loop must not sleep: fetch again on its next turn
        wake = self.consumer.next_wakeup()
        # One timer for the earliest thing due (trailing checks, ack flush, ETA, poll).
        if wake < self._timer_at - 0.001:
            self._timer_at = wake
            self._loop.call_later(max(wake - time.monotonic(), 0.0), self._on_timer)


def _milliseconds(queue: str, name: str, value: Any) -> int | None:
    """x-expires / x-message-ttl: a whole number of milliseconds (Kombu converts seconds)."""
    if value is None:
        return None
    least = 1 if name == "x-expires" else 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least:
        kind = "positive" if least else "non-negative"
        raise ConfigurationError(
            f"queue {queue!r}: argument {name!r} must be a {kind} number of milliseconds, "
            f"got {value!r}")
    return int(value)


def _json_safe(arguments: Any) -> dict[str, Any]:
    if not arguments:
        return {}
    return {str(k): (v if isinstance(v, (str, int, float, bool)) or v is None else repr(v))
            for k, v in dict(arguments).items()}


__all__ = ["Channel", "ConfigurationError", "QoS", "SchemaError", "Transport"]
