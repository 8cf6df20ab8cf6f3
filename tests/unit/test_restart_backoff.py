"""When a dead local driver is started again: the backoff (pure), and `up`'s watcher that applies
it, driven by a scripted driver (no processes, no real waits)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from router.local.driver import DriverFailedToStart
from router.local.restart import RestartBackoff
from router.local.up import keep_running

# --------------------------------------------------------------------------- the backoff


def test_failures_in_a_row_double_the_wait_up_to_the_cap() -> None:
    backoff = RestartBackoff(initial=1, factor=2, max_delay=10, reset_after=120)
    backoff.on_ready(0)
    delays = [backoff.on_failure(1 + i) for i in range(6)]
    assert delays == [1, 2, 4, 8, 10, 10]
    assert backoff.streak == 6 and backoff.restarts == 6


def test_a_driver_healthy_for_reset_after_starts_over() -> None:
    backoff = RestartBackoff(initial=1, factor=2, max_delay=60, reset_after=120)
    backoff.on_ready(0)
    assert [backoff.on_failure(t) for t in (10, 11, 12)] == [1, 2, 4]
    backoff.on_ready(20)
    assert backoff.on_failure(20 + 119.9) == 8  # ready, but not for long enough
    backoff.on_ready(200)
    assert backoff.on_failure(320) == 1  # 120 s healthy: a fresh streak
    assert backoff.streak == 1
    assert backoff.restarts == 5  # the lifetime count never resets


def test_a_failed_start_is_not_a_healthy_period() -> None:
    backoff = RestartBackoff(initial=1, factor=3, max_delay=100, reset_after=5)
    backoff.on_ready(0)
    assert backoff.on_failure(100) == 1  # healthy long enough before the crash
    # No on_ready between failed starts, however long they take.
    assert backoff.on_failure(1000) == 3
    assert backoff.on_failure(5000) == 9


def test_factor_one_is_a_constant_wait() -> None:
    backoff = RestartBackoff(initial=2.5, factor=1, max_delay=2.5)
    assert [backoff.on_failure(t) for t in range(4)] == [2.5] * 4


def test_the_wait_never_overflows() -> None:
    backoff = RestartBackoff(initial=1, factor=10, max_delay=60)
    for t in range(5000):  # 10 ** 5000 is not a float
        delay = backoff.on_failure(t)
    assert delay == 60


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": 0}, "initial must be positive"),
        ({"factor": 0.5}, "factor must be at least 1"),
        ({"initial": 5, "max_delay": 1}, "max_delay"),
        ({"reset_after": -1}, "reset_after must not be negative"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RestartBackoff(**kwargs)


# --------------------------------------------------------------------------- the watcher


class ScriptedDriver:
    """A driver whose exits and start failures the test decides."""

    address = "127.0.0.1:1"
    elapsed = 3.0

    def __init__(self, start_failures: int = 0) -> None:
        self.code: int | None = None
        self.start_failures = start_failures
        self.calls: list[str] = []
        self.started = asyncio.Event()

    def exited(self) -> int | None:
        return self.code

    def start(self) -> None:
        self.calls.append("start")
        if self.start_failures:
            self.start_failures -= 1
            raise DriverFailedToStart(self.address, "port 1 on 127.0.0.1 is already in use")
        self.code = None

    async def until_ready(self, timeout: float) -> None:
        self.calls.append("ready")
        self.started.set()

    def stop(self, timeout: float = 15.0) -> None:
        self.calls.append("stop")


class Clock:
    """A clock the recorded sleeps move forward."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def _watch(
    driver: ScriptedDriver,
    clock: Clock,
    stopping: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    lost: Callable[[str], None] = lambda address: None,
) -> asyncio.Task[None]:
    return asyncio.ensure_future(
        keep_running(
            driver,
            stopping,
            startup_timeout=60,
            backoff=RestartBackoff(initial=1, factor=2, max_delay=4),
            poll_interval=0.001,
            clock=clock,
            sleep=sleep or clock.sleep,
            lost=lost,
        )
    )


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_exited_driver_is_restarted_after_the_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="router.local")
    driver, clock = ScriptedDriver(), Clock()
    lost: list[str] = []
    task = _watch(driver, clock, lost=lost.append)
    driver.code = -9
    await asyncio.wait_for(driver.started.wait(), 5)
    assert driver.calls == ["stop", "start", "ready"]  # reaped and cleaned before the start
    assert lost == ["127.0.0.1:1"]  # the router told: its sessions there lost their state
    assert clock.slept == [1]
    assert "driver 127.0.0.1:1 exited (killed by SIGKILL); restarting in 1.0 s (restart 1)" in (
        caplog.text
    )
    assert "driver 127.0.0.1:1 restarted (ready in 3.0 s)" in caplog.text
    driver.started.clear()
    driver.code = 1  # and again: the streak goes on (it was not healthy for reset_after)
    await asyncio.wait_for(driver.started.wait(), 5)
    assert clock.slept == [1, 2]
    assert "exited (exit code 1); restarting in 2.0 s (restart 2)" in caplog.text
    await _cancel(task)


async def test_failed_starts_back_off_and_are_retried(caplog: pytest.LogCaptureFixture) -> None:
    driver, clock = ScriptedDriver(start_failures=3), Clock()
    task = _watch(driver, clock)
    driver.code = -9
    await asyncio.wait_for(driver.started.wait(), 5)
    assert clock.slept == [1, 2, 4, 4]  # capped, never a tight loop
    assert driver.calls == ["stop"] + ["start", "stop"] * 3 + ["start", "ready"]
    assert caplog.text.count("did not restart: port 1 on 127.0.0.1 is already in use") == 3
    assert "retrying in 4.0 s (restart 4)" in caplog.text
    await _cancel(task)


async def test_no_restart_once_stopping() -> None:
    driver, clock = ScriptedDriver(), Clock()
    task = _watch(driver, clock, stopping=lambda: True)
    driver.code = 0
    await asyncio.wait_for(task, 5)  # returns by itself
    assert driver.calls == [] and clock.slept == []


async def test_stopping_during_the_backoff_starts_nothing() -> None:
    driver, clock = ScriptedDriver(), Clock()
    stopping = False

    async def shutdown_begins(seconds: float) -> None:
        nonlocal stopping
        stopping = True
        await clock.sleep(seconds)

    task = _watch(driver, clock, stopping=lambda: stopping, sleep=shutdown_begins)
    driver.code = -15
    await asyncio.wait_for(task, 5)
    assert driver.calls == ["stop"] and clock.slept == [1]


async def test_a_start_error_other_than_a_driver_failure_is_retried_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    driver, clock = ScriptedDriver(), Clock()
    calls = 0

    def start() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise PermissionError(13, "Permission denied", str(tmp_path / "driver-1.log"))
        driver.code = None

    driver.start = start  # type: ignore[method-assign]
    task = _watch(driver, clock)
    driver.code = -9
    await asyncio.wait_for(driver.started.wait(), 5)
    assert clock.slept == [1, 2]
    assert "did not restart: [Errno 13] Permission denied" in caplog.text
    await _cancel(task)
