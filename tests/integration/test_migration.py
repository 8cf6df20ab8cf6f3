"""Moving sessions off dead drivers, with fake drivers: identity, cleanup calls, journal."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

from loadtest.fake_driver import FakeDriver
from registry.models import DrainMode, DriverState, session_key
from router.config import load_settings
from router.server import Replica
from tests.helpers import eventually

Stub = base_pb2_grpc.SparkConnectServiceStub
PORT_KEY = "spark.connect.grpc.binding.port"


@pytest.fixture
async def setup() -> AsyncIterator[tuple[list[FakeDriver], Replica, Stub]]:
    """Two fake drivers that check the observed server-side id, like Spark, and a replica."""
    drivers = [FakeDriver(check_observed_session_id=True) for _ in range(2)]
    for d in drivers:
        await d.start()
    replica = Replica(load_settings(listen="127.0.0.1:0", drivers=[d.address for d in drivers]))
    await replica.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
    yield drivers, replica, Stub(channel)
    await channel.close()
    await replica.stop(0)
    for d in drivers:
        await d.stop()


def _config(
    session: str, observed: str | None, *keys: str, user: str = ""
) -> base_pb2.ConfigRequest:
    req = base_pb2.ConfigRequest(session_id=session)
    req.user_context.user_id = user
    if observed is not None:
        req.client_observed_server_side_session_id = observed
    req.operation.get.keys.extend(keys or (PORT_KEY,))
    return req


async def test_cleanup_call_without_identity_does_not_move_and_identity_is_kept(
    setup: tuple[list[FakeDriver], Replica, Stub],
) -> None:
    drivers, replica, stub = setup
    s = str(uuid.uuid4())
    set_conf = base_pb2.ConfigRequest(session_id=s)
    set_conf.operation.set.pairs.add(key="spark.sql.shuffle.partitions", value="7")
    first = await stub.Config(set_conf)
    original = first.server_side_session_id
    port = int((await stub.Config(_config(s, original))).pairs[0].value)
    home = next(d for d in drivers if d.port == port)
    other = next(d for d in drivers if d is not home)
    await home.stop()

    # pyspark's background ReleaseExecute carries no observed id: answered, not moved.
    released = await stub.ReleaseExecute(
        base_pb2.ReleaseExecuteRequest(
            session_id=s,
            operation_id="op-1",
            release_all=base_pb2.ReleaseExecuteRequest.ReleaseAll(),
        ),
        timeout=10,
    )
    assert released.operation_id == "op-1" and released.server_side_session_id == ""
    pin = await replica.registry.get_pin(s)
    assert pin is not None and pin.driver == home.address

    # The next real call moves it, replays its conf and keeps the id the client knows.
    got = await stub.Config(
        _config(s, original, PORT_KEY, "spark.sql.shuffle.partitions"), timeout=10
    )
    assert got.server_side_session_id == original
    assert [p.value for p in got.pairs] == [str(other.port), "7"]
    assert (
        replica.telemetry.value(
            "spark_router_sessions_moved_total", pool="default", reason="driver_down"
        )
        == 1
    )


async def test_no_driver_left_names_the_dead_one(
    setup: tuple[list[FakeDriver], Replica, Stub],
) -> None:
    drivers, _, stub = setup
    s = str(uuid.uuid4())
    await stub.Config(_config(s, None))
    for d in drivers:
        await d.stop()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Config(_config(s, None), timeout=10)
    details = err.value.details() or ""
    # Either both are known down already (no live driver: FAILED_PRECONDITION), or the retry
    # found the second one dead too (UNAVAILABLE, naming it).
    assert err.value.code() in (
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAVAILABLE,
    ), details
    assert any(f"driver {d.address}" in details for d in drivers), details


class HoldingDriver(FakeDriver):
    """A fake driver that keeps each ExecutePlan stream open after its last message."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def ExecutePlan(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for response in super().ExecutePlan(request, context):
            yield response
        await self.release.wait()


async def test_state_is_journaled_even_if_the_client_ends_the_stream_at_once() -> None:
    driver = HoldingDriver()
    await driver.start()
    replica = Replica(load_settings(listen="127.0.0.1:0", drivers=[driver.address]))
    await replica.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            s = str(uuid.uuid4())
            view = base_pb2.Plan()
            view.command.create_dataframe_view.name = "v"
            view.command.create_dataframe_view.replace = True
            view.command.create_dataframe_view.input.range.end = 3
            call = Stub(channel).ExecutePlan(base_pb2.ExecutePlanRequest(session_id=s, plan=view))
            async for response in call:
                if response.HasField("result_complete"):
                    call.cancel()  # what a client may do once it has its result
                    break
        entries = await replica.registry.journal(s)
        assert entries is not None and len(entries) == 1
    finally:
        driver.release.set()
        await replica.stop(0)
        await driver.stop()


