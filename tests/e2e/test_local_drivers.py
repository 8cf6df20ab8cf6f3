"""Real Spark Connect drivers from router.local: they answer, run Python UDFs, fail loudly and
leave no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from router.local import SERVER_CLASS, DriverFailedToStart, JavaInfo, LocalDrivers
from tests.helpers import gone, wait_until

REPO = Path(__file__).resolve().parents[2]


def live_group_members(pgid: int) -> list[psutil.Process]:
    """Processes (not zombies) whose process group is pgid."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


# --------------------------------------------------------------------------- own JVMs


@pytest.mark.own_drivers
def test_driver_that_cannot_start(java: JavaInfo, tmp_path: Path) -> None:
    drivers = LocalDrivers(1, memory="1x", work_dir=tmp_path, startup_timeout=120)
    driver = drivers.drivers[0]
    started = time.monotonic()
    with pytest.raises(DriverFailedToStart) as info:
        drivers.start(progress=False)
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert driver.address in message
    assert "exited with code" in message
    assert str(driver.log_path) in message
    assert "Invalid maximum heap size: -Xmx1x" in message  # from the log tail
    assert driver.process is not None
    assert gone(driver.process.pid)
    assert live_group_members(driver.process.pid) == []


@pytest.mark.own_drivers
def test_stop_leaves_no_process(
    java: JavaInfo, tmp_path: Path, spark_connect: Callable[[str], Any]
) -> None:
    from pyspark.sql.functions import udf

    with LocalDrivers(1, work_dir=tmp_path, startup_timeout=240) as drivers:
        drivers.start(progress=False)
        driver = drivers.drivers[0]
        assert driver.process is not None
        pid = driver.process.pid
        # A Python UDF makes the JVM start pyspark's daemon and workers.
        spark = spark_connect(driver.address)
        rows = spark.range(4).select(udf(lambda x: x * 2, "long")("id").alias("x")).collect()
        assert [row.x for row in rows] == [0, 2, 4, 6]
        spawned = [p for p in psutil.Process(pid).children(recursive=True) if p.is_running()]
        assert any("pyspark.daemon" in " ".join(p.cmdline()) for p in spawned if not gone(p.pid))
        assert live_group_members(pid)  # the JVM itself at least
        spark.stop()
        driver.stop()
        assert driver.process.returncode is not None
        assert live_group_members(pid) == []
        assert [p.pid for p in spawned if not gone(p.pid)] == []


@pytest.mark.own_drivers
def test_driver_dies_with_a_sigkilled_parent(java: JavaInfo, tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG survives spark-submit's exec chain: the JVM dies with its parent."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from router.local import LocalDriver
        driver = LocalDriver(work_dir=Path({str(tmp_path)!r}))
        driver.start()
        print(driver.process.pid, flush=True)
        sys.stdin.read()
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert parent.stdout is not None and parent.stdin is not None
    pid = None
    try:
        pid = int(parent.stdout.readline())
        jvm = psutil.Process(pid)
        wait_until(lambda: jvm.name() == "java", 60, "spark-submit to exec into java")
        assert SERVER_CLASS in jvm.cmdline()  # the server JVM, not spark-class's launcher
        parent.kill()
        parent.wait()
        wait_until(lambda: gone(pid), 30, "the JVM to die with its parent")
        assert live_group_members(pid) == []
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        parent.stdin.close()
        if pid is not None and not gone(pid):
            os.killpg(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- session drivers


def test_both_drivers_answer(
    spark_drivers: LocalDrivers, spark_connect: Callable[[str], Any]
) -> None:
    assert len(spark_drivers.addresses) == 2
    for driver in spark_drivers.drivers:
        spark = spark_connect(driver.address)
        assert spark.range(10).count() == 10
        assert spark.conf.get("spark.connect.grpc.binding.port") == str(driver.port)


def test_python_udf(spark_drivers: LocalDrivers, spark_connect: Callable[[str], Any]) -> None:
    from pyspark.sql.functions import udf

    for address in spark_drivers.addresses:
        spark = spark_connect(address)
        plus_one = udf(lambda x: x + 1, "long")
        rows = spark.range(3).select(plus_one("id").alias("x")).collect()
        assert [row.x for row in rows] == [1, 2, 3]
        # The workers run this very interpreter (PYSPARK_PYTHON).
        interpreter = udf(lambda _: sys.executable, "string")
        assert spark.range(1).select(interpreter("id")).first()[0] == sys.executable


def test_driver_process_is_the_jvm(spark_drivers: LocalDrivers) -> None:
    for driver in spark_drivers.drivers:
        assert driver.process is not None
        proc = psutil.Process(driver.process.pid)  # spark-submit exec'd into java
        assert proc.name() == "java"
        assert os.path.basename(proc.exe()) == "java"
        assert SERVER_CLASS in proc.cmdline()
        assert os.getpgid(proc.pid) == proc.pid  # leads its own process group
        assert driver.poll_ready()
