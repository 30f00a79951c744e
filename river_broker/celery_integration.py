"""Celery integration: task options turned into message headers at publish.

``@app.task(sequence=river_broker.Sequence(by_args=["customer_id"]))`` computes the key from the
task name and arguments and writes it to the ``sequence_key`` header in ``before_task_publish``,
so the transport needs no knowledge of Celery's body format and the key survives ``retry()``.
Connected when ``river_broker`` is imported and Celery is installed.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery._state import _get_active_apps, get_current_app

from .errors import MessageError
from .message import (
    CONTINUE_ON_DISCARD_HEADER,
    KEY_ERROR,
    SEQUENCE_KEY_HEADER,
    UNIQUE_KEY_HEADER,
    UNIQUE_STATES_HEADER,
    UNIQUE_UNTIL_HEADER,
    parse_eta,
)
from .sequences import Sequence
from .unique import Unique

logger = logging.getLogger(__name__)


def _find_task(name: str) -> Any:
    """The task object being published, from the current app or any other live app.

    ``app.tasks`` finalizes an app that is not yet finalized, as Celery does itself on first
    use; a task published by name only (``send_task``) may be unknown here: then only an
    explicit ``sequence_key`` header applies.
    """
    apps = [get_current_app(), *(_get_active_apps() or ())]
    for app in apps:
        try:
            task = app.tasks.get(name)
        except Exception:  # an app that cannot finalize is not the one publishing
            continue
        if task is not None:
            return task
    return None


def _call_arguments(body: Any) -> tuple[list[Any], dict[str, Any]]:
    if isinstance(body, (tuple, list)) and len(body) >= 2:  # protocol 2: (args, kwargs, embed)
        return list(body[0] or ()), dict(body[1] or {})
    if isinstance(body, dict):  # protocol 1
        return list(body.get("args") or ()), dict(body.get("kwargs") or {})
    return [], {}


def _task_option(sender: str, attribute: str, kind: type, headers: dict[str, Any],
                 header: str) -> tuple[Any, Any] | None:
    """The task being published and its ``sequence``/``unique`` option, if it has one.

    Celery only logs what a signal receiver raises, and would publish the message without
    its key; so a problem is left in the header instead, as an error marker that the
    transport raises from publish(), before anything is written.
    """
    task = _find_task(sender)
    option = getattr(task, attribute, None) if task is not None else None
    if option is None:
        return None
    if not isinstance(option, kind):
        headers[header] = {KEY_ERROR: f"task {sender!r}: the {attribute} option must be a "
                                      f"river_broker.{kind.__name__}, got {option!r}"}
        return None
    return task, option


@signals.before_task_publish.connect(weak=False, dispatch_uid="river_broker.sequence_key")
def add_sequence_key(sender: str | None = None, body: Any = None,
                     headers: dict[str, Any] | None = None, routing_key: str | None = None,
                     **_: Any) -> None:
    """Write the task's sequence key into the message headers (an explicit header wins)."""
    if headers is None or sender is None:
        return
    found = _task_option(sender, "sequence", Sequence, headers, SEQUENCE_KEY_HEADER)
    if found is None:
        return
    task, option = found
    if headers.get(SEQUENCE_KEY_HEADER) is None:
        args, kwargs = _call_arguments(body)
        try:
            headers[SEQUENCE_KEY_HEADER] = option.key_for(task, args, kwargs, queue=routing_key)
        except MessageError as exc:  # raised from publish() by the transport
            headers[SEQUENCE_KEY_HEADER] = {KEY_ERROR: str(exc)}
    if option.continue_on_discard:
        headers.setdefault(CONTINUE_ON_DISCARD_HEADER, True)


@signals.before_task_publish.connect(weak=False, dispatch_uid="river_broker.unique_key")
def add_unique_key(sender: str | None = None, body: Any = None,
                   headers: dict[str, Any] | None = None, routing_key: str | None = None,
                   **_: Any) -> None:
    """Write the task's unique key, states and period end into the headers (an explicit
    ``unique_key`` header wins)."""
    if headers is None or sender is None or headers.get(UNIQUE_KEY_HEADER) is not None:
        return
    found = _task_option(sender, "unique", Unique, headers, UNIQUE_KEY_HEADER)
    if found is None:
        return
    task, option = found
    args, kwargs = _call_arguments(body)
    try:
        key, states, until = option.key_for(task, args, kwargs, queue=routing_key,
                                            eta=parse_eta(headers.get("eta")))
    except MessageError as exc:  # raised from publish() by the transport
        headers[UNIQUE_KEY_HEADER] = {KEY_ERROR: str(exc)}
        return
    headers[UNIQUE_KEY_HEADER] = key
    headers[UNIQUE_STATES_HEADER] = states
    if until is not None:
        headers[UNIQUE_UNTIL_HEADER] = until.isoformat()


@signals.worker_init.connect(weak=False, dispatch_uid="river_broker.sequenced_acks_late")
def require_sequence_settings(sender: Any = None, **_: Any) -> None:
    """What one-at-a-time needs from the worker, set (and said loudly) at start-up:

    - acks_late: the ack is what lets the next message of the key run; an early ack (when
      the task starts) would start the next one while this one runs.
    - reject_on_worker_lost: a pool process killed mid-task must give the message back (it
      stays the head) instead of acking it as failed and moving the key on.
    - worker_cancel_long_running_tasks_on_connection_loss: after a lost connection the head
      is redelivered; the old run must not go on beside the new one.
    """
    app = getattr(sender, "app", None)
    if app is None:
        return
    sequenced = [t for t in app.tasks.values() if getattr(t, "sequence", None) is not None]
    for task in sequenced:
        if not task.acks_late:
            task.acks_late = True
            logger.warning(
                "river_broker: task %s has a sequence but acks_late was off; turned it on "
                "(with early acks the next message of a key would start while this one runs)",
                task.name,
            )
        if not task.reject_on_worker_lost:
            task.reject_on_worker_lost = True
    if sequenced and not app.conf.worker_cancel_long_running_tasks_on_connection_loss:
        app.conf.worker_cancel_long_running_tasks_on_connection_loss = True
        logger.warning(
            "river_broker: worker_cancel_long_running_tasks_on_connection_loss turned on: "
            "this app has sequenced tasks, and a task whose message is redelivered after a "
            "lost connection must not keep running beside its redelivery"
        )


def _enable_worker_broadcast_steps() -> None:
    """Celery runs its Mingle (revoked-task sync at start-up) and Gossip (worker-to-worker
    events) bootsteps only on transports it lists as able to broadcast (amqp, redis):
    river_broker can, through database-held bindings, so it joins the lists. Both remain
    switchable with ``--without-mingle`` / ``--without-gossip``."""
    from celery.worker.consumer.gossip import Gossip
    from celery.worker.consumer.mingle import Mingle

    for step in (Mingle, Gossip):
        transports = set(step.compatible_transports)
        if "river" not in transports:
            step.compatible_transports = transports | {"river"}


_enable_worker_broadcast_steps()
