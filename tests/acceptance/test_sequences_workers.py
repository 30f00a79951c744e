"""Sequences with real ``celery worker`` processes (SPEC §4)."""

from __future__ import annotations

import itertools

import pytest

from river_broker import MessageError, list_sequences, sequences
from tests.conftest import count_rows, wait_for

pytestmark = pytest.mark.worker


def per_key(events):
    out: dict[str, list[dict]] = {}
    for e in events:
        out.setdefault(e["key"], []).append(e)
    return out


def assert_one_at_a_time_in_order(task_log, keys, n):
    starts = per_key(task_log.events("start"))
    dones = per_key(task_log.events("done"))
    for key in keys:
        assert [e["n"] for e in starts[key]] == list(range(n)), key  # publish order
        assert [e["n"] for e in dones[key]] == list(range(n)), key
        for done, nxt in zip(dones[key], starts[key][1:], strict=False):  # no overlap
            assert nxt["t"] >= done["t"], (key, done, nxt)


def test_order_and_no_overlap_per_key_and_parallelism_across_keys(start_worker, celery_app,
                                                                    task_log, db, schema):
    from tests.apps.tasks import seq_step

    start_worker("-P", "prefork", "-c", "3", name="a")
    start_worker("-P", "threads", "-c", "3", name="b")
    keys = [f"cus_{i}" for i in range(12)]
    for n, key in itertools.product(range(8), keys):  # interleaved: a burst per customer
        seq_step.delay(key, n, 0.01)
    assert count_rows(db, schema, "sequence_key IS NULL") == 0  # every message got its key
    wait_for(lambda: len(task_log.events("done")) >= 96, 90, "96 sequenced tasks")
    assert_one_at_a_time_in_order(task_log, keys, 8)
    # Parallel across keys: some tasks of different keys overlapped in time.
    done_at = {(e["key"], e["n"]): e["t"] for e in task_log.events("done")}
    spans = sorted((s["t"], done_at[s["key"], s["n"]]) for s in task_log.events("start"))
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))
    wait_for(lambda: count_rows(db, schema) == 0, 10, "all rows finished")
    assert list_sequences(celery_app.conf.broker_url[len("river+"):], schema=schema) == []


def test_retries_keep_their_place(start_worker, celery_app, task_log):
    from tests.apps.tasks import seq_flaky

    start_worker("-P", "prefork", "-c", "4")
    seq_flaky.delay("cus_r", 0, 2, 0.5)  # fails twice, retried with a countdown each time
    for n in range(1, 4):
        seq_flaky.delay("cus_r", n, 0)
    wait_for(lambda: len(task_log.events("done")) >= 4, 30, "the key to finish")
    starts = task_log.events("start")
    assert [(e["n"], e["retries"]) for e in starts] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (3, 0)]
    first_done = task_log.events("done")[0]
    assert first_done["n"] == 0
    assert all(e["t"] >= first_done["t"] for e in starts[3:])


def test_sigkill_mid_sequence_resumes_with_the_killed_message(start_worker, celery_app,
                                                              task_log):
    from tests.apps.tasks import seq_step

    doomed = start_worker("-P", "prefork", "-c", "2", name="doomed")
    seq_step.delay("cus_k", 0, 3.0)
    for n in range(1, 4):
        seq_step.delay("cus_k", n)
    wait_for(lambda: task_log.events("start"), 15, "the head to start")
    doomed.kill_group()
    start_worker("-P", "prefork", "-c", "2", name="survivor")
    wait_for(lambda: len(task_log.events("done")) >= 4, 40, "the key to finish")
    starts = task_log.events("start")
    assert [e["n"] for e in starts] == [0, 0, 1, 2, 3]  # the killed message first, then on
    assert starts[1]["redelivered"]


def test_discard_halts_then_resume_and_skip(dsn, start_worker, celery_app, task_log, schema):
    from tests.apps.tasks import seq_fails_once

    start_worker("-P", "prefork", "-c", "2")
    seq_fails_once.delay("cus_h", 0, fail=True)
    seq_fails_once.delay("cus_h", 1)
    seq_fails_once.delay("cus_h", 2, fail=True)
    seq_fails_once.delay("cus_h", 3)
    halted = lambda: list_sequences(dsn, schema=schema, state="halted")  # noqa: E731
    wait_for(halted, 20, "the key to halt after event 0 failed")
    assert [e["n"] for e in task_log.events("start")] == [0]
    (info,) = halted()
    assert (info.key.endswith('"cus_h"}'), info.pending) == (True, 3)

    assert sequences.resume(dsn, info.key, schema=schema)  # event 0 runs again, succeeds
    wait_for(halted, 20, "event 2 to fail and halt the key again")
    assert [e["n"] for e in task_log.events("done")] == [0, 1]

    assert sequences.skip(dsn, info.key, schema=schema)  # drop event 2, move on to 3
    wait_for(lambda: [e["n"] for e in task_log.events("done")] == [0, 1, 3], 20, "event 3")


