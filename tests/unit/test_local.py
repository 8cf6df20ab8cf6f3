"""router.local without a JVM: Java checks, the driver command line, and the process machinery
(start, readiness, failure, stop, PDEATHSIG) driven by a fake `spark-submit`."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import common.procs as procs
import router.local.display as local_display
import router.local.driver as local_driver
from router.local import (
    DriverFailedToStart,
    JavaInfo,
    JavaNotFound,
    JavaTooOld,
    LocalDriver,
    LocalDriverError,
    LocalDrivers,
    check_java,
    driver_command,
    driver_env,
    free_port,
    java_major,
    spawn,
)
from tests.helpers import gone, wait_until

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group pgid."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_java(home: Path, version_line: str, code: int = 0) -> Path:
    """A `java` that prints `version_line` on stderr, as the real one does."""
    return write_exe(
        home / "bin" / "java",
        f"#!/bin/sh\necho 'Picked up JAVA_TOOL_OPTIONS: -Dx=y' >&2\n"
        f"echo '{version_line}' >&2\necho 'OpenJDK Runtime Environment' >&2\nexit {code}\n",
    )


# A stand-in for `spark-submit ... SparkConnectServer`, steered by FAKE_SPARK_* variables
# (the driver inherits the environment):
#   FAKE_SPARK_FAIL_PORT=<port>  the driver on that port logs 40 lines and exits 3
#   FAKE_SPARK_MODE=hang         never serves; forks a child in its group and one in a group
#                                of its own (like pyspark's daemon), writes "pid child stray"
#                                to FAKE_SPARK_PIDS_DIR/<port>; =hang-noterm also ignores SIGTERM
#   default                      serves Config, answering FAKE_SPARK_ANSWER or its port
FAKE_SPARK_SUBMIT = """\
#!{python}
import os, signal, sys, time
args = sys.argv[1:]
conf = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--conf")
port = conf["spark.connect.grpc.binding.port"]
host = conf["spark.connect.grpc.binding.address"]
mode = os.environ.get("FAKE_SPARK_MODE", "serve")
print("fake spark-submit", " ".join(args), flush=True)
if os.environ.get("FAKE_SPARK_FAIL_PORT") == port:
    for i in range(40):
        print(f"log line {{i}}")
        if i == 10:
            print("26/11/27 04:58:37 ERROR SparkConnectServer: Error starting server")
            print("java.net.BindException: Failed to bind to address")
    sys.exit(3)
if mode.startswith("hang"):
    if mode == "hang-noterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = os.fork()
    if child == 0:
        os.execvp("sleep", ["sleep", "300"])
    stray = os.fork()
    if stray == 0:
        os.setpgid(0, 0)
        os.execvp("sleep", ["sleep", "300"])
    try:  # also from the parent, so the group exists before the pids are published
        os.setpgid(stray, stray)
    except OSError:  # the child already did it and exec'd
        pass
    path = os.path.join(os.environ["FAKE_SPARK_PIDS_DIR"], port)
    with open(path + ".tmp", "w") as f:
        f.write(f"{{os.getpid()}} {{child}} {{stray}}")
    os.rename(path + ".tmp", path)
    while True:
        time.sleep(3600)
from concurrent import futures
import grpc
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc
answer = os.environ.get("FAKE_SPARK_ANSWER", port)
class Service(base_pb2_grpc.SparkConnectServiceServicer):
    def Config(self, request, context):
        pairs = [base_pb2.KeyValue(key=k, value=answer) for k in request.operation.get.keys]
        return base_pb2.ConfigResponse(session_id=request.session_id, pairs=pairs)
server = grpc.server(futures.ThreadPoolExecutor(2))
base_pb2_grpc.add_SparkConnectServiceServicer_to_server(Service(), server)
server.add_insecure_port(f"{{host}}:{{port}}")
server.start()
print("serving", flush=True)
server.wait_for_termination()
"""


@pytest.fixture
def fake_spark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake SPARK_HOME whose spark-submit is FAKE_SPARK_SUBMIT; Java checks see Java 17."""
    home = tmp_path / "spark"
    write_exe(home / "bin" / "spark-submit", FAKE_SPARK_SUBMIT.format(python=sys.executable))
    (home / "jars").mkdir()
    (home / "jars" / "spark-connect_2.13-4.3.0.jar").touch()
    monkeypatch.setattr(local_driver, "spark_home", lambda: str(home))
    java_home = tmp_path / "jdk"
    fake_java(java_home, 'openjdk version "17.0.15" 2025-04-15')
    monkeypatch.setenv("JAVA_HOME", str(java_home))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("FAKE_SPARK_PIDS_DIR", str(pids))
    return tmp_path


