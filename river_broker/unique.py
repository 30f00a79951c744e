"""Unique messages: the task option that computes a key, and the duplicate counter.

A message carrying a ``unique_key`` header is refused while another message with the same key
is in one of its unique states (by default: waiting or running). The transport enforces it with
a partial unique index (docs/unique.md); this module gives Celery tasks a way to compute the key
(task name + arguments, optionally the queue and a UTC-aligned period) and counts duplicates.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .errors import ConfigurationError, MessageError
from .keys import argument_names, build_key, select_arguments
from .message import (
    DEFAULT_UNIQUE_STATES,
    FINISHED_STATES,
    STATE_BITS,
    unique_states_problem,
)

logger = logging.getLogger(__name__)

_duplicates = 0
_duplicates_lock = threading.Lock()


def record_duplicate(row: Any, holder: str | None) -> None:
    """A publish refused as a duplicate: never an error for the caller; logged and counted."""
    global _duplicates
    with _duplicates_lock:
        _duplicates += 1
    logger.info("river_broker: task %s (%s) not enqueued: duplicate of task %s "
                "(unique key %r)", row.task_id, row.task_name, holder, row.unique_key)


def duplicates_total() -> int:
    """How many publishes this process saw refused as duplicates."""
    return _duplicates


@dataclass(frozen=True)
class Unique:
    """Task option: ``@app.task(unique=Unique(by_args=["account_id"], by_period=3600))``.

    by_args: ``True`` (all arguments), ``False`` (none: one live message per task), or the
        names of the arguments that form the key.
    by_queue: add the queue (routing key) to the key.
    by_period: seconds; the key includes the UTC-aligned period the message falls in (its
        ETA when it has one, else now): a repeat in the next period is a new message.
    states: the states in which a message blocks its duplicates. Default: every unfinished
        state. Adding ``completed`` (needs by_period) refuses repeats of a finished message
        until its period ends.
    exclude_task_name: leave the task name out, so several tasks share uniqueness.
    """

    by_args: bool | SequenceABC[str] = True
    by_queue: bool = False
    by_period: float | None = None
    states: Iterable[str] = DEFAULT_UNIQUE_STATES
    exclude_task_name: bool = False
    _names: tuple[str, ...] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        names = argument_names("Unique", self.by_args)
        object.__setattr__(self, "_names", names)
        if self.exclude_task_name and names == () and not self.by_queue and \
                self.by_period is None:
            raise ConfigurationError(
                "Unique(exclude_task_name=True) needs by_args, by_queue or by_period, or "
                "every task would share one key"
            )
        states = tuple(self.states)
        if isinstance(self.states, str) or not states:
            raise ConfigurationError(f"Unique(states=...) takes a list of states, got "
                                     f"{self.states!r}")
        unknown = [s for s in states if s not in STATE_BITS]
        if unknown:
            raise ConfigurationError(
                f"Unique(states=...): unknown state(s) {unknown}; states are: "
                f"{', '.join(STATE_BITS)}"
            )
        problem = unique_states_problem(sum(STATE_BITS[s] for s in set(states)))
        if problem:
            raise ConfigurationError(f"Unique(states=...): {problem}")
        object.__setattr__(self, "states", states)
        if self.by_period is not None and (
            isinstance(self.by_period, bool) or not self.by_period > 0
            or not math.isfinite(self.by_period)
        ):
            raise ConfigurationError(
                f"Unique(by_period=...) must be a number of seconds > 0, got {self.by_period!r}"
            )
        if set(states) & set(FINISHED_STATES) and self.by_period is None:
            raise ConfigurationError(
                f"Unique(states=...) with {sorted(set(states) & set(FINISHED_STATES))} keeps "
                "finished messages to refuse repeats: give it a by_period to end that"
            )

    def key_for(self, task: Any, args: SequenceABC[Any], kwargs: Mapping[str, Any],
                queue: str | None = None,
                eta: datetime | None = None) -> tuple[str, list[str], datetime | None]:
        """(unique key, unique states, end of the period or None)."""
        parts = [] if self.exclude_task_name else [task.name]
        if self.by_queue:
            parts.append(f"queue={queue or ''}")
        until = None
        if self.by_period is not None:
            start, until = period_of(eta or datetime.now(timezone.utc), self.by_period)
            parts.append(f"period={start.isoformat()}")
        arguments = None
        if self._names != ():
            arguments = select_arguments(task.run, task.name, args, kwargs, self._names)
        if not parts and not arguments:
            raise MessageError(f"task {task.name!r}: the unique key would be empty")
        return build_key(parts, arguments), list(self.states), until


def period_of(moment: datetime, seconds: float) -> tuple[datetime, datetime]:
    """The UTC-aligned period [start, end) that ``moment`` falls in."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    epoch = moment.timestamp()
    start = math.floor(epoch / seconds) * seconds
    start_dt = datetime.fromtimestamp(start, timezone.utc)
    return start_dt, start_dt + timedelta(seconds=seconds)
