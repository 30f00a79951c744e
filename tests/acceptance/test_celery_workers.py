"""Celery unchanged on river_broker: real ``celery worker`` processes (SPEC §1-§2)."""

from __future__ import annotations

import itertools
import time

import pytest

from tests.conftest import count_rows, wait_for

pytestmark = pytest.mark.worker


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_tasks_run_on_each_pool(pool, start_worker, celery_app, task_log, db, schema):
    from tests.apps.tasks import work

    start_worker("-P", pool, "-c", "1" if pool == "solo" else "3")
    for i in range(30):
        work.delay(f"k{i}")
    wait_for(lambda: len(task_log.keys("done")) >= 30, 30, "30 tasks to finish")
    assert sorted(task_log.keys("done")) == sorted(f"k{i}" for i in range(30))
    wait_for(lambda: count_rows(db, schema) == 0, 10, "every ack to be written")


@pytest.mark.parametrize("acks_late", ["1", "0"])
def test_acks_late_and_early_ack(acks_late, start_worker, celery_app, task_log, db, schema):
    from tests.apps.tasks import work

    start_worker("-P", "prefork", "-c", "2", env={"RIVER_TEST_ACKS_LATE": acks_late})
    work.delay("slow", 1.5)
    wait_for(lambda: task_log.keys("start"), 15, "the task to start")
    if acks_late == "1":  # the row stays leased while the task runs
        assert count_rows(db, schema, "state = 'reserved'") == 1
    else:  # early ack: the row is gone while the task still runs
        wait_for(lambda: count_rows(db, schema) == 0, 1.0, "the early ack to be written")
    assert not task_log.keys("done")
    wait_for(lambda: task_log.keys("done"), 15, "the task to finish")
    wait_for(lambda: count_rows(db, schema) == 0, 10, "the ack to be written")


def test_retry_with_countdown_waits_as_a_scheduled_row(start_worker, celery_app, task_log, db,
                                                       schema):
    from tests.apps.tasks import flaky

    start_worker("-P", "prefork", "-c", "2")
    flaky.delay("r", 2, 1.0)
    wait_for(lambda: len(task_log.events("start")) >= 1, 15, "first attempt")
    wait_for(lambda: count_rows(db, schema, "state = 'scheduled'") == 1, 10,
             "the retry to wait in the database as a scheduled row")
    wait_for(lambda: task_log.keys("done"), 20, "the retried task to succeed")
    starts = task_log.events("start")
    assert [s["retries"] for s in starts] == [0, 1, 2]
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(starts)]
    assert all(g >= 0.99 for g in gaps), gaps  # countdown honoured: never early


def test_eta_task_is_not_delivered_early_and_holds_no_worker_memory(start_worker, celery_app,
                                                                     task_log, db, schema):
    from tests.apps.tasks import work

    start_worker("-P", "prefork", "-c", "2")
    sent = time.time()
    work.apply_async(("later",), countdown=3)
    work.delay("now")
    wait_for(lambda: task_log.keys("done") == ["now"], 15, "the immediate task")
    # The ETA task is a scheduled row, not leased to (held in memory by) the worker.
    assert count_rows(db, schema, "state = 'scheduled' AND lease_owner IS NULL") == 1
    wait_for(lambda: count_rows(db, schema, "state = 'reserved'") == 0, 5, "the ack of 'now'")
    assert count_rows(db, schema, "state = 'scheduled'") == 1
    wait_for(lambda: "later" in task_log.keys("done"), 20, "the ETA task")
    started = next(e for e in task_log.events("start") if e["key"] == "later")
    assert started["t"] >= sent + 3 - 0.01


def test_priority_order_on_a_single_slot_worker(start_worker, celery_app, task_log):
    from tests.apps.tasks import work

    for i, prio in enumerate([1, 5, 9, 1, 9, 5]):
        work.apply_async((f"{prio}-{i}",), priority=prio)
    start_worker("-P", "solo", env={"RIVER_TEST_PREFETCH": "1"})
    wait_for(lambda: len(task_log.keys("done")) == 6, 20, "six tasks")
    assert task_log.keys("start") == ["9-2", "9-4", "5-1", "5-5", "1-0", "1-3"]


def test_two_workers_compete_without_running_a_task_twice(start_worker, celery_app, task_log):
    from tests.apps.tasks import work

    start_worker("-P", "prefork", "-c", "2", name="a")
    start_worker("-P", "threads", "-c", "4", name="b")
    for i in range(600):
        work.delay(f"k{i}")
    wait_for(lambda: len(task_log.keys("done")) >= 600, 60, "600 tasks")
    starts = task_log.keys("start")
    assert len(starts) == 600 and len(set(starts)) == 600
    assert len({e["pid"] for e in task_log.events("start")}) >= 2
