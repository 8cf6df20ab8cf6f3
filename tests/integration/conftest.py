"""Fixtures: fake drivers and a router replica in this process, and a raw client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from pyspark.sql.connect.proto import base_pb2_grpc

from loadtest.fake_driver import FakeDriver
from router.config import load_settings
from router.server import Replica

MiB = 1024 * 1024
CLIENT_OPTIONS = [
    ("grpc.max_send_message_length", 128 * MiB),
    ("grpc.max_receive_message_length", 128 * MiB),
]


@pytest.fixture
async def driver() -> AsyncIterator[FakeDriver]:
    """One fake driver."""
    d = FakeDriver()
    await d.start()
    yield d
    await d.stop()


@pytest.fixture
async def drivers() -> AsyncIterator[list[FakeDriver]]:
    """Two fake drivers."""
    ds = [FakeDriver(), FakeDriver()]
    for d in ds:
        await d.start()
    yield ds
    for d in ds:
        await d.stop()


@pytest.fixture
async def router(drivers: list[FakeDriver]) -> AsyncIterator[Replica]:
    """A replica in front of the two fake drivers, on a free loopback port."""
    settings = load_settings(listen="127.0.0.1:0", drivers=[d.address for d in drivers])
    replica = Replica(settings)
    await replica.start()
    yield replica
    await replica.stop(0)


@pytest.fixture
async def channel(router: Replica) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to the router."""
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}", options=CLIENT_OPTIONS)
    yield ch
    await ch.close()


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> base_pb2_grpc.SparkConnectServiceStub:
    """The real pyspark stub over the router channel."""
    return base_pb2_grpc.SparkConnectServiceStub(channel)
