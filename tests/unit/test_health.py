"""The router's driver health: thresholds for probes, confirmation for passive failures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from common.health import HealthState
from registry.models import Driver, DriverState
from router.config import load_settings
from router.health import Health, ejection_limit, may_eject
from router.telemetry import Telemetry


class ScriptedProbe:
    """A probe whose answers the test decides."""

    def __init__(self) -> None:
        self.ok: dict[str, bool] = {}
        self.calls: list[str] = []

    async def __call__(self, address: str, timeout: float) -> bool:
        self.calls.append(address)
        return self.ok.get(address, True)


def _health(changes: list[tuple[str, bool]], probe: ScriptedProbe) -> Health:
    settings = load_settings(fail_threshold=3, recover_threshold=2)

    async def on_change(address: str, live: bool) -> None:
        changes.append((address, live))

    return Health(settings, on_change, probe)


async def test_down_only_after_the_threshold_and_back_after_recovery() -> None:
    changes: list[tuple[str, bool]] = []
    health = _health(changes, ScriptedProbe())
    for _ in range(2):
        await health.report("d1", False)
    assert not health.is_down("d1") and changes == []  # two failures: still live
    await health.report("d1", True)  # a success resets the streak
    for _ in range(2):
        await health.report("d1", False)
    assert not health.is_down("d1")
    await health.report("d1", False)
    assert health.is_down("d1") and changes == [("d1", False)]
    assert health.down == {"d1"}
    await health.report("d1", True)
    assert health.is_down("d1")  # one good probe is not enough
    await health.report("d1", True)
    assert not health.is_down("d1") and changes == [("d1", False), ("d1", True)]


async def test_a_passive_failure_confirmed_by_a_probe_is_down_at_once() -> None:
    changes: list[tuple[str, bool]] = []
    probe = ScriptedProbe()
    health = _health(changes, probe)
    probe.ok["d1"] = False
    assert await health.confirm_failure("d1") is True
    assert health.is_down("d1") and changes == [("d1", False)]
    assert probe.calls == ["d1"]
    assert await health.confirm_failure("d1") is True  # already down: no new probe
    assert probe.calls == ["d1"]


async def test_a_passive_failure_the_probe_contradicts_is_noise() -> None:
    changes: list[tuple[str, bool]] = []
    health = _health(changes, ScriptedProbe())
    assert await health.confirm_failure("d1") is False
    assert not health.is_down("d1") and changes == []


# --------------------------------------------------------------------------- injected time

WAIT = 5.0  # bound for conditions that hold within milliseconds
DOWN, ACTIVE = DriverState.DOWN, DriverState.ACTIVE


class Ticks:
    """An injected clock and sleep: a probe round runs only when the test calls `round()`."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self._go: asyncio.Queue[None] = asyncio.Queue()
        self.asleep: asyncio.Queue[None] = asyncio.Queue()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.asleep.put_nowait(None)
        await self._go.get()
        self.now += seconds

    async def round(self) -> None:
        """Let one more probe round run and wait until it is over."""
        self._go.put_nowait(None)
        await asyncio.wait_for(self.asleep.get(), WAIT)


class Env:
    """A Health over scripted probes and fixed members, its changes and its telemetry."""

    def __init__(self, members: Sequence[Driver], **settings: Any) -> None:
        self.members = list(members)
        self.probe = ScriptedProbe()
        self.ticks = Ticks()
        self.changes: list[tuple[str, bool]] = []
        self.telemetry = Telemetry()
        values: dict[str, Any] = {
            "fail_threshold": 3,
            "recover_threshold": 2,
            "probe_interval_seconds": 30.0,
        }
        values.update(settings)

        async def on_change(address: str, live: bool) -> None:
            self.changes.append((address, live))

        self.health = Health(
            load_settings(**values),
            on_change,
            self.probe,
            self.telemetry,
            members=lambda: self.members,
            clock=self.ticks.clock,
            sleep=self.ticks.sleep,
        )

    def fail(self, *addresses: str) -> None:
        for address in addresses:
            self.probe.ok[address] = False

    def answer(self, *addresses: str) -> None:
        for address in addresses:
            self.probe.ok[address] = True

    def capped(self, pool: str = "default") -> float:
        return self.telemetry.value("spark_router_ejections_capped_total", pool=pool)


@contextlib.asynccontextmanager
async def running(env: Env) -> AsyncIterator[Env]:
    """`env.health.run()` as a task whose first round is over; cancelled at the end."""
    task = asyncio.create_task(env.health.run())
    try:
        await asyncio.wait_for(env.ticks.asleep.get(), WAIT)
        yield env
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _pool(n: int, pool: str = "default") -> list[Driver]:
    return [Driver(f"d{i}:1", pool=pool) for i in range(1, n + 1)]


