"""Local Spark Connect drivers run from the installed pyspark package.

Backs `spark-router up` and the test suite's Spark fixtures. One `LocalDriver` is one
`SparkConnectServer` JVM started with the pyspark package's own `bin/spark-submit` (the pip
package bundles Spark, so nothing is downloaded); `LocalDrivers` starts a set of them together
and waits until every one answers a real Spark Connect call.

Invariants
----------
* **No orphan JVMs.** Every driver is started
  - in its own session and process group (`start_new_session=True`): a Ctrl-C in the terminal
    reaches only the router, which then stops the drivers itself; stopping sends SIGTERM to the
    whole group, waits, then SIGKILLs the group;
  - with `prctl(PR_SET_PDEATHSIG, SIGKILL)` set in the child before exec (Linux only; skipped
    silently elsewhere). spark-submit `exec`s into the JVM, so the flag survives and the JVM is
    killed by the kernel even if the router is SIGKILLed. PDEATHSIG fires when the *thread*
    that forked the child ends, so every driver is forked from one long-lived daemon thread
    (`_Spawner`), never from the caller's thread, which may be short-lived.
  - The pyspark daemon that runs Python UDF workers puts itself in a process group of its own
    (`os.setpgid(0, 0)` in `pyspark/daemon.py`), so the group kill does not reach it. It exits
    when its stdin (a pipe from the JVM) closes, i.e. when the JVM dies, and then SIGHUPs its
    workers. `stop()` also snapshots the JVM's descendants before signalling and SIGKILLs any
    that outlive the JVM.
  - An `atexit` hook stops drivers still running when the interpreter exits normally; a
    SIGTERM/SIGKILL of the router leaves the rest to PDEATHSIG.
  - spark-class leaves its process-substitution subshell as a *zombie* child of the JVM (the
    JVM never reaps it); it holds no resources and disappears with the JVM.
* **Failure is total and explained.** If any driver of a `LocalDrivers.start()` exits or is not
  ready within `startup_timeout`, *all* drivers are stopped, then `DriverFailedToStart` is
  raised naming the driver, the exit code (or "not ready after N s"), the log path and the last
  log lines. Logs (`<work_dir>/driver-<port>.log`) are always kept. An interrupt
  (KeyboardInterrupt, SystemExit) during start also stops all drivers before propagating.
  Java is checked before any JVM starts, and a port already in use fails before its JVM starts.
* **Ready means answering.** A driver is ready when its port accepts TCP *and* a Spark Connect
  `Config` call (get `spark.connect.grpc.binding.port`) answers this driver's own port; a
  different answer means another server holds the port and is a start failure.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import importlib.util
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

__all__ = [
    "PROBE_SESSION_ID",
    "PROBE_USER_ID",
    "SERVER_CLASS",
    "DriverFailedToStart",
    "JavaInfo",
    "JavaNotFound",
    "JavaTooOld",
    "LocalDriver",
    "LocalDriverError",
    "LocalDrivers",
    "check_java",
    "driver_command",
    "driver_env",
    "free_port",
    "java_major",
    "probe_driver",
    "spark_home",
    "spawn",
]

log = logging.getLogger(__name__)

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
MIN_JAVA_MAJOR = 17
# local[2], not local[1]: the machines this targets have ~2 cores, and with local[1] a single
# long task (a Python UDF, a big shuffle) serialises every other query of every session on that
# driver. local[2] lets one busy driver use both cores while its siblings idle, the common case.
# Not local[*]: drivers share the machine, so the default must not scale with the core count.
# Override with spark_conf={"spark.master": "local[1]"}.
DEFAULT_MASTER = "local[2]"
# Keys the module sets itself and that callers must not override (readiness depends on them).
RESERVED_CONF = frozenset(
    {
        "spark.connect.grpc.binding.port",
        "spark.connect.grpc.binding.address",
        "spark.driver.memory",
    }
)
# Variables that would make the server process think it is a Connect *client*.
_CLIENT_ONLY_ENV = ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED", "SPARK_API_MODE")

PROBE_SESSION_ID = "5f1d7c2e-9a43-4b8e-a6d1-3c0e8b7f2a91"
"""Session id of readiness probes; a constant so repeated probes reuse one server session."""
PROBE_USER_ID = "spark-router"
PROBE_TIMEOUT = 2.0
POLL_INTERVAL = 0.25

_JAVA_INSTALL_HINT = (
    "install Java 17 (e.g. `apt-get install openjdk-17-jre-headless`) "
    "or set JAVA_HOME to a Java 17+ installation"
)


# --------------------------------------------------------------------------- errors


class LocalDriverError(Exception):
    """Base error of local drivers; str() is a clear, actionable message."""


class JavaNotFound(LocalDriverError):
    """No usable `java` executable."""


class JavaTooOld(LocalDriverError):
    """The `java` found is older than Spark 4 needs."""


class DriverFailedToStart(LocalDriverError):
    """A driver exited or did not become ready; the message names it, its log and log tail."""

    def __init__(
        self,
        address: str,
        reason: str,
        log_path: Path | None = None,
        log_tail: str = "",
        exit_code: int | None = None,
        first_error: str = "",
    ) -> None:
        self.address = address
        self.reason = reason
        self.log_path = log_path
        self.log_tail = log_tail
        self.exit_code = exit_code
        self.first_error = first_error
        message = f"Spark Connect driver {address} failed to start: {reason}"
        if log_path is not None:
            message += f"\n  log: {log_path}"
        if first_error and first_error not in log_tail:
            message += f"\n  first error in the log: {first_error}"
        if log_tail.strip():
            indented = "\n".join("    " + line for line in log_tail.rstrip("\n").splitlines())
            message += f"\n  last log lines:\n{indented}"
        super().__init__(message)


# --------------------------------------------------------------------------- Java


@dataclass(frozen=True)
class JavaInfo:
    """The Java found: executable path, version string and major version."""

    path: str
    version: str
    major: int


_VERSION_RE = re.compile(r'version "([^"]+)"')


def java_major(version: str) -> int:
    """Major version of a `java -version` string: '1.8.0_392' -> 8, '17.0.15' -> 17."""
    parts = re.split(r"[._+\-]", version)
    try:
        if parts[0] == "1" and len(parts) > 1:
            return int(parts[1])
        return int(parts[0])
    except ValueError:
        raise LocalDriverError(f"cannot parse Java version {version!r}") from None


def check_java(java_home: str | None = None) -> JavaInfo:
    """Find Java as spark-submit will (JAVA_HOME, else PATH) and check it is 17 or newer."""
    home = java_home or os.environ.get("JAVA_HOME") or None
    if home:
        source = "--java-home" if java_home else "JAVA_HOME"
        java = os.path.join(home, "bin", "java")
        if not (os.path.isfile(java) and os.access(java, os.X_OK)):
            raise JavaNotFound(
                f"{source}={home} has no executable bin/java: Spark needs Java 17+; "
                f"{_JAVA_INSTALL_HINT}"
            )
    else:
        found = shutil.which("java")
        if found is None:
            raise JavaNotFound(
                f"no `java` on PATH and JAVA_HOME is not set: Spark needs Java 17+; "
                f"{_JAVA_INSTALL_HINT}"
            )
        java = found
    try:
        result = subprocess.run(
            [java, "-version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except OSError as exc:
        raise JavaNotFound(f"cannot run {java}: {exc}; {_JAVA_INSTALL_HINT}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LocalDriverError(f"`{java} -version` did not answer within 60 s") from exc
    output = (result.stderr + result.stdout).decode(errors="replace")
    match = _VERSION_RE.search(output)
    if result.returncode != 0 or match is None:
        raise LocalDriverError(
            f"`{java} -version` failed (exit code {result.returncode}) or printed no version: "
            f"{output.strip()[-500:]!r}; {_JAVA_INSTALL_HINT}"
        )
    version = match.group(1)
    major = java_major(version)
    if major < MIN_JAVA_MAJOR:
        where = java
        real = os.path.realpath(java)
        if real != java:
            where += f" (-> {real})"
        raise JavaTooOld(
            f"Java {version} found at {where}, but Spark 4 needs Java 17 or newer: "
            f"{_JAVA_INSTALL_HINT}"
        )
    return JavaInfo(path=java, version=version, major=major)


# --------------------------------------------------------------------------- Spark


def spark_home() -> str:
    """The installed pyspark package directory (it holds bin/spark-submit and jars/)."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.submodule_search_locations:
        raise LocalDriverError("pyspark is not installed: pip install 'pyspark[connect]==4.3.0'")
    home = str(spec.submodule_search_locations[0])
    submit = os.path.join(home, "bin", "spark-submit")
    jars = os.path.join(home, "jars")
    if not os.path.isfile(submit) or not os.path.isdir(jars):
        raise LocalDriverError(
            f"pyspark at {home} has no bin/spark-submit or jars/: install the PyPI package "
            "(pip install 'pyspark[connect]==4.3.0'), which bundles Spark"
        )
    if not any(name.startswith("spark-connect_") for name in os.listdir(jars)):
        raise LocalDriverError(f"pyspark at {home} has no Spark Connect server jar in jars/")
    if not os.access(submit, os.X_OK):
        raise LocalDriverError(f"{submit} is not executable (chmod +x it)")
    return home


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on host that is free right now (the OS picks it)."""
    return _free_ports(host, 1)[0]


def _free_ports(host: str, count: int) -> list[int]:
    """`count` distinct free ports: all sockets stay bound until every port is picked."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(_family(host), socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _port_in_use(host: str, port: int) -> bool:
    """True if something listens on (or has bound) host:port; mirrors the JVM's SO_REUSEADDR."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_spark_conf(conf: Mapping[str, str]) -> None:
    reserved = sorted(RESERVED_CONF.intersection(conf))
    if reserved:
        raise ValueError(
            f"spark_conf must not set {', '.join(reserved)}: use the host/ports/memory arguments"
        )


def driver_command(
    spark_home: str,
    *,
    host: str,
    port: int,
    memory: str,
    work_dir: Path,
    spark_conf: Mapping[str, str] | None = None,
) -> list[str]:
    """The spark-submit command line of one Spark Connect driver."""
    conf = dict(spark_conf or {})
    _check_spark_conf(conf)
    # spark-submit's --master wins over --conf spark.master, so honour an override here.
    master = conf.pop("spark.master", DEFAULT_MASTER)
    java_options = f"-Dderby.system.home={work_dir / f'derby-{port}'}"
    extra = conf.pop("spark.driver.extraJavaOptions", "").strip()
    if extra:
        java_options = f"{java_options} {extra}"
    base = {
        "spark.connect.grpc.binding.port": str(port),
        "spark.connect.grpc.binding.address": host,
        "spark.driver.host": host,
        "spark.driver.bindAddress": host,
        "spark.ui.enabled": "false",
        "spark.sql.warehouse.dir": str(work_dir / f"warehouse-{port}"),
        "spark.driver.extraJavaOptions": java_options,
    }
    base.update(conf)  # a later --conf would win anyway; one entry per key is clearer
    command = [
        os.path.join(spark_home, "bin", "spark-submit"),
        "--class",
        SERVER_CLASS,
        "--master",
        master,
        "--driver-memory",
        memory,
    ]
    for key, value in base.items():
        command += ["--conf", f"{key}={value}"]
    command.append("spark-internal")
    return command


def driver_env(
    spark_home: str,
    *,
    host: str,
    python: str,
    java_home: str | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one driver process: inherited, plus SPARK_HOME, SPARK_LOCAL_IP, ..."""
    env = dict(os.environ if base is None else base)
    for name in _CLIENT_ONLY_ENV:
        env.pop(name, None)
    env["SPARK_HOME"] = spark_home
    env["SPARK_LOCAL_IP"] = host
    env["PYSPARK_PYTHON"] = python  # Python UDF workers need pyspark + pyarrow
    if java_home:
        env["JAVA_HOME"] = java_home
    return env


