"""Several replicas, one Redis registry, fake drivers: one truth about every session."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

from loadtest.fake_driver import FakeDriver
from registry import open_registry
from registry.models import DrainMode, Driver, Pin
from router.config import Settings, load_settings
from router.server import Replica
from router.sessions import journal
from router.sessions.journal import JournalEntry
from tests.helpers import eventually, spawn, stop
from tests.redis_server import RedisServer

Stub = base_pb2_grpc.SparkConnectServiceStub


def _settings(redis_url: str, drivers: Sequence[str] = (), **extra: object) -> Settings:
    return load_settings(listen="127.0.0.1:0", registry=redis_url, drivers=list(drivers), **extra)


async def _port_of(stub: Stub, session: str, pool: str | None = None) -> int:
    req = base_pb2.ConfigRequest(session_id=session)
    req.operation.get.keys.append("spark.connect.grpc.binding.port")
    md = (("x-spark-pool", pool),) if pool else ()
    resp = await stub.Config(req, timeout=20, metadata=md)
    return int(resp.pairs[0].value)


class Cluster:
    """Replicas and client stubs, started and stopped together."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: list[Stub] = []

    async def __aenter__(self) -> Cluster:
        for r in self.replicas:
            await r.start()
            ch = grpc.aio.insecure_channel(f"127.0.0.1:{r.port}")
            self.channels.append(ch)
            self.stubs.append(Stub(ch))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ch in self.channels:
            await ch.close()
        for r in self.replicas:
            await r.stop(0)


@pytest.fixture
async def fake_drivers() -> AsyncIterator[list[FakeDriver]]:
    """Five fake drivers (tests use the first two to four; the fifth joins later)."""
    ds = [FakeDriver() for _ in range(5)]
    for d in ds:
        await d.start()
    yield ds
    for d in ds:
        await d.stop()


async def test_1000_sessions_on_random_replicas_agree(
    redis_url: str, fake_drivers: list[FakeDriver]
) -> None:
    # Replicas that see different static drivers: their rings disagree, so only the
    # registry's pins can make them send a session to one driver.
    addrs = [d.address for d in fake_drivers[:4]]
    replicas = [Replica(_settings(redis_url, addrs[: 2 + i])) for i in range(3)]
    rng = random.Random(7)
    sessions = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(1000)]
    async with Cluster(replicas) as cluster:
        sem = asyncio.Semaphore(64)

        async def first(s: str) -> int:
            async with sem:
                return await _port_of(rng.choice(cluster.stubs), s)

        owners = dict(zip(sessions, await asyncio.gather(*map(first, sessions)), strict=True))

        async def every_replica(s: str) -> set[int]:
            async with sem:
                return {await _port_of(stub, s) for stub in cluster.stubs}

        seen = await asyncio.gather(*map(every_replica, sessions))
    assert all(ports == {owners[s]} for s, ports in zip(sessions, seen, strict=True))
    assert len(set(owners.values())) >= 2
    reached: dict[str, set[str]] = {}  # and the drivers agree: each session reached one
    for d in fake_drivers:
        for c in d.calls:
            reached.setdefault(c.session_id, set()).add(d.address)
    assert all(len(reached[s]) == 1 for s in sessions)


async def test_drivers_from_the_registry_and_a_joining_driver_moves_nobody(
    redis_url: str, fake_drivers: list[FakeDriver]
) -> None:
    admin = open_registry(redis_url)
    try:
        for d in fake_drivers[:4]:
            await admin.upsert_driver(Driver(d.address), ttl=30)
        replicas = [Replica(_settings(redis_url)) for _ in range(2)]
        async with Cluster(replicas) as cluster:
            sessions = [str(uuid.uuid4()) for _ in range(200)]
            before = {s: await _port_of(cluster.stubs[0], s) for s in sessions}
            assert len(set(before.values())) == 4
            await admin.upsert_driver(Driver(fake_drivers[4].address), ttl=30)
            new_port = fake_drivers[4].port
            for r in replicas:
                await eventually(
                    lambda r=r: fake_drivers[4].address in _members(r), "the new driver"
                )
            # Known sessions stay; a fresh replica (empty cache) reads the same pins.
            assert {s: await _port_of(cluster.stubs[1], s) for s in sessions} == before
            fresh = Replica(_settings(redis_url))
            async with Cluster([fresh]) as c2:
                assert {s: await _port_of(c2.stubs[0], s) for s in sessions} == before
            # New sessions do use the new driver.
            later = [await _port_of(cluster.stubs[0], str(uuid.uuid4())) for _ in range(100)]
            assert new_port in later
    finally:
        await admin.close()


