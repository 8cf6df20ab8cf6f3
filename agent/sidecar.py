"""The driver-side sidecar (`spark-router agent`): announces one Spark Connect driver.

It runs next to a driver, probes it with a real Spark Connect call every
`heartbeat_interval`, and keeps the driver's record in the registry up to date. Invariants:

- **Live** means heartbeated within `ttl`: every heartbeat is an `upsert_driver(..., ttl)`,
  so a record whose agent died (or lost the registry) vanishes from `drivers()` within `ttl`.
- **Not announced before it answers**: nothing is written until the first probe succeeds,
  so a driver that never answered is never offered to routers.
- **Down** is announced, not implied: after `fail_threshold` failed probes in a row (refused,
  error status, or no answer within `probe_timeout`: a hung driver counts as failing) the
  record says `down` and keeps being heartbeated, so routers move its sessions instead of
  waiting for the record to expire. `recover_threshold` good probes in a row make it `active`
  again. One bad or good probe never flips the state (`apply_probe`, pure).
- **Deregistration on stop**: on SIGTERM/SIGINT the agent removes the record at once (after
  any heartbeat already in flight, never before it, so a late write cannot resurrect it), so
  routers stop placing new sessions there without waiting for the TTL. A second signal exits
  at once; the record then expires within `ttl`.
- **Registry unreachable**: a heartbeat that fails (`RegistryUnavailable`, or no answer
  within `ttl`, after which it would be moot) is logged once per outage and retried at the
  next interval; the agent never exits because of it. Meanwhile routers drop the record when
  its TTL runs out, which is the right outcome: a driver nobody can vouch for is not offered.
  At start-up the registry must answer within a few attempts, else `run_agent` returns 3.
- The probe dials the driver as `AgentSettings.dialing` says (TLS, the backend token: the
  same `DriverDialing` routers use), so a driver behind a token or a TLS sidecar is probed
  the way routers reach it. The token is never logged.
- The agent owns only its own record; it holds no placement policy. It writes the states
  `active` and `down` only (an operator's `draining` is overwritten by the next heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.addresses import address_problem, redact_url
from common.health import PLAINTEXT, DriverDialing, HealthState, Probe, apply_probe
from common.health import probe as spark_connect_probe
from common.lifecycle import EXIT_OK, EXIT_STARTUP_FAILURE, Signals, finish_unless_forced
from registry.base import Registry, RegistryUnavailable
from registry.models import DEFAULT_POOL, Driver, DriverState

__all__ = [
    "Agent",
    "AgentSettings",
    "StartupFailure",
    "describe_change",
    "open_checked_registry",
    "run_agent",
    "serve_agent",
]

log = logging.getLogger(__name__)

STARTUP_ATTEMPTS = 3
"""How many times the registry is tried at start-up, `heartbeat_interval` apart."""
_CLOSE_TIMEOUT = 2.0

# Store failures the agent rides out. Stores should raise only RegistryUnavailable, but a
# raw socket error from a store is an outage too, and never a reason to crash the sidecar.
_REGISTRY_DOWN = (RegistryUnavailable, OSError, asyncio.TimeoutError)

# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, init=False)
class AgentSettings:
    """Everything the agent is told; validated when built (ValueError, one line per problem)."""

    driver: str  # HOST:PORT the agent probes
    advertise: str  # HOST:PORT routers dial (the driver's identity in the registry)
    pool: str
    weight: int
    heartbeat_interval: float  # seconds between probes (each probe is followed by a heartbeat)
    ttl: float  # seconds a record stays live after its last heartbeat
    probe_timeout: float  # deadline of one probe, connection included
    fail_threshold: int  # failed probes in a row before the driver is marked down
    recover_threshold: int  # good probes in a row before a down driver is active again
    dialing: DriverDialing  # how the probe reaches the driver (TLS, token)

    def __init__(
        self,
        driver: str,
        advertise: str | None = None,
        pool: str | None = DEFAULT_POOL,
        weight: int | None = 1,
        heartbeat_interval: float | None = 2.0,
        ttl: float | None = None,
        probe_timeout: float | None = 2.0,
        fail_threshold: int | None = 3,
        recover_threshold: int | None = 2,
        dialing: DriverDialing = PLAINTEXT,
    ) -> None:
        """Validate; None means the default (advertise: driver, ttl: 3 x heartbeat_interval)."""
        interval = 2.0 if heartbeat_interval is None else float(heartbeat_interval)
        driver = driver.strip()
        values: dict[str, Any] = {
            "driver": driver,
            "advertise": driver if advertise is None else advertise.strip(),
            "pool": DEFAULT_POOL if pool is None else pool,
            "weight": 1 if weight is None else weight,
            "heartbeat_interval": interval,
            "ttl": 3 * interval if ttl is None else float(ttl),
            "probe_timeout": 2.0 if probe_timeout is None else float(probe_timeout),
            "fail_threshold": 3 if fail_threshold is None else fail_threshold,
            "recover_threshold": 2 if recover_threshold is None else recover_threshold,
            "dialing": dialing,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        problems = self._problems()
        if problems:
            raise ValueError("\n".join(problems))

    def _problems(self) -> list[str]:
        """Every invalid value, one message each."""
        problems = []
        addresses = {"driver": self.driver}
        if self.advertise != self.driver:  # else one bad value would be reported twice
            addresses["advertise"] = self.advertise
        for name, address in addresses.items():
            problem = address_problem(name, address)
            if problem is not None:
                problems.append(problem)
        if not self.pool.strip():
            problems.append("pool: must not be empty")
        for name in ("weight", "fail_threshold", "recover_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}: {value!r} must be an integer >= 1")
        for name in ("heartbeat_interval", "probe_timeout", "ttl"):
            if not getattr(self, name) > 0:  # also rejects NaN
                problems.append(f"{name}: {getattr(self, name)!r} must be > 0 seconds")
        if self.ttl > 0 and self.heartbeat_interval > 0 and not self.ttl > self.heartbeat_interval:
            problems.append(
                f"ttl: {self.ttl:g}s must exceed heartbeat_interval ({self.heartbeat_interval:g}s)"
                ", else the record expires between heartbeats"
            )
        # A probe that hangs delays the next heartbeat by up to probe_timeout.
        if self.ttl > 0 and self.probe_timeout > 0 and not self.ttl > self.probe_timeout:
            problems.append(
                f"ttl: {self.ttl:g}s must exceed probe_timeout ({self.probe_timeout:g}s)"
                ", else a hung driver's record expires instead of showing it down"
            )
        return problems


# --------------------------------------------------------------------------- decisions


def describe_change(before: HealthState, after: HealthState, settings: AgentSettings) -> str | None:
    """The one log line a state change deserves, or None when the state did not change."""
    if before.state is after.state or after.state is None:
        return None
    where = f"driver {settings.driver} (advertised as {settings.advertise}, pool {settings.pool})"
    if before.state is None:
        return f"{where} answered: registered as {after.state.value}"
    if after.state is DriverState.DOWN:
        return f"{where} is down: {after.bad} probes in a row failed; announcing it down"
    if after.state is DriverState.ACTIVE:
        return f"{where} is active again after {after.good} good probes in a row"
    return f"{where} is now {after.state.value}"


# --------------------------------------------------------------------------- agent


class Agent:
    """Probes one driver and keeps its registry record: heartbeat, down, deregistration."""

    def __init__(
        self,
        settings: AgentSettings,
        registry: Registry,
        *,
        probe: Probe | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Nothing runs until `run`; without `probe`, the Spark Connect probe over `dialing`."""
        self.settings = settings
        self._registry = registry
        self._probe: Probe = (
            functools.partial(spark_connect_probe, dialing=settings.dialing)
            if probe is None
            else probe
        )
        self._clock = clock
        self.health = HealthState()
        self._outage_since: float | None = None
        self._told_unanswered = False

    async def run(self, stop: asyncio.Event) -> None:
        """Probe and heartbeat every interval until `stop` is set; then deregister."""
        s = self.settings
        while not stop.is_set():
            due = self._clock() + s.heartbeat_interval
            ok = await self._probe_unless_stopped(stop)
            if ok is None:
                break
            await self._apply(ok)
            remaining = due - self._clock()
            if remaining > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), remaining)
        await self._deregister()

    async def _probe_unless_stopped(self, stop: asyncio.Event) -> bool | None:
        """The probe's result, or None if `stop` was set first (the probe is cancelled)."""
        s = self.settings
        probing = asyncio.ensure_future(self._probe(s.driver, s.probe_timeout))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((probing, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not probing.done():
                probing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probing
        if probing.cancelled():
            return None
        return bool(probing.result())

    async def _apply(self, ok: bool) -> None:
        """Fold one probe result into the health, log a change, heartbeat if registered."""
        before = self.health
        self.health = after = apply_probe(before, ok, self.settings)
        line = describe_change(before, after, self.settings)
        if line is not None:
            log.log(logging.WARNING if after.state is DriverState.DOWN else logging.INFO, line)
        elif not after.registered and not self._told_unanswered:
            self._told_unanswered = True
            log.info(
                "driver %s does not answer yet; not registered until it does",
                self.settings.driver,
            )
        if after.state is not None:
            await self._heartbeat(after.state)

    async def _heartbeat(self, state: DriverState) -> None:
        """Write the record with its TTL; ride out registry outages (logged once per outage)."""
        s = self.settings
        driver = Driver(s.advertise, s.pool, s.weight, state)
        try:
            # After `ttl` the record has expired anyway: a slower write is a failed one.
            await asyncio.wait_for(self._registry.upsert_driver(driver, ttl=s.ttl), s.ttl)
        except _REGISTRY_DOWN as exc:
            if self._outage_since is None:
                self._outage_since = self._clock()
                log.warning(
                    "registry unavailable (%s): cannot heartbeat %s; retrying every %gs "
                    "(routers drop the record %gs after the last heartbeat)",
                    _reason(exc),
                    s.advertise,
                    s.heartbeat_interval,
                    s.ttl,
                )
            return
        if self._outage_since is not None:
            log.info(
                "registry reachable again after %.1fs: %s heartbeated as %s",
                self._clock() - self._outage_since,
                s.advertise,
                state.value,
            )
            self._outage_since = None

    async def _deregister(self) -> None:
        """Remove the record so routers stop placing sessions here at once (bounded by ttl)."""
        s = self.settings
        try:
            await asyncio.wait_for(self._registry.remove_driver(s.advertise), s.ttl)
        except _REGISTRY_DOWN as exc:
            log.warning(
                "could not deregister %s (%s); routers drop it when its record expires (%gs)",
                s.advertise,
                _reason(exc),
                s.ttl,
            )
            return
        log.info("deregistered %s", s.advertise)


def _reason(exc: BaseException) -> str:
    """A short description of a registry failure."""
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- entry points


async def serve_agent(settings: AgentSettings, registry: Registry, stop: asyncio.Event) -> None:
    """Run the agent on an open registry until `stop` is set; deregisters before returning."""
    log.info(
        "agent: probing %s every %gs (timeout %gs); advertising %s in pool %s, weight %d, ttl %gs",
        settings.driver,
        settings.heartbeat_interval,
        settings.probe_timeout,
        settings.advertise,
        settings.pool,
        settings.weight,
        settings.ttl,
    )
    await Agent(settings, registry).run(stop)


class StartupFailure(Exception):
    """The registry could not be opened or reached at start-up; str() says why."""


async def open_checked_registry(
    url: str, stop: asyncio.Event, *, attempts: int = STARTUP_ATTEMPTS, delay: float = 1.0
) -> Registry | None:
    """Open the registry at `url` and check it answers; None if `stop` was set meanwhile.

    Tries `attempts` times, `delay` s apart; raises StartupFailure on an invalid URL (at once)
    or when the registry is still unreachable after the last attempt.
    """
    from registry import open_registry  # looked up per call: tests substitute stores

    opened: Registry | None = None
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            if opened is None:
                opened = open_registry(url)
            # A read proves the backend answers (stores may connect lazily).
            await asyncio.wait_for(opened.drivers(), max(delay, 1.0))
            return opened
        except ValueError as exc:
            raise StartupFailure(f"invalid registry URL {redact_url(url)}: {exc}") from exc
        except _REGISTRY_DOWN as exc:
            last = exc
            log.debug("registry attempt %d/%d failed: %s", attempt, attempts, _reason(exc))
        if attempt < attempts:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                if opened is not None:
                    await _close(opened)
                return None
    if opened is not None:
        await _close(opened)
    raise StartupFailure(
        f"registry {redact_url(url)} unreachable after {attempts} attempts: "
        f"{_reason(last) if last is not None else 'unknown error'}"
    )


async def _close(registry: Registry) -> None:
    """Close a registry, bounded; a failure to close is only worth a debug line."""
    try:
        await asyncio.wait_for(registry.close(), _CLOSE_TIMEOUT)
    except (*_REGISTRY_DOWN, RuntimeError) as exc:
        log.debug("closing the registry failed: %s", _reason(exc))


async def _open_and_serve(settings: AgentSettings, registry_url: str, stop: asyncio.Event) -> int:
    """Open the registry, serve until stopped, close; the exit code."""
    try:
        opened = await open_checked_registry(registry_url, stop, delay=settings.heartbeat_interval)
    except StartupFailure as exc:
        log.error("agent cannot start: %s", exc)
        return EXIT_STARTUP_FAILURE
    if opened is None:
        return EXIT_OK
    try:
        await serve_agent(settings, opened, stop)
    finally:
        await _close(opened)
    return EXIT_OK


async def _serve_until_signal(settings: AgentSettings, registry_url: str) -> int:
    """Run until SIGTERM/SIGINT (deregister, exit); a second signal exits at once."""
    async with Signals() as signals:
        finished, code = await finish_unless_forced(
            _open_and_serve(settings, registry_url, signals.stopping), signals
        )
    if not finished:
        log.warning(
            "second signal: exiting now; routers drop %s when its record expires (%gs)",
            settings.advertise,
            settings.ttl,
        )
    return code if code is not None else EXIT_OK


def run_agent(settings: AgentSettings, registry_url: str) -> int:
    """Run the agent in this process until signalled; 0, or 3 if the registry is unusable."""
    return asyncio.run(_serve_until_signal(settings, registry_url))
