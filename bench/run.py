"""Side-by-side benchmark: river_broker vs RabbitMQ, Redis and kombu's SQLAlchemy transport.

Run from the repository root::

    python bench/run.py [--quick] [--only river,rabbitmq,redis,sqlalchemy]

For every reachable broker, one after the other (never two at once):

1. Raw Kombu publish: one producer, a small JSON body, persistent messages, durable queue.
2. Raw Kombu consume+ack: one consumer, prefetch_count=100, ``drain_events``, ack each
   message; the clock stops once the connection is closed (batched acks written).
3. Celery end to end: N ``noop`` tasks are published while no worker runs; then the worker
   (``celery -A bench.celery_app worker -P prefork -c 2 ...``) starts, and the rate is
   N / (time the queue has no ready message left - time the worker signalled worker_ready).
4. Idle latency: the same worker, now idle, gets 50 ``stamp`` tasks 50 ms apart, each carrying
   the publisher's ``time.time()``; the task records how late it started. p50 and p95.

Prints a table (rows: metrics, columns: brokers, plus river/rabbitmq) and writes the results as
JSON to bench/results/latest.json. bench/README.md explains the method and its caveats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench.celery_app`` importable
    sys.path.insert(0, str(ROOT))

from kombu import Connection, Consumer, Exchange, Producer, Queue  # noqa: E402

from bench.celery_app import NOOP, STAMP, make_app, prefetch_multiplier  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
BROKER_NAMES = ("river", "rabbitmq", "redis", "sqlalchemy")

WORKER_CMD = [
    sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker",
    "-P", "prefork", "-c", "2",
    "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning",
]

LATENCY_TASKS = 50
LATENCY_SPACING = 0.050  # seconds between two latency tasks
IDLE_SETTLE = 1.0  # seconds the worker idles before the latency run
DRAIN_POLL = 0.05  # seconds between two queue-size polls near the end of the e2e run
DRAIN_POLL_FAR = 0.25  # ... and while more than a tenth of the tasks are left

METHOD = (
    "Celery e2e: N noop tasks pre-published with no worker running; then the worker starts "
    f"(prefork -c 2, acks_late, prefetch multiplier {prefetch_multiplier()}) and tasks/s = "
    "N / (queue has no ready message left - worker_ready). Kombu: one producer, then one "
    "consumer (prefetch 100, ack each, clock stops after connection close). Latency: idle "
    "worker, 50 tasks 50 ms apart, task start time - publish time. Each broker at its "
    "defaults, one broker at a time."
)

# (key, label, unit, better): the rows of the table, in order.
METRICS = [
    ("celery_e2e_tasks_per_s", "Celery e2e (prefork -c 2)", "tasks/s", "higher"),
    ("kombu_publish_msgs_per_s", "Kombu publish", "msg/s", "higher"),
    ("kombu_consume_ack_msgs_per_s", "Kombu consume+ack", "msg/s", "higher"),
    ("latency_p50_ms", "Idle publish->start p50", "ms", "lower"),
    ("latency_p95_ms", "Idle publish->start p95", "ms", "lower"),
    ("celery_publish_tasks_per_s", "Celery send_task (pre-publish, info)", "tasks/s", "higher"),
]


# -- brokers -----------------------------------------------------------------------------------


@dataclass
class Sizes:
    e2e: int
    raw: int


@dataclass
class Broker:
    """One broker under test: where it is, and how to prepare and clean its namespace."""

    name: str
    url: str
    host: str
    port: int
    sizes: Sizes
    transport_options: dict[str, Any] = field(default_factory=dict)
    postgres: bool = False  # stored in the bench's PostgreSQL (restarts are noticed)
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)


def make_brokers(quick: bool, run_id: str) -> dict[str, Broker]:
    full = Sizes(e2e=3000, raw=3000) if quick else Sizes(e2e=20000, raw=20000)
    sqla = Sizes(e2e=1000, raw=1000) if quick else Sizes(e2e=3000, raw=3000)
    river_schema = f"bench_river_{run_id}"
    sqla_schema = f"bench_sqla_{run_id}"
    return {
        "river": Broker(
            "river", "river+postgresql://postgres@127.0.0.1:5432/test", "127.0.0.1", 5432, full,
            transport_options={"schema": river_schema}, postgres=True,
            teardown=lambda: drop_schema(river_schema),
        ),
        "rabbitmq": Broker(
            "rabbitmq", "amqp://guest:guest@127.0.0.1:5672//", "127.0.0.1", 5672, full,
        ),
        "redis": Broker("redis", "redis://127.0.0.1:6379/0", "127.0.0.1", 6379, full),
        "sqlalchemy": Broker(
            "sqlalchemy", "sqla+postgresql+psycopg://postgres@127.0.0.1:5432/test",
            "127.0.0.1", 5432, sqla,
            # The options go to sqlalchemy.create_engine: its tables land in a fresh schema.
            transport_options={"connect_args": {"options": f"-csearch_path={sqla_schema}"}},
            postgres=True,
            setup=lambda: create_schema(sqla_schema),
            teardown=lambda: close_sqla_and_drop(sqla_schema),
        ),
    }


def _pg_execute(statement: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET lock_timeout = '15s'")
        conn.execute(sql.SQL(statement))


def create_schema(schema: str) -> None:
    _pg_execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')


def drop_schema(schema: str, attempts: int = 5) -> None:
    """Drop ``schema``, retrying for a while (the server may be restarting)."""
    for attempt in range(attempts):
        try:
            _pg_execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            return
        except Exception as exc:
            if attempt == attempts - 1:
                hint = f'drop it by hand: DROP SCHEMA "{schema}" CASCADE'
                raise RuntimeError(f"{exc}; {hint}") from exc
            time.sleep(3.0)


def pg_started_at() -> str | None:
    """When the PostgreSQL server started (to notice a restart during a run), or None."""
    import psycopg

    try:
        with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT pg_postmaster_start_time()::text").fetchone()
    except Exception:
        return None
    return row[0] if row else None


def close_sqla_and_drop(schema: str) -> None:
    """kombu's SQLAlchemy sessions stay idle in transaction: end them, then drop the schema."""
    from kombu.transport.sqlalchemy import Channel as SqlaChannel
    from sqlalchemy.orm import close_all_sessions

    close_all_sessions()
    for engine, _ in list(SqlaChannel._engines.values()):
        engine.dispose()
    SqlaChannel._engines.clear()
    drop_schema(schema)


