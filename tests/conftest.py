"""Fixtures: a real PostgreSQL, an isolated schema per test, real ``celery worker`` processes.

Which PostgreSQL: ``RIVER_BROKER_TEST_DSN`` if set; else the local server on 127.0.0.1:5432;
else a testcontainers PostgreSQL where Docker runs; else the session stops with a message
saying which of these to provide.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _can_connect(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def dsn() -> Iterator[str]:
    env = os.environ.get("RIVER_BROKER_TEST_DSN")
    if env:
        if not _can_connect(env):
            pytest.exit(f"RIVER_BROKER_TEST_DSN={env!r} is set but PostgreSQL is not reachable",
                        returncode=3)
        yield env
        return
    if _can_connect(LOCAL_DSN):
        yield LOCAL_DSN
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    pytest.exit(
        "no PostgreSQL for the tests: set RIVER_BROKER_TEST_DSN=postgresql://..., or run a "
        f"server reachable as {LOCAL_DSN}, or make Docker available for testcontainers",
        returncode=3,
    )


@pytest.fixture
def db(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    """A fresh, migrated schema for one test, dropped afterwards."""
    from river_broker import migrate

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate.migrate(conn, name)
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Sessions of this test's workers may linger a moment: end them first.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()",
            (f"rb_{name}",),
        )
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def broker_url(dsn: str) -> str:
    return "river+" + dsn


@pytest.fixture
def url(dsn: str) -> str:
    return broker_url(dsn)


@pytest.fixture
def topts(schema: str) -> dict[str, Any]:
    """Transport options pointing at the test's schema, with fast recovery timing."""
    return {
        "schema": schema,
        "rescue_interval": 0.5,
        "polling_interval": 1.0,
        "application_name": f"rb_{schema}",
    }


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class TaskLog:
    """The JSON lines the test tasks append (tests/apps/tasks.py: record())."""

    def __init__(self, path: Path):
        self.path = path
        path.touch()

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = self.path.read_text().splitlines()
        out = [json.loads(line) for line in lines if line.strip()]
        return [e for e in out if event is None or e["event"] == event]

    def keys(self, event: str) -> list[str]:
        return [e["key"] for e in self.events(event)]


class Worker:
    """A real ``celery worker`` subprocess in its own process group."""

    #: Worker bootsteps most tests switch off (start-up time, event traffic).
    DEFAULT_WITHOUT = ("gossip", "mingle", "heartbeat")

    def __init__(self, name: str, args: list[str], env: dict[str, str], logfile: Path,
                 without: tuple[str, ...] = DEFAULT_WITHOUT):
        self.name = name
        self.nodename = f"{name}@{socket.gethostname()}"
        self.logfile = logfile
        self._out = open(logfile, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.apps.tasks", "worker",
             "-n", f"{name}@%h", *(f"--without-{step}" for step in without),
             "-l", os.environ.get("RIVER_TEST_WORKER_LOGLEVEL", "INFO"), *args],
            cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.logfile.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited early:\n{self.output()[-3000:]}")
            return " ready." in self.output()

        wait_for(ready, timeout, f"worker {self.name} to be ready")

    def kill_group(self) -> None:
        """SIGKILL the whole process group: the main process and every pool child."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        self._out.close()


@pytest.fixture
def task_log(tmp_path: Path) -> TaskLog:
    return TaskLog(tmp_path / "tasks.jsonl")


@pytest.fixture
def worker_env(url: str, schema: str, task_log: TaskLog) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RIVER_TEST_BROKER_URL=url,
        RIVER_TEST_SCHEMA=schema,
        RIVER_TEST_LOG=str(task_log.path),
        RIVER_TEST_RESCUE="0.5",
        RIVER_TEST_APPNAME=f"rb_{schema}",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


@pytest.fixture
def start_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(*args: str, name: str | None = None, env: dict[str, str] | None = None,
              wait: bool = True, without: tuple[str, ...] = Worker.DEFAULT_WITHOUT) -> Worker:
        name = name or f"w{len(workers) + 1}"
        w = Worker(name, list(args), {**worker_env, **(env or {})}, tmp_path / f"{name}.log",
                   without=without)
        workers.append(w)
        if wait:
            w.wait_ready()
        return w

    yield start
    for w in workers:
        w.stop()


@pytest.fixture
def celery_app(worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """The tests' Celery app configured like the workers (publishing side)."""
    from tests.apps import tasks

    tasks.app.conf.broker_url = worker_env["RIVER_TEST_BROKER_URL"]
    tasks.app.conf.broker_transport_options = {
        "schema": worker_env["RIVER_TEST_SCHEMA"],
        "application_name": worker_env["RIVER_TEST_APPNAME"],
    }
    monkeypatch.setattr(tasks, "LOG", worker_env["RIVER_TEST_LOG"])
    reset_app_pools(tasks.app)
    yield tasks.app
    reset_app_pools(tasks.app)


def reset_app_pools(app) -> None:
    """Close the app's broker connections; the next publish opens new ones."""
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None


def count_rows(db: psycopg.Connection, schema: str, where: str = "true") -> int:
    row = db.execute(
        sql.SQL("SELECT count(*) FROM {}.message WHERE " + where).format(sql.Identifier(schema))
    ).fetchone()
    return int(row[0]) if row else 0
