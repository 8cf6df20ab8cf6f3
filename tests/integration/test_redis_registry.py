"""What only the Redis store has: key schema, round trips, outages, URL schemes, Sentinel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from common.addresses import redact_url as redact
from registry import open_registry
from registry.base import RegistryUnavailable
from registry.memory import MemoryRegistry
from registry.models import Driver, Event, EventKind, Pin
from registry.redis import RedisRegistry
from tests.helpers import ROOT, Listener, free_port
from tests.redis_server import RedisServer, SentinelServer

WAIT = 5.0
FAIL_FAST = 3.0  # seconds an operation may take to report a dead or hung Redis


async def until(cond: Callable[[], Awaitable[bool]], what: str, within: float = WAIT) -> None:
    """Poll `cond` until true; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


async def numsub(admin: aioredis.Redis, channel: str = "{spark-router}:events") -> int:
    """Subscribers of a channel, as the server counts them."""
    return int((await admin.pubsub_numsub(channel))[0][1])


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the (emptied) session Redis, to look behind the registry's back."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def registries(redis_url: str) -> AsyncIterator[Callable[..., RedisRegistry]]:
    """Open RedisRegistry instances on the session Redis; all closed after the test."""
    opened: list[RedisRegistry] = []

    def open_one(**options: Any) -> RedisRegistry:
        registry = RedisRegistry.from_url(redis_url, **options)
        opened.append(registry)
        return registry

    yield open_one
    for registry in opened:
        await registry.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to stop, freeze and restart."""
    with RedisServer() as server:
        yield server


# --- key schema -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["spark-router", "tenant-a"])
async def test_every_key_carries_the_hash_tag(
    prefix: str, admin: aioredis.Redis, registries: Callable[..., RedisRegistry]
) -> None:
    reg = registries(prefix=prefix)
    listener = Listener(reg, WAIT)
    channel = "{" + prefix + "}:events"
    await until(lambda: _gt0(numsub(admin, channel)), "the subscription")
    await reg.bind(Pin("s1", "d1:1", "gold"))
    await reg.bind(Pin("s2", "d1:1"))
    await reg.move("s2", "d1:1", Pin("s2", "d2:1"))
    await reg.touch(["s1", "s2"])
    await reg.upsert_driver(Driver("d1:1"), ttl=30)
    await reg.upsert_driver(Driver("d2:1", pool="gold"))
    await reg.drivers()
    keys = sorted([key async for key in admin.scan_iter()])
    tag = "{" + prefix + "}"
    assert keys == [
        f"{tag}:driver:d1:1",
        f"{tag}:driver:d2:1",
        f"{tag}:drivers",
        f"{tag}:expiry",
        f"{tag}:pin:s1",
        f"{tag}:pin:s2",
        f"{tag}:sessions:d1:1",
        f"{tag}:sessions:d2:1",
    ]
    # One expiry member per pin, the moved one under its new driver.
    members = await admin.zrange(f"{tag}:expiry", 0, -1)
    assert sorted(members) == ["s1\x1fd1:1\x1fgold", "s2\x1fd2:1\x1fdefault"]
    assert len({key_slot(key.encode()) for key in [*keys, channel]}) == 1
    assert await admin.pubsub_channels() == [channel]
    assert await admin.get(f"{tag}:pin:s1") == '["d1:1","gold",null,null,null,0]'
    assert await admin.hgetall(f"{tag}:driver:d2:1") == {
        "pool": "gold",
        "weight": "1",
        "state": "active",
    }
    assert await admin.zscore(f"{tag}:drivers", "d2:1") == float("inf")
    d1_expiry = await admin.zscore(f"{tag}:drivers", "d1:1")
    assert d1_expiry is not None and abs(d1_expiry - (time.time() + 30)) < 5
    assert 0 < await admin.pttl(f"{tag}:pin:s1") <= 2 * 3600 * 1000
    await listener.stop()


async def _gt0(count: Awaitable[int]) -> bool:
    return await count > 0


async def test_instances_with_other_prefixes_do_not_meet(
    registries: Callable[..., RedisRegistry],
) -> None:
    a, b = registries(prefix="tenant-a"), registries(prefix="tenant-b")
    await a.bind(Pin("s1", "d1:1"))
    await a.upsert_driver(Driver("d1:1"))
    assert await b.get_pin("s1") is None
    assert await b.drivers() == []


async def test_prefix_is_validated(redis_url: str) -> None:
    for bad in ["", "a{b", "x}"]:
        with pytest.raises(ValueError, match="prefix"):
            RedisRegistry.from_url(redis_url, prefix=bad)


# --- round trips ------------------------------------------------------------------------


class _Sends:
    count = 0


class CountingConnection(Connection):
    """A connection that counts its writes: one write per round trip (pipelines included)."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        _Sends.count += 1
        await super().send_packed_command(command, check_health)


