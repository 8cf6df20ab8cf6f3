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

With tls_cert_file the port serves TLS only (router/tls.py: certificates re-read when they
change, client certificates under tls_client_auth require); without authentication on a
port beyond loopback the replica says so at start-up, since anyone who reaches the port
can use every driver.

With a policy file the replica enforces its `quotas:` (admit/quotas.py) through one
QuotaGate: synced once at start, before the port opens, then every `quota_sync_seconds` in a
background task; a reload of the file swaps its quotas with the policy; on stop its slots
are handed back once the calls drained.

`--workers N` is supervisor.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
from grpc_health.v1 import health as grpc_health  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.addresses import redact_url
from common.lifecycle import EXIT_OK, EXIT_STARTUP_FAILURE, Signals, finish_unless_forced
from registry.base import Registry, RegistryUnavailable
from registry.models import DrainMode, Driver, EventKind
from router.admin.http import AdminListener
from router.admit.audit import AuditLog, AuditSettings, PrometheusAuditMetrics, session_expired
from router.admit.auth import Authenticator
from router.admit.policy_file import Loaded, PolicyFile
from router.admit.quotas import QuotaGate
from router.config import ConfigError, Settings
from router.dataplane import protocol
from router.dataplane.proxy import Proxy
from router.health import Health
from router.membership import merge
from router.memory import trim_every
from router.sessions.placement import Placement
from router.sessions.ring import Rings
from router.telemetry import InstrumentedRegistry, Telemetry
from router.tls import TLSConfigError, driver_dialing, server_credentials
from router.upstreams import Upstreams, channel_options

log = logging.getLogger(__name__)

