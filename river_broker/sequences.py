"""Sequences: the task option that computes a key, and operating keys (list, resume, skip).

Messages sharing a ``sequence_key`` header run one at a time, in publish order; different keys
run in parallel. The transport enforces it (see docs/sequences.md); this module gives Celery
tasks a way to compute the key and operators a way to see and unblock keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import ConfigurationError
from .keys import argument_names, build_key, select_arguments
from .options import TransportOptions
from .store import Store

SEQUENCE_STATES = ("running", "waiting", "halted")


@dataclass(frozen=True)
class Sequence:
    """Task option: ``@app.task(sequence=Sequence(by_args=["customer_id"]))``.

    by_args: ``True`` (all arguments), ``False`` (none: one sequence per task), or the names
        of the arguments that form the key (positional or keyword, resolved by the signature).
    by_queue: add the queue (routing key) the message is sent to.
    exclude_task_name: leave the task name out, so several tasks share a sequence.
    continue_on_discard: when a message is discarded (reject without requeue), let the key
        move on instead of halting it.
    """

    by_args: bool | SequenceABC[str] = True
    by_queue: bool = False
    exclude_task_name: bool = False
    continue_on_discard: bool = False
    _names: tuple[str, ...] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        names = argument_names("Sequence", self.by_args)
        object.__setattr__(self, "_names", names)
        if self.exclude_task_name and names == () and not self.by_queue:
            raise ConfigurationError(
                "Sequence(exclude_task_name=True) needs by_args or by_queue, or every task "
                "would share one key"
            )

    def key_for(self, task: Any, args: SequenceABC[Any], kwargs: Mapping[str, Any],
                queue: str | None = None) -> str:
        parts = [] if self.exclude_task_name else [task.name]
        if self.by_queue:
            parts.append(f"queue={queue or ''}")
        arguments = None
        if self._names != ():
            arguments = select_arguments(task.run, task.name, args, kwargs, self._names)
        return build_key(parts, arguments)


@dataclass(frozen=True)
class SequenceInfo:
    key: str
    state: str  # running | waiting | halted
    head_id: int | None
    task_id: str | None
    task_name: str | None
    queue: str | None
    head_state: str | None
    attempt: int | None
    head_age: float | None  # seconds since the head was published
    pending: int
    halted_at: datetime | None


def _store(dsn: str, schema: str) -> Store:
    """``dsn``: a postgresql:// URL (the broker URL's river+ prefix is accepted too)."""
    if dsn.startswith("river+"):
        dsn = dsn[len("river+"):]
    return Store(dsn, TransportOptions.from_transport_options({"schema": schema}))


def list_sequences(dsn: str, *, schema: str = "river_broker", state: str | None = None,
                   key: str | None = None, limit: int = 100) -> list[SequenceInfo]:
    """Keys with their head message, its age, how many wait, and running/waiting/halted."""
    if state is not None and state not in SEQUENCE_STATES:
        raise ConfigurationError(f"state must be one of {SEQUENCE_STATES}, got {state!r}")
    store = _store(dsn, schema)
    try:
        return [SequenceInfo(*row) for row in store.list_sequences(state, key, limit)]
    finally:
        store.close()


def resume(dsn: str, key: str, *, schema: str = "river_broker") -> bool:
    """Run a halted key's failed head again; False when the key is not halted."""
    store = _store(dsn, schema)
    try:
        return store.resume_sequence(key)
    finally:
        store.close()


def skip(dsn: str, key: str, *, schema: str = "river_broker") -> bool:
    """Drop a halted key's failed head and move on; False when the key is not halted."""
    store = _store(dsn, schema)
    try:
        return store.skip_sequence(key)
    finally:
        store.close()


#: Top-level names: ``river_broker.resume_sequence(dsn, key)``.
resume_sequence = resume
skip_sequence = skip
