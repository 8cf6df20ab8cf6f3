"""Local Spark Connect drivers: `LocalDriver` (one JVM) and `LocalDrivers` (a set of them).

One `LocalDriver` is one `SparkConnectServer` JVM started with the pyspark package's own
`bin/spark-submit` (the pip package bundles Spark, so nothing is downloaded); `LocalDrivers`
starts a set of them together and waits until every one answers a real Spark Connect call.

Invariants (the package docstring says them in full)
----------------------------------------------------
* No orphan JVMs: each driver is forked by `common.procs.spawn` (own session and group,
  PDEATHSIG); `stop()` kills the group and every descendant snapshotted before the signal; an
  `atexit` hook stops drivers still running at a normal exit.
* Failure is total and explained: `LocalDrivers.start()` stops *all* drivers on any failure or
  interrupt, then raises `DriverFailedToStart` with the log path and tail. Java is checked, and
  each port found free, before its JVM starts.
* Ready means answering: TCP accepts *and* a `Config` call answers this driver's own port.
* A driver given a `token` requires it (`authorization: Bearer`) on every call: it is handed
  over in the environment (SPARK_CONNECT_AUTHENTICATE_TOKEN), never on the command line,
  which `ps` shows every user and the log header repeats; the readiness probe sends it.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import importlib.util
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from types import TracebackType

from common import procs
from common.health import (
    PLAINTEXT,
    PROBE_SESSION_ID,
    PROBE_USER_ID,
    DriverDialing,
    ask_binding_port,
)
from router.local.display import live_display, log_state, wants_live
from router.local.java import LocalDriverError, check_java
from router.tls import build_dialing

__all__ = [
    "DEFAULT_MASTER",
    "PROBE_SESSION_ID",
    "PROBE_USER_ID",
    "RESERVED_CONF",
    "SERVER_CLASS",
    "DriverFailedToStart",
    "LocalDriver",
    "LocalDriverError",
    "LocalDrivers",
    "driver_command",
    "driver_env",
    "free_port",
    "probe_driver",
    "spark_home",
]

log = logging.getLogger(__name__)

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
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
        "spark.connect.authenticate.token",  # the `token` argument (driver_token for `up`)
    }
)
TOKEN_ENV = "SPARK_CONNECT_AUTHENTICATE_TOKEN"
# Variables that would make the server process think it is a Connect *client*.
_CLIENT_ONLY_ENV = ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED", "SPARK_API_MODE")

PROBE_TIMEOUT = 2.0
POLL_INTERVAL = 0.25

# --------------------------------------------------------------------------- errors


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


def _work_dir(work_dir: Path | None) -> Path:
    """work_dir, else a fresh temporary directory."""
    if work_dir is not None:
        return Path(work_dir)
    return Path(tempfile.mkdtemp(prefix="spark-router-drivers-"))


def _check_spark_conf(conf: Mapping[str, str]) -> None:
    reserved = sorted(RESERVED_CONF.intersection(conf))
    if reserved:
        raise ValueError(
            f"spark_conf must not set {', '.join(reserved)}: use the host/ports/memory/token "
            "arguments (for `up`: listen, driver_memory, driver_token)"
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
    token: str | None = None,
) -> dict[str, str]:
    """The environment of one driver process: inherited, plus SPARK_HOME, SPARK_LOCAL_IP, ..."""
    env = dict(os.environ if base is None else base)
    for name in _CLIENT_ONLY_ENV:
        env.pop(name, None)
    if token is not None:
        env[TOKEN_ENV] = token  # Spark reads it when spark.connect.authenticate.token is unset
    env["SPARK_HOME"] = spark_home
    env["SPARK_LOCAL_IP"] = host
    env["PYSPARK_PYTHON"] = python  # Python UDF workers need pyspark + pyarrow
    if java_home:
        env["JAVA_HOME"] = java_home
    return env


def probe_driver(
    host: str, port: int, timeout: float = PROBE_TIMEOUT, dialing: DriverDialing = PLAINTEXT
) -> str | None:
    """One Spark Connect Config call; returns the driver's binding port conf, None if no answer."""
    # Readiness is polled from threads without an event loop: one short-lived loop per probe.
    return asyncio.run(ask_binding_port(_format_address(host, port), timeout, dialing))


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
    `start()` may be called again after `stop()` (same port, log appended). With a `token`
    the driver requires it on every call (see the module docstring). `exited()` reaps a JVM
    that died; `until_ready()` is `wait_ready()` for an event loop (`up` restarts with them).
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
        token: str | None = None,
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._token = token
        self._dialing = build_dialing(tls=False, token=token)  # the readiness probe's
        self.memory = memory
        self.work_dir = _work_dir(work_dir)
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
            env = driver_env(
                home,
                host=self.host,
                python=self.python,
                java_home=self.java_home,
                token=self._token,
            )
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
                self.process = procs.spawn(command, cwd=self.work_dir, env=env, stdout=log_file)
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
        answer = probe_driver(self.host, self.port, dialing=self._dialing)
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

    def exited(self) -> int | None:
        """The exit code once the JVM has exited (reaping it, so no zombie is left), else None."""
        with self._lock:
            if self.process is None:
                return None
            return self.process.poll()  # waitpid(WNOHANG): never blocks

    async def until_ready(self, timeout: float) -> None:
        """wait_ready for an event loop: each poll runs in a thread, cancellable between polls."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await asyncio.to_thread(self.poll_ready):
            if loop.time() >= deadline:
                self._ended(state="failed")
                raise self.failure(f"not ready after {timeout:.0f} s")
            await asyncio.sleep(POLL_INTERVAL)

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
            related = procs.related(process.pid, pgid) if process.poll() is None else []
            if procs.signal_group(pgid, signal.SIGTERM):
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "driver %s did not stop within %g s: SIGKILL", self.address, timeout
                    )
                    procs.signal_group(pgid, signal.SIGKILL)
                    try:
                        process.wait(30)
                    except subprocess.TimeoutExpired:
                        log.error("driver %s (pid %d) survived SIGKILL", self.address, pgid)
                # Members of the group that outlived the leader (the pid stays reserved as
                # a group id while any member lives, so this cannot hit a stranger).
                procs.signal_group(pgid, signal.SIGKILL)
            else:
                process.wait()
            # The daemon exits by itself once the JVM's pipe closes; give it a moment, then
            # SIGKILL whatever is left and wait until it is really gone.
            leftovers = procs.wait_gone(related, min(2.0, timeout))
            for proc in leftovers:
                log.debug("killing leftover process %d of driver %s", proc.pid, self.address)
                with suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            for proc in procs.wait_gone(leftovers, 5.0):
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


class LocalDrivers:
    """A set of local drivers started together and stopped together.

    Ports are chosen in __init__ (given `ports`, else free ones), so `addresses` and
    `work_dir` are known before start(). As a context manager, `__enter__` returns self
    *without* starting (call `start()` inside the block, so its failures surface there) and
    `__exit__` stops every driver. A `token` is required by every driver of the set.
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
        token: str | None = None,
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
        self._work_dir = _work_dir(work_dir)
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
                token=token,
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
        use_rich = wants_live(progress)
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
            with live_display(self._drivers, use_rich) as update:
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
                        log_state(driver, quiet)
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
