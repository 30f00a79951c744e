"""Errors river_broker raises on purpose, each naming what is wrong."""

from __future__ import annotations


class RiverBrokerError(Exception):
    """Base class of river_broker's own errors."""


class ConfigurationError(RiverBrokerError, ValueError):
    """A bad broker URL or transport option."""


class SchemaError(RiverBrokerError):
    """The database schema is missing or older than this version of river_broker."""


class MessageError(RiverBrokerError, ValueError):
    """A message that cannot be published as given (bad header type or value)."""
