"""Log lines: JSON with the trace of the call they happened in, plain text for people."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from router import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A (non-terminal) buffer to log to; the root logger restored afterwards."""
    buffer = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield buffer
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_current_trace(captured: io.StringIO) -> None:
    logs.configure_logging("info", "auto", captured)  # not a terminal: JSON
    log = logging.getLogger("router.test")
    log.info("outside a call: %s", "no trace")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("call") as span:
        log.warning('session "s1" moved')
    log.debug("below the level")
    first, second = (json.loads(line) for line in captured.getvalue().splitlines())
    assert first["message"] == "outside a call: no trace" and "trace_id" not in first
    assert first["level"] == "info" and first["logger"] == "router.test"
    context = span.get_span_context()
    assert second["message"] == 'session "s1" moved' and second["level"] == "warning"
    assert second["trace_id"] == f"{context.trace_id:032x}"
    assert second["span_id"] == f"{context.span_id:016x}"


def test_text_format_is_plain(captured: io.StringIO) -> None:
    logs.configure_logging("info", "text", captured)
    logging.getLogger("router.test").info("driver %s is down", "d1:1")
    line = captured.getvalue().strip()
    assert line.endswith("INFO    router.test: driver d1:1 is down")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
