"""Assembles a replica: registry, rings, upstream channels, the proxy and its gRPC server.

Lifecycle: start (bind, or fail with StartupError) → serve → stop. A first SIGTERM or
SIGINT stops accepting calls and gives in-flight calls `shutdown_grace_seconds` to
finish; a second one stops at once. Signal handlers only set flags. Shutdown runs in a
fixed order: readiness off (/readyz 503, gRPC health NOT_SERVING), so load balancers take
the replica out first; then the gRPC server stops with its grace; the admin listener
(admin.py) goes last, so probes and /metrics answer until the end.

The router port also serves the standard `grpc.health.v1.Health`: SERVING (overall, and
for `spark.connect.SparkConnectService`) while some driver takes new sessions,
NOT_SERVING otherwise and from the start of shutdown.

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
import shutil
import signal
import tempfile
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
from grpc_health.v1 import health as grpc_health  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import multiprocess

from registry.base import Registry, RegistryUnavailable
from registry.models import DrainMode, Driver, DriverState, EventKind
from router import protocol
from router.admin import AdminListener
from router.config import Settings
from router.placement import Placement
from router.proxy import Proxy
from router.ring import Rings
from router.telemetry import MULTIPROC_ENV, InstrumentedRegistry, Telemetry
from router.upstreams import Health, Upstreams, channel_options

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_STARTUP_FAILURE = 3

# A worker that keeps dying is a configuration or environment problem, not bad luck.
_MAX_RESTARTS = 5
_RESTART_WINDOW_SECONDS = 60.0


class StartupError(Exception):
    """The replica could not start (port taken, no drivers, ...); str() says why."""


class Replica:
    """One router replica: a gRPC server forwarding Spark Connect calls to drivers.

    Membership is the static `--driver`s merged with the registry's live drivers (a
    registry record wins for the same address: it knows the driver's state). It is re-read
    on every driver event and every `membership_poll_seconds` (an expired heartbeat makes
    no event); while the registry is unreachable the last membership is kept.
    """

    def __init__(self, settings: Settings, drivers: Sequence[str] | None = None) -> None:
        from registry import open_registry

        self.settings = settings
        self._static = [Driver(a) for a in (drivers if drivers is not None else settings.drivers)]
        self.telemetry = Telemetry()
        self.registry: Registry = cast(
            Registry,
            InstrumentedRegistry(
                open_registry(settings.registry, pin_ttl=settings.pin_ttl_seconds), self.telemetry
            ),
        )
        self.upstreams = Upstreams(settings)
        self.placement = Placement(
            self.registry,
            Rings.build(self._static),
            settings.session_cache_size,
            settings.default_pool,
            self.telemetry,
            is_down=lambda address: self.health.is_down(address),
        )
        self.health = Health(settings, self._on_health_change, telemetry=self.telemetry)
        self._membership: tuple[Driver, ...] = ()
        self._dynamic: Sequence[Driver] = ()
        self._draining: Mapping[str, DrainMode] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._server: grpc.aio.Server | None = None
        self.static_drivers = tuple(d.address for d in self._static)
        # grpc.health.v1.Health on the router port; its status follows membership.
        self.grpc_health: Any = grpc_health.aio.HealthServicer()
        self._serving: bool | None = None
        self.shutting_down = False  # from the first moment of stop(): not ready
        # Whether the last membership read reached the registry: readiness follows the
        # registry within membership_poll_seconds even when no call touches it.
        self.registry_reachable = True
        self.admin: AdminListener | None = None
        self.admin_port = 0
        self.port = 0

    @property
    def address(self) -> str:
        """HOST:PORT the replica listens on (the real port when 0 was asked for)."""
        host, _ = self.settings.listen_host_port
        return f"{host}:{self.port}"

    async def start(self) -> int:
        """Read membership, bind and start serving; return the bound port."""
        if not self._static and self.settings.registry.startswith("memory://"):
            raise StartupError(
                "no drivers: give --driver HOST:PORT (repeatable), SPARK_ROUTER_DRIVERS, "
                "or a shared --registry that agents register drivers in"
            )
        await self.refresh_membership()
        # Probes and moves build requests with pyspark's protos, whose import takes a second:
        # pay it now, not on the event loop of a replica that already says it is ready.
        import pyspark.sql.connect.proto.base_pb2  # noqa: F401

        reuse_port = 1 if self.settings.workers > 1 else 0
        server = grpc.aio.server(
            options=[*channel_options(self.settings), ("grpc.so_reuseport", reuse_port)]
        )
        self.proxy = Proxy(
            self.placement, self.upstreams, self.health, self.registry, self.settings
        )
        # The proxy answers only /spark.connect.SparkConnectService/ paths (None for the
        # rest), so the health service's calls reach its own handlers.
        server.add_generic_rpc_handlers((self.proxy,))
        health_pb2_grpc.add_HealthServicer_to_server(self.grpc_health, server)
        try:
            self.port = server.add_insecure_port(self.settings.listen)
        except RuntimeError as exc:
            raise StartupError(
                f"cannot listen on {self.settings.listen}: {exc} (is the port in use?)"
            ) from exc
        await server.start()
        self._server = server
        admin = "off"
        if self.settings.admin_host_port is not None:
            listener = AdminListener(self)
            try:
                self.admin_port = await listener.start()
            except OSError as exc:
                await server.stop(0)
                self._server = None
                raise StartupError(
                    f"cannot listen on admin_listen {self.settings.admin_listen}: "
                    f"{exc.strerror or exc} (is the port in use? admin_listen: off turns it off)"
                ) from exc
            self.admin = listener
            admin = f"http://{self.settings.admin_host_port[0]}:{self.admin_port}"
        self._tasks = [
            asyncio.ensure_future(self._watch_events()),
            asyncio.ensure_future(self._maintain()),
            asyncio.ensure_future(self.health.run(lambda: self.probe_targets)),
        ]
        log.info(
            "spark-router listening on %s, admin %s, registry %s, drivers: %s",
            self.address,
            admin,
            _redact(self.settings.registry),
            ", ".join(d.address for d in self._membership) or "none yet",
        )
        return self.port

    async def refresh_membership(self) -> None:
        """Re-read the registry's drivers and swap in new rings if membership changed."""
        try:
            self._dynamic = await self.registry.drivers()
            self._draining = await self.registry.draining()
            self.registry_reachable = True
            self.placement.note_registry_ok()
        except RegistryUnavailable as exc:
            self.registry_reachable = False
            self.placement.note_registry_error(exc)
        members = {d.address: d for d in self._static}
        members.update((d.address, d) for d in self._dynamic)
        for address in self._draining.keys() & members.keys():  # operators' drain marks
            if members[address].state is DriverState.ACTIVE:
                members[address] = replace(members[address], state=DriverState.DRAINING)
        for address in self.health.down & members.keys():  # this replica's own probes
            members[address] = replace(members[address], state=DriverState.DOWN)
        membership = tuple(sorted(members.values(), key=lambda d: d.address))
        serving = any(d.takes_new_sessions for d in membership)
        if serving is not self._serving:
            if not serving:
                log.warning("no driver takes new sessions: not ready, gRPC health NOT_SERVING")
            elif self._serving is not None:
                log.info("a driver takes new sessions again: ready, gRPC health SERVING")
            self._serving = serving
            status = health_pb2.HealthCheckResponse.SERVING
            if not serving:
                status = health_pb2.HealthCheckResponse.NOT_SERVING
            for service in (grpc_health.OVERALL_HEALTH, protocol.SERVICE):
                await self.grpc_health.set(service, status)  # ignored once shutdown began
        move_idle = frozenset(a for a, m in self._draining.items() if m is DrainMode.MOVE_IDLE)
        if membership == self._membership and move_idle == self.placement.move_idle:
            return
        self._membership = membership
        self.placement.update_membership(Rings.build(membership), move_idle)
        self.telemetry.live_drivers.clear()
        for d in membership:
            if d.takes_new_sessions:
                self.telemetry.live_drivers.labels(d.pool).inc()
        log.info(
            "membership: %s",
            ", ".join(f"{d.address} ({d.pool}, {d.state.value})" for d in membership) or "none",
        )

    @property
    def probe_targets(self) -> list[str]:
        """Drivers this replica probes: every member, down ones too (to see them recover)."""
        return [d.address for d in self._membership]

    async def _on_health_change(self, address: str, live: bool) -> None:
        await self.refresh_membership()

    async def _watch_events(self) -> None:
        """Follow registry events: membership changes and other replicas' pin changes."""
        backoff = 0.1
        while True:
            try:
                async for event in self.registry.events():
                    backoff = 0.1
                    if event.kind in _DRIVER_EVENTS:
                        await self.refresh_membership()
                    else:
                        self.placement.on_event(event)
                return  # the registry was closed
            except RegistryUnavailable as exc:
                self.placement.note_registry_error(exc)
            await asyncio.sleep(backoff)  # bounded retry while the registry is down
            backoff = min(backoff * 2, 5.0)

    async def _maintain(self) -> None:
        """Periodic work: membership poll, TTL refresh and write-back of outage pins."""
        loop = asyncio.get_running_loop()
        next_flush = loop.time() + self.settings.pin_touch_interval_seconds
        while True:
            await asyncio.sleep(self.settings.membership_poll_seconds)
            await self.refresh_membership()
            self.telemetry.set_sessions(self.placement.cache.counts)
            if self.placement.needs_flush or loop.time() >= next_flush:
                await self.placement.flush()
                next_flush = loop.time() + self.settings.pin_touch_interval_seconds

    async def stop(self, grace: float | None = None) -> None:
        """Readiness off, stop accepting calls, let in-flight ones finish for `grace`, close."""
        if not self.shutting_down:
            # First, so load balancers and kubelets take the replica out while calls drain.
            self.shutting_down = True
            await self.grpc_health.enter_graceful_shutdown()
        if self._server is not None:
            grace = self.settings.shutdown_grace_seconds if grace is None else grace
            await self._server.stop(grace)
            self._server = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        with contextlib.suppress(RegistryUnavailable):
            await self.placement.flush()  # hand outage pins and TTLs over before leaving
        if self.admin is not None:
            # Last of the listeners, before what its API uses (registry, upstreams) closes.
            await self.admin.stop()
            self.admin = None
        await self.upstreams.close()
        await self.registry.close()
        self.telemetry.shutdown()  # flush the spans of the last calls

    async def __aenter__(self) -> Replica:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(0)


