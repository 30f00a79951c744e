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
UNIQUE_KEY_HEADER = "unique_key"
UNIQUE_STATES_HEADER = "unique_states"
UNIQUE_UNTIL_HEADER = "unique_until"

#: The bit of each state in a row's unique_states (river_broker.state_bit() in SQL).
STATE_BITS = {"available": 1, "scheduled": 2, "pending": 4, "reserved": 8, "completed": 16,
              "discarded": 32}
#: Unique while not finished: waiting (available, scheduled, pending in a sequence) or running.
DEFAULT_UNIQUE_STATES = ("available", "scheduled", "pending", "reserved")
FINISHED_STATES = ("completed", "discarded")

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
    unique_key: str | None = None
    unique_states: int | None = None
    unique_until: datetime | None = None

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
            "unique_key": self.unique_key,
            "unique_states": self.unique_states,
            "unique_until": self.unique_until,
        }


def to_row(queue: str, message: dict[str, Any], *, dumps: Any = dumps,
           default_id: str | None = None) -> OutgoingRow:
    headers = message.get("headers") or {}
    properties = message.get("properties") or {}
    sequence_key = sequence_key_of(headers.get(SEQUENCE_KEY_HEADER))
    unique_key = key_header(UNIQUE_KEY_HEADER, headers.get(UNIQUE_KEY_HEADER))
    unique_states = unique_until = None
    if unique_key is not None:
        names = headers.get(UNIQUE_STATES_HEADER)
        unique_states = DEFAULT_UNIQUE_MASK if names is None else states_bitmask(names)
        unique_until = parse_time(UNIQUE_UNTIL_HEADER, headers.get(UNIQUE_UNTIL_HEADER))
        finished = [s for s in FINISHED_STATES if unique_states & STATE_BITS[s]]
        if finished and unique_until is None:
            raise MessageError(
                f"unique key {unique_key!r}: unique state(s) {finished} keep finished rows, "
                f"so they need an end: set header {UNIQUE_UNTIL_HEADER!r} "
                "(the Celery option: Unique(by_period=...))"
            )
    return OutgoingRow(
        queue=queue,
        priority=priority_of(properties.get("priority")),
        run_at=parse_eta(headers.get("eta")),
        # A TTL would let a waiting sequence head vanish unseen: sequenced messages keep theirs
        # out of the broker (Celery's own `expires` check still applies when they run).
        ttl_seconds=None if sequence_key else ttl_of(properties.get("expiration")),
        task_id=_optional_str(headers.get("id", default_id)),
        task_name=_optional_str(headers.get("task")),
        payload=dumps(message),
        sequence_key=sequence_key,
        continue_on_discard=flag_of(CONTINUE_ON_DISCARD_HEADER,
                                    headers.get(CONTINUE_ON_DISCARD_HEADER)),
        unique_key=unique_key,
        unique_states=unique_states,
        unique_until=unique_until,
    )


def states_bitmask(names: Any) -> int:
    """Unique states by name -> the row's unique_states bitmask; unknown names are an error."""
    if isinstance(names, str) or not hasattr(names, "__iter__"):
        raise MessageError(f"unique states must be a list of state names, got {names!r}")
    mask = 0
    for name in names:
        if name not in STATE_BITS:
            raise MessageError(
                f"unknown unique state {name!r}; states are: {', '.join(STATE_BITS)}"
            )
        mask |= STATE_BITS[name]
    problem = unique_states_problem(mask)
    if problem:
        raise MessageError(problem)
    return mask


WAITING_BITS = STATE_BITS["available"] | STATE_BITS["scheduled"] | STATE_BITS["pending"]
DEFAULT_UNIQUE_MASK = WAITING_BITS | STATE_BITS["reserved"]


def unique_states_problem(mask: int) -> str | None:
    """Why a set of unique states cannot be enforced, or None.

    A message moves between waiting states (pending -> available, scheduled -> available)
    without ever re-checking its key, so all of them must hold it. Leaving ``reserved`` out
    ("at most one waiting") is fine: a message coming back from reserved gives up its key if a
    newer one took it meanwhile. Finished states only make sense on top of ``reserved``.
    """
    if mask & WAITING_BITS != WAITING_BITS:
        return ("unique states must include every waiting state (available, scheduled, "
                "pending): a message moves between them without re-checking its key")
    if mask & (STATE_BITS["completed"] | STATE_BITS["discarded"]) and \
            not mask & STATE_BITS["reserved"]:
        return "unique states with 'completed' or 'discarded' must include 'reserved' too"
    return None


def key_header(name: str, value: Any) -> str | None:
    """A key header: absent, or a non-empty string of at most MAX_KEY_BYTES bytes."""
    if value is None:
        return None
    if isinstance(value, dict) and KEY_ERROR in value:
        raise MessageError(str(value[KEY_ERROR]))
    if not isinstance(value, str):
        raise MessageError(
            f"header {name!r} must be a string, got {type(value).__name__} {value!r}"
        )
    if not value:
        raise MessageError(f"header {name!r} must not be empty")
    size = len(value.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise MessageError(
            f"header {name!r} is {size} bytes, longer than the {MAX_KEY_BYTES} allowed: "
            f"{value[:40]!r}..."
        )
    return value


def sequence_key_of(value: Any) -> str | None:
    """The ``sequence_key`` header: absent, or a non-empty string of bounded length."""
    return key_header(SEQUENCE_KEY_HEADER, value)


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
    return parse_time("eta", value)


def parse_time(name: str, value: Any) -> datetime | None:
    """An ISO 8601 time header. A naive time is taken as UTC."""
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
            raise MessageError(f"header {name!r} is not an ISO 8601 time: {value!r}") from None
    else:
        raise MessageError(
            f"header {name!r} must be an ISO 8601 string, got {type(value).__name__}"
        )
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
