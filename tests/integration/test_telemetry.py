"""Traces and metrics of routed calls, with the SDK's in-memory exporter and fake drivers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

from loadtest.fake_driver import FakeDriver
from router.config import load_settings
from router.server import Replica
from tests.helpers import eventually

Stub = base_pb2_grpc.SparkConnectServiceStub
SERVICE = "spark.connect.SparkConnectService"
PORT_KEY = "spark.connect.grpc.binding.port"


@dataclass
class Setup:
    drivers: list[FakeDriver]
    replica: Replica
    stub: Stub
    spans: InMemorySpanExporter


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    """Two fake drivers, a replica tracing into memory, a client stub."""
    drivers = [FakeDriver(check_observed_session_id=True) for _ in range(2)]
    for d in drivers:
        await d.start()
    replica = Replica(load_settings(listen="127.0.0.1:0", drivers=[d.address for d in drivers]))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    replica.telemetry.use_tracer_provider(provider)
    await replica.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
    yield Setup(drivers, replica, Stub(channel), exporter)
    await channel.close()
    await replica.stop(0)
    for d in drivers:
        await d.stop()


def _config(session: str, user: str = "ann", observed: str | None = None) -> base_pb2.ConfigRequest:
    req = base_pb2.ConfigRequest(session_id=session)
    req.user_context.user_id = user
    if observed:
        req.client_observed_server_side_session_id = observed
    req.operation.get.keys.append(PORT_KEY)
    return req


def _server_spans(spans: InMemorySpanExporter, method: str) -> list[ReadableSpan]:
    return [
        s
        for s in spans.get_finished_spans()
        if s.kind is SpanKind.SERVER and s.name == f"{SERVICE}/{method}"
    ]


def _children(spans: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        s
        for s in spans.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


async def test_a_routed_call_has_a_server_span_with_registry_and_upstream_children(
    setup: Setup,
) -> None:
    s = str(uuid.uuid4())
    got = await setup.stub.Config(_config(s))
    [span] = _server_spans(setup.spans, "Config")
    driver = next(d for d in setup.drivers if str(d.port) == got.pairs[0].value)
    assert span.attributes is not None
    assert dict(span.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": "Config",
        "rpc.grpc.status_code": 0,
        "spark.session_id": s,
        "spark.user_id": "ann",
        "router.driver": driver.address,
        "router.pool": "default",
        "router.moved": False,
    }
    children = _children(setup.spans, span)
    names = sorted(c.name for c in children)
    assert names == sorted([f"{SERVICE}/Config", "registry.bind", "registry.get_pin"])
    [upstream] = [c for c in children if c.kind is SpanKind.CLIENT]
    assert upstream.attributes is not None
    assert upstream.attributes["server.port"] == driver.port
    # The driver got the router's context: same trace, the CLIENT span as parent.
    traceparent = driver.calls[-1].metadata["traceparent"]
    assert isinstance(traceparent, str)
    _, trace_id, parent_id, _ = traceparent.split("-")
    assert upstream.context is not None
    assert int(trace_id, 16) == upstream.context.trace_id
    assert int(parent_id, 16) == upstream.context.span_id

    # A known session's next call makes no registry call: no registry span.
    setup.spans.clear()
    await setup.stub.Config(_config(s, observed=got.server_side_session_id))
    [span] = _server_spans(setup.spans, "Config")
    assert [c.name for c in _children(setup.spans, span)] == [f"{SERVICE}/Config"]


async def test_a_client_traceparent_continues_its_trace(setup: Setup) -> None:
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    await setup.stub.Config(
        _config(str(uuid.uuid4())), metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")]
    )
    [span] = _server_spans(setup.spans, "Config")
    assert span.context is not None and span.parent is not None
    assert span.context.trace_id == int(trace_id, 16)
    assert span.parent.span_id == int(parent_id, 16)
    # The driver sees the router's span, not the client's, as its parent.
    sent = [c.metadata.get("traceparent") for d in setup.drivers for c in d.calls]
    [traceparent] = [t for t in sent if t]
    assert isinstance(traceparent, str)
    assert traceparent.split("-")[1] == trace_id and traceparent.split("-")[2] != parent_id


async def test_a_failed_call_records_its_status(setup: Setup) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await setup.stub.Config(
            _config(str(uuid.uuid4())),
            metadata=[("x-fake-status", "NOT_FOUND"), ("x-fake-details", "no such table")],
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    [span] = _server_spans(setup.spans, "Config")
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.status.status_code is StatusCode.ERROR
    assert (
        setup.replica.telemetry.value("spark_router_calls_total", method="Config", code="NOT_FOUND")
        == 1
    )

    # A call the router itself refuses (no session) is traced and counted too.
    setup.spans.clear()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await setup.stub.Config(base_pb2.ConfigRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [span] = _server_spans(setup.spans, "Config")
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert (
        setup.replica.telemetry.value(
            "spark_router_calls_total", method="Config", code="INVALID_ARGUMENT"
        )
        == 1
    )


async def test_a_moved_call_has_a_replay_span(setup: Setup) -> None:
    s = str(uuid.uuid4())
    set_conf = base_pb2.ConfigRequest(session_id=s)
    set_conf.user_context.user_id = "ann"
    set_conf.operation.set.pairs.add(key="spark.sql.shuffle.partitions", value="7")
    original = (await setup.stub.Config(set_conf)).server_side_session_id
    port = (await setup.stub.Config(_config(s, observed=original))).pairs[0].value
    home = next(d for d in setup.drivers if str(d.port) == port)
    await home.stop()
    setup.spans.clear()

    got = await setup.stub.Config(_config(s, observed=original), timeout=10)
    assert got.pairs[0].value != port
    [span] = _server_spans(setup.spans, "Config")
    assert span.attributes is not None and span.attributes["router.moved"] is True
    names = [c.name for c in _children(setup.spans, span)]
    assert "journal.replay" in names and "registry.move" in names and "registry.journal" in names
    [replay] = [c for c in _children(setup.spans, span) if c.name == "journal.replay"]
    assert replay.attributes is not None and replay.attributes["router.replayed_calls"] == 1
    # The replayed call itself went to the new driver under the replay span.
    assert replay.context is not None


async def test_an_execute_plan_span_names_its_operation(setup: Setup) -> None:
    s, op = str(uuid.uuid4()), str(uuid.uuid4())
    request = base_pb2.ExecutePlanRequest(session_id=s, operation_id=op)
    request.user_context.user_id = "ann"
    async for _ in setup.stub.ExecutePlan(request, metadata=[("x-fake-batches", "3")]):
        pass
    [span] = _server_spans(setup.spans, "ExecutePlan")
    assert span.attributes is not None
    assert span.attributes["spark.operation_id"] == op
    assert span.attributes["rpc.grpc.status_code"] == 0


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_after_known_traffic(setup: Setup) -> None:
    replica = setup.replica
    sessions = [str(uuid.uuid4()) for _ in range(4)]
    for s in sessions:
        await setup.stub.Config(_config(s))
    streamed = 0
    for s in sessions[:2]:
        request = base_pb2.ExecutePlanRequest(session_id=s)
        request.user_context.user_id = "ann"
        async for response in setup.stub.ExecutePlan(
            request, metadata=[("x-fake-batches", "3"), ("x-fake-batch-bytes", "1000")]
        ):
            streamed += response.ByteSize()
    with pytest.raises(grpc.aio.AioRpcError):
        await setup.stub.Config(_config(sessions[0]), metadata=[("x-fake-status", "ABORTED")])

    def pinned() -> float:
        return sum(
            replica.telemetry.value("spark_router_sessions", pool="default", driver=d.address)
            for d in setup.drivers
        )

    await eventually(lambda: pinned() == 4, "the sessions gauge to count the 4 sessions")
    body, content_type = replica.telemetry.exposition()
    assert content_type.startswith("text/plain")
    got = _samples(body.decode())

    def value(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("spark_router_calls_total", method="Config", code="OK") == 4
    assert value("spark_router_calls_total", method="Config", code="ABORTED") == 1
    assert value("spark_router_calls_total", method="ExecutePlan", code="OK") == 2
    assert value("spark_router_call_duration_seconds_count", method="Config") == 5
    assert value("spark_router_route_duration_seconds_count", method="ExecutePlan") == 2
    assert value("spark_router_driver_first_response_seconds_count", method="Config") == 5
    assert value("spark_router_calls_in_flight", kind="unary") == 0
    assert value("spark_router_calls_in_flight", kind="stream") == 0
    assert streamed > 6000  # 3 batches of 1000 bytes and a result_complete per stream
    assert value("spark_router_stream_bytes_total", direction="to_client") == streamed
    assert value("spark_router_sessions_placed_total", pool="default", source="ring") == 4
    assert value("spark_router_registry_duration_seconds_count", op="bind") == 4
    assert value("spark_router_registry_degraded") == 0
    for d in setup.drivers:
        assert value("spark_router_driver_up", driver=d.address) == 1
        assert value("spark_router_probes_total", driver=d.address, result="ok") >= 1


def test_the_grafana_dashboard_uses_only_metrics_the_router_exports(setup: Setup) -> None:
    import json
    import re
    from pathlib import Path

    dashboard = Path(__file__).parents[2] / "deploy" / "grafana" / "spark-router.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"spark_router_[a-z_]+", e)}
    exported = set()
    for family in setup.replica.telemetry.registry.collect():
        exported.add(family.name)
        exported.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_count"))
    assert used and used <= exported, used - exported


def test_metrics_add_up_across_worker_processes() -> None:
    import socket
    import urllib.request

    from tests.helpers import free_port, read_line_matching, spawn, stop, wait_until

    fake = spawn(["-m", "loadtest.fake_driver", "--listen", "127.0.0.1:0"])
    router = None
    try:
        driver = read_line_matching(fake, "fake driver listening on", 30).split()[-1]
        port, admin = free_port(), free_port()
        router = spawn(
            ["-m", "router.cli", "serve", "--listen", f"127.0.0.1:{port}", "--driver", driver],
            env={"SPARK_ROUTER_WORKERS": "2", "SPARK_ROUTER_ADMIN_LISTEN": f"127.0.0.1:{admin}"},
        )

        def serving() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(serving, 30, "the workers to listen")
        calls = 20
        for _ in range(calls):  # a new connection each: SO_REUSEPORT spreads them
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                Stub(channel).Config(_config(str(uuid.uuid4())), timeout=10)

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            url = f"http://127.0.0.1:{admin}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                return _samples(resp.read().decode())

        key = ("spark_router_calls_total", (("code", "OK"), ("method", "Config")))
        # Each scrape lands on either worker; every one must count both workers' calls.
        for _ in range(6):
            assert scrape()[key] == calls
        assert scrape()[("spark_router_calls_in_flight", (("kind", "unary"),))] == 0
    finally:
        if router is not None:
            assert stop(router) == 0
        stop(fake)