async def _home_and_other(
    drivers: list[FakeDriver], stub: Stub, s: str
) -> tuple[str, FakeDriver, FakeDriver]:
    """Open session `s` with a conf set: (its server-side id, its driver, the other one)."""
    set_conf = base_pb2.ConfigRequest(session_id=s)
    set_conf.operation.set.pairs.add(key="spark.sql.shuffle.partitions", value="7")
    set_conf.user_context.user_id = "ann"
    original = (await stub.Config(set_conf)).server_side_session_id
    port = int((await stub.Config(_config(s, original, user="ann"))).pairs[0].value)
    home = next(d for d in drivers if d.port == port)
    return original, home, next(d for d in drivers if d is not home)


async def _drained(replica: Replica, address: str, mode: DrainMode) -> None:
    await replica.registry.set_draining(address, True, mode)
    await eventually(
        lambda: replica.placement.rings.drivers[address].state is DriverState.DRAINING,
        "the replica to see the drain mark",
    )


async def test_move_idle_moves_a_session_on_its_next_fresh_call(
    setup: tuple[list[FakeDriver], Replica, Stub],
) -> None:
    drivers, replica, stub = setup
    s = str(uuid.uuid4())
    original, home, other = await _home_and_other(drivers, stub, s)
    # A stream of the session is open here when the drain mark arrives.
    slow = stub.ExecutePlan(
        base_pb2.ExecutePlanRequest(
            session_id=s,
            client_observed_server_side_session_id=original,
            user_context=base_pb2.UserContext(user_id="ann"),
        ),
        metadata=[("x-fake-delay-ms", "5000")],
    )
    reading = asyncio.ensure_future(slow.read())
    await eventually(
        lambda: any(c.method == "ExecutePlan" and c.session_id == s for c in home.calls),
        "the stream to reach the driver",
    )
    await _drained(replica, home.address, DrainMode.MOVE_IDLE)

    # While the stream is open, a fresh call does not move the session either.
    got = await stub.Config(_config(s, original, user="ann"), timeout=10)
    assert got.pairs[0].value == str(home.port)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    key = session_key("ann", s)
    await eventually(lambda: key not in replica.proxy.open_streams, "the stream to end")

    # A cleanup call continues what runs on the old driver: the session stays.
    await stub.ReleaseExecute(
        base_pb2.ReleaseExecuteRequest(
            session_id=s,
            operation_id="op-1",
            client_observed_server_side_session_id=original,
            user_context=base_pb2.UserContext(user_id="ann"),
            release_all=base_pb2.ReleaseExecuteRequest.ReleaseAll(),
        ),
        timeout=10,
    )
    assert (await replica.registry.get_pin(session_key("ann", s))).driver == home.address  # type: ignore[union-attr]

    # Idle now: the next fresh call moves it, with its conf and the id the client knows.
    got = await stub.Config(
        _config(s, original, PORT_KEY, "spark.sql.shuffle.partitions", user="ann")
    )
    assert got.server_side_session_id == original
    assert [p.value for p in got.pairs] == [str(other.port), "7"]
    pin = await replica.registry.get_pin(session_key("ann", s))
    assert pin is not None and pin.driver == other.address and pin.moves == 1
    assert pin.owner == "ann"
    assert (
        replica.telemetry.value("spark_router_sessions_moved_total", pool="default", reason="drain")
        == 1
    )
    # ... and the driver it left is told to release it.
    await eventually(
        lambda: any(c.method == "ReleaseSession" and c.session_id == s for c in home.calls),
        "a ReleaseSession on the drained driver",
    )
    assert await replica.registry.sessions(home.address) == []


async def test_plain_drain_keeps_sessions_where_they_are(
    setup: tuple[list[FakeDriver], Replica, Stub],
) -> None:
    drivers, replica, stub = setup
    s = str(uuid.uuid4())
    original, home, _ = await _home_and_other(drivers, stub, s)
    await _drained(replica, home.address, DrainMode.KEEP)
    got = await stub.Config(_config(s, original, user="ann"), timeout=10)
    assert got.pairs[0].value == str(home.port)
    fresh = str(uuid.uuid4())
    got = await stub.Config(_config(fresh, None), timeout=10)
    assert got.pairs[0].value != str(home.port)  # new sessions go elsewhere


