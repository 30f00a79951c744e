from types import SimpleNamespace

import pytest

from river_broker import ConfigurationError
from river_broker.conninfo import conninfo_from_client, conninfo_from_url, describe, with_defaults


def client(**kw):
    base = dict(hostname=None, port=None, userid=None, password=None, virtual_host=None)
    return SimpleNamespace(**{**base, **kw})


def test_url_with_libpq_parameters_passes_through_untouched():
    url = "postgresql://app:pw@db:5433/app?sslmode=require&application_name=x&connect_timeout=3"
    assert conninfo_from_client(client(hostname=url)) == url


def test_fields_build_a_conninfo():
    info = conninfo_from_client(client(hostname="db", port=5433, userid="app", password="pw",
                                       virtual_host="/appdb"))
    assert "host=db" in info and "port=5433" in info and "dbname=appdb" in info


def test_wrong_scheme_names_the_problem_without_the_password():
    with pytest.raises(ConfigurationError, match=r"postgresql:// URL.*'mysql'") as err:
        conninfo_from_url("mysql://u:secret@h/db")
    assert "secret" not in str(err.value)


def test_unparsable_url_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="invalid PostgreSQL URL"):
        conninfo_from_url("postgresql://h/db?sslmode=require&nonsense_param=1")


def test_defaults_do_not_override_the_users_parameters():
    info = with_defaults("postgresql://h/db?application_name=mine", application_name="river")
    assert "mine" in info and "river" not in info
    assert describe("postgresql://u:pw@h:6000/db") == "h:6000/db"
