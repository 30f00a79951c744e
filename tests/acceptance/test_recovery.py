"""Nothing is lost: kill workers, terminate sessions, restart PostgreSQL (SPEC §3)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from tests.conftest import count_rows, wait_for

pytestmark = pytest.mark.worker


def test_sigkill_of_a_workers_process_group_redelivers_its_tasks(start_worker, celery_app,
                                                                  task_log, db, schema):
    from tests.apps.tasks import work

    doomed = start_worker("-P", "prefork", "-c", "2", name="doomed")
    for i in range(4):
        work.delay(f"k{i}", 2.0)
    wait_for(lambda: len(task_log.events("start")) >= 2, 15, "tasks to start on the doomed worker")
    doomed.kill_group()
    started_on_doomed = set(task_log.keys("start"))
    assert not set(task_log.keys("done")) & started_on_doomed  # killed mid-task

    start_worker("-P", "prefork", "-c", "2", name="survivor")
    wait_for(lambda: set(task_log.keys("done")) == {f"k{i}" for i in range(4)}, 40,
             "every task to run on the surviving worker")
    redelivered = [e for e in task_log.events("start") if e["redelivered"]]
    assert {e["key"] for e in redelivered} >= started_on_doomed
    wait_for(lambda: count_rows(db, schema) == 0, 10, "all acks")


def test_task_longer_than_the_rescue_interval_on_a_live_worker_runs_once(
        start_worker, celery_app, task_log, db, schema):
    from tests.apps.tasks import work

    start_worker("-P", "prefork", "-c", "1", name="busy")
    start_worker("-P", "prefork", "-c", "2", name="idle")  # rescues every 0.5 s
    work.delay("long", 6.0)  # 12 rescue rounds
    wait_for(lambda: task_log.keys("done") == ["long"], 30, "the long task")
    assert task_log.keys("start") == ["long"]


def _terminate_worker_sessions(db: psycopg.Connection, schema: str) -> int:
    rows = db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()", (f"rb_{schema}",)
    ).fetchall()
    return len(rows)


def test_worker_reconnects_after_pg_terminate_backend(start_worker, celery_app, task_log, db,
                                                      schema):
    from tests.apps.tasks import work

    w = start_worker("-P", "prefork", "-c", "2")
    for i in range(20):
        work.delay(f"a{i}", 0.05)
    wait_for(lambda: len(task_log.keys("done")) >= 5, 20, "some tasks")
    # The worker's sessions and the publisher's (same application_name) are terminated;
    # the publisher recovers through Celery's publish retry.
    assert _terminate_worker_sessions(db, schema) >= 2
    for i in range(20):
        work.delay(f"b{i}", 0.05)
    expected = {f"a{i}" for i in range(20)} | {f"b{i}" for i in range(20)}
    wait_for(lambda: set(task_log.keys("done")) == expected, 60, "every task after reconnect")
    assert w.proc.poll() is None  # the worker survived and kept consuming


def _pg_restart_command(dsn: str) -> list[str] | None:
    custom = os.environ.get("RIVER_BROKER_TEST_PG_RESTART")
    if custom:
        return ["sh", "-c", custom]
    local = "127.0.0.1" in dsn or "localhost" in dsn
    if local and shutil.which("pg_ctlcluster") and Path("/etc/postgresql").is_dir():
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"]
    return None


def test_postgres_restart_mid_run_loses_nothing(dsn, start_worker, celery_app, task_log, schema):
    from tests.apps.tasks import work

    restart = _pg_restart_command(dsn)
    if restart is None:
        pytest.skip("no way to restart this PostgreSQL (set RIVER_BROKER_TEST_PG_RESTART)")
    w = start_worker("-P", "prefork", "-c", "2")
    keys = {f"k{i}" for i in range(150)}
    for k in sorted(keys):
        work.delay(k, 0.02)
    wait_for(lambda: len(task_log.keys("done")) >= 10, 30, "some tasks before the restart")
    subprocess.run(restart, check=True, timeout=120)
    wait_for(lambda: set(task_log.keys("done")) >= keys, 120, "every task after the restart")
    assert w.proc.poll() is None
