"""The consuming side of one Kombu connection: what to fetch, when, and batched acks.

The transport adapter calls :meth:`Consumer.pump` from Celery's event loop (every tick, when the
connection's socket is readable, from timers) or from ``drain_events``. ``pump`` decides, without
touching the database unless there is a reason to, whether to write buffered acks and whether to
fetch: a queue is fetched when a notification named it, when its last fetch came back full, after
a fallback poll, or shortly after a notification (a trailing check that covers publishers whose
NOTIFY was throttled).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .store import LeasedRow, Store, Token

logger = logging.getLogger(__name__)


@dataclass
class Completer:
    """Buffered acks, written in batches (possibly together with the next fetch).

    Acks may come from any thread (Celery's threads pool); the buffer has its own lock.
    """

    batch_size: int
    flush_interval: float
    _acks: list[Token] = field(default_factory=list)
    _oldest: float | None = None
    #: A finished sequence head is written at once: the next message of its key waits for it.
    _urgent: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, token: Token) -> bool:
        """Buffer an ack; True when the buffer was empty before (a flush must be scheduled)."""
        with self._lock:
            was_empty = not self._acks
            self._acks.append(token)
            if was_empty:
                self._oldest = time.monotonic()
            if token[2]:
                self._urgent = True
            return was_empty

    def take(self) -> list[Token]:
        with self._lock:
            acks, self._acks, self._oldest = self._acks, [], None
            self._urgent = False
            return acks

    def due(self, now: float, *, hold_urgent: bool = False) -> bool:
        with self._lock:
            if not self._acks:
                return False
            return (
                (self._urgent and not hold_urgent)
                or len(self._acks) >= self.batch_size
                or self._oldest is None
                or now - self._oldest >= self.flush_interval
            )

    def pending(self) -> int:
        with self._lock:
            return len(self._acks)

    def urgent(self) -> bool:
        return self._urgent

    def next_deadline(self, *, hold_urgent: bool = False) -> float | None:
        with self._lock:
            if self._urgent and not hold_urgent:
                return time.monotonic()
            return None if self._oldest is None else self._oldest + self.flush_interval


@dataclass
class QueueSlot:
    """What the consumer knows about one queue it consumes."""

    name: str
    limit: Callable[[], int]  # how many messages the consuming channel can take now
    deliver: Callable[[LeasedRow], None]
    prefetch: Callable[[], int] = lambda: 0  # the channel's prefetch count (0: unlimited)
    #: A no_ack consumer (Celery's remote control and event receivers): messages are
    #: finished as they are taken.
    no_ack: bool = False


class Consumer:
    """Fetching, acking and maintenance for the consuming side of one Store."""

    #: After a notification, check its queue once more this much later (>= notify_throttle).
    trailing_delay_factor = 1.5
    #: Fetch rounds per pump while room keeps freeing up (solo pool: tasks run, and ack,
    #: inside the delivery); bounded so other event-loop work is not starved.
    max_fetch_rounds = 4

    def __init__(self, store: Store):
        self.store = store
        o = store.options
        self.options = o
        self.completer = Completer(o.ack_batch_size, o.ack_flush_interval)
        self.slots: dict[str, QueueSlot] = {}
        self._dirty: set[str] = set()
        self._trailing: dict[str, float] = {}
        self._next_poll = 0.0
        self._next_rescue = 0.0
        self._next_clean = 0.0
        self._next_scheduled: float | None = None  # monotonic time the next ETA is due
        self._rotation = 0

    # -- consumers -------------------------------------------------------------------------

    def add_queue(self, slot: QueueSlot) -> None:
        self.slots[slot.name] = slot
        self._dirty.add(slot.name)
        self.store.listen(self.on_notification, slot.name)
        self._next_poll = 0.0

    def remove_queue(self, name: str) -> None:
        if self.slots.pop(name, None) is not None:
            try:
                self.store.unlisten(name)
            except Exception as exc:  # a broken connection: nothing to stop listening on
                logger.debug("river_broker: UNLISTEN %s failed (%s)", name, exc)
        self._dirty.discard(name)
        self._trailing.pop(name, None)

    # -- wake-ups --------------------------------------------------------------------------

    def on_notification(self, payload: str) -> None:
        logger.debug("river_broker: notification %r", payload)
        kind, rest = payload[:1], payload[1:]
        if kind == "s":
            # "s<epoch> <queue>": a message scheduled for later; wake up when it is due.
            epoch, _, queue = rest.partition(" ")
            if queue in self.slots:
                try:
                    due = time.monotonic() + max(0.0, float(epoch) - time.time())
                except ValueError:
                    return
                if self._next_scheduled is None or due < self._next_scheduled:
                    self._next_scheduled = due
            return
        queue = rest
        slot = self.slots.get(queue)
        if slot is not None:
            self._dirty.add(queue)
            if slot.no_ack:
                # Remote control, replies, events, gossip: the trailing check would double
                # the fetches of every worker for each heartbeat of every other worker. A
                # message whose NOTIFY was throttled away (a burst from one publisher to one
                # queue) is fetched with the next notification or the fallback poll.
                return
            # Publishers skip NOTIFYs within notify_throttle of their last one: look again
            # after that window, counted from the latest notification (not the first).
            delay = max(self.options.notify_throttle * self.trailing_delay_factor, 0.005)
            self._trailing[queue] = time.monotonic() + delay

    # -- the pump --------------------------------------------------------------------------

    def pump(self) -> int:
        """Do whatever is due now; returns the number of messages delivered."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._maintenance(now)
        if self._next_scheduled is not None and now >= self._next_scheduled:
            self._next_scheduled = None
            self._promote_scheduled()
        if self._trailing:
            for queue, when in list(self._trailing.items()):
                if now >= when:
                    del self._trailing[queue]
                    self._dirty.add(queue)
        delivered = 0
        for _ in range(self.max_fetch_rounds):
            finished_head = self._fetch_after_finished_head()
            fetched = self._fetch_dirty()
            delivered += fetched
            if not (fetched or finished_head) or not (
                self.has_ready_work() or self.completer.urgent()
            ):
                break
        if self.completer.due(time.monotonic(), hold_urgent=self._busy()):
            self.flush_acks()
        return delivered

    def _fetch_after_finished_head(self) -> bool:
        """A finished sequence head promotes the next message of its key in the ack's own
        transaction: fetch in that same transaction instead of waiting for its NOTIFY."""
        if self.completer.urgent() and not self._busy():
            self._dirty.update(n for n, slot in self.slots.items() if not slot.no_ack)
            return True
        return False

    def has_ready_work(self) -> bool:
        """A queue may have messages and its channel has room: fetch again without waiting."""
        return any(
            name in self._dirty and self._room_to_fetch(slot) > 0
            for name, slot in self.slots.items()
        )

    def _room_to_fetch(self, slot: QueueSlot) -> int:
        """How many to fetch now. While the channel still holds messages, wait until half its
        prefetch is free: a backlog is then drained in batches instead of one round trip per
        acked message (RabbitMQ streams; we fetch). A finished sequence head is not kept
        waiting: its ack travels with the fetch at once."""
        room = min(slot.limit(), self.options.fetch_batch_size)
        prefetch = slot.prefetch()
        if room <= 0 or not prefetch:
            return room
        in_hand = prefetch - room
        if in_hand <= 0 or room * 2 >= prefetch:
            return room
        # A finished sequence head goes out at once (its key's next message waits for it)
        # unless the channel is busy enough that this fetch would be a tiny one anyway.
        return room if self.completer.urgent() and not self._busy() else 0

    def _busy(self) -> bool:
        """Every consuming channel still holds at least half its prefetch: finished heads
        can ride with the next batched refill, moments away, instead of a round trip each."""
        busy = False
        for slot in self.slots.values():
            if slot.no_ack:  # remote control and events: no prefetch, no acks
                continue
            prefetch = slot.prefetch()
            if not prefetch:
                return False
            if (prefetch - slot.limit()) * 2 < prefetch:
                return False
            busy = True
        return busy

    def flush_acks(self) -> None:
        acks = self.completer.take()
        if acks:
            self.store.ack_and_fetch(acks, None, 0)

    def _fetch_dirty(self) -> int:
        if not self._dirty:
            return 0
        delivered = 0
        names = [n for n in self.slots if n in self._dirty]
        if len(names) > 1:  # fairness between queues: rotate the starting point
            self._rotation = (self._rotation + 1) % len(names)
            names = names[self._rotation:] + names[: self._rotation]
        for name in names:
            slot = self.slots.get(name)
            if slot is None:
                continue
            limit = self._room_to_fetch(slot)
            if limit <= 0:
                continue  # stays dirty: fetched again once the channel has room
            if slot.no_ack:
                rows = self.store.fetch_noack(name, limit)
            else:
                _, rows = self.store.ack_and_fetch(self.completer.take(), name, limit)
            logger.debug("river_broker: fetched %d/%d from %s", len(rows), limit, name)
            if len(rows) < limit:
                self._dirty.discard(name)
            for row in rows:
                slot.deliver(row)
            delivered += len(rows)
        return delivered

    # -- maintenance -----------------------------------------------------------------------

    def _maintenance(self, now: float) -> None:
        o = self.options
        self._next_poll = now + o.polling_interval
        self._dirty.update(self.slots)  # fallback poll: notifications may have been lost
        if now >= self._next_rescue:
            self._next_rescue = now + o.rescue_interval
            self.store.rescue_orphaned_leases()
            self.store.clean_queues()  # dead consumers, auto-delete and x-expires queues
        if now >= self._next_clean:
            self._next_clean = now + o.clean_interval
            self.store.clean()
        self._promote_scheduled()

    def _promote_scheduled(self) -> None:
        queues = list(self.slots)
        if not queues:
            return
        self.store.promote_due_scheduled(queues)
        epoch = self.store.next_scheduled(queues)
        if epoch is not None:
            self._next_scheduled = time.monotonic() + max(0.0, epoch - time.time())

    def next_wakeup(self) -> float:
        """Monotonic time by which :meth:`pump` has something to do."""
        times: Iterable[float | None] = (
            self._next_poll,
            self._next_scheduled,
            self.completer.next_deadline(hold_urgent=self._busy()),
            *self._trailing.values(),
        )
        return min(t for t in times if t is not None)
