"""Transient broadcasts written in the background, in batches.

Celery publishes its events (heartbeats, task events) and remote-control requests as transient
messages to topic and fanout exchanges. RabbitMQ takes such a publish without a round trip;
written synchronously here, each one would cost the worker's event loop a database round trip
(with ``-E``, several per task). A :class:`Broadcaster` queues them in memory and a thread of its
own writes them, many per transaction, on the connection's session: ``publish()`` returns at
once, as with RabbitMQ without publisher confirms. The price is RabbitMQ's too: a transient
message can be lost (the process dies before the batch is written, the database is unreachable);
failures are logged, never raised to the publisher.

Pending messages are written when the connection closes and at interpreter exit. The queue is
bounded: a publisher that outruns the database waits, as on a full socket buffer.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: Most messages one transaction writes.
BATCH = 500
#: A publisher waits while this many messages are pending.
MAX_PENDING = 10_000

_live: weakref.WeakSet[Broadcaster] = weakref.WeakSet()


class Broadcaster:
    """A background writer for ``write(batch)``; ``batch`` is a list of what ``submit`` got."""

    def __init__(self, write: Callable[[list[Any]], object], name: str = "river_broker"):
        self._write = write
        self._name = name
        self._pending: deque[Any] = deque()
        self._cond = threading.Condition()
        self._busy = False  # a batch is being written
        self._closed = False
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        _live.add(self)

    def submit(self, item: Any) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("river_broker: publishing on a closed connection")
            if self._pid != os.getpid():  # forked: the parent's pending work stays its own
                self._pending.clear()
                self._busy = False
                self._thread = None
                self._pid = os.getpid()
            while len(self._pending) >= MAX_PENDING:
                self._cond.wait(0.1)
            self._pending.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"{self._name}-broadcast",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._pid != os.getpid():
                return True
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    break
                self._cond.wait(left)
            done = not self._pending and not self._busy
        if not done:
            logger.warning("river_broker: %d transient broadcast(s) not written in %.0fs",
                           len(self._pending), timeout)
        return done

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed and not self._pending:
                    return
                batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
                self._busy = True
                self._cond.notify_all()  # room for publishers waiting on a full queue
            try:
                self._write(batch)
            except Exception as exc:
                logger.warning("river_broker: %d transient broadcast(s) lost: %s: %s",
                               len(batch), type(exc).__name__, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


@atexit.register
def _flush_all() -> None:
    """A short script (``app.control.broadcast(...)``) may exit without closing its
    connections: what it published is written before the interpreter goes."""
    for broadcaster in list(_live):
        broadcaster.flush(timeout=5.0)
