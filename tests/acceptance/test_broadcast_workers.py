"""Celery's remote control, events and Flower across processes (SPEC §6), with real
``celery worker`` processes, the ``celery`` command line and a real Flower server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.worker


def celery(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.tasks", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def inspect(env: dict[str, str], *args: str, timeout: float = 3) -> dict[str, Any]:
    """``celery inspect <args> --json``: the replies by node name."""
    out = celery(env, "inspect", *args, "--json", "--timeout", str(timeout))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[0])


def control(env: dict[str, str], *args: str) -> dict[str, Any]:
    out = celery(env, "control", *args, "--json", "--timeout", "3")
    assert out.returncode == 0, out.stderr
    replies: dict[str, Any] = {}
    for reply in json.loads(out.stdout.strip().splitlines()[0]):
        replies.update(reply)
    return replies


def node_queues(db: psycopg.Connection, schema: str) -> set[str]:
    return {r[0] for r in db.execute(sql.SQL("SELECT name FROM {}.queue").format(
        sql.Identifier(schema)))}


# -- inspect --------------------------------------------------------------------------------

def test_inspect_reaches_every_worker(start_worker, worker_env, celery_app, task_log, db,
                                      schema):
    from tests.apps.tasks import work

    w1 = start_worker("-P", "prefork", "-c", "1", name="w1")
    w2 = start_worker("-P", "threads", "-c", "1", "-Q", "other", name="w2")
    nodes = {w1.nodename, w2.nodename}

    assert inspect(worker_env, "ping") == {n: {"ok": "pong"} for n in nodes}
    status = celery(worker_env, "status", "--timeout", "3")
    assert status.returncode == 0 and "2 nodes online." in status.stdout

    stats = inspect(worker_env, "stats")
    assert set(stats) == nodes
    assert all(s["broker"]["transport"] == "river" for s in stats.values())
    queues = inspect(worker_env, "active_queues")
    assert [q["name"] for q in queues[w1.nodename]] == ["celery"]
    assert [q["name"] for q in queues[w2.nodename]] == ["other"]

    # w1 runs one task at a time: the long one is active, the next two wait in its prefetch
    # (reserved), and one with an ETA is held until it is due (scheduled).
    running = work.delay("long", 10)
    waiting = [work.delay(f"wait{i}", 0) for i in range(2)]
    later = work.apply_async(("eta", 0), countdown=60)
    wait_for(lambda: task_log.keys("start") == ["long"], 20, "the long task to start")

    def ids(replies: dict[str, Any], get=lambda t: t["id"]) -> set[str]:
        return {get(t) for tasks in replies.values() for t in tasks}

    wait_for(lambda: ids(inspect(worker_env, "active")) == {running.id}, 20,
             "the long task to show as active")
    wait_for(lambda: ids(inspect(worker_env, "reserved")) == {r.id for r in waiting}, 20,
             "the waiting tasks to show as reserved")
    # An ETA task waits in the database ('scheduled' row), not in a worker's memory: workers
    # have nothing to list until it is due (docs/monitoring.md).
    assert inspect(worker_env, "scheduled") == {n: [] for n in nodes}
    assert db.execute(sql.SQL("SELECT state FROM {}.message WHERE task_id = %s").format(
        sql.Identifier(schema)), (later.id,)).fetchone() == ("scheduled",)


# -- control ----------------------------------------------------------------------------------

def test_revoke_before_start_and_terminate_while_running(start_worker, worker_env, celery_app,
                                                         task_log):
    from tests.apps.tasks import work

    start_worker("-P", "prefork", "-c", "1")
    running = work.delay("victim", 30)
    wait_for(lambda: task_log.keys("start") == ["victim"], 20, "the long task to start")
    queued = work.delay("never", 0)
    control(worker_env, "revoke", queued.id)
    # The API form (revoke with terminate=True); the sequence test below uses the CLI form.
    replies = celery_app.control.revoke(running.id, terminate=True, signal="SIGKILL",
                                        reply=True, timeout=3)
    assert [next(iter(r.values()))["ok"] for r in replies] == [f"terminate: {running.id}"]
    work.delay("after", 0)
    wait_for(lambda: "after" in task_log.keys("done"), 30, "the worker to go on")
    assert "never" not in task_log.keys("start")
    assert "victim" not in task_log.keys("done")
    assert list(inspect(worker_env, "active").values()) == [[]]  # nothing left running


def test_shutdown_stops_only_the_named_worker(start_worker, worker_env, celery_app):
    w1 = start_worker("-P", "solo", name="w1")
    w2 = start_worker("-P", "solo", name="w2")
    # A worker does not reply to shutdown (it raises WorkerShutdown), whatever the broker:
    # the command says no node replied; the worker's exit is the answer.
    celery(worker_env, "control", "shutdown", "--destination", w1.nodename, "--timeout", "1")
    w1.proc.wait(timeout=30)
    assert "Got shutdown from remote" in w1.output()
    assert w2.proc.poll() is None
    assert inspect(worker_env, "ping") == {w2.nodename: {"ok": "pong"}}


def test_rate_limit_and_consumers_change_at_run_time(start_worker, worker_env, celery_app,
                                                     task_log):
    from tests.apps.tasks import work

    w = start_worker("-P", "threads", "-c", "2")
    assert control(worker_env, "rate_limit", "tests.apps.tasks.noop", "10/m") == {
        w.nodename: {"ok": "new rate limit set successfully"}}
    registered = inspect(worker_env, "registered", "rate_limit")[w.nodename]
    assert "tests.apps.tasks.noop [rate_limit=10/m]" in registered

    assert control(worker_env, "add_consumer", "extra") == {
        w.nodename: {"ok": "add consumer extra"}}
    wait_for(lambda: "extra" in {q["name"] for q in inspect(worker_env,
                                                            "active_queues")[w.nodename]},
             20, "the worker to consume 'extra'")
    work.apply_async(("on-extra", 0), queue="extra")
    wait_for(lambda: "on-extra" in task_log.keys("done"), 20, "the task sent to 'extra'")

    assert control(worker_env, "cancel_consumer", "extra") == {
        w.nodename: {"ok": "no longer consuming from extra"}}
    assert {q["name"] for q in inspect(worker_env, "active_queues")[w.nodename]} == {"celery"}
    work.apply_async(("not-consumed", 0), queue="extra")
    work.delay("still-consumed", 0)
    wait_for(lambda: "still-consumed" in task_log.keys("done"), 20, "the default queue")
    assert "not-consumed" not in task_log.keys("start")


def test_revoked_ids_reach_a_worker_started_later_through_mingle(start_worker, worker_env,
                                                                celery_app, task_log):
    from tests.apps.tasks import work

    first = start_worker("-P", "solo", name="first")
    task_id = str(uuid.uuid4())
    control(worker_env, "revoke", task_id)
    late = start_worker("-P", "solo", name="late", without=("gossip", "heartbeat"))
    assert "mingle: sync with 1 nodes" in late.output()
    first.stop()
    work.apply_async(("revoked-early", 0), task_id=task_id)
    work.delay("control", 0)
    wait_for(lambda: "control" in task_log.keys("done"), 20, "the late worker to work")
    assert "revoked-early" not in task_log.keys("start")


# -- revoke and sequences ------------------------------------------------------------------------

def test_revoking_a_running_sequence_head_lets_the_key_move_on(start_worker, worker_env,
                                                              celery_app, task_log):
    """A revoked message is finished like an ack: the next message of its key runs."""
    from tests.apps.tasks import seq_step

    start_worker("-P", "prefork", "-c", "2")
    head = seq_step.delay("cus_1", 0, 30)
    for n in (1, 2):
        seq_step.delay("cus_1", n)
    wait_for(lambda: [e["n"] for e in task_log.events("start")] == [0], 20, "the head to run")
    control(worker_env, "terminate", "SIGKILL", head.id)
    wait_for(lambda: [e["n"] for e in task_log.events("done")] == [1, 2], 30,
             "the rest of the key")
    assert [e["n"] for e in task_log.events("start")] == [0, 1, 2]


def test_revoking_a_waiting_sequence_message_skips_it(start_worker, worker_env, celery_app,
                                                     task_log):
    from tests.apps.tasks import seq_step

    start_worker("-P", "prefork", "-c", "2")
    seq_step.delay("cus_2", 0, 2)
    skipped = seq_step.delay("cus_2", 1)
    seq_step.delay("cus_2", 2)
    wait_for(lambda: task_log.events("start"), 20, "the head to run")
    control(worker_env, "revoke", skipped.id)  # still pending in the database
    wait_for(lambda: [e["n"] for e in task_log.events("done")] == [0, 2], 30,
             "the key to finish")
    assert [e["n"] for e in task_log.events("start")] == [0, 2]


# -- events and Flower ---------------------------------------------------------------------------

def test_celery_events_dump_shows_heartbeats_and_task_events(start_worker, worker_env,
                                                             celery_app, task_log, tmp_path):
    from tests.apps.tasks import work

    w = start_worker("-P", "threads", "-c", "2", "-E", without=("gossip", "mingle"))
    out = (tmp_path / "events.txt").open("wb")
    dump = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tests.apps.tasks", "events",
                             "--dump"], cwd=ROOT, env={**worker_env, "PYTHONUNBUFFERED": "1"},
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        text = lambda: (tmp_path / "events.txt").read_text(errors="replace")  # noqa: E731
        wait_for(lambda: "heartbeat" in text(), 30, "a worker heartbeat in the dump")
        result = work.delay("evented", 0)
        wait_for(lambda: f"task succeeded: tests.apps.tasks.work({result.id})" in text(), 30,
                 "the task's events in the dump")
        assert f"task received: tests.apps.tasks.work({result.id})" in text()
        assert f"{w.nodename} [" in text()
    finally:
        os.killpg(dump.pid, signal.SIGTERM)
        dump.wait(timeout=10)
        out.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_flower_shows_workers_and_tasks(start_worker, worker_env, celery_app, task_log,
                                        tmp_path):
    from tests.apps.tasks import work

    w = start_worker("-P", "threads", "-c", "2", "-E", without=("gossip", "mingle"))
    port = _free_port()
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.apps.tasks", "flower",
         f"--port={port}", "--address=127.0.0.1"],
        cwd=ROOT, env={**worker_env, "FLOWER_UNAUTHENTICATED_API": "true"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                _get_json(f"{base}/api/workers?refresh=1")
                return True
            except OSError:
                return False

        wait_for(up, 60, "Flower to serve its API", interval=0.5)
        results = [work.delay(f"flower{i}", 0) for i in range(3)]
        wait_for(lambda: len(task_log.keys("done")) == 3, 30, "the tasks to run")

        def tasks_seen() -> dict[str, Any]:
            tasks = _get_json(f"{base}/api/tasks")
            return {t: v for t, v in tasks.items() if v.get("state") == "SUCCESS"}

        wait_for(lambda: {r.id for r in results} <= set(tasks_seen()), 30,
                 "Flower to see the tasks succeed (from events)")
        workers = _get_json(f"{base}/api/workers?refresh=1")  # from remote control
        assert w.nodename in workers
        assert workers[w.nodename]["stats"]["broker"]["transport"] == "river"
        assert {q["name"] for q in workers[w.nodename]["active_queues"]} == {"celery"}

        def online() -> list[str]:  # the dashboard: workers alive by their heartbeats
            return [i["hostname"] for i in _get_json(f"{base}/workers?json=1")["data"]
                    if i["status"]]

        wait_for(lambda: online() == [w.nodename], 30, "the dashboard to show the worker online")
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(timeout=10)
        log.close()


# -- nothing lost when something dies ------------------------------------------------------------

def test_killed_worker_leaves_no_pidbox_behind_and_its_tasks_run(start_worker, worker_env,
                                                               celery_app, task_log, db,
                                                               schema):
    from tests.apps.tasks import work

    doomed = start_worker("-P", "prefork", "-c", "2", name="doomed")
    survivor = start_worker("-P", "threads", "-c", "2", name="survivor")
    assert f"{doomed.nodename}.celery.pidbox" in node_queues(db, schema)
    for i in range(6):
        work.delay(f"k{i}", 1)
    wait_for(lambda: task_log.events("start"), 20, "work to start")
    doomed.kill_group()
    wait_for(lambda: f"{doomed.nodename}.celery.pidbox" not in node_queues(db, schema), 30,
             "the dead worker's pidbox queue to be deleted")
    assert inspect(worker_env, "ping") == {survivor.nodename: {"ok": "pong"}}
    wait_for(lambda: {f"k{i}" for i in range(6)} <= set(task_log.keys("done")), 60,
             "every task to run at least once")


def test_worker_answers_again_after_its_sessions_are_terminated(start_worker, worker_env,
                                                                celery_app, task_log, db,
                                                                schema):
    """pg_terminate_backend on every session of the worker: it reconnects, declares its pidbox
    again (the cleaner may have deleted it meanwhile) and answers remote control."""
    from tests.apps.tasks import work

    w = start_worker("-P", "threads", "-c", "2")
    assert inspect(worker_env, "ping") == {w.nodename: {"ok": "pong"}}
    db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
               "WHERE application_name = %s AND pid <> pg_backend_pid()",
               (worker_env["RIVER_TEST_APPNAME"],))
    # Whatever the cleaner did meanwhile (a pidbox left without a live consumer goes away),
    # the worker must come back and answer.
    wait_for(lambda: inspect(worker_env, "ping", timeout=1) == {w.nodename: {"ok": "pong"}},
             60, "the worker to answer after reconnecting", interval=0.5)
    work.delay("after-reconnect", 0)
    wait_for(lambda: "after-reconnect" in task_log.keys("done"), 30, "tasks to run again")
    # Its pidbox is bound again in the database.
    assert db.execute(sql.SQL("SELECT count(*) FROM {}.binding WHERE queue = %s").format(
        sql.Identifier(schema)), (f"{w.nodename}.celery.pidbox",)).fetchone()[0] == 1


def test_pidbox_survives_a_cleaner_pass_while_its_worker_lives(start_worker, worker_env, db,
                                                               schema, url, topts):
    """The cleaner runs in every consumer; a live worker's pidbox (x-expires 10 s, auto-delete)
    is registered to a live session, so it stays however long the worker is idle."""
    from kombu import Connection

    w = start_worker("-P", "solo")
    with Connection(url, transport_options=topts) as conn:
        conn.connect()
        assert conn.transport.store.clean_queues() == []
    assert f"{w.nodename}.celery.pidbox" in node_queues(db, schema)
    expires = db.execute(sql.SQL("SELECT expires_ms, message_ttl_ms, auto_delete FROM {}.queue "
                                 "WHERE name = %s").format(sql.Identifier(schema)),
                         (f"{w.nodename}.celery.pidbox",)).fetchone()
    assert expires == (10_000, 300_000, True)  # Celery's control_queue_expires / _ttl
