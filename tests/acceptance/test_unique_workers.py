"""Unique messages with real ``celery worker`` processes (SPEC §5)."""

from __future__ import annotations

import pytest

from river_broker import enqueue
from tests.conftest import count_rows, wait_for

pytestmark = pytest.mark.worker


def test_retry_of_a_unique_task_is_not_refused_as_its_own_duplicate(start_worker, celery_app,
                                                                    task_log, db, schema):
    from tests.apps.tasks import sync_flaky

    start_worker("-P", "prefork", "-c", "2")
    first = enqueue(sync_flaky.s(42))
    assert first.inserted
    # The retry (same task id, countdown 1.5 s) was accepted and now holds the key:
    wait_for(lambda: count_rows(db, schema, "state = 'scheduled' AND unique_key IS NOT NULL")
             == 1, 15, "the retry to wait as a scheduled row")
    again = enqueue(sync_flaky.s(42))
    assert (again.inserted, again.duplicate_of) == (False, first.task_id)
    wait_for(lambda: task_log.events("done"), 20, "the retried task to succeed")
    assert [e["retries"] for e in task_log.events("start")] == [0, 1]
    wait_for(lambda: count_rows(db, schema) == 0, 10, "all rows finished")


def test_at_most_one_waiting_sync_per_customer_run_in_order(start_worker, celery_app, task_log,
                                                            db, schema):
    from tests.apps.tasks import sync_customer

    start_worker("-P", "prefork", "-c", "2")
    a = enqueue(sync_customer.s("cus_9", 0))
    wait_for(lambda: task_log.events("start"), 15, "the first sync to start")
    b = enqueue(sync_customer.s("cus_9", 1))  # waits behind the running one: allowed
    c = enqueue(sync_customer.s("cus_9", 2))  # a second waiting sync: refused
    assert a.inserted and b.inserted
    assert (c.inserted, c.duplicate_of) == (False, b.task_id)
    wait_for(lambda: len(task_log.events("done")) == 2, 20, "both syncs")
    starts = task_log.events("start")
    assert [e["n"] for e in starts] == [0, 1]
    assert starts[1]["t"] >= task_log.events("done")[0]["t"]  # one at a time
    wait_for(lambda: count_rows(db, schema) == 0, 10, "all rows finished")
