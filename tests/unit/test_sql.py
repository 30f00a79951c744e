import re

from river_broker import sql


def test_every_named_query_uses_bind_parameters_and_the_schema_placeholder():
    queries = sql.raw_queries()
    assert {"insert_message", "fetch_available", "ack_delete", "requeue",
            "rescue_orphaned_leases", "promote_due_scheduled"} <= set(queries)
    for name, text in queries.items():
        if name != "register_consumer":  # names its sequence through a bind parameter
            assert "{schema}." in text, name
        # no Python string formatting of values: only %(name)s parameters
        assert not re.search(r"%s|\{\d*\}|'\{", text), name


def test_queries_render_for_a_quoted_schema():
    rendered = sql.queries_for("My_Schema")["fetch_available"]
    # Composed, with the schema as an Identifier (quoted by psycopg at execution)
    assert "Identifier('My_Schema')" in repr(rendered)


def test_migrations_are_numbered_without_gaps():
    versions = [m.version for m in sql.migrations()]
    assert versions == list(range(1, len(versions) + 1))
