"""river_broker demo: real ``celery worker`` processes on PostgreSQL.

Runs two workers, publishes a burst of tasks, a delayed (countdown) task, a task that retries,
then SIGKILLs one worker in the middle of a task and shows the task run again on the other.

PostgreSQL: $RIVER_BROKER_DSN, else postgresql://postgres@127.0.0.1:5432/test, else a
testcontainers PostgreSQL where Docker runs.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from collections import Counter
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples._support import (
    prepare,
    read_events,
    start_worker,
    stop_worker,
    wait,
)

SCHEMA = "river_demo"


def main() -> None:
    with ExitStack() as stack:
        dsn, tmp, log, env = prepare(stack, SCHEMA, "river_demo_")
        events = partial(read_events, log)
        from examples.demo_app import app, flaky_sync, handle_event

        print(f"river_broker demo: broker river+{dsn.split('@')[-1]}, schema {SCHEMA}")
        workers = {name: start_worker("examples.demo_app", name, env, tmp, "-P", "prefork", "-c",
                                      "2") for name in ("alpha", "beta")}
        stack.callback(lambda: [stop_worker(p) for p in workers.values()])
        print("started 2 celery workers (prefork, 2 processes each, acks_late)")

        # 1. A burst: 200 events for 20 customers.
        t0 = time.time()
        for i in range(200):
            handle_event.delay(f"cus_{i % 20}", i, time.time())
        wait(lambda: len(events("done")) >= 200, 60, "the burst")
        done = events("done")
        per_worker = Counter(e["worker"] for e in done)
        print(f"1. burst: 200 tasks published and run in {time.time() - t0:.2f}s; "
              f"per worker: {dict(per_worker)}")

        # 2. Idle latency: one task at a time on idle workers (LISTEN/NOTIFY wake-up).
        base = len(events("start"))
        for i in range(20):
            handle_event.delay("cus_latency", 1000 + i, time.time())
            wait(lambda i=i: len(events("start")) >= base + i + 1, 10, "a task")
            time.sleep(0.02)
        lat = [e["latency_ms"] for e in events("start")[base:]]
        print(f"2. idle publish->start latency over 20 tasks: p50 {statistics.median(lat):.1f} ms,"
              f" max {max(lat):.1f} ms")

        # 3. ETA: stored as a scheduled row, delivered when due, not held in worker memory.
        sent = time.time()
        handle_event.apply_async(("cus_eta", 2000, sent), countdown=2)
        time.sleep(0.5)
        with psycopg.connect(dsn, autocommit=True) as conn:
            state = conn.execute(f"SELECT state FROM {SCHEMA}.message WHERE task_name LIKE "
                                 "'%handle_event'").fetchall()
        wait(lambda: any(e.get("n") == 2000 for e in events("start")), 15, "the ETA task")
        started = next(e for e in events("start") if e.get("n") == 2000)
        print(f"3. countdown=2: row state while waiting {[s[0] for s in state]}; "
              f"started {started['t'] - sent:.2f}s after publish")

        # 4. retry(): the retry waits in the database with its countdown.
        flaky_sync.delay("acct_7")
        wait(lambda: any(e.get("task") == "flaky_sync" for e in events("done")), 20,
             "the retried task")
        tries = [e for e in events("start") if e.get("task") == "flaky_sync"]
        print(f"4. retry: attempts at +0.00s and +{tries[1]['t'] - tries[0]['t']:.2f}s "
              "(countdown=1), then succeeded")

        # 5. Crash: SIGKILL alpha's whole process group while it runs long tasks.
        for i in range(4):
            handle_event.delay(f"cus_crash_{i}", 3000 + i, time.time(), 3.0)
        wait(lambda: any(e.get("n", 0) >= 3000 and e["worker"] == "alpha"
                         for e in events("start")), 15, "alpha to pick up a long task")
        killed_on_alpha = {e["n"] for e in events("start")
                           if e.get("n", 0) >= 3000 and e["worker"] == "alpha"}
        os.killpg(workers["alpha"].pid, signal.SIGKILL)
        workers["alpha"].wait()
        t_kill = time.time()
        print("5. SIGKILL worker alpha (process group) while it ran tasks "
              f"{sorted(killed_on_alpha)}")
        wait(lambda: {e["n"] for e in events("done") if e.get("n", 0) >= 3000}
             >= {3000, 3001, 3002, 3003}, 60, "the crashed tasks to run again")
        again = [e for e in events("start") if e.get("n") in killed_on_alpha
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
        print(f"done: {len(events('done'))} task runs, {left} message rows left in "
              f"{SCHEMA}.message")


if __name__ == "__main__":
    main()
