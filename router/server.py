"""Assembles a replica: registry, rings, upstream channels, the proxy and its gRPC server.

Lifecycle: start (bind, or fail with StartupError) → serve → stop. A first SIGTERM or
SIGINT stops accepting calls and gives in-flight calls `shutdown_grace_seconds` to
finish; a second one stops at once. Signal handlers only set flags.

With `workers > 1` a supervisor process runs that many replica processes sharing the
listen port through SO_REUSEPORT (the kernel spreads connections); they are started with
the `spawn` method because gRPC does not survive fork. A worker that dies is restarted,
a bounded number of times; Ctrl-C reaches the supervisor, which stops its workers in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import time
from collections.abc import Sequence

import grpc
import grpc.aio

from registry.memory import MemoryRegistry
from registry.models import Driver
from router.config import Settings
from router.placement import Placement
from router.proxy import Proxy
from router.ring import Rings
from router.upstreams import Upstreams, channel_options

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_STARTUP_FAILURE = 3

# A worker that keeps dying is a configuration or environment problem, not bad luck.
_MAX_RESTARTS = 5
_RESTART_WINDOW_SECONDS = 60.0


class StartupError(Exception):
    """The replica could not start (port taken, no drivers, ...); str() says why."""


class Replica:
    """One router replica: a gRPC server forwarding Spark Connect calls to drivers."""

    def __init__(self, settings: Settings, drivers: Sequence[str] | None = None) -> None:
        self.settings = settings
        self._static = list(drivers if drivers is not None else settings.drivers)
        self.registry = MemoryRegistry()
        self.upstreams = Upstreams(settings)
        self.placement = Placement(self.registry, Rings(), settings.session_cache_size)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """HOST:PORT the replica listens on (the real port when 0 was asked for)."""
        host, _ = self.settings.listen_host_port
        return f"{host}:{self.port}"

    async def start(self) -> int:
        """Bind and start serving; return the bound port."""
        if not self._static:
            raise StartupError(
                "no drivers: give --driver HOST:PORT (repeatable) or SPARK_ROUTER_DRIVERS"
            )
        for address in self._static:
            await self.registry.upsert_driver(Driver(address))
        self.placement.update_membership(Rings.build(await self.registry.drivers()))

        reuse_port = 1 if self.settings.workers > 1 else 0
        server = grpc.aio.server(
            options=[*channel_options(self.settings), ("grpc.so_reuseport", reuse_port)]
        )
        server.add_generic_rpc_handlers((Proxy(self.placement, self.upstreams),))
        try:
            self.port = server.add_insecure_port(self.settings.listen)
        except RuntimeError as exc:
            raise StartupError(
                f"cannot listen on {self.settings.listen}: {exc} (is the port in use?)"
            ) from exc
        await server.start()
        self._server = server
        log.info("spark-router listening on %s, drivers: %s", self.address, ", ".join(self._static))
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish for `grace` seconds, close."""
        if self._server is not None:
            grace = self.settings.shutdown_grace_seconds if grace is None else grace
            await self._server.stop(grace)
            self._server = None
        await self.upstreams.close()
        await self.registry.close()

    async def __aenter__(self) -> Replica:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(0)


async def serve_until_signal(replica: Replica, ready: asyncio.Event | None = None) -> None:
    """Run `replica` until SIGTERM/SIGINT; a second signal cuts the grace period short."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    forced = asyncio.Event()

    def on_signal() -> None:
        if stopping.is_set():
            forced.set()
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await replica.start()
        if ready is not None:
            ready.set()
        await stopping.wait()
        log.info(
            "shutting down: draining calls for up to %ss", replica.settings.shutdown_grace_seconds
        )
        stop = asyncio.ensure_future(replica.stop())
        force = asyncio.ensure_future(forced.wait())
        await asyncio.wait((stop, force), return_when=asyncio.FIRST_COMPLETED)
        if not stop.done():
            log.warning("second signal: stopping now")
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop
            await replica.stop(0)
        force.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run_replica(settings: Settings) -> int:
    """Run one replica in this process until signalled; return the exit code."""
    try:
        asyncio.run(serve_until_signal(Replica(settings)))
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_STARTUP_FAILURE
    return EXIT_OK


def _worker_main(settings: Settings, log_level: str) -> None:
    """Entry point of a worker process (spawned)."""
    from router.cli import configure_logging

    configure_logging(log_level)
    # Ctrl-C goes to the whole process group; only the supervisor acts on it and then
    # sends each worker one SIGTERM, so a worker never sees it as a second signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(run_replica(settings))


def run_workers(settings: Settings) -> int:
    """Run `settings.workers` replica processes on one port; return the exit code."""
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    forced = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping, forced
        if stopping:
            forced = True
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def spawn() -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(target=_worker_main, args=(settings, settings.log_level), daemon=False)
        proc.start()
        return proc

    workers = [spawn() for _ in range(settings.workers)]
    restarts: list[float] = []
    exit_code = EXIT_OK
    try:
        while not stopping:
            for i, proc in enumerate(workers):
                proc.join(timeout=0.2 / len(workers))
                if proc.exitcode is None or stopping:
                    continue
                if proc.exitcode == EXIT_STARTUP_FAILURE:
                    log.error("worker %d could not start; stopping", proc.pid)
                    exit_code = EXIT_STARTUP_FAILURE
                    stopping = True
                    break
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < _RESTART_WINDOW_SECONDS]
                if len(restarts) >= _MAX_RESTARTS:
                    log.error(
                        "workers died %d times within %ss; giving up",
                        len(restarts) + 1,
                        _RESTART_WINDOW_SECONDS,
                    )
                    exit_code = 1
                    stopping = True
                    break
                restarts.append(now)
                log.warning("worker %d exited with %s; restarting it", proc.pid, proc.exitcode)
                workers[i] = spawn()
    finally:
        for proc in workers:
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_grace_seconds + 5
        for proc in workers:
            while proc.exitcode is None and time.monotonic() < deadline and not forced:
                proc.join(timeout=0.2)
            if proc.exitcode is None:
                proc.kill()
                proc.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code
