"""Calls in flight to a driver that hangs are cut when probes mark it down, not left to hang.

The hung driver is a fake driver in a process of its own, stopped with SIGSTOP: its
connections stay open, so only the router's cut (Upstreams.cut) ends those calls.
"""

from __future__ import annotations

import asyncio
import os
import signal
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
from tests.helpers import eventually, read_line_matching, spawn, stop

PORT_KEY = "spark.connect.grpc.binding.port"


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[int, FakeDriver, Replica]]:
    """(pid of a fake driver process, an in-process fake driver, a replica in front of both)."""
    proc = spawn(["-m", "loadtest.fake_driver", "--listen", "127.0.0.1:0"])
    steady = FakeDriver()
    await steady.start()
    replica: Replica | None = None
    try:
        line = read_line_matching(proc, "listening on", timeout=30)
        address = line.rsplit(" ", 1)[1].strip()
        settings = load_settings(
            listen="127.0.0.1:0",
            drivers=[address, steady.address],
            probe_interval_seconds=0.2,
            probe_timeout_seconds=0.5,
        )
        replica = Replica(settings)
        await replica.start()
        yield proc.pid, steady, replica
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        if replica is not None:
            await replica.stop(0)
        await steady.stop()
        stop(proc)


def _config(session: str) -> base_pb2.ConfigRequest:
    req = base_pb2.ConfigRequest(session_id=session)
    req.operation.get.keys.append(PORT_KEY)
    return req


async def _session_on(stub: base_pb2_grpc.SparkConnectServiceStub, avoid: int) -> str:
    """A new session pinned to the driver whose port is not `avoid`."""
    for _ in range(64):  # the ring puts about half of new sessions on each driver
        s = str(uuid.uuid4())
        if (await stub.Config(_config(s), timeout=10)).pairs[0].value != str(avoid):
            return s
    raise AssertionError("64 new sessions all landed on one driver")


async def test_calls_in_flight_to_a_hung_driver_are_cut_and_retried_at_once(
    cluster: tuple[int, FakeDriver, Replica],
) -> None:
    pid, steady, replica = cluster
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        stub = base_pb2_grpc.SparkConnectServiceStub(channel)
        s = await _session_on(stub, avoid=steady.port)
        # Waiting for their first answer: a unary call and a stream.
        slow = [("x-fake-delay-ms", "60000")]  # answered only after the test's deadline
        unary = asyncio.ensure_future(stub.Config(_config(s), metadata=slow, timeout=40))
        waiting = stub.ExecutePlan(
            base_pb2.ExecutePlanRequest(session_id=s), metadata=slow, timeout=40
        )
        first = asyncio.ensure_future(waiting.read())
        # Half-way through its result: a stream whose client read one message so far.
        big = [("x-fake-batches", "100"), ("x-fake-batch-bytes", str(1 << 20))]
        halfway = stub.ExecutePlan(
            base_pb2.ExecutePlanRequest(session_id=s), metadata=big, timeout=40
        )
        assert (await halfway.read()).HasField("arrow_batch")
        started = time.monotonic()
        os.kill(pid, signal.SIGSTOP)

        # Nothing reached their clients yet: both are retried on the live driver at once.
        def retried(method: str) -> bool:
            return any(c.method == method and c.session_id == s for c in steady.calls)

        await eventually(lambda: retried("Config") and retried("ExecutePlan"), "retries", 20)
        assert not unary.done() and not first.done()  # waiting their delay on the live one
        # The stream half-way runs again on the live driver: its client reads on, and gets
        # each batch once (the rerun's first one is compared with what it has, not resent).
        rest = []
        for _ in range(200):
            message = await asyncio.wait_for(halfway.read(), 20)
            if message is grpc.aio.EOF:
                break
            rest.append(message)
        assert [m.HasField("arrow_batch") for m in rest] == [True] * 99 + [False]
        assert rest[-1].HasField("result_complete")
        assert sum(c.method == "ExecutePlan" and c.session_id == s for c in steady.calls) == 2
        # Within the probes' budget, not the calls' deadlines or the keepalive's verdict.
        assert time.monotonic() - started < 15
        unary.cancel()
        waiting.cancel()
        got = await stub.Config(_config(s), timeout=10)
        assert got.pairs[0].value == str(steady.port)