def probe_driver(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """One Spark Connect Config call; returns the driver's binding port conf, None if no answer."""
    import grpc
    from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

    request = base_pb2.ConfigRequest(
        session_id=PROBE_SESSION_ID,
        user_context=base_pb2.UserContext(user_id=PROBE_USER_ID),
        operation=base_pb2.ConfigRequest.Operation(
            get=base_pb2.ConfigRequest.Get(keys=["spark.connect.grpc.binding.port"])
        ),
        client_type="spark-router-probe",
    )
    target = _format_address(host, port)
    # No proxy: an http_proxy in the environment would otherwise capture loopback calls.
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub: Any = base_pb2_grpc.SparkConnectServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            response: Any = stub.Config(request, timeout=timeout)
        except grpc.RpcError as exc:
            log.debug("probe of %s failed: %s", target, exc)
            return None
    for pair in response.pairs:
        if pair.key == "spark.connect.grpc.binding.port":
            return str(pair.value)
    return ""


# --------------------------------------------------------------------------- processes

_T = TypeVar("_T")
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved in the parent (never dlopen between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _load_prctl()


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; else nothing)."""
    setup = child_setup(os.getppid())
    if setup is not None:
        setup()


def child_setup(parent_pid: int) -> Callable[[], None] | None:
    """preexec_fn: die with SIGKILL when the parent goes away (Linux)."""
    prctl = _PRCTL
    if prctl is None:
        return None
    args = (
        ctypes.c_int(_PR_SET_PDEATHSIG),
        ctypes.c_ulong(signal.SIGKILL),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )

    def setup() -> None:
        prctl(*args)
        if os.getppid() != parent_pid:  # parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


class _Spawner:
    """Forks children from one long-lived daemon thread.

    PR_SET_PDEATHSIG fires when the forking *thread* exits, so forking from a caller's thread
    that later ends (a worker thread, `asyncio.to_thread`) would kill the driver. A daemon
    thread lives until the process exits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], _T]) -> _T:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._run, args=(self._queue,), name="spark-router-spawner", daemon=True
                )
                self._thread.start()
            future: Future[_T] = Future()
            self._queue.put((fn, future))
        return future.result()

    @staticmethod
    def _run(jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
        while True:
            fn, future = jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


_SPAWNER = _Spawner()


def spawn(
    args: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Popen in a new session with PDEATHSIG=SIGKILL, forked from the long-lived spawner thread."""

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(args),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            start_new_session=True,
            preexec_fn=child_setup(os.getpid()),
            close_fds=True,
        )

    return _SPAWNER.call(start)


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgid: int
    start_time: str  # field 22 of /proc/<pid>/stat: tells a reused pid apart


def _read_stat(pid: int) -> tuple[str, _Proc] | None:
    """(state, process) from /proc/<pid>/stat; None if it is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20:
        return None
    return fields[0], _Proc(pid, int(fields[1]), int(fields[2]), fields[19])


def _related(pid: int, pgid: int) -> list[_Proc]:
    """Live descendants of pid (whatever their group) and members of group pgid."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    table: dict[int, _Proc] = {}
    for name in names:
        if name.isdigit():
            entry = _read_stat(int(name))
            if entry is not None and entry[0] not in ("Z", "X"):
                table[entry[1].pid] = entry[1]
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found = {proc.pid for proc in table.values() if proc.pgid == pgid and proc.pid != pid}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.add(child)
        todo.extend(children.get(child, []))
    return [table[child] for child in sorted(found)]


def _alive(proc: _Proc) -> bool:
    """True if the same process (not a reused pid) still runs and is not a zombie."""
    entry = _read_stat(proc.pid)
    return (
        entry is not None and entry[1].start_time == proc.start_time and entry[0] not in ("Z", "X")
    )


def _wait_gone(procs: Sequence[_Proc], timeout: float) -> list[_Proc]:
    """Wait up to timeout for procs to end; returns those still alive."""
    deadline = time.monotonic() + timeout
    alive = [proc for proc in procs if _alive(proc)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [proc for proc in alive if _alive(proc)]
    return alive


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """killpg, ignoring an empty group; True if the group existed."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- drivers

_LIVE_DRIVERS: weakref.WeakSet[LocalDriver] = weakref.WeakSet()


@atexit.register
def _stop_live_drivers() -> None:
    for driver in list(_LIVE_DRIVERS):
        try:
            driver.stop()
        except Exception:  # pragma: no cover - best effort at exit
            log.exception("could not stop driver %s at exit", driver.address)


class LocalDriver:
    """One Spark Connect server JVM on host:port, started with the pyspark package's spark-submit.

    States: "new" -> "starting" -> "port open" -> "ready"; "failed" or "stopped" at the end.
    `start()` may be called again after `stop()` (same port, log appended).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        memory: str = "1g",
        work_dir: Path | None = None,
        python: str = sys.executable,
        java_home: str | None = None,
        spark_conf: Mapping[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.memory = memory
        self.work_dir = (
            Path(work_dir)
            if work_dir is not None
            else Path(tempfile.mkdtemp(prefix="spark-router-drivers-"))
        )
        self.python = python
        self.java_home = java_home
        self.spark_conf = dict(spark_conf or {})
        self.log_path = self.work_dir / f"driver-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.state = "new"
        self.started_at: float | None = None  # time.monotonic() of start()
        self.ready_after: float | None = None  # seconds from start() to ready
        self._ended_after: float | None = None  # elapsed when it became ready or failed
        self._log_start = 0  # offset in log_path where the current run's output begins
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"LocalDriver({self.address}, state={self.state!r}, pid={pid})"

    @property
    def address(self) -> str:
        """ "host:port" of the driver's Spark Connect endpoint."""
        return _format_address(self.host, self.port)

    @property
    def elapsed(self) -> float:
        """Seconds since start() (frozen once ready)."""
        if self._ended_after is not None:
            return self._ended_after
        if self.started_at is None:
            return 0.0
        return time.monotonic() - self.started_at

    def command(self) -> list[str]:
        """The spark-submit command line this driver runs."""
        return driver_command(
            spark_home(),
            host=self.host,
            port=self.port,
            memory=self.memory,
            work_dir=self.work_dir,
            spark_conf=self.spark_conf,
        )

    def start(self) -> None:
        """Start the JVM (returns at once; see poll_ready/wait_ready)."""
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                raise LocalDriverError(f"driver {self.address} is already running")
            home = spark_home()
            command = self.command()
            env = driver_env(home, host=self.host, python=self.python, java_home=self.java_home)
            self.work_dir.mkdir(parents=True, exist_ok=True)
            if _port_in_use(self.host, self.port):
                self._ended(state="failed")
                raise DriverFailedToStart(
                    self.address, f"port {self.port} on {self.host} is already in use"
                )
            with open(self.log_path, "ab") as log_file:
                self._log_start = log_file.tell()
                header = (
                    f"### spark-router: starting driver {self.address} at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n### {' '.join(command)}\n"
                )
                log_file.write(header.encode())
                log_file.flush()
                self.process = spawn(command, cwd=self.work_dir, env=env, stdout=log_file)
            self.state = "starting"
            self.started_at = time.monotonic()
            self.ready_after = self._ended_after = None
            _LIVE_DRIVERS.add(self)
            log.debug("driver %s: pid %d, log %s", self.address, self.process.pid, self.log_path)

    def poll_ready(self) -> bool:
        """One short readiness check; True when ready; DriverFailedToStart if the JVM exited."""
        with self._lock:
            process = self.process
            if process is None:
                raise LocalDriverError(f"driver {self.address} was not started")
            if self.state == "stopped":
                raise LocalDriverError(f"driver {self.address} was stopped")
            code = process.poll()
            if code is not None:
                reason = _describe_exit(code)
                if self.ready_after is not None:
                    reason += f" ({self.ready_after:.1f} s after it became ready)"
                self._ended(state="failed")
                raise self.failure(reason, exit_code=code)
        if not _port_open(self.host, self.port):
            return False
        with self._lock:
            if self.state == "starting":
                self.state = "port open"
        answer = probe_driver(self.host, self.port)
        if answer is None:
            return False
        if answer != str(self.port):
            with self._lock:
                self._ended(state="failed")
            raise self.failure(
                f"port {self.port} is answered by another Spark Connect server "
                f"(its binding port is {answer!r})"
            )
        with self._lock:
            if self.state != "ready":
                self.ready_after = self.elapsed
                self._ended(state="ready")
        return True

    def _ended(self, state: str) -> None:
        """Enter a final start-up state ("ready" or "failed"), freezing `elapsed`."""
        with self._lock:
            if self._ended_after is None:
                self._ended_after = self.elapsed
            self.state = state

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll until ready; DriverFailedToStart (driver left running) if not within timeout."""
        deadline = time.monotonic() + timeout
        while not self.poll_ready():
            if time.monotonic() >= deadline:
                self._ended(state="failed")
                raise self.failure(f"not ready after {timeout:.0f} s")
            time.sleep(POLL_INTERVAL)

    def failure(self, reason: str, exit_code: int | None = None) -> DriverFailedToStart:
        """A DriverFailedToStart for this driver carrying its log tail."""
        return DriverFailedToStart(
            self.address,
            reason,
            self.log_path,
            self.tail_log(),
            exit_code=exit_code,
            first_error=self.first_error(),
        )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, wait up to timeout, then SIGKILL; idempotent."""
        with self._lock:
            process = self.process
            if process is None:
                return
            _LIVE_DRIVERS.discard(self)
            if self.state not in ("failed",):
                self.state = "stopped"
            pgid = process.pid  # start_new_session: the group is led by the JVM's pid
            # Snapshot before signalling: pyspark's daemon and its UDF workers run in a
            # group of their own, so the group kill below does not reach them.
            related = _related(process.pid, pgid) if process.poll() is None else []
            if _signal_group(pgid, signal.SIGTERM):
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "driver %s did not stop within %g s: SIGKILL", self.address, timeout
                    )
                    _signal_group(pgid, signal.SIGKILL)
                    try:
                        process.wait(30)
                    except subprocess.TimeoutExpired:
                        log.error("driver %s (pid %d) survived SIGKILL", self.address, pgid)
                # Members of the group that outlived the leader (the pid stays reserved as
                # a group id while any member lives, so this cannot hit a stranger).
                _signal_group(pgid, signal.SIGKILL)
            else:
                process.wait()
            # The daemon exits by itself once the JVM's pipe closes; give it a moment, then
            # SIGKILL whatever is left and wait until it is really gone.
            leftovers = _wait_gone(related, min(2.0, timeout))
            for proc in leftovers:
                log.debug("killing leftover process %d of driver %s", proc.pid, self.address)
                with suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            for proc in _wait_gone(leftovers, 5.0):
                log.warning("process %d of driver %s survived SIGKILL", proc.pid, self.address)

    def first_error(self) -> str:
        """The log's first error line (and the exception line after it), "" if none."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                lines = f.read(4 * 1024 * 1024).decode(errors="replace").splitlines()
        except OSError:
            return ""
        for i, line in enumerate(lines):
            if not line.startswith("### ") and _ERROR_LINE.search(line):
                found = [line.strip()[:400]]
                if i + 1 < len(lines) and _EXCEPTION_LINE.match(lines[i + 1]):
                    found.append(lines[i + 1].strip()[:400])
                return " / ".join(found)
        return ""

    def tail_log(self, lines: int = 20) -> str:
        """The last `lines` lines of the driver's log from its latest start ("" if none)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(self._log_start, size - 256 * 1024))
                data = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(data.splitlines()[-lines:])


_ERROR_LINE = re.compile(r"\bERROR\b|^Error:|^Exception in thread|^[\w.$]+(Exception|Error)\b")
_EXCEPTION_LINE = re.compile(r"^[\w.$]+(Exception|Error)\b")


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"process killed by {name} (exit code {code})"
    return f"process exited with code {code}"


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- a set of drivers


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


class LocalDrivers:
    """A set of local drivers started together and stopped together.

    Ports are chosen in __init__ (given `ports`, else free ones), so `addresses` and
    `work_dir` are known before start(). As a context manager, `__enter__` returns self
    *without* starting (call `start()` inside the block, so its failures surface there) and
    `__exit__` stops every driver.
    """

    def __init__(
        self,
        count: int = 2,
        *,
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        memory: str = "1g",
        work_dir: Path | None = None,
        python: str = sys.executable,
        java_home: str | None = None,
        spark_conf: Mapping[str, str] | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        if ports is not None:
            ports = list(ports)
            if len(ports) != count:
                raise ValueError(f"{len(ports)} ports given for {count} drivers")
            if len(set(ports)) != len(ports):
                raise ValueError(f"ports must be distinct: {ports}")
            if any(not 0 < port < 65536 for port in ports):
                raise ValueError(f"ports must be in 1..65535: {ports}")
        else:
            ports = _free_ports(host, count)
        if startup_timeout <= 0:
            raise ValueError("startup_timeout must be positive")
        self._work_dir = (
            Path(work_dir)
            if work_dir is not None
            else Path(tempfile.mkdtemp(prefix="spark-router-drivers-"))
        )
        self._java_home = java_home
        self.startup_timeout = startup_timeout
        _check_spark_conf(spark_conf or {})  # fail now rather than after the Java check
        self._drivers = [
            LocalDriver(
                host,
                port,
                memory=memory,
                work_dir=self._work_dir,
                python=python,
                java_home=java_home,
                spark_conf=spark_conf,
            )
            for port in ports
        ]

    @property
    def addresses(self) -> list[str]:
        """The drivers' "host:port" addresses."""
        return [driver.address for driver in self._drivers]

    @property
    def drivers(self) -> list[LocalDriver]:
        """The LocalDriver objects, in address order."""
        return list(self._drivers)

    @property
    def work_dir(self) -> Path:
        """Directory of the logs, warehouses and Derby homes."""
        return self._work_dir

    def __enter__(self) -> LocalDrivers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, progress: bool = True) -> list[str]:
        """Check Java, start every driver, wait until all are ready; on failure stop all."""
        running = [d.address for d in self._drivers if d.process and d.process.poll() is None]
        if running:
            raise LocalDriverError(f"drivers already running: {', '.join(running)}")
        java = check_java(self._java_home)
        log.debug("using Java %s at %s", java.version, java.path)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        use_rich = progress and _stdout_is_tty()
        try:
            for driver in self._drivers:
                driver.start()
                if not use_rich:
                    log.info(
                        "driver %s starting (pid %d, log %s)",
                        driver.address,
                        driver.process.pid if driver.process else -1,
                        driver.log_path,
                    )
            with _display(self._drivers, use_rich) as update:
                self._wait_all(update, quiet=use_rich)
        except BaseException:
            self.stop()
            raise
        return self.addresses

    def _wait_all(self, update: Callable[[], None], quiet: bool) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = list(self._drivers)
        announced = {driver.address: driver.state for driver in self._drivers}
        while True:
            for driver in list(pending):
                try:
                    if driver.poll_ready():
                        pending.remove(driver)
                finally:
                    if announced[driver.address] != driver.state:
                        announced[driver.address] = driver.state
                        _log_state(driver, quiet)
                    update()
            if not pending:
                return
            if time.monotonic() >= deadline:
                first = pending[0]
                first._ended(state="failed")
                others = [driver.address for driver in pending[1:]]
                reason = f"not ready after {self.startup_timeout:.0f} s"
                if others:
                    reason += f" (also not ready: {', '.join(others)})"
                update()
                raise first.failure(reason)
            time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        """Stop every driver (in parallel); idempotent."""
        running = [driver for driver in self._drivers if driver.process is not None]
        if not running:
            return
        with ThreadPoolExecutor(max_workers=len(running)) as pool:
            results = list(pool.map(_stop_quietly, running))
        errors = [error for error in results if error is not None]
        if errors:
            raise errors[0]


def _stop_quietly(driver: LocalDriver) -> Exception | None:
    try:
        driver.stop()
    except Exception as exc:
        log.exception("could not stop driver %s", driver.address)
        return exc
    return None


def _log_state(driver: LocalDriver, quiet: bool) -> None:
    """Log a state change; `quiet` (a live display shows it) turns progress lines to DEBUG."""
    level = logging.DEBUG if quiet else logging.INFO
    if driver.state == "port open":
        log.log(level, "driver %s port open after %.1f s", driver.address, driver.elapsed)
    elif driver.state == "ready":
        log.log(level, "driver %s ready after %.1f s", driver.address, driver.elapsed)
    elif driver.state == "failed":
        log.error("driver %s failed after %.1f s", driver.address, driver.elapsed)


_STATE_STYLE = {
    "starting": "yellow",
    "port open": "cyan",
    "ready": "green",
    "failed": "bold red",
    "stopped": "dim",
}


@contextmanager
def _display(drivers: Sequence[LocalDriver], use_rich: bool) -> Iterator[Callable[[], None]]:
    """Yields an update() callable: with use_rich a live rich display, else a no-op."""
    if not use_rich:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
    from rich.text import Text

    # Columns read the drivers themselves, so state and seconds stay live on every refresh
    # even while a readiness probe blocks the polling loop.
    class StateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            state: str = task.fields["driver"].state
            return Text(f"{state:<9}", style=_STATE_STYLE.get(state, ""))

    class ElapsedColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.fields['driver'].elapsed:6.1f} s")

    progress = Progress(
        SpinnerColumn(finished_text=" "),
        TextColumn("Spark Connect driver [bold]{task.description}"),
        StateColumn(),
        ElapsedColumn(),
        console=Console(file=sys.stdout),
        transient=False,
    )
    tasks = [
        (driver, progress.add_task(driver.address, total=1, driver=driver)) for driver in drivers
    ]

    def update() -> None:
        for driver, task in tasks:
            done = driver.state in ("ready", "failed")
            progress.update(task, completed=1 if done else 0)

    with progress:
        update()
        try:
            yield update
        finally:
            update()
