"""`spark-router up`: local drivers, then a router replica in front of them, in one process.

Invariants
----------
* Cheap checks first: the router's port (and the admin port, unless it is off) and Java are
  checked before any JVM starts, so a mistake costs no start-up time and leaves nothing behind.
* Nothing outlives `up`: from the start SIGTERM unwinds like an exception, and the drivers are
  stopped on every way out (served and signalled, start-up failure, Ctrl-C); a SIGKILL of the
  process is left to the drivers' PDEATHSIG.
* Exit codes: 0 after serving, 3 could not start (`EXIT_STARTUP_FAILURE`), 130 Ctrl-C and
  128 + N signal N during start-up.
* Only `up`'s router reaches its drivers: they are started with a backend token
  (driver_token if set, else a fresh random one) and the router runs with that driver_token,
  so a client dialing a driver's port directly is refused (UNAUTHENTICATED). The token is
  never printed.
* This machine only by default: the router listens on `UP_LISTEN` (127.0.0.1:15002) unless a
  flag, SPARK_ROUTER_LISTEN or the config file says otherwise, and the admin listener on
  its loopback default too. `--listen 0.0.0.0:15002` shares the router; the replica warns
  at start-up when that exposes it without authentication (server.py).
* A driver that dies while `up` serves is reaped within EXIT_POLL_SECONDS (no zombie) and
  started again on the same port with the same token, so the router's probes see it come
  back; the waits between starts follow `RestartBackoff` (restart.py), so a driver that
  cannot start is retried ever more slowly, never in a tight loop. Every exit, failed
  restart and recovery is a log line (display.py). No restart begins once the replica is
  shutting down; a start still in flight then finishes in its thread (the loop's runner
  waits for it) before the drivers are stopped, so nothing it starts is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import click
from pydantic import SecretStr

from common.addresses import split_host_port
from common.lifecycle import EXIT_STARTUP_FAILURE
from router.config import Settings
from router.local.display import log_exit, log_restart_failed, log_restarted
from router.local.driver import DriverFailedToStart, LocalDrivers
from router.local.java import LocalDriverError, check_java
from router.local.restart import RestartBackoff
from router.server import Replica, StartupError, run_async, serve_until_signal
from router.tls import TLSConfigError, driver_dialing, server_credentials

__all__ = ["UP_LISTEN", "keep_running", "run_up"]

log = logging.getLogger(__name__)

# A laptop's router: whoever reaches it runs code on its drivers, so only this machine may.
UP_LISTEN = "127.0.0.1:15002"
# How often the watcher asks each driver's process whether it exited (a non-blocking waitpid).
EXIT_POLL_SECONDS = 0.5


class Restartable(Protocol):
    """What the watcher needs of a driver (router.local.driver.LocalDriver has it)."""

    @property
    def address(self) -> str: ...

    @property
    def elapsed(self) -> float: ...

    def exited(self) -> int | None: ...

    def start(self) -> None: ...

    async def until_ready(self, timeout: float) -> None: ...

    def stop(self, timeout: float = ...) -> None: ...


async def _exit_of(driver: Restartable, poll_interval: float) -> int:
    """The exit code of the driver's process, once it exits (polled: Popen has no async wait)."""
    while True:
        code = driver.exited()
        if code is not None:
            return code
        await asyncio.sleep(poll_interval)


async def keep_running(
    driver: Restartable,
    stopping: Callable[[], bool],
    *,
    startup_timeout: float,
    backoff: RestartBackoff | None = None,
    poll_interval: float = EXIT_POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    lost: Callable[[str], None] = lambda address: None,
) -> None:
    """Watch a ready driver; restart it whenever it exits, until `stopping()` or cancelled.

    `lost(address)` is told of each exit: the sessions pinned there lost their state.
    """
    backoff = backoff or RestartBackoff()
    backoff.on_ready(clock())
    while True:
        code = await _exit_of(driver, poll_interval)
        if stopping():
            return  # reaped by exited(); up's own shutdown stops the rest
        lost(driver.address)
        # Also kills what is left of its process group; quick, as the JVM is gone.
        await asyncio.to_thread(driver.stop)
        delay = backoff.on_failure(clock())
        log_exit(driver.address, code, delay, backoff.restarts)
        while True:
            await sleep(delay)
            if stopping():
                return
            try:
                await asyncio.to_thread(driver.start)
                await driver.until_ready(startup_timeout)
            except (LocalDriverError, OSError) as exc:
                await asyncio.to_thread(driver.stop)  # no half-started JVM between attempts
                delay = backoff.on_failure(clock())
                reason = exc.reason if isinstance(exc, DriverFailedToStart) else str(exc)
                log_path = getattr(exc, "log_path", None)
                log_restart_failed(driver.address, reason, log_path, delay, backoff.restarts)
                continue
            backoff.on_ready(clock())
            log_restarted(driver.address, driver.elapsed)
            break


