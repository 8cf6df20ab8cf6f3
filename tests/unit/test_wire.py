"""wire.py against the protobuf library's own encoding and decoding."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyspark.sql.connect.proto import base_pb2

from router.dataplane import wire

text = st.text(max_size=40)
field_numbers = st.integers(min_value=20, max_value=2**29 - 1)


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    """Top-level fields ExecutePlanRequest does not define, of every wire type."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 4))):
        number = draw(field_numbers)
        kind = draw(st.sampled_from([wire.VARINT, wire.I64, wire.LEN, wire.I32, wire.SGROUP]))
        out += wire.encode_varint((number << 3) | kind)
        if kind == wire.VARINT:
            out += wire.encode_varint(draw(st.integers(0, 2**64 - 1)))
        elif kind == wire.I64:
            out += draw(st.binary(min_size=8, max_size=8))
        elif kind == wire.I32:
            out += draw(st.binary(min_size=4, max_size=4))
        elif kind == wire.LEN:
            payload = draw(st.binary(max_size=30))
            out += wire.encode_varint(len(payload)) + payload
        else:  # a group holding one varint, closed by its end tag
            out += wire.encode_varint((1 << 3) | wire.VARINT) + wire.encode_varint(7)
            out += wire.encode_varint((number << 3) | wire.EGROUP)
    return bytes(out)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A serialized ExecutePlanRequest with random known fields and unknown ones mixed in."""
    msg = base_pb2.ExecutePlanRequest()
    if draw(st.booleans()):
        msg.session_id = draw(text)
    if draw(st.booleans()):
        msg.user_context.user_id = draw(text)
        msg.user_context.user_name = draw(text)
    if draw(st.booleans()):
        msg.operation_id = draw(text)
    if draw(st.booleans()):
        msg.client_observed_server_side_session_id = draw(text)
    if draw(st.booleans()):
        msg.plan.root.sql.query = draw(text)
    msg.tags.extend(draw(st.lists(text, max_size=3)))
    return draw(unknown_fields()) + msg.SerializeToString() + draw(unknown_fields())


def _parse(data: bytes) -> base_pb2.ExecutePlanRequest:
    return base_pb2.ExecutePlanRequest.FromString(data)


@given(requests())
def test_reads_match_protobuf(data: bytes) -> None:
    msg = _parse(data)
    assert (wire.read_string(data, 1) or "") == msg.session_id
    assert (wire.read_string(data, 6) or "") == msg.operation_id
    assert (wire.read_string(data, 8) or "") == msg.client_observed_server_side_session_id
    ctx = wire.read_message(data, 2)
    assert ((wire.read_string(ctx, 1) or "") if ctx is not None else "") == msg.user_context.user_id


@given(requests(), requests())
def test_concatenated_messages_merge_like_protobuf(a: bytes, b: bytes) -> None:
    # Last scalar wins and embedded messages merge, exactly as a protobuf parser does.
    data = a + b
    msg = _parse(data)
    assert (wire.read_string(data, 1) or "") == msg.session_id
    ctx = wire.read_message(data, 2)
    assert ((wire.read_string(ctx, 1) or "") if ctx is not None else "") == msg.user_context.user_id


@given(requests(), text)
def test_replace_string_keeps_everything_else(data: bytes, new: str) -> None:
    rewritten = wire.replace_string(data, 8, new)
    before, after = _parse(data), _parse(rewritten)
    assert after.client_observed_server_side_session_id == new
    after.client_observed_server_side_session_id = before.client_observed_server_side_session_id
    if not before.HasField("client_observed_server_side_session_id"):
        after.ClearField("client_observed_server_side_session_id")
    assert after == before
    # Byte for byte, unknown fields included, only field 8 changed.
    assert wire.strip_field(rewritten, 8) == wire.strip_field(data, 8)


@given(requests())
def test_strip_field_removes_only_that_field(data: bytes) -> None:
    stripped = wire.strip_field(data, 1)
    assert wire.read_string(stripped, 1) is None
    before, after = _parse(data), _parse(stripped)
    assert after.session_id == ""
    after.session_id = before.session_id
    assert after == before


@given(requests(), st.data())
def test_truncated_bytes_raise_only_wire_error(data: bytes, d: st.DataObject) -> None:
    cut = d.draw(st.integers(0, max(len(data) - 1, 0)))
    with contextlib.suppress(wire.WireError):
        wire.read_strings(data[:cut], (1, 2))


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_wire_error_and_agree_when_valid(data: bytes) -> None:
    try:
        fields = wire.read_strings(data, (1,))
    except wire.WireError:
        return
    try:
        msg = base_pb2.ConfigRequest.FromString(data)
    except Exception:
        return
    if 1 in fields:
        assert fields[1].decode("utf-8", "replace") == msg.session_id or not _is_utf8(fields[1])


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x0a\x05abc", "claims 5 bytes"),
        (b"\x0a", "truncated varint"),
        (b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "longer than 10 bytes"),
        (b"\x0f", "invalid wire type"),
        (b"\x02\x00", "field number 0"),
        (b"\x0d\x01\x02", "truncated fixed-width"),
        (b"\x0b\x08\x01", "truncated group"),
        (b"\x0b\x14", "closed by end tag"),
    ],
)
def test_malformed_examples_name_the_problem(data: bytes, why: str) -> None:
    with pytest.raises(wire.WireError, match=why):
        list(wire.iter_fields(data))


def test_wrong_wire_type_for_a_string_field_is_an_error() -> None:
    with pytest.raises(wire.WireError, match="expected length-delimited"):
        wire.read_string(b"\x08\x01", 1)


def test_varint_round_trip_edges() -> None:
    for value in (0, 1, 127, 128, 2**32, 2**64 - 1):
        assert wire.read_varint(wire.encode_varint(value), 0) == (
            value,
            len(wire.encode_varint(value)),
        )
    with pytest.raises(wire.WireError, match="overflows"):
        wire.read_varint(b"\xff" * 9 + b"\x7f", 0)
