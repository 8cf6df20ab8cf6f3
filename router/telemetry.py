"""What a replica tells its operators: every Prometheus metric and the OpenTelemetry tracer.

Metrics. Each replica owns a `Telemetry` with its own CollectorRegistry (several replicas
in one process — tests, `up` — keep separate numbers); the admin listener serves
`exposition()`. With `--workers N` the supervisor sets PROMETHEUS_MULTIPROC_DIR before it
spawns the workers, so every value lives in a per-process file and `exposition()` in any
worker sums the workers up (gauges say how: livesum, livemax, ...). Labels come from fixed
sets (method names, status codes, pools, drivers, outcomes), never a session id.

Traces follow OpenTelemetry's RPC conventions: one SERVER span per call named
`spark.connect.SparkConnectService/<Method>` with `rpc.*`, `spark.*` and `router.*`
attributes; child spans for registry operations, journal replay and the upstream call (a
CLIENT span whose context goes to the driver in `traceparent`). A client's W3C
`traceparent` continues its trace. Configured by the standard variables
(`OTEL_TRACES_EXPORTER` otlp | console | none, `OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER[_ARG]`), except that tracing is off until
`OTEL_TRACES_EXPORTER` names an exporter: a router should not spam a collector that is not
there. Off, a call costs one `if`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from router.errors import status_of

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SERVICE = "spark.connect.SparkConnectService"
DEFAULT_SERVICE_NAME = "spark-session-router"

# Router time is sub-millisecond to a few ms (more with a registry round trip or a replay);
# driver time spans a config call to a long query.
_ROUTE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5)
_CALL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)
_REGISTRY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)

Metadata = Sequence[tuple[str, str | bytes]]


class Telemetry:
    """The metrics and the tracer of one replica."""

    def __init__(self, tracer_provider: Any = None) -> None:
        self.registry = r = CollectorRegistry()
        # --- calls
        self.calls = Counter(
            "spark_router_calls",
            "calls handled, by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.call_seconds = Histogram(
            "spark_router_call_duration_seconds",
            "whole calls as the client sees them (streams: until their last message)",
            ["method"],
            buckets=_CALL_BUCKETS,
            registry=r,
        )
        self.route_seconds = Histogram(
            "spark_router_route_duration_seconds",
            "router time before a call is forwarded: identify, place (registry, move, replay)",
            ["method"],
            buckets=_ROUTE_BUCKETS,
            registry=r,
        )
        self.driver_seconds = Histogram(
            "spark_router_driver_first_response_seconds",
            "driver time: from forwarding a call to the driver's first response",
            ["method"],
            buckets=_CALL_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "spark_router_calls_in_flight",
            "calls being handled now, by kind (unary, stream)",
            ["kind"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.bytes = Counter(
            "spark_router_stream_bytes",
            "message bytes relayed by streams, by direction (to_client, to_driver)",
            ["direction"],
            registry=r,
        )
        # --- sessions and pins
        self.sessions = Gauge(
            "spark_router_sessions",
            "sessions this replica routes (its pin cache), by pool and driver",
            ["pool", "driver"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.sessions_placed = Counter(
            "spark_router_sessions_placed",
            "new sessions placed, by pool and how (ring, registry pin, degraded ring, clone)",
            ["pool", "source"],
            registry=r,
        )
        self.sessions_moved = Counter(
            "spark_router_sessions_moved",
            "sessions moved to another driver by this replica (one per session and move), "
            "by pool and reason (driver_down, drain, admin)",
            ["pool", "reason"],
            registry=r,
        )
        self.replays_failed = Counter(
            "spark_router_replays_failed",
            "moved sessions whose state could not be replayed on the new driver, retry "
            "included: they go on without their identity (Spark answers SESSION_CHANGED), "
            "by pool and reason (driver_down, drain, admin)",
            ["pool", "reason"],
            registry=r,
        )
        self.executions_rerun = Counter(
            "spark_router_executions_rerun",
            "ExecutePlan streams cut off by a lost driver and run again on the session's new "
            "driver in the same call, by pool",
            ["pool"],
            registry=r,
        )
        self.sessions_released = Counter(
            "spark_router_sessions_released",
            "sessions released (ReleaseSession) through this replica, by pool",
            ["pool"],
            registry=r,
        )
        self.sessions_expired = Counter(
            "spark_router_sessions_expired",
            "sessions whose pin lapsed (idle for pin_ttl_seconds, never released), by pool; "
            "each counted by the one replica that found it",
            ["pool"],
            registry=r,
        )
        self.authentications = Counter(
            "spark_router_authentications",
            "callers' credentials checked, by mode (token, jwt, trusted-header, mtls, none) "
            "and result (ok, cached, missing, invalid, expired, refused)",
            ["mode", "result"],
            registry=r,
        )
        self.ownership_refusals = Counter(
            "spark_router_ownership_refusals",
            "calls refused PERMISSION_DENIED: another user's session, or a claimed user_id "
            "other than the authenticated one (identity: reject), by reason",
            ["reason"],
            registry=r,
        )
        self.denials = Counter(
            "spark_router_denials",
            "calls refused PERMISSION_DENIED by the policy (policy_file), by reason: "
            "deny_list, no_role, pool",
            ["reason"],
            registry=r,
        )
        for reason in ("deny_list", "no_role", "pool"):
            self.denials.labels(reason)
        self.quota_refusals = Counter(
            "spark_router_quota_refusals",
            "calls refused RESOURCE_EXHAUSTED by a quota (the policy file's quotas:), by the "
            "limit reached: sessions, running, calls_per_second, pool_calls_per_second",
            ["limit"],
            registry=r,
        )
        for limit in ("sessions", "running", "calls_per_second", "pool_calls_per_second"):
            self.quota_refusals.labels(limit)
        self.quota_pool_calls = Gauge(
            "spark_router_quota_pool_calls",
            "calls of each pool with a calls_per_second quota that this replica saw in about "
            "the last second (set every quota_sync_seconds; the pool's usage of its rate)",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.operations_running = Gauge(
            "spark_router_operations_running",
            "ExecutePlan streams open on this replica, by pool (what the running quota counts)",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.quota_degraded = Gauge(
            "spark_router_quota_degraded",
            "1 while quotas cannot reach the registry: each replica enforces its share "
            "(limit / replicas) of every limit on its own",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.quota_replicas = Gauge(
            "spark_router_quota_replicas",
            "replicas sharing the quotas' leases, as this replica counted them at its last sync",
            registry=r,
            multiprocess_mode="livemax",
        )
        # The audit trail's (admit/audit.py builds PrometheusAuditMetrics on these).
        self.audit_queue_depth = Gauge(
            "spark_router_audit_queue_depth",
            "audit events waiting to be written (queued plus the batch being written)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.audit_dropped = Counter(
            "spark_router_audit_dropped",
            "audit events lost, by reason: queue_full (audit_when_full: drop), write_error "
            "(a sink failed; per sink), shutdown (left when the close timed out)",
            ["reason"],
            registry=r,
        )
        for reason in ("queue_full", "write_error", "shutdown"):
            self.audit_dropped.labels(reason)
        self.audit_refused = Counter(
            "spark_router_audit_refused",
            "calls refused RESOURCE_EXHAUSTED because the audit could not take their record "
            "(audit_when_full: refuse)",
            registry=r,
        )
        self.audit_write_errors = Counter(
            "spark_router_audit_write_errors",
            "audit batches a sink failed to write, by sink (file, stdout)",
            ["sink"],
            registry=r,
        )
        self.audit_written = Counter(
            "spark_router_audit_written",
            "audit events written, by sink (file, stdout)",
            ["sink"],
            registry=r,
        )
        self.refused_over_budget = Counter(
            "spark_router_refused_over_budget",
            "calls refused RESOURCE_EXHAUSTED by the memory budget, by the limit reached "
            "(max_streams, max_streams_per_connection, max_request_bytes_in_flight)",
            ["limit"],
            registry=r,
        )
        self.request_bytes_in_flight = Gauge(
            "spark_router_request_bytes_in_flight",
            "bytes of requests the replica holds now (counted against max_request_bytes_in_flight)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pins_pending = Gauge(
            "spark_router_pins_pending_writeback",
            "pins made during a registry outage, not yet written to the registry",
            registry=r,
            multiprocess_mode="livesum",
        )
        # --- drivers
        self.live_drivers = Gauge(
            "spark_router_live_drivers",
            "drivers taking new sessions, by pool",
            ["pool"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.driver_up = Gauge(
            "spark_router_driver_up",
            "1 while this replica's probes find the driver live, 0 once they mark it down",
            ["driver"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.probes = Counter(
            "spark_router_probes",
            "health probes, by driver and result (ok, failed)",
            ["driver", "result"],
            registry=r,
        )
        self.ejections_capped = Counter(
            "spark_router_ejections_capped",
            "times the ejection cap (max_ejection_percent) kept a driver whose probes failed "
            "live, by pool (once per refused ejection: each failed probe of a held driver)",
            ["pool"],
            registry=r,
        )
        # --- registry
        self.registry_seconds = Histogram(
            "spark_router_registry_duration_seconds",
            "registry operations, by operation",
            ["op"],
            buckets=_REGISTRY_BUCKETS,
            registry=r,
        )
        self.registry_errors = Counter(
            "spark_router_registry_errors",
            "registry operations that failed because the registry was unreachable",
            registry=r,
        )
        self.registry_degraded = Gauge(
            "spark_router_registry_degraded",
            "1 while the registry is unreachable: known sessions route from cache, "
            "new sessions by the ring alone",
            registry=r,
            multiprocess_mode="livemax",
        )
        # --- journal
        self.journal_bytes = Counter(
            "spark_router_journal_bytes",
            "bytes of session state journaled for replay",
            registry=r,
        )
        self.journal_overflows = Counter(
            "spark_router_journal_overflows",
            "sessions whose replayable state exceeded journal_max_bytes (they move strictly)",
            registry=r,
        )
        self.releases_coalesced = Counter(
            "spark_router_release_executes_coalesced",
            "ReleaseExecute(release_until) calls answered by the router and never forwarded: "
            "a newer one for the same operation superseded them",
            registry=r,
        )
        self.replay_seconds = Histogram(
            "spark_router_replay_duration_seconds",
            "replaying a moved session's journal on its new driver",
            buckets=_CALL_BUCKETS,
            registry=r,
        )
        # labels() takes a lock and walks a dict: the hot path uses these children instead.
        self.in_flight_of = {k: self.in_flight.labels(k) for k in ("unary", "stream")}
        self.bytes_to_client = self.bytes.labels("to_client")
        self.bytes_to_driver = self.bytes.labels("to_driver")
        self._methods: dict[str, MethodMetrics] = {}
        self.tracer: Any = None
        self._provider: Any = None
        self.use_tracer_provider(tracer_provider if tracer_provider else tracer_provider_from_env())

    # --- metrics --------------------------------------------------------------------------

    def value(self, name: str, **labels: str) -> float:
        """The current value of a sample in this process (for tests)."""
        got = self.registry.get_sample_value(name, labels or None)
        return 0.0 if got is None else got

    def exposition(self) -> tuple[bytes, str]:
        """The text the admin listener serves at /metrics (every worker's, with --workers N)."""
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST

    def over_budget(self, limit: str) -> None:
        """Count a call refused by the memory budget's `limit`."""
        self.refused_over_budget.labels(limit).inc()

    def set_request_bytes(self, request_bytes: int) -> None:
        """Publish the request bytes held (sampled each maintenance tick, not per call)."""
        self.request_bytes_in_flight.set(request_bytes)

    def set_sessions(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Publish the pin cache's sessions per (pool, driver)."""
        self.sessions.clear()
        for (pool, driver), n in counts.items():
            self.sessions.labels(pool, driver).set(n)

    def probe(self, driver: str, ok: bool, up: bool) -> None:
        """Count one probe result and publish the driver's health state."""
        self.probes.labels(driver, "ok" if ok else "failed").inc()
        self.driver_up.labels(driver).set(1 if up else 0)

    def forget_driver(self, driver: str) -> None:
        """Drop a driver that left the membership from the health metrics."""
        with contextlib.suppress(KeyError):
            self.driver_up.remove(driver)

    # --- tracing --------------------------------------------------------------------------

    def use_tracer_provider(self, provider: Any) -> None:
        """Trace with `provider` (an SDK TracerProvider), or not at all (None)."""
        self._provider = provider
        self.tracer = None if provider is None else provider.get_tracer("spark-session-router")

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Any]:
        """A child span of the current call (nothing when tracing is off)."""
        if self.tracer is None:
            yield None
            return
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def method_metrics(self, method: str) -> MethodMetrics:
        """The metric children of one method, bound once (the proxy keeps one per handler)."""
        found = self._methods.get(method)
        if found is None:
            found = self._methods[method] = MethodMetrics(self, method)
        return found

    def shutdown(self) -> None:
        """Flush and stop the trace exporter."""
        if self._provider is not None and hasattr(self._provider, "shutdown"):
            self._provider.shutdown()


def tracer_provider_from_env() -> Any:
    """An SDK TracerProvider as the OTEL_* variables ask, or None when tracing is off."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if disabled or exporter_name in ("", "none"):
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporters: list[SpanExporter] = []
    for name in exporter_name.split(","):
        name = name.strip()
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: use otlp, console or none")
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))  # sampler from OTEL_*
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class MethodMetrics:
    """One method's metric children, resolved once: a call then costs no label lookup."""

    __slots__ = ("_codes", "_t", "call_seconds", "driver_seconds", "method", "route_seconds")

    def __init__(self, telemetry: Telemetry, method: str) -> None:
        self._t = telemetry
        self.method = method
        self.call_seconds = telemetry.call_seconds.labels(method)
        self.route_seconds = telemetry.route_seconds.labels(method)
        self.driver_seconds = telemetry.driver_seconds.labels(method)
        # Indexed by the status code's number (0-16): a list, not a dict, per finished call.
        self._codes: list[Any] = [None] * (max(c.value[0] for c in grpc.StatusCode) + 1)

    def count(self, code: grpc.StatusCode) -> None:
        """One finished call with `code`."""
        number = code.value[0]
        child = self._codes[number]
        if child is None:
            child = self._codes[number] = self._t.calls.labels(self.method, code.name)
        child.inc()


class CallObservation:
    """One call as metrics and traces see it: timestamps, bytes, its span."""

    __slots__ = (
        "_client_span",
        "_context",
        "_in_flight",
        "_m",
        "_server_span",
        "_t",
        "_token",
        "bytes_to_client",
        "bytes_to_driver",
        "forwarded_at",
        "kind",
        "method",
        "moved",
        "start",
        "waiting_first",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        metrics: MethodMetrics,
        kind: str,
        md: Metadata | None,
        context: Any = None,
    ) -> None:
        self._t = telemetry
        self._context = context  # the server call, whose status ends the observation
        self._m = metrics
        self.method = metrics.method
        self.kind = kind
        self.start = time.perf_counter()
        self.forwarded_at = 0.0
        self.waiting_first = False
        self.moved = False  # this call moved its session
        self.bytes_to_client = 0
        self.bytes_to_driver = 0
        self._server_span: Any = None
        self._client_span: Any = None
        self._token: Any = None
        self._in_flight = telemetry.in_flight_of[kind]
        self._in_flight.inc()
        if telemetry.tracer is not None:
            self._start_server_span(md)

    # --- as a context manager around a handler: ends with the call's status ----------------

    def __enter__(self) -> CallObservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.end(grpc.StatusCode.OK)
        else:
            self.end(*status_of(exc, self._context))

    # --- the steps of a call, in order -----------------------------------------------------

    def identified(self, session_id: str, user_id: str, operation_id: str | None) -> None:
        """The call's session and user are known."""
        span = self._server_span
        if span is not None:
            span.set_attribute("spark.session_id", session_id)
            span.set_attribute("spark.user_id", user_id)
            if operation_id:
                span.set_attribute("spark.operation_id", operation_id)

    def forwarding(
        self, driver: str, pool: str, md: list[tuple[str, str | bytes]]
    ) -> list[tuple[str, str | bytes]]:
        """The call goes to `driver` now; the metadata to send (with our traceparent)."""
        now = time.perf_counter()
        if not self.forwarded_at:  # router time: up to the first attempt
            self._m.route_seconds.observe(now - self.start)
        self.forwarded_at = now
        self.waiting_first = True
        if self._server_span is None:
            return md
        span = self._server_span
        span.set_attribute("router.driver", driver)
        span.set_attribute("router.pool", pool)
        span.set_attribute("router.moved", self.moved)
        if self._client_span is not None:  # a retry: the first attempt failed
            self._client_span.end()
        self._client_span = self._start_client_span(driver)
        return _with_trace_context(md, self._client_span)

    def first_response(self) -> None:
        """The driver's first response (or its final answer) arrived."""
        if self.waiting_first:
            self.waiting_first = False
            self._m.driver_seconds.observe(time.perf_counter() - self.forwarded_at)

    def end(self, code: grpc.StatusCode, details: str | None = None) -> None:
        """The call is over with `code`."""
        t = self._t
        self._in_flight.dec()
        self._m.count(code)
        self._m.call_seconds.observe(time.perf_counter() - self.start)
        if self.bytes_to_client:
            t.bytes_to_client.inc(self.bytes_to_client)
        if self.bytes_to_driver:
            t.bytes_to_driver.inc(self.bytes_to_driver)
        if self._server_span is not None:
            self._end_spans(code, details)

    # --- tracing ---------------------------------------------------------------------------

    def _start_server_span(self, md: Metadata | None) -> None:
        from opentelemetry import context, propagate, trace

        carrier = {k: v for k, v in md or () if isinstance(v, str)}
        parent = propagate.extract(carrier)
        span = self._t.tracer.start_span(
            f"{SERVICE}/{self.method}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": self.method},
        )
        self._server_span = span
        # Registry and replay spans started while routing find their parent here.
        self._token = context.attach(trace.set_span_in_context(span, parent))

    def _start_client_span(self, driver: str) -> Any:
        from opentelemetry import trace

        host, _, port = driver.rpartition(":")
        return self._t.tracer.start_span(
            f"{SERVICE}/{self.method}",
            context=trace.set_span_in_context(self._server_span),
            kind=trace.SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": SERVICE,
                "rpc.method": self.method,
                "server.address": host,
                "server.port": int(port) if port.isdigit() else 0,
            },
        )

    def _end_spans(self, code: grpc.StatusCode, details: str | None) -> None:
        from opentelemetry import context, trace

        status_code = code.value[0]
        for span in (self._client_span, self._server_span):
            if span is None:
                continue
            span.set_attribute("rpc.grpc.status_code", status_code)
            if code is not grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, details or code.name))
            span.end()
        if self._token is not None:
            with contextlib.suppress(ValueError):  # ended in another context: nothing to undo
                context.detach(self._token)
            self._token = None


