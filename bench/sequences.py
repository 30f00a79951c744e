"""Sequences benchmark (river only; no peer has the feature): ``python bench/sequences.py``.

Measured in one run, on one ``celery worker -P prefork -c 2`` (acks_late, prefetch x4):

1. keys: 1000 keys x 5 messages, end to end, against the same 5000 messages unsequenced.
2. hot key: N messages on ONE key, back to back (each waits for the previous ack).
3. backlog: 1M pending messages over 10k keys (inserted directly as pending rows behind 10k
   heads that never finish): unsequenced throughput and idle publish->start latency, against
   an empty table.

All tasks are published first, then the worker starts; rate = N / (worker ready -> every row
finished). Results go to bench/results/sequences.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.celery_app import NOOP, make_app  # noqa: E402
from bench.run import (  # noqa: E402
    LATENCY_TASKS,
    RESULTS_DIR,
    Broker,
    Sizes,
    Worker,
    drop_schema,
    idle_latency,
    percentile,
)

DSN = "postgresql://postgres@127.0.0.1:5432/test"


def rows_left(schema: str, queue: str | None = None) -> int:
    """Rows not finished yet. With ``queue`` (unsequenced phases), counted through the fetch
    and lease indexes: a count(*) over the 1M-row backlog every poll would steal a core from
    the worker being measured."""
    if queue is None:
        query = sql.SQL("SELECT count(*) FROM {}.message WHERE queue <> 'blocked'")
    else:
        query = sql.SQL(
            "SELECT (SELECT count(*) FROM {s}.message WHERE state = 'available' AND queue = %s)"
            " + (SELECT count(*) FROM {s}.message WHERE state = 'reserved' AND lease_owner > 0)"
        )
    with psycopg.connect(DSN, autocommit=True) as conn:
        ident = sql.Identifier(schema)
        formatted = query.format(ident) if queue is None else query.format(s=ident)
        row = conn.execute(formatted, (queue,) if queue else None).fetchone()
    return int(row[0]) if row else 0


def run_e2e(broker: Broker, workdir: Path, publish: Any, n: int, label: str,
            indexed_count: bool = False) -> float:
    """Publish n tasks, start a worker, return tasks/s until every row is finished."""
    app = make_app(broker.url, broker.transport_options, queue=label)
    with app.producer_or_acquire() as producer:
        publish(app, producer, n)
    schema = broker.transport_options["schema"]
    worker = Worker(broker, label, phase_dir(workdir, label))
    try:
        worker.start()
        ready_at = worker.wait_ready()
        deadline = time.monotonic() + 120 + n / 20
        queue = label if indexed_count else None
        while rows_left(schema, queue) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: {rows_left(schema, queue)} rows left")
            worker.check_alive()
            time.sleep(0.02)
        rate = n / (time.time() - ready_at)
    finally:
        worker.stop()
    print(f"  {label}: {n} tasks, {rate:,.0f} tasks/s", flush=True)
    return rate


def phase_dir(workdir: Path, label: str) -> Path:
    """Each phase its own files: the harness names them after the broker, not the phase."""
    path = workdir / label
    path.mkdir()
    return path


def plain(app: Any, producer: Any, n: int) -> None:
    for _ in range(n):
        app.send_task(NOOP, producer=producer)


def keyed(keys: int) -> Any:
    def publish(app: Any, producer: Any, n: int) -> None:
        for i in range(n):
            app.send_task(NOOP, producer=producer, headers={"sequence_key": f"k{i % keys}"})
    return publish


def latency_ms(broker: Broker, workdir: Path, label: str) -> tuple[float, float]:
    app = make_app(broker.url, broker.transport_options, queue=label)
    worker = Worker(broker, label, phase_dir(workdir, label))
    try:
        worker.start()
        worker.wait_ready()
        samples = [s * 1000 for s in idle_latency(app, worker)]
    finally:
        worker.stop()
    return statistics.median(samples), percentile(samples, 95)


def fill_backlog(schema: str, keys: int, total: int) -> None:
    """``total`` pending rows over ``keys`` keys, each key blocked by a head that never runs
    (a scheduled row far in the future): the state of a busy system with deep sequences."""
    ident = sql.Identifier(schema)
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL(
            "INSERT INTO {}.message (queue, state, run_at, sequence_key, payload) "
            "SELECT 'blocked', 'scheduled', now() + interval '10 years', 'backlog-' || k, '{{}}' "
            "FROM generate_series(1, %s) AS k").format(ident), (keys,))
        conn.execute(sql.SQL(
            "INSERT INTO {}.sequence (key, head_id) "
            "SELECT sequence_key, id FROM {}.message WHERE queue = 'blocked'").format(
            ident, ident))
        conn.execute(sql.SQL(
            "INSERT INTO {}.message (queue, state, sequence_key, payload) "
            "SELECT 'blocked', 'pending', 'backlog-' || (g %% %s + 1), '{{}}' "
            "FROM generate_series(1, %s) AS g").format(ident), (keys, total))
        conn.execute(sql.SQL("VACUUM ANALYZE {}.message").format(ident))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 1 minute)")
    args = parser.parse_args(argv)
    hot_n, backlog = (600, 100_000) if args.quick else (3000, 1_000_000)
    e2e_n = 2000 if args.quick else 5000
    schema = f"bench_seq_{uuid.uuid4().hex[:8]}"
    broker = Broker("river", "river+" + DSN, "127.0.0.1", 5432, Sizes(e2e_n, e2e_n),
                    transport_options={"schema": schema}, postgres=True)
    results: dict[str, Any] = {"quick": args.quick, "schema": schema}
    try:
        with tempfile.TemporaryDirectory(prefix="river_seq_bench_") as tmp:
            workdir = Path(tmp)
            print("1. 1000 keys x 5 messages vs unsequenced", flush=True)
            results["unsequenced_tasks_per_s"] = run_e2e(broker, workdir, plain, e2e_n,
                                                         "unsequenced")
            results["keys_tasks_per_s"] = run_e2e(broker, workdir, keyed(e2e_n // 5), e2e_n,
                                                  "keys")
            print("2. one hot key, back to back", flush=True)
            results["hot_key_tasks_per_s"] = run_e2e(broker, workdir, keyed(1), hot_n, "hot")
            print("3. unsequenced work next to a deep backlog of pending messages", flush=True)
            results["latency_empty_ms"] = latency_ms(broker, workdir, "lat_empty")
            results["empty_tasks_per_s"] = run_e2e(broker, workdir, plain, e2e_n, "empty",
                                                   indexed_count=True)
            fill_backlog(schema, 10_000, backlog)
            results["backlog_rows"] = backlog
            results["latency_backlog_ms"] = latency_ms(broker, workdir, "lat_backlog")
            results["backlog_tasks_per_s"] = run_e2e(broker, workdir, plain, e2e_n, "backlog",
                                                     indexed_count=True)
    finally:
        drop_schema(schema)
    r = results
    print()
    print(f"{'metric':<58}{'value':>12}  target")
    print(f"{'1000 keys x 5 / unsequenced (same run)':<58}"
          f"{r['keys_tasks_per_s'] / r['unsequenced_tasks_per_s']:>11.2f}x  >= 0.8x "
          f"({r['keys_tasks_per_s']:,.0f} vs {r['unsequenced_tasks_per_s']:,.0f} tasks/s)")
    print(f"{'one hot key, back to back (tasks/s)':<58}{r['hot_key_tasks_per_s']:>12,.0f}  >= 300")
    print(f"{f'unsequenced throughput, {backlog:,} pending / empty':<58}"
          f"{r['backlog_tasks_per_s'] / r['empty_tasks_per_s']:>11.2f}x  >= 1/1.2 "
          f"({r['backlog_tasks_per_s']:,.0f} vs {r['empty_tasks_per_s']:,.0f} tasks/s)")
    lat_e, lat_b = r["latency_empty_ms"][0], r["latency_backlog_ms"][0]
    print(f"{f'idle latency p50, {backlog:,} pending / empty':<58}{lat_b / lat_e:>11.2f}x  "
          f"<= 1.2x ({lat_b:.1f} vs {lat_e:.1f} ms, {LATENCY_TASKS} tasks each)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "sequences.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
