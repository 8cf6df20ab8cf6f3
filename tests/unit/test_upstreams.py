"""Upstream channels: one per driver, and a departed driver's channel is closed (fake driver)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from pyspark.sql.connect.proto import base_pb2

from loadtest.fake_driver import FakeDriver
from router.config import load_settings
from router.upstreams import Upstreams
from tests.helpers import eventually

WAIT = 5.0  # bound for conditions that hold within milliseconds
CONFIG = "/spark.connect.SparkConnectService/Config"


class HoldingDriver(FakeDriver):
    """A fake driver whose Config calls wait until the test releases them."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def Config(self, request: Any, context: Any) -> Any:
        self.arrived.set()
        await self.release.wait()
        return await super().Config(request, context)


@pytest.fixture
async def driver() -> AsyncIterator[HoldingDriver]:
    d = HoldingDriver()
    await d.start()
    yield d
    d.release.set()
    await d.stop()


def _request(session: str = "00000000-0000-4000-8000-000000000001") -> bytes:
    data: bytes = base_pb2.ConfigRequest(session_id=session).SerializeToString()
    return data


async def _config(channel: grpc.aio.Channel) -> bytes:
    response: bytes = await channel.unary_unary(CONFIG)(_request(), timeout=WAIT)
    return response


async def test_the_channel_of_a_departed_driver_is_closed_and_a_new_one_dialled(
    driver: HoldingDriver,
) -> None:
    upstreams = Upstreams(load_settings())
    driver.release.set()
    old = upstreams.channel(driver.address)
    assert upstreams.channel(driver.address) is old  # one per driver
    await _config(old)
    upstreams.discard(driver.address)
    new = upstreams.channel(driver.address)  # a session still pinned there dials afresh
    assert new is not old
    shut = grpc.ChannelConnectivity.SHUTDOWN
    await eventually(lambda: old.get_state() is shut, "the departed channel to close")
    with pytest.raises(grpc.aio.UsageError, match="Channel is closed"):
        await _config(old)
    assert base_pb2.ConfigResponse.FromString(await _config(new)).session_id
    await asyncio.wait_for(upstreams.close(), WAIT)


async def test_calls_in_flight_on_a_departed_drivers_channel_may_finish(
    driver: HoldingDriver,
) -> None:
    upstreams = Upstreams(load_settings(shutdown_grace_seconds=30))
    old = upstreams.channel(driver.address)
    call = asyncio.ensure_future(_config(old))
    await asyncio.wait_for(driver.arrived.wait(), WAIT)
    upstreams.discard(driver.address)
    assert upstreams.channel(driver.address) is not old
    driver.release.set()
    assert base_pb2.ConfigResponse.FromString(await asyncio.wait_for(call, WAIT)).session_id
    await asyncio.wait_for(upstreams.close(), WAIT)
    with pytest.raises(grpc.aio.UsageError, match="Channel is closed"):
        await _config(old)


async def test_without_a_grace_a_departed_drivers_calls_are_cancelled(
    driver: HoldingDriver,
) -> None:
    upstreams = Upstreams(load_settings(shutdown_grace_seconds=0))
    call = asyncio.ensure_future(_config(upstreams.channel(driver.address)))
    await asyncio.wait_for(driver.arrived.wait(), WAIT)
    upstreams.discard(driver.address)
    with pytest.raises(asyncio.CancelledError):  # grpc.aio: a locally cancelled call
        await asyncio.wait_for(call, WAIT)
    await asyncio.wait_for(upstreams.close(), WAIT)


async def test_discarding_a_driver_without_a_channel_does_nothing() -> None:
    upstreams = Upstreams(load_settings())
    upstreams.discard("127.0.0.1:1")
    await asyncio.wait_for(upstreams.close(), WAIT)
