"""The real pyspark client against a router whose only driver is a dead port: it fails fast.

No Spark driver is needed: the router points at 127.0.0.1:1, where nothing listens. Before,
pyspark retried the router's UNAVAILABLE with backoff for over ten minutes; now the call ends
with FAILED_PRECONDITION (not in pyspark's retry policy) naming the pool, the driver and why.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from pyspark.sql import SparkSession

from tests.helpers import serve_router, stop

DEAD = "127.0.0.1:1"
BOUND = 20.0  # seconds: no_driver_wait_seconds (5) plus a probe and start-up, with room


@pytest.fixture
def dead_router() -> Iterator[str]:
    proc, port = serve_router([DEAD], env={"SPARK_ROUTER_ADMIN_LISTEN": "off"})
    yield f"sc://127.0.0.1:{port}"
    assert stop(proc) == 0


def test_a_query_with_no_live_driver_fails_within_the_bound_saying_why(dead_router: str) -> None:
    from pyspark.errors import PySparkException

    spark = SparkSession.builder.remote(dead_router).create()
    spark.release_session_on_close = False  # nothing to release on a dead driver
    started = time.monotonic()
    try:
        with pytest.raises((grpc.RpcError, PySparkException)) as err:
            spark.range(3).collect()
        elapsed = time.monotonic() - started
        text = str(err.value)
        assert elapsed < BOUND, (elapsed, text)
        assert "pool 'default' has no driver that takes new sessions" in text, text
        assert f"{DEAD}: down, last probe: UNAVAILABLE" in text, text
        assert "Connection refused" in text, text
        # The next call does not wait at all: the driver has been down long enough.
        started = time.monotonic()
        with pytest.raises((grpc.RpcError, PySparkException)):
            spark.range(3).collect()
        assert time.monotonic() - started < 5.0
    finally:
        spark.stop()