def reachable(broker: Broker, timeout: float = 3.0) -> str | None:
    """None when the broker's port accepts connections, else why not."""
    try:
        with socket.create_connection((broker.host, broker.port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{broker.host}:{broker.port} not reachable ({exc})"


def queue_for(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name,
                 durable=True)


def connect(broker: Broker) -> Connection:
    conn = Connection(broker.url, transport_options=dict(broker.transport_options),
                      connect_timeout=5)
    conn.ensure_connection(max_retries=2)
    return conn


def ready_count(channel: Any, queue: str) -> int:
    """Messages waiting in ``queue`` (not counting the ones delivered and unacked)."""
    size = getattr(channel, "_size", None)
    if size is not None:  # Kombu's virtual transports: river, Redis, SQLAlchemy
        return int(size(queue))
    return int(channel.queue_declare(queue=queue, passive=True).message_count)


def delete_queues(broker: Broker, names: list[str]) -> None:
    with connect(broker) as conn:
        channel = conn.channel()
        for name in names:
            queue = queue_for(name)(channel)
            with contextlib.suppress(Exception):
                # Declared first: virtual transports (Redis) delete the bindings they know of.
                queue.declare()
                queue.delete()
            with contextlib.suppress(Exception):
                queue.exchange.delete()


# -- raw Kombu ---------------------------------------------------------------------------------


def kombu_publish(broker: Broker, queue_name: str, n: int) -> float:
    """msg/s of one producer publishing ``n`` small persistent messages."""
    with connect(broker) as conn:
        channel = conn.channel()
        queue = queue_for(queue_name)
        queue(channel).declare()
        producer = Producer(channel, exchange=queue.exchange, routing_key=queue.routing_key,
                            serializer="json")
        publish = producer.publish
        start = time.perf_counter()
        for i in range(n):
            publish({"i": i}, delivery_mode=2)
        elapsed = time.perf_counter() - start
    return n / elapsed


def kombu_consume(broker: Broker, queue_name: str, n: int, timeout: float) -> float:
    """msg/s of one consumer (prefetch 100) receiving and acking ``n`` messages."""
    received = 0

    def on_message(body: Any, message: Any) -> None:
        nonlocal received
        message.ack()
        received += 1

    conn = connect(broker)
    try:
        channel = conn.channel()
        consumer = Consumer(channel, [queue_for(queue_name)], callbacks=[on_message],
                            accept=["json"])
        consumer.qos(prefetch_count=100)
        deadline = time.monotonic() + timeout
        start = time.perf_counter()
        consumer.consume()
        while received < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"consumed {received} of {n} messages in {timeout:.0f}s")
            with contextlib.suppress(socket.timeout):
                conn.drain_events(timeout=min(left, 1.0))
        consumer.cancel()
        conn.close()  # river batches acks: closing writes the last ones
        elapsed = time.perf_counter() - start
    finally:
        conn.release()
    with connect(broker) as checker:  # every ack applied: nothing came back to the queue
        left = ready_count(checker.channel(), queue_name)
    if left:
        broker.notes.append(f"{left} message(s) back in the queue after consume+ack")
    return n / elapsed


# -- Celery ------------------------------------------------------------------------------------


class Worker:
    """``celery worker`` as a subprocess in its own process group."""

    def __init__(self, broker: Broker, queue: str, workdir: Path):
        self.broker = broker
        self.queue = queue
        self.ready_file = workdir / f"{broker.name}.ready"
        self.latency_file = workdir / f"{broker.name}.latency"
        self.log_file = workdir / f"{broker.name}.worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            BENCH_BROKER_URL=self.broker.url,
            BENCH_TRANSPORT_OPTIONS=json.dumps(self.broker.transport_options),
            BENCH_QUEUE=self.queue,
            BENCH_READY_FILE=str(self.ready_file),
            BENCH_LATENCY_FILE=str(self.latency_file),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        )
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(
                WORKER_CMD, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"worker exited with code {self.proc.returncode}: {self.log_tail()}"
            )

    def wait_ready(self, timeout: float = 90.0) -> float:
        """The worker's ``time.time()`` at worker_ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(FileNotFoundError, ValueError):
                text = self.ready_file.read_text().strip()
                if text:
                    return float(text.splitlines()[0])
            time.sleep(0.02)
        raise TimeoutError(f"worker not ready after {timeout:.0f}s: {self.log_tail()}")

    def latencies(self) -> list[float]:
        try:
            return [float(line) for line in self.latency_file.read_text().split()]
        except FileNotFoundError:
            return []

    def log_tail(self, lines: int = 8) -> str:
        try:
            tail = self.log_file.read_text(errors="replace").strip().splitlines()[-lines:]
        except FileNotFoundError:
            return "(no worker log)"
        return " | ".join(tail) or "(empty worker log)"

    def stop(self) -> None:
        """Warm shutdown (SIGTERM to the group); SIGKILL to the group if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        # Prefork children, if any are left: while one lives, the group id is still ours.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def celery_publish(app: Any, n: int) -> float:
    with app.producer_or_acquire() as producer:
        start = time.perf_counter()
        for _ in range(n):
            app.send_task(NOOP, producer=producer)
        elapsed = time.perf_counter() - start
    return n / elapsed


