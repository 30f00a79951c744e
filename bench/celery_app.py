"""The Celery app of the benchmark: ``celery -A bench.celery_app worker ...``.

Every broker is driven through the same app; only the environment differs:

* ``BENCH_BROKER_URL``: the broker URL (``river+postgresql://...``, ``amqp://...``, ...).
* ``BENCH_TRANSPORT_OPTIONS``: a JSON object, Celery's ``broker_transport_options``.
* ``BENCH_QUEUE``: the queue tasks go to and the worker consumes (one per run, so a benchmark
  never shares a queue with anyone else on the same broker).
* ``BENCH_READY_FILE``: the worker writes ``time.time()`` there once it consumes (worker_ready).
* ``BENCH_LATENCY_FILE``: :func:`stamp` appends ``time.time() - sent`` there, one line a task.
* ``BENCH_PREFETCH``: worker_prefetch_multiplier, 4 unless set (for experiments only).
* ``BENCH_REMOTE_CONTROL``: ``1`` enables Celery's remote control (bench/broadcast.py).

``bench/run.py`` also builds apps with :func:`make_app` to publish with the same settings.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery, signals

import river_broker  # noqa: F401  (registers the river+ URL scheme)

NOOP = "bench.noop"
STAMP = "bench.stamp"


def make_app(
    broker_url: str, transport_options: dict[str, Any] | None = None, queue: str = "celery"
) -> Celery:
    """The benchmark app: acks late, prefetch multiplier 4, no result backend, remote control
    only with ``BENCH_REMOTE_CONTROL=1``."""
    app = Celery("river_bench", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options=dict(transport_options or {}),
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=prefetch_multiplier(),
        worker_hijack_root_logger=False,
        # bench/run.py measures the task path alone: remote control off for every broker
        # alike. bench/broadcast.py turns it on (BENCH_REMOTE_CONTROL=1) to measure its cost.
        worker_enable_remote_control=os.environ.get("BENCH_REMOTE_CONTROL") == "1",
        result_backend=None,
    )
    app.task(name=NOOP)(noop)
    app.task(name=STAMP)(stamp)
    return app


def prefetch_multiplier() -> int:
    """4 unless ``BENCH_PREFETCH`` says otherwise (for experiments; the results record it)."""
    return int(os.environ.get("BENCH_PREFETCH") or 4)


def noop() -> None:
    """The task of the throughput run: nothing but the broker and Celery's own work."""
    return None


def stamp(sent: float) -> None:
    """Record how long after ``sent`` (the publisher's ``time.time()``) this task started."""
    delay = time.time() - sent
    path = os.environ.get("BENCH_LATENCY_FILE")
    if path:
        _append(path, f"{delay:.6f}\n")


def _append(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@signals.worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    # Sent once the consumer consumes, just before the event loop starts.
    path = os.environ.get("BENCH_READY_FILE")
    if path:
        _append(path, f"{time.time():.6f}\n")


app = make_app(
    os.environ.get("BENCH_BROKER_URL", "river+postgresql://postgres@127.0.0.1:5432/test"),
    json.loads(os.environ.get("BENCH_TRANSPORT_OPTIONS") or "{}"),
    os.environ.get("BENCH_QUEUE", "celery"),
)
