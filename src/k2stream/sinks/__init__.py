"""Where trades end up: SQLite, JSON lines, Kafka.

:func:`open_sink` turns a sink URL into a :class:`Sink`;
:class:`SinkWriter` drives it from the event loop. The Kafka sink lives in
``k2stream.sinks.kafka`` and is imported only when a ``kafka://`` URL asks for
it, because it needs the optional ``kafka`` extra.
"""

from k2stream.sinks.base import (
    DEFAULT_SINK_URL,
    Sink,
    SinkError,
    SinkUnavailable,
    SinkUrl,
    open_sink,
    parse_sink_url,
)
from k2stream.sinks.jsonl import JsonlSink
from k2stream.sinks.sqlite import Gap, SqliteSink
from k2stream.sinks.writer import SinkWriter


__all__ = [
    "DEFAULT_SINK_URL",
    "Gap",
    "JsonlSink",
    "Sink",
    "SinkError",
    "SinkUnavailable",
    "SinkUrl",
    "SinkWriter",
    "SqliteSink",
    "open_sink",
    "parse_sink_url",
]
