"""One gRPC channel per driver, created on first use and reused by every call to it.

This module owns connections and driver health only; which driver a call goes to is
placement's job.
Channels fail fast (no wait-for-ready): a call to a driver that refuses connections
fails at once with UNAVAILABLE instead of queueing, so the proxy can name the driver.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

import grpc
import grpc.aio

from registry.agent import HealthState, Probe, apply_probe
from registry.agent import probe as agent_probe
from registry.models import DriverState
from router.config import Settings
from router.telemetry import Telemetry

log = logging.getLogger(__name__)


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


class Health:
    """One view of "is this driver live" for a replica: active probes plus passive failures.

    Every known driver is probed every `probe_interval_seconds` with a real Spark Connect
    call bounded by `probe_timeout_seconds` (a hung driver fails it); `fail_threshold`
    failures in a row mark it down, `recover_threshold` successes bring it back (no flip on
    one bad signal). A call that cannot reach a driver is a passive signal: it triggers one
    immediate confirming probe, and if that fails too the driver is down at once (a refused
    connection confirmed twice is not noise). `on_change` is told of every state change.
    """

    def __init__(
        self,
        settings: Settings,
        on_change: Callable[[str, bool], Awaitable[None]],
        probe: Probe = agent_probe,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._settings = settings
        self._on_change = on_change
        self._telemetry = telemetry
        self._probe = probe
        self._states: dict[str, HealthState] = {}

    def is_down(self, address: str) -> bool:
        """Whether probes have marked the driver down."""
        state = self._states.get(address)
        return state is not None and state.state is DriverState.DOWN

    @property
    def down(self) -> frozenset[str]:
        """Every driver marked down."""
        return frozenset(a for a, s in self._states.items() if s.state is DriverState.DOWN)

    async def report(self, address: str, ok: bool) -> None:
        """Apply one probe result."""
        before = self._states.get(address, HealthState(DriverState.ACTIVE))
        after = apply_probe(before, ok, self._settings)
        self._states[address] = after
        if self._telemetry is not None:
            self._telemetry.probe(address, ok, after.state is not DriverState.DOWN)
        if after.state is not before.state:
            log.warning(
                "driver %s is %s (%d probes in a row %s)",
                address,
                "down" if after.state is DriverState.DOWN else "live again",
                after.bad if after.state is DriverState.DOWN else after.good,
                "failed" if after.state is DriverState.DOWN else "answered",
            )
            await self._on_change(address, after.state is not DriverState.DOWN)

    async def confirm_failure(self, address: str) -> bool:
        """After a call could not reach `address`: probe now; True if the driver is down."""
        if self.is_down(address):
            return True
        if await self._probe(address, self._settings.probe_timeout_seconds):
            await self.report(address, True)
            return False
        state = self._states.get(address, HealthState(DriverState.ACTIVE))
        self._states[address] = HealthState(
            state.state, good=0, bad=self._settings.fail_threshold - 1
        )
        await self.report(address, False)
        return True

    async def run(self, addresses: Callable[[], Iterable[str]]) -> None:
        """Probe every driver `addresses()` names, forever, every probe interval."""
        while True:
            targets = sorted(set(addresses()))
            results = await asyncio.gather(
                *(self._probe(a, self._settings.probe_timeout_seconds) for a in targets)
            )
            for address, ok in zip(targets, results, strict=True):
                await self.report(address, ok)
            for gone in set(self._states) - set(targets):
                del self._states[gone]
                if self._telemetry is not None:
                    self._telemetry.forget_driver(gone)
            await asyncio.sleep(self._settings.probe_interval_seconds)
