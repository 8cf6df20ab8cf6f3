"""A replica's own view of its drivers' health: active probes plus passive failures.

The state machine and the probe are common/health.py's; this module runs them for every
driver of the replica's membership and says when a driver goes down or comes back.

Invariants:
- Time is injected: `clock` stamps when a driver went down (for the log line of its
  recovery) and `sleep` waits between probe rounds, so tests drive rounds without waiting.
- Only `report` changes a driver's state, and it tells `on_change` of every change before
  it returns: whoever awaited `report` (or `confirm_failure`) sees the new state in the
  membership snapshot too.
- The ejection cap (`max_ejection_percent`, Envoy's outlier detection cap): probes alone
  never mark more than `ejection_limit(size, percent) = max(1, size * percent // 100)`
  drivers of one pool down, where `size` counts every member of the pool in any state
  (active, draining, down). What counts against the limit: the pool's members this
  replica's probes hold down. What does not: members the registry itself announces down
  (their agent saw them fail) — they neither count nor are ever held up. The cap is
  lifted for a pool none of whose other members answered this replica's last probe (a
  member not probed yet counts as answering): holding a dead pool up would only keep the
  replica ready for calls that fail, and with no live driver left nothing can move.
  A passive failure confirmed by a probe (`confirm_failure`) is a probe verdict too and
  obeys the cap. A driver that is not a member (a pinned driver only another replica
  knows) is a pool of its own: it may always go down. Drivers crossing the threshold in
  one probe round are decided in address order.
- A driver held up by the cap stays live (it keeps its sessions and takes new ones); each
  further failed probe asks again, so the cap lifts as soon as another member recovers.
  One warning per driver and hold; every refused ejection counts in
  `spark_router_ejections_capped_total{pool}`.
- Each failed probe's reason is kept (`last_errors`, until the driver answers again), so a
  call that finds no live driver can say why each one is not (errors.NoLiveDriver).
- `await_recovery` is the one wait of the data plane for health: bounded by `wait` after
  the latest of the drivers went down (by this replica's verdict), so a pool that has been
  dead for longer fails its calls at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace

from common.health import (
    PLAINTEXT,
    Diagnosis,
    DriverDialing,
    HealthState,
    Probe,
    apply_probe,
    diagnose,
)
from registry.models import Driver, DriverState
from router.config import Settings
from router.telemetry import Telemetry

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def ejection_limit(pool_size: int, max_percent: int) -> int:
    """How many of a pool's drivers probes alone may hold down: the share, but at least one."""
    return max(1, pool_size * max_percent // 100)


def may_eject(
    address: str,
    members: Iterable[Driver],
    states: Mapping[str, HealthState],
    max_percent: int,
) -> bool:
    """Whether probes may mark `address` down now (the ejection cap; pure).

    `members` is the membership as the registry announces it (static drivers, registry
    records, drain marks; not this replica's own verdicts), `states` this replica's probe
    states by address.
    """
    by_address = {d.address: d for d in members}
    driver = by_address.get(address)
    if driver is None or driver.state is DriverState.DOWN:
        return True  # a pool of its own, or the registry says so already
    pool = [d for d in by_address.values() if d.pool == driver.pool]
    others = [d for d in pool if d.address != address]
    held_down = sum(1 for d in others if _probed_down(d, states))
    if held_down < ejection_limit(len(pool), max_percent):
        return True
    return not any(_answering(d, states) for d in others)


def _probed_down(driver: Driver, states: Mapping[str, HealthState]) -> bool:
    """Down by this replica's probes, not by the registry's word."""
    state = states.get(driver.address)
    return (
        state is not None
        and state.state is DriverState.DOWN
        and driver.state is not DriverState.DOWN
    )


def _answering(driver: Driver, states: Mapping[str, HealthState]) -> bool:
    """Whether this replica's last probe of the driver succeeded (not probed yet: assumed)."""
    state = states.get(driver.address)
    return state is None or state.good > 0


class Health:
    """One view of "is this driver live" for a replica: active probes plus passive failures.

    Every known driver is probed every `probe_interval_seconds` with a real Spark Connect
    call bounded by `probe_timeout_seconds` (a hung driver fails it); `fail_threshold`
    failures in a row mark it down, `recover_threshold` successes bring it back (no flip on
    one bad signal). A call that cannot reach a driver is a passive signal: it triggers one
    immediate confirming probe, and if that fails too the driver is down at once (a refused
    connection confirmed twice is not noise). `on_change` is told of every state change.
    `members()` is the membership as announced (before this replica's verdicts): whom
    `run` probes, and the pools the ejection cap counts in. Without a `probe`, drivers are
    probed with common/health.py's Spark Connect probe (`diagnose`: it says why it failed),
    dialed as `dialing` says (TLS, the backend token), the way the replica's calls reach
    them; a given `probe` (True/False) fails with the reason "probe failed".
    """

    def __init__(
        self,
        settings: Settings,
        on_change: Callable[[str, bool], Awaitable[None]],
        probe: Probe | None = None,
        telemetry: Telemetry | None = None,
        *,
        dialing: DriverDialing = PLAINTEXT,
        members: Callable[[], Iterable[Driver]] = tuple,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._on_change = on_change
        self._telemetry = telemetry
        self._probe: Diagnosis = (
            functools.partial(diagnose, dialing=dialing) if probe is None else _diagnosis(probe)
        )
        self._members = members
        self._clock = clock
        self._sleep = sleep
        self._states: dict[str, HealthState] = {}
        self._down_since: dict[str, float] = {}
        self._held: set[str] = set()  # held up by the cap, warned about once
        self._errors: dict[str, str] = {}  # last failed probe's reason, until one answers
        self._changed = asyncio.Event()  # set (and replaced) on every state change

    def is_down(self, address: str) -> bool:
        """Whether probes have marked the driver down."""
        state = self._states.get(address)
        return state is not None and state.state is DriverState.DOWN

    @property
    def down(self) -> frozenset[str]:
        """Every driver marked down."""
        return frozenset(a for a, s in self._states.items() if s.state is DriverState.DOWN)

    @property
    def held(self) -> frozenset[str]:
        """Drivers whose probes fail but that the ejection cap keeps live."""
        return frozenset(self._held)

    @property
    def last_errors(self) -> Mapping[str, str]:
        """Why each driver's last probe failed, for drivers whose last probe failed."""
        return dict(self._errors)

    async def report(self, address: str, ok: bool, error: str | None = None) -> None:
        """Apply one probe result (`error`: why it failed)."""
        if ok:
            self._errors.pop(address, None)
        else:
            self._errors[address] = error or "probe failed"
        before = self._states.get(address, HealthState(DriverState.ACTIVE))
        after = apply_probe(before, ok, self._settings)
        ejecting = after.state is DriverState.DOWN and before.state is not DriverState.DOWN
        if ejecting and not self._may_eject(address):
            # The streak stays, so the next failed probe asks the cap again.
            after = replace(after, state=before.state)
        if after.state is DriverState.DOWN or ok:
            self._held.discard(address)
        self._states[address] = after
        if self._telemetry is not None:
            self._telemetry.probe(address, ok, after.state is not DriverState.DOWN)
        if after.state is not before.state:
            self._log_change(address, after)
            await self._on_change(address, after.state is not DriverState.DOWN)
            self._changed.set()  # after on_change: waiters see the new membership
            self._changed = asyncio.Event()

    async def await_recovery(self, addresses: Iterable[str], wait: float) -> bool:
        """Wait until one of `addresses` is live again; False at once or after the bound.

        The bound is `wait` seconds after the latest of them went down by this replica's
        probes: only drivers that went down that recently are waited for. A driver never
        seen down here (the registry says so, or it is draining) is not.
        """
        addresses = tuple(addresses)
        since = [self._down_since[a] for a in addresses if a in self._down_since]
        if not since:
            return False
        deadline = max(since) + wait
        while (remaining := deadline - self._clock()) > 0:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                return False
            if any(not self.is_down(a) for a in addresses):
                return True
        return False

    def _may_eject(self, address: str) -> bool:
        """Ask the cap; say so (once per hold) and count it when it refuses."""
        members = tuple(self._members())
        percent = self._settings.max_ejection_percent
        if may_eject(address, members, self._states, percent):
            return True
        pool = next(d.pool for d in members if d.address == address)
        if self._telemetry is not None:
            self._telemetry.ejections_capped.labels(pool).inc()
        if address not in self._held:
            self._held.add(address)
            size = sum(1 for d in members if d.pool == pool)
            log.warning(
                "driver %s fails its probes but stays live: max_ejection_percent=%d lets "
                "probes hold at most %d of pool %r's %d drivers down while others answer, "
                "and as many are",
                address,
                percent,
                ejection_limit(size, percent),
                pool,
                size,
            )
        return False

    def _log_change(self, address: str, after: HealthState) -> None:
        now = self._clock()
        if after.state is DriverState.DOWN:
            self._down_since[address] = now
            log.warning("driver %s is down (%d probes in a row failed)", address, after.bad)
            return
        since = self._down_since.pop(address, None)
        down_for = "" if since is None else f", down for {now - since:.1f}s"
        log.warning(
            "driver %s is live again (%d probes in a row answered%s)", address, after.good, down_for
        )

    async def confirm_failure(self, address: str) -> bool:
        """After a call could not reach `address`: probe now; True if the driver is down."""
        if self.is_down(address):
            return True
        error = await self._probe(address, self._settings.probe_timeout_seconds)
        if error is None:
            await self.report(address, True)
            return False
        state = self._states.get(address, HealthState(DriverState.ACTIVE))
        self._states[address] = HealthState(
            state.state, good=0, bad=self._settings.fail_threshold - 1
        )
        await self.report(address, False, error)
        return self.is_down(address)  # the ejection cap may have held it up

    async def run(self) -> None:
        """Probe every driver `members()` names, forever, a probe interval after each round."""
        while True:
            targets = sorted({d.address for d in self._members()})
            results = await asyncio.gather(
                *(self._probe(a, self._settings.probe_timeout_seconds) for a in targets)
            )
            for address, error in zip(targets, results, strict=True):
                await self.report(address, error is None, error)
            for gone in set(self._states) - set(targets):
                del self._states[gone]
                self._down_since.pop(gone, None)
                self._errors.pop(gone, None)
                self._held.discard(gone)
                if self._telemetry is not None:
                    self._telemetry.forget_driver(gone)
            await self._sleep(self._settings.probe_interval_seconds)


def _diagnosis(probe: Probe) -> Diagnosis:
    """A True/False probe as one that gives a (generic) reason when it fails."""

    async def diagnosed(address: str, timeout: float) -> str | None:
        return None if await probe(address, timeout) else "probe failed"

    return diagnosed
