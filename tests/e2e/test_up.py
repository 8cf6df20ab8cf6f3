"""`spark-router up` as a new user runs it: the printed URL works, Ctrl-C leaves nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import psutil
import pytest
from pyspark.sql import SparkSession

from tests.helpers import alive, close_pipes, free_port, read_line_matching, spawn, wait_until


def _java_descendants(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "java" in p.name()]


@pytest.mark.own_drivers
def test_up_serves_pyspark_and_ctrl_c_stops_every_jvm() -> None:
    port = free_port()
    proc = spawn(["-m", "router.cli", "up", "--drivers", "1", "--listen", f"127.0.0.1:{port}"])
    seen: list[str] = []
    try:
        line = read_line_matching(proc, "sc://", timeout=240, seen=seen)
        url = line[line.index("sc://") :].split()[0]
        assert url == f"sc://127.0.0.1:{port}"
        jvms = _java_descendants(proc)
        assert len(jvms) == 1, f"expected one driver JVM, found {jvms}"

        spark = SparkSession.builder.remote(url).create()
        try:
            assert spark.range(1000).selectExpr("sum(id)").collect()[0][0] == 499500
            assert spark.conf.get("spark.connect.grpc.binding.port")
        finally:
            spark.stop()

        # What a terminal does on Ctrl-C: SIGINT to the foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        wait_until(lambda: not any(map(alive, jvms)), 30, "the driver JVM to exit")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        close_pipes(proc)


def test_up_without_java_says_how_to_fix_it(tmp_path: object) -> None:
    proc = spawn(
        ["-m", "router.cli", "up", "--listen", f"127.0.0.1:{free_port()}"],
        env={"PATH": "/nonexistent", "JAVA_HOME": ""},
        capture_stderr=True,
    )
    _, err = proc.communicate(timeout=60)
    close_pipes(proc)
    assert proc.returncode == 3
    assert "Java" in err and "JAVA_HOME" in err


def test_up_refuses_a_taken_port_before_starting_drivers() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn(
            ["-m", "router.cli", "up", "--listen", f"127.0.0.1:{port}"], capture_stderr=True
        )
        _, err = proc.communicate(timeout=60)
        close_pipes(proc)
    assert proc.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port}: in use" in err
    assert "Starting" not in err  # no JVM was started for nothing


def test_up_listens_on_loopback_by_default() -> None:
    import socket

    # Hold the default port on loopback: `up` without --listen names the address it tried
    # (a wildcard default would say 0.0.0.0), and fails before any JVM starts.
    # If something else holds it already, `up` finds it in use just the same.
    with socket.socket() as taken:
        with contextlib.suppress(OSError):
            taken.bind(("127.0.0.1", 15002))
            taken.listen()
        proc = spawn(["-m", "router.cli", "up"], capture_stderr=True)
        _, err = proc.communicate(timeout=60)
        close_pipes(proc)
    assert proc.returncode == 3, err
    assert "cannot listen on 127.0.0.1:15002: in use" in err
    assert "Starting" not in err


@pytest.mark.own_drivers
def test_sigterm_while_drivers_start_leaves_no_jvm() -> None:
    proc = spawn(
        ["-m", "router.cli", "up", "--drivers", "1", "--listen", f"127.0.0.1:{free_port()}"]
    )
    try:
        wait_until(lambda: bool(_java_descendants(proc)), 60, "the driver JVM to be started")
        jvms = _java_descendants(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        wait_until(lambda: not any(map(alive, jvms)), 30, "the driver JVM to exit")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        close_pipes(proc)


def test_a_driver_that_cannot_start_is_explained_and_cleaned_up() -> None:
    # A heap no machine can reserve: the JVM exits at once with a clear reason.
    args = ["-m", "router.cli", "up", "--drivers", "2", "--driver-memory", "200t"]
    proc = spawn([*args, "--listen", f"127.0.0.1:{free_port()}"], capture_stderr=True)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        close_pipes(proc)
    assert proc.returncode == 3, err
    assert "Could not reserve enough space" in err  # the log tail says why
    assert "driver-" in err and ".log" in err  # and where the whole log is
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "-Xmx200t" in " ".join(p.info["cmdline"] or []) and alive(p)
    ]
    assert not leftovers
