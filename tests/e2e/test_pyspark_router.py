"""Two real Spark Connect drivers, the real pyspark client, the router in between."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from pyspark.sql import SparkSession

from registry.models import Driver
from router.sessions.ring import Rings
from tests.helpers import serve_router, stop

PORT_CONF = "spark.connect.grpc.binding.port"


def _serve(drivers: list[str], *extra: str) -> tuple[subprocess.Popen[str], str]:
    """Start `spark-router serve` in front of `drivers`; return it and its sc:// URL."""
    proc, port = serve_router(drivers, *extra)
    return proc, f"sc://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def router_url(spark_drivers: Any) -> Iterator[str]:
    """One `spark-router serve` (embedded registry) in front of both drivers."""
    proc, url = _serve(spark_drivers.addresses)
    yield url
    assert stop(proc) == 0


@pytest.fixture(scope="module")
def replica_urls(spark_drivers: Any, redis_server: Any) -> Iterator[list[str]]:
    """Two replicas sharing a real Redis registry, drivers listed in opposite orders."""
    a = _serve(spark_drivers.addresses, "--registry", redis_server.url)
    b = _serve(list(reversed(spark_drivers.addresses)), "--registry", redis_server.url)
    yield [a[1], b[1]]
    assert stop(a[0]) == 0
    assert stop(b[0]) == 0


def _sessions_per_driver(
    addresses: list[str], per_driver: int, salt: int = 0
) -> dict[str, list[str]]:
    """Session ids the router's ring will put `per_driver` to each driver (deterministic).

    Spark remembers the ids of closed sessions and refuses them: every test needs its own
    `salt`.
    """
    rings = Rings.build([Driver(a) for a in addresses])
    chosen: dict[str, list[str]] = {a: [] for a in addresses}
    for i in range(10_000):
        sid = str(uuid.UUID(int=(salt << 64) + i * 104729 + 7, version=4))
        owner = rings.pick("default", sid)
        assert owner is not None
        if len(chosen[owner]) < per_driver:
            chosen[owner].append(sid)
        if all(len(v) == per_driver for v in chosen.values()):
            return chosen
    raise AssertionError("could not spread sessions over the drivers")


@pytest.mark.parametrize("setup", ["one replica", "two replicas and redis"])
def test_six_sessions_keep_their_state_on_their_driver(
    setup: str, request: pytest.FixtureRequest, spark_drivers: Any
) -> None:
    urls = (
        [request.getfixturevalue("router_url")]
        if setup == "one replica"
        else request.getfixturevalue("replica_urls")
    )
    addresses: list[str] = spark_drivers.addresses
    plan = _sessions_per_driver(addresses, 3, salt=len(urls))
    expected_port = {sid: int(a.rsplit(":", 1)[1]) for a, sids in plan.items() for sid in sids}
    sessions: dict[str, SparkSession] = {}
    try:
        # Create all six first, then interleave their work: each must keep its own state.
        for i, sid in enumerate(expected_port):
            url = urls[i % len(urls)]  # alternate replicas between sessions
            spark = SparkSession.builder.remote(f"{url}/;session_id={sid}").create()
            sessions[sid] = spark
            spark.conf.set("spark.sql.shuffle.partitions", str(11 + i))
            spark.range(100).selectExpr(f"id * {i + 1} AS v").createOrReplaceTempView("t")
        for _round in range(4):
            for i, spark in enumerate(sessions.values()):
                total = spark.sql("SELECT sum(v) AS s FROM t").collect()[0]["s"]
                assert total == 4950 * (i + 1)
        for i, (sid, spark) in enumerate(sessions.items()):
            assert spark.conf.get("spark.sql.shuffle.partitions") == str(11 + i)
            assert int(spark.conf.get(PORT_CONF)) == expected_port[sid]
        served = {int(s.conf.get(PORT_CONF)) for s in sessions.values()}
        assert served == {int(a.rsplit(":", 1)[1]) for a in addresses}  # both drivers used
    finally:
        for spark in sessions.values():
            spark.stop()


def test_one_session_through_both_replicas_is_one_session(replica_urls: list[str]) -> None:
    sid = str(uuid.uuid4())
    first = SparkSession.builder.remote(f"{replica_urls[0]}/;session_id={sid}").create()
    second = SparkSession.builder.remote(f"{replica_urls[1]}/;session_id={sid}").create()
    try:
        first.range(42).createOrReplaceTempView("shared_view")
        # Same driver, same server-side session: the view made via replica A is there via B.
        assert second.sql("SELECT count(*) AS n FROM shared_view").collect()[0]["n"] == 42
        assert first.conf.get(PORT_CONF) == second.conf.get(PORT_CONF)
    finally:
        second.stop()
        first.stop()


def test_header_routing_opt_in(router_url: str) -> None:
    sid = str(uuid.uuid4())
    spark = SparkSession.builder.remote(
        f"{router_url}/;session_id={sid};x-spark-session-id={sid}"
    ).create()
    try:
        assert spark.range(7).count() == 7
    finally:
        spark.stop()


def test_topandas_1m_rows_equals_direct(router_url: str, spark_drivers: Any) -> None:
    query = "SELECT id, id * 2 AS b, concat('row-', id) AS s FROM range(1000000)"
    via_router = SparkSession.builder.remote(router_url).create()
    direct = SparkSession.builder.remote(f"sc://{spark_drivers.addresses[0]}").create()
    try:
        got = via_router.sql(query).toPandas()
        want = direct.sql(query).toPandas()
    finally:
        via_router.stop()
        direct.stop()
    assert len(got) == 1_000_000
    pd.testing.assert_frame_equal(got, want)


def test_call_without_a_session_gets_invalid_argument(router_url: str) -> None:
    import grpc
    from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

    with grpc.insecure_channel(router_url.removeprefix("sc://")) as ch:
        stub = base_pb2_grpc.SparkConnectServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.AnalyzePlan(
                base_pb2.AnalyzePlanRequest(
                    spark_version=base_pb2.AnalyzePlanRequest.SparkVersion()
                ),
                timeout=10,
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no session id" in (err.value.details() or "")
