"""The method table against pyspark's descriptors, and call identification."""

from __future__ import annotations

import pytest
from pyspark.sql.connect.proto import base_pb2

from router.dataplane import protocol
from router.dataplane.protocol import Shape
from router.errors import BadRequest

SERVICE = base_pb2.DESCRIPTOR.services_by_name["SparkConnectService"]


def _field(message: object, name: str) -> int | None:
    field = message.fields_by_name.get(name)  # type: ignore[attr-defined]
    return None if field is None else int(field.number)


def test_table_covers_every_method_of_the_service() -> None:
    assert {m.name for m in SERVICE.methods} == set(protocol.METHODS)
    assert SERVICE.full_name == protocol.SERVICE


@pytest.mark.parametrize("descriptor", list(SERVICE.methods), ids=lambda m: m.name)
def test_table_matches_descriptor(descriptor: object) -> None:
    m = protocol.METHODS[descriptor.name]  # type: ignore[attr-defined]
    d = descriptor
    assert m.shape.client_streaming == d.client_streaming  # type: ignore[attr-defined]
    assert m.shape.server_streaming == d.server_streaming  # type: ignore[attr-defined]
    req, resp = d.input_type, d.output_type  # type: ignore[attr-defined]
    assert _field(req, "session_id") == protocol.SESSION_ID_FIELD
    assert _field(req, "user_context") == protocol.USER_CONTEXT_FIELD
    assert req.fields_by_name["user_context"].message_type.fields_by_name["user_id"].number == 1
    assert _field(req, "client_observed_server_side_session_id") == m.observed_field
    assert _field(resp, "server_side_session_id") == m.response_server_side_field
    assert _field(resp, "session_id") == m.response_session_field
    assert _field(req, "operation_id") == m.operation_id_field


def test_unknown_method_of_the_service_is_stream_stream() -> None:
    m = protocol.method_for_path("/spark.connect.SparkConnectService/FutureMethod")
    assert m is not None and m.shape is Shape.STREAM_STREAM and m.name == "FutureMethod"


@pytest.mark.parametrize(
    "path", ["/other.Service/Config", "/spark.connect.SparkConnectService/", "/x", ""]
)
def test_paths_outside_the_service_are_not_ours(path: str) -> None:
    assert protocol.method_for_path(path) is None


CONFIG = protocol.METHODS["Config"]


S1 = "0f0e0d0c-0b0a-4908-8706-050403020100"
S2 = "1f1e1d1c-1b1a-4918-9716-151413121110"


def _config(session: str = "", user: str = "") -> bytes:
    req = base_pb2.ConfigRequest(session_id=session)
    if user:
        req.user_context.user_id = user
    return req.SerializeToString()


def test_session_and_user_from_the_body() -> None:
    info = protocol.identify(CONFIG, {}, _config("11111111-1111-4111-8111-111111111111", "alice"))
    assert (info.session_id, info.user_id, info.pool) == (
        "11111111-1111-4111-8111-111111111111",
        "alice",
        None,
    )


def test_header_wins_when_body_has_none() -> None:
    info = protocol.identify(
        CONFIG, {"x-spark-session-id": "22222222-2222-4222-8222-222222222222"}, _config()
    )
    assert info.session_id == "22222222-2222-4222-8222-222222222222"


def test_header_and_body_agreeing_is_fine() -> None:
    md = {"x-spark-session-id": "33333333-3333-4333-8333-333333333333", "x-spark-pool": "etl"}
    info = protocol.identify(CONFIG, md, _config("33333333-3333-4333-8333-333333333333"))
    assert (info.session_id, info.pool) == ("33333333-3333-4333-8333-333333333333", "etl")


def test_header_and_body_disagreeing_is_rejected_with_a_fix() -> None:
    with pytest.raises(BadRequest, match="name different sessions; send the same id"):
        protocol.identify(CONFIG, {"x-spark-session-id": "a"}, _config("b"))


def test_no_session_anywhere_is_rejected_with_a_fix() -> None:
    with pytest.raises(BadRequest, match=r"no session id; set the request's session_id"):
        protocol.identify(CONFIG, {}, _config(user="alice"))


def test_malformed_body_is_rejected() -> None:
    with pytest.raises(BadRequest, match="not a valid Spark Connect message"):
        protocol.identify(CONFIG, {}, b"\x0a\x10abc")


def test_invalid_utf8_session_is_rejected() -> None:
    with pytest.raises(BadRequest, match="not a valid Spark Connect message"):
        protocol.identify(CONFIG, {}, b"\x0a\x02\xff\xfe")


