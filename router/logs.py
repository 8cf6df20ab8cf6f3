"""How a replica writes its log: JSON lines for machines, plain lines for people.

One record per significant event (a driver down, a session moved, a drain), never one per
call by default. JSON lines carry the trace and span id of the call they happened in, so a
log line leads to its trace. `auto` picks plain text when stderr is a terminal.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, TextIO

_PLAIN = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_trace_ids())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _trace_ids() -> dict[str, str]:
    """The current span's ids, if a traced call is running."""
    if "opentelemetry.trace" not in sys.modules:  # tracing never started: nothing to look up
        return {}
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def configure_logging(level: str, fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Log to `stream` (stderr) at `level`, as `fmt`: json, text, or auto (text on a terminal)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if fmt == "json" or (fmt == "auto" and not stream.isatty()):
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(_PLAIN))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
