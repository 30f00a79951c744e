"""Enqueue benchmark (river only): ``python bench/enqueue.py [--quick]``.

1. Unique cost: Celery ``delay()`` of N tasks with a computed unique key (all distinct, so every
   one is inserted) against the same N without one; Kombu publish with and without a
   ``unique_key`` header. Target: unique <= 1.3x the plain cost.
2. Batch: ``river_broker.enqueue_many`` of Celery signatures in batches of 1000 (Celery builds
   every message; one round trip per batch), and the store's batch insert of ready rows alone.
   Target: >= 30,000 messages/s.
Results go to bench/results/enqueue.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from kombu import Connection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import river_broker  # noqa: E402
from bench.celery_app import make_app  # noqa: E402
from bench.run import RESULTS_DIR, drop_schema  # noqa: E402
from river_broker.message import to_row  # noqa: E402

URL = "river+postgresql://postgres@127.0.0.1:5432/test"


def plain_task(i: int) -> None:
    pass


def unique_task(i: int) -> None:
    pass


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    n = 2000 if args.quick else 10000
    batch_n = 20000 if args.quick else 100000
    schema = f"bench_enq_{uuid.uuid4().hex[:8]}"
    opts = {"schema": schema}
    app = make_app(URL, opts, queue="enq")
    plain = app.task(name="bench.plain")(plain_task)
    unique = app.task(name="bench.unique", unique=river_broker.Unique())(unique_task)
    r: dict[str, float] = {}
    try:
        with app.producer_or_acquire() as producer:  # warm up: connect, declare, prepare
            for i in range(50):
                plain.apply_async((i,), producer=producer)
                unique.apply_async((-i - 1,), producer=producer)
            r["celery_plain_per_s"] = timed(
                lambda: [plain.apply_async((i,), producer=producer) for i in range(n)], n)
            r["celery_unique_per_s"] = timed(
                lambda: [unique.apply_async((i,), producer=producer) for i in range(n)], n)
        with Connection(URL, transport_options=opts) as conn:
            sq = conn.SimpleQueue("raw")
            sq.put("warm")
            r["kombu_plain_per_s"] = timed(lambda: [sq.put(i) for i in range(n)], n)
            r["kombu_unique_per_s"] = timed(
                lambda: [sq.put(i, headers={"unique_key": f"u{i}"}) for i in range(n)], n)
            store = conn.transport.store
            rows = [to_row("rows", {"body": "e30=", "headers": {"id": f"r{i}"},
                                    "properties": {"delivery_info": {}}})
                    for i in range(batch_n)]
            bodies = [{"i": i} for i in range(batch_n)]
            r["enqueue_messages_plain_per_s"] = timed(
                lambda: [river_broker.enqueue_messages(conn, "raw", bodies[i:i + 1000])
                         for i in range(0, batch_n, 1000)], batch_n)
            batch = [river_broker.RawMessage({"i": i}, headers={"unique_key": f"m{i}"})
                     for i in range(batch_n)]
            r["enqueue_messages_per_s"] = timed(
                lambda: [river_broker.enqueue_messages(conn, "raw", batch[i:i + 1000])
                         for i in range(0, batch_n, 1000)], batch_n)
            r["store_batch_rows_per_s"] = timed(
                lambda: [store.insert_many(rows[i:i + 1000]) for i in range(0, batch_n, 1000)],
                batch_n)
        sigs = [plain.s(i) for i in range(batch_n)]
        r["enqueue_many_per_s"] = timed(
            lambda: [river_broker.enqueue_many(sigs[i:i + 1000], app=app)
                     for i in range(0, batch_n, 1000)], batch_n)
        usigs = [unique.s(10_000_000 + i) for i in range(batch_n)]
        r["enqueue_many_unique_per_s"] = timed(
            lambda: [river_broker.enqueue_many(usigs[i:i + 1000], app=app)
                     for i in range(0, batch_n, 1000)], batch_n)
    finally:
        app.pool.force_close_all()
        drop_schema(schema)
    print(f"{'metric':<52}{'msg/s':>10}  note")
    print(f"{'Celery apply_async, plain':<52}{r['celery_plain_per_s']:>10,.0f}")
    print(f"{'Celery apply_async, Unique() key':<52}{r['celery_unique_per_s']:>10,.0f}  "
          f"cost {r['celery_plain_per_s'] / r['celery_unique_per_s']:.2f}x plain (<= 1.3x)")
    print(f"{'Kombu publish, plain':<52}{r['kombu_plain_per_s']:>10,.0f}")
    print(f"{'Kombu publish, unique_key header':<52}{r['kombu_unique_per_s']:>10,.0f}  "
          f"cost {r['kombu_plain_per_s'] / r['kombu_unique_per_s']:.2f}x plain")
    print(f"{'enqueue_many, Celery signatures, batches of 1000':<52}"
          f"{r['enqueue_many_per_s']:>10,.0f}  (>= 30,000)")
    print(f"{'enqueue_many, Unique() signatures, batches of 1000':<52}"
          f"{r['enqueue_many_unique_per_s']:>10,.0f}")
    print(f"{'enqueue_messages, Kombu bodies, batches of 1000':<52}"
          f"{r['enqueue_messages_plain_per_s']:>10,.0f}  (>= 30,000)")
    print(f"{'enqueue_messages, Kombu bodies + unique_key, by 1000':<52}"
          f"{r['enqueue_messages_per_s']:>10,.0f}  (>= 30,000)")
    print(f"{'store batch insert of built rows, batches of 1000':<52}"
          f"{r['store_batch_rows_per_s']:>10,.0f}  (the database part alone)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "enqueue.json").write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