def test_countdown_head_blocks_its_key_only(start_worker, celery_app, task_log):
    from tests.apps.tasks import seq_step, work

    start_worker("-P", "prefork", "-c", "2")
    seq_step.apply_async(("cus_eta", 0), countdown=2)
    seq_step.delay("cus_eta", 1)
    seq_step.delay("cus_other", 0)
    work.delay("plain")
    wait_for(lambda: {e["key"] for e in task_log.events("done")} >= {"cus_other", "plain"}, 15,
             "the other key and the unsequenced task")
    assert "cus_eta" not in {e["key"] for e in task_log.events("start")}
    wait_for(lambda: len([e for e in task_log.events("done") if e["key"] == "cus_eta"]) == 2,
             20, "the delayed head, then the next")
    eta_starts = [e["n"] for e in task_log.events("start") if e["key"] == "cus_eta"]
    assert eta_starts == [0, 1]


def test_worker_turns_on_acks_late_for_sequenced_tasks_and_says_so(start_worker, celery_app,
                                                                   task_log):
    from tests.apps.tasks import seq_step

    w = start_worker("-P", "prefork", "-c", "3", env={"RIVER_TEST_ACKS_LATE": "0"})
    log = w.output()
    assert "task tests.apps.tasks.seq_early_ack has a sequence but acks_late was off" in log
    assert "task tests.apps.tasks.seq_step has a sequence but acks_late was off" in log
    assert "worker_cancel_long_running_tasks_on_connection_loss turned on" in log
    # ... and the guarantee holds although the app asked for early acks.
    for n in range(4):
        seq_step.delay("cus_early", n, 0.2)
    wait_for(lambda: len(task_log.events("done")) >= 4, 30, "four sequenced tasks")
    assert_one_at_a_time_in_order(task_log, ["cus_early"], 4)


def test_killed_pool_process_gives_the_head_back(start_worker, celery_app, task_log, db,
                                                 schema):
    """SIGKILL of one prefork child (not the whole worker): Celery's WorkerLostError path
    must requeue the head, not ack it and move the key on."""
    import os
    import signal

    from tests.apps.tasks import seq_step

    # The app itself has acks_late and reject_on_worker_lost off: the integration turns both
    # on for sequenced tasks.
    start_worker("-P", "prefork", "-c", "2", env={"RIVER_TEST_ACKS_LATE": "0"})
    seq_step.delay("cus_pool", 0, 3.0)
    seq_step.delay("cus_pool", 1)
    first = wait_for(lambda: task_log.events("start"), 15, "the head to start")[0]
    os.kill(first["pid"], signal.SIGKILL)
    wait_for(lambda: len(task_log.events("done")) >= 2, 40, "the key to finish")
    assert [e["n"] for e in task_log.events("start")] == [0, 0, 1]
    assert [e["n"] for e in task_log.events("done")] == [0, 1]


def test_key_from_a_subset_of_arguments_and_explicit_header(celery_app, db, schema):
    from tests.apps.tasks import seq_step, work

    seq_step.delay("cus_1", 7, seconds=0.5)
    seq_step.apply_async(kwargs={"customer": "cus_1", "n": 8})
    work.apply_async(("x",), headers={"sequence_key": "manual-key"})
    keys = sorted(r[0] for r in db.execute(
        f'SELECT sequence_key FROM "{schema}".message ORDER BY id'))
    assert keys == ["manual-key", 'tests.apps.tasks.seq_step:{"customer":"cus_1"}',
                    'tests.apps.tasks.seq_step:{"customer":"cus_1"}']


def test_bad_keys_fail_at_publish_with_a_clear_error(celery_app, db, schema):
    from tests.apps.tasks import seq_wrong_arg, seq_wrong_option, work

    with pytest.raises(MessageError, match="must be a string"):
        work.apply_async(("x",), headers={"sequence_key": 12})
    with pytest.raises(MessageError, match=r"seq_wrong_arg' has no argument 'account' "
                                           r"\(it takes: customer\)"):
        seq_wrong_arg.delay("cus_1")
    with pytest.raises(MessageError, match=r"the sequence option must be a river_broker\.Sequence"):
        seq_wrong_option.delay("cus_1")
    assert count_rows(db, schema) == 0