async def test_an_operator_move_keeps_identity_learned_from_the_driver(
    setup: tuple[list[FakeDriver], Replica, Stub],
) -> None:
    drivers, replica, stub = setup
    s = str(uuid.uuid4())
    original, home, other = await _home_and_other(drivers, stub, s)
    pin = await replica.proxy.move_session(session_key("ann", s))
    assert pin.driver == other.address and pin.server_side_id == original and pin.moves == 1
    got = await stub.Config(
        _config(s, original, PORT_KEY, "spark.sql.shuffle.partitions", user="ann")
    )
    assert got.server_side_session_id == original
    assert [p.value for p in got.pairs] == [str(other.port), "7"]
    assert any(c.method == "ReleaseSession" and c.session_id == s for c in home.calls)
    assert (
        replica.telemetry.value("spark_router_sessions_moved_total", pool="default", reason="admin")
        == 1
    )
    with pytest.raises(LookupError):
        await replica.proxy.move_session("no-such-session")


class ReleaseRecordingDriver(FakeDriver):
    """A fake driver that keeps every ReleaseExecute it gets, and can hold them."""

    def __init__(self) -> None:
        super().__init__()
        self.releases: list[str] = []  # response id released until, or "all"
        self.gate = asyncio.Event()

    async def ReleaseExecute(self, request: Any, context: Any) -> Any:
        await self.gate.wait()
        which = request.WhichOneof("release")
        self.releases.append("all" if which == "release_all" else request.release_until.response_id)
        return await super().ReleaseExecute(request, context)


async def test_release_until_calls_are_answered_at_once_and_coalesced() -> None:
    driver = ReleaseRecordingDriver()
    await driver.start()
    replica = Replica(load_settings(listen="127.0.0.1:0", drivers=[driver.address]))
    await replica.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            stub = Stub(channel)
            s = str(uuid.uuid4())

            def until(n: int) -> base_pb2.ReleaseExecuteRequest:
                req = base_pb2.ReleaseExecuteRequest(session_id=s, operation_id="op-1")
                req.release_until.response_id = f"r{n}"
                return req

            # The driver holds releases: every answer still comes at once, from the router.
            for n in range(20):
                got = await stub.ReleaseExecute(until(n), timeout=5)
                assert got.operation_id == "op-1" and got.session_id == s
            driver.gate.set()
            await eventually(lambda: driver.releases[-1:] == ["r19"], "the newest release")
            # Only the first (in flight while the others came) and the newest reached it.
            assert driver.releases == ["r0", "r19"]
            assert replica.telemetry.value("spark_router_release_executes_coalesced_total") == 18
            release_all = base_pb2.ReleaseExecuteRequest(session_id=s, operation_id="op-1")
            release_all.release_all.SetInParent()
            await stub.ReleaseExecute(release_all, timeout=5)
            assert driver.releases == ["r0", "r19", "all"]  # release_all goes through itself
    finally:
        await replica.stop(0)
        await driver.stop()


async def test_a_client_that_never_sends_its_observed_id_keeps_its_identity_through_moves() -> None:
    """Drained with move-idle, then moved off a dead driver: the first id in every answer."""
    drivers = [FakeDriver(check_observed_session_id=True) for _ in range(3)]
    for d in drivers:
        await d.start()
    settings = load_settings(listen="127.0.0.1:0", drivers=[d.address for d in drivers])
    replica = Replica(settings)
    await replica.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            stub = Stub(channel)
            s = str(uuid.uuid4())
            set_conf = base_pb2.ConfigRequest(session_id=s)
            set_conf.operation.set.pairs.add(key="spark.sql.shuffle.partitions", value="7")
            original = (await stub.Config(set_conf)).server_side_session_id
            port = int((await stub.Config(_config(s, None))).pairs[0].value)
            home = next(d for d in drivers if d.port == port)
            # The router learned the id from the first answer and wrote it into the pin.
            for _ in range(200):  # the replica's tick writes it (membership_poll_seconds)
                pin = await replica.registry.get_pin(s)
                if pin is not None and pin.seen_id == original:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the learned id never reached the registry: {pin}")

            await _drained(replica, home.address, DrainMode.MOVE_IDLE)
            got = await stub.Config(_config(s, None, PORT_KEY, "spark.sql.shuffle.partitions"))
            assert got.server_side_session_id == original
            assert got.pairs[0].value != str(home.port) and got.pairs[1].value == "7"
            second = next(d for d in drivers if str(d.port) == got.pairs[0].value)

            await second.stop()  # dead: the next call moves it again
            got = await stub.Config(_config(s, None, PORT_KEY, "spark.sql.shuffle.partitions"))
            assert got.server_side_session_id == original
            assert got.pairs[0].value not in (str(home.port), str(second.port))
            assert got.pairs[1].value == "7"
            # A stream's every answer shows the first id too.
            stream = stub.ExecutePlan(base_pb2.ExecutePlanRequest(session_id=s))
            ids = {r.server_side_session_id async for r in stream}
            assert ids == {original}
            pin = await replica.registry.get_pin(s)
            assert pin is not None and pin.moves == 2 and pin.server_side_id == original
    finally:
        await replica.stop(0)
        for d in drivers:
            await d.stop()
