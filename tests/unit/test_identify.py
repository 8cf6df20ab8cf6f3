"""protocol.identify reads session, user, operation and observed id in one pass.

Random valid requests (built with pyspark's own classes) give back every field they carry;
random and truncated bytes give a RequestInfo or BadRequest, never another exception.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyspark.sql.connect.proto import base_pb2

from router.dataplane import protocol, wire
from router.dataplane.protocol import METHODS
from router.errors import BadRequest

ids = st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s)
maybe = st.none() | ids
sessions = st.uuids().map(str)  # Spark accepts only UUIDs, and so does identify


def _request(
    name: str, session: str, user: str, operation: str | None, observed: str | None
) -> Any:
    """A request of method `name` carrying what the router reads."""
    kind = {
        "ExecutePlan": base_pb2.ExecutePlanRequest,
        "ReattachExecute": base_pb2.ReattachExecuteRequest,
        "ReleaseExecute": base_pb2.ReleaseExecuteRequest,
        "Interrupt": base_pb2.InterruptRequest,
        "Config": base_pb2.ConfigRequest,
        "AnalyzePlan": base_pb2.AnalyzePlanRequest,
        "GetStatus": base_pb2.GetStatusRequest,
    }[name]
    req = kind(session_id=session)
    req.user_context.user_id = user
    if operation is not None and METHODS[name].operation_id_field is not None:
        if name == "Interrupt":
            req.operation_id = operation
            req.interrupt_type = base_pb2.InterruptRequest.INTERRUPT_TYPE_OPERATION_ID
        else:
            req.operation_id = operation
    if observed is not None:
        req.client_observed_server_side_session_id = observed
    return req


NAMES = ["ExecutePlan", "ReattachExecute", "ReleaseExecute", "Interrupt", "Config", "AnalyzePlan"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(NAMES), sessions, st.text(max_size=20), maybe, maybe, st.booleans())
def test_every_field_in_one_pass(
    name: str, session: str, user: str, operation: str | None, observed: str | None, until: bool
) -> None:
    method = METHODS[name]
    if method.operation_id_field is None:
        operation = None
    req = _request(name, session, user, operation, observed)
    if name == "ReleaseExecute":
        if until:
            req.release_until.response_id = "r-1"
        else:
            req.release_all.SetInParent()
    raw = req.SerializeToString()
    info = protocol.identify(method, {}, raw)
    assert info.session_id == session
    assert info.user_id == user
    assert info.operation_id == (operation if operation else None)
    assert info.observed_id == observed
    assert info.releases_until == (name == "ReleaseExecute" and until)
    # The observed id cut out by its spans is exactly what the wire codec's strip gives.
    assert method.observed_field is not None
    assert info.without_observed(raw) == wire.strip_field(raw, method.observed_field)
    if observed is not None:
        stripped = type(req).FromString(info.without_observed(raw))
        assert not stripped.HasField("client_observed_server_side_session_id")
        assert stripped.session_id == session


def test_the_observed_field_repeated_is_cut_everywhere() -> None:
    first = _request("Config", str(uuid.uuid4()), "u", None, "old-1").SerializeToString()
    again = wire.encode_len_field(METHODS["Config"].observed_field or 0, b"old-2")
    raw = first + again
    info = protocol.identify(METHODS["Config"], {}, raw)
    assert info.observed_id == "old-2"  # proto3: the last occurrence wins
    assert len(info.observed_spans) == 2
    assert b"old" not in info.without_observed(raw)


def test_the_header_names_the_session_and_the_pool() -> None:
    s1 = "0f0e0d0c-0b0a-4908-8706-050403020100"
    raw = _request("ExecutePlan", s1, "alice", "op-1", "srv-1").SerializeToString()
    md = {"x-spark-session-id": s1, "x-spark-pool": "etl"}
    info = protocol.identify(METHODS["ExecutePlan"], md, raw)
    assert (info.session_id, info.pool, info.operation_id) == (s1, "etl", "op-1")


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"\x0a\x05s-1", "claims"),  # session_id claims more bytes than follow
        (b"\x08\x01", "wire type"),  # session_id as a varint
        (b"\x0a\x03s-1\x32\x01", "claims"),  # operation_id truncated (ExecutePlan field 6)
        (b"\x0a\x03s-1\x30\x01", "wire type"),  # operation_id as a varint
        (b"\x0a\x03s-1\x42\x02\xff\xfe", "UTF-8"),  # observed id not UTF-8 (field 8)
        (b"\x0a\x03s-1\x40\x01", "wire type"),  # observed id as a varint
    ],
)
def test_malformed_fields_are_bad_requests(raw: bytes, what: str) -> None:
    with pytest.raises(BadRequest, match=what):
        protocol.identify(METHODS["ExecutePlan"], {}, raw)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(NAMES), st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_bad_request(name: str, raw: bytes) -> None:
    try:
        info = protocol.identify(METHODS[name], {}, raw)
    except BadRequest:
        return
    assert info.session_id  # accepted only with a session id


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(NAMES), sessions, maybe, maybe, st.data())
def test_truncated_requests_are_refused_or_read_consistently(
    name: str, session: str, operation: str | None, observed: str | None, data: st.DataObject
) -> None:
    raw = _request(name, session, "u", operation, observed).SerializeToString()
    cut = data.draw(st.integers(min_value=0, max_value=len(raw)))
    try:
        info = protocol.identify(METHODS[name], {}, raw[:cut])
    except BadRequest:
        return
    # A prefix that still parses carries the session whole (it is the first field).
    assert info.session_id == session