def celery_e2e(broker: Broker, app: Any, worker: Worker, queue: str, n: int,
               poller: Connection) -> float:
    """Start the worker on a queue holding ``n`` tasks; tasks/s until no ready one is left."""
    channel = poller.channel()
    settle = time.monotonic() + 15.0  # AMQP publishes are asynchronous: let them all land
    while (waiting := ready_count(channel, queue)) < n:
        if time.monotonic() > settle:
            raise RuntimeError(f"only {waiting} of {n} tasks queued before the worker started")
        time.sleep(DRAIN_POLL)
    timeout = 60.0 + n / 50.0
    worker.start()
    ready_at = worker.wait_ready()
    deadline = time.monotonic() + timeout
    while (left := ready_count(channel, queue)) > 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"queue not drained after {timeout:.0f}s ({left} of {n} left)")
        worker.check_alive()
        # Counting is not free (a count(*) on the PostgreSQL brokers): poll sparingly until
        # the end is near, then every DRAIN_POLL.
        time.sleep(DRAIN_POLL if left <= n // 10 else DRAIN_POLL_FAR)
    drained_at = time.time()
    return n / (drained_at - ready_at)


def idle_latency(app: Any, worker: Worker) -> list[float]:
    """Seconds from publish to task start, for tasks sent one by one to an idle worker."""
    time.sleep(IDLE_SETTLE)
    with app.producer_or_acquire() as producer:
        next_at = time.perf_counter()
        for _ in range(LATENCY_TASKS):
            app.send_task(STAMP, args=[time.time()], producer=producer)
            next_at += LATENCY_SPACING
            time.sleep(max(0.0, next_at - time.perf_counter()))
    deadline = time.monotonic() + 30.0
    while len(samples := worker.latencies()) < LATENCY_TASKS:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(samples)} of {LATENCY_TASKS} latency tasks ran in time")
        worker.check_alive()
        time.sleep(0.05)
    return samples


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100.0 * len(ordered)) - 1)]