async def _watch(drivers: Sequence[Restartable], replica: Replica, startup_timeout: float) -> None:
    """keep_running for every driver; a watcher that fails unexpectedly is logged, not lost."""

    def stopping() -> bool:
        return replica.shutting_down

    async def one(driver: Restartable) -> None:
        try:
            await keep_running(
                driver, stopping, startup_timeout=startup_timeout, lost=replica.driver_restarted
            )
        except Exception:
            log.exception("driver %s: not watched for restarts any more", driver.address)

    await asyncio.gather(*(one(driver) for driver in drivers))


def _check_port_free(listen: str) -> None:
    """Fail before the slow driver start-up if the router's port is taken."""
    host, port = split_host_port(listen)
    if port == 0:
        return
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(f"cannot listen on {listen}: {reason}") from exc


def _client_url(address: str, tls: bool = False) -> str:
    host, port = split_host_port(address)
    if host in ("0.0.0.0", "[::]", "::"):
        host = "localhost"
    return f"sc://{host}:{port}" + ("/;use_ssl=true" if tls else "")


def _with_driver_token(settings: Settings) -> tuple[Settings, str]:
    """The router's settings with the drivers' token (the given one, else a random one)."""
    if settings.driver_token is not None:
        return settings, settings.driver_token.get_secret_value()
    token = secrets.token_urlsafe(32)
    return settings.model_copy(update={"driver_token": SecretStr(token)}), token


def _check_tls(settings: Settings) -> None:
    """Fail before the slow driver start-up if a certificate or key file cannot be used."""
    try:
        driver_dialing(settings)
        if settings.tls_enabled:
            server_credentials(settings)
    except TLSConfigError as exc:
        raise StartupError(str(exc)) from exc


def run_up(settings: Settings) -> int:
    """`up`: drivers, then the router; everything stopped on the way out."""

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    # Until the router's own handlers take over, SIGTERM must unwind through the
    # `finally` below so the drivers are stopped, not orphaned.
    signal.signal(signal.SIGTERM, on_term)
    drivers: LocalDrivers | None = None
    try:
        _check_port_free(settings.listen)
        if settings.admin_host_port is not None:
            try:
                _check_port_free(settings.admin_listen)
            except StartupError as exc:
                raise StartupError(f"admin_listen: {exc} (admin_listen: off turns it off)") from exc
        settings, token = _with_driver_token(settings)
        _check_tls(settings)
        check_java(settings.java_home)
        drivers = LocalDrivers(
            settings.local_drivers,
            memory=settings.driver_memory,
            java_home=settings.java_home,
            spark_conf=settings.spark_conf,
            startup_timeout=settings.driver_startup_timeout_seconds,
            token=token,
        )
        click.echo(
            f"Starting {settings.local_drivers} Spark Connect driver(s) "
            f"(logs in {drivers.work_dir}) ...",
            err=True,
        )
        addresses = drivers.start(progress=True)
        replica = Replica(settings, drivers=addresses)
        ready = asyncio.Event()

        async def main() -> None:
            async def announce() -> None:
                await ready.wait()
                url = _client_url(replica.address, settings.tls_enabled)
                click.echo(f"\nSpark Connect router ready: {url}")
                click.echo(f'  pyspark: SparkSession.builder.remote("{url}").getOrCreate()')
                click.echo(f"  drivers: {', '.join(addresses)}    Ctrl-C stops everything\n")

            task = asyncio.ensure_future(announce())
            watcher = asyncio.ensure_future(
                _watch(drivers.drivers, replica, settings.driver_startup_timeout_seconds)
            )
            try:
                await serve_until_signal(replica, ready)
            finally:
                task.cancel()
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

        run_async(main(), settings.event_loop)
        return 0
    except (StartupError, LocalDriverError) as exc:
        click.echo(f"spark-router: {exc}", err=True)
        return EXIT_STARTUP_FAILURE
    except KeyboardInterrupt:
        return 130
    finally:
        if drivers is not None:
            click.echo("Stopping drivers ...", err=True)
            drivers.stop()
