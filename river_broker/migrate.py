"""Versioned schema migrations, applied under an advisory lock.

Many workers may start at once: the first takes the lock and migrates, the others wait for it and
then find nothing to do. Each migration runs in its own transaction with its version row.
"""

from __future__ import annotations

import logging
import zlib

import psycopg
from psycopg import sql

from . import sql as queries
from .errors import SchemaError

logger = logging.getLogger(__name__)

#: Lock key 0 of the schema's namespace is the migration lock; consumer ids start at 1.
MIGRATION_LOCK_KEY = 0


def lock_namespace(schema: str) -> int:
    """The first key of river_broker's advisory locks for this schema (a signed int4)."""
    return zlib.crc32(f"river_broker:{schema}".encode()) - 2**31


def latest_version() -> int:
    return queries.migrations()[-1].version


def current_version(conn: psycopg.Connection, schema: str) -> int:
    """Schema version in the database; 0 when river_broker was never installed there."""
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".schema_migration',)
    ).fetchone()
    if not row or not row[0]:
        return 0
    version = conn.execute(
        sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_migration").format(
            sql.Identifier(schema)
        )
    ).fetchone()
    return int(version[0]) if version else 0


def migrate(conn: psycopg.Connection, schema: str) -> list[int]:
    """Bring ``schema`` to the latest version; returns the versions applied."""
    ident = sql.Identifier(schema)
    ns = lock_namespace(schema)
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (ns, MIGRATION_LOCK_KEY))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migration ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident)
        )
        have = current_version(conn, schema)
        for migration in queries.migrations():
            if migration.version <= have:
                continue
            logger.info("river_broker: applying migration %04d_%s to schema %s",
                        migration.version, migration.name, schema)
            conn.execute(migration.for_schema(schema))
            conn.execute(
                sql.SQL("INSERT INTO {}.schema_migration (version, name) VALUES (%s, %s)").format(
                    ident
                ),
                (migration.version, migration.name),
            )
            applied.append(migration.version)
    return applied


def check_or_migrate(conn: psycopg.Connection, schema: str, *, auto_migrate: bool) -> None:
    """Make sure the schema is current, migrating when allowed; otherwise say what to run."""
    have = current_version(conn, schema)
    want = latest_version()
    if have == want:
        return
    if have > want:
        raise SchemaError(
            f"schema {schema!r} is at version {have}, newer than this river_broker "
            f"(knows up to {want}): upgrade the river-broker package"
        )
    if auto_migrate:
        migrate(conn, schema)
        return
    what = "missing" if have == 0 else f"at version {have}, expected {want}"
    raise SchemaError(
        f"river_broker schema {schema!r} is {what} and auto_migrate is off: run "
        f"`river-broker migrate --schema {schema} --dsn <postgresql://...>` "
        f"(or `python -m river_broker migrate ...`)"
    )
