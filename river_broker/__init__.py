"""river_broker: a Kombu/Celery transport that keeps messages in PostgreSQL.

``import river_broker`` registers the ``river`` transport alias, so Celery accepts
``broker_url = "river+postgresql://user@host:5432/db"``.
"""

from __future__ import annotations

import contextlib

from kombu.transport import TRANSPORT_ALIASES

from .enqueue import EnqueueResult, RawMessage, enqueue, enqueue_many, enqueue_messages
from .errors import ConfigurationError, MessageError, RiverBrokerError, SchemaError
from .options import TransportOptions
from .sequences import Sequence, SequenceInfo, list_sequences, resume_sequence, skip_sequence
from .unique import Unique, duplicates_total

__version__ = "0.1.0"

TRANSPORT_ALIASES.setdefault("river", "river_broker.transport:Transport")

# Celery is optional: with it, task options become headers at publish.
with contextlib.suppress(ImportError):
    from . import celery_integration  # noqa: F401


def __getattr__(name: str):  # the transport imports psycopg: load it on first use
    if name == "Transport":
        from .transport import Transport

        return Transport
    raise AttributeError(name)


__all__ = [
    "ConfigurationError",
    "EnqueueResult",
    "MessageError",
    "RawMessage",
    "RiverBrokerError",
    "SchemaError",
    "Sequence",
    "SequenceInfo",
    "Transport",
    "TransportOptions",
    "Unique",
    "__version__",
    "duplicates_total",
    "enqueue",
    "enqueue_many",
    "enqueue_messages",
    "list_sequences",
    "resume_sequence",
    "skip_sequence",
]