@pytest.fixture
def cleanup() -> Iterator[list[LocalDrivers | LocalDriver]]:
    """Whatever a test registers here is stopped at its end, even if it failed."""
    things: list[LocalDrivers | LocalDriver] = []
    yield things
    for thing in things:
        thing.stop()


def read_pids(tmp_path: Path, port: int) -> list[int]:
    path = tmp_path / "pids" / str(port)
    wait_until(path.exists, what=f"fake driver on {port} to write its pids")
    return [int(pid) for pid in path.read_text().split()]


# --------------------------------------------------------------------------- Java


@pytest.mark.parametrize(
    ("version", "major"),
    [
        ("17.0.15", 17),
        ("1.8.0_392", 8),
        ("21", 21),
        ("11.0.2", 11),
        ("22-ea", 22),
        ("17.0.2+8", 17),
        ("25.0.1", 25),
    ],
)
def test_java_major(version: str, major: int) -> None:
    assert java_major(version) == major


def test_java_major_garbage() -> None:
    with pytest.raises(LocalDriverError, match="cannot parse"):
        java_major("banana")


@pytest.mark.parametrize(
    ("line", "version", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', "17.0.15", 17),
        ('openjdk version "21" 2023-09-19', "21", 21),
        ('java version "25.0.1" 2025-10-21 LTS', "25.0.1", 25),
    ],
)
def test_check_java_java_home(tmp_path: Path, line: str, version: str, major: int) -> None:
    java = fake_java(tmp_path, line)
    assert check_java(str(tmp_path)) == JavaInfo(path=str(java), version=version, major=major)


@pytest.mark.parametrize(
    ("line", "version"),
    [('openjdk version "11.0.2" 2019-01-15', "11.0.2"), ('java version "1.8.0_392"', "1.8.0_392")],
)
def test_check_java_too_old(tmp_path: Path, line: str, version: str) -> None:
    java = fake_java(tmp_path, line)
    with pytest.raises(JavaTooOld) as info:
        check_java(str(tmp_path))
    message = str(info.value)
    assert version in message
    assert str(java) in message
    assert "Java 17" in message
    assert "Spark 4" in message


def test_check_java_uses_env_java_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_java(tmp_path / "jdk", 'openjdk version "11.0.2"')
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    with pytest.raises(JavaTooOld, match=r"11\.0\.2"):
        check_java()


def test_check_java_argument_beats_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_java(tmp_path / "old", 'openjdk version "11.0.2"')
    fake_java(tmp_path / "new", 'openjdk version "21"')
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "old"))
    assert check_java(str(tmp_path / "new")).major == 21


def test_check_java_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    java = fake_java(tmp_path, 'openjdk version "17.0.15"')
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert check_java() == JavaInfo(path=str(java), version="17.0.15", major=17)


def test_java_not_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(JavaNotFound) as info:
        check_java()
    message = str(info.value)
    assert "openjdk-17-jre-headless" in message
    assert "JAVA_HOME" in message


