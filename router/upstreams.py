"""One gRPC channel per driver, created on first use and reused by every call to it.

This module owns connections only; which driver a call goes to is placement's job.
Channels fail fast (no wait-for-ready): a call to a driver that refuses connections
fails at once with UNAVAILABLE instead of queueing, so the proxy can name the driver.
"""

from __future__ import annotations

import grpc
import grpc.aio

from router.config import Settings


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments shared by the router's upstream channels and its server."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
    ]


class Upstreams:
    """The router's channels to its drivers, by address."""

    def __init__(self, settings: Settings) -> None:
        self._options = [
            *channel_options(settings),
            # Reconnect quickly once a driver comes back; the default backoff starts at 1 s.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel to a driver, created on first use."""
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = ch
        return ch

    async def discard(self, address: str) -> None:
        """Close and forget the channel to a driver that left."""
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        """Close every channel (in-flight calls are cancelled)."""
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()
