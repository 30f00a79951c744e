"""Sessions: tests (every CPython 3.10-3.13 found here), lint, typecheck, demo, bench.

The README's test command is ``nox -s tests``; ``.ci/run`` calls exactly that.
"""

from __future__ import annotations

import glob
import os
import shutil

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

ALL_PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

# pyenv installs interpreters that its shims only expose when selected: put the real ones on
# PATH so every installed version is found (machines without pyenv are unaffected).
for _bin in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[0-3]*/bin"))):
    os.environ["PATH"] = _bin + os.pathsep + os.environ["PATH"]
# Run on every supported interpreter this machine has; at least one must exist.
PYTHONS = [v for v in ALL_PYTHONS if shutil.which(f"python{v}")] or ["3"]
PYTHONS_NEWEST = PYTHONS[-1]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole suite against a real PostgreSQL and real celery workers."""
    session.install("-e", ".[test]")
    session.run("pytest", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=PYTHONS_NEWEST)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "river_broker", "tests", "bench", "examples", "noxfile.py")


@nox.session(python=PYTHONS_NEWEST)
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[celery]", "mypy")
    session.run("mypy", "river_broker")


@nox.session(python=PYTHONS_NEWEST)
def demo(session: nox.Session) -> None:
    """Sequences with real celery workers on PostgreSQL, then a tour of the transport."""
    session.install("-e", ".[test]")
    session.run("python", "examples/stripe_webhooks/run.py")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session(python=PYTHONS_NEWEST)
def bench(session: nox.Session) -> None:
    """Side-by-side against RabbitMQ, Redis and kombu's SQLAlchemy transport, then sequences and
    enqueue (river only), then the cost of monitoring (remote control, heartbeats, Flower) on
    river, RabbitMQ and Redis. ``nox -s bench -- --quick`` for the short versions."""
    session.install("-e", ".[bench]")
    session.run("python", "bench/run.py", *session.posargs)
    session.run("python", "bench/sequences.py", *session.posargs)
    session.run("python", "bench/enqueue.py", *session.posargs)
    session.run("python", "bench/broadcast.py", *session.posargs)