async def test_a_temp_view_whose_call_ends_through_another_replica_is_journaled(
    redis_url: str, fake_drivers: list[FakeDriver]
) -> None:
    """The replica that started the call dies; the client reattaches through another one."""
    replicas = [Replica(_settings(redis_url, [fake_drivers[0].address])) for _ in range(2)]
    async with Cluster(replicas) as cluster:
        a, b = cluster.stubs
        s, op = str(uuid.uuid4()), str(uuid.uuid4())
        req = base_pb2.ExecutePlanRequest(session_id=s, operation_id=op)
        req.plan.command.create_dataframe_view.name = "v"
        req.plan.command.create_dataframe_view.input.range.end = 3
        call = a.ExecutePlan(req, metadata=(("x-fake-batches", "3"),), timeout=10)
        first = await call.read()
        call.cancel()  # gone before the result completed, as with its replica killed
        reattach = base_pb2.ReattachExecuteRequest(
            session_id=s, operation_id=op, last_response_id=first.response_id
        )
        responses = [r async for r in b.ReattachExecute(reattach, timeout=10)]
        assert responses[-1].HasField("result_complete")
        entries = await cluster.replicas[1].registry.journal(s)
        assert entries is not None
        settled = [JournalEntry.decode(e) for e in journal.settle(entries)]
        assert [e.method for e in settled] == ["ExecutePlan"]
        assert base_pb2.ExecutePlanRequest.FromString(settled[0].request).plan == req.plan


async def test_10000_new_sessions_spread_evenly_and_by_weight(
    redis_url: str, fake_drivers: list[FakeDriver]
) -> None:
    admin = open_registry(redis_url)
    try:
        for d in fake_drivers[:4]:
            await admin.upsert_driver(Driver(d.address), ttl=30)
        async with Cluster([Replica(_settings(redis_url))]) as cluster:
            placement = cluster.replicas[0].placement
            pins = [await placement.place(str(uuid.uuid4()), None) for _ in range(10_000)]
        counts = Counter(p.driver for p in pins)
        assert all(abs(c - 2500) / 2500 <= 0.15 for c in counts.values()), counts
        # The pins are in Redis, not only in the cache.
        stored = await asyncio.gather(*(admin.get_pin(p.session_id) for p in pins[:200]))
        assert stored == pins[:200]

        heavy = fake_drivers[0].address
        await admin.upsert_driver(Driver(heavy, weight=3), ttl=30)
        async with Cluster([Replica(_settings(redis_url))]) as cluster:
            placement = cluster.replicas[0].placement
            weighted = Counter(
                [(await placement.place(str(uuid.uuid4()), None)).driver for _ in range(4000)]
            )
        assert weighted[heavy] > 2 * max(c for a, c in weighted.items() if a != heavy)
    finally:
        await admin.close()


