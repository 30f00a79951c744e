"""Every SQL statement of river_broker, loaded from the ``.sql`` files beside this module.

``queries.sql`` holds named blocks (``-- name: fetch_available``); ``migrations/NNNN_name.sql``
are the schema versions. ``{schema}`` in the text is replaced by the quoted schema name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from psycopg import sql

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_(\w+)\.sql$")


def _read(path: str) -> str:
    return resources.files(__package__).joinpath(path).read_text(encoding="utf-8")


@cache
def raw_queries() -> dict[str, str]:
    """Named query texts, with ``{schema}`` still unresolved."""
    text = _read("queries.sql")
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    queries = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=False):
        if name in queries:
            raise RuntimeError(f"duplicate query name {name!r} in queries.sql")
        queries[name] = body.strip()
    return queries


@cache
def queries_for(schema: str) -> dict[str, sql.Composed]:
    """Named queries with the schema name bound (quoted as an identifier)."""
    ident = sql.Identifier(schema)
    return {name: sql.SQL(body).format(schema=ident) for name, body in raw_queries().items()}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    def for_schema(self, schema: str) -> sql.Composed:
        return sql.SQL(self.text).format(schema=sql.Identifier(schema))


@cache
def migrations() -> tuple[Migration, ...]:
    """All migrations, in version order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return tuple(found)
