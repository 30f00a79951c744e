"""Stripe webhooks, processed in order per customer and in parallel across customers.

    celery -A examples.stripe_webhooks.app worker -P prefork -c 4

``handle_stripe_event`` has a sequence keyed by ``customer_id``: events of one customer run one
at a time in the order they were received; different customers run in parallel; events waiting
behind a busy customer take no worker slot.
"""

from __future__ import annotations

import json
import os
import random
import time

from celery import Celery

import river_broker

app = Celery("stripe_webhooks")
app.conf.update(
    broker_url=os.environ.get("DEMO_BROKER_URL",
                              "river+postgresql://postgres@127.0.0.1:5432/test"),
    broker_transport_options={"schema": os.environ.get("DEMO_SCHEMA", "stripe_demo")},
    task_acks_late=True,           # required by sequences (the integration turns it on anyway)
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


def _record(**fields: object) -> None:
    log = os.environ.get("DEMO_LOG")
    if log:
        line = json.dumps({"t": time.time(), "worker": os.environ.get("DEMO_WORKER", "?"),
                           "pid": os.getpid(), **fields})
        with open(log, "a") as f:
            f.write(line + "\n")


@app.task(sequence=river_broker.Sequence(by_args=["customer_id"]))
def handle_stripe_event(customer_id: str, event: dict) -> None:
    """Apply one webhook event to the customer's data (here: a random 5-40 ms of work)."""
    _record(event="start", customer=customer_id, seq=event["seq"], type=event["type"])
    time.sleep(random.uniform(0.005, 0.04))
    _record(event="done", customer=customer_id, seq=event["seq"])
