"""Plumbing shared by the runnable examples: find PostgreSQL, start and stop real workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent


def find_postgres(stack: ExitStack) -> str:
    """$RIVER_BROKER_DSN, else the local server, else testcontainers; or exit saying so."""
    env = os.environ.get("RIVER_BROKER_DSN")
    dsn = env or "postgresql://postgres@127.0.0.1:5432/test"
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return dsn
    except psycopg.Error as exc:
        reason = str(exc).strip()
    if not env:
        try:
            from testcontainers.postgres import PostgresContainer

            pg = stack.enter_context(PostgresContainer("postgres:16-alpine", driver=None))
            return pg.get_connection_url()
        except Exception:  # no Docker here: fall through to the message
            pass
    sys.exit(f"no PostgreSQL reachable ({reason}). Set RIVER_BROKER_DSN=postgresql://..., "
             "or start the local server on 127.0.0.1:5432, or make Docker available for "
             "testcontainers.")


def prepare(stack: ExitStack, schema: str, prefix: str) -> tuple[str, Path, Path, dict[str, str]]:
    """PostgreSQL found, the demo schema fresh, a scratch folder with the task log, and the
    environment the demo's workers (and this process) use: (dsn, folder, log, env)."""
    import tempfile

    dsn = find_postgres(stack)
    reset_schema(dsn, schema)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    log = tmp / "events.jsonl"
    log.touch()
    env = {**os.environ, "DEMO_BROKER_URL": "river+" + dsn, "DEMO_SCHEMA": schema,
           "DEMO_LOG": str(log), "PYTHONPATH": str(ROOT)}
    os.environ.update(env)
    return dsn, tmp, log, env


def reset_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            psycopg.sql.Identifier(schema)))


def read_events(log: Path, kind: str | None = None) -> list[dict[str, Any]]:
    out = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return [e for e in out if kind is None or e["event"] == kind]


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_worker(app: str, name: str, env: dict[str, str], logdir: Path,
                 *args: str) -> subprocess.Popen:
    """``celery -A app worker`` in its own process group, once it says it is ready."""
    logfile = logdir / f"{name}.log"
    out = open(logfile, "wb")  # noqa: SIM115 (lives as long as the worker)
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", app, "worker", "-n", f"{name}@%h",
         "-l", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat", *args],
        cwd=ROOT, env={**env, "DEMO_WORKER": name}, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait(lambda: " ready." in logfile.read_text(errors="replace"), 60, f"worker {name}")
    return proc


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
