"""agent.sidecar without a driver: settings, the health state machine, and Agent.run driven by
a scripted probe against the memory registry (plus wrappers that fail or hang)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.sidecar import Agent, AgentSettings, describe_change
from common.addresses import redact_url
from common.health import HealthState, apply_probe
from registry.base import RegistryUnavailable
from registry.memory import MemoryRegistry
from registry.models import Driver, DriverState
from tests.helpers import until_notified

A, D = DriverState.ACTIVE, DriverState.DOWN
T, F = True, False
DRIVER = "10.0.0.5:15002"
WAIT = 5.0  # generous bound for conditions that normally hold within milliseconds


def settings(**overrides: object) -> AgentSettings:
    """Fast settings for tests: 10 ms heartbeats, a TTL no test outlives."""
    values: dict[str, object] = {"driver": DRIVER, "heartbeat_interval": 0.01, "ttl": 30.0}
    values.update(overrides)
    return AgentSettings(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- settings


def test_defaults() -> None:
    s = AgentSettings("h:1")
    assert (s.driver, s.advertise, s.pool, s.weight) == ("h:1", "h:1", "default", 1)
    assert (s.heartbeat_interval, s.ttl, s.probe_timeout) == (2.0, 6.0, 2.0)
    assert (s.fail_threshold, s.recover_threshold) == (3, 2)


def test_ttl_defaults_to_three_intervals_and_advertise_can_differ() -> None:
    s = AgentSettings("h:1", advertise="[::1]:2", heartbeat_interval=0.5, probe_timeout=0.2)
    assert s.ttl == 1.5
    assert s.advertise == "[::1]:2"


def test_none_means_the_default_as_for_a_flag_not_given() -> None:
    given = AgentSettings(
        "h:1",
        advertise=None,
        pool=None,
        weight=None,
        heartbeat_interval=None,
        ttl=None,
        probe_timeout=None,
        fail_threshold=None,
        recover_threshold=None,
    )
    assert given == AgentSettings("h:1")
    assert AgentSettings("h:1", heartbeat_interval=1.0, ttl=None).ttl == 3.0


def test_settings_are_frozen() -> None:
    s = AgentSettings("h:1")
    with pytest.raises(AttributeError):
        s.ttl = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"driver": "nohostport"}, "driver: 'nohostport' is not HOST:PORT"),
        ({"driver": "h:0"}, "driver: 'h:0' has port 0"),
        ({"advertise": "h:70000"}, "advertise: 'h:70000' has port 70000"),
        ({"pool": " "}, "pool: must not be empty"),
        ({"weight": 0}, "weight: 0 must be an integer >= 1"),
        ({"weight": True}, "weight: True must be an integer >= 1"),
        ({"fail_threshold": 0}, "fail_threshold: 0 must be"),
        ({"recover_threshold": -1}, "recover_threshold: -1 must be"),
        ({"heartbeat_interval": 0}, "heartbeat_interval: 0.0 must be > 0"),
        ({"probe_timeout": -1}, "probe_timeout: -1.0 must be > 0"),
        ({"ttl": 0.01}, "ttl: 0.01s must exceed heartbeat_interval"),
        (
            {"ttl": 3.0, "heartbeat_interval": 1.0, "probe_timeout": 3.0},
            "must exceed probe_timeout",
        ),
    ],
)
def test_bad_values_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as err:
        settings(**overrides)
    assert message in str(err.value)


def test_every_problem_is_reported_one_per_line() -> None:
    with pytest.raises(ValueError) as err:
        AgentSettings("bad", weight=0, fail_threshold=0, ttl=5)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["driver", "weight", "fail_threshold"]


# --------------------------------------------------------------------------- state machine


def states(oks: Sequence[bool], fail: int = 3, recover: int = 2) -> list[DriverState | None]:
    """The announced state after each probe result, from a fresh agent."""
    s = settings(fail_threshold=fail, recover_threshold=recover)
    health = HealthState()
    out: list[DriverState | None] = []
    for ok in oks:
        health = apply_probe(health, ok, s)
        out.append(health.state)
    return out


@pytest.mark.parametrize(
    ("oks", "expected"),
    [
        pytest.param([F, F, F, F, F], [None] * 5, id="never-answered-is-never-registered"),
        pytest.param([T], [A], id="first-answer-registers-active"),
        pytest.param([F, F, T], [None, None, A], id="registers-on-first-answer-late"),
        pytest.param([T, F, F], [A, A, A], id="below-fail-threshold-stays-active"),
        pytest.param([T, F, F, F], [A, A, A, D], id="fail-threshold-marks-down"),
        pytest.param([T, F, F, T, F, F], [A] * 6, id="a-good-probe-resets-the-fail-streak"),
        pytest.param([T, F, F, F, F, F], [A, A, A, D, D, D], id="down-stays-down"),
        pytest.param([T, F, F, F, T], [A, A, A, D, D], id="one-good-probe-does-not-recover"),
        pytest.param([T, F, F, F, T, T], [A, A, A, D, D, A], id="recover-threshold-reactivates"),
        pytest.param(
            [T, F, F, F, T, F, T, T], [A, A, A, D, D, D, D, A], id="a-bad-probe-resets-recovery"
        ),
    ],
)
def test_thresholds(oks: list[bool], expected: list[DriverState | None]) -> None:
    assert states(oks) == expected


@pytest.mark.parametrize(
    ("oks", "fail", "recover", "expected"),
    [
        ([T, F, T], 1, 1, [A, D, A]),
        ([T, F, F, T], 2, 1, [A, A, D, A]),
        ([T, F, T, T, T], 1, 3, [A, D, D, D, A]),
    ],
)
def test_other_thresholds(
    oks: list[bool], fail: int, recover: int, expected: list[DriverState | None]
) -> None:
    assert states(oks, fail, recover) == expected


def test_streak_counters() -> None:
    s = settings()
    h = HealthState()
    assert not h.registered
    h = apply_probe(h, True, s)
    assert (h.state, h.good, h.bad, h.registered) == (A, 1, 0, True)
    h = apply_probe(apply_probe(h, False, s), False, s)
    assert (h.state, h.good, h.bad) == (A, 0, 2)
    h = apply_probe(h, True, s)
    assert (h.state, h.good, h.bad) == (A, 1, 0)


def test_a_draining_record_given_is_treated_like_active() -> None:
    s = settings(fail_threshold=1)
    draining = HealthState(DriverState.DRAINING)
    assert apply_probe(draining, True, s).state is DriverState.DRAINING
    assert apply_probe(draining, False, s).state is D


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_invariants(oks: list[bool], fail: int, recover: int) -> None:
    got = states(oks, fail, recover)
    for i, state in enumerate(got):
        # Registered exactly from the first good probe on.
        assert (state is None) == (True not in oks[: i + 1])
        before = got[i - 1] if i else None
        if before is A and state is D:
            assert oks[i - fail + 1 : i + 1] == [False] * fail
        if before is D and state is A:
            assert oks[i - recover + 1 : i + 1] == [True] * recover


def test_only_changes_are_described() -> None:
    s = settings()
    assert describe_change(HealthState(), HealthState(None, bad=1), s) is None
    assert describe_change(HealthState(A), HealthState(A, bad=2), s) is None
    registered = describe_change(HealthState(), HealthState(A, good=1), s)
    assert registered is not None
    assert "registered as active" in registered
    down = describe_change(HealthState(A, bad=2), HealthState(D, bad=3), s)
    assert down is not None
    assert "3 probes in a row failed" in down
    back = describe_change(HealthState(D, good=1), HealthState(A, good=2), s)
    assert back is not None
    assert "active again after 2 good probes" in back


def test_redact_url_hides_passwords() -> None:
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://u:s3cret@h:6379") == "redis://u:***@h:6379"
    assert redact_url("redis://h:6379") == "redis://h:6379"
    assert redact_url("memory://") == "memory://"


# --------------------------------------------------------------------------- Agent.run


class Notifier:
    """Wakes waiters whenever something they may be waiting for happened (no polling)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def until(self, cond: Callable[[], bool], timeout: float = WAIT) -> None:
        """Return once `cond()` holds; fail after `timeout` s."""
        await until_notified(self._event, cond, timeout)


