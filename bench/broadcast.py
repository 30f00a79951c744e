"""What monitoring costs: Celery task throughput with and without a fleet of idle workers
(heartbeats, gossip, remote control) and a Flower session, on river_broker, RabbitMQ and Redis.

Run from the repository root::

    python bench/broadcast.py [--quick] [--only river,rabbitmq,redis] [--idle-workers 20]

For every reachable broker, one after the other, three scenarios; the measured worker is the
same in all of them (``celery worker -P prefork -c 2`` with Celery's defaults: heartbeats, gossip,
mingle and remote control on):

A. **alone**: the measured worker and nothing else.
B. **monitored**: plus ``--idle-workers`` idle workers (``-P solo``, each consuming a queue no task
   goes to, Celery's defaults) and a Flower server whose API is read every second (started with
   ``--enable_events=False``: by default Flower turns every worker's task events on).
C. **monitored, -E**: B, and the measured worker sends task events (``-E``), which Flower
   receives: three events per task.

Before them, a raw Kombu measurement: one producer publishes small transient messages to a
fanout exchange with 1, 10 and 50 bound queues, timed until every copy is in its queue.

Each scenario runs ``rounds`` times: N ``noop`` tasks are published with no measured worker
running, then the worker starts and tasks/s = N / (queue empty - worker_ready), as in
bench/run.py. The median per scenario and the ratios B/A and C/A are reported; for river also
the database's transactions per second while the fleet idles (what an idle fleet costs the
server). Results go to bench/results/broadcast.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.celery_app import make_app  # noqa: E402
from bench.run import (  # noqa: E402
    PG_DSN,
    RESULTS_DIR,
    Broker,
    Worker,
    celery_e2e,
    celery_publish,
    connect,
    delete_queues,
    log,
    make_brokers,
    pg_started_at,
    reachable,
    ready_count,
    sigterm_as_exit,
    versions,
)

BROKERS = ("river", "rabbitmq", "redis")
SCENARIOS = ("alone", "monitored", "monitored_events")
CELERY = [sys.executable, "-m", "celery", "-A", "bench.celery_app"]


def env_for(broker: Broker, queue: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BENCH_BROKER_URL=broker.url,
        BENCH_TRANSPORT_OPTIONS=json.dumps(broker.transport_options),
        BENCH_QUEUE=queue,
        BENCH_REMOTE_CONTROL="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        **extra,
    )
    return env


class MeasuredWorker(Worker):
    """bench/run.py's worker, with Celery's default bootsteps and remote control on."""

    def __init__(self, broker: Broker, queue: str, workdir: Path, events: bool):
        super().__init__(broker, queue, workdir)
        self.events = events

    def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        env = env_for(self.broker, self.queue, BENCH_READY_FILE=str(self.ready_file))
        cmd = [*CELERY, "worker", "-P", "prefork", "-c", "2", "-l", "warning",
               "-n", f"measured-{uuid.uuid4().hex[:6]}@%h", *(["-E"] if self.events else [])]
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)


class Fleet:
    """Idle workers and a Flower server, read every second like an open dashboard."""

    def __init__(self, broker: Broker, size: int, idle_queue: str, workdir: Path):
        self.broker, self.size, self.idle_queue, self.workdir = broker, size, idle_queue, workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = _free_port()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self.api_reads = 0

    def start(self) -> None:
        env = env_for(self.broker, self.idle_queue)
        log_file = self.workdir / f"{self.broker.name}.fleet.log"
        with open(log_file, "ab") as out:
            for i in range(self.size):
                self.procs.append(subprocess.Popen(
                    [*CELERY, "worker", "-P", "solo", "-l", "warning", "-n", f"idle{i}@%h"],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True))
            self.procs.append(subprocess.Popen(
                # Flower would switch every worker's task events on (enable_events every 5 s);
                # off here, so B measures heartbeats and remote control, C adds task events.
                [*CELERY, "flower", f"--port={self.port}", "--address=127.0.0.1",
                 "--enable_events=False"],
                cwd=ROOT, env={**env, "FLOWER_UNAUTHENTICATED_API": "true"}, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        # Every idle worker answers ping: the fleet is up (and its start-up load is over).
        deadline = time.monotonic() + 180
        app = make_app(self.broker.url, self.broker.transport_options, self.idle_queue)
        app.conf.worker_enable_remote_control = True
        try:
            while True:
                replies = app.control.ping(timeout=2.0) or []
                if len(replies) >= self.size:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(replies)} of {self.size} idle workers up")
        finally:
            app.close()
        self._wait_flower(deadline)
        self._reader = threading.Thread(target=self._read_api, daemon=True)
        self._reader.start()

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def _wait_flower(self, deadline: float) -> None:
        while True:
            try:
                self._get("/api/workers")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("Flower did not serve its API") from None
                time.sleep(0.5)

    def _read_api(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(OSError, ValueError):
                self._get("/workers?json=1")
                self._get("/api/tasks?limit=20")
                self.api_reads += 1

    def online(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            return sum(1 for w in self._get("/workers?json=1")["data"] if w.get("status"))
        return 0

    def stop(self) -> None:
        self._stop.set()
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait(timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_commits() -> tuple[float, int]:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                           "WHERE datname = current_database()").fetchone()
    return time.monotonic(), int(row[0]) if row else 0


def pg_sessions(application_name: str) -> int:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (application_name,)).fetchone()
    return int(row[0]) if row else 0


def idle_db_load(seconds: float) -> float:
    """Transactions per second the whole database server commits over ``seconds``."""
    t0, c0 = pg_commits()
    time.sleep(seconds)
    t1, c1 = pg_commits()
    return (c1 - c0 - 1) / (t1 - t0)  # minus the measuring session's own first read


def fanout_publish(broker: Broker, run_id: str, bound: int, n: int) -> float:
    """Broadcasts/s of one producer publishing ``n`` small transient messages to a fanout
    exchange with ``bound`` queues; the clock stops once every queue holds all ``n`` (so a
    broker that publishes asynchronously is timed to delivery, not to the socket write)."""
    from kombu import Exchange, Producer, Queue

    exchange = Exchange(f"bench_fan_{run_id}_{bound}", type="fanout", durable=False)
    names = [f"bench_fan_{run_id}_{bound}_{i}" for i in range(bound)]
    with connect(broker) as conn:
        channel = conn.channel()
        for name in names:
            Queue(name, exchange, durable=False)(channel).declare()
        producer = Producer(channel)
        start = time.perf_counter()
        for i in range(n):
            producer.publish({"i": i}, exchange=exchange, delivery_mode=1)
        deadline = time.monotonic() + 60
        while any(ready_count(channel, name) < n for name in names):
            if time.monotonic() > deadline:
                raise TimeoutError("broadcasts not all delivered after 60 s")
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        for name in names:
            with contextlib.suppress(Exception):
                Queue(name, exchange)(channel).delete()
        with contextlib.suppress(Exception):
            exchange(channel).delete()
    return n / elapsed


def one_round(broker: Broker, queue: str, n: int, workdir: Path, events: bool) -> float:
    app = make_app(broker.url, broker.transport_options, queue)
    worker = MeasuredWorker(broker, queue, workdir, events)
    try:
        with app.connection_for_write() as conn:
            app.amqp.queues[queue](conn.default_channel).declare()
        celery_publish(app, n)
        with connect(broker) as poller:
            return celery_e2e(broker, app, worker, queue, n, poller)
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            app.close()


def run_broker(broker: Broker, args: argparse.Namespace, run_id: str,
               workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"status": "ok", "url": broker.url, "notes": [],
                              "tasks_per_s": {s: [] for s in SCENARIOS}}
    why = reachable(broker)
    if why:
        log(broker.name, f"skipped: {why}")
        return {**result, "status": "skipped", "notes": [why]}
    if broker.postgres:  # its sessions are counted by this name
        broker.transport_options.setdefault("application_name", f"rb_bench_{run_id}")
    queue = f"bench_bcast_{run_id}"
    idle_queue = f"bench_idle_{run_id}"
    fleet: Fleet | None = None
    pg_before = pg_started_at() if broker.postgres else None
    try:
        broker.setup()
        result["fanout_broadcasts_per_s"] = {}
        if broker.name == "redis":
            # Kombu's Redis fanout is PUB/SUB: copies go to subscribed consumers only and
            # are never stored in queues, so "every copy in its queue" cannot be timed.
            result["notes"].append("fanout publish not measured: Redis fanout is PUB/SUB")
        for bound in () if broker.name == "redis" else (1, 10, 50):
            rate = fanout_publish(broker, run_id, bound, args.broadcasts)
            result["fanout_broadcasts_per_s"][bound] = rate
            log(broker.name, f"fanout to {bound} queue(s): {rate:,.0f} broadcasts/s "
                             f"({rate * bound:,.0f} copies/s)")
        if broker.postgres:
            result["db_tx_per_s_no_fleet"] = idle_db_load(args.idle_seconds)
            log(broker.name, f"database, no fleet: {result['db_tx_per_s_no_fleet']:.0f} tx/s")
        for scenario in SCENARIOS:
            if scenario != "alone" and fleet is None:
                fleet = Fleet(broker, args.idle_workers, idle_queue, workdir)
                started = time.monotonic()
                fleet.start()
                log(broker.name, f"{args.idle_workers} idle workers and Flower up "
                                 f"({time.monotonic() - started:.0f}s)")
                time.sleep(5.0)  # heartbeats flowing, start-up load over
                result["flower_online_workers"] = fleet.online()
                if broker.postgres:
                    result["db_tx_per_s_fleet_idle"] = idle_db_load(args.idle_seconds)
                    result["pg_sessions_fleet"] = pg_sessions(
                        broker.transport_options.get("application_name", "river_broker"))
                    log(broker.name, f"database, fleet idle: "
                                     f"{result['db_tx_per_s_fleet_idle']:.0f} tx/s, "
                                     f"{result['pg_sessions_fleet']} sessions")
            for i in range(args.rounds):
                rate = one_round(broker, queue, args.tasks, workdir,
                                 events=scenario == "monitored_events")
                result["tasks_per_s"][scenario].append(rate)
                log(broker.name, f"{scenario} round {i + 1}: {rate:.0f} tasks/s")
        if fleet is not None:
            result["flower_api_reads"] = fleet.api_reads
    except Exception as exc:  # report what was measured so far
        result["status"] = "partial"
        result["notes"].append(f"{type(exc).__name__}: {exc}")
        log(broker.name, f"failed: {exc}")
    finally:
        if fleet is not None:
            fleet.stop()
        with contextlib.suppress(Exception):
            delete_queues(broker, [queue, idle_queue])
        with contextlib.suppress(Exception):
            broker.teardown()
        if broker.postgres and pg_started_at() != pg_before:
            result["notes"].append("PostgreSQL restarted during this run: numbers invalid")
            result["status"] = "partial"
    medians = {s: statistics.median(v) for s, v in result["tasks_per_s"].items() if v}
    result["median_tasks_per_s"] = medians
    if "alone" in medians:
        result["ratio_vs_alone"] = {s: medians[s] / medians["alone"] for s in medians}
    return result


def table(results: dict[str, Any]) -> str:
    names = [n for n, r in results.items() if r.get("median_tasks_per_s")]
    lines = ["| scenario | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    labels = {"alone": "A. worker alone (tasks/s)",
              "monitored": "B. + idle fleet + Flower (tasks/s)",
              "monitored_events": "C. B + task events -E (tasks/s)"}
    for s in SCENARIOS:
        cells = []
        for n in names:
            m = results[n]["median_tasks_per_s"].get(s)
            r = results[n].get("ratio_vs_alone", {}).get(s)
            cells.append("-" if m is None else f"{m:,.0f} ({r:.2f}x)" if r else f"{m:,.0f}")
        lines.append(f"| {labels[s]} | " + " | ".join(cells) + " |")
    for bound in (1, 10, 50):
        cells = []
        for n in names:
            rate = results[n].get("fanout_broadcasts_per_s", {}).get(bound)
            cells.append("-" if rate is None else f"{rate:,.0f}")
        lines.append(f"| fanout publish, {bound} bound queue(s) (broadcasts/s) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="5 idle workers, 3000 tasks, 1 round (a smoke run)")
    parser.add_argument("--only", default=",".join(BROKERS),
                        help=f"comma-separated subset of {','.join(BROKERS)}")
    parser.add_argument("--idle-workers", type=int, default=None)
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--broadcasts", type=int, default=None,
                        help="messages of the fanout publish runs")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="window for the database's idle transaction rate")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "broadcast.json")
    args = parser.parse_args(argv)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(args.only) - set(BROKERS)
    if unknown:
        parser.error(f"unknown broker(s): {', '.join(sorted(unknown))}")
    args.idle_workers = args.idle_workers or (5 if args.quick else 20)
    args.tasks = args.tasks or (3000 if args.quick else 10000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.broadcasts = args.broadcasts or (500 if args.quick else 3000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = uuid.uuid4().hex[:8]
    brokers = make_brokers(args.quick, run_id)
    print(f"river_broker broadcast benchmark, run {run_id}: {args.idle_workers} idle workers, "
          f"{args.tasks} tasks x {args.rounds} round(s), {os.cpu_count()} CPUs", flush=True)
    started = time.time()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="river-bcast-") as tmp, sigterm_as_exit():
        for name in args.only:
            results[name] = run_broker(brokers[name], args, run_id, Path(tmp))
    report = table(results)
    print()
    print(report)
    payload = {"run_id": run_id, "started_at": started, "duration_s": time.time() - started,
               "cpus": os.cpu_count(), "versions": versions(), "idle_workers": args.idle_workers,
               "tasks": args.tasks, "rounds": args.rounds, "brokers": results, "table": report}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nResults: {args.output} ({time.time() - started:.0f}s)")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
