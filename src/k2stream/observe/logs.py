"""Log output: JSON lines for machines, readable lines on a terminal.

Every log call names one fact (``connection_opened``, ``gap_detected``) and
carries its context as fields; docs/logging.md lists the events by level.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure(
    fmt: str = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Route structlog to ``stream`` (stderr) as JSON or console lines, from ``level`` up."""
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