# How long stop() waits for its background tasks to end once cancelled.
_TASK_STOP_SECONDS = 5.0
# Lapsed pins taken from the registry per tick: batches of this many, at most this often.
_EXPIRED_BATCH = 500
_EXPIRED_BATCHES = 10


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
        try:
            dialing = driver_dialing(settings)
        except TLSConfigError as exc:
            raise StartupError(str(exc)) from exc
        self.upstreams = Upstreams(settings, dialing)
        try:
            self.auth = Authenticator.from_settings(settings, self.telemetry.authentications)
            self.policy = (
                None
                if settings.policy_file is None
                else PolicyFile(
                    settings.policy_file, settings.default_pool, settings.policy_reload_seconds
                )
            )
            self.audit = self._audit_log()
        except ConfigError as exc:
            raise StartupError(str(exc)) from exc
        self.quotas = None if self.policy is None else self._quota_gate(self.policy)
        self.placement = Placement(
            self.registry,
            Rings.build(self._static),
            settings.session_cache_size,
            settings.default_pool,
            self.telemetry,
            is_down=lambda address: self.health.is_down(address),
        )
        self.health = Health(
            settings,
            self._on_health_change,
            telemetry=self.telemetry,
            dialing=dialing,
            members=lambda: self.probe_targets,
        )
        self._membership: tuple[Driver, ...] = ()
        self._announced: tuple[Driver, ...] = ()  # the membership before this replica's verdicts
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
        self._started_proxy = False  # start() builds the proxy (and its journal recorder)

    def _audit_log(self) -> AuditLog:
        """The audit trail (audit_file, audit_stdout); a log that writes nothing without them."""
        t = self.telemetry
        metrics = PrometheusAuditMetrics(
            t.audit_queue_depth,
            t.audit_dropped,
            t.audit_refused,
            t.audit_write_errors,
            t.audit_written,
        )
        # Which replica wrote a line: the pod's name under Kubernetes, and the worker.
        replica = f"{socket.gethostname()}:{os.getpid()}"
        return AuditLog(AuditSettings.from_settings(self.settings, replica), metrics)

    def _quota_gate(self, policy: PolicyFile) -> QuotaGate:
        """The gate of the policy file's quotas, following its reloads."""
        s = self.settings
        degraded = self.telemetry.quota_degraded
        gate = QuotaGate(
            self.registry,
            policy.quotas,
            replica=uuid.uuid4().hex,  # per process: workers and restarts lease apart
            lease_seconds=s.quota_lease_seconds,
            token_hold_seconds=s.quota_token_hold_seconds,
            slot_lease_seconds=s.quota_slot_lease_seconds,
            sync_seconds=s.quota_sync_seconds,
            idle_seconds=s.quota_idle_seconds,
            slot_wait_seconds=s.quota_slot_wait_seconds,
            on_degraded=lambda down: degraded.set(1 if down else 0),
        )

        def swap(loaded: Loaded) -> None:
            gate.quotas = loaded.quotas

        policy.follow(swap)
        return gate

    async def _sync_quotas(self, gate: QuotaGate) -> None:
        """Every quota_sync_seconds: idle slots back, leases renewed, replicas counted."""
        while True:
            await asyncio.sleep(self.settings.quota_sync_seconds)
            try:
                await gate.sync()
            except Exception:  # a bug must not stop renewals: other replicas would over-admit
                log.exception(
                    "quota sync failed; trying again in %ss", self.settings.quota_sync_seconds
                )
            self.telemetry.quota_replicas.set(gate.replicas)
            pool_calls = self.telemetry.quota_pool_calls
            for bucket in gate.usage()["buckets"]:
                if bucket["kind"] == "pool":
                    pool_calls.labels(bucket["name"]).set(bucket["calls_last_second"])

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

        server = grpc.aio.server(options=server_options(self.settings))
        await self.audit.start()  # before the first call: its records have a writer
        await self.auth.start()  # token file read, JWKS fetched: before the first call
        if self.policy is not None:
            await self.policy.start()
        if self.quotas is not None:
            await self.quotas.sync()  # this replica counted among those sharing the quotas
            self.telemetry.quota_replicas.set(self.quotas.replicas)
        self.proxy = Proxy(
            self.placement,
            self.upstreams,
            self.health,
            self.registry,
            self.settings,
            self.auth,
            self.policy,
            self.quotas,
            self.audit,
        )
        # The proxy answers only /spark.connect.SparkConnectService/ paths (None for the
        # rest), so the health service's calls reach its own handlers.
        self._started_proxy = True
        server.add_generic_rpc_handlers((self.proxy,))
        health_pb2_grpc.add_HealthServicer_to_server(self.grpc_health, server)
        try:
            if self.settings.tls_enabled:
                credentials = server_credentials(self.settings)
                self.port = server.add_secure_port(self.settings.listen, credentials)
            else:
                self.port = server.add_insecure_port(self.settings.listen)
        except TLSConfigError as exc:
            raise StartupError(str(exc)) from exc
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
            *self._trims(),
            asyncio.ensure_future(self.health.run()),
            *(
                []
                if self.quotas is None
                else [asyncio.ensure_future(self._sync_quotas(self.quotas))]
            ),
        ]
        self._warn_if_open()
        log.info(
            "spark-router listening on %s (%s), admin %s, registry %s, drivers: %s",
            self.address,
            _transport(self.settings),
            admin,
            redact_url(self.settings.registry),
            ", ".join(d.address for d in self._membership) or "none yet",
        )
        return self.port

    def _warn_if_open(self) -> None:
        """Say it when anyone who reaches a port may use every driver: no auth, not loopback.

        The gRPC port without `auth`; the admin API (drain, move) without `admin_token` or
        `auth` (with auth on and no admin role configured, /api/ is closed, not open).
        """
        settings = self.settings
        host, _ = settings.listen_host_port
        if not settings.auth_enabled and not is_loopback(host):
            log.warning(
                "serving %s beyond loopback without authentication: anyone who reaches the "
                "port can run code on every driver (set auth%s, or listen on 127.0.0.1)",
                self.address,
                "" if settings.tls_enabled else ", and tls_cert_file/tls_key_file",
            )
        admin = settings.admin_host_port
        api_open = settings.admin_token is None and not settings.auth_enabled
        if admin is not None and api_open and not is_loopback(admin[0]):
            log.warning(
                "admin API on %s:%d beyond loopback without admin_token: anyone who reaches "
                "it can drain drivers and move sessions (set admin_token, or bind "
                "admin_listen to 127.0.0.1)",
                admin[0],
                self.admin_port,
            )

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
        await self._apply_membership()

    async def _apply_membership(self) -> None:
        """Merge what is known into a snapshot; swap it in, close departed drivers' channels."""
        # Everything up to the first await runs at once: whoever saw a health change (a
        # call that just confirmed its driver dead) reads the new snapshot right after.
        self._announced = merge(self._static, self._dynamic, self._draining, ())
        membership = merge(self._static, self._dynamic, self._draining, self.health.down)
        move_idle = frozenset(a for a, m in self._draining.items() if m is DrainMode.MOVE_IDLE)
        if membership != self._membership or move_idle != self.placement.move_idle:
            departed = {d.address for d in self._membership} - {d.address for d in membership}
            self._membership = membership
            self.placement.update_membership(Rings.build(membership), move_idle)
            for address in sorted(departed):  # not merely down ones: they may come back
                self.upstreams.discard(address)
            self.telemetry.live_drivers.clear()
            for d in membership:
                if d.takes_new_sessions:
                    self.telemetry.live_drivers.labels(d.pool).inc()
            log.info(
                "membership: %s",
                ", ".join(f"{d.address} ({d.pool}, {d.state.value})" for d in membership) or "none",
            )
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

    def driver_restarted(self, address: str) -> None:
        """A driver's process exited and starts again on its address (`up`): its sessions lost
        their state there, and each rebuilds it (a replay) on its next call."""
        count = self.placement.lost_state(address)
        if count:
            log.info(
                "driver %s lost its state: %d session(s) rebuild it on their next call",
                address,
                count,
            )

    @property
    def probe_targets(self) -> tuple[Driver, ...]:
        """Every member as announced, down ones too (probed to see them recover)."""
        # The registry's own states, without this replica's verdicts: the ejection cap must
        # tell a driver its agent announced down from one only these probes hold down.
        return self._announced

    async def _on_health_change(self, address: str, live: bool) -> None:
        await self._apply_membership()  # before any registry round trip: see _apply_membership
        if not live:
            self.upstreams.cut(address)  # its calls in flight would hang with a hung driver
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

    def _trims(self) -> list[asyncio.Task[None]]:
        """The heap-trim task (router/memory.py), unless memory_trim_seconds is 0."""
        seconds = self.settings.memory_trim_seconds
        return [asyncio.create_task(trim_every(seconds))] if seconds > 0 else []

    async def _maintain(self) -> None:
        """Periodic work: membership poll, TTL refresh and write-back of outage pins."""
        loop = asyncio.get_running_loop()
        next_flush = loop.time() + self.settings.pin_touch_interval_seconds
        while True:
            await asyncio.sleep(self.settings.membership_poll_seconds)
            await self.refresh_membership()
            self.telemetry.set_sessions(self.placement.cache.counts)
            self.telemetry.set_request_bytes(self.proxy.budget.request_bytes)
            if self.placement.needs_flush or loop.time() >= next_flush:
                await self.placement.flush()
                await self._expired()
                next_flush = loop.time() + self.settings.pin_touch_interval_seconds
            if self.placement.has_learned:  # server-side ids seen since the last tick
                await self.placement.write_learned()
            if self.proxy.recorder.needs_flush:  # journal entries of a registry outage
                await self.proxy.recorder.flush()

    async def _expired(self) -> None:
        """Sessions whose pins lapsed (any replica's): counted, and on the audit trail."""
        for _ in range(_EXPIRED_BATCHES):  # bounded: the rest waits for the next tick
            lapsed = await self.placement.expired(_EXPIRED_BATCH)
            if self.audit.enabled:
                for pin in lapsed:
                    self.audit.offer(
                        session_expired(
                            user=pin.owner,
                            session=pin.session_id,
                            pool=pin.pool,
                            driver=pin.driver,
                            reason="idle",
                        )
                    )
            if len(lapsed) < _EXPIRED_BATCH:
                return

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
        if self._tasks:
            # Bounded: a task that swallows its cancel (a client library's cleanup awaiting a
            # dead connection) must not keep a stopping replica alive.
            ended, stuck = await asyncio.wait(self._tasks, timeout=_TASK_STOP_SECONDS)
            for task in ended:
                if not task.cancelled() and task.exception() is not None:
                    log.error(
                        "background task %s failed", task.get_coro(), exc_info=task.exception()
                    )
            for task in stuck:
                log.warning(
                    "background task %s did not stop within %ss of its cancel; leaving it",
                    task.get_coro(),
                    _TASK_STOP_SECONDS,
                )
        self._tasks = []
        with contextlib.suppress(RegistryUnavailable):
            await self.placement.flush()  # hand outage pins and TTLs over before leaving
            await self.placement.write_learned()
            if self._started_proxy:
                await self.proxy.recorder.flush()
        if self.quotas is not None:
            await self.quotas.close()  # calls drained: every slot back for the other replicas
        lost = await self.audit.close()  # the calls' records are queued: write them out
        if lost:
            log.warning("audit: %d record(s) not written before the close timeout", lost)
        if self.admin is not None:
            # Last of the listeners, before what its API uses (registry, upstreams) closes.
            await self.admin.stop()
            self.admin = None
        await self.auth.close()
        if self.policy is not None:
            await self.policy.close()
        await self.upstreams.close()
        await self.registry.close()
        self.telemetry.shutdown()  # flush the spans of the last calls

    async def __aenter__(self) -> Replica:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(0)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments of the router's gRPC server: message sizes, port sharing, keepalive.

    Keepalive both ways. Clients' pings are accepted while idle and down to
    `min_client_ping_interval_seconds` (grpc's defaults count any ping on an idle
    connection as a strike and answer the third with GOAWAY ENHANCE_YOUR_CALM
    too_many_pings: pyspark's 60 s pings earned it after ~3 minutes). The server pings
    connections idle for `keepalive_time_seconds` itself, calls or not, and closes one whose
    ping goes unanswered for `keepalive_timeout_seconds`: a client that vanished without a
    FIN/RST (a NAT mapping dropped, a host gone) does not hold its connection and streams.
    """
    min_ping_ms = int(settings.min_client_ping_interval_seconds * 1000)
    return [
        *channel_options(settings),
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ("grpc.keepalive_permit_without_calls", 1),  # theirs accepted, ours sent, while idle
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.http2.max_ping_strikes", 2),  # grpc's default, stated: 2 early pings forgiven
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        # What grpc 1.85 actually waits for a ping's ack (default 60 s, whatever the
        # keepalive timeout says; measured in tests/integration/test_keepalive.py).
        ("grpc.http2.ping_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection
    ]


def is_loopback(host: str) -> bool:
    """Whether a listen host reaches only this machine (localhost, 127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name: it may resolve to anything


def _transport(settings: Settings) -> str:
    """How the port is served, for the start-up line."""
    if not settings.tls_enabled:
        return "plaintext"
    return {"require": "TLS, client certificates required"}.get(settings.tls_client_auth, "TLS")


_DRIVER_EVENTS = frozenset(
    {EventKind.DRIVER_JOINED, EventKind.DRIVER_LEFT, EventKind.DRIVER_CHANGED}
)


async def serve_until_signal(replica: Replica, ready: asyncio.Event | None = None) -> None:
    """Run `replica` until SIGTERM/SIGINT; a second signal cuts the grace period short."""
    async with Signals() as signals:
        await replica.start()
        if ready is not None:
            ready.set()
        await signals.stopping.wait()
        log.info(
            "shutting down: not ready any more; draining calls for up to %ss",
            replica.settings.shutdown_grace_seconds,
        )
        finished, _ = await finish_unless_forced(replica.stop(), signals)
        if not finished:
            log.warning("second signal: stopping now")
            await replica.stop(0)


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
