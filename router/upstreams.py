"""One gRPC channel per driver, created on first use and reused by every call to it.

This module owns connections only: which driver a call goes to is placement's job, whether
a driver is live is health.py's.
A driver that left the membership has its channel forgotten at once (a later call for a
session still pinned there dials a new one) and closed once its in-flight calls end, or
after `shutdown_grace_seconds`, the grace a stopping replica gives its calls; a driver that
is merely down keeps its channel (it may come back, and its calls are still running).
Channels fail fast (no wait-for-ready): a call to a driver that refuses connections
fails at once with UNAVAILABLE instead of queueing, so the proxy can name the driver.
Channels are dialed as `DriverDialing` says (router/tls.py: TLS or plaintext); the backend
token is not attached here but offered as `auth_metadata`, which whoever sends a call to a
driver appends to its metadata after dropping the client's own `authorization`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import grpc.aio

from common.health import DriverDialing
from router.config import Settings
from router.tls import driver_dialing

log = logging.getLogger(__name__)

# A bound on cached multicallables: drivers x 13 known paths, plus unknown methods' paths.
_MAX_CALLABLES = 4096


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments shared by the router's upstream channels and its server.

    Each call's HTTP/2 window is fixed at `stream_window_bytes`: with gRPC's BDP probing on
    (its default) windows grow to megabytes on a fast link, and a stream whose client
    stopped reading had its driver's output buffered in the router up to that window (300
    such streams of 13 MB results: +1.2 GB, measured; with the window fixed at 64 KiB:
    +190 MB). A message larger than the window still flows (grpc widens it for the message
    being read). 256 KiB by default: at 64 KiB loadtest/bench.py's stream throughput fell
    to 0.55x Envoy's (from 1.06x), at 256 KiB it was 1.36x.
    """
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", settings.stream_window_bytes),
    ]


# Spark's server takes client pings no more often than every 10 s (its
# spark.connect.grpc.keepAlive docs): pinging a driver faster would earn GOAWAY.
SPARK_MIN_PING_INTERVAL_SECONDS = 10.0


def driver_keepalive_options(settings: Settings) -> list[tuple[str, int]]:
    """Keepalive of the channels to drivers: a driver connection that died silently is noticed.

    Pings every `keepalive_time_seconds` (never more often than Spark accepts), with or
    without calls, as pyspark itself pings a driver; a ping unanswered for
    `keepalive_timeout_seconds` fails the connection, so calls on it end UNAVAILABLE (and
    the proxy's passive check confirms the driver dead) instead of waiting for their deadline.
    """
    interval = max(settings.keepalive_time_seconds, SPARK_MIN_PING_INTERVAL_SECONDS)
    return [
        ("grpc.keepalive_time_ms", int(interval * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        (
            "grpc.http2.ping_timeout_ms",
            int(settings.keepalive_timeout_seconds * 1000),
        ),  # see server.py
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class Upstreams:
    """The router's channels to its drivers, by address."""

    def __init__(self, settings: Settings, dialing: DriverDialing | None = None) -> None:
        """`dialing`: how to reach drivers (None: from the settings, router/tls.py)."""
        self._dialing = driver_dialing(settings) if dialing is None else dialing
        self._options = [
            *channel_options(settings),
            # Reconnect quickly once a driver comes back; the default backoff starts at 1 s.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000),
            *driver_keepalive_options(settings),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Multicallables per (driver, shape, path): built once, not on every call; a driver's
        # go with its channel (discard), so a departed channel's are never used again.
        self._calls: dict[tuple[str, str, str], Any] = {}
        self._grace = settings.shutdown_grace_seconds
        self._retiring: set[asyncio.Task[None]] = set()  # closes of departed drivers' channels

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel to a driver, created on first use."""
        ch = self._channels.get(address)
        if ch is None:
            ch = self._dialing.channel(address, self._options)
            self._channels[address] = ch
        return ch

    @property
    def auth_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata every call to a driver carries: the backend token's bearer header, or ()."""
        return self._dialing.metadata

    async def ready(self, address: str, timeout: float) -> bool:
        """Wait at most `timeout` s for the channel to a driver to connect; whether it did."""
        try:
            await asyncio.wait_for(self.channel(address).channel_ready(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def call(self, address: str, shape: str, path: str) -> Any:
        """The multicallable of `path` with `shape` (unary_unary, ...) on a driver's channel."""
        key = (address, shape, path)
        found = self._calls.get(key)
        if found is not None:
            return found
        multicallable = getattr(self.channel(address), shape)(path)
        if len(self._calls) > _MAX_CALLABLES:  # client-chosen paths (unknown methods)
            self._calls.clear()
        self._calls[key] = multicallable
        return multicallable

    def discard(self, address: str) -> None:
        """Forget the channel to a driver that left; it closes once its in-flight calls end."""
        self._retire(address, self._grace)

    def cut(self, address: str) -> None:
        """Cancel every call in flight to a driver marked down; later calls get a new channel.

        A hung driver keeps its connections open: without this, its calls would wait for
        their own deadlines (often none) or the keepalive's verdict, minutes later. Cut, the
        data plane answers them as from an unreachable driver, and clients retry at once.
        """
        self._retire(address, None)

    def _retire(self, address: str, grace: float | None) -> None:
        ch = self._channels.pop(address, None)
        if ch is None:
            return
        for key in [k for k in self._calls if k[0] == address]:
            del self._calls[key]
        # In the background: the membership refresh that calls this must not wait for calls.
        task = asyncio.ensure_future(ch.close(grace))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """Close every channel (in-flight calls are cancelled); wait for departed ones."""
        channels, self._channels = list(self._channels.values()), {}
        self._calls.clear()
        for ch in channels:
            await ch.close()
        if self._retiring:  # the server has stopped by now: their calls are over or cancelled
            await asyncio.gather(*self._retiring)
