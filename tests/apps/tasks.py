"""The Celery app the worker tests start with ``celery -A tests.apps.tasks worker``.

Configuration comes from the environment so each test can point workers at its own schema:
RIVER_TEST_BROKER_URL, RIVER_TEST_SCHEMA, RIVER_TEST_ACKS_LATE, RIVER_TEST_LOG (a file where
tasks append one JSON line per event, flushed at once: what the tests read back).
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery

import river_broker  # noqa: F401  (registers the river+ URL scheme)
from river_broker import Sequence, Unique

app = Celery("river_tests")
app.conf.update(
    broker_url=os.environ.get("RIVER_TEST_BROKER_URL", "river+postgresql://127.0.0.1:5432/test"),
    broker_transport_options={
        "schema": os.environ.get("RIVER_TEST_SCHEMA", "river_broker"),
        "polling_interval": float(os.environ.get("RIVER_TEST_POLL", "1.0")),
        "rescue_interval": float(os.environ.get("RIVER_TEST_RESCUE", "1.0")),
        "application_name": os.environ.get("RIVER_TEST_APPNAME", "river_broker"),
    },
    task_acks_late=os.environ.get("RIVER_TEST_ACKS_LATE", "1") == "1",
    task_reject_on_worker_lost=os.environ.get("RIVER_TEST_ACKS_LATE", "1") == "1",
    worker_prefetch_multiplier=int(os.environ.get("RIVER_TEST_PREFETCH", "4")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("RIVER_TEST_QUEUE", "celery"),
    result_backend=None,
    worker_cancel_long_running_tasks_on_connection_loss=False,
)

LOG = os.environ.get("RIVER_TEST_LOG")


def record(event: str, **fields: object) -> None:
    if not LOG:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields})
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@app.task
def noop() -> None:
    return None


@app.task(bind=True)
def work(self, key: str, seconds: float = 0.0) -> str:
    record("start", key=key, task_id=self.request.id, redelivered=bool(
        (self.request.delivery_info or {}).get("redelivered")))
    if seconds:
        time.sleep(seconds)
    record("done", key=key, task_id=self.request.id)
    return key


@app.task(bind=True, max_retries=3)
def flaky(self, key: str, fail_times: int, countdown: float = 0.5) -> str:
    record("start", key=key, retries=self.request.retries)
    if self.request.retries < fail_times:
        raise self.retry(countdown=countdown)
    record("done", key=key, retries=self.request.retries)
    return key


# -- sequenced tasks ---------------------------------------------------------------------

@app.task(bind=True, sequence=Sequence(by_args=["customer"]))
def seq_step(self, customer: str, n: int, seconds: float = 0.0) -> None:
    record("start", key=customer, n=n, task_id=self.request.id, redelivered=bool(
        (self.request.delivery_info or {}).get("redelivered")))
    if seconds:
        time.sleep(seconds)
    record("done", key=customer, n=n)


@app.task(bind=True, sequence=Sequence(by_args=["customer"]), max_retries=3)
def seq_flaky(self, customer: str, n: int, fail_times: int = 1, countdown: float = 0.5) -> None:
    record("start", key=customer, n=n, retries=self.request.retries)
    if self.request.retries < fail_times:
        raise self.retry(countdown=countdown)
    record("done", key=customer, n=n)


@app.task(bind=True, sequence=Sequence(by_args=["customer"]), acks_on_failure_or_timeout=False)
def seq_fails_once(self, customer: str, n: int, fail: bool = False) -> None:
    """Fails (and is discarded: no ack on failure) unless it is a redelivery."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    record("start", key=customer, n=n, redelivered=redelivered)
    if fail and not redelivered:
        raise ValueError(f"event {n} of {customer} failed")
    record("done", key=customer, n=n)


@app.task(sequence=Sequence(by_args=["customer"]), acks_late=False)
def seq_early_ack(customer: str) -> None:
    record("start", key=customer)


@app.task(sequence=Sequence(by_args=["account"]))
def seq_wrong_arg(customer: str) -> None:
    """Misconfigured on purpose: publishing it must fail with a clear error."""


# -- unique tasks -----------------------------------------------------------------------

@app.task(unique=Unique(by_args=["account_id"]))
def sync_account(account_id: int, note: str = "") -> None:
    record("start", key=str(account_id), note=note)


@app.task(bind=True, unique=Unique(by_args=["account_id"]), max_retries=2)
def sync_flaky(self, account_id: int) -> None:
    record("start", key=str(account_id), retries=self.request.retries)
    if self.request.retries < 1:
        raise self.retry(countdown=1.5)
    record("done", key=str(account_id), retries=self.request.retries)


@app.task(unique=Unique(by_args=["account_id"], by_period=3600,
                        states=["available", "scheduled", "pending", "reserved", "completed"]))
def hourly_report(account_id: int) -> None:
    record("start", key=str(account_id))


@app.task(sequence=Sequence(by_args=["customer"]),
          unique=Unique(by_args=["customer"], states=["available", "scheduled", "pending"]))
def sync_customer(customer: str, n: int) -> None:
    """At most one WAITING sync per customer, run in order: composes both features."""
    record("start", key=customer, n=n)
    time.sleep(0.3)
    record("done", key=customer, n=n)


@app.task(sequence={"by_args": ["customer"]})
def seq_wrong_option(customer: str) -> None:
    """Misconfigured on purpose: the option is a dict, not a river_broker.Sequence."""
