"""``river-broker`` (also ``python -m river_broker``): operate the schema from the shell."""

from __future__ import annotations

import argparse
import os
import sys

import psycopg

from . import migrate
from .conninfo import conninfo_from_url, describe, with_defaults
from .errors import RiverBrokerError
from .options import TransportOptions

DSN_ENV = "RIVER_BROKER_DSN"


def _dsn(args: argparse.Namespace) -> str:
    dsn = args.dsn or os.environ.get(DSN_ENV)
    if not dsn:
        raise RiverBrokerError(f"no database given: pass --dsn postgresql://... or set {DSN_ENV}")
    if dsn.startswith("river+"):
        dsn = dsn[len("river+"):]
    return conninfo_from_url(dsn) if "://" in dsn else dsn


def cmd_migrate(args: argparse.Namespace) -> int:
    TransportOptions.from_transport_options({"schema": args.schema})  # validates the name
    dsn = with_defaults(_dsn(args), application_name="river_broker migrate")
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = migrate.current_version(conn, args.schema)
        applied = migrate.migrate(conn, args.schema)
    if applied:
        print(f"schema {args.schema!r} on {describe(dsn)}: migrated from version {before} "
              f"to {applied[-1]}")
    else:
        print(f"schema {args.schema!r} on {describe(dsn)}: already at version {before}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    dsn = with_defaults(_dsn(args), application_name="river_broker status")
    with psycopg.connect(dsn, autocommit=True) as conn:
        version = migrate.current_version(conn, args.schema)
        print(f"schema {args.schema!r} on {describe(dsn)}: version {version} "
              f"(this package: {migrate.latest_version()})")
        if version == 0:
            return 1
        rows = conn.execute(
            psycopg.sql.SQL(
                "SELECT queue, state, count(*) FROM {}.message GROUP BY 1, 2 ORDER BY 1, 2"
            ).format(psycopg.sql.Identifier(args.schema))
        ).fetchall()
    for queue, state, count in rows:
        print(f"  {queue:<40} {state:<10} {count}")
    return 0


def cmd_sequences(args: argparse.Namespace) -> int:
    from . import sequences

    dsn = _dsn(args)
    if args.action == "list":
        rows = sequences.list_sequences(dsn, schema=args.schema, state=args.state,
                                        key=args.key, limit=args.limit)
        if not rows:
            print("no sequences" + (f" in state {args.state}" if args.state else ""))
            return 0
        print(f"{'STATE':<8} {'HEAD':>10} {'AGE':>9} {'PENDING':>8}  KEY / HEAD TASK")
        for r in rows:  # keys are printed whole: they are what resume and skip take
            age = f"{r.head_age:.1f}s" if r.head_age is not None else "-"
            print(f"{r.state:<8} {r.head_id or '-':>10} {age:>9} {r.pending:>8}  {r.key}")
            print(f"{'':<40}{r.task_name or ''} {r.task_id or ''}".rstrip())
        return 0
    if not args.key:
        raise RiverBrokerError(f"`sequences {args.action}` needs --key KEY")
    action = sequences.resume if args.action == "resume" else sequences.skip
    if action(dsn, args.key, schema=args.schema):
        done = "resumed: its failed message runs again" if args.action == "resume" else (
            "skipped: its failed message was dropped, the next one runs")
        print(f"sequence {args.key!r} {done}")
        return 0
    print(f"sequence {args.key!r} is not halted (nothing to {args.action})", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="river-broker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_ in (
        ("migrate", cmd_migrate, "create or upgrade the schema (idempotent, safe concurrently)"),
        ("status", cmd_status, "show the schema version and message counts per queue and state"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--dsn", help=f"postgresql:// URL (default: ${DSN_ENV})")
        p.add_argument("--schema", default=TransportOptions.schema,
                       help="schema name (default: %(default)s)")
        p.set_defaults(func=func)
    p = sub.add_parser("sequences", help="list sequence keys; resume or skip a halted key")
    p.add_argument("action", choices=["list", "resume", "skip"])
    p.add_argument("--key", help="the sequence key (required for resume and skip)")
    p.add_argument("--state", choices=["running", "waiting", "halted"], help="list only these")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--dsn", help=f"postgresql:// URL (default: ${DSN_ENV})")
    p.add_argument("--schema", default=TransportOptions.schema,
                   help="schema name (default: %(default)s)")
    p.set_defaults(func=cmd_sequences)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RiverBrokerError as exc:
        print(f"river-broker: error: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"river-broker: cannot connect: {exc}".rstrip(), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