def test_java_home_without_java(tmp_path: Path) -> None:
    with pytest.raises(JavaNotFound) as info:
        check_java(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "openjdk-17-jre-headless" in str(info.value)


def test_java_version_fails(tmp_path: Path) -> None:
    fake_java(tmp_path, "Error: something broke", code=1)
    with pytest.raises(LocalDriverError, match="exit code 1") as info:
        check_java(str(tmp_path))
    assert not isinstance(info.value, (JavaNotFound, JavaTooOld))


def test_java_not_executable_format(tmp_path: Path) -> None:
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_bytes(b"\x00\x01 not a program")
    java.chmod(0o755)
    with pytest.raises(JavaNotFound, match="cannot run"):
        check_java(str(tmp_path))


# --------------------------------------------------------------------------- command line


def test_driver_command(tmp_path: Path) -> None:
    command = driver_command(
        "/opt/pyspark", host="127.0.0.1", port=15003, memory="2g", work_dir=tmp_path
    )
    assert command == [
        "/opt/pyspark/bin/spark-submit",
        "--class",
        "org.apache.spark.sql.connect.service.SparkConnectServer",
        "--master",
        "local[2]",
        "--driver-memory",
        "2g",
        "--conf",
        "spark.connect.grpc.binding.port=15003",
        "--conf",
        "spark.connect.grpc.binding.address=127.0.0.1",
        "--conf",
        "spark.driver.host=127.0.0.1",
        "--conf",
        "spark.driver.bindAddress=127.0.0.1",
        "--conf",
        "spark.ui.enabled=false",
        "--conf",
        f"spark.sql.warehouse.dir={tmp_path}/warehouse-15003",
        "--conf",
        f"spark.driver.extraJavaOptions=-Dderby.system.home={tmp_path}/derby-15003",
        "spark-internal",
    ]


def test_driver_command_spark_conf(tmp_path: Path) -> None:
    command = driver_command(
        "/s",
        host="127.0.0.1",
        port=1,
        memory="1g",
        work_dir=tmp_path,
        spark_conf={
            "spark.master": "local[1]",
            "spark.ui.enabled": "true",
            "spark.sql.shuffle.partitions": "4",
            "spark.driver.extraJavaOptions": "-XX:+UseG1GC",
        },
    )
    assert command[command.index("--master") + 1] == "local[1]"
    confs = [command[i + 1] for i, arg in enumerate(command) if arg == "--conf"]
    assert "spark.ui.enabled=true" in confs
    assert "spark.ui.enabled=false" not in confs
    assert "spark.sql.shuffle.partitions=4" in confs
    assert "spark.master=local[1]" not in confs
    assert (
        f"spark.driver.extraJavaOptions=-Dderby.system.home={tmp_path}/derby-1 -XX:+UseG1GC"
    ) in confs
    assert command[-1] == "spark-internal"


@pytest.mark.parametrize(
    "key",
    [
        "spark.connect.grpc.binding.port",
        "spark.connect.grpc.binding.address",
        "spark.driver.memory",
    ],
)
def test_driver_command_reserved_conf(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        driver_command(
            "/s", host="h", port=1, memory="1g", work_dir=tmp_path, spark_conf={key: "x"}
        )
    with pytest.raises(ValueError, match=key):
        LocalDrivers(1, work_dir=tmp_path, spark_conf={key: "x"})


def test_driver_env() -> None:
    base = {"PATH": "/bin", "SPARK_REMOTE": "sc://x", "SPARK_CONNECT_MODE_ENABLED": "1"}
    env = driver_env("/opt/pyspark", host="127.0.0.1", python="/venv/bin/python", base=base)
    assert env == {
        "PATH": "/bin",
        "SPARK_HOME": "/opt/pyspark",
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": "/venv/bin/python",
    }
    env = driver_env("/s", host="h", python="p", java_home="/jdk", base={"JAVA_HOME": "/other"})
    assert env["JAVA_HOME"] == "/jdk"
    assert driver_env("/s", host="h", python="p", base={"JAVA_HOME": "/o"})["JAVA_HOME"] == "/o"


def test_spark_home_is_the_pyspark_package() -> None:
    import pyspark

    home = local_driver.spark_home()
    assert home == os.path.dirname(pyspark.__file__)
    assert os.access(os.path.join(home, "bin", "spark-submit"), os.X_OK)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_ports_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 ports given for 2"):
        LocalDrivers(2, ports=[1, 2, 3], work_dir=tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        LocalDrivers(2, ports=[5, 5], work_dir=tmp_path)
    with pytest.raises(ValueError, match="at least 1"):
        LocalDrivers(0, work_dir=tmp_path)
    drivers = LocalDrivers(3, work_dir=tmp_path)
    assert len(set(drivers.addresses)) == 3
    assert all(a.startswith("127.0.0.1:") for a in drivers.addresses)
    given = LocalDrivers(2, ports=[15003, 15004], work_dir=tmp_path)
    assert given.addresses == ["127.0.0.1:15003", "127.0.0.1:15004"]
    assert given.drivers[0].log_path == tmp_path / "driver-15003.log"
    assert given.work_dir == tmp_path


def test_default_work_dir_is_fresh() -> None:
    a, b = LocalDrivers(1), LocalDrivers(1)
    try:
        assert a.work_dir != b.work_dir
        assert a.work_dir.name.startswith("spark-router-drivers-")
        assert a.work_dir.is_dir()
    finally:
        a.work_dir.rmdir()
        b.work_dir.rmdir()


def test_failure_message() -> None:
    error = DriverFailedToStart(
        "127.0.0.1:15003",
        "process exited with code 1",
        Path("/tmp/x/driver-15003.log"),
        "a\nb\n",
        exit_code=1,
        first_error="ERROR boom",
    )
    text = str(error)
    assert "127.0.0.1:15003" in text
    assert "process exited with code 1" in text
    assert "/tmp/x/driver-15003.log" in text
    assert "    a\n    b" in text
    assert "ERROR boom" in text
    assert isinstance(error, LocalDriverError)


# --------------------------------------------------------------------------- spawning


def test_spawn_survives_its_callers_thread() -> None:
    """PDEATHSIG fires when the forking *thread* ends; spawn() forks from a daemon thread."""
    children: dict[str, subprocess.Popen[bytes]] = {}

    def naive() -> None:  # what spawn() avoids: fork from a short-lived thread
        children["naive"] = subprocess.Popen(
            ["sleep", "300"], preexec_fn=procs.child_setup(os.getpid())
        )

    def via_spawn() -> None:
        children["spawned"] = spawn(["sleep", "300"])

    try:
        for target in (via_spawn, naive):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
        # The naive child is killed by the kernel when its thread ends ...
        wait_until(lambda: children["naive"].poll() is not None, what="naive child to die")
        assert children["naive"].returncode == -signal.SIGKILL
        # ... by which time the spawned one's caller thread had ended too: it lives on.
        assert children["spawned"].poll() is None
        assert os.getpgid(children["spawned"].pid) == children["spawned"].pid  # own group
    finally:
        for child in children.values():
            child.kill()
            child.wait()


def test_spawned_child_dies_with_a_sigkilled_parent() -> None:
    script = textwrap.dedent(
        """
        import sys
        from router.local import spawn
        child = spawn(["sleep", "300"])
        print(child.pid, flush=True)
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
    try:
        pid = int(parent.stdout.readline())
        assert not gone(pid)
        parent.kill()
        parent.wait()
        wait_until(lambda: gone(pid), what="the orphan to be killed")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        parent.stdin.close()


# --------------------------------------------------------------------------- fake drivers


def test_start_ready_and_stop(
    fake_spark: Path, cleanup: list[LocalDrivers | LocalDriver], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.local")
    drivers = LocalDrivers(2, work_dir=fake_spark / "work", startup_timeout=60)
    cleanup.append(drivers)
    assert all(d.process is None for d in drivers.drivers)
    assert drivers.start(progress=False) == drivers.addresses
    for driver in drivers.drivers:
        assert driver.state == "ready"
        assert driver.poll_ready()
        assert driver.ready_after is not None
        assert f"driver {driver.address} ready after" in caplog.text
        assert "fake spark-submit" in driver.tail_log()
        assert driver.log_path.parent == fake_spark / "work"
    pids = [d.process.pid for d in drivers.drivers if d.process]
    drivers.stop()
    assert all(gone(pid) for pid in pids)
    assert all(d.state == "stopped" for d in drivers.drivers)
    drivers.stop()  # idempotent


def test_rich_progress(
    fake_spark: Path,
    cleanup: list[LocalDrivers | LocalDriver],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(local_display, "_stdout_is_tty", lambda: True)
    drivers = LocalDrivers(2, work_dir=fake_spark / "work", startup_timeout=60)
    cleanup.append(drivers)
    drivers.start(progress=True)
    out = capsys.readouterr().out
    for address in drivers.addresses:
        assert address in out
    assert "ready" in out


def test_driver_restart(fake_spark: Path, cleanup: list[LocalDrivers | LocalDriver]) -> None:
    driver = LocalDriver(work_dir=fake_spark / "work")
    cleanup.append(driver)
    with pytest.raises(LocalDriverError, match="not started"):
        driver.poll_ready()
    driver.start()
    with pytest.raises(LocalDriverError, match="already running"):
        driver.start()
    driver.wait_ready(60)
    driver.stop()
    with pytest.raises(LocalDriverError, match="stopped"):
        driver.poll_ready()
    driver.start()
    driver.wait_ready(60)
    assert driver.log_path.read_text().count("### spark-router: starting driver") == 2
    assert driver.tail_log(200).count("### spark-router: starting driver") == 1  # this run


def test_failure_stops_all(
    fake_spark: Path, cleanup: list[LocalDrivers | LocalDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    drivers = LocalDrivers(2, work_dir=fake_spark / "work", startup_timeout=60)
    cleanup.append(drivers)
    bad, good = drivers.drivers
    monkeypatch.setenv("FAKE_SPARK_FAIL_PORT", str(bad.port))
    with pytest.raises(DriverFailedToStart) as info:
        drivers.start(progress=False)
    message = str(info.value)
    assert bad.address in message
    assert "exited with code 3" in message
    assert str(bad.log_path) in message
    assert "log line 39" in message  # the tail ...
    assert "log line 20" in message
    assert "log line 19" not in message  # ... of 20 lines
    assert "ERROR SparkConnectServer: Error starting server" in message  # first error
    assert "BindException" in message
    assert info.value.exit_code == 3
    assert bad.state == "failed"
    for driver in (bad, good):
        assert driver.process is not None
        assert gone(driver.process.pid)


def test_timeout_stops_all_and_strays(
    fake_spark: Path, cleanup: list[LocalDrivers | LocalDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SPARK_MODE", "hang")
    drivers = LocalDrivers(1, work_dir=fake_spark / "work", startup_timeout=3)
    cleanup.append(drivers)
    driver = drivers.drivers[0]
    started = time.monotonic()
    with pytest.raises(DriverFailedToStart, match="not ready after 3 s") as info:
        drivers.start(progress=False)
    assert time.monotonic() - started < 20
    assert "fake spark-submit" in str(info.value)
    pids = read_pids(fake_spark, driver.port)
    assert all(gone(pid) for pid in pids), pids
    assert group_members(pids[0]) == []


def test_stop_escalates_to_sigkill(
    fake_spark: Path,
    cleanup: list[LocalDrivers | LocalDriver],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("FAKE_SPARK_MODE", "hang-noterm")
    driver = LocalDriver(work_dir=fake_spark / "work")
    cleanup.append(driver)
    driver.start()
    pid, child, stray = read_pids(fake_spark, driver.port)
    assert os.getpgid(stray) == stray  # like pyspark's daemon: a group of its own
    driver.stop(timeout=0.5)
    assert driver.process is not None and driver.process.returncode == -signal.SIGKILL
    assert "did not stop within" in caplog.text
    assert all(gone(p) for p in (pid, child, stray))
    driver.stop()  # idempotent


def test_port_in_use(fake_spark: Path, cleanup: list[LocalDrivers | LocalDriver]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        drivers = LocalDrivers(1, ports=[port], work_dir=fake_spark / "work")
        cleanup.append(drivers)
        with pytest.raises(DriverFailedToStart, match="already in use"):
            drivers.start(progress=False)
        assert drivers.drivers[0].process is None


def test_wrong_server_on_port(
    fake_spark: Path, cleanup: list[LocalDrivers | LocalDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SPARK_ANSWER", "1")
    drivers = LocalDrivers(1, work_dir=fake_spark / "work", startup_timeout=60)
    cleanup.append(drivers)
    with pytest.raises(DriverFailedToStart, match="another Spark Connect server"):
        drivers.start(progress=False)
    assert drivers.drivers[0].process is not None
    assert gone(drivers.drivers[0].process.pid)


def test_java_checked_before_any_start(fake_spark: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(fake_spark / "nowhere"))
    drivers = LocalDrivers(2, work_dir=fake_spark / "work")
    with pytest.raises(JavaNotFound):
        drivers.start(progress=False)
    assert all(d.process is None for d in drivers.drivers)


def test_context_manager(fake_spark: Path) -> None:
    with LocalDrivers(1, work_dir=fake_spark / "work", startup_timeout=60) as drivers:
        assert drivers.drivers[0].process is None  # __enter__ does not start
        drivers.start(progress=False)
        process = drivers.drivers[0].process
        assert process is not None
    assert process.returncode is not None
    assert gone(process.pid)


def test_interrupt_during_start_stops_all(
    fake_spark: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SPARK_MODE", "hang")
    drivers = LocalDrivers(2, work_dir=fake_spark / "work", startup_timeout=60)
    polls = 0
    real_poll_ready = LocalDriver.poll_ready

    def interrupted_poll(self: LocalDriver) -> bool:
        nonlocal polls
        polls += 1
        if polls == 5:
            raise KeyboardInterrupt  # as a Ctrl-C would, in the middle of the wait
        return real_poll_ready(self)

    monkeypatch.setattr(LocalDriver, "poll_ready", interrupted_poll)
    with pytest.raises(KeyboardInterrupt):
        drivers.start(progress=False)
    for driver in drivers.drivers:
        assert driver.process is not None
        assert driver.process.returncode is not None
        assert gone(driver.process.pid)
