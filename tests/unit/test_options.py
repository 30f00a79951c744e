import pytest

from river_broker import ConfigurationError, TransportOptions


def test_defaults_when_no_options():
    opts = TransportOptions.from_transport_options(None)
    assert opts.schema == "river_broker"
    assert opts.auto_migrate is True
    assert opts.notify_channel == "river_broker."
    channel = opts.queue_channel("celery")
    assert channel == "river_broker.d48bac364ad5"  # md5("celery")[:12], as the SQL computes
    long = TransportOptions.from_transport_options({"schema": "s" * 48})
    assert len(long.queue_channel("q" * 500).encode()) <= 63


def test_unknown_option_is_an_error_with_a_hint():
    hint = r"unknown .* 'polling_intreval'.*'polling_interval'"
    with pytest.raises(ConfigurationError, match=hint):
        TransportOptions.from_transport_options({"polling_intreval": 2})


def test_kombu_generic_options_are_accepted():
    TransportOptions.from_transport_options({"max_retries": 3, "interval_start": 0})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"polling_interval": "soon"}, "'polling_interval' must be a float"),
        ({"fetch_batch_size": 2.5}, "'fetch_batch_size' must be a int"),
        ({"auto_migrate": "maybe"}, "'auto_migrate' must be a bool"),
        ({"schema": "bad-name; drop"}, "plain identifier"),
        ({"schema": "x" * 49}, "at most 48"),
        ({"polling_interval": 0}, "must be > 0"),
        ({"retention": -1}, "must be >= 0"),
    ],
)
def test_bad_option_values_name_the_option(options, message):
    with pytest.raises(ConfigurationError, match=message):
        TransportOptions.from_transport_options(options)


def test_string_values_from_the_environment_are_coerced():
    opts = TransportOptions.from_transport_options(
        {"auto_migrate": "false", "polling_interval": "2.5", "fetch_batch_size": "10"}
    )
    assert (opts.auto_migrate, opts.polling_interval, opts.fetch_batch_size) == (False, 2.5, 10)
