"""`spark-router up` brings back a driver JVM that died while it served: reaped, restarted on the
same port, reported, and pyspark works through the router again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
from pyspark.sql import SparkSession

from tests.helpers import (
    alive,
    close_pipes,
    free_port,
    read_line_matching,
    spawn,
    stderr_of,
    stderr_text,
    stop,
    wait_until,
)


def _java_children(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children() if "java" in p.name() and alive(p)]


def _reaped(pid: int, born: float) -> bool:
    """No process `pid` from `born` is left, not even a zombie (a reused pid is another one)."""
    try:
        return psutil.Process(pid).create_time() != born
    except psutil.NoSuchProcess:
        return True


def _ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _sum_of_ids(spark: SparkSession) -> int:
    return int(spark.range(1000).selectExpr("sum(id)").collect()[0][0])


@dataclass
class Up:
    """A running `spark-router up --drivers 1` and what it printed."""

    proc: subprocess.Popen[str]
    url: str
    driver: str  # HOST:PORT of its one driver
    admin_port: int

    @property
    def driver_flag(self) -> str:
        """The conf on the driver JVM's command line that names its port."""
        return f"spark.connect.grpc.binding.port={self.driver.rpartition(':')[2]}"

    def jvm(self) -> psutil.Process:
        """The driver JVM: up's own child, as spark-submit execs into it."""
        [jvm] = _java_children(self.proc)
        assert self.driver_flag in " ".join(jvm.cmdline())
        return jvm

    def kill_driver(self) -> psutil.Process:
        """SIGKILL the driver JVM; returns it once up has reaped it and logged the exit."""
        jvm = self.jvm()
        born = jvm.create_time()
        jvm.send_signal(signal.SIGKILL)
        wait_until(lambda: _reaped(jvm.pid, born), 10, "up to reap the killed JVM", every=0.1)
        exited = f"driver {self.driver} exited (killed by SIGKILL); restarting in 1.0 s (restart 1)"
        wait_until(lambda: exited in stderr_text(self.proc), 10, "the exit to be logged", 0.1)
        return jvm

    def stop_and_check(self) -> None:
        """SIGTERM: up exits 0 and leaves no JVM of its driver's port."""
        assert stop(self.proc, signal.SIGTERM, timeout=90) == 0, stderr_of(self.proc)
        found = subprocess.run(
            ["pgrep", "-f", self.driver_flag], capture_output=True, text=True, check=False
        )
        assert found.stdout == "", f"JVMs left behind: {found.stdout}"


@contextmanager
def up_with_one_driver() -> Iterator[Up]:
    """`up --drivers 1` on free ports, once it says it is ready; SIGKILLed if a test fails."""
    port, admin_port = free_port(), free_port()
    listen, admin = f"127.0.0.1:{port}", f"127.0.0.1:{admin_port}"
    proc = spawn(
        ["-m", "router.cli", "up", "--drivers", "1", "--listen", listen, "--admin-listen", admin]
    )
    try:
        line = read_line_matching(proc, "sc://", timeout=240)
        url = line[line.index("sc://") :].split()[0]
        driver = read_line_matching(proc, "drivers:", timeout=10).split()[1]
        yield Up(proc, url, driver, admin_port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        close_pipes(proc)


@pytest.mark.own_drivers
def test_up_restarts_a_sigkilled_driver_on_its_port() -> None:
    sessions: list[Any] = []  # pyspark types the Connect session as the classic one
    with up_with_one_driver() as up:
        try:
            spark = SparkSession.builder.remote(up.url).create()
            sessions.append(spark)
            spark.conf.set("spark.sql.shuffle.partitions", "7")
            spark.range(3).createOrReplaceTempView("before_the_kill")
            assert _sum_of_ids(spark) == 499500

            killed_at = time.monotonic()
            old_jvm = up.kill_driver()
            wait_until(
                lambda: "restarted (ready in" in stderr_text(up.proc),
                240,
                "the driver to be restarted" + stderr_of(up.proc),
                every=0.5,
            )
            found = re.search(
                rf"driver {re.escape(up.driver)} restarted \(ready in ([\d.]+) s\)",
                stderr_text(up.proc),
            )
            assert found, stderr_of(up.proc)
            new_jvm = up.jvm()  # on the same port
            assert new_jvm.pid != old_jvm.pid
            wait_until(lambda: _ready(up.admin_port), 60, "the router to see the driver", 0.2)
            back_after = time.monotonic() - killed_at
            print(f"\nJVM ready in {found.group(1)} s; router ready {back_after:.1f} s after kill")

            again = SparkSession.builder.remote(up.url).create()
            sessions.append(again)
            assert _sum_of_ids(again) == 499500
            # The first session's state died with the JVM; up told the router, which
            # replays it on the new JVM (same address) on its next call: the same
            # SparkSession carries on with its confs and views, no SESSION_CHANGED.
            assert _sum_of_ids(spark) == 499500
            assert spark.conf.get("spark.sql.shuffle.partitions") == "7"
            assert spark.table("before_the_kill").count() == 3
            assert "lost its state: 1 session(s) rebuild it" in stderr_text(up.proc)

            children = psutil.Process(up.proc.pid).children()
            assert not [p for p in children if p.status() == psutil.STATUS_ZOMBIE]
            for session in sessions:
                session.stop()
            sessions.clear()
            up.stop_and_check()
            assert not alive(new_jvm)
        finally:
            for session in sessions:
                session.release_session_on_close = False  # up may be gone: no long retries
                session.stop()


@pytest.mark.own_drivers
def test_sigterm_during_a_restart_leaves_no_jvm() -> None:
    with up_with_one_driver() as up:
        old_jvm = up.kill_driver()
        wait_until(
            lambda: any(p.pid != old_jvm.pid for p in _java_children(up.proc)),
            30,
            "the driver JVM to be started again",
            every=0.1,
        )
        restarting = up.jvm()
        assert "restarted (ready in" not in stderr_text(up.proc)  # still starting
        up.stop_and_check()
        assert not alive(restarting)
