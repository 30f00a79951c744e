"""``river-broker`` commands against a real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

from kombu import Connection
from psycopg import sql


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "river_broker", *args],
                          capture_output=True, text=True, timeout=60)


def test_migrate_is_idempotent_and_status_reports(dsn, db):
    name = "cli_mig"
    try:
        first = run("migrate", "--dsn", dsn, "--schema", name)
        again = run("migrate", "--dsn", dsn, "--schema", name)
        status = run("status", "--dsn", dsn, "--schema", name)
    finally:
        db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    assert first.returncode == 0 and "migrated from version 0 to" in first.stdout
    assert again.returncode == 0 and "already at version" in again.stdout
    assert status.returncode == 0 and "version" in status.stdout


def test_bad_dsn_is_a_clear_error_not_a_traceback():
    out = run("migrate", "--dsn", "mysql://h/db")
    assert out.returncode == 2
    assert "needs a postgresql:// URL" in out.stderr and "Traceback" not in out.stderr
    out = run("status", "--dsn", "postgresql://127.0.0.1:1/x?connect_timeout=2")
    assert out.returncode == 2 and "cannot connect" in out.stderr


def test_sequences_list_resume_and_skip(url, dsn, topts, schema):
    with Connection(url, transport_options=topts) as conn:
        sq = conn.SimpleQueue("cli")
        for i in range(3):
            sq.put(i, headers={"sequence_key": "cus_9"})
        sq.get_nowait().reject()  # discard: halts cus_9
        listed = run("sequences", "list", "--dsn", dsn, "--schema", schema)
        assert listed.returncode == 0
        assert "cus_9" in listed.stdout and "halted" in listed.stdout
        assert run("sequences", "resume", "--key", "cus_9", "--dsn", dsn,
                   "--schema", schema).returncode == 0
        sq.get_nowait().reject()
        skipped = run("sequences", "skip", "--key", "cus_9", "--dsn", dsn, "--schema", schema)
        assert skipped.returncode == 0 and "skipped" in skipped.stdout
        assert sq.get_nowait().payload == 1
        nothing = run("sequences", "skip", "--key", "cus_9", "--dsn", dsn, "--schema", schema)
        assert nothing.returncode == 1 and "not halted" in nothing.stderr
