"""Publishing with answers: per-message results, batches in one round trip, and enqueueing
inside the caller's own database transaction.

``delay()``/``apply_async()`` never raise for a duplicate (it is logged and counted); these
functions say, per message, whether it was inserted or which task already holds its key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from .errors import ConfigurationError
from .message import OutgoingRow
from .store import InsertResult
from .unique import record_duplicate


@dataclass(frozen=True)
class EnqueueResult:
    """One message's fate: ``inserted``, or a duplicate of ``duplicate_of`` (a task id)."""

    task_id: str
    inserted: bool
    duplicate_of: str | None = None
    id: int | None = None  # the message row, when inserted


def enqueue(signature: Any, *, connection: psycopg.Connection | None = None,
            app: Any = None) -> EnqueueResult:
    """Publish one Celery signature; with ``connection``, inside that connection's
    transaction (the message exists, and workers are woken, only if it commits)."""
    return enqueue_many([signature], connection=connection, app=app)[0]


def enqueue_many(signatures: Iterable[Any], *, connection: psycopg.Connection | None = None,
                 app: Any = None) -> list[EnqueueResult]:
    """Publish many Celery signatures in one transaction and one round trip.

    Every signature goes through Celery's own publishing (routing, serialization, the
    ``before_task_publish`` signal that computes sequence and unique keys); the rows are then
    written together. Uniqueness holds per row, duplicates inside the batch included, and
    sequences keep the batch's order per key. Returns one result per signature, in order.
    """
    signatures = list(signatures)
    if not signatures:
        return []
    app = app or signatures[0].app
    with app.producer_or_acquire() as pooled:  # a pooled broker connection, not a new one
        conn = pooled.connection
        transport = conn.transport
        if getattr(transport, "driver_type", None) != "river":
            raise ConfigurationError(
                f"enqueue_many needs the river transport; this app's broker is "
                f"{transport.driver_type!r}"
            )
        rows: list[OutgoingRow] = []
        task_ids: list[str] = []
        transport.collecting = rows
        try:
            with conn.Producer() as producer:
                for sig in signatures:
                    before = len(rows)
                    result = sig.apply_async(producer=producer)
                    if len(rows) != before + 1:
                        raise ConfigurationError(
                            f"{sig!r} was routed to {len(rows) - before} queues; enqueue_many "
                            "takes messages routed to exactly one queue"
                        )
                    task_ids.append(result.id)
        finally:
            transport.collecting = None
        inserted: list[InsertResult] = transport.store.insert_many(rows, conn=connection)
    _record_duplicates(rows, inserted)
    return [
        EnqueueResult(task_id=task_id, inserted=r.inserted, duplicate_of=r.duplicate_of, id=r.id)
        for task_id, r in zip(task_ids, inserted, strict=True)
    ]


@dataclass(frozen=True)
class RawMessage:
    """A plain Kombu message for :func:`enqueue_messages`: a body and optional headers
    (``unique_key``, ``sequence_key``, ``eta``...) and priority (0-9, 9 highest)."""

    body: Any
    headers: dict[str, Any] | None = None
    priority: int = 0


def enqueue_messages(kombu_connection: Any, queue: str, messages: Iterable[Any], *,
                     serializer: str = "json",
                     connection: psycopg.Connection | None = None) -> list[EnqueueResult]:
    """Publish plain Kombu messages (bodies, or :class:`RawMessage`) to ``queue`` in one
    transaction and one round trip, without Celery's per-message publishing cost.

    ``kombu_connection`` is a river ``kombu.Connection``; with ``connection`` (a psycopg
    connection) the rows are written in the caller's transaction. Each message gets an id
    (``EnqueueResult.task_id``, also its ``correlation_id`` property).
    """
    import base64
    import json
    import uuid

    from kombu.serialization import dumps as serialize

    from .message import priority_of, to_row

    transport = kombu_connection.transport
    if getattr(transport, "driver_type", None) != "river":
        raise ConfigurationError("enqueue_messages needs a river kombu.Connection")
    rows: list[OutgoingRow] = []
    ids: list[str] = []
    for item in messages:
        raw = item if isinstance(item, RawMessage) else RawMessage(item)
        if serializer == "json":  # text: stored as is (Kombu reads body_encoding None as such)
            content_type, content_encoding = "application/json", "utf-8"
            body, body_encoding = json.dumps(raw.body), None
        else:
            content_type, content_encoding, data = serialize(raw.body, serializer=serializer)
            if isinstance(data, str):
                data = data.encode(content_encoding or "utf-8")
            body, body_encoding = base64.b64encode(data).decode("ascii"), "base64"
        message_id = uuid.uuid4().hex
        headers = dict(raw.headers or {})
        message = {
            "body": body,
            "content-type": content_type,
            "content-encoding": content_encoding,
            "headers": headers,
            "properties": {
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": priority_of(raw.priority),
                "delivery_mode": 2,
                "body_encoding": body_encoding,
                "delivery_tag": message_id,
                "correlation_id": message_id,
            },
        }
        # Header checks and row columns as for any publish; the dict is plain JSON here.
        row = to_row(queue, message, dumps=json.dumps, default_id=message_id)
        rows.append(row)
        ids.append(row.task_id or message_id)
    inserted = transport.store.insert_many(rows, conn=connection)
    _record_duplicates(rows, inserted)
    return [EnqueueResult(task_id=i, inserted=r.inserted, duplicate_of=r.duplicate_of, id=r.id)
            for i, r in zip(ids, inserted, strict=True)]


def _record_duplicates(rows: list[OutgoingRow], results: list[InsertResult]) -> None:
    for row, result in zip(rows, results, strict=True):
        if not result.inserted:
            record_duplicate(row, result.duplicate_of)