async def test_each_operation_is_one_round_trip(redis_url: str, admin: aioredis.Redis) -> None:
    pool = aioredis.ConnectionPool.from_url(
        redis_url, connection_class=CountingConnection, decode_responses=True
    )
    reg = RedisRegistry(aioredis.Redis.from_pool(pool))
    try:
        for i in range(50):
            await reg.upsert_driver(Driver(f"d{i}:1"), ttl=30)
        await reg.bind(Pin("warm", "d1:1"))  # connect, load the scripts
        await reg.move("warm", "x", Pin("warm", "d2:1"))
        await reg.release("warm")
        await reg.drivers()
        await reg.remove_driver("none")

        async def trips(op: Awaitable[object]) -> int:
            before = _Sends.count
            await op
            return _Sends.count - before

        measured = {
            "get_pin": await trips(reg.get_pin("s1")),
            "bind (new)": await trips(reg.bind(Pin("s1", "d1:1"))),
            "bind (lost)": await trips(reg.bind(Pin("s1", "d2:1"))),
            "move": await trips(reg.move("s1", "d1:1", Pin("s1", "d2:1"))),
            "move (lost)": await trips(reg.move("s1", "d1:1", Pin("s1", "d3:1"))),
            "touch (1000 pins)": await trips(reg.touch([f"s{i}" for i in range(1000)])),
            "touch (none)": await trips(reg.touch([])),
            "release": await trips(reg.release("s1")),
            "drivers (50)": await trips(reg.drivers()),
            "upsert_driver (heartbeat)": await trips(reg.upsert_driver(Driver("d1:1"), 30)),
            "upsert_driver (new)": await trips(reg.upsert_driver(Driver("new:1"), 30)),
            "remove_driver": await trips(reg.remove_driver("new:1")),
        }
        assert measured == {op: 0 if op == "touch (none)" else 1 for op in measured}

        # The first use of a script on a server that does not know it costs NOSCRIPT,
        # SCRIPT LOAD and EVALSHA again; only once per script and server (restart).
        await admin.script_flush()
        assert await trips(reg.bind(Pin("s2", "d1:1"))) == 3
        assert await trips(reg.bind(Pin("s3", "d1:1"))) == 1
    finally:
        await reg.close()


async def test_bind_is_one_command_on_the_server(
    admin: aioredis.Redis, registries: Callable[..., RedisRegistry]
) -> None:
    reg = registries()
    await reg.bind(Pin("warm", "d1:1"))
    seen: list[dict[str, Any]] = []
    async with admin.monitor() as monitor:
        await reg.bind(Pin("s1", "d1:1"))
        await reg.bind(Pin("s1", "d2:1"))
        await reg.get_pin("end-of-test")
        for _ in range(100):
            command = await asyncio.wait_for(monitor.next_command(), WAIT)
            seen.append(dict(command))
            if "end-of-test" in command["command"]:
                break
    from_client = [c["command"].split()[0].upper() for c in seen if c["client_type"] != "lua"]
    from_script = [c["command"].split()[0].upper() for c in seen if c["client_type"] == "lua"]
    assert from_client == ["EVALSHA", "EVALSHA", "GET"]
    # won: GET, SET, the driver's session list and the expiry index; lost: GET only
    assert from_script == ["GET", "SET", "SADD", "PEXPIRE", "TIME", "ZADD", "GET"]


async def test_concurrency_is_bounded(redis_url: str, admin: aioredis.Redis) -> None:
    reg = RedisRegistry.from_url(redis_url + "?client_name=bounded", max_in_flight=4)
    try:
        pins = [Pin(f"s{i}", "d1:1") for i in range(500)]
        assert await asyncio.gather(*map(reg.bind, pins)) == pins
        assert await asyncio.gather(*(reg.get_pin(p.session_id) for p in pins)) == pins
        mine = [c for c in await admin.client_list() if c["name"] == "bounded"]
        assert 1 <= len(mine) <= 4
    finally:
        await reg.close()


