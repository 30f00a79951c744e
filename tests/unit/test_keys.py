from types import SimpleNamespace

import pytest

from river_broker import ConfigurationError, MessageError, Sequence
from river_broker.keys import build_key


def task(fn, name="proj.handle"):
    return SimpleNamespace(name=name, run=fn)


def handle(customer_id, event, *, source="stripe"):
    pass


def test_key_from_a_subset_of_arguments_positional_or_keyword():
    seq = Sequence(by_args=["customer_id"])
    a = seq.key_for(task(handle), ["cus_1", {"id": 1}], {})
    b = seq.key_for(task(handle), [], {"customer_id": "cus_1", "event": {"id": 2}})
    assert a == b == 'proj.handle:{"customer_id":"cus_1"}'


def test_all_arguments_with_defaults_applied():
    key = Sequence().key_for(task(handle), ["cus_1", 5], {})
    assert key == 'proj.handle:{"customer_id":"cus_1","event":5,"source":"stripe"}'


def test_queue_and_no_task_name_let_tasks_share_a_sequence():
    seq = Sequence(by_args=["customer_id"], by_queue=True, exclude_task_name=True)
    a = seq.key_for(task(handle, "proj.a"), ["c", 1], {}, queue="webhooks")
    b = seq.key_for(task(handle, "proj.b"), ["c", 2], {}, queue="webhooks")
    assert a == b == 'queue=webhooks:{"customer_id":"c"}'


def test_one_sequence_per_task():
    assert Sequence(by_args=False).key_for(task(handle), ["x", 1], {}) == "proj.handle"


def test_unknown_argument_names_the_task_and_its_arguments():
    with pytest.raises(MessageError, match=r"has no argument 'account' \(it takes: "
                                           r"customer_id, event, source\)"):
        Sequence(by_args=["account"]).key_for(task(handle), ["c", 1], {})


def test_long_keys_are_hashed_and_stay_bounded():
    key = Sequence().key_for(task(handle), ["c" * 1000, 1], {})
    assert key.startswith("proj.handle:sha256:") and len(key) < 100


def test_bad_options_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="by_args"):
        Sequence(by_args="customer_id")
    with pytest.raises(ConfigurationError, match="every task would share one key"):
        Sequence(by_args=False, exclude_task_name=True)
    with pytest.raises(MessageError, match="empty"):
        build_key([], None)
