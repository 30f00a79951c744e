"""The demo's Celery app: ``celery -A examples.demo_app worker``.

Every task appends one JSON line to $DEMO_LOG so the demo can print what happened.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery

import river_broker  # noqa: F401  (registers river+postgresql://)

app = Celery("demo")
app.conf.update(
    broker_url=os.environ.get("DEMO_BROKER_URL", "river+postgresql://postgres@127.0.0.1:5432/test"),
    broker_transport_options={"schema": os.environ.get("DEMO_SCHEMA", "river_demo"),
                              "rescue_interval": 1.0},
    task_acks_late=True,                # a task is finished when it returns, not when received
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


def _record(**fields: object) -> None:
    line = json.dumps({"t": time.time(), "worker": os.environ.get("DEMO_WORKER", "?"),
                       "pid": os.getpid(), **fields})
    with open(os.environ["DEMO_LOG"], "a") as f:
        f.write(line + "\n")


@app.task(bind=True)
def handle_event(self, customer: str, n: int, sent_at: float, seconds: float = 0.0) -> None:
    _record(event="start", task="handle_event", customer=customer, n=n,
            latency_ms=(time.time() - sent_at) * 1000,
            redelivered=bool((self.request.delivery_info or {}).get("redelivered")))
    time.sleep(seconds)
    _record(event="done", task="handle_event", customer=customer, n=n)


@app.task(bind=True, max_retries=2)
def flaky_sync(self, account: str) -> None:
    _record(event="start", task="flaky_sync", account=account, retries=self.request.retries)
    if self.request.retries < 1:
        raise self.retry(countdown=1)
    _record(event="done", task="flaky_sync", account=account, retries=self.request.retries)