# --- outages ----------------------------------------------------------------------------


def _operations(reg: RedisRegistry) -> dict[str, Callable[[], Awaitable[object]]]:
    return {
        "get_pin": lambda: reg.get_pin("s1"),
        "bind": lambda: reg.bind(Pin("s2", "d1:1")),
        "move": lambda: reg.move("s1", "d1:1", Pin("s1", "d2:1")),
        "release": lambda: reg.release("s1"),
        "touch": lambda: reg.touch(["s1"]),
        "drivers": lambda: reg.drivers(),
        "upsert_driver": lambda: reg.upsert_driver(Driver("d1:1"), ttl=30),
        "remove_driver": lambda: reg.remove_driver("d1:1"),
    }


async def _every_operation_fails_fast(reg: RedisRegistry, port: int) -> None:
    """Each operation, all at once (as on a busy replica), raises RegistryUnavailable fast."""

    async def attempt(op: Callable[[], Awaitable[object]]) -> tuple[float, BaseException | None]:
        started = time.monotonic()
        try:
            await op()
        except Exception as exc:
            return time.monotonic() - started, exc
        return time.monotonic() - started, None

    ops = _operations(reg)
    outcomes = await asyncio.gather(*(attempt(op) for op in ops.values()))
    for name, (took, error) in zip(ops, outcomes, strict=True):
        assert isinstance(error, RegistryUnavailable), f"{name}: {error!r}"
        assert took < FAIL_FAST, f"{name} took {took:.1f}s to fail"
        assert f"127.0.0.1:{port}" in str(error)
        assert "s3cret" not in str(error)


async def test_dead_redis_fails_fast(own_redis: RedisServer) -> None:
    url = f"redis://app:s3cret@127.0.0.1:{own_redis.port}/0"
    reg = RedisRegistry.from_url(url)
    try:
        own_redis.stop()
        await _every_operation_fails_fast(reg, own_redis.port)
        await _every_operation_fails_fast(reg, own_redis.port)  # and again: no hang later
    finally:
        await reg.close()


async def test_hung_redis_fails_fast(own_redis: RedisServer) -> None:
    reg = RedisRegistry.from_url(own_redis.url)
    try:
        await reg.bind(Pin("s1", "d1:1"))  # a pooled connection, as a busy replica has
        own_redis.freeze()
        try:
            await _every_operation_fails_fast(reg, own_redis.port)
        finally:
            own_redis.thaw()
        # Writes that timed out may still be applied once Redis resumes: their outcome is
        # unknown to the caller, which must re-read (get_pin) rather than assume.
        assert await reg.bind(Pin("after", "d1:1")) == Pin("after", "d1:1")
    finally:
        await reg.close()


async def test_callers_queued_behind_a_hung_redis_give_up(own_redis: RedisServer) -> None:
    reg = RedisRegistry.from_url(own_redis.url, max_in_flight=1, queue_timeout=0.3)
    try:
        await reg.get_pin("warm")
        own_redis.freeze()
        try:
            started = time.monotonic()
            first, second = await asyncio.gather(
                reg.get_pin("s1"), reg.get_pin("s2"), return_exceptions=True
            )
            took = time.monotonic() - started
        finally:
            own_redis.thaw()
        assert isinstance(first, RegistryUnavailable) and "TimeoutError" in str(first)
        assert isinstance(second, RegistryUnavailable) and "waited 0.3s" in str(second)
        assert took < FAIL_FAST
        assert await reg.get_pin("s1") is None  # the slot was given back
    finally:
        await reg.close()


