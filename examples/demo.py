"""river_broker demo: real ``celery worker`` processes on PostgreSQL.

Runs two workers, publishes a burst of tasks, a delayed (countdown) task, a task that retries,
then SIGKILLs one worker in the middle of a task and shows the task run again on the other.

PostgreSQL: $RIVER_BROKER_DSN, else postgresql://postgres@127.0.0.1:5432/test, else a
testcontainers PostgreSQL where Docker runs.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "river_demo"


def find_postgres(stack: ExitStack) -> str:
    env = os.environ.get("RIVER_BROKER_DSN")
    candidates = [env] if env else ["postgresql://postgres@127.0.0.1:5432/test"]
    for dsn in candidates:
        try:
            with psycopg.connect(dsn, connect_timeout=3):
                return dsn
        except psycopg.Error as exc:
            last = exc
    if not env:
        try:
            from testcontainers.postgres import PostgresContainer

            pg = stack.enter_context(PostgresContainer("postgres:16-alpine", driver=None))
            return pg.get_connection_url()
        except Exception:  # no Docker here: fall through to the message
            pass
    sys.exit(f"demo: no PostgreSQL reachable ({str(last).strip()}). Set RIVER_BROKER_DSN="
             "postgresql://..., or start the local server on 127.0.0.1:5432, or make Docker "
             "available for testcontainers.")


def events(log: Path, kind: str | None = None) -> list[dict]:
    out = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return [e for e in out if kind is None or e["event"] == kind]


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(f"demo: timed out waiting for {what}")
        time.sleep(0.05)


def start_worker(name: str, env: dict, logdir: Path) -> subprocess.Popen:
    out = open(logdir / f"{name}.log", "wb")  # noqa: SIM115 (lives as long as the worker)
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "examples.demo_app", "worker", "-n",
         f"{name}@%h", "-P", "prefork", "-c", "2", "-l", "INFO", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env={**env, "DEMO_WORKER": name}, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait(lambda: " ready." in (logdir / f"{name}.log").read_text(errors="replace"), 60,
         f"worker {name} to start")
    return proc


def main() -> None:
    with ExitStack() as stack:
        dsn = find_postgres(stack)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="river_demo_")))
        log = tmp / "tasks.jsonl"
        log.touch()
        env = {**os.environ, "DEMO_BROKER_URL": "river+" + dsn, "DEMO_SCHEMA": SCHEMA,
               "DEMO_LOG": str(log), "PYTHONPATH": str(ROOT)}
        os.environ.update(env)
        sys.path.insert(0, str(ROOT))
        from examples.demo_app import app, flaky_sync, handle_event

        print(f"river_broker demo: broker river+{dsn.split('@')[-1]}, schema {SCHEMA}")
        workers = {name: start_worker(name, env, tmp) for name in ("alpha", "beta")}
        stack.callback(lambda: [_stop(p) for p in workers.values()])
        print("started 2 celery workers (prefork, 2 processes each, acks_late)")

        # 1. A burst: 200 events for 20 customers.
        t0 = time.time()
        for i in range(200):
            handle_event.delay(f"cus_{i % 20}", i, time.time())
        wait(lambda: len(events(log, "done")) >= 200, 60, "the burst")
        done = events(log, "done")
        per_worker = Counter(e["worker"] for e in done)
        print(f"1. burst: 200 tasks published and run in {time.time() - t0:.2f}s; "
              f"per worker: {dict(per_worker)}")

        # 2. Idle latency: one task at a time on idle workers (LISTEN/NOTIFY wake-up).
        base = len(events(log, "start"))
        for i in range(20):
            handle_event.delay("cus_latency", 1000 + i, time.time())
            wait(lambda i=i: len(events(log, "start")) >= base + i + 1, 10, "a task")
            time.sleep(0.02)
        lat = [e["latency_ms"] for e in events(log, "start")[base:]]
        print(f"2. idle publish->start latency over 20 tasks: p50 {statistics.median(lat):.1f} ms,"
              f" max {max(lat):.1f} ms")

        # 3. ETA: stored as a scheduled row, delivered when due, not held in worker memory.
        sent = time.time()
        handle_event.apply_async(("cus_eta", 2000, sent), countdown=2)
        time.sleep(0.5)
        with psycopg.connect(dsn, autocommit=True) as conn:
            state = conn.execute(f"SELECT state FROM {SCHEMA}.message WHERE task_name LIKE "
                                 "'%handle_event'").fetchall()
        wait(lambda: any(e.get("n") == 2000 for e in events(log, "start")), 15, "the ETA task")
        started = next(e for e in events(log, "start") if e.get("n") == 2000)
        print(f"3. countdown=2: row state while waiting {[s[0] for s in state]}; "
              f"started {started['t'] - sent:.2f}s after publish")

        # 4. retry(): the retry waits in the database with its countdown.
        flaky_sync.delay("acct_7")
        wait(lambda: any(e.get("task") == "flaky_sync" for e in events(log, "done")), 20,
             "the retried task")
        tries = [e for e in events(log, "start") if e.get("task") == "flaky_sync"]
        print(f"4. retry: attempts at +0.00s and +{tries[1]['t'] - tries[0]['t']:.2f}s "
              "(countdown=1), then succeeded")

        # 5. Crash: SIGKILL alpha's whole process group while it runs long tasks.
        for i in range(4):
            handle_event.delay(f"cus_crash_{i}", 3000 + i, time.time(), 3.0)
        wait(lambda: any(e.get("n", 0) >= 3000 and e["worker"] == "alpha"
                         for e in events(log, "start")), 15, "alpha to pick up a long task")
        killed_on_alpha = {e["n"] for e in events(log, "start")
                           if e.get("n", 0) >= 3000 and e["worker"] == "alpha"}
        os.killpg(workers["alpha"].pid, signal.SIGKILL)
        workers["alpha"].wait()
        t_kill = time.time()
        print("5. SIGKILL worker alpha (process group) while it ran tasks "
              f"{sorted(killed_on_alpha)}")
        wait(lambda: {e["n"] for e in events(log, "done") if e.get("n", 0) >= 3000}
             >= {3000, 3001, 3002, 3003}, 60, "the crashed tasks to run again")
        again = [e for e in events(log, "start") if e.get("n") in killed_on_alpha
                 and e["worker"] == "beta"]
        first_again = min(e["t"] for e in again) - t_kill
        print(f"   beta ran them again (redelivered={all(e['redelivered'] for e in again)}), "
              f"first one {first_again:.1f}s after the kill; all 4 long tasks finished")

        def rows_left() -> int:
            with psycopg.connect(dsn, autocommit=True) as conn:
                return conn.execute(f"SELECT count(*) FROM {SCHEMA}.message").fetchone()[0]

        wait(lambda: rows_left() == 0, 10, "the last acks (written in batches)")
        left = rows_left()
        app.pool.force_close_all()
        print(f"done: {len(events(log, 'done'))} task runs, {left} message rows left in "
              f"{SCHEMA}.message")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