async def test_probe_rounds_follow_the_injected_sleep_not_the_wall_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="router.health")
    env = Env(_pool(2))  # 30 s between rounds: real sleeping would time the test out
    env.fail("d1:1")
    async with running(env):  # round 1
        await env.ticks.round()
        assert not env.health.is_down("d1:1") and env.changes == []  # two failures
        await env.ticks.round()
        assert env.health.down == {"d1:1"} and env.changes == [("d1:1", False)]
        assert env.probe.calls == ["d1:1", "d2:1"] * 3
        env.answer("d1:1")
        await env.ticks.round()
        assert env.health.is_down("d1:1")  # one good probe is not enough
        await env.ticks.round()
        assert env.health.down == frozenset() and env.changes[-1] == ("d1:1", True)
    assert env.ticks.slept == [30.0] * 5
    # Down at the third round, live at the fifth: two injected intervals later.
    assert "driver d1:1 is live again (2 probes in a row answered, down for 60.0s)" in caplog.text


async def test_a_driver_that_left_the_members_is_forgotten() -> None:
    env = Env(_pool(2), fail_threshold=1)
    env.fail("d2:1")
    async with running(env):
        assert env.health.down == {"d2:1"}
        env.members = env.members[:1]
        await env.ticks.round()
        assert env.health.down == frozenset()
        assert env.probe.calls[-1] == "d1:1"


# --------------------------------------------------------------------------- the ejection cap


@pytest.mark.parametrize(
    ("size", "percent", "limit"),
    [
        (1, 50, 1),
        (2, 50, 1),
        (3, 50, 1),
        (4, 50, 2),
        (10, 50, 5),
        (10, 0, 1),
        (3, 67, 2),
        (3, 100, 3),
        (20, 10, 2),
    ],
)
def test_ejection_limit_is_the_share_rounded_down_but_at_least_one(
    size: int, percent: int, limit: int
) -> None:
    assert ejection_limit(size, percent) == limit


FAILED = HealthState(ACTIVE, bad=1)  # failed its last probe, still live
DEAD = HealthState(DOWN, bad=5)  # held down by this replica's probes
RECOVERING = HealthState(DOWN, good=1)  # down, answering again
LIVE = HealthState(ACTIVE, good=4)


def test_one_driver_may_always_go_down_even_a_pool_of_one() -> None:
    assert may_eject("d1:1", _pool(1), {}, 50)
    assert may_eject("d1:1", _pool(2), {"d2:1": LIVE}, 50)
    assert may_eject("d1:1", _pool(3), {"d2:1": LIVE, "d3:1": LIVE}, 0)


def test_a_pool_of_two_keeps_its_second_driver_while_the_first_answers_again() -> None:
    members = _pool(2)
    assert not may_eject("d2:1", members, {"d1:1": RECOVERING}, 50)
    assert may_eject("d2:1", members, {"d1:1": RECOVERING}, 100)


def test_a_pool_of_three_at_fifty_percent_holds_the_second_failing_driver() -> None:
    members = _pool(3)
    states = {"d1:1": DEAD, "d2:1": FAILED, "d3:1": LIVE}
    assert not may_eject("d2:1", members, states, 50)
    assert may_eject("d2:1", members, states, 67)  # two of three


def test_a_pool_of_ten_at_fifty_percent_lets_five_go_down_and_holds_the_sixth() -> None:
    members = _pool(10)
    states = {f"d{i}:1": DEAD for i in range(1, 5)} | {f"d{i}:1": LIVE for i in range(5, 11)}
    assert may_eject("d5:1", members, states, 50)  # the fifth
    states["d5:1"] = DEAD
    assert not may_eject("d6:1", members, states, 50)


def test_drivers_the_registry_says_are_down_do_not_count_and_are_never_held() -> None:
    members = [Driver("d1:1", state=DOWN), *_pool(3)[1:]]
    states = {"d1:1": DEAD, "d2:1": FAILED, "d3:1": LIVE}
    assert may_eject("d2:1", members, states, 50)  # d1 is the registry's verdict, not ours
    members = [Driver("d1:1"), Driver("d2:1", state=DOWN), Driver("d3:1")]
    assert may_eject("d2:1", members, states, 50)


def test_the_cap_lifts_when_the_held_down_driver_recovers() -> None:
    members = _pool(3)
    states = {"d1:1": DEAD, "d2:1": FAILED, "d3:1": LIVE}
    assert not may_eject("d2:1", members, states, 50)
    states["d1:1"] = HealthState(ACTIVE, good=2)
    assert may_eject("d2:1", members, states, 50)