class ScriptedProbe:
    """Answers from a script; when it runs out, hangs (until cancelled) or repeats `then`."""

    def __init__(self, results: Sequence[bool], notifier: Notifier, then: bool | None = None):
        self.results = list(results)
        self.then = then
        self.calls: list[tuple[str, float]] = []
        self.hanging = False
        self._notifier = notifier

    async def __call__(self, address: str, timeout: float) -> bool:
        self.calls.append((address, timeout))
        self._notifier.notify()
        if self.results:
            return self.results.pop(0)
        if self.then is not None:
            return self.then
        self.hanging = True
        self._notifier.notify()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class RecordingRegistry(MemoryRegistry):
    """The memory store, recording every driver write; `fail_upserts` calls raise first."""

    def __init__(self, notifier: Notifier, fail_upserts: Sequence[bool] = ()) -> None:
        super().__init__()
        self.notifier = notifier
        self.fail_upserts = list(fail_upserts)
        self.upserts: list[tuple[DriverState, float | None]] = []
        self.failed = 0
        self.removed: list[str] = []

    async def upsert_driver(self, driver: Driver, ttl: float | None = None) -> None:
        try:
            if self.fail_upserts and self.fail_upserts.pop(0):
                self.failed += 1
                raise RegistryUnavailable("redis: connection refused")
            await super().upsert_driver(driver, ttl)
            self.upserts.append((driver.state, ttl))
        finally:
            self.notifier.notify()

    async def remove_driver(self, address: str) -> None:
        await super().remove_driver(address)
        self.removed.append(address)
        self.notifier.notify()


