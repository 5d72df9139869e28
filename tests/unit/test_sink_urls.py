"""Sink URLs: the SQLAlchemy path rule, stdout, and clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from k2stream.sinks.base import (
    DEFAULT_SINK_URL,
    SinkError,
    SinkUrl,
    open_sink,
    parse_sink_url,
)
from k2stream.sinks.jsonl import JsonlSink
from k2stream.sinks.sqlite import SqliteSink


class TestParseSinkUrl:
    def test_three_slashes_make_a_relative_path(self) -> None:
        """sqlite:///data/trades.db names the relative path data/trades.db."""
        parsed = parse_sink_url("sqlite:///data/trades.db")

        expected = SinkUrl("sqlite", Path("data/trades.db"), "sqlite:///data/trades.db")
        assert expected == parsed
        assert parsed.path is not None
        assert not parsed.path.is_absolute()

    def test_four_slashes_make_an_absolute_path(self) -> None:
        """sqlite:////var/lib/k2/trades.db names the absolute /var/lib/k2/trades.db."""
        parsed = parse_sink_url("sqlite:////var/lib/k2/trades.db")

        assert Path("/var/lib/k2/trades.db") == parsed.path

    def test_jsonl_follows_the_same_path_rule(self) -> None:
        """jsonl URLs use the same rule as sqlite ones."""
        assert Path("out/t.jsonl") == parse_sink_url("jsonl:///out/t.jsonl").path
        assert Path("/tmp/t.jsonl") == parse_sink_url("jsonl:////tmp/t.jsonl").path

    def test_jsonl_dash_is_stdout(self) -> None:
        """jsonl:- means standard output, which has no path."""
        assert SinkUrl("jsonl", None, "jsonl:-") == parse_sink_url("jsonl:-")

    def test_the_default_is_a_relative_sqlite_file(self) -> None:
        """The default sink is data/trades.db under the working directory."""
        parsed = parse_sink_url(DEFAULT_SINK_URL)

        assert ("sqlite", Path("data/trades.db")) == (parsed.scheme, parsed.path)

    def test_kafka_urls_are_passed_whole_to_the_kafka_sink(self) -> None:
        """A kafka URL is recognised and kept whole for the Kafka sink to parse."""
        url = "kafka://127.0.0.1:9092,127.0.0.1:9093/trades"

        assert SinkUrl("kafka", None, url) == parse_sink_url(url)

    @pytest.mark.parametrize(
        ("url", "why"),
        [
            ("trades.db", "no scheme"),
            ("postgres://db/trades", "not a known sink"),
            ("sqlite:trades.db", "three slashes"),
            ("sqlite://host/trades.db", "takes no host"),
            ("sqlite:///", "names no file"),
            ("sqlite:///data/", "names no file"),
            ("jsonl://", "names no file"),
            ("jsonl:out.jsonl", "three slashes"),
            ("sqlite:///t.db?mode=ro", "query strings"),
        ],
    )
    def test_malformed_urls_name_the_url_and_the_accepted_forms(
        self, url: str, why: str
    ) -> None:
        """A malformed URL raises ValueError with the URL, the reason and the forms."""
        with pytest.raises(ValueError) as raised:
            parse_sink_url(url)

        message = str(raised.value)
        assert repr(url) in message
        assert why in message
        assert "sqlite:////absolute/trades.db" in message
        assert "jsonl:-" in message


class TestOpenSink:
    def test_sqlite_url_gives_an_unopened_sqlite_sink(self, tmp_path: Path) -> None:
        """open_sink builds the SQLite sink with options but touches no file yet."""
        path = tmp_path / "sub" / "trades.db"

        sink = open_sink(f"sqlite:///{path}", busy_timeout=0.2)

        assert isinstance(sink, SqliteSink)
        assert (path, "sqlite") == (sink.path, sink.name)
        assert not path.parent.exists()

    def test_jsonl_url_gives_a_jsonl_sink(self, tmp_path: Path) -> None:
        """open_sink builds the JSONL sink for a file URL."""
        sink = open_sink(f"jsonl:///{tmp_path / 't.jsonl'}")

        assert isinstance(sink, JsonlSink)
        assert tmp_path / "t.jsonl" == sink.path

    def test_jsonl_dash_gives_a_stdout_sink(self) -> None:
        """open_sink builds a JSONL sink without a file for jsonl:-."""
        sink = open_sink("jsonl:-")

        assert isinstance(sink, JsonlSink)
        assert sink.path is None

    def test_unknown_options_are_refused(self) -> None:
        """An option the sink does not take is a TypeError, not silently ignored."""
        with pytest.raises(TypeError):
            open_sink("sqlite:///t.db", no_such_option=1)

    def test_a_sink_module_that_cannot_load_is_a_sink_error(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A kafka URL whose module cannot be imported raises SinkError saying so."""
        monkeypatch.setitem(sys.modules, "k2stream.sinks.kafka", None)

        with pytest.raises(SinkError, match="kafka sink cannot be loaded"):
            open_sink("kafka://127.0.0.1:9092/trades")
