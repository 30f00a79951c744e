"""Ingest a burst of Stripe-like webhook events for many customers and show what happened.

Two real ``celery worker`` processes (prefork, 4 processes each) on PostgreSQL. The output shows
that each customer's events ran one at a time in the order they arrived, while different
customers ran in parallel.
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from examples._support import (
    prepare,
    read_events,
    start_worker,
    stop_worker,
    wait,
)

SCHEMA = "stripe_demo"
CUSTOMERS = 40
EVENTS_PER_CUSTOMER = 10
TYPES = ["customer.created", "invoice.created", "invoice.finalized", "payment_intent.created",
         "charge.succeeded", "invoice.paid", "customer.subscription.updated"]


def main() -> None:
    with ExitStack() as stack:
        dsn, tmp, log, env = prepare(stack, SCHEMA, "stripe_demo_")
        from examples.stripe_webhooks.app import app, handle_stripe_event

        workers = [start_worker("examples.stripe_webhooks.app", name, env, tmp,
                                "-P", "prefork", "-c", "4") for name in ("w1", "w2")]
        stack.callback(lambda: [stop_worker(w) for w in workers])
        total = CUSTOMERS * EVENTS_PER_CUSTOMER
        print(f"stripe webhooks demo: 2 celery workers x 4 processes, {CUSTOMERS} customers x "
              f"{EVENTS_PER_CUSTOMER} events = {total} webhooks, on river+{dsn.split('@')[-1]}")

        # A burst, arriving interleaved across customers and a little shuffled, as webhooks do.
        arrivals = list(itertools.product(range(EVENTS_PER_CUSTOMER), range(CUSTOMERS)))
        random.seed(7)
        for i in range(0, len(arrivals), 5):
            chunk = arrivals[i:i + 5]
            random.shuffle(chunk)
            arrivals[i:i + 5] = chunk
        next_seq: dict[str, int] = defaultdict(int)
        t0 = time.time()
        for _, c in arrivals:
            customer = f"cus_{c:03d}"
            seq = next_seq[customer]
            next_seq[customer] += 1
            handle_stripe_event.delay(customer, {"seq": seq, "type": random.choice(TYPES)})
        published = time.time() - t0
        wait(lambda: len(read_events(log, "done")) >= total, 120, "every event")
        elapsed = time.time() - t0

        starts, dones = read_events(log, "start"), read_events(log, "done")
        by_customer: dict[str, list[dict]] = defaultdict(list)
        for e in sorted(starts + dones, key=lambda e: e["t"]):
            by_customer[e["customer"]].append(e)
        in_order = overlaps = 0
        for events in by_customer.values():
            seqs = [e["seq"] for e in events if e["event"] == "start"]
            in_order += seqs == sorted(seqs)
            kinds = [e["event"] for e in events]
            overlaps += any(a == b == "start" for a, b in itertools.pairwise(kinds))
        concurrency, peak, peak_customers = 0, 0, 0
        running: set[str] = set()
        for e in sorted(starts + dones, key=lambda e: (e["t"], e["event"] == "start")):
            if e["event"] == "start":
                running.add(e["customer"])
                concurrency += 1
            else:
                running.discard(e["customer"])
                concurrency -= 1
            if concurrency > peak:
                peak, peak_customers = concurrency, len(running)

        print(f"published {total} events in {published:.2f}s; all processed {elapsed:.2f}s "
              f"after the first publish ({total / elapsed:.0f} events/s)")
        print(f"per-customer order kept: {in_order}/{len(by_customer)} customers; customers "
              f"with two of their own events running at once: {overlaps}")
        print(f"parallelism: up to {peak} events running at once, each for a different "
              f"customer ({peak_customers} customers), on {len({e['worker'] for e in starts})} "
              "workers")
        sample = sorted(by_customer)[0]
        timeline = " -> ".join(f"{e['seq']}" for e in by_customer[sample]
                               if e["event"] == "start")
        print(f"e.g. {sample}: events started in order {timeline}")
        # Remote control crosses processes too (bindings live in the database).
        nodes = sorted(name for reply in app.control.ping(timeout=1.0) for name in reply)
        print(f"celery inspect ping: answered by {len(nodes)} workers ({', '.join(nodes)})")
        app.pool.force_close_all()
        if in_order != len(by_customer) or overlaps:
            sys.exit("ORDER VIOLATED")


if __name__ == "__main__":
    main()