async def start(agent: Agent) -> tuple[asyncio.Task[None], asyncio.Event]:
    stop = asyncio.Event()
    return asyncio.create_task(agent.run(stop)), stop


async def finish(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    await asyncio.wait_for(task, WAIT)


async def test_registry_sees_active_down_active_with_ttl_then_deregistration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sidecar")
    n = Notifier()
    reg = RecordingRegistry(n)
    script = ScriptedProbe([T, F, F, F, T, T], n)
    s = settings(driver="10.0.0.5:15002", advertise="public:443", pool="big", weight=4, ttl=9.0)
    task, stop = await start(Agent(s, reg, probe=script))

    await n.until(lambda: script.hanging)
    assert [state for state, _ in reg.upserts] == [A, A, A, D, D, A]
    assert {ttl for _, ttl in reg.upserts} == {9.0}
    assert await reg.drivers() == [Driver("public:443", "big", 4, A)]
    assert script.calls[0] == ("10.0.0.5:15002", s.probe_timeout)

    await finish(task, stop)  # stop interrupts the hung probe
    assert reg.removed == ["public:443"]
    assert await reg.drivers() == []
    changes = [r.getMessage() for r in caplog.records if "driver 10.0.0.5:15002" in r.getMessage()]
    assert len(changes) == 3, changes  # one line per change, none per heartbeat
    assert "registered as active" in changes[0]
    assert "is down" in changes[1]
    assert "active again" in changes[2]


async def test_nothing_is_registered_before_a_first_good_probe() -> None:
    n = Notifier()
    reg = RecordingRegistry(n)
    script = ScriptedProbe([F, F, F, F], n)
    task, stop = await start(Agent(settings(), reg, probe=script))
    await n.until(lambda: script.hanging)
    assert reg.upserts == []
    assert await reg.drivers() == []
    await finish(task, stop)


async def test_down_driver_keeps_being_heartbeated_as_down() -> None:
    n = Notifier()
    reg = RecordingRegistry(n)
    script = ScriptedProbe([T], n, then=False)
    task, stop = await start(Agent(settings(fail_threshold=2), reg, probe=script))
    await n.until(lambda: len(reg.upserts) >= 6)
    assert [state for state, _ in reg.upserts[:6]] == [A, A, D, D, D, D]
    await finish(task, stop)
    assert await reg.drivers() == []


async def test_registry_outage_is_survived_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sidecar")
    n = Notifier()
    reg = RecordingRegistry(n, fail_upserts=[F, T, T, T, F, F, T, F])
    now = [100.0]
    script = ScriptedProbe([], n, then=True)
    agent = Agent(settings(), reg, probe=script, clock=lambda: now[0])
    task, stop = await start(agent)
    await n.until(lambda: reg.failed == 3)
    now[0] = 112.5
    await n.until(lambda: len(reg.upserts) >= 4)
    assert not task.done()
    await finish(task, stop)
    assert reg.removed == [DRIVER]

    warnings = [r.getMessage() for r in caplog.records if "registry unavailable" in r.getMessage()]
    recoveries = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(warnings) == 2, warnings  # two outages, one line each
    assert "connection refused" in warnings[0]
    assert len(recoveries) == 2
    assert "after 12.5s" in recoveries[0]


class HangingRegistry(MemoryRegistry):
    """A store whose writes never answer (a stalled backend)."""

    def __init__(self, notifier: Notifier) -> None:
        super().__init__()
        self.notifier = notifier
        self.attempts = 0
        self.removes = 0

    async def upsert_driver(self, driver: Driver, ttl: float | None = None) -> None:
        self.attempts += 1
        self.notifier.notify()
        await asyncio.Event().wait()

    async def remove_driver(self, address: str) -> None:
        self.removes += 1
        self.notifier.notify()
        await asyncio.Event().wait()


async def test_a_stalled_registry_is_an_outage_bounded_by_the_ttl(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = Notifier()
    reg = HangingRegistry(n)
    script = ScriptedProbe([], n, then=True)
    task, stop = await start(Agent(settings(ttl=0.05, probe_timeout=0.01), reg, probe=script))
    await n.until(lambda: reg.attempts >= 3)  # each heartbeat gave up after the TTL
    await finish(task, stop)  # deregistration too is bounded by the TTL
    assert reg.removes == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("registry unavailable (no answer in time)" in m for m in messages) == 1
    assert any("could not deregister" in m for m in messages)


class UnreachableRegistry(MemoryRegistry):
    """A store that is down for good."""

    async def upsert_driver(self, driver: Driver, ttl: float | None = None) -> None:
        raise RegistryUnavailable("down")

    async def remove_driver(self, address: str) -> None:
        raise RegistryUnavailable("down")


async def test_failed_deregistration_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier()
    script = ScriptedProbe([T, T], n)
    task, stop = await start(Agent(settings(), UnreachableRegistry(), probe=script))
    await n.until(lambda: script.hanging)
    await finish(task, stop)
    assert any("could not deregister" in r.getMessage() for r in caplog.records)


async def test_stop_before_the_first_probe_only_deregisters() -> None:
    n = Notifier()
    reg = RecordingRegistry(n)
    script = ScriptedProbe([T], n)
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(Agent(settings(), reg, probe=script).run(stop), WAIT)
    assert script.calls == []
    assert reg.upserts == []
    assert reg.removed == [DRIVER]


async def test_the_interval_is_kept_from_probe_start_to_probe_start() -> None:
    """A slow probe shortens the wait after it, so heartbeats keep their pace."""
    n = Notifier()
    reg = RecordingRegistry(n)
    now = [0.0]

    async def slow_probe(address: str, timeout: float) -> bool:
        now[0] += 3.0  # the probe took longer than the interval
        return True

    stop = asyncio.Event()
    agent = Agent(
        settings(heartbeat_interval=2.0, ttl=10.0), reg, probe=slow_probe, clock=lambda: now[0]
    )
    task = asyncio.create_task(agent.run(stop))
    # With the probe overrunning its interval, the loop never waits: no 2 s sleeps happen.
    await n.until(lambda: len(reg.upserts) >= 3, timeout=1.0)
    await finish(task, stop)
