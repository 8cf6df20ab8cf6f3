"""The real pyspark client idle through the router to a real driver: no GOAWAY, then a query.

Why shortened thresholds: pyspark pings every 60 s and gRPC's defaults answer the third idle
ping with GOAWAY ENHANCE_YOUR_CALM too_many_pings (after ~3 minutes); seeing that, or its
absence over the 6 minutes of the issue, is too long for CI. The client is told to ping every
2 s instead (`;grpc_keepalive_time_ms=2000`, a pyspark connection option) and stays idle 40 s:
twenty pings, where the defaults would have sent GOAWAY after ~6 s. The router allows pings
every 1 s (`min_client_ping_interval_seconds`), the same ratio to the client's interval as
its 10 s default to pyspark's 60 s. (A control router with gRPC's 5-minute floor did not
make this client print too_many_pings within 40 s either — grpc's client may stop pinging an
idle connection after `grpc.http2.max_pings_without_data` pings, which pyspark leaves at 2 —
so the strict check, a client pinging every second forever, is
tests/integration/test_keepalive.py, with its own control.)
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import ROOT, free_port, spawn, stderr_of, stop, wait_until

PING_MS = 2000
IDLE = 40

CLIENT = f"""
import sys, time
from pyspark.sql import SparkSession
spark = SparkSession.builder.remote(sys.argv[1] + "/;grpc_keepalive_time_ms={PING_MS}").create()
assert spark.range(5).count() == 5
time.sleep({IDLE})
print("after idle:", spark.range(7).count(), flush=True)
spark.stop()
"""


def _serve(drivers: list[str], min_ping: float) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    args = ["-m", "router.cli", "serve", "--listen", f"127.0.0.1:{port}"]
    for address in drivers:
        args += ["--driver", address]
    env = {
        "SPARK_ROUTER_ADMIN_LISTEN": "off",
        "SPARK_ROUTER_MIN_CLIENT_PING_INTERVAL_SECONDS": str(min_ping),
    }
    proc: subprocess.Popen[str] = spawn(args, env=env)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0 or proc.poll() is not None

    wait_until(listening, 30, "the router to listen")
    assert proc.poll() is None, stderr_of(proc)
    return proc, f"sc://127.0.0.1:{port}"


@pytest.fixture
def router_url(spark_drivers: Any) -> Iterator[str]:
    """A router allowing client pings every 1 s, in front of the real drivers."""
    proc, url = _serve(spark_drivers.addresses, 1.0)
    yield url
    assert stop(proc) == 0


def test_an_idle_pyspark_session_sees_no_goaway_and_queries_after(router_url: str) -> None:
    client = subprocess.run(
        [sys.executable, "-c", CLIENT, router_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=IDLE + 120,
    )
    assert client.returncode == 0, client.stderr
    assert "after idle: 7" in client.stdout, (client.stdout, client.stderr)
    assert "too_many_pings" not in client.stderr, client.stderr
    assert "GOAWAY" not in client.stderr, client.stderr
