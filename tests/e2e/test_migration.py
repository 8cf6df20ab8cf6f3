"""A driver dies, the session lives on: real drivers, the real pyspark client, the router."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from router.local import LocalDrivers
from tests.helpers import free_port, spawn, stderr_of, stop, wait_until

PORT_CONF = "spark.connect.grpc.binding.port"


@pytest.fixture
def victims(tmp_path: Path) -> Iterator[LocalDrivers]:
    """Two drivers of this test's own: one of them will be killed."""
    drivers = LocalDrivers(2, work_dir=tmp_path / "drivers", startup_timeout=240)
    with drivers:
        drivers.start(progress=False)
        yield drivers


def _router(drivers: LocalDrivers, **env: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    args = ["-m", "router.cli", "serve", "--listen", f"127.0.0.1:{port}"]
    for address in drivers.addresses:
        args += ["--driver", address]
    settings = {
        "SPARK_ROUTER_PROBE_INTERVAL_SECONDS": "0.5",
        "SPARK_ROUTER_PROBE_TIMEOUT_SECONDS": "1",
        **env,
    }
    proc = spawn(args, env=settings)
    import socket

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0 or proc.poll() is not None

    wait_until(up, 30, "the router to listen")
    assert proc.poll() is None, stderr_of(proc)
    return proc, f"sc://127.0.0.1:{port}"


@pytest.mark.own_drivers
def test_sigkill_of_the_driver_keeps_the_session(victims: LocalDrivers) -> None:
    router, url = _router(victims)
    spark = SparkSession.builder.remote(url).create()
    try:
        spark.conf.set("spark.sql.shuffle.partitions", "7")
        spark.conf.set("spark.sql.session.timeZone", "Asia/Tokyo")
        spark.sql("CREATE OR REPLACE TEMP VIEW sql_view AS SELECT id * 3 AS v FROM range(10)")
        spark.range(5).selectExpr("id * 10 AS w").createOrReplaceTempView("df_view")
        spark.udf.register("plus_one", lambda x: x + 1, "long")
        query = "SELECT (SELECT sum(v) FROM sql_view) AS a, sum(plus_one(w)) AS b FROM df_view"
        before = spark.sql(query).collect()
        first_port = int(spark.conf.get(PORT_CONF))

        victim = next(d for d in victims.drivers if d.port == first_port)
        assert victim.process is not None
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=30)

        # The same SparkSession object carries on, on the other driver, with its state.
        assert spark.conf.get("spark.sql.shuffle.partitions") == "7"
        assert spark.conf.get("spark.sql.session.timeZone") == "Asia/Tokyo"
        assert spark.sql(query).collect() == before
        assert int(spark.conf.get(PORT_CONF)) != first_port
    finally:
        spark.stop()
        assert stop(router) == 0
