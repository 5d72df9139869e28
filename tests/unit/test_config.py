"""Settings: precedence, the operators' variable names, and clear errors."""

import pytest

from k2stream.cli import main
from k2stream.config import ConfigError, resolve


def test_defaults_follow_the_design():
    """Without any input: BTCUSDT and ETHUSDT trades from Binance into data/trades.db."""
    settings = resolve({}, environ={})

    assert ["BTCUSDT", "ETHUSDT"] == settings.symbols
    assert ["trade"] == settings.streams
    assert "wss://stream.binance.com:9443" == settings.endpoint[0]
    assert "wss://stream.binance.us:9443" == settings.endpoint[-1]
    assert "sqlite:///data/trades.db" == settings.sink
    assert 9090 == settings.metrics_port
    assert "127.0.0.1" == settings.metrics_host
    feed = settings.feed()
    assert (5.0, 60.0, 10) == (
        feed.reconnect_delay,
        feed.max_reconnect_delay,
        feed.max_reconnect_attempts,
    )


def test_flags_win_over_environment_which_wins_over_the_file(tmp_path):
    """Precedence is flag, then K2_ variable, then config file, then default."""
    config = tmp_path / "k2.toml"
    config.write_text(
        'reconnect_delay = 1.5\nsymbols = ["SOLUSDT"]\nmetrics_port = 9100\n'
    )
    environ = {"K2_BINANCE_RECONNECT_DELAY": "2.5", "K2_METRICS_PORT": "9200"}

    settings = resolve({"config": str(config), "metrics_port": "9300"}, environ=environ)

    assert 2.5 == settings.reconnect_delay
    assert 9300 == settings.metrics_port
    assert ["SOLUSDT"] == settings.symbols


def test_operator_endpoint_variables_build_the_ordered_list():
    """K2_BINANCE_WEBSOCKET_URL is the primary and K2_BINANCE_FAILOVER_URLS follow."""
    environ = {
        "K2_BINANCE_WEBSOCKET_URL": "wss://a.example:9443",
        "K2_BINANCE_FAILOVER_URLS": "wss://b.example, wss://c.example:443",
    }

    settings = resolve({}, environ=environ)

    assert [
        "wss://a.example:9443",
        "wss://b.example",
        "wss://c.example:443",
    ] == settings.endpoint


@pytest.mark.parametrize(
    ("flags", "environ", "fragment"),
    [
        ({"reconnect_delay": "soon"}, {}, "--reconnect-delay: 'soon'"),
        (
            {},
            {"K2_BINANCE_MAX_RECONNECT_ATTEMPTS": "-1"},
            "K2_BINANCE_MAX_RECONNECT_ATTEMPTS",
        ),
        ({"endpoint": ["ws://stream.binance.com:9443"]}, {}, "ws:// on loopback only"),
        ({"rest_url": "http://api.binance.com"}, {}, "http:// on loopback only"),
        ({"sink": "postgres://x"}, {}, "sqlite:///PATH"),
        ({"streams": "depth"}, {}, "trade, aggTrade"),
        (
            {"max_reconnect_delay": "1", "reconnect_delay": "5"},
            {},
            "at least --reconnect-delay",
        ),
        ({"shard": "2/2"}, {}, "I/N"),
        ({"rotate_after": "90000"}, {}, "24 h"),
        ({"streams_per_connection": "2000"}, {}, "1024"),
    ],
)
def test_bad_values_name_the_option_and_what_is_accepted(flags, environ, fragment):
    """A bad value is refused with the option's name and the accepted form."""
    with pytest.raises(ConfigError) as caught:
        resolve(flags, environ=environ)

    assert fragment in str(caught.value)


def test_an_unknown_config_key_is_refused(tmp_path):
    """A typo in the config file is an error, not a silently ignored line."""
    config = tmp_path / "k2.toml"
    config.write_text("reconect_delay = 1\n")

    with pytest.raises(ConfigError, match="unknown key.*reconect_delay"):
        resolve({"config": str(config)}, environ={})


def test_the_cli_exits_2_on_a_bad_value(capsys):
    """`k2stream run` with a bad flag exits 2 and says what was wrong."""
    assert 2 == main(["run", "--metrics-port", "http"])
    assert "--metrics-port: 'http' is not accepted" in capsys.readouterr().err


def test_help_lists_every_option_with_its_variable_and_default(capsys):
    """`k2stream run --help` shows each option's environment variable and default."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())

    for fragment in (
        "--reconnect-delay",
        "K2_BINANCE_RECONNECT_DELAY",
        "default: 5.0",
        "--sink",
    ):
        assert fragment in text


def test_the_readme_documents_every_option():
    """The README's configuration table names every flag and its environment variable."""
    from pathlib import Path

    from k2stream.config import OPTIONS

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for option in OPTIONS.values():
        assert f"`{option.flag}`" in readme, option.flag
        assert option.env in readme, option.env