async def test_events_notice_a_hung_redis_and_resume(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    reg = RedisRegistry.from_url(own_redis.url, events_ping_interval=0.2)
    admin = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    listener = Listener(reg, WAIT)
    try:
        await until(lambda: _gt0(numsub(admin)), "the subscription")
        await reg.upsert_driver(Driver("probe:1"))
        assert (await listener.next()).kind is EventKind.DRIVER_JOINED
        own_redis.freeze()
        try:

            async def lost() -> bool:
                return any("subscription lost" in r.message for r in caplog.records)

            # A silent subscription is pinged; no answer within another interval is an outage.
            await until(lost, "events() to notice the hung server")
        finally:
            own_redis.thaw()
        # The new subscription may reach Redis a little after our writes: probe until heard.
        deadline = time.monotonic() + WAIT
        for weight in range(2, 1000):
            assert time.monotonic() < deadline, "events() did not resume"
            await reg.upsert_driver(Driver("probe:1", weight=weight))
            with contextlib.suppress(asyncio.TimeoutError):
                event = await listener.next(timeout=0.1)
                assert event.kind is EventKind.DRIVER_CHANGED
                break
        assert not listener.task.done()
    finally:
        await listener.stop()
        await reg.close()
        await admin.aclose()


async def test_restarted_redis_is_used_again_and_events_resume(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.redis")
    reg = RedisRegistry.from_url(own_redis.url)
    other = RedisRegistry.from_url(own_redis.url)
    # redis-py's default is no retry: a pooled connection from before the restart would fail.
    admin = aioredis.Redis.from_url(
        own_redis.url, decode_responses=True, retry=Retry(NoBackoff(), 1)
    )
    listener = Listener(other, WAIT)
    try:
        await until(lambda: _gt0(numsub(admin)), "the subscription")
        # Several pooled connections, all of which the restart will leave stale.
        await asyncio.gather(*(reg.get_pin(f"s{i}") for i in range(10)))
        await reg.bind(Pin("s1", "d1:1"))
        await reg.move("s1", "d1:1", Pin("s1", "d2:1"))
        assert (await listener.next()).kind is EventKind.PIN_MOVED

        own_redis.stop()
        with pytest.raises(RegistryUnavailable):
            await reg.get_pin("s1")

        def lost() -> list[str]:
            return [r.getMessage() for r in caplog.records if "subscription lost" in r.message]

        async def outage_noticed() -> bool:
            return bool(lost())

        await until(outage_noticed, "events() to notice the outage")
        # Let the listener fail to reconnect a few times: still one warning per outage.
        await until(_after(0.5), "some reconnect attempts")

        own_redis.start()  # same port, empty (no persistence)
        await until(lambda: _gt0(numsub(admin)), "events() to subscribe again", within=10)
        assert len(lost()) == 1
        assert any("restored" in r.message for r in caplog.records)

        # Every stale pooled connection is replaced on first use, without an error.
        pins = await asyncio.gather(*(reg.get_pin(f"s{i}") for i in range(10)))
        assert pins == [None] * 10  # the data did not survive the restart
        assert await reg.bind(Pin("s1", "d3:1")) == Pin("s1", "d3:1")
        await reg.upsert_driver(Driver("d9:1"), ttl=30)
        assert await listener.next() == Event(EventKind.DRIVER_JOINED, driver=Driver("d9:1"))
        assert listener.queue.empty()
        assert not listener.task.done()
    finally:
        await listener.stop()
        await reg.close()
        await other.close()
        await admin.aclose()


def _after(seconds: float) -> Callable[[], Awaitable[bool]]:
    deadline = time.monotonic() + seconds

    async def passed() -> bool:
        return time.monotonic() >= deadline

    return passed


async def test_events_skip_malformed_messages(
    admin: aioredis.Redis,
    registries: Callable[..., RedisRegistry],
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = registries()
    listener = Listener(reg, WAIT)
    await until(lambda: _gt0(numsub(admin)), "the subscription")
    junk = [
        "not json",
        '{"kind":"no-such-kind"}',
        "[1,2]",
        '{"kind":"driver_left","driver":{}}',
        '{"kind":"driver_left","driver":{"pool":"p"}}',
        '{"kind":"pin_moved","session_id":"s1"}',
        '{"kind":"pin_released"}',
    ]
    for message in junk:
        await admin.publish("{spark-router}:events", message)
    await admin.publish(
        "{spark-router}:events", '{"kind":"driver_left","driver":{"address":"d1:1"}}'
    )
    assert await listener.next() == Event(EventKind.DRIVER_LEFT, driver=Driver("d1:1"))
    assert listener.queue.empty()
    assert sum("malformed" in r.message for r in caplog.records) == len(junk)
    await listener.stop()


async def test_events_after_close_end_at_once(registries: Callable[..., RedisRegistry]) -> None:
    reg = registries()
    await reg.close()
    assert [event async for event in reg.events()] == []


async def test_client_without_decoded_responses(redis_url: str, admin: aioredis.Redis) -> None:
    reg = RedisRegistry(aioredis.Redis.from_url(redis_url))  # replies as bytes
    listener = Listener(reg, WAIT)
    try:
        await until(lambda: _gt0(numsub(admin)), "the subscription")
        assert await reg.bind(Pin("s1", "d1:1", "gold")) == Pin("s1", "d1:1", "gold")
        assert await reg.get_pin("s1") == Pin("s1", "d1:1", "gold")
        await reg.upsert_driver(Driver("d1:1", weight=2))
        assert list(await reg.drivers()) == [Driver("d1:1", weight=2)]
        assert await listener.next() == Event(
            EventKind.DRIVER_JOINED, driver=Driver("d1:1", weight=2)
        )
    finally:
        await listener.stop()
        await reg.close()


# --- URLs -------------------------------------------------------------------------------


async def test_unix_socket_url() -> None:
    with RedisServer(unixsocket=True) as server:
        reg = open_registry(server.unix_url)
        admin = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert isinstance(reg, RedisRegistry)
            await reg.bind(Pin("s1", "d1:1"))
            assert await admin.get("{spark-router}:pin:s1") == '["d1:1","default",null,null,null,0]'
            addrs = [c["addr"] for c in await admin.client_list()]
            assert any(a.startswith(str(server.unixsocket)) for a in addrs), addrs
        finally:
            await reg.close()
            await admin.aclose()
        server.stop()
        failing = RedisRegistry.from_url(server.unix_url)
        try:
            with pytest.raises(RegistryUnavailable, match="unix://"):
                await failing.get_pin("s1")
        finally:
            await failing.close()


async def test_sentinel_url(own_redis: RedisServer) -> None:
    admin = aioredis.Redis.from_url(f"redis://127.0.0.1:{own_redis.port}/2", decode_responses=True)
    with SentinelServer(own_redis) as sentinel:
        dead = f"127.0.0.1:{free_port()}"
        url = f"redis+sentinel://{dead},127.0.0.1:{sentinel.port}/{sentinel.master_name}/2"
        reg = open_registry(url, pin_ttl=30)
        unknown = RedisRegistry.from_url(f"redis+sentinel://127.0.0.1:{sentinel.port}/nope")
        try:
            assert isinstance(reg, RedisRegistry)
            await reg.bind(Pin("s1", "d1:1"))
            assert await admin.get("{spark-router}:pin:s1") == '["d1:1","default",null,null,null,0]'
            assert 0 < await admin.pttl("{spark-router}:pin:s1") <= 30_000
            with pytest.raises(RegistryUnavailable, match="nope"):
                await unknown.get_pin("s1")
        finally:
            await reg.close()
            await unknown.close()
            await admin.aclose()


def test_sentinel_url_must_name_the_master() -> None:
    with pytest.raises(ValueError, match="mastername"):
        RedisRegistry.from_url("redis+sentinel://127.0.0.1:26379")
    with pytest.raises(ValueError, match="database"):
        RedisRegistry.from_url("redis+sentinel://127.0.0.1:26379/mymaster/x")


async def test_open_registry_dispatch(redis_url: str) -> None:
    memory = open_registry("memory://", pin_ttl=5)
    assert isinstance(memory, MemoryRegistry)
    await memory.close()
    for url in [redis_url, "rediss://127.0.0.1:1/0", "unix:///nowhere/redis.sock"]:
        store = open_registry(url)
        assert isinstance(store, RedisRegistry)
        await store.close()
    tls = RedisRegistry.from_url("rediss://127.0.0.1:1/0")
    assert tls._client.connection_pool.connection_class is SSLConnection
    await tls.close()
    with pytest.raises(ValueError, match=r"memory://.*redis\+sentinel://"):
        open_registry("http://example.com")
    with pytest.raises(ValueError, match=r"redis://, rediss://, unix://, redis\+sentinel://"):
        RedisRegistry.from_url("memory://")


def test_memory_users_do_not_import_redis() -> None:
    code = (
        "import sys, registry; registry.open_registry('memory://'); "
        "assert 'redis' not in sys.modules and 'registry.redis' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_redact() -> None:
    assert redact("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"
    assert redact("redis+sentinel://u:pw@a:1,b:2/m") == "redis+sentinel://u:***@a:1,b:2/m"
