"""A replica's membership with fake drivers: departed channels close, "down" is read once from
the snapshot (already swapped when a failure is confirmed), the ejection cap is wired in."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio
from pyspark.sql.connect.proto import base_pb2

from loadtest.fake_driver import FakeDriver
from registry.models import Driver, DriverState
from router.config import load_settings
from router.server import Replica
from tests.helpers import eventually

WAIT = 5.0  # bound for conditions that hold within milliseconds
CONFIG = "/spark.connect.SparkConnectService/Config"
# Nothing periodic interferes: every probe and membership read below is the test's own.
QUIET: dict[str, Any] = {"probe_interval_seconds": 600.0, "membership_poll_seconds": 60.0}


@contextlib.asynccontextmanager
async def _replica(n: int, registered: int = 0) -> AsyncIterator[tuple[list[FakeDriver], Replica]]:
    """`n` fake drivers, the last `registered` of them in the registry, the rest static."""
    drivers = [FakeDriver() for _ in range(n)]
    for d in drivers:
        await d.start()
    static = [d.address for d in drivers[: n - registered]]
    replica = Replica(load_settings(listen="127.0.0.1:0", drivers=static, **QUIET))
    try:
        for d in drivers[n - registered :]:
            await replica.registry.upsert_driver(Driver(d.address), ttl=None)
        await replica.start()
        yield drivers, replica
    finally:
        await replica.stop(0)
        for d in drivers:
            await d.stop()


async def _config(channel: grpc.aio.Channel) -> None:
    request = base_pb2.ConfigRequest(session_id="00000000-0000-4000-8000-000000000001")
    await channel.unary_unary(CONFIG)(request.SerializeToString(), timeout=WAIT)


async def test_a_driver_that_leaves_has_its_channel_closed() -> None:
    async with _replica(2, registered=1) as (drivers, replica):
        stays, gone = drivers
        old = replica.upstreams.channel(gone.address)
        kept = replica.upstreams.channel(stays.address)
        await _config(old)
        await replica.registry.remove_driver(gone.address)
        await replica.refresh_membership()
        assert list(replica.placement.rings.drivers) == [stays.address]
        shut = grpc.ChannelConnectivity.SHUTDOWN
        await eventually(lambda: old.get_state() is shut, "the departed channel to close")
        new = replica.upstreams.channel(gone.address)  # a session still pinned there
        assert new is not old
        await _config(new)
        assert replica.upstreams.channel(stays.address) is kept


async def test_a_confirmed_failure_is_in_the_snapshot_before_the_registry_answers() -> None:
    async with _replica(2) as (drivers, replica):
        dead = drivers[0]
        channel = replica.upstreams.channel(dead.address)
        await dead.stop()
        gate = asyncio.Event()
        read_drivers = replica.registry.drivers

        async def slow_drivers() -> Sequence[Driver]:
            await gate.wait()
            return await read_drivers()

        replica.registry.drivers = slow_drivers  # type: ignore[method-assign]
        confirming = asyncio.ensure_future(replica.health.confirm_failure(dead.address))
        await eventually(lambda: replica.health.is_down(dead.address), "the failure confirmed")
        assert not confirming.done()  # its membership refresh waits for the registry
        assert not replica.placement.is_live(dead.address)  # yet a concurrent call knows
        assert replica.placement.rings.drivers[dead.address].state is DriverState.DOWN
        gate.set()
        assert await asyncio.wait_for(confirming, WAIT) is True
        # Down: its calls in flight are cut (the channel closed); later calls get a new one.
        shut = grpc.ChannelConnectivity.SHUTDOWN
        await eventually(lambda: channel.get_state() is shut, "the down driver's channel cut")
        assert replica.upstreams.channel(dead.address) is not channel


async def test_the_replica_holds_the_second_of_three_failing_drivers_up() -> None:
    async with _replica(3) as (drivers, replica):
        first, second, third = sorted(drivers, key=lambda d: d.address)
        await first.stop()
        await second.stop()
        assert await replica.health.confirm_failure(first.address) is True
        assert await replica.health.confirm_failure(second.address) is False  # the cap
        assert replica.placement.is_live(second.address)
        assert not replica.placement.is_live(first.address)
        value = replica.telemetry.value
        assert value("spark_router_ejections_capped_total", pool="default") == 1
        await third.stop()  # now nothing of the pool answers: the cap lifts
        await replica.health.report(third.address, False)
        assert await replica.health.confirm_failure(second.address) is True
