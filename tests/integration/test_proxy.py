"""The data plane through a real replica to fake drivers: every method, errors, streams."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc, commands_pb2, relations_pb2

from loadtest.fake_driver import FakeDriver
from registry.models import session_key
from router.server import Replica

Stub = base_pb2_grpc.SparkConnectServiceStub


_S1 = "0f0e0d0c-0b0a-4908-8706-050403020100"
_S2 = "1f1e1d1c-1b1a-4918-8716-151413121110"


def _user(uid: str = "alice") -> base_pb2.UserContext:
    return base_pb2.UserContext(user_id=uid)


def served_by(drivers: list[FakeDriver], session_id: str) -> set[str]:
    """Addresses of the drivers that saw calls of a session."""
    return {d.address for d in drivers for c in d.calls if c.session_id == session_id}


async def _binding_port(stub: Stub, session: str) -> int:
    req = base_pb2.ConfigRequest(session_id=session, user_context=_user())
    req.operation.get.keys.append("spark.connect.grpc.binding.port")
    resp = await stub.Config(req)
    return int(resp.pairs[0].value)


async def test_every_known_method_reaches_the_pinned_driver(
    stub: Stub, drivers: list[FakeDriver]
) -> None:
    s, u = str(uuid.uuid4()), _user()
    port = await _binding_port(stub, s)
    driver = next(d for d in drivers if d.port == port)
    ssid = driver.server_side_session_id("alice", s)

    plan = base_pb2.Plan(root=relations_pb2.Relation())
    op = str(uuid.uuid4())
    stream = stub.ExecutePlan(
        base_pb2.ExecutePlanRequest(session_id=s, user_context=u, plan=plan, operation_id=op)
    )
    responses = [r async for r in stream]
    assert responses[-1].HasField("result_complete")
    assert all(r.session_id == s and r.server_side_session_id == ssid for r in responses)

    reattach = stub.ReattachExecute(
        base_pb2.ReattachExecuteRequest(
            session_id=s, user_context=u, operation_id=op, last_response_id=responses[0].response_id
        )
    )
    assert [r async for r in reattach][-1].HasField("result_complete")

    analyze = await stub.AnalyzePlan(
        base_pb2.AnalyzePlanRequest(
            session_id=s, user_context=u, spark_version=base_pb2.AnalyzePlanRequest.SparkVersion()
        )
    )
    assert analyze.spark_version.version == "4.3.0-fake" and analyze.server_side_session_id == ssid

    async def chunks() -> AsyncIterator[base_pb2.AddArtifactsRequest]:
        for i in range(3):
            req = base_pb2.AddArtifactsRequest(session_id=s, user_context=u)
            req.batch.artifacts.add(
                name=f"jars/a{i}.jar",
                data=base_pb2.AddArtifactsRequest.ArtifactChunk(data=b"x" * 1000),
            )
            yield req

    added = await stub.AddArtifacts(chunks())
    assert [a.name for a in added.artifacts] == [f"jars/a{i}.jar" for i in range(3)]

    status = await stub.ArtifactStatus(
        base_pb2.ArtifactStatusesRequest(session_id=s, user_context=u, names=["jars/a0.jar"])
    )
    assert "jars/a0.jar" in status.statuses
    interrupt = await stub.Interrupt(
        base_pb2.InterruptRequest(
            session_id=s,
            user_context=u,
            interrupt_type=base_pb2.InterruptRequest.INTERRUPT_TYPE_ALL,
        )
    )
    assert interrupt.session_id == s
    released = await stub.ReleaseExecute(
        base_pb2.ReleaseExecuteRequest(
            session_id=s,
            user_context=u,
            operation_id=op,
            release_all=base_pb2.ReleaseExecuteRequest.ReleaseAll(),
        )
    )
    assert released.operation_id == op
    details = await stub.FetchErrorDetails(
        base_pb2.FetchErrorDetailsRequest(session_id=s, user_context=u, error_id=str(uuid.uuid4()))
    )
    assert details.session_id == s
    clone = await stub.CloneSession(base_pb2.CloneSessionRequest(session_id=s, user_context=u))
    assert clone.session_id == s and clone.new_session_id
    got = await stub.GetStatus(base_pb2.GetStatusRequest(session_id=s, user_context=u))
    assert got.session_id == s

    rel = await stub.ReleaseSession(base_pb2.ReleaseSessionRequest(session_id=s, user_context=u))
    assert rel.session_id == s

    methods = [c.method for c in driver.calls if c.session_id == s]
    assert set(methods) == {
        "Config",
        "ExecutePlan",
        "ReattachExecute",
        "AnalyzePlan",
        "AddArtifacts",
        "ArtifactStatus",
        "Interrupt",
        "ReleaseExecute",
        "FetchErrorDetails",
        "CloneSession",
        "GetStatus",
        "ReleaseSession",
    }
    assert served_by(drivers, s) == {driver.address}
    artifacts_call = next(c for c in driver.calls if c.method == "AddArtifacts")
    assert artifacts_call.requests == 3  # the whole client stream was forwarded
    assert artifacts_call.user_id == "alice"


async def test_released_session_is_unpinned(stub: Stub, router: Replica) -> None:
    s = str(uuid.uuid4())
    await _binding_port(stub, s)
    key = session_key("alice", s)
    assert await router.registry.get_pin(key) is not None
    await stub.ReleaseSession(base_pb2.ReleaseSessionRequest(session_id=s, user_context=_user()))
    assert await router.registry.get_pin(key) is None
    assert router.placement.cache.get(key) is None


async def test_sessions_stick_and_spread(stub: Stub, drivers: list[FakeDriver]) -> None:
    sessions = [str(uuid.uuid4()) for _ in range(40)]
    for _ in range(3):
        await asyncio.gather(*(_binding_port(stub, s) for s in sessions))
    owners = [served_by(drivers, s) for s in sessions]
    assert all(len(o) == 1 for o in owners), "a session reached two drivers"
    assert {next(iter(o)) for o in owners} == {d.address for d in drivers}


async def test_header_routes_when_body_agrees(
    channel: grpc.aio.Channel, drivers: list[FakeDriver]
) -> None:
    s = str(uuid.uuid4())
    req = base_pb2.ConfigRequest(session_id=s, user_context=_user())
    req.operation.get.keys.append("spark.connect.grpc.binding.port")
    await Stub(channel).Config(req, metadata=(("x-spark-session-id", s),))
    call = next(c for d in drivers for c in d.calls if c.session_id == s)
    assert call.metadata["x-spark-session-id"] == s  # forwarded untouched


async def test_unknown_method_is_forwarded(
    channel: grpc.aio.Channel, drivers: list[FakeDriver]
) -> None:
    s = str(uuid.uuid4())
    body = base_pb2.ConfigRequest(session_id=s, user_context=_user()).SerializeToString()
    call = channel.stream_stream("/spark.connect.SparkConnectService/FutureMethod")

    async def reqs() -> AsyncIterator[bytes]:
        yield body
        yield b"\x0a\x01z"

    echoed = [r async for r in call(reqs())]
    assert echoed == [body, b"\x0a\x01z"]
    assert any(c.method == "FutureMethod" for d in drivers for c in d.calls)


async def test_method_outside_the_service_is_unimplemented(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary("/other.Service/Config")(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("body", "metadata", "message"),
    [
        (base_pb2.ConfigRequest().SerializeToString(), (), "no session id"),
        (
            base_pb2.ConfigRequest(session_id="a").SerializeToString(),
            (("x-spark-session-id", "b"),),
            "name different sessions",
        ),
        (b"\x0a\xff\x01", (), "not a valid Spark Connect message"),
        (
            base_pb2.ConfigRequest(session_id="../../etc/passwd").SerializeToString(),
            (),
            "not a UUID",
        ),
        (
            base_pb2.ConfigRequest(
                session_id=_S1, user_context=_user("u" * 300)
            ).SerializeToString(),
            (),
            "user_id is 300 characters long",
        ),
        (
            base_pb2.ConfigRequest(session_id=_S1).SerializeToString(),
            (("x-spark-session-id", _S1), ("x-spark-session-id", _S2)),
            "'x-spark-session-id' was sent 2 times with different values",
        ),
        (
            base_pb2.ConfigRequest(session_id=_S1).SerializeToString(),
            (("x-spark-pool", "a"), ("x-spark-pool", "b")),
            "'x-spark-pool' was sent 2 times",
        ),
    ],
)
async def test_bad_input_is_invalid_argument(
    channel: grpc.aio.Channel, body: bytes, metadata: tuple[tuple[str, str], ...], message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary("/spark.connect.SparkConnectService/Config")(
            body, metadata=metadata
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")


async def test_a_header_repeated_with_one_value_is_fine(stub: Stub) -> None:
    req = base_pb2.ConfigRequest(session_id=_S1, user_context=_user())
    req.operation.get.keys.append("spark.connect.grpc.binding.port")
    md = (("x-spark-session-id", _S1), ("x-spark-session-id", _S1))
    assert (await stub.Config(req, metadata=md, timeout=10)).pairs


async def test_empty_client_stream_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    async def nothing() -> AsyncIterator[bytes]:
        return
        yield b""

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.stream_unary("/spark.connect.SparkConnectService/AddArtifacts")(nothing())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "without a request" in (err.value.details() or "")


async def test_driver_errors_arrive_intact(stub: Stub) -> None:
    s = str(uuid.uuid4())
    md = (("x-fake-status", "FAILED_PRECONDITION"), ("x-fake-details", "[FAKE_ERROR] boom"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AnalyzePlan(
            base_pb2.AnalyzePlanRequest(
                session_id=s, spark_version=base_pb2.AnalyzePlanRequest.SparkVersion()
            ),
            metadata=md,
        )
    e = err.value
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.details() == "[FAKE_ERROR] boom"
    trailers = dict(e.trailing_metadata() or ())
    assert trailers["x-fake-trailer"] == "kept"
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.metadata["errorClass"] == "FAKE_ERROR"


async def test_stream_errors_and_success_metadata_arrive_intact(stub: Stub) -> None:
    s = str(uuid.uuid4())
    req = base_pb2.ExecutePlanRequest(
        session_id=s, plan=base_pb2.Plan(root=relations_pb2.Relation())
    )
    call = stub.ExecutePlan(req, metadata=(("x-fake-batches", "5"), ("x-fake-abort-after", "3")))
    got = 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            got += 1
    assert got == 3 and err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "fake abort mid-stream" in (err.value.details() or "")

    call = stub.ExecutePlan(req, metadata=(("x-fake-trailer-echo", "v1"),))
    _ = [r async for r in call]
    assert dict(await call.initial_metadata())["x-fake-initial"] == "v1"
    assert dict(await call.trailing_metadata())["x-fake-trailer"] == "v1"
    assert await call.code() == grpc.StatusCode.OK


async def test_client_cancel_reaches_the_driver(stub: Stub, drivers: list[FakeDriver]) -> None:
    s = str(uuid.uuid4())
    req = base_pb2.ConfigRequest(session_id=s)
    req.operation.get_all.SetInParent()
    call = stub.Config(req, metadata=(("x-fake-delay-ms", "30000"),))
    record = await _wait_for_call(drivers, s, "Config")
    call.cancel()
    await _driver_of(drivers, s).wait_for(lambda: record.cancelled and record.done, timeout=10)

    s2 = str(uuid.uuid4())
    stream = stub.ExecutePlan(
        base_pb2.ExecutePlanRequest(
            session_id=s2, plan=base_pb2.Plan(root=relations_pb2.Relation())
        ),
        metadata=(("x-fake-batches", "100000"), ("x-fake-batch-bytes", "65536")),
    )
    await stream.read()  # the stream is flowing
    record2 = await _wait_for_call(drivers, s2, "ExecutePlan")
    stream.cancel()
    await _driver_of(drivers, s2).wait_for(lambda: record2.cancelled and record2.done, timeout=10)


async def test_deadline_propagates(stub: Stub, drivers: list[FakeDriver]) -> None:
    s = str(uuid.uuid4())
    req = base_pb2.ConfigRequest(session_id=s)
    req.operation.get_all.SetInParent()
    await stub.Config(req, timeout=7.0)
    record = await _wait_for_call(drivers, s, "Config")
    # grpc-timeout is encoded with limited precision and rounded up: allow a few ms over.
    assert record.time_remaining is not None and 5.0 < record.time_remaining < 7.05

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Config(req, timeout=0.5, metadata=(("x-fake-delay-ms", "30000"),))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    driver = _driver_of(drivers, s)
    late = driver.calls[-1]
    await driver.wait_for(lambda: late.done and late.cancelled, timeout=10)


async def test_unreachable_only_driver_fails_fast_naming_it(drivers: list[FakeDriver]) -> None:
    from router.config import load_settings
    from tests.helpers import free_port

    dead = f"127.0.0.1:{free_port()}"
    settings = load_settings(listen="127.0.0.1:0", drivers=[dead])
    async with (
        Replica(settings) as replica,
        grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as ch,
    ):
        req = base_pb2.ConfigRequest(session_id=str(uuid.uuid4()))
        req.operation.get_all.SetInParent()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await Stub(ch).Config(req, timeout=10)
        # Confirmed down, nowhere to move: not UNAVAILABLE, which pyspark retries for minutes.
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"driver {dead} is down" in (err.value.details() or "")


async def test_100_mb_stream_passes(stub: Stub) -> None:
    s = str(uuid.uuid4())
    stream = stub.ExecutePlan(
        base_pb2.ExecutePlanRequest(
            session_id=s, plan=base_pb2.Plan(root=relations_pb2.Relation())
        ),
        metadata=(("x-fake-batches", "100"), ("x-fake-batch-bytes", str(1024 * 1024))),
    )
    total = batches = 0
    async for r in stream:
        if r.HasField("arrow_batch"):
            batches += 1
            total += len(r.arrow_batch.data)
    assert batches == 100 and total == 100 * 1024 * 1024


async def test_large_single_messages_up_to_the_cap(stub: Stub) -> None:
    # 100 MiB in one request and one response: the router must not cap below 128 MiB.
    s = str(uuid.uuid4())
    cmd = base_pb2.Plan(command=commands_pb2.Command())
    cmd.command.sql_command.sql = "x" * (100 * 1024 * 1024)
    stream = stub.ExecutePlan(
        base_pb2.ExecutePlanRequest(session_id=s, plan=cmd),
        metadata=(("x-fake-batches", "1"), ("x-fake-batch-bytes", str(100 * 1024 * 1024))),
    )
    sizes = [len(r.arrow_batch.data) async for r in stream if r.HasField("arrow_batch")]
    assert sizes == [100 * 1024 * 1024]


async def _wait_for_call(drivers: list[FakeDriver], session: str, method: str) -> object:
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        for d in drivers:
            for c in d.calls:
                if c.session_id == session and c.method == method:
                    return c
        await asyncio.sleep(0.01)
    raise AssertionError(f"{method} of {session} never reached a driver")


def _driver_of(drivers: list[FakeDriver], session: str) -> FakeDriver:
    return next(d for d in drivers if any(c.session_id == session for c in d.calls))


async def test_oversize_metadata_is_refused_clearly(
    channel: grpc.aio.Channel, stub: Stub, drivers: list[FakeDriver]
) -> None:
    s = str(uuid.uuid4())
    req = base_pb2.ConfigRequest(session_id=s)
    req.operation.get_all.SetInParent()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Config(req, metadata=(("x-big", "a" * 100_000),), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "metadata size exceeds" in (err.value.details() or "")
    assert not [c for d in drivers for c in d.calls if c.session_id == s]  # stopped at the router
    await stub.Config(req, timeout=10)  # and the replica carries on