async def test_pools_route_by_header_and_explain_unknown_pools(
    redis_url: str, fake_drivers: list[FakeDriver]
) -> None:
    admin = open_registry(redis_url)
    try:
        await admin.upsert_driver(Driver(fake_drivers[0].address, pool="etl"), ttl=30)
        await admin.upsert_driver(Driver(fake_drivers[1].address, pool="bi"), ttl=30)
        async with Cluster([Replica(_settings(redis_url, default_pool="bi"))]) as cluster:
            stub = cluster.stubs[0]
            assert await _port_of(stub, str(uuid.uuid4()), pool="etl") == fake_drivers[0].port
            assert await _port_of(stub, str(uuid.uuid4())) == fake_drivers[1].port
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _port_of(stub, str(uuid.uuid4()), pool="gpu")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "pool 'gpu' has no drivers (pools: bi, etl)" in (err.value.details() or "")
            from registry.models import DriverState

            await admin.upsert_driver(
                Driver(fake_drivers[0].address, pool="etl", state=DriverState.DOWN), ttl=30
            )
            replica = cluster.replicas[0]
            await eventually(
                lambda: not replica.placement.rings.pick("etl", "x"), "etl's driver to be down"
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _port_of(stub, str(uuid.uuid4()), pool="etl")
            # Not UNAVAILABLE, which pyspark retries for minutes (errors.NoLiveDriver).
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "pool 'etl' has no driver that takes new sessions" in (err.value.details() or "")
    finally:
        await admin.close()


async def test_known_sessions_cost_zero_redis_commands(
    redis_url: str, fake_drivers: list[FakeDriver]
) -> None:
    settings = _settings(
        redis_url,
        [d.address for d in fake_drivers[:2]],
        membership_poll_seconds=60,
        pin_touch_interval_seconds=3600,
    )
    client = aioredis.from_url(redis_url)
    try:
        async with Cluster([Replica(settings)]) as cluster:
            stub = cluster.stubs[0]
            sessions = [str(uuid.uuid4()) for _ in range(20)]
            for s in sessions:
                await _port_of(stub, s)  # first calls: these do use Redis
            before = await _commands(client)
            for _ in range(25):
                for s in sessions:
                    await _port_of(stub, s)
            after = await _commands(client)
        assert after - before == 0, f"{after - before} Redis commands for 500 known-session calls"
    finally:
        await client.aclose()


async def test_redis_outage_keeps_sessions_working(fake_drivers: list[FakeDriver]) -> None:
    server = RedisServer()
    server.start()
    try:
        settings = _settings(
            server.url, [d.address for d in fake_drivers[:2]], membership_poll_seconds=0.2
        )
        async with Cluster([Replica(settings)]) as cluster:
            stub, replica = cluster.stubs[0], cluster.replicas[0]
            known = [str(uuid.uuid4()) for _ in range(30)]
            owners = {s: await _port_of(stub, s) for s in known}
            server.stop()
            # Known sessions: zero failed calls while Redis is down.
            for s in known:
                assert await _port_of(stub, s) == owners[s]
            # New sessions still work, placed by the ring; the replica says it is degraded.
            during = [str(uuid.uuid4()) for _ in range(20)]
            placed = {s: await _port_of(stub, s) for s in during}
            gauge = replica.telemetry.value
            await eventually(
                lambda: gauge("spark_router_registry_degraded") == 1, "degraded gauge 1"
            )
            server.start()
            await eventually(
                lambda: gauge("spark_router_registry_degraded") == 0, "degraded gauge 0"
            )
            admin = open_registry(server.url)
            try:
                for s in during:  # written back to Redis once it returned
                    pin = await admin.get_pin(s)
                    assert pin is not None and pin.driver.endswith(f":{placed[s]}")
            finally:
                await admin.close()
            for s in known + during:
                assert await _port_of(stub, s) in (owners | placed).values()
    finally:
        server.stop()


async def _commands(client: aioredis.Redis) -> int:
    """Commands Redis has executed, less the INFO calls used to read the number."""
    stats = await client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def _members(replica: Replica) -> set[str]:
    return set(replica.placement.rings.drivers)


def _agent(driver: FakeDriver, redis_url: str, *extra: str) -> subprocess.Popen[str]:
    return spawn(
        [
            "-m",
            "router.cli",
            "agent",
            "--driver",
            driver.address,
            "--registry",
            redis_url,
            "--heartbeat-interval",
            "0.2",
            "--ttl",
            "1.0",
            "--probe-timeout",
            "0.5",
            *extra,
        ]
    )


async def test_agents_register_drivers_and_sigterm_stops_new_sessions_within_a_ttl(
    redis_url: str, fake_drivers: list[FakeDriver]
) -> None:
    leaving, staying = fake_drivers[0], fake_drivers[1]
    agents = [_agent(leaving, redis_url), _agent(staying, redis_url, "--pool", "default")]
    try:
        replica = Replica(_settings(redis_url, membership_poll_seconds=0.2))
        async with Cluster([replica]) as cluster:
            both = {leaving.address, staying.address}
            await eventually(
                lambda: _live(replica) == both, "both agents to register their drivers"
            )
            loop = asyncio.get_running_loop()
            agents[0].send_signal(signal.SIGTERM)
            sent = loop.time()
            await eventually(lambda: _live(replica) == {staying.address}, "the driver to leave", 5)
            assert loop.time() - sent < 1.0  # within one heartbeat TTL
            assert agents[0].wait(timeout=10) == 0
            ports = {await _port_of(cluster.stubs[0], str(uuid.uuid4())) for _ in range(100)}
            assert ports == {staying.port}

            # An agent that dies without deregistering: its driver expires with its TTL.
            agents[1].send_signal(signal.SIGKILL)
            await eventually(lambda: not _live(replica), "the heartbeat to expire", 5)
    finally:
        for proc in agents:
            stop(proc)


def _live(replica: Replica) -> set[str]:
    return {a for a, d in replica.placement.rings.drivers.items() if d.takes_new_sessions}


async def test_drain_stops_new_sessions_and_keeps_existing_ones(
    redis_url: str, fake_drivers: list[FakeDriver]
) -> None:
    drained, kept = fake_drivers[0], fake_drivers[1]
    replica = Replica(_settings(redis_url, [drained.address, kept.address]))
    async with Cluster([replica]) as cluster:
        stub = cluster.stubs[0]
        sessions = [str(uuid.uuid4()) for _ in range(60)]
        before = {s: await _port_of(stub, s) for s in sessions}
        assert drained.port in before.values()

        proc = spawn(["-m", "router.cli", "drain", drained.address, "--registry", redis_url])
        assert proc.wait(timeout=30) == 0
        stop(proc)
        await eventually(
            lambda: replica.placement.rings.drivers[drained.address].state.value == "draining",
            "the drain to reach the replica",
        )
        fresh = {await _port_of(stub, str(uuid.uuid4())) for _ in range(100)}
        assert fresh == {kept.port}  # no new session on the drained driver
        assert {s: await _port_of(stub, s) for s in sessions} == before  # nobody moved

        proc = spawn(
            ["-m", "router.cli", "drain", drained.address, "--registry", redis_url, "--undo"]
        )
        assert proc.wait(timeout=30) == 0
        stop(proc)
        await eventually(
            lambda: replica.placement.rings.drivers[drained.address].state.value == "active",
            "the undo to reach the replica",
        )
        again = {await _port_of(stub, str(uuid.uuid4())) for _ in range(100)}
        assert drained.port in again


def test_drain_refuses_the_embedded_registry() -> None:
    proc = spawn(
        ["-m", "router.cli", "drain", "127.0.0.1:1", "--registry", "memory://"], capture_stderr=True
    )
    _, err = proc.communicate(timeout=30)
    stop(proc)
    assert proc.returncode == 2 and "memory:// is private to one replica" in err


async def test_drivers_command_lists_registry_drivers_and_drain_marks(redis_url: str) -> None:
    admin = open_registry(redis_url)
    try:
        await admin.upsert_driver(Driver("127.0.0.1:7001", pool="etl", weight=2), ttl=30)
        await admin.upsert_driver(Driver("127.0.0.1:7002"), ttl=30)
        await admin.set_draining("127.0.0.1:7002", True)
        await admin.set_draining("127.0.0.1:7003", True, DrainMode.MOVE_IDLE)  # a static driver
        for n in range(3):
            await admin.bind(Pin(f"s{n}", "127.0.0.1:7001", "etl", owner="ann"))
    finally:
        await admin.close()
    proc = spawn(["-m", "router.cli", "drivers", "--registry", redis_url, "--json"])
    out, _ = proc.communicate(timeout=30)
    stop(proc)
    assert proc.returncode == 0
    by_address = {d["address"]: d for d in json.loads(out)}
    assert by_address["127.0.0.1:7001"] == {
        "address": "127.0.0.1:7001",
        "pool": "etl",
        "weight": 2,
        "state": "active",
        "registered": True,
        "drain": None,
        "sessions": 3,
    }
    assert by_address["127.0.0.1:7002"]["drain"] == "keep"
    assert by_address["127.0.0.1:7003"]["drain"] == "move-idle"
    assert by_address["127.0.0.1:7003"]["registered"] is False

    proc = spawn(["-m", "router.cli", "drivers", "--registry", redis_url])
    table, _ = proc.communicate(timeout=30)
    stop(proc)
    rows = [line.split() for line in table.splitlines()]
    assert rows[0] == ["ADDRESS", "POOL", "WEIGHT", "STATE", "HEALTH", "DRAIN", "SESSIONS"]
    assert ["127.0.0.1:7001", "etl", "2", "active", "-", "-", "3"] in rows


async def test_sessions_command_lists_pins_with_owner(redis_url: str) -> None:
    admin = open_registry(redis_url)
    try:
        await admin.bind(Pin("a1", "127.0.0.1:7001", owner="ann", created=0.0))
        await admin.bind(Pin("b1", "127.0.0.1:7002", owner="bob"))
    finally:
        await admin.close()
    proc = spawn(
        ["-m", "router.cli", "sessions", "--registry", redis_url, "--driver", "127.0.0.1:7001"]
    )
    out, _ = proc.communicate(timeout=30)
    stop(proc)
    rows = [line.split() for line in out.splitlines()]
    assert rows == [
        ["SESSION", "DRIVER", "POOL", "OWNER", "CREATED", "MOVES"],
        ["a1", "127.0.0.1:7001", "default", "ann", "1970-01-01T00:00:00+00:00", "0"],
    ]
    proc = spawn(
        ["-m", "router.cli", "sessions", "--registry", redis_url, "--session", "nope"],
        capture_stderr=True,
    )
    _, err = proc.communicate(timeout=30)
    stop(proc)
    assert proc.returncode == 1 and "no session 'nope'" in err
