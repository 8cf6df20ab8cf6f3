"""What a rerun may send: notes told once, results compared with what the client has."""

from __future__ import annotations

import pytest
from pyspark.sql.connect.proto import base_pb2

from router.dataplane.rerun import Shown
from router.errors import RerunDiffers

Response = base_pb2.ExecutePlanResponse


def _on(driver: str, **fields: object) -> bytes:
    """A response as `driver` sends it: its own response and server-side session ids."""
    ids = {"session_id": "s", "operation_id": "o", "response_id": f"r-{driver}"}
    msg = Response(**ids, server_side_session_id=f"x-{driver}", **fields)
    return bytes(msg.SerializeToString())


def _batch(driver: str, rows: bytes) -> bytes:
    return _on(driver, arrow_batch=Response.ArrowBatch(row_count=1, data=rows))


SCHEMA = {"schema": {"struct": {}}}
PROGRESS = {"execution_progress": Response.ExecutionProgress(num_inflight_tasks=1)}


def _first_run(shown: Shown) -> None:
    for response in (
        _on("a", **SCHEMA),
        _on("a", **PROGRESS),
        _batch("a", b"1"),
        _batch("a", b"2"),
    ):  # type: ignore[arg-type]
        assert shown.admit(response)


def test_a_rerun_sends_only_what_the_client_does_not_have() -> None:
    shown = Shown()
    _first_run(shown)
    assert shown.results == 2 and shown.rerunnable
    shown.rerun()
    assert not shown.rerunnable  # once
    assert not shown.admit(_on("b", **SCHEMA))  # type: ignore[arg-type]
    assert shown.admit(_on("b", **PROGRESS))  # type: ignore[arg-type]  # the new run's progress
    assert not shown.admit(_batch("b", b"1"))
    assert not shown.admit(_batch("b", b"2"))
    assert shown.admit(_batch("b", b"3"))
    assert shown.admit(_on("b", metrics={}))  # type: ignore[arg-type]  # not told by the first run
    assert shown.admit(_on("b", result_complete={}))  # type: ignore[arg-type]
    shown.ended()


def test_a_rerun_whose_results_differ_is_stopped() -> None:
    shown = Shown()
    _first_run(shown)
    shown.rerun()
    assert not shown.admit(_batch("b", b"1"))
    with pytest.raises(RerunDiffers, match=r"2 of its results had been sent.*result 2 is not"):
        shown.admit(_batch("b", b"X"))


def test_a_rerun_that_ends_short_is_stopped() -> None:
    shown = Shown()
    _first_run(shown)
    shown.rerun()
    assert not shown.admit(_batch("b", b"1"))
    with pytest.raises(RerunDiffers, match="ended after 1 of them"):
        shown.ended()
    first = Shown()
    _first_run(first)
    first.ended()  # the first run ends as it likes


def test_a_stream_past_its_bound_or_malformed_is_not_rerunnable() -> None:
    shown = Shown(max_results=1)
    _first_run(shown)
    assert not shown.rerunnable
    with pytest.raises(RuntimeError):
        shown.rerun()
    garbled = Shown()
    assert garbled.admit(b"\xff\xff")  # forwarded as it is; the driver's business
    assert not garbled.rerunnable


def test_only_notes_already_told_are_held_back() -> None:
    shown = Shown()
    assert shown.admit(_batch("a", b"1"))  # a query with no schema message
    shown.rerun()
    assert shown.admit(_on("b", **SCHEMA))  # type: ignore[arg-type]  # never told
    assert not shown.admit(_batch("b", b"1"))


def test_metrics_the_first_run_told_are_not_told_again() -> None:
    shown = Shown()
    _first_run(shown)
    assert shown.admit(_on("a", metrics={}))  # type: ignore[arg-type]  # cut before complete
    shown.rerun()
    for results in (b"1", b"2"):
        assert not shown.admit(_batch("b", results))
    assert not shown.admit(_on("b", metrics={}))  # type: ignore[arg-type]
    assert shown.admit(_on("b", result_complete={}))  # type: ignore[arg-type]
    shown.ended()
