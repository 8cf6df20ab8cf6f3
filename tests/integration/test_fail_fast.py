"""A pool with no live driver: calls fail fast, with a status pyspark does not retry, saying why."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

from loadtest.fake_driver import FakeDriver
from router.config import load_settings
from router.server import Replica
from tests.helpers import free_port

Stub = base_pb2_grpc.SparkConnectServiceStub
WAIT = 2.0  # no_driver_wait_seconds of these replicas


def _config(session_id: str) -> base_pb2.ConfigRequest:
    req = base_pb2.ConfigRequest(session_id=session_id)
    req.operation.get.keys.append("spark.connect.grpc.binding.port")
    return req


async def _replica(driver: str, **overrides: object) -> Replica:
    settings = load_settings(
        listen="127.0.0.1:0",
        drivers=[driver],
        admin_listen="off",
        no_driver_wait_seconds=WAIT,
        probe_interval_seconds=0.2,
        probe_timeout_seconds=1.0,
        **overrides,
    )
    replica = Replica(settings)
    await replica.start()
    return replica


@pytest.fixture
async def refused() -> AsyncIterator[tuple[Replica, Stub]]:
    """A replica whose only driver is 127.0.0.1:1 (connections refused)."""
    replica = await _replica("127.0.0.1:1")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
    yield replica, Stub(channel)
    await channel.close()
    await replica.stop(0)


async def test_no_live_driver_fails_within_the_bound_naming_pool_driver_and_error(
    refused: tuple[Replica, Stub],
) -> None:
    _, stub = refused
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Config(_config(str(uuid.uuid4())), timeout=60)
    elapsed = time.monotonic() - started
    # At most the wait for a just-failed driver, plus a confirming probe of ~nothing.
    assert elapsed < WAIT + 3.0, elapsed
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION  # pyspark does not retry it
    details = err.value.details() or ""
    assert "pool 'default' has no driver that takes new sessions" in details, details
    assert "127.0.0.1:1: down" in details, details
    assert "Connection refused" in details, details  # its last probe error

    # The driver has been down longer than the wait now: the next call fails at once.
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Config(_config(str(uuid.uuid4())), timeout=60)
    assert time.monotonic() - started < 1.0
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "127.0.0.1:1: down, last probe: UNAVAILABLE" in (err.value.details() or "")


async def test_a_driver_back_within_the_wait_takes_the_call() -> None:
    port = free_port()
    driver = FakeDriver(port=port)
    replica = await _replica(f"127.0.0.1:{port}", recover_threshold=1)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
    try:
        # Down by the first call's confirming probe, then started while the call waits.
        call = Stub(channel).Config(_config(str(uuid.uuid4())), timeout=60)
        await _eventually_down(replica, driver.address)
        await driver.start()
        response = await call
        assert response.pairs[0].value == str(port)
    finally:
        await channel.close()
        await replica.stop(0)
        await driver.stop()


async def _eventually_down(replica: Replica, address: str) -> None:
    from tests.helpers import eventually

    await eventually(lambda: replica.health.is_down(address), "the driver to be down", 5)