def test_a_session_id_that_is_not_a_uuid_is_rejected_quoted_short() -> None:
    for bad in ("x" * 300, "not-a-uuid", "../../etc/passwd", "a/b", S1.upper() + "0"):
        with pytest.raises(BadRequest, match="is not a UUID; Spark accepts only UUIDs") as e:
            protocol.identify(CONFIG, {}, _config(bad))
        assert len(str(e.value)) < 250  # client input is quoted cut short
    assert protocol.identify(CONFIG, {}, _config(S1.upper())).session_id == S1.upper()


def test_overlong_user_pool_and_operation_are_rejected() -> None:
    md = {"x-spark-pool": "p" * 257}
    with pytest.raises(BadRequest, match="x-spark-pool is 257 characters long; at most 256"):
        protocol.identify(CONFIG, md, _config(S1))
    with pytest.raises(BadRequest, match="user_id is 2000 characters long; at most 1000"):
        protocol.identify(CONFIG, {}, _config(S1, "u" * 2000), max_length=1000)
    assert protocol.identify(CONFIG, {}, _config(S1, "u" * 1000), max_length=1000).user_id


def test_disagreeing_header_and_body_are_quoted_cut_short() -> None:
    with pytest.raises(BadRequest, match="name different sessions") as e:
        protocol.identify(CONFIG, {"x-spark-session-id": "h" * 15_000}, _config(S1))
    assert len(str(e.value)) < 400


def test_the_note_fields_match_pyspark_names() -> None:
    d = base_pb2.ExecutePlanResponse.DESCRIPTOR
    assert _field(d, "schema") == protocol.SCHEMA_FIELD
    assert _field(d, "execution_progress") == protocol.PROGRESS_FIELD
    assert _field(d, "metrics") == protocol.METRICS_FIELD
    assert _field(d, "result_complete") == protocol.RESULT_COMPLETE_FIELD


def _response(**fields: object) -> bytes:
    ids = {
        "session_id": "s",
        "operation_id": "o",
        "response_id": "r",
        "server_side_session_id": "x",
    }
    return bytes(base_pb2.ExecutePlanResponse(**ids, **fields).SerializeToString())


def test_schema_progress_and_metrics_are_notes_and_results_are_not() -> None:
    progress = base_pb2.ExecutePlanResponse.ExecutionProgress(num_inflight_tasks=3)
    schema = {"schema": {"struct": {}}}
    told = protocol.told
    assert told(_response(execution_progress=progress)) == ({protocol.PROGRESS_FIELD}, None)
    assert told(_response(**schema)) == ({protocol.SCHEMA_FIELD}, None)  # type: ignore[arg-type]
    assert told(_response(metrics={})) == ({protocol.METRICS_FIELD}, None)  # type: ignore[arg-type]
    assert told(_response()) == (frozenset(), None)
    batch = base_pb2.ExecutePlanResponse.ArrowBatch(row_count=1, data=b"x")
    for result in ({"arrow_batch": batch}, {"result_complete": {}}, {"sql_command_result": {}}):
        notes, digest = told(_response(**result)) or (None, None)
        assert notes == frozenset() and digest is not None, result
    assert told(b"\xff\xff") is None  # malformed: never taken for a note


def test_a_digest_ignores_ids_and_tells_results_apart() -> None:
    def digest(response: bytes) -> int | None:
        told = protocol.told(response)
        assert told is not None
        return told[1]

    batch = base_pb2.ExecutePlanResponse.ArrowBatch(row_count=2, data=b"rows" * 1000)
    first = _response(arrow_batch=batch)
    # The same result from another driver: other response and server-side session ids.
    again = base_pb2.ExecutePlanResponse(
        session_id="s", operation_id="o", response_id="r2", server_side_session_id="y"
    )
    again.arrow_batch.CopyFrom(batch)
    assert digest(again.SerializeToString()) == digest(first)
    other = base_pb2.ExecutePlanResponse.ArrowBatch(row_count=2, data=b"rowz" * 1000)
    assert digest(_response(arrow_batch=other)) != digest(first)
    assert digest(_response(result_complete={})) != digest(first)  # type: ignore[arg-type]


def test_a_session_its_driver_knows_by_another_id_is_rewritten_both_ways() -> None:
    method = protocol.METHODS["Config"]
    request = base_pb2.ConfigRequest(session_id=S1, client_observed_server_side_session_id="x")
    sent = base_pb2.ConfigRequest.FromString(
        protocol.for_driver(method, "alias", request.SerializeToString(), upstream=S2)
    )
    assert sent.session_id == S2 and not sent.HasField("client_observed_server_side_session_id")
    response = base_pb2.ConfigResponse(session_id=S2, server_side_session_id="new")
    shown = base_pb2.ConfigResponse.FromString(
        protocol.for_client(method, "alias", response.SerializeToString(), session_id=S1)
    )
    assert (shown.session_id, shown.server_side_session_id) == (S1, "alias")
    untouched = response.SerializeToString()
    assert protocol.for_client(method, None, untouched) == untouched