def test_the_cap_is_lifted_when_no_other_driver_of_the_pool_answers() -> None:
    members = _pool(3)
    assert may_eject("d3:1", members, {"d1:1": DEAD, "d2:1": FAILED}, 50)
    # A driver this replica has not probed yet counts as answering.
    assert not may_eject("d2:1", members, {"d1:1": DEAD}, 50)


def test_the_cap_counts_per_pool_and_not_for_strangers() -> None:
    members = [*_pool(2, "etl"), Driver("d3:1", pool="bi"), Driver("d4:1", pool="bi")]
    states = {"d1:1": DEAD, "d2:1": LIVE, "d4:1": LIVE}
    assert may_eject("d3:1", members, states, 50)  # etl's down driver is not bi's
    assert may_eject("other:1", members, {"d1:1": DEAD, "d3:1": DEAD}, 0)  # no member


async def test_health_holds_the_second_of_three_failing_drivers_up_until_the_first_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="router.health")
    env = Env(_pool(3), fail_threshold=1, recover_threshold=1)
    env.fail("d1:1", "d2:1")
    async with running(env):
        assert env.health.down == {"d1:1"} and env.health.held == {"d2:1"}
        assert env.changes == [("d1:1", False)]
        assert env.telemetry.value("spark_router_driver_up", driver="d2:1") == 1
        await env.ticks.round()  # still failing: refused again, told once
        assert env.health.down == {"d1:1"} and env.capped() == 2
        assert caplog.text.count("driver d2:1 fails its probes but stays live") == 1
        assert "max_ejection_percent=50" in caplog.text
        env.answer("d1:1")
        await env.ticks.round()  # d1 comes back first (address order): d2 may go now
        assert env.health.down == {"d2:1"} and env.health.held == frozenset()
        assert env.changes == [("d1:1", False), ("d1:1", True), ("d2:1", False)]


async def test_without_a_cap_the_same_drivers_both_go_down() -> None:
    env = Env(_pool(3), fail_threshold=1, max_ejection_percent=100)
    env.fail("d1:1", "d2:1")
    async with running(env):
        assert env.health.down == {"d1:1", "d2:1"} and env.capped() == 0


async def test_a_whole_pool_that_stops_answering_goes_down() -> None:
    env = Env(_pool(3), fail_threshold=3)
    env.fail("d1:1", "d2:1", "d3:1")
    async with running(env):
        for _ in range(2):
            await env.ticks.round()
        assert env.health.down == {"d1:1", "d2:1", "d3:1"} and env.capped() == 0


async def test_a_confirmed_passive_failure_obeys_the_cap() -> None:
    env = Env(_pool(3), fail_threshold=1)
    env.fail("d1:1")
    async with running(env):
        assert env.health.down == {"d1:1"}
        env.fail("d2:1")
        assert await env.health.confirm_failure("d2:1") is False  # held: the call fails as is
        assert not env.health.is_down("d2:1") and env.capped() == 1
        # The registry announcing d1 down takes it off the count: d2 may go now.
        env.members[0] = Driver("d1:1", state=DOWN)
        assert await env.health.confirm_failure("d2:1") is True
        assert env.health.down == {"d1:1", "d2:1"}


async def test_failed_probes_keep_their_reason_until_one_answers() -> None:
    reasons = {"d1": "UNAVAILABLE: Connection refused"}
    changes: list[tuple[str, bool]] = []
    health = _health(changes, ScriptedProbe())
    await health.report("d1", False, reasons["d1"])
    await health.report("d2", False)  # a bare True/False probe: a generic reason
    assert health.last_errors == {"d1": "UNAVAILABLE: Connection refused", "d2": "probe failed"}
    await health.report("d1", True)
    assert health.last_errors == {"d2": "probe failed"}


async def test_await_recovery_waits_only_for_recently_downed_drivers() -> None:
    now = [100.0]
    changes: list[tuple[str, bool]] = []
    settings = load_settings(fail_threshold=1, recover_threshold=1)

    async def on_change(address: str, live: bool) -> None:
        changes.append((address, live))

    health = Health(settings, on_change, ScriptedProbe(), clock=lambda: now[0])
    assert await health.await_recovery(["d1"], 5.0) is False  # never down here: no wait
    await health.report("d1", False)
    now[0] = 106.0  # down for longer than the wait: none
    assert await health.await_recovery(["d1"], 5.0) is False

    now[0] = 101.0  # down for 1 s of 5: wait, and see it come back
    waiting = asyncio.ensure_future(health.await_recovery(["d1"], 5.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    await health.report("d1", True)
    assert await waiting is True and changes[-1] == ("d1", True)
