"""What river_broker reads from a Kombu message to store it as a row.

Kombu hands the transport a dict: ``body``, ``content-type``, ``content-encoding``, ``headers``
and ``properties`` (``priority``, ``expiration``, ``delivery_info``...). Celery's protocol 2 puts
``id``, ``task``, ``eta`` and ``expires`` in the headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kombu.utils.json import dumps, loads

from .errors import MessageError

MIN_PRIORITY = 0
MAX_PRIORITY = 9

# Python 3.10's fromisoformat takes only 3 or 6 fraction digits and no "Z": normalise first.
_FRACTION = re.compile(r"(T\d\d:\d\d:\d\d)\.(\d+)")


@dataclass(frozen=True)
class OutgoingRow:
    """The columns of a message row, derived from the Kombu message."""

    queue: str
    priority: int
    run_at: datetime | None
    ttl_seconds: float | None
    task_id: str | None
    task_name: str | None
    payload: str

    def params(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "priority": self.priority,
            "run_at": self.run_at,
            "ttl": self.ttl_seconds,
            "task_id": self.task_id,
            "task_name": self.task_name,
            "payload": self.payload,
        }


def to_row(queue: str, message: dict[str, Any]) -> OutgoingRow:
    headers = message.get("headers") or {}
    properties = message.get("properties") or {}
    return OutgoingRow(
        queue=queue,
        priority=priority_of(properties.get("priority")),
        run_at=parse_eta(headers.get("eta")),
        ttl_seconds=ttl_of(properties.get("expiration")),
        task_id=_optional_str(headers.get("id")),
        task_name=_optional_str(headers.get("task")),
        payload=dumps(message),
    )


def from_row(
    payload: str, *, id: int, attempt: int, redelivered: bool, priority: int
) -> dict[str, Any]:
    """The Kombu message dict of a leased row, tagged with its fencing token."""
    message = loads(payload)
    properties = message.setdefault("properties", {})
    properties["delivery_tag"] = delivery_tag(id, attempt)
    properties["priority"] = priority
    was_redelivered = redelivered or attempt > 1
    properties.setdefault("delivery_info", {})["redelivered"] = was_redelivered
    message["redelivered"] = was_redelivered
    return message


def delivery_tag(id: int, attempt: int) -> str:
    return f"{id}:{attempt}"


def parse_delivery_tag(tag: str) -> tuple[int, int]:
    """(row id, attempt): the fencing token of one delivery."""
    id_, _, attempt = str(tag).partition(":")
    return int(id_), int(attempt)


def priority_of(value: Any) -> int:
    """0 (lowest, the default) to 9 (highest), as RabbitMQ orders them."""
    if value is None:
        return MIN_PRIORITY
    try:
        priority = int(value)
    except (TypeError, ValueError):
        raise MessageError(f"message priority must be an integer 0-9, got {value!r}") from None
    return max(MIN_PRIORITY, min(MAX_PRIORITY, priority))


def parse_eta(value: Any) -> datetime | None:
    """Celery's ``eta`` header (ISO 8601). A naive time is taken as UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        eta = value
    elif isinstance(value, str):
        text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
        text = _FRACTION.sub(lambda m: f"{m.group(1)}.{m.group(2)[:6].ljust(6, '0')}", text)
        try:
            eta = datetime.fromisoformat(text)
        except ValueError:
            raise MessageError(f"header 'eta' is not an ISO 8601 time: {value!r}") from None
    else:
        raise MessageError(f"header 'eta' must be an ISO 8601 string, got {type(value).__name__}")
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=timezone.utc)
    return eta


def ttl_of(value: Any) -> float | None:
    """Kombu's ``expiration`` property: milliseconds (AMQP style), as str or number."""
    if value is None or value == "":
        return None
    try:
        ms = float(value)
    except (TypeError, ValueError):
        raise MessageError(
            f"message property 'expiration' must be milliseconds, got {value!r}"
        ) from None
    return max(ms, 0.0) / 1000.0


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)
