"""`spark-router up` locks its drivers with a token: only its own router reaches them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import psutil
import pytest
from pyspark.sql import SparkSession

from tests.helpers import close_pipes, free_port, read_line_matching, spawn, stderr_text

TOKEN_ENV = "SPARK_CONNECT_AUTHENTICATE_TOKEN"


def _driver_token(proc: subprocess.Popen[str]) -> str:
    """The token `up` gave its driver JVM (read from the JVM's environment)."""
    jvms = [p for p in psutil.Process(proc.pid).children(recursive=True) if "java" in p.name()]
    assert len(jvms) == 1, f"expected one driver JVM, found {jvms}"
    return jvms[0].environ()[TOKEN_ENV]


@pytest.mark.own_drivers
def test_an_up_driver_refuses_clients_without_the_token_and_its_router_gets_through() -> None:
    port = free_port()
    args = ["-m", "router.cli", "up", "--drivers", "1", "--listen", f"127.0.0.1:{port}"]
    proc = spawn(args, env={"SPARK_ROUTER_ADMIN_LISTEN": "off"})
    seen: list[str] = []
    try:
        read_line_matching(proc, "sc://", timeout=240, seen=seen)
        line = read_line_matching(proc, "drivers:", timeout=10, seen=seen)
        driver = line.split("drivers:", 1)[1].split()[0].rstrip(",")
        token = _driver_token(proc)
        assert len(token) >= 32

        direct = SparkSession.builder.remote(f"sc://{driver}").create()
        try:
            with pytest.raises(Exception, match=r"(?i)unauthenticated|authentication"):
                direct.sql("select 1").collect()
        finally:
            direct.release_session_on_close = False  # its ReleaseSession would be refused too
            with contextlib.suppress(Exception):
                direct.stop()

        spark = SparkSession.builder.remote(f"sc://127.0.0.1:{port}").create()
        try:
            assert spark.sql("select 1").collect()[0][0] == 1
        finally:
            spark.stop()

        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert proc.stdout is not None
        output = "".join(seen) + proc.stdout.read() + stderr_text(proc)
        assert token not in output  # never printed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        close_pipes(proc)
