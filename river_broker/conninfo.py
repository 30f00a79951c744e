"""From a Kombu connection (URL or fields) to a libpq connection string.

libpq parameters in the URL's query string (sslmode, sslrootcert, connect_timeout, ...) are
passed to psycopg untouched.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from psycopg import conninfo as pg_conninfo

from .errors import ConfigurationError

SCHEMES = ("postgresql", "postgres")


def conninfo_from_client(client: Any) -> str:
    """The libpq conninfo for a :class:`kombu.Connection`.

    ``river+postgresql://...`` and ``postgresql://...`` (with ``transport=river_broker:Transport``)
    both arrive here with the whole URL in ``client.hostname``.
    """
    hostname = client.hostname or ""
    if "://" in hostname:
        return conninfo_from_url(hostname)
    params: dict[str, Any] = {}
    if hostname:
        params["host"] = hostname
    if client.port:
        params["port"] = client.port
    if client.userid:
        params["user"] = client.userid
    if client.password:
        params["password"] = client.password
    if client.virtual_host and client.virtual_host != "/":
        params["dbname"] = client.virtual_host.lstrip("/")
    return pg_conninfo.make_conninfo(**params)


def conninfo_from_url(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"the river transport needs a postgresql:// URL "
            f"(e.g. river+postgresql://user@host:5432/db), got scheme {scheme!r} in "
            f"{_mask(url)!r}"
        )
    try:
        pg_conninfo.conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError: libpq could not parse it
        raise ConfigurationError(f"invalid PostgreSQL URL {_mask(url)!r}: {exc}") from None
    return url


def with_defaults(conninfo: str, **defaults: Any) -> str:
    """Add libpq parameters the user did not set themselves."""
    try:
        given = pg_conninfo.conninfo_to_dict(conninfo)
    except Exception as exc:
        raise ConfigurationError(f"invalid PostgreSQL connection string: {exc}") from None
    extra = {k: v for k, v in defaults.items() if k not in given and v is not None}
    return pg_conninfo.make_conninfo(conninfo, **extra)


def describe(conninfo: str) -> str:
    """host:port/dbname, for messages (never the password)."""
    try:
        info = pg_conninfo.conninfo_to_dict(conninfo)
    except Exception:
        return "<unparsable conninfo>"
    host = info.get("host") or "localhost"
    port = info.get("port") or 5432
    return f"{host}:{port}/{info.get('dbname') or info.get('user') or ''}"


def _mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url
