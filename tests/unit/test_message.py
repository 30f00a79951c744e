from datetime import datetime, timezone

import pytest

from river_broker import MessageError
from river_broker.message import (
    delivery_tag,
    from_row,
    parse_delivery_tag,
    parse_eta,
    priority_of,
    to_row,
    ttl_of,
)


def test_eta_header_becomes_an_aware_run_at():
    eta = parse_eta("2026-12-04T10:00:00.5+01:00")
    assert eta == datetime(2026, 12, 4, 9, 0, 0, 500000, tzinfo=timezone.utc)


def test_naive_and_zulu_eta_are_utc():
    assert parse_eta("2026-12-04T10:00:00") == datetime(2026, 12, 4, 10, tzinfo=timezone.utc)
    assert parse_eta("2026-12-04T10:00:00Z") == datetime(2026, 12, 4, 10, tzinfo=timezone.utc)


@pytest.mark.parametrize("bad", ["tomorrow", 12, ["2026"]])
def test_bad_eta_is_a_clear_error(bad):
    with pytest.raises(MessageError, match="eta"):
        parse_eta(bad)


def test_priority_is_clamped_to_0_9_and_defaults_to_lowest():
    assert priority_of(None) == 0
    assert priority_of(12) == 9
    assert priority_of(-3) == 0
    assert priority_of("7") == 7
    with pytest.raises(MessageError, match="priority"):
        priority_of("high")


def test_expiration_is_milliseconds():
    assert ttl_of("1500") == 1.5
    assert ttl_of(None) is None
    with pytest.raises(MessageError, match="expiration"):
        ttl_of("never")


def test_row_columns_come_from_celery_headers():
    message = {
        "body": "e30=",
        "headers": {"id": "abc", "task": "proj.add", "eta": "2030-01-01T00:00:00+00:00"},
        "properties": {"priority": 3, "delivery_info": {}},
    }
    row = to_row("celery", message)
    assert (row.queue, row.task_id, row.task_name, row.priority) == ("celery", "abc", "proj.add", 3)
    assert row.run_at == datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_leased_row_carries_its_fencing_token_as_delivery_tag():
    message = from_row('{"properties": {"delivery_tag": "old"}, "body": ""}',
                       id=42, attempt=3, redelivered=False, priority=5)
    assert message["properties"]["delivery_tag"] == "42:3"
    assert message["redelivered"] is True  # attempt > 1
    assert parse_delivery_tag(delivery_tag(42, 3)) == (42, 3, False)
    assert parse_delivery_tag(delivery_tag(42, 3, sequenced=True)) == (42, 3, True)


@pytest.mark.parametrize("text", ["2026-12-04T10:00:00.5Z", "2026-12-04T10:00:00.500000+00:00",
                                  "2026-12-04T10:00:00.5000001+00:00"])
def test_eta_fractions_parse_the_same_on_every_python(text):
    assert parse_eta(text) == datetime(2026, 12, 4, 10, 0, 0, 500000, tzinfo=timezone.utc)