def _with_trace_context(
    md: list[tuple[str, str | bytes]], span: Any
) -> list[tuple[str, str | bytes]]:
    """`md` with the client's trace headers replaced by the context of `span`."""
    from opentelemetry import propagate, trace

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return [(k, v) for k, v in md if k not in carrier] + list(carrier.items())


class InstrumentedRegistry:
    """A Registry that times every operation (metrics) and traces it (a child span)."""

    def __init__(self, inner: Any, telemetry: Telemetry) -> None:
        self._inner = inner
        self._telemetry = telemetry
        self._wrapped: dict[str, Callable[..., Any]] = {}

    def __getattr__(self, name: str) -> Any:
        found = self._wrapped.get(name)
        if found is not None:
            return found
        target = getattr(self._inner, name)
        if name in _UNTIMED or not callable(target):
            return target
        histogram = self._telemetry.registry_seconds.labels(name)
        telemetry = self._telemetry

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                if telemetry.tracer is None:
                    return await target(*args, **kwargs)
                with telemetry.span(f"registry.{name}"):
                    return await target(*args, **kwargs)
            finally:
                histogram.observe(time.perf_counter() - start)

        self._wrapped[name] = timed
        return timed


# Not timed: the event stream lives as long as the replica; close is not an operation.
_UNTIMED = frozenset({"events", "close", "pin_count"})