_DRIVER_EVENTS = frozenset(
    {EventKind.DRIVER_JOINED, EventKind.DRIVER_LEFT, EventKind.DRIVER_CHANGED}
)


def _redact(url: str) -> str:
    """A registry URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


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
            "shutting down: not ready any more; draining calls for up to %ss",
            replica.settings.shutdown_grace_seconds,
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


T = TypeVar("T")


def run_async(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    """Run `main` to completion on uvloop (auto: when installed) or asyncio's own loop.

    uvloop took 4-9 % less router CPU per call in loadtest/bench.py (docs/benchmarks.md).
    """
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise StartupError("event_loop is uvloop, but uvloop is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def run_replica(settings: Settings) -> int:
    """Run one replica in this process until signalled; return the exit code."""
    try:
        run_async(serve_until_signal(Replica(settings)), settings.event_loop)
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_STARTUP_FAILURE
    return EXIT_OK


def _worker_main(settings: Settings, log_level: str) -> None:
    """Entry point of a worker process (spawned)."""
    from router.local import die_with_parent
    from router.logs import configure_logging

    die_with_parent()  # a SIGKILLed supervisor must not leave workers holding the port
    configure_logging(log_level, settings.log_format)
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
    # Workers keep their metrics in files here, so /metrics of any worker sums them all;
    # spawned workers import prometheus_client with this set, which is what switches it on.
    own_metrics_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        own_metrics_dir = tempfile.mkdtemp(prefix="spark-router-metrics-")
        os.environ[MULTIPROC_ENV] = own_metrics_dir
    metrics_dir = os.environ[MULTIPROC_ENV]

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
                if proc.pid is not None:
                    multiprocess.mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
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
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
            del os.environ[MULTIPROC_ENV]
    return exit_code
