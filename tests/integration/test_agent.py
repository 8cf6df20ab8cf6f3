"""agent.sidecar against real (fake) Spark Connect servers: the real probe, driver death and
hangs, recovery, serve_agent, and run_agent with real signals in this process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import registry
from agent.sidecar import Agent, AgentSettings, run_agent, serve_agent
from common.health import PROBE_SESSION_ID, PROBE_USER_ID, probe
from common.lifecycle import EXIT_OK, EXIT_STARTUP_FAILURE
from loadtest.fake_driver import FakeDriver
from registry.base import RegistryUnavailable
from registry.memory import MemoryRegistry
from registry.models import Driver, DriverState
from tests.helpers import free_port, read_line_matching, spawn, stop, until_notified

WAIT = 10.0


class WatchedRegistry(MemoryRegistry):
    """The memory store; wakes async waiters and threads on every driver write."""

    def __init__(self) -> None:
        super().__init__()
        self._event = asyncio.Event()
        self.upserts: list[Driver] = []
        self.removed: list[str] = []
        self.checked = threading.Event()  # drivers() was called (start-up check)
        self.active = threading.Event()  # an active record was written
        self.removing = threading.Event()  # remove_driver was called

    async def drivers(self) -> list[Driver]:
        self.checked.set()
        return list(await super().drivers())

    async def upsert_driver(self, driver: Driver, ttl: float | None = None) -> None:
        await super().upsert_driver(driver, ttl)
        self.upserts.append(driver)
        if driver.state is DriverState.ACTIVE:
            self.active.set()
        self._event.set()

    async def remove_driver(self, address: str) -> None:
        self.removing.set()
        await super().remove_driver(address)
        self.removed.append(address)
        self._event.set()

    def last_state(self) -> DriverState | None:
        return self.upserts[-1].state if self.upserts else None

    async def until(self, cond: Callable[[], bool], timeout: float = WAIT) -> None:
        """Return once `cond()` holds after some write; fail after `timeout` s."""
        await until_notified(self._event, cond, timeout, lambda: f"; writes: {self.upserts[-5:]}")


def fast(driver: str, **overrides: object) -> AgentSettings:
    """Settings that notice failures within a fraction of a second."""
    values: dict[str, object] = {
        "driver": driver,
        "heartbeat_interval": 0.05,
        "probe_timeout": 0.3,
        "ttl": 5.0,
        "fail_threshold": 2,
        "recover_threshold": 2,
    }
    values.update(overrides)
    return AgentSettings(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- probe


async def test_probe_is_a_spark_connect_config_call_with_a_deadline() -> None:
    async with FakeDriver() as d:
        assert await probe(d.address, 1.5)
        call = d.calls[-1]
    assert call.method == "Config"
    assert (call.session_id, call.user_id) == (PROBE_SESSION_ID, PROBE_USER_ID)
    assert call.time_remaining is not None
    # The deadline reached the driver (gRPC sends it rounded up a little, in its own units).
    assert 0 < call.time_remaining <= 1.6


async def test_probe_fails_on_refused_error_and_hung_drivers() -> None:
    assert not await probe(f"127.0.0.1:{free_port()}", 1.0)  # nothing listens
    async with FakeDriver(fail_status="INTERNAL") as d:
        assert not await probe(d.address, 1.0)
    async with FakeDriver(delay_ms=5000) as d:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert not await probe(d.address, 0.2)
        # The deadline, not the driver's 5 s delay, ended it (with room for a loaded machine).
        assert loop.time() - started < 4.0


# --------------------------------------------------------------------------- Agent


async def test_live_driver_is_registered_active() -> None:
    reg = WatchedRegistry()
    async with FakeDriver() as d:
        s = fast(d.address, advertise="driver-0.spark:15002", pool="etl", weight=2)
        halt = asyncio.Event()
        task = asyncio.create_task(Agent(s, reg).run(halt))
        await reg.until(lambda: len(reg.upserts) >= 2)
        assert await reg.drivers() == [Driver("driver-0.spark:15002", "etl", 2, DriverState.ACTIVE)]
        assert {c.user_id for c in d.calls} == {PROBE_USER_ID}
        halt.set()
        await asyncio.wait_for(task, WAIT)
    assert reg.removed == ["driver-0.spark:15002"]
    assert await reg.drivers() == []


async def test_stopped_driver_goes_down_after_threshold_and_recovers_on_restart() -> None:
    reg = WatchedRegistry()
    d = FakeDriver()
    await d.start()
    port = d.port
    s = fast(d.address, fail_threshold=3, recover_threshold=2)
    results: list[bool] = []

    async def recorded(address: str, timeout: float) -> bool:
        results.append(await probe(address, timeout))
        return results[-1]

    halt = asyncio.Event()
    agent = Agent(s, reg, probe=recorded)
    task = asyncio.create_task(agent.run(halt))
    try:
        await reg.until(lambda: reg.last_state() is DriverState.ACTIVE)
        await d.stop()
        await reg.until(lambda: reg.last_state() is DriverState.DOWN)
        assert agent.health.bad == 3  # exactly fail_threshold failed probes
        assert (await reg.drivers())[0].state is DriverState.DOWN  # announced, not expired

        d = FakeDriver(port=port)  # the driver restarts on its port
        await d.start()
        restarted = len(results)
        await reg.until(lambda: reg.last_state() is DriverState.ACTIVE)
        assert agent.health.good == 2
        # No reconnect backoff carried over from the dead driver (it would fail ~20 probes):
        # at most the one probe already under way when the driver came back fails.
        assert results[restarted:].count(False) <= 1, results[restarted:]
    finally:
        halt.set()
        await asyncio.wait_for(task, WAIT)
        await d.stop()


async def test_a_driver_that_never_answers_in_time_is_never_registered() -> None:
    reg = WatchedRegistry()
    async with FakeDriver(delay_ms=2000) as d:
        probes: list[bool] = []

        async def counted(address: str, timeout: float) -> bool:
            ok = await probe(address, timeout)
            probes.append(ok)
            reg._event.set()
            return ok

        halt = asyncio.Event()
        task = asyncio.create_task(
            Agent(fast(d.address, probe_timeout=0.1), reg, probe=counted).run(halt)
        )
        await reg.until(lambda: len(probes) >= 3)
        halt.set()
        await asyncio.wait_for(task, WAIT)
    assert probes[:3] == [False, False, False]
    assert reg.upserts == []


async def test_a_driver_that_starts_hanging_goes_down() -> None:
    reg = WatchedRegistry()
    async with FakeDriver() as d:
        halt = asyncio.Event()
        task = asyncio.create_task(Agent(fast(d.address, probe_timeout=0.1), reg).run(halt))
        await reg.until(lambda: reg.last_state() is DriverState.ACTIVE)
        d.delay_ms = 2000  # every later call waits longer than the probe's deadline
        await reg.until(lambda: reg.last_state() is DriverState.DOWN)
        halt.set()  # stopping does not wait for a hung probe
        await asyncio.wait_for(task, 1.0)
    assert reg.removed == [d.address]


async def test_serve_agent_runs_until_stopped_and_deregisters() -> None:
    reg = WatchedRegistry()
    async with FakeDriver() as d:
        halt = asyncio.Event()
        task = asyncio.create_task(serve_agent(fast(d.address), reg, halt))
        await reg.until(lambda: reg.last_state() is DriverState.ACTIVE)
        halt.set()
        await asyncio.wait_for(task, WAIT)
    assert reg.removed == [d.address]
    assert await reg.drivers() == []


# --------------------------------------------------------------------------- run_agent


@pytest.fixture
def driver_process() -> Iterator[str]:
    """A fake driver in its own process (run_agent owns this process's event loop)."""
    proc = spawn(["-m", "loadtest.fake_driver", "--listen", "127.0.0.1:0"])
    line = read_line_matching(proc, "listening on", timeout=30)
    yield line.rsplit(" ", 1)[1].strip()
    assert stop(proc) == 0


def use_registry(monkeypatch: pytest.MonkeyPatch, store: object) -> list[str]:
    """Make `registry.open_registry` hand out `store`; returns the URLs it was asked for."""
    urls: list[str] = []

    def open_registry(url: str) -> object:
        urls.append(url)
        if isinstance(store, Exception):
            raise store
        return store

    monkeypatch.setattr(registry, "open_registry", open_registry, raising=False)
    return urls


def signal_when(*steps: threading.Event) -> threading.Thread:
    """A thread that sends this process SIGTERM once each event in turn is set."""

    def send() -> None:
        for step in steps:
            if not step.wait(WAIT):
                return  # run_agent's own failure will say what went wrong
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(60)
def test_run_agent_registers_and_deregisters_on_sigterm(
    driver_process: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = WatchedRegistry()
    urls = use_registry(monkeypatch, store)
    thread = signal_when(store.active)
    assert run_agent(fast(driver_process), "memory://") == EXIT_OK
    thread.join(WAIT)
    assert urls == ["memory://"]
    assert store.upserts[0].state is DriverState.ACTIVE
    assert store.removed == [driver_process]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers were removed


class StuckRemoval(WatchedRegistry):
    """Deregistration never answers (a stalled backend at shutdown)."""

    async def remove_driver(self, address: str) -> None:
        self.removing.set()
        await asyncio.Event().wait()


@pytest.mark.timeout(60)
def test_second_signal_exits_at_once(
    driver_process: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = StuckRemoval()
    use_registry(monkeypatch, store)
    thread = signal_when(store.active, store.removing)
    started = time.monotonic()
    # The TTL bounds a stuck deregistration at 30 s; the second signal must not wait for it.
    assert run_agent(fast(driver_process, ttl=30.0), "memory://") == EXIT_OK
    assert time.monotonic() - started < 15
    thread.join(WAIT)
    assert any("second signal" in r.getMessage() for r in caplog.records)


class LineWatcher(logging.Handler):
    """Sets `seen` once a log record containing `text` is emitted (from any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@pytest.mark.timeout(60)
def test_run_agent_with_the_real_memory_registry_stops_cleanly_on_sigterm(
    driver_process: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sidecar")
    watcher = LineWatcher("registered as active")
    logging.getLogger("agent.sidecar").addHandler(watcher)
    try:
        thread = signal_when(watcher.seen)
        assert run_agent(fast(driver_process), "memory://") == EXIT_OK
        thread.join(WAIT)
    finally:
        logging.getLogger("agent.sidecar").removeHandler(watcher)
    assert f"deregistered {driver_process}" in caplog.text


def test_run_agent_with_an_invalid_url_exits_3(caplog: pytest.LogCaptureFixture) -> None:
    code = run_agent(fast("127.0.0.1:1"), "mongo://u:hunter2@h/")
    assert code == EXIT_STARTUP_FAILURE
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("agent cannot start: invalid registry URL mongo://u:***@h/")
    assert "hunter2" not in caplog.text


def test_run_agent_exits_3_when_redis_is_not_there(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    assert run_agent(fast("127.0.0.1:1"), url) == EXIT_STARTUP_FAILURE
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "unreachable after 3 attempts" in errors[0]
    assert "hunter2" not in caplog.text


class Unreachable(MemoryRegistry):
    """A store whose backend never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0
        self.closed = False

    async def drivers(self) -> list[Driver]:
        self.attempts += 1
        raise RegistryUnavailable("Connection refused")

    async def close(self) -> None:
        self.closed = True


def test_run_agent_exits_3_when_the_registry_is_unreachable_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = Unreachable()
    use_registry(monkeypatch, store)
    assert run_agent(fast("127.0.0.1:1"), "redis://h:6379") == EXIT_STARTUP_FAILURE
    assert store.attempts == 3
    assert store.closed
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "agent cannot start: registry redis://h:6379 unreachable after 3 attempts: "
        "Connection refused"
    ]


async def test_the_agent_cli_probes_a_token_protected_driver_with_its_token(
    redis_url: str,
) -> None:
    """A driver that demands a token is registered only if the agent sends it (from the env)."""
    from registry import open_registry

    token = "agent-token-" + "7" * 20
    driver = spawn(["-m", "loadtest.fake_driver", "--listen", "127.0.0.1:0", "--token", token])
    address = read_line_matching(driver, "listening on", timeout=30).rsplit(" ", 1)[1].strip()
    agent = spawn(
        ["-m", "router.cli", "agent", "--driver", address, "--registry", redis_url],
        env={
            "SPARK_ROUTER_DRIVER_TOKEN": token,
            "SPARK_ROUTER_AGENT_HEARTBEAT_INTERVAL": "0.2",
            "SPARK_ROUTER_AGENT_PROBE_TIMEOUT": "0.5",
        },
    )
    store = open_registry(redis_url)
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while not any(
            d.address == address and d.state is DriverState.ACTIVE for d in await store.drivers()
        ):
            assert agent.poll() is None, "the agent exited"
            assert asyncio.get_running_loop().time() < deadline, "never registered active"
            await asyncio.sleep(0.1)
    finally:
        await store.close()
        codes = (stop(agent), stop(driver))  # both, whatever the first one answers
    assert codes == (0, 0)