# -- one broker --------------------------------------------------------------------------------


def log(broker: str, text: str) -> None:
    print(f"[{broker}] {text}", flush=True)


def run_broker(broker: Broker, run_id: str, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "status": "ok", "url": broker.url, "notes": broker.notes,
        "n_celery": broker.sizes.e2e, "n_kombu": broker.sizes.raw,
        "metrics": {key: None for key, *_ in METRICS},
    }
    metrics = result["metrics"]
    why = reachable(broker)
    if why:
        log(broker.name, f"skipped: {why}")
        return {**result, "status": "skipped", "notes": [why]}

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        try:
            value = fn()
        except Exception as exc:  # one phase failing must not lose the others
            note = f"{name} failed: {type(exc).__name__}: {exc}"
            broker.notes.append(note)
            result["status"] = "partial"
            log(broker.name, note)
            return None
        log(broker.name, f"{name}: {_fmt_log(value)} ({time.monotonic() - start:.1f}s)")
        return value

    raw_queue = f"bench_raw_{run_id}"
    celery_queue = f"bench_celery_{run_id}"
    worker = Worker(broker, celery_queue, workdir)
    app = make_app(broker.url, broker.transport_options, celery_queue)
    result["load_before"] = os.getloadavg()
    pg_before = pg_started_at() if broker.postgres else None
    try:
        setup = phase("setup", lambda: broker.setup() or "done")
        if setup is None:
            result["status"] = "error"
            return result
        n_raw, n_e2e = broker.sizes.raw, broker.sizes.e2e
        metrics["kombu_publish_msgs_per_s"] = phase(
            f"kombu publish x{n_raw}", lambda: kombu_publish(broker, raw_queue, n_raw))
        if metrics["kombu_publish_msgs_per_s"] is not None:
            metrics["kombu_consume_ack_msgs_per_s"] = phase(
                f"kombu consume+ack x{n_raw}",
                lambda: kombu_consume(broker, raw_queue, n_raw, timeout=60.0 + n_raw / 20.0))

        def declare_celery_queue() -> str:
            with app.connection_for_write() as conn:
                app.amqp.queues[celery_queue](conn.default_channel).declare()
            return "done"

        published = phase("declare celery queue", declare_celery_queue) and phase(
            f"celery send_task x{n_e2e}", lambda: celery_publish(app, n_e2e))
        metrics["celery_publish_tasks_per_s"] = published
        if published is not None:
            with connect(broker) as poller:
                metrics["celery_e2e_tasks_per_s"] = phase(
                    f"celery e2e x{n_e2e}",
                    lambda: celery_e2e(broker, app, worker, celery_queue, n_e2e, poller))
            if metrics["celery_e2e_tasks_per_s"] is not None:
                samples = phase(f"idle latency x{LATENCY_TASKS}",
                                lambda: idle_latency(app, worker))
                if samples:
                    metrics["latency_p50_ms"] = percentile(samples, 50) * 1000.0
                    metrics["latency_p95_ms"] = percentile(samples, 95) * 1000.0
                    result["latency_mean_ms"] = statistics.fmean(samples) * 1000.0
                    result["latency_max_ms"] = max(samples) * 1000.0
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            app.close()
        with contextlib.suppress(Exception):
            delete_queues(broker, [raw_queue, celery_queue])
        phase("cleanup", lambda: broker.teardown() or "done")
        result["load_after"] = os.getloadavg()
        if broker.postgres and pg_started_at() != pg_before:
            broker.notes.append("PostgreSQL restarted during this broker's run: numbers invalid")
            result["status"] = "partial"
    return result


