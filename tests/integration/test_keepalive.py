"""Keepalive on the router port: clients' pings accepted while idle, dead clients closed.

The router's thresholds are shortened (seconds, not minutes) so that ten or more ping
intervals pass in a few seconds; what is checked is the settings' effect, the same at any
scale: pyspark pings every 60 s against a 10 s floor, these clients every 1 s against 0.5 s.
Observables: the client channel's connectivity and its one TCP connection (psutil: the same
local port before and after the idle), and for a dead client the server closing the socket.
"""

from __future__ import annotations

import asyncio
import struct
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import psutil
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

from loadtest.fake_driver import FakeDriver
from router.config import load_settings
from router.server import Replica

PING_MS = 1000  # the clients' keepalive interval
IDLE = 12.0  # seconds idle: twelve client pings
# Pings every second, idle or not, and never stops for lack of data: harsher than pyspark.
AGGRESSIVE = [
    ("grpc.keepalive_time_ms", PING_MS),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


async def _replica(driver: FakeDriver, **overrides: float) -> Replica:
    settings = load_settings(
        listen="127.0.0.1:0", drivers=[driver.address], admin_listen="off", **overrides
    )
    replica = Replica(settings)
    await replica.start()
    return replica


def _client_ports(router_port: int) -> set[int]:
    """Local ports of this process's TCP connections to the router (the client side)."""
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == router_port and c.status == psutil.CONN_ESTABLISHED
    }


def _server_side(router_port: int, peer_port: int) -> bool:
    """Whether the router still holds its end of the connection from `peer_port`."""
    return any(
        c.laddr.port == router_port and c.raddr and c.raddr.port == peer_port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED
    )


async def _config(channel: grpc.aio.Channel) -> None:
    req = base_pb2.ConfigRequest(session_id=str(uuid.uuid4()))
    req.operation.get_all.SetInParent()
    await base_pb2_grpc.SparkConnectServiceStub(channel).Config(req, timeout=10)


async def _idle(replica: Replica, seconds: float) -> tuple[set[grpc.ChannelConnectivity], bool]:
    """Call, stay idle `seconds` watching the channel, call again: (states seen, reconnected)."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{replica.port}", options=AGGRESSIVE
    ) as channel:
        await _config(channel)
        before = _client_ports(replica.port)
        assert len(before) == 1, before
        states = set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            states.add(channel.get_state())
            await asyncio.sleep(0.1)
        await _config(channel)  # works either way: a channel reconnects after a GOAWAY
        return states, _client_ports(replica.port) != before


async def test_an_idle_client_pinging_every_second_keeps_its_connection(
    driver: FakeDriver,
) -> None:
    replica = await _replica(driver, min_client_ping_interval_seconds=0.5)
    try:
        states, reconnected = await _idle(replica, IDLE)
    finally:
        await replica.stop(0)
    assert states == {grpc.ChannelConnectivity.READY}
    assert not reconnected


async def test_pings_faster_than_allowed_are_refused_which_the_check_above_would_see(
    driver: FakeDriver,
) -> None:
    """The control: the same client, pinging faster than the router's floor, gets GOAWAY."""
    replica = await _replica(driver, min_client_ping_interval_seconds=5.0)
    try:
        states, reconnected = await _idle(replica, 6.0)
    finally:
        await replica.stop(0)
    assert reconnected or states != {grpc.ChannelConnectivity.READY}


# --- a client that stops answering --------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING = 4, 6
ACK = 1


def _frame(kind: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, 0) + payload


async def _frames(reader: asyncio.StreamReader) -> AsyncIterator[tuple[int, int]]:
    """(type, flags) of each HTTP/2 frame the server sends, until it closes the socket."""
    while True:
        try:
            header = await reader.readexactly(9)
            length = int.from_bytes(header[:3], "big")
            await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return
        yield header[3], header[4]


async def _silent_client(port: int, within: float) -> tuple[float | None, int, bool]:
    """Open HTTP/2, ack the server's settings, then never answer a PING.

    Returns (seconds until the server closed the socket or None if it did not `within`,
    pings received, whether the server's end was still there just before).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    peer_port = writer.get_extra_info("sockname")[1]
    writer.write(PREFACE + _frame(SETTINGS))
    await writer.drain()
    started = time.monotonic()
    pings = 0
    held = False

    async def read() -> None:
        nonlocal pings, held
        async for kind, flags in _frames(reader):
            if kind == SETTINGS and not flags & ACK:
                writer.write(_frame(SETTINGS, ACK))  # a well-formed peer, until now
                await writer.drain()
            elif kind == PING and not flags & ACK:
                pings += 1  # never acked: the client "hangs" here
                held = _server_side(port, peer_port)

    try:
        await asyncio.wait_for(read(), within)
        closed_after: float | None = time.monotonic() - started
    except asyncio.TimeoutError:
        closed_after = None
    writer.close()
    return closed_after, pings, held


async def test_a_client_that_stops_answering_pings_is_closed_within_the_keepalive_bounds(
    driver: FakeDriver,
) -> None:
    short = await _replica(driver, keepalive_time_seconds=1.0, keepalive_timeout_seconds=1.0)
    default = await _replica(driver)  # keepalive 60 s + 20 s: the same client stays
    try:
        (closed, pings, held), (kept, _, _) = await asyncio.gather(
            _silent_client(short.port, 8.0), _silent_client(default.port, 5.0)
        )
    finally:
        await short.stop(0)
        await default.stop(0)
    assert pings >= 1 and held  # the router pinged while holding the connection
    # keepalive_time (1 s idle) + keepalive_timeout (1 s unanswered), plus scheduling slack.
    assert closed is not None and 1.5 < closed < 5.0, closed
    assert kept is None
