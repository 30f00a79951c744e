"""Transport options (Celery's ``broker_transport_options``), validated.

Unknown options are an error: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigurationError

# Options Kombu or Celery themselves read from transport_options for every transport.
KOMBU_GENERIC_OPTIONS = frozenset(
    {
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "connect_retries_timeout",
        "body_encoding",
        "deadletter_queue",
        "confirm_publish",
        "client_properties",
    }
)

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,47}$")


@dataclass(frozen=True)
class TransportOptions:
    """Every river_broker option with its default. docs/configuration.md mirrors this."""

    #: Schema holding river_broker's tables.
    schema: str = "river_broker"
    #: Create or upgrade the schema on first connect (under an advisory lock).
    auto_migrate: bool = True
    #: Fallback poll (seconds): covers lost notifications and promotes due ETA messages.
    polling_interval: float = 1.0
    #: How often (seconds) a consumer looks for leases whose owner session is gone.
    rescue_interval: float = 2.0
    #: Most messages one fetch may lease when prefetch is unlimited.
    fetch_batch_size: int = 100
    #: Longest time (seconds) an ack may wait in the batch before it is written.
    ack_flush_interval: float = 0.05
    #: An ack batch is written as soon as it holds this many acks.
    ack_batch_size: int = 256
    #: Keep finished rows this many seconds (0: delete on ack).
    retention: float = 0.0
    #: How often (seconds) expired and retained rows are cleaned.
    clean_interval: float = 30.0
    #: A publisher sends at most one NOTIFY per queue per this many seconds.
    notify_throttle: float = 0.01
    #: How long (seconds) a process reuses the bindings of a direct exchange read from the
    #: database (fanout and topic exchanges route in the database on every publish). A publish
    #: that matches no cached binding always reads them again.
    routing_cache_ttl: float = 1.0
    #: Transient messages to fanout and topic exchanges (Celery's events and remote-control
    #: requests) are written by a background thread, in batches: publish() returns at once, as
    #: with RabbitMQ without publisher confirms. Off: each waits for its own statement.
    async_transient_publish: bool = True
    #: Write acks and leases without waiting for the WAL flush (a lost ack means a re-run,
    #: which at-least-once allows). Publishing is always durable.
    async_ack_commit: bool = True
    #: TCP keepalive (seconds) on both ends so a vanished peer loses its leases: an idle
    #: session whose machine is gone ends after idle + interval * count seconds (7 s), and
    #: tcp_user_timeout (the same 7 s) bounds unacknowledged sends. With rescue_interval that
    #: keeps recovery from a lost machine under 10 s.
    keepalives_idle: int = 4
    keepalives_interval: int = 1
    keepalives_count: int = 3

    @property
    def dead_peer_timeout_ms(self) -> int:
        return (self.keepalives_idle + self.keepalives_interval * self.keepalives_count) * 1000
    #: application_name of river_broker's sessions unless the URL sets one.
    application_name: str = "river_broker"

    @classmethod
    def from_transport_options(cls, options: Mapping[str, Any] | None) -> TransportOptions:
        options = dict(options or {})
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in options.items():
            if name in KOMBU_GENERIC_OPTIONS:
                continue
            if name not in known:
                close = difflib.get_close_matches(name, list(known) + sorted(KOMBU_GENERIC_OPTIONS))
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigurationError(
                    f"unknown river_broker transport option {name!r}{hint}; "
                    f"known options: {', '.join(sorted(known))}"
                )
            values[name] = _coerce(name, known[name].default, value)
        opts = cls(**values)
        opts._validate()
        return opts

    def _validate(self) -> None:
        if not _SCHEMA_NAME.match(self.schema):
            raise ConfigurationError(
                f"transport option 'schema' must be a plain identifier of at most 48 characters "
                f"(letters, digits, underscore), got {self.schema!r}"
            )
        for name in ("polling_interval", "rescue_interval", "ack_flush_interval", "clean_interval"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"transport option {name!r} must be > 0")
        for name in ("fetch_batch_size", "ack_batch_size", "keepalives_idle",
                     "keepalives_interval", "keepalives_count"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"transport option {name!r} must be >= 1")
        for name in ("retention", "notify_throttle", "routing_cache_ttl"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"transport option {name!r} must be >= 0")

    @property
    def notify_channel(self) -> str:
        """Prefix of the NOTIFY channels. Each queue has its own channel,
        ``<schema>.<first 12 hex digits of md5(queue)>`` (at most 61 bytes, under PostgreSQL's
        63), so a session is woken only for the queues it consumes. The SQL computes the same
        name: ``%(channel)s || left(md5(queue), 12)``."""
        return f"{self.schema}."

    def queue_channel(self, queue: str) -> str:
        digest = hashlib.md5(queue.encode(), usedforsecurity=False).hexdigest()
        return self.notify_channel + digest[:12]


def _coerce(name: str, default: Any, value: Any) -> Any:
    """Accept the natural type, or a string (settings often come from the environment)."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on"}:
                return True
            if isinstance(value, str) and value.lower() in {"0", "false", "no", "off"}:
                return False
            raise TypeError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigurationError(
        f"transport option {name!r} must be a {kind.__name__}, got {value!r}"
    )
