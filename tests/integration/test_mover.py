"""The mover with fake drivers: each caller's move, failed replays, racing replicas."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

from loadtest.fake_driver import FakeDriver
from registry.base import Registry
from registry.models import Pin, session_key
from router.config import Settings, load_settings
from router.server import Replica
from router.sessions.migration import Mover, Reason
from tests.helpers import eventually

Stub = base_pb2_grpc.SparkConnectServiceStub
PORT_KEY = "spark.connect.grpc.binding.port"
CONFS = {"spark.a": "1", "spark.b": "2", "spark.c": "3"}  # one journal entry each
USER = "ann"


class GatedDriver(FakeDriver):
    """A fake driver that checks observed ids like Spark and can hold calls at a gate.

    Held: Config set calls (what a replay sends here) and ReleaseSession; `held` names each
    call that reached the gate, open or not.
    """

    def __init__(self) -> None:
        super().__init__(check_observed_session_id=True)
        self.gate = asyncio.Event()
        self.gate.set()
        self.held: list[str] = []

    async def _at_gate(self, method: str) -> None:
        self.held.append(method)
        await self.gate.wait()

    async def Config(self, request: Any, context: Any) -> Any:
        if request.operation.WhichOneof("op_type") == "set":
            await self._at_gate("Config")
        return await super().Config(request, context)

    async def ReleaseSession(self, request: Any, context: Any) -> Any:
        await self._at_gate("ReleaseSession")
        return await super().ReleaseSession(request, context)


@dataclass
class Env:
    drivers: list[GatedDriver]
    replica: Replica
    stub: Stub
    mover: Mover  # a mover of its own, on the replica's registry, placement and channels


def _mover(replica: Replica) -> Mover:
    return Mover(
        replica.placement,
        replica.registry,
        replica.upstreams,
        replica.settings.migration,
        replica.telemetry,
    )


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    """Two gated fake drivers, a replica in front of them, a client stub and a mover."""
    drivers = [GatedDriver() for _ in range(2)]
    for d in drivers:
        await d.start()
    replica = Replica(load_settings(listen="127.0.0.1:0", drivers=[d.address for d in drivers]))
    await replica.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
    yield Env(drivers, replica, Stub(channel), _mover(replica))
    for d in drivers:
        d.gate.set()
    await channel.close()
    await replica.stop(0)
    for d in drivers:
        await d.stop()


def _get(session: str, observed: str | None, *keys: str) -> base_pb2.ConfigRequest:
    req = base_pb2.ConfigRequest(session_id=session)
    req.user_context.user_id = USER
    if observed is not None:
        req.client_observed_server_side_session_id = observed
    req.operation.get.keys.extend(keys)
    return req


async def _open(stub: Stub, drivers: Sequence[GatedDriver], s: str) -> tuple[str, Any, Any]:
    """Open session `s` with CONFS set: (its server-side id, its driver, the other one)."""
    observed = None
    for key, value in CONFS.items():
        req = base_pb2.ConfigRequest(session_id=s)
        req.user_context.user_id = USER
        if observed is not None:
            req.client_observed_server_side_session_id = observed
        req.operation.set.pairs.add(key=key, value=value)
        observed = (await stub.Config(req, timeout=10)).server_side_session_id
    assert observed
    port = int((await stub.Config(_get(s, observed, PORT_KEY), timeout=10)).pairs[0].value)
    home = next(d for d in drivers if d.port == port)
    return observed, home, next(d for d in drivers if d is not home)


def _calls(driver: FakeDriver, s: str, method: str) -> int:
    return sum(1 for c in driver.calls if c.session_id == s and c.method == method)


async def _confs_on(driver: FakeDriver, s: str) -> dict[str, str | None]:
    """CONFS as `driver` holds them for session `s` (asked directly, not through the router)."""
    async with grpc.aio.insecure_channel(driver.address) as channel:
        req = base_pb2.ConfigRequest(session_id=s)
        req.user_context.user_id = USER
        req.operation.get_option.keys.extend(CONFS)
        got = await Stub(channel).Config(req, timeout=10)
    return {p.key: p.value if p.HasField("value") else None for p in got.pairs}


def _moved(replica: Replica, reason: str) -> float:
    return replica.telemetry.value(
        "spark_router_sessions_moved_total", pool="default", reason=reason
    )


def _failed(replica: Replica, reason: str) -> float:
    return replica.telemetry.value(
        "spark_router_replays_failed_total", pool="default", reason=reason
    )


async def _pin(replica: Replica, s: str) -> Pin:
    pin = await replica.registry.get_pin(session_key(USER, s))
    assert pin is not None
    return pin


# --- each caller's move ---------------------------------------------------------------------


async def test_a_dead_drivers_session_keeps_its_identity_and_its_driver_is_not_told(
    env: Env,
) -> None:
    s = str(uuid.uuid4())
    original, home, other = await _open(env.stub, env.drivers, s)
    pin, moved_here = await env.mover.move(
        await _pin(env.replica, s), Reason.DRIVER_DOWN, observed=original
    )
    assert moved_here and (pin.driver, pin.server_side_id, pin.moves) == (
        other.address,
        original,
        1,
    )
    assert await _pin(env.replica, s) == pin
    assert _calls(other, s, "Config") == len(CONFS)  # the journal, replayed once
    assert await _confs_on(other, s) == CONFS
    # The client carries on with the id it knows (the fake checks it, like Spark).
    got = await env.stub.Config(_get(s, original, PORT_KEY), timeout=10)
    assert (got.server_side_session_id, got.pairs[0].value) == (original, str(other.port))
    assert "ReleaseSession" not in home.held  # a dead driver is not asked to release
    assert _moved(env.replica, "driver_down") == 1
    assert _moved(env.replica, "drain") == _moved(env.replica, "admin") == 0


async def test_a_drained_session_moves_and_its_old_driver_releases_it_in_the_background(
    env: Env,
) -> None:
    s = str(uuid.uuid4())
    original, home, other = await _open(env.stub, env.drivers, s)
    home.gate.clear()  # the old driver takes its time to release
    pin, moved_here = await env.mover.move(
        await _pin(env.replica, s),
        Reason.DRAIN,
        observed=original,
        metadata=[("x-moved-by", "a-call")],
    )
    assert moved_here and (pin.driver, pin.server_side_id) == (other.address, original)
    # Spark refuses a released id for good: the pin remembers where, for later moves to avoid.
    stored = await _pin(env.replica, s)
    assert stored.moved_off == stored.released_on == (home.address,)
    assert await _confs_on(other, s) == CONFS
    # The move returned; the release is on its way and still held by the old driver.
    await eventually(lambda: "ReleaseSession" in home.held, "the release to reach the old driver")
    assert _calls(home, s, "ReleaseSession") == 0
    home.gate.set()
    await eventually(lambda: _calls(home, s, "ReleaseSession") == 1, "the release to complete")
    [release] = [c for c in home.calls if c.method == "ReleaseSession"]
    assert release.metadata.get("x-moved-by") == "a-call"  # the moving call's metadata
    assert _moved(env.replica, "drain") == 1


async def test_an_operator_move_learns_the_identity_and_waits_for_the_release(
    env: Env,
) -> None:
    s = str(uuid.uuid4())
    original, home, other = await _open(env.stub, env.drivers, s)
    pin = await _pin(env.replica, s)
    assert pin.server_side_id is None  # never moved: the mover must ask the driver
    home.gate.clear()
    moving = asyncio.ensure_future(env.mover.move(pin, Reason.ADMIN))
    await eventually(lambda: "ReleaseSession" in home.held, "the release to reach the old driver")
    assert not moving.done()  # the operator's answer waits for the old driver
    home.gate.set()
    new, moved_here = await asyncio.wait_for(moving, 10)
    assert moved_here and (new.driver, new.server_side_id) == (other.address, original)
    assert _calls(home, s, "ReleaseSession") == 1
    assert await _confs_on(other, s) == CONFS
    assert _moved(env.replica, "admin") == 1


async def test_an_overflowed_journal_moves_strictly_or_not_at_all(env: Env) -> None:
    s = str(uuid.uuid4())
    original, _, other = await _open(env.stub, env.drivers, s)
    assert not await env.replica.registry.journal_append(
        session_key(USER, s), b"too big", 1
    )  # overflowed now
    pin = await _pin(env.replica, s)
    # A drain could not go unnoticed: the session stays.
    assert await env.mover.move(pin, Reason.DRAIN, observed=original) == (pin, False)
    assert await _pin(env.replica, s) == pin
    # Its driver down, it moves without state or identity: Spark says SESSION_CHANGED.
    new, moved_here = await env.mover.move(pin, Reason.DRIVER_DOWN, observed=original)
    assert moved_here and (new.driver, new.server_side_id) == (other.address, None)
    assert _calls(other, s, "Config") == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.Config(_get(s, original, PORT_KEY), timeout=10)
    assert "INVALID_HANDLE.SESSION_CHANGED" in (err.value.details() or "")
    assert _failed(env.replica, "driver_down") == 0  # nothing was tried, nothing failed


# --- a replay that fails half-way -----------------------------------------------------------


async def test_a_replay_failing_half_way_is_resumed_and_the_session_is_whole(env: Env) -> None:
    s = str(uuid.uuid4())
    original, home, other = await _open(env.stub, env.drivers, s)
    other.fail_next("Config", "UNAVAILABLE", after=1, times=1, session_id=s)
    await home.stop()
    # The client's next call finds its driver dead: moved, replayed, retried, answered.
    got = await env.stub.Config(_get(s, original, *CONFS), timeout=10)
    assert got.server_side_session_id == original
    assert {p.key: p.value for p in got.pairs} == CONFS
    # Three replayed calls, the failed second one once more (not the whole journal again),
    # and the client's call.
    assert _calls(other, s, "Config") == len(CONFS) + 1 + 1
    assert (await _pin(env.replica, s)).server_side_id == original
    assert _moved(env.replica, "driver_down") == 1
    assert _failed(env.replica, "driver_down") == 0


async def test_a_replay_that_fails_again_ends_in_session_changed_and_is_counted(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    s = str(uuid.uuid4())
    original, home, other = await _open(env.stub, env.drivers, s)
    other.fail_next("Config", "UNAVAILABLE", after=1, times=2, session_id=s)
    await home.stop()
    with caplog.at_level(logging.WARNING, logger="router.sessions.migration"):
        # Not UNAVAILABLE (pyspark would retry it onto a half-built session): Spark's own
        # error, because the router no longer shows the client its old id.
        for _ in range(2):  # and a retry by the client does not get through either
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await env.stub.Config(_get(s, original, *CONFS), timeout=10)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "INVALID_HANDLE.SESSION_CHANGED" in (err.value.details() or "")
    pin = await _pin(env.replica, s)
    assert (pin.driver, pin.server_side_id) == (other.address, None)
    assert (
        env.replica.placement.cache.peek(session_key(USER, s)) == pin
    )  # this replica stopped rewriting too
    assert _failed(env.replica, "driver_down") == 1
    warnings = [r for r in caplog.records if r.name == "router.sessions.migration"]
    assert len(warnings) == 1 and "SESSION_CHANGED" in warnings[0].getMessage()
    # The first replayed call went through, the second failed twice, the third never ran.
    assert await _confs_on(other, s) == {"spark.a": "1", "spark.b": None, "spark.c": None}


async def test_a_move_finishes_its_replay_when_its_caller_goes_away(env: Env) -> None:
    s = str(uuid.uuid4())
    original, _, other = await _open(env.stub, env.drivers, s)
    other.gate.clear()
    moving = asyncio.ensure_future(
        env.mover.move(await _pin(env.replica, s), Reason.DRIVER_DOWN, observed=original)
    )
    await eventually(lambda: "Config" in other.held, "the replay to reach the new driver")
    moving.cancel()  # the client that caused the move hangs up mid-replay
    with pytest.raises(asyncio.CancelledError):
        await moving
    other.gate.set()
    await eventually(lambda: _calls(other, s, "Config") == len(CONFS), "the whole replay")
    assert await _confs_on(other, s) == CONFS
    assert (await _pin(env.replica, s)).server_side_id == original


async def test_a_second_move_of_a_session_on_one_replica_waits_for_the_first(env: Env) -> None:
    s = str(uuid.uuid4())
    original, _, other = await _open(env.stub, env.drivers, s)
    stale = await _pin(env.replica, s)
    other.gate.clear()
    first = asyncio.ensure_future(env.mover.move(stale, Reason.DRIVER_DOWN, observed=original))
    await eventually(lambda: "Config" in other.held, "the replay to reach the new driver")
    replayed_when_done: list[int] = []
    second = asyncio.ensure_future(env.mover.move(stale, Reason.DRIVER_DOWN, observed=original))
    second.add_done_callback(lambda _: replayed_when_done.append(_calls(other, s, "Config")))
    # Time enough for a second move that did not wait to lose its compare-and-set and return.
    await asyncio.wait({second}, timeout=0.5)
    other.gate.set()
    (pin1, moved1), (pin2, moved2) = await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert (moved1, moved2) == (True, False) and pin1 == pin2
    assert replayed_when_done == [len(CONFS)]  # it returned only once the state was there
    assert _calls(other, s, "Config") == len(CONFS)
    assert _moved(env.replica, "driver_down") == 1


# --- two replicas, one registry ---------------------------------------------------------------


def _redis_settings(redis_url: str, drivers: Sequence[FakeDriver]) -> Settings:
    return load_settings(
        listen="127.0.0.1:0", registry=redis_url, drivers=[d.address for d in drivers]
    )


@dataclass
class Cluster:
    drivers: list[GatedDriver]
    replicas: list[Replica]
    stubs: list[Stub]


@pytest.fixture
async def cluster(redis_url: str) -> AsyncIterator[Cluster]:
    """Two replicas sharing one Redis registry, in front of the same two gated drivers."""
    drivers = [GatedDriver() for _ in range(2)]
    for d in drivers:
        await d.start()
    replicas = [Replica(_redis_settings(redis_url, drivers)) for _ in range(2)]
    channels: list[grpc.aio.Channel] = []
    try:
        for r in replicas:
            await r.start()
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{r.port}"))
        yield Cluster(drivers, replicas, [Stub(ch) for ch in channels])
    finally:
        for ch in channels:
            await ch.close()
        for r in replicas:
            await r.stop(0)
        for d in drivers:
            d.gate.set()
            await d.stop()


async def _moved_once(cluster: Cluster, s: str, original: str, other: FakeDriver) -> None:
    """One replay by one replica; both replicas send the session to one driver, id kept."""
    assert _calls(other, s, "Config") == len(CONFS)
    assert sum(_moved(r, "driver_down") for r in cluster.replicas) == 1
    for stub in cluster.stubs:
        got = await stub.Config(_get(s, original, PORT_KEY), timeout=10)
        assert (got.server_side_session_id, got.pairs[0].value) == (original, str(other.port))
    assert await _confs_on(other, s) == CONFS


async def test_a_replica_that_moves_a_session_after_another_did_follows_it(
    cluster: Cluster,
) -> None:
    s = str(uuid.uuid4())
    original, _, other = await _open(cluster.stubs[0], cluster.drivers, s)
    stale = await _pin(cluster.replicas[0], s)
    first, second = (_mover(r) for r in cluster.replicas)
    pin, moved_here = await first.move(stale, Reason.DRIVER_DOWN, observed=original)
    assert moved_here
    # The second replica still holds the old pin (say its call failed on the dead driver
    # before the move's event arrived): it follows, replaying and counting nothing.
    assert await second.move(stale, Reason.DRIVER_DOWN, observed=original) == (pin, False)
    assert cluster.replicas[1].placement.cache.peek(session_key(USER, s)) == pin
    await _moved_once(cluster, s, original, other)


class TogetherRegistry:
    """A registry whose next `get_pin`s return only once `n` callers have asked."""

    def __init__(self, inner: Any, arrived: list[int], everyone: asyncio.Event, n: int) -> None:
        self._inner, self._arrived, self._everyone, self._n = inner, arrived, everyone, n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get_pin(self, session_id: str) -> Pin | None:
        pin: Pin | None = await self._inner.get_pin(session_id)
        self._arrived.append(1)
        if len(self._arrived) >= self._n:
            self._everyone.set()
        await asyncio.wait_for(self._everyone.wait(), 10)
        return pin


async def test_two_replicas_moving_one_session_at_the_same_moment_move_it_once(
    cluster: Cluster,
) -> None:
    s = str(uuid.uuid4())
    original, _, other = await _open(cluster.stubs[0], cluster.drivers, s)
    stale = await _pin(cluster.replicas[0], s)
    arrived: list[int] = []
    everyone = asyncio.Event()
    movers = [
        Mover(
            r.placement,
            cast(Registry, TogetherRegistry(r.registry, arrived, everyone, 2)),
            r.upstreams,
            r.settings.migration,
            r.telemetry,
        )
        for r in cluster.replicas
    ]
    results = await asyncio.wait_for(
        asyncio.gather(*(m.move(stale, Reason.DRIVER_DOWN, observed=original) for m in movers)),
        20,
    )
    [pin] = {p for p, _ in results}  # whatever they think, they agree on the pin
    assert (pin.driver, pin.server_side_id) == (other.address, original)
    assert sorted(moved for _, moved in results) == [False, True]  # one winner
    await _moved_once(cluster, s, original, other)


# --- the fault the replay tests rely on ---------------------------------------------------------


async def test_fake_driver_fails_planned_calls_of_one_session_only() -> None:
    async with FakeDriver() as driver, grpc.aio.insecure_channel(driver.address) as channel:
        stub = Stub(channel)
        driver.fail_next("Config", "ABORTED", after=1, times=2, session_id="s")
        outcomes = []
        for session in ("s", "other", "s", "s", "s"):
            try:
                await stub.Config(_get(session, None, PORT_KEY), timeout=10)
                outcomes.append("ok")
            except grpc.aio.AioRpcError as exc:
                outcomes.append(exc.code().name)
        assert outcomes == ["ok", "ok", "ABORTED", "ABORTED", "ok"]
        with pytest.raises(ValueError):
            driver.fail_next("Config", "NOT_A_STATUS")


async def test_a_driver_restarted_on_its_address_gets_its_sessions_state_back() -> None:
    """`up` restarts a dead JVM on its port: its sessions replay there, identity kept."""
    first = GatedDriver()
    await first.start()
    replica = Replica(load_settings(listen="127.0.0.1:0", drivers=[first.address]))
    await replica.start()
    again: GatedDriver | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            stub = Stub(channel)
            s = str(uuid.uuid4())
            original, _, _ = await _open(stub, [first, GatedDriver()], s)
            await first.stop()
            again = GatedDriver()
            again.port = first.port  # a new instance on the same address: none of the state
            await again.start()
            replica.driver_restarted(first.address)
            got = await stub.Config(_get(s, original, *CONFS), timeout=10)
            assert got.server_side_session_id == original
            assert {p.key: p.value for p in got.pairs} == CONFS
            assert await _confs_on(again, s) == CONFS
            assert _moved(replica, "driver_down") == 1
            pin = await _pin(replica, s)
            assert (pin.driver, pin.moved_off) == (first.address, ())
    finally:
        await replica.stop(0)
        if again is not None:
            await again.stop()


async def test_a_session_moved_back_to_a_driver_that_released_it_gets_an_id_of_its_own_there(
    env: Env,
) -> None:
    s = str(uuid.uuid4())
    original, home, other = await _open(env.stub, env.drivers, s)
    drained, _ = await env.mover.move(await _pin(env.replica, s), Reason.DRAIN, observed=original)
    await eventually(lambda: _calls(home, s, "ReleaseSession") == 1, "the release on home")
    assert drained.upstream_id is None
    # Only home is left for the next move, and it released the id: a new one there.
    back, moved_here = await env.mover.move(drained, Reason.ADMIN, target=home.address)
    assert moved_here and back.driver == home.address
    upstream = back.upstream_id
    assert upstream is not None and upstream != s
    assert (back.moved_off, back.released_on) == ((), ())  # a new id is clean everywhere
    assert await _pin(env.replica, s) == back
    assert await _confs_on(home, upstream) == CONFS  # replayed under the new id
    # The client knows nothing of it: its session id and its first server-side id.
    got = await env.stub.Config(_get(s, original, PORT_KEY), timeout=10)
    assert (got.session_id, got.server_side_session_id) == (s, original)
    assert got.pairs[0].value == str(home.port)
    assert _calls(home, upstream, "Config") == len(CONFS) + 2  # replay, _confs_on, the client
    assert _calls(home, s, "Config") == len(CONFS) + 1  # the first life's calls, no more
    # Moved on again: the session keeps the id its current driver knows it by.
    onward, _ = await env.mover.move(back, Reason.DRIVER_DOWN, observed=original)
    assert onward.driver == other.address and onward.upstream_id == upstream
    assert await _confs_on(other, upstream) == CONFS
