"""Tests for loadtest.fake_driver: the Spark Connect stand-in the router tests run against."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

from loadtest.fake_driver import KNOWN_METHODS, SPARK_VERSION, CallRecord, FakeDriver

REPO_ROOT = Path(__file__).resolve().parents[2]
USER = "alice"
SERVICE = "/spark.connect.SparkConnectService/"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


def make_stub(channel: grpc.aio.Channel) -> Any:
    return base_pb2_grpc.SparkConnectServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
async def driver() -> AsyncIterator[FakeDriver]:
    async with FakeDriver() as d:
        yield d


@pytest.fixture
async def channel(driver: FakeDriver) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(driver.address, options=CHANNEL_OPTIONS) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Any:
    return make_stub(channel)


@pytest.fixture
def session() -> str:
    return str(uuid.uuid4())


def user_context(user: str = USER) -> Any:
    return base_pb2.UserContext(user_id=user, user_name=user)


def config_request(session: str, user: str = USER, **op: Any) -> Any:
    return base_pb2.ConfigRequest(
        session_id=session,
        user_context=user_context(user),
        operation=base_pb2.ConfigRequest.Operation(**op),
    )


def get_port_request(session: str, user: str = USER) -> Any:
    return config_request(
        session, user, get=base_pb2.ConfigRequest.Get(keys=["spark.connect.grpc.binding.port"])
    )


def execute_request(session: str, operation_id: str | None = None) -> Any:
    request = base_pb2.ExecutePlanRequest(session_id=session, user_context=user_context())
    if operation_id is not None:
        request.operation_id = operation_id
    return request


def reattach_request(session: str, operation_id: str, last: str | None = None) -> Any:
    request = base_pb2.ReattachExecuteRequest(
        session_id=session, user_context=user_context(), operation_id=operation_id
    )
    if last is not None:
        request.last_response_id = last
    return request


async def collect(call: Any) -> list[Any]:
    return [response async for response in call]


def error_info(trailing: Any) -> tuple[Any, Any]:
    """The google.rpc.Status and its ErrorInfo from a call's trailing metadata."""
    raw = dict(trailing)["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return status, info


def assert_ids(driver: FakeDriver, response: Any, session: str, user: str = USER) -> None:
    assert response.session_id == session
    assert response.server_side_session_id == driver.server_side_session_id(user, session)


# ------------------------------------------------------------------------ the twelve methods


async def test_execute_plan_streams_batches_then_result_complete(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    op = str(uuid.uuid4())
    responses = await collect(stub.ExecutePlan(execute_request(session, op)))
    assert [r.WhichOneof("response_type") for r in responses] == ["arrow_batch", "result_complete"]
    for r in responses:
        assert_ids(driver, r, session)
        assert r.operation_id == op
    assert responses[0].arrow_batch.row_count == 1
    assert len(responses[0].arrow_batch.data) == 64
    assert len({r.response_id for r in responses}) == 2
    (record,) = driver.calls
    assert (record.method, record.session_id, record.user_id) == ("ExecutePlan", session, USER)
    assert record.requests == 1
    assert record.request_bytes == execute_request(session, op).ByteSize()
    assert record.done and not record.cancelled
    assert record.time_remaining is None

    # Without an operation id the driver makes one up, shared by the whole stream.
    responses = await collect(stub.ExecutePlan(execute_request(session)))
    assert len({r.operation_id for r in responses}) == 1
    uuid.UUID(responses[0].operation_id)


async def test_reattach_continues_after_last_response_id(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    op = str(uuid.uuid4())
    first = await collect(
        stub.ExecutePlan(execute_request(session, op), metadata=[("x-fake-batches", "4")])
    )
    assert len(first) == 5

    rest = await collect(stub.ReattachExecute(reattach_request(session, op, first[1].response_id)))
    assert [r.response_id for r in rest] == [r.response_id for r in first[2:]]
    assert [r.WhichOneof("response_type") for r in rest] == ["arrow_batch"] * 2 + [
        "result_complete"
    ]
    for r in rest:
        assert_ids(driver, r, session)
        assert r.operation_id == op

    # Everything was already received: just a result_complete.
    tail = await collect(stub.ReattachExecute(reattach_request(session, op, first[-1].response_id)))
    assert [r.WhichOneof("response_type") for r in tail] == ["result_complete"]
    # No last_response_id: from the start.
    again = await collect(stub.ReattachExecute(reattach_request(session, op)))
    assert [r.response_id for r in again] == [r.response_id for r in first]
    assert driver.calls[-1].method == "ReattachExecute"


async def test_reattach_unknown_operation_is_operation_not_found(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    op = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub.ReattachExecute(reattach_request(session, op)))
    err = caught.value
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == (
        f"[INVALID_HANDLE.OPERATION_NOT_FOUND] The handle {op} is invalid. Operation not found."
    )
    status, info = error_info(err.trailing_metadata())
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    assert status.message == err.details()
    assert info.metadata["errorClass"] == "INVALID_HANDLE.OPERATION_NOT_FOUND"
    assert driver.calls[-1].done


async def test_analyze_plan_kinds(driver: FakeDriver, stub: Any, session: str) -> None:
    def request(**kind: Any) -> Any:
        return base_pb2.AnalyzePlanRequest(session_id=session, user_context=user_context(), **kind)

    r = await stub.AnalyzePlan(request(spark_version=base_pb2.AnalyzePlanRequest.SparkVersion()))
    assert_ids(driver, r, session)
    assert r.spark_version.version == SPARK_VERSION == "4.3.0-fake"

    r = await stub.AnalyzePlan(request(schema=base_pb2.AnalyzePlanRequest.Schema()))
    (field,) = r.schema.schema.struct.fields
    assert (field.name, field.data_type.WhichOneof("kind")) == ("id", "long")

    expected = {
        "explain": base_pb2.AnalyzePlanRequest.Explain(),
        "tree_string": base_pb2.AnalyzePlanRequest.TreeString(),
        "is_local": base_pb2.AnalyzePlanRequest.IsLocal(),
        "is_streaming": base_pb2.AnalyzePlanRequest.IsStreaming(),
        "input_files": base_pb2.AnalyzePlanRequest.InputFiles(),
        "ddl_parse": base_pb2.AnalyzePlanRequest.DDLParse(ddl_string="id long"),
        "same_semantics": base_pb2.AnalyzePlanRequest.SameSemantics(),
        "semantic_hash": base_pb2.AnalyzePlanRequest.SemanticHash(),
        "persist": base_pb2.AnalyzePlanRequest.Persist(),
        "unpersist": base_pb2.AnalyzePlanRequest.Unpersist(),
        "get_storage_level": base_pb2.AnalyzePlanRequest.GetStorageLevel(),
        "json_to_ddl": base_pb2.AnalyzePlanRequest.JsonToDDL(json_string="{}"),
    }
    for kind, message in expected.items():
        r = await stub.AnalyzePlan(request(**{kind: message}))
        assert_ids(driver, r, session)
        assert r.WhichOneof("result") == kind
    assert r.json_to_ddl.ddl_string
    r = await stub.AnalyzePlan(request(is_local=base_pb2.AnalyzePlanRequest.IsLocal()))
    assert r.is_local.is_local is False

    # No analyze kind at all: just the ids.
    r = await stub.AnalyzePlan(request())
    assert_ids(driver, r, session)
    assert r.WhichOneof("result") is None


async def test_config_operations(driver: FakeDriver, stub: Any, session: str) -> None:
    kv = base_pb2.KeyValue
    r = await stub.Config(
        config_request(session, set=base_pb2.ConfigRequest.Set(pairs=[kv(key="a.b", value="1")]))
    )
    assert_ids(driver, r, session)

    r = await stub.Config(config_request(session, get=base_pb2.ConfigRequest.Get(keys=["a.b"])))
    assert [(p.key, p.value) for p in r.pairs] == [("a.b", "1")]

    r = await stub.Config(
        config_request(
            session,
            get_with_default=base_pb2.ConfigRequest.GetWithDefault(
                pairs=[kv(key="a.b", value="x"), kv(key="c.d", value="dflt")]
            ),
        )
    )
    assert [(p.key, p.value) for p in r.pairs] == [("a.b", "1"), ("c.d", "dflt")]

    r = await stub.Config(
        config_request(session, get_option=base_pb2.ConfigRequest.GetOption(keys=["a.b", "c.d"]))
    )
    assert [(p.key, p.HasField("value")) for p in r.pairs] == [("a.b", True), ("c.d", False)]

    r = await stub.Config(
        config_request(session, get_all=base_pb2.ConfigRequest.GetAll(prefix="a."))
    )
    assert [(p.key, p.value) for p in r.pairs] == [("a.b", "1")]
    r = await stub.Config(config_request(session, get_all=base_pb2.ConfigRequest.GetAll()))
    assert {"a.b", "spark.connect.grpc.binding.port"} <= {p.key for p in r.pairs}

    r = await stub.Config(
        config_request(
            session,
            is_modifiable=base_pb2.ConfigRequest.IsModifiable(
                keys=["a.b", "spark.connect.grpc.binding.port"]
            ),
        )
    )
    assert [p.value for p in r.pairs] == ["true", "false"]

    r = await stub.Config(config_request(session, unset=base_pb2.ConfigRequest.Unset(keys=["a.b"])))
    assert_ids(driver, r, session)
    r = await stub.Config(
        config_request(session, get_option=base_pb2.ConfigRequest.GetOption(keys=["a.b"]))
    )
    assert not r.pairs[0].HasField("value")

    # Confs are per session.
    other = str(uuid.uuid4())
    await stub.Config(
        config_request(session, set=base_pb2.ConfigRequest.Set(pairs=[kv(key="a.b", value="2")]))
    )
    r = await stub.Config(
        config_request(other, get_option=base_pb2.ConfigRequest.GetOption(keys=["a.b"]))
    )
    assert not r.pairs[0].HasField("value")
    assert {c.method for c in driver.calls} == {"Config"}


async def test_config_binding_port_and_unknown_key(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    r = await stub.Config(get_port_request(session))
    assert [(p.key, p.value) for p in r.pairs] == [
        ("spark.connect.grpc.binding.port", str(driver.port))
    ]
    assert driver.port > 0 and driver.address == f"127.0.0.1:{driver.port}"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Config(config_request(session, get=base_pb2.ConfigRequest.Get(keys=["no.such"])))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details().startswith("[SQL_CONF_NOT_FOUND]")
    _, info = error_info(caught.value.trailing_metadata())
    assert info.metadata["errorClass"] == "SQL_CONF_NOT_FOUND"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        pairs = [base_pb2.KeyValue(key="spark.connect.grpc.binding.port", value="1")]
        await stub.Config(config_request(session, set=base_pb2.ConfigRequest.Set(pairs=pairs)))
    assert "CANNOT_MODIFY_CONFIG" in caught.value.details()


async def test_add_artifacts_consumes_the_stream(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    chunk = base_pb2.AddArtifactsRequest.ArtifactChunk
    requests = [
        base_pb2.AddArtifactsRequest(
            session_id=session,
            user_context=user_context(),
            batch=base_pb2.AddArtifactsRequest.Batch(
                artifacts=[
                    base_pb2.AddArtifactsRequest.SingleChunkArtifact(
                        name=f"pyfiles/m{i}.py", data=chunk(data=b"x = 1\n", crc=1)
                    )
                    for i in range(2)
                ]
            ),
        ),
        base_pb2.AddArtifactsRequest(
            session_id=session,
            user_context=user_context(),
            begin_chunk=base_pb2.AddArtifactsRequest.BeginChunkedArtifact(
                name="jars/big.jar",
                total_bytes=2000,
                num_chunks=2,
                initial_chunk=chunk(data=b"a" * 1000, crc=2),
            ),
        ),
        base_pb2.AddArtifactsRequest(
            session_id=session, user_context=user_context(), chunk=chunk(data=b"b" * 1000, crc=3)
        ),
    ]

    async def gen() -> AsyncIterator[Any]:
        for request in requests:
            yield request

    r = await stub.AddArtifacts(gen())
    assert_ids(driver, r, session)
    assert [(a.name, a.is_crc_successful) for a in r.artifacts] == [
        ("pyfiles/m0.py", True),
        ("pyfiles/m1.py", True),
        ("jars/big.jar", True),
    ]
    (record,) = driver.calls
    assert (record.method, record.session_id, record.requests) == ("AddArtifacts", session, 3)
    assert record.request_bytes == sum(req.ByteSize() for req in requests)


async def test_small_unary_methods(driver: FakeDriver, stub: Any, session: str) -> None:
    common = {"session_id": session, "user_context": user_context()}

    r = await stub.ArtifactStatus(base_pb2.ArtifactStatusesRequest(names=["a", "b"], **common))
    assert_ids(driver, r, session)
    assert {name: s.exists for name, s in r.statuses.items()} == {"a": False, "b": False}

    all_type = base_pb2.InterruptRequest.INTERRUPT_TYPE_ALL
    r = await stub.Interrupt(base_pb2.InterruptRequest(interrupt_type=all_type, **common))
    assert_ids(driver, r, session)
    assert list(r.interrupted_ids) == []
    op_type = base_pb2.InterruptRequest.INTERRUPT_TYPE_OPERATION_ID
    r = await stub.Interrupt(
        base_pb2.InterruptRequest(interrupt_type=op_type, operation_id="op-1", **common)
    )
    assert list(r.interrupted_ids) == ["op-1"]

    r = await stub.ReleaseExecute(
        base_pb2.ReleaseExecuteRequest(
            operation_id="op-1",
            release_until=base_pb2.ReleaseExecuteRequest.ReleaseUntil(response_id="r"),
            **common,
        )
    )
    assert_ids(driver, r, session)
    assert r.operation_id == "op-1"

    r = await stub.FetchErrorDetails(base_pb2.FetchErrorDetailsRequest(error_id="e", **common))
    assert_ids(driver, r, session)
    assert not r.errors

    r = await stub.GetStatus(
        base_pb2.GetStatusRequest(
            operation_status=base_pb2.GetStatusRequest.OperationStatusRequest(operation_ids=["x"]),
            **common,
        )
    )
    assert_ids(driver, r, session)
    assert [s.operation_id for s in r.operation_statuses] == ["x"]

    new = str(uuid.uuid4())
    r = await stub.CloneSession(base_pb2.CloneSessionRequest(new_session_id=new, **common))
    assert_ids(driver, r, session)
    assert r.new_session_id == new
    assert r.new_server_side_session_id == driver.server_side_session_id(USER, new)
    r = await stub.CloneSession(base_pb2.CloneSessionRequest(**common))
    uuid.UUID(r.new_session_id)
    assert r.new_server_side_session_id not in ("", r.server_side_session_id)

    r = await stub.ReleaseSession(base_pb2.ReleaseSessionRequest(**common))
    assert_ids(driver, r, session)

    assert [c.method for c in driver.calls] == [
        "ArtifactStatus",
        "Interrupt",
        "Interrupt",
        "ReleaseExecute",
        "FetchErrorDetails",
        "GetStatus",
        "CloneSession",
        "CloneSession",
        "ReleaseSession",
    ]
    assert all(c.session_id == session and c.user_id == USER and c.done for c in driver.calls)


async def test_clone_copies_confs_and_release_forgets_them(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    common = {"session_id": session, "user_context": user_context()}
    pairs = [base_pb2.KeyValue(key="k", value="v")]
    await stub.Config(config_request(session, set=base_pb2.ConfigRequest.Set(pairs=pairs)))
    op = str(uuid.uuid4())
    await collect(stub.ExecutePlan(execute_request(session, op)))
    clone = await stub.CloneSession(base_pb2.CloneSessionRequest(**common))

    get_k = base_pb2.ConfigRequest.GetOption(keys=["k"])
    r = await stub.Config(config_request(clone.new_session_id, get_option=get_k))
    assert r.pairs[0].value == "v"

    await stub.ReleaseSession(base_pb2.ReleaseSessionRequest(**common))
    r = await stub.Config(config_request(session, get_option=get_k))
    assert not r.pairs[0].HasField("value")
    with pytest.raises(grpc.aio.AioRpcError, match="OPERATION_NOT_FOUND"):
        await collect(stub.ReattachExecute(reattach_request(session, op)))
    # The server-side id survives a release: it is stable for the driver's whole life.
    assert_ids(driver, r, session)


async def test_release_all_forgets_the_operation(stub: Any, session: str) -> None:
    op = str(uuid.uuid4())
    await collect(stub.ExecutePlan(execute_request(session, op)))
    await stub.ReleaseExecute(
        base_pb2.ReleaseExecuteRequest(
            session_id=session,
            user_context=user_context(),
            operation_id=op,
            release_all=base_pb2.ReleaseExecuteRequest.ReleaseAll(),
        )
    )
    with pytest.raises(grpc.aio.AioRpcError, match="OPERATION_NOT_FOUND"):
        await collect(stub.ReattachExecute(reattach_request(session, op)))


async def test_server_side_session_id_is_stable_per_user_and_session(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    ids = set()
    for _ in range(3):
        ids.add((await stub.Config(get_port_request(session))).server_side_session_id)
        ids.update(
            r.server_side_session_id
            for r in await collect(stub.ExecutePlan(execute_request(session)))
        )
    assert ids == {driver.server_side_session_id(USER, session)}
    uuid.UUID(ids.pop())

    other_user = await stub.Config(get_port_request(session, user="bob"))
    other_session = await stub.Config(get_port_request(str(uuid.uuid4())))
    all_ids = {
        driver.server_side_session_id(USER, session),
        other_user.server_side_session_id,
        other_session.server_side_session_id,
    }
    assert len(all_ids) == 3
    # Another driver (like a restarted Spark) hands out a different id for the same session.
    assert FakeDriver().server_side_session_id(USER, session) != driver.server_side_session_id(
        USER, session
    )


# ------------------------------------------------------------------------ result size


async def test_batches_and_batch_bytes_from_constructor_and_metadata(session: str) -> None:
    async with (
        FakeDriver(batches=3, batch_bytes=10) as driver,
        grpc.aio.insecure_channel(driver.address, options=CHANNEL_OPTIONS) as channel,
    ):
        stub = make_stub(channel)
        responses = await collect(stub.ExecutePlan(execute_request(session)))
        assert [len(r.arrow_batch.data) for r in responses[:-1]] == [10, 10, 10]
        assert responses[-1].HasField("result_complete")

        metadata = [("x-fake-batches", "200"), ("x-fake-batch-bytes", "1000")]
        responses = await collect(stub.ExecutePlan(execute_request(session), metadata=metadata))
        assert len(responses) == 201
        assert {len(r.arrow_batch.data) for r in responses[:-1]} == {1000}
        assert all(r.arrow_batch.row_count == 1 for r in responses[:-1])
        assert len({r.response_id for r in responses}) == 201

        # Messages above gRPC's 4 MiB default go through (256 MiB limits).
        metadata = [("x-fake-batches", "2"), ("x-fake-batch-bytes", str(6 * 1024 * 1024))]
        responses = await collect(stub.ExecutePlan(execute_request(session), metadata=metadata))
        assert [len(r.arrow_batch.data) for r in responses[:-1]] == [6 * 1024 * 1024] * 2

        metadata = [("x-fake-batches", "0")]
        responses = await collect(stub.ExecutePlan(execute_request(session), metadata=metadata))
        assert [r.WhichOneof("response_type") for r in responses] == ["result_complete"]


async def test_huge_stream_is_lazy_and_client_cancel_mid_stream_is_recorded(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    metadata = [("x-fake-batches", "100000"), ("x-fake-batch-bytes", str(1024 * 1024))]
    started = time.monotonic()
    call = stub.ExecutePlan(execute_request(session), metadata=metadata)
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            break
    call.cancel()
    await driver.wait_for(lambda: driver.calls[-1].cancelled)
    await driver.wait_for(lambda: driver.calls[-1].done)
    # 100 GB were asked for; only a few messages were ever made.
    assert time.monotonic() - started < 5


# ------------------------------------------------------------------------ faults


async def test_delay_then_client_cancel_marks_the_call_cancelled(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    started = time.monotonic()
    call = stub.Config(get_port_request(session), metadata=[("x-fake-delay-ms", "30000")])
    await driver.wait_for(lambda: len(driver.calls) == 1)
    assert not driver.calls[0].cancelled and not driver.calls[0].done
    call.cancel()
    await driver.wait_for(lambda: driver.calls[-1].cancelled)
    await driver.wait_for(lambda: driver.calls[-1].done)
    assert time.monotonic() - started < 5
    with pytest.raises(asyncio.CancelledError):
        await call

    # A streaming call cancelled while it is still delayed.
    call = stub.ExecutePlan(execute_request(session), metadata=[("x-fake-delay-ms", "30000")])
    await driver.wait_for(lambda: len(driver.calls) == 2)
    call.cancel()
    await driver.wait_for(lambda: driver.calls[-1].cancelled)


async def test_delay_is_applied(driver: FakeDriver, stub: Any, session: str) -> None:
    started = time.monotonic()
    r = await stub.Config(get_port_request(session), metadata=[("x-fake-delay-ms", "150")])
    assert time.monotonic() - started >= 0.15
    assert_ids(driver, r, session)
    assert driver.calls[-1].done and not driver.calls[-1].cancelled


async def test_deadline_is_recorded_and_expiry_marks_cancelled(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Config(
            get_port_request(session), metadata=[("x-fake-delay-ms", "30000")], timeout=0.5
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    record = driver.calls[-1]
    # The deadline travels as a relative grpc-timeout header: allow a little rounding.
    assert record.time_remaining is not None and 0 < record.time_remaining <= 0.55
    await driver.wait_for(lambda: record.cancelled and record.done)


async def test_status_fault_carries_details_and_trailers(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    metadata = [("x-fake-status", "INVALID_ARGUMENT"), ("x-fake-details", "boom")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Config(get_port_request(session), metadata=metadata)
    err = caught.value
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "boom")
    trailing = dict(err.trailing_metadata())
    assert trailing["x-fake-trailer"] == "kept"
    status, info = error_info(err.trailing_metadata())
    assert (status.code, status.message) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "boom")
    assert info.reason == "org.apache.spark.sql.AnalysisException"
    assert info.domain == "org.apache.spark"
    assert info.metadata["errorClass"] == "FAKE_ERROR"
    assert info.metadata["classes"] == '["org.apache.spark.sql.AnalysisException"]'
    assert driver.calls[-1].done and not driver.calls[-1].cancelled

    # Streaming method, lower-case name, default details.
    call = stub.ExecutePlan(execute_request(session), metadata=[("x-fake-status", "unavailable")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(call)
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "fake failure",
    )
    assert dict(await call.trailing_metadata())["x-fake-trailer"] == "kept"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Config(get_port_request(session), metadata=[("x-fake-status", "NOPE")])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Client streaming: the whole request stream is read, then the call fails.
    async def artifacts() -> AsyncIterator[Any]:
        for _ in range(5):
            yield base_pb2.AddArtifactsRequest(session_id=session, user_context=user_context())

    for _ in range(10):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.AddArtifacts(artifacts(), metadata=[("x-fake-status", "DATA_LOSS")])
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert dict(caught.value.trailing_metadata())["x-fake-trailer"] == "kept"
        assert (driver.calls[-1].requests, driver.calls[-1].session_id) == (5, session)


async def test_constructor_fail_status_and_delay_defaults(session: str) -> None:
    async with (
        FakeDriver(fail_status="RESOURCE_EXHAUSTED", delay_ms=50) as driver,
        grpc.aio.insecure_channel(driver.address) as channel,
    ):
        stub = make_stub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Config(get_port_request(session))
        assert time.monotonic() - started >= 0.05
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Metadata overrides the defaults.
        metadata = [("x-fake-status", "OK"), ("x-fake-delay-ms", "0")]
        r = await stub.Config(get_port_request(session), metadata=metadata)
        assert r.pairs[0].value == str(driver.port)
    with pytest.raises(ValueError):
        FakeDriver(fail_status="NOT_A_CODE")


async def test_abort_after_then_reattach_finishes_the_result(
    driver: FakeDriver, stub: Any, session: str
) -> None:
    op = str(uuid.uuid4())
    metadata = [("x-fake-batches", "5"), ("x-fake-abort-after", "2")]
    call = stub.ExecutePlan(execute_request(session, op), metadata=metadata)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in call:
            received.append(response)
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "fake abort mid-stream",
    )
    assert len(received) == 2
    assert driver.calls[-1].done and not driver.calls[-1].cancelled

    rest = await collect(
        stub.ReattachExecute(reattach_request(session, op, received[-1].response_id))
    )
    assert [r.WhichOneof("response_type") for r in rest] == ["arrow_batch"] * 3 + [
        "result_complete"
    ]
    ids = [r.response_id for r in received + rest]
    assert len(set(ids)) == 6

    # abort-after 0 aborts before the first response.
    call = stub.ExecutePlan(execute_request(session), metadata=[("x-fake-abort-after", "0")])
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(call)


async def test_trailer_echo_on_success(driver: FakeDriver, stub: Any, session: str) -> None:
    metadata = [("x-fake-trailer-echo", "v1")]
    call = stub.Config(get_port_request(session), metadata=metadata)
    await call
    assert dict(await call.initial_metadata())["x-fake-initial"] == "v1"
    assert dict(await call.trailing_metadata())["x-fake-trailer"] == "v1"

    call = stub.ExecutePlan(execute_request(session), metadata=[("x-fake-trailer-echo", "v2")])
    assert len(await collect(call)) == 2
    assert dict(await call.initial_metadata())["x-fake-initial"] == "v2"
    assert dict(await call.trailing_metadata())["x-fake-trailer"] == "v2"


async def test_metadata_is_recorded(driver: FakeDriver, stub: Any, session: str) -> None:
    metadata = [
        ("x-spark-session-id", session),
        ("x-trace-bin", b"\x00\x01"),
        ("k", "1"),
        ("k", "2"),
    ]
    await stub.Config(get_port_request(session), metadata=metadata)
    record = driver.calls[-1]
    assert record.metadata["x-spark-session-id"] == session
    assert record.metadata["x-trace-bin"] == b"\x00\x01"
    assert record.metadata["k"] == "2"
    assert "user-agent" in record.metadata
    assert isinstance(record, CallRecord)


async def test_observed_server_side_id_check_is_opt_in(session: str) -> None:
    async with (
        FakeDriver(check_observed_session_id=True) as driver,
        grpc.aio.insecure_channel(driver.address) as channel,
    ):
        stub = make_stub(channel)
        request = get_port_request(session)
        request.client_observed_server_side_session_id = driver.server_side_session_id(
            USER, session
        )
        await stub.Config(request)
        request.client_observed_server_side_session_id = str(uuid.uuid4())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Config(request)
        assert "[INVALID_HANDLE.SESSION_CHANGED]" in caught.value.details()
        _, info = error_info(caught.value.trailing_metadata())
        assert info.metadata["errorClass"] == "INVALID_HANDLE.SESSION_CHANGED"


# ------------------------------------------------------------------------ unknown methods


async def test_unknown_method_echoes_raw_messages(
    driver: FakeDriver, channel: grpc.aio.Channel, session: str
) -> None:
    assert "FutureMethod" not in KNOWN_METHODS
    first = base_pb2.ConfigRequest(
        session_id=session, user_context=user_context()
    ).SerializeToString()
    messages = [first, b"\x00\xffnot a proto", b""]
    future = channel.stream_stream(SERVICE + "FutureMethod")

    async def gen() -> AsyncIterator[bytes]:
        for m in messages:
            yield m

    call = future(gen(), metadata=[("x-fake-trailer-echo", "e")])
    assert [m async for m in call] == messages
    assert dict(await call.trailing_metadata())["x-fake-trailer"] == "e"
    record = driver.calls[-1]
    assert (record.method, record.session_id, record.user_id) == ("FutureMethod", session, USER)
    assert (record.requests, record.request_bytes) == (3, sum(map(len, messages)))
    assert record.done

    # Faults apply to unknown methods too. The driver reads the whole request stream before
    # failing: a grpc.aio client still writing when the call ends may see INTERNAL instead.
    for _ in range(20):
        call = future(gen(), metadata=[("x-fake-status", "ABORTED")])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [m async for m in call]
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert driver.calls[-1].requests == 3

    # Other services stay unimplemented.
    # (A unary call: the server rejects at once, which would race a streaming client's writes.)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary("/other.Service/Method")(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ------------------------------------------------------------------------ helpers and CLI


async def test_wait_for_times_out_with_a_helpful_message(driver: FakeDriver) -> None:
    with pytest.raises(TimeoutError) as caught:
        await driver.wait_for(lambda: driver.calls[-1].cancelled, timeout=0.05)
    message = str(caught.value)
    assert "still false after 0.05s" in message
    assert "IndexError" in message
    assert "driver.calls[-1].cancelled" in message
    assert "0 call(s) recorded" in message


async def test_a_busy_port_is_not_shared(driver: FakeDriver) -> None:
    # gRPC would bind it anyway with SO_REUSEPORT; the fake turns that off.
    with pytest.raises(OSError, match="could not bind"):
        await FakeDriver(port=driver.port).start()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_cli_serves_and_stops_on_signal(session: str, stop_signal: signal.Signals) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.fake_driver",
        "--listen",
        "127.0.0.1:0",
        "--batches",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=15)).decode()
        prefix = "fake driver listening on "
        assert line.startswith(prefix), line
        address = line[len(prefix) :].strip()
        host, _, port = address.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0

        async with grpc.aio.insecure_channel(address) as channel:
            stub = make_stub(channel)
            r = await stub.Config(get_port_request(session))
            assert r.pairs[0].value == port
            responses = await collect(stub.ExecutePlan(execute_request(session)))
            assert len(responses) == 3

        proc.send_signal(stop_signal)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=10)
        assert proc.returncode == 0, stderr.decode()
        assert b"Traceback" not in stderr, stderr.decode()
        assert stdout == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