def _fmt_log(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}/s"
    if isinstance(value, list):
        return f"{len(value)} samples, p50 {percentile(value, 50) * 1000:.1f} ms"
    return str(value)


# -- report ------------------------------------------------------------------------------------


def ratio(results: dict[str, Any], key: str) -> float | None:
    river = (results.get("river") or {}).get("metrics", {}).get(key)
    rabbit = (results.get("rabbitmq") or {}).get("metrics", {}).get(key)
    if river is None or not rabbit:
        return None
    return river / rabbit


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def table(results: dict[str, Any]) -> str:
    names = list(results)
    header = ["metric", *names, "river/rabbitmq"]
    rows = [header]
    for key, label, unit, better in METRICS:
        cells = [f"{label} ({unit}, {better} better)"]
        for name in names:
            cells.append(fmt(results[name]["metrics"].get(key), unit))
        r = ratio(results, key)
        cells.append("-" if r is None else f"{r:.2f}x")
        rows.append(cells)
    rows.append(["N (celery / kombu)", *(
        f"{results[n]['n_celery']} / {results[n]['n_kombu']}" for n in names), ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(widths[j + 1]) for j, cell in enumerate(row[1:])]
        lines.append(" | ".join([first, *rest]))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    lines.append("")
    lines.append("river/rabbitmq: throughput rows, > 1 means river is faster; latency rows, "
                 "< 1 means river is faster.")
    for name in names:
        status = results[name]["status"]
        for note in results[name]["notes"]:
            lines.append(f"note [{name}] ({status}): {note}")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import celery
    import kombu

    import river_broker

    found = {"python": platform.python_version(), "kombu": kombu.__version__,
             "celery": celery.__version__, "river_broker": river_broker.__version__}
    for module in ("psycopg", "redis", "sqlalchemy", "amqp"):
        with contextlib.suppress(ImportError):
            found[module] = __import__(module).__version__
    return found


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller runs (3000 messages, SQLAlchemy 1000): about 2 minutes")
    parser.add_argument("--only", default=",".join(BROKER_NAMES),
                        help=f"comma-separated brokers among {', '.join(BROKER_NAMES)}")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json",
                        help="where the JSON results go (default: bench/results/latest.json)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(BROKER_NAMES))
    if unknown or not args.only:
        parser.error(f"--only: unknown broker(s) {unknown}; choose among {BROKER_NAMES}")
    return args


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (e.g. from nox or a CI timeout) still runs the cleanups."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = uuid.uuid4().hex[:8]
    brokers = make_brokers(args.quick, run_id)
    print(f"river_broker benchmark ({'quick' if args.quick else 'full'}), run {run_id}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"Method: {METHOD}", flush=True)
    started = time.time()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="river-bench-") as tmp, sigterm_as_exit():
        for name in args.only:
            results[name] = run_broker(brokers[name], run_id, Path(tmp))
    report = table(results)
    print()
    print(report)
    payload = {
        "run_id": run_id,
        "mode": "quick" if args.quick else "full",
        "started_at": started,
        "duration_s": time.time() - started,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions(),
        "method": METHOD,
        "worker_command": " ".join(["celery", *WORKER_CMD[3:]]),
        "worker_prefetch_multiplier": prefetch_multiplier(),
        "metrics": [
            {"key": key, "label": label, "unit": unit, "better": better}
            for key, label, unit, better in METRICS
        ],
        "brokers": results,
        "river_vs_rabbitmq": {key: ratio(results, key) for key, *_ in METRICS},
        "table": report,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nResults: {args.output} ({time.time() - started:.0f}s)")
    return 0 if all(r["status"] != "error" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
