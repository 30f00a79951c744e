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

#: Header names river_broker reads (Celery keeps custom headers through retry()).
SEQUENCE_KEY_HEADER = "sequence_key"
CONTINUE_ON_DISCARD_HEADER = "sequence_continue_on_discard"
#: A header value standing for a key that could not be computed (carries the reason).
KEY_ERROR = "river_broker_key_error"
#: Longest sequence key accepted (bytes of UTF-8); computed keys longer than this are hashed.
MAX_KEY_BYTES = 512

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
    sequence_key: str | None = None
    continue_on_discard: bool = False

    def params(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "priority": self.priority,
            "run_at": self.run_at,
            "ttl": self.ttl_seconds,
            "task_id": self.task_id,
            "task_name": self.task_name,
            "payload": self.payload,
            "sequence_key": self.sequence_key,
            "continue_on_discard": self.continue_on_discard,
        }


def to_row(queue: str, message: dict[str, Any]) -> OutgoingRow:
    headers = message.get("headers") or {}
    properties = message.get("properties") or {}
    sequence_key = sequence_key_of(headers.get(SEQUENCE_KEY_HEADER))
    return OutgoingRow(
        queue=queue,
        priority=priority_of(properties.get("priority")),
        run_at=parse_eta(headers.get("eta")),
        # A TTL would let a waiting sequence head vanish unseen: sequenced messages keep theirs
        # out of the broker (Celery's own `expires` check still applies when they run).
        ttl_seconds=None if sequence_key else ttl_of(properties.get("expiration")),
        task_id=_optional_str(headers.get("id")),
        task_name=_optional_str(headers.get("task")),
        payload=dumps(message),
        sequence_key=sequence_key,
        continue_on_discard=flag_of(CONTINUE_ON_DISCARD_HEADER,
                                    headers.get(CONTINUE_ON_DISCARD_HEADER)),
    )


def sequence_key_of(value: Any) -> str | None:
    """The ``sequence_key`` header: absent, or a non-empty string of bounded length."""
    if value is None:
        return None
    if isinstance(value, dict) and KEY_ERROR in value:
        raise MessageError(str(value[KEY_ERROR]))
    if not isinstance(value, str):
        raise MessageError(
            f"header {SEQUENCE_KEY_HEADER!r} must be a string, got {type(value).__name__} "
            f"{value!r}"
        )
    if not value:
        raise MessageError(f"header {SEQUENCE_KEY_HEADER!r} must not be empty")
    size = len(value.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise MessageError(
            f"header {SEQUENCE_KEY_HEADER!r} is {size} bytes, longer than the {MAX_KEY_BYTES} "
            f"allowed: {value[:40]!r}..."
        )
    return value


def flag_of(name: str, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise MessageError(f"header {name!r} must be true or false, got {value!r}")


def from_row(
    payload: str, *, id: int, attempt: int, redelivered: bool, priority: int,
    sequenced: bool = False,
) -> dict[str, Any]:
    """The Kombu message dict of a leased row, tagged with its fencing token."""
    message = loads(payload)
    properties = message.setdefault("properties", {})
    properties["delivery_tag"] = delivery_tag(id, attempt, sequenced)
    properties["priority"] = priority
    was_redelivered = redelivered or attempt > 1
    properties.setdefault("delivery_info", {})["redelivered"] = was_redelivered
    message["redelivered"] = was_redelivered
    return message


def delivery_tag(id: int, attempt: int, sequenced: bool = False) -> str:
    """``id:attempt`` (``:s`` appended for a sequence head, whose ack promotes the next)."""
    return f"{id}:{attempt}:s" if sequenced else f"{id}:{attempt}"


def parse_delivery_tag(tag: str) -> tuple[int, int, bool]:
    """(row id, attempt, sequenced): the fencing token of one delivery."""
    parts = str(tag).split(":")
    return int(parts[0]), int(parts[1]), len(parts) > 2 and parts[2] == "s"


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
