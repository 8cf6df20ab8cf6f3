"""A driver dies, the session lives on: real drivers, the real pyspark client, the router.

The two drivers are this module's own (tests kill them); each test revives what it killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pyspark.sql import SparkSession
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

from registry.models import Driver
from router.local import LocalDriver, LocalDrivers
from router.sessions.ring import Rings
from tests.helpers import free_port, spawn, stderr_of, stderr_text, stop, wait_until

PORT_CONF = "spark.connect.grpc.binding.port"

pytestmark = pytest.mark.own_drivers


@pytest.fixture(scope="module")
def victims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDrivers]:
    """Two drivers of this module's own."""
    drivers = LocalDrivers(2, work_dir=tmp_path_factory.mktemp("victims"), startup_timeout=240)
    with drivers:
        drivers.start(progress=False)
        yield drivers


@pytest.fixture
def drivers(victims: LocalDrivers) -> Iterator[LocalDrivers]:
    """The module's drivers, every one running again after the test."""
    yield victims
    for d in victims.drivers:
        if d.process is not None and d.process.poll() is None:
            os.kill(d.process.pid, signal.SIGCONT)  # a test may have hung it
            continue
        d.start()
        d.wait_ready(180)


class Router:
    """`spark-router serve` in front of the drivers, with fast probes."""

    def __init__(self, drivers: LocalDrivers, **env: str) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        args = ["-m", "router.cli", "serve", "--listen", f"127.0.0.1:{self.port}"]
        for address in drivers.addresses:
            args += ["--driver", address]
        settings = {
            "SPARK_ROUTER_PROBE_INTERVAL_SECONDS": "0.5",
            "SPARK_ROUTER_PROBE_TIMEOUT_SECONDS": "1",
            "SPARK_ROUTER_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            **env,
        }
        self.proc: subprocess.Popen[str] = spawn(args, env=settings)
        wait_until(self._listening, 30, "the router to listen")
        assert self.proc.poll() is None, stderr_of(self.proc)
        self.url = f"sc://127.0.0.1:{self.port}"

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0 or self.proc.poll() is not None

    def log(self) -> str:
        """What the router logged so far."""
        return stderr_text(self.proc)

    def metric(self, name: str) -> float:
        """One sample from the router's /metrics on its admin listener (0 when absent)."""
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        assert stop(self.proc) == 0


def _victim_of(drivers: LocalDrivers, spark: SparkSession) -> LocalDriver:
    port = int(spark.conf.get(PORT_CONF))
    return next(d for d in drivers.drivers if d.port == port)


def _kill(driver: LocalDriver) -> None:
    assert driver.process is not None
    os.kill(driver.process.pid, signal.SIGKILL)
    driver.process.wait(timeout=30)


def test_sigkill_of_the_driver_keeps_the_session(drivers: LocalDrivers, tmp_path: Path) -> None:
    router = Router(drivers)
    spark = SparkSession.builder.remote(router.url).create()
    try:
        spark.conf.set("spark.sql.shuffle.partitions", "7")
        spark.conf.set("spark.sql.session.timeZone", "Asia/Tokyo")
        spark.sql("CREATE OR REPLACE TEMP VIEW sql_view AS SELECT id * 3 AS v FROM range(10)")
        spark.range(5).selectExpr("id * 10 AS w").createOrReplaceTempView("df_view")
        spark.udf.register("plus_one", lambda x: x + 1, "long")
        # A UDF whose code travels as an artifact (AddArtifacts, client streaming).
        module = tmp_path / "router_e2e_helper.py"
        module.write_text("def times7(x):\n    return x * 7\n")
        spark.addArtifacts(str(module), pyfile=True)
        spark.udf.register("times7", lambda x: __import__("router_e2e_helper").times7(x), "long")
        query = (
            "SELECT (SELECT sum(v) FROM sql_view) AS a, sum(plus_one(w)) AS b, "
            "sum(times7(w)) AS c FROM df_view"
        )
        before = spark.sql(query).collect()
        victim = _victim_of(drivers, spark)
        _kill(victim)

        # The same SparkSession object carries on, on the other driver, with its state.
        assert spark.conf.get("spark.sql.shuffle.partitions") == "7"
        assert spark.conf.get("spark.sql.session.timeZone") == "Asia/Tokyo"
        assert spark.sql(query).collect() == before
        assert int(spark.conf.get(PORT_CONF)) != victim.port
    finally:
        spark.stop()
        router.stop()


def test_another_users_release_of_the_session_id_leaves_the_session_whole(
    drivers: LocalDrivers, redis_url: str
) -> None:
    """Without auth, a session is (user, id): mallory's release through another replica
    ends her own session, never alice's pin or journal, and alice's session still moves."""
    from registry import open_registry
    from registry.models import session_key

    a, b = (
        Router(drivers, SPARK_ROUTER_REGISTRY=redis_url),
        Router(drivers, SPARK_ROUTER_REGISTRY=redis_url),
    )
    spark = SparkSession.builder.remote(f"{a.url}/;user_id=alice").create()
    try:
        spark.conf.set("spark.sql.shuffle.partitions", "7")
        spark.sql("CREATE OR REPLACE TEMP VIEW alices AS SELECT id * 3 AS v FROM range(10)")
        before = spark.sql("SELECT sum(v) AS s FROM alices").collect()
        sid = spark.session_id
        key = session_key("alice", sid)

        async def pin_and_journal() -> tuple[object, object]:
            registry = open_registry(redis_url)
            try:
                return await registry.get_pin(key), await registry.journal(key)
            finally:
                await registry.close()

        pin, journal = asyncio.run(pin_and_journal())
        assert pin is not None and journal

        mallory = SparkSession.builder.remote(f"{b.url}/;user_id=mallory;session_id={sid}").create()
        assert mallory.sql("SELECT 1 AS one").collect()[0].one == 1
        assert not mallory.catalog.tableExists("alices")  # her own session on the driver
        mallory.stop()  # ReleaseSession with alice's session id, as mallory

        assert asyncio.run(pin_and_journal()) == (pin, journal)
        victim = _victim_of(drivers, spark)
        _kill(victim)
        assert spark.conf.get("spark.sql.shuffle.partitions") == "7"
        assert spark.sql("SELECT sum(v) AS s FROM alices").collect() == before
        assert int(spark.conf.get(PORT_CONF)) != victim.port
    finally:
        spark.stop()
        a.stop()
        b.stop()


def test_clones_keep_their_state_across_replicas_and_a_move(
    drivers: LocalDrivers, redis_url: str
) -> None:
    """Ten cloneSession()s: each lives on its source's driver, seen through either replica,
    moves with its own state when that driver dies, and stop() releases it there."""
    from pyspark.errors.exceptions.connect import SparkConnectGrpcException

    from registry import open_registry
    from registry.models import session_key

    a, b = (Router(drivers, SPARK_ROUTER_REGISTRY=redis_url) for _ in range(2))
    spark = SparkSession.builder.remote(f"{a.url}/;user_id=alice").create()
    clones: list[SparkSession] = []
    others: list[SparkSession] = []
    try:
        spark.conf.set("spark.sql.shuffle.partitions", "7")
        spark.sql("CREATE OR REPLACE TEMP VIEW src AS SELECT id AS v FROM range(4)")
        clones = [spark.cloneSession() for _ in range(10)]
        for i, clone in enumerate(clones):
            clone.conf.set("spark.sql.session.timeZone", f"Etc/GMT+{i}")
        port = spark.conf.get(PORT_CONF)
        for clone in clones:
            other = SparkSession.builder.remote(
                f"{b.url}/;user_id=alice;session_id={clone.session_id}"
            ).create()
            others.append(other)
            assert other.conf.get(PORT_CONF) == port  # on the source's driver
            assert other.conf.get("spark.sql.shuffle.partitions") == "7"
            assert other.sql("SELECT sum(v) AS s FROM src").collect()[0].s == 6
        victim = _victim_of(drivers, spark)
        _kill(victim)
        assert spark.conf.get("spark.sql.shuffle.partitions") == "7"
        for i, clone in enumerate(clones):
            assert clone.conf.get(PORT_CONF) != str(victim.port)
            assert clone.conf.get("spark.sql.session.timeZone") == f"Etc/GMT+{i}"
            assert clone.conf.get("spark.sql.shuffle.partitions") == "7"
            assert clone.sql("SELECT sum(v) AS s FROM src").collect()[0].s == 6
        gone = clones.pop()
        gone_id = gone.session_id
        gone.stop()

        async def pinned() -> bool:
            registry = open_registry(redis_url)
            try:
                return await registry.get_pin(session_key("alice", gone_id)) is not None
            finally:
                await registry.close()

        assert not asyncio.run(pinned())
        # Released on its driver: Spark refuses a released session id for good.
        again = SparkSession.builder.remote(f"{a.url}/;user_id=alice;session_id={gone_id}").create()
        with pytest.raises(SparkConnectGrpcException, match="SESSION_CLOSED"):
            again.sql("SELECT 1").collect()
        again.release_session_on_close = False
        again.stop()
    finally:
        for other in others:
            other.release_session_on_close = False  # the same sessions as the clones
            other.stop()
        for clone in clones:
            clone.stop()
        spark.stop()
        a.stop()
        b.stop()


def test_a_hung_driver_is_detected_and_the_session_moves(drivers: LocalDrivers) -> None:
    router = Router(drivers)  # probe budget: 3 failures x (0.5 s interval + 1 s timeout)
    spark = SparkSession.builder.remote(router.url).create()
    try:
        spark.conf.set("spark.sql.shuffle.partitions", "9")
        spark.range(3).createOrReplaceTempView("hung_view")
        victim = _victim_of(drivers, spark)
        assert victim.process is not None
        os.kill(victim.process.pid, signal.SIGSTOP)
        down = f"driver {victim.address} is down"
        wait_until(lambda: down in router.log(), 10, "the router to see the hung driver down")
        assert spark.conf.get("spark.sql.shuffle.partitions") == "9"
        assert spark.sql("SELECT count(*) AS n FROM hung_view").collect()[0]["n"] == 3
        assert int(spark.conf.get(PORT_CONF)) != victim.port
    finally:
        spark.stop()
        router.stop()


# Every partition's first row waits: the query sends nothing for a few seconds.
_STALLED = (
    "SELECT id, reflect('java.lang.Thread', 'sleep', CAST(IF(id % 250 = 0, {ms}, 0) AS BIGINT))"
    " AS pause FROM range(0, 1000, 1, 4)"
)


class _InFlight:
    """A query run in a thread, started once its result stream is open at the router."""

    def __init__(self, router: Router, run: Callable[[], object]) -> None:
        self._router = router
        self._result: list[object] = []
        self._thread = threading.Thread(target=lambda: self._result.append(run()), daemon=True)
        self._thread.start()
        wait_until(
            lambda: router.metric('spark_router_calls_in_flight{kind="stream"}') >= 1,
            30,
            "the query to reach its driver",
        )

    def result(self, timeout: float) -> Any:
        """What the query returned, within `timeout` s (AssertionError with the router log)."""
        self._thread.join(timeout)
        assert self._result and not self._thread.is_alive(), self._router.log()[-4000:]
        return self._result[0]


def test_a_driver_killed_during_a_sessions_first_to_pandas_keeps_the_session(
    drivers: LocalDrivers,
) -> None:
    """pyspark reattaches with the id its first request carried (none): the router's own."""
    router = Router(drivers)
    rings = Rings.build([Driver(a) for a in drivers.addresses])
    sid = str(uuid.uuid4())
    victim = next(d for d in drivers.drivers if d.address == rings.pick("default", sid))
    spark = SparkSession.builder.remote(f"{router.url}/;session_id={sid}").create()
    try:
        query = _InFlight(router, lambda: spark.sql(_STALLED.format(ms=3000)).toPandas())
        seen = spark.client._server_session_id
        _kill(victim)
        assert list(query.result(120)["id"]) == list(range(1000))
        # The session carries on, on the other driver, under the id its client knows.
        spark.conf.set("spark.sql.shuffle.partitions", "5")
        assert spark.conf.get("spark.sql.shuffle.partitions") == "5"
        assert int(spark.conf.get(PORT_CONF)) != victim.port
        if seen is not None:  # the client had seen an id before the kill: it keeps it
            assert spark.client._server_session_id == seen
    finally:
        spark.stop()
        router.stop()


def test_a_query_in_flight_on_a_hung_driver_is_cut_and_rerun_at_once(
    drivers: LocalDrivers,
) -> None:
    router = Router(drivers)  # probe budget: 3 failures x (0.5 s interval + 1 s timeout)
    spark = SparkSession.builder.remote(router.url).create()
    try:
        spark.conf.set("spark.sql.shuffle.partitions", "9")
        victim = _victim_of(drivers, spark)
        assert victim.process is not None
        query = _InFlight(router, lambda: spark.sql(_STALLED.format(ms=5000)).collect())
        os.kill(victim.process.pid, signal.SIGSTOP)
        # A hung driver keeps its connection open: only the router's cut ends the query's
        # wait (keepalive would take over a minute), then pyspark reattaches and it reruns.
        assert len(query.result(60)) == 1000
        assert spark.conf.get("spark.sql.shuffle.partitions") == "9"
        assert int(spark.conf.get(PORT_CONF)) != victim.port
    finally:
        spark.stop()
        router.stop()


class _Progress:
    """A pyspark progress handler that notes the first report of a query still running."""

    def __init__(self) -> None:
        self.seen = threading.Event()

    def __call__(self, stages: Any, inflight_tasks: int, operation_id: Any, done: bool) -> None:
        # Reports with done=True close every execution, spark.sql()'s own command included.
        if not done and inflight_tasks > 0:
            self.seen.set()


@pytest.mark.parametrize(("fault", "fetch"), [("SIGKILL", "collect"), ("SIGSTOP", "iterate")])
def test_a_query_that_reported_progress_runs_again_when_its_driver_is_lost(
    drivers: LocalDrivers, fault: str, fetch: str
) -> None:
    """Spark 4 reports progress every 2 s; pyspark will not rerun a query once it got any.

    The router runs it again on the new driver inside the same call: the client never sees
    the cut, where it would otherwise fail RESPONSE_ALREADY_RECEIVED.
    """
    router = Router(drivers)
    spark = SparkSession.builder.remote(router.url).create()
    try:
        spark.conf.set("spark.sql.shuffle.partitions", "9")
        progress = _Progress()
        spark.registerProgressHandler(progress)
        victim = _victim_of(drivers, spark)
        assert victim.process is not None
        df = spark.sql(_STALLED.format(ms=8000))
        # toLocalIterator asserts it gets one schema: the rerun's is not shown again.
        query = _InFlight(
            router, df.collect if fetch == "collect" else lambda: [*df.toLocalIterator()]
        )
        assert progress.seen.wait(30), "no progress message reached the client"
        if fault == "SIGKILL":
            _kill(victim)
        else:
            os.kill(victim.process.pid, signal.SIGSTOP)
        assert len(query.result(120)) == 1000
        assert router.metric("spark_router_executions_rerun_total") == 1, router.log()[-3000:]
        assert spark.conf.get("spark.sql.shuffle.partitions") == "9"
        assert int(spark.conf.get(PORT_CONF)) != victim.port
    finally:
        spark.stop()
        router.stop()


# Partitions 0-2 send their rows at once; partition 3 (ids from 750) first waits `ms`.
_HALF_SENT = (
    "SELECT id{extra}, reflect('java.lang.Thread', 'sleep', CAST(IF(id = 750, {ms}, 0) AS BIGINT))"
    " AS pause FROM range(0, 1000, 1, 4)"
)


class _Iterating:
    """`toLocalIterator()` in a thread: `first` is set once rows have reached the client."""

    def __init__(self, df: Any) -> None:
        self.first = threading.Event()
        self.rows: list[Any] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(df,), daemon=True)
        self._thread.start()

    def _run(self, df: Any) -> None:
        try:
            for row in df.toLocalIterator():
                self.rows.append(row)
                self.first.set()
        except Exception as exc:
            self.error = exc
        finally:
            self.first.set()

    def done(self, timeout: float) -> bool:
        """Whether the iteration ended (rows or error) within `timeout` s."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _lose(driver: LocalDriver, fault: str) -> None:
    if fault == "SIGKILL":
        _kill(driver)
    else:
        assert driver.process is not None
        os.kill(driver.process.pid, signal.SIGSTOP)


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_query_whose_first_results_went_out_finishes_when_its_driver_is_lost(
    drivers: LocalDrivers, fault: str
) -> None:
    """The client has rows of the first run: the second run's are compared, not resent."""
    router = Router(drivers)
    spark = SparkSession.builder.remote(router.url).create()
    try:
        spark.conf.set("spark.sql.shuffle.partitions", "9")
        victim = _victim_of(drivers, spark)
        query = _Iterating(spark.sql(_HALF_SENT.format(extra="", ms=8000)))
        assert query.first.wait(60) and query.rows, f"{query.error}\n{router.log()[-3000:]}"
        _lose(victim, fault)
        assert query.done(120), router.log()[-4000:]
        assert query.error is None, f"{query.error}\n{router.log()[-4000:]}"
        assert [row.id for row in query.rows] == list(range(1000))
        assert router.metric("spark_router_executions_rerun_total") == 1, router.log()[-3000:]
        assert re.search(r"cut off with \S+ after [1-9]\d* results", router.log())
        assert spark.conf.get("spark.sql.shuffle.partitions") == "9"
        assert int(spark.conf.get(PORT_CONF)) != victim.port
    finally:
        spark.stop()
        router.stop()


def test_a_query_whose_results_change_when_run_again_is_stopped_not_spliced(
    drivers: LocalDrivers,
) -> None:
    """rand() without a seed draws one per run: the rows of two runs must not be mixed."""
    router = Router(drivers)
    spark = SparkSession.builder.remote(router.url).create()
    try:
        victim = _victim_of(drivers, spark)
        query = _Iterating(spark.sql(_HALF_SENT.format(extra=", rand() AS r", ms=8000)))
        assert query.first.wait(60) and query.rows, f"{query.error}\n{router.log()[-3000:]}"
        _kill(victim)
        assert query.done(120), router.log()[-4000:]
        assert query.error is not None, f"{len(query.rows)} rows, no error"
        assert "its results change from run to run" in str(query.error), query.error
        assert len(query.rows) < 1000
        # The session itself carries on, on the other driver.
        assert spark.range(3).count() == 3
        assert int(spark.conf.get(PORT_CONF)) != victim.port
    finally:
        spark.stop()
        router.stop()


def test_twenty_sessions_of_a_dead_driver_each_move_once(drivers: LocalDrivers) -> None:
    router = Router(drivers)
    rings = Rings.build([Driver(a) for a in drivers.addresses])
    victim = drivers.drivers[0]
    ids = [
        sid
        for sid in (str(uuid.UUID(int=(77 << 64) + i, version=4)) for i in range(2000))
        if rings.pick("default", sid) == victim.address
    ][:20]
    sessions = [SparkSession.builder.remote(f"{router.url}/;session_id={s}").create() for s in ids]
    try:
        for i, spark in enumerate(sessions):
            spark.range(i + 1).createOrReplaceTempView("mine")
            assert int(spark.conf.get(PORT_CONF)) == victim.port
        _kill(victim)
        for i, spark in enumerate(sessions):
            try:
                assert spark.sql("SELECT count(*) AS n FROM mine").collect()[0]["n"] == i + 1
                assert int(spark.conf.get(PORT_CONF)) != victim.port
            except Exception as exc:
                raise AssertionError(f"session {ids[i]}: {exc}\n{router.log()[-6000:]}") from exc
        assert router.metric("spark_router_sessions_moved_total") == 20
        for sid in ids:  # each session moved exactly once
            assert len(re.findall(f"session {sid} moved from", router.log())) == 1
    finally:
        for spark in sessions:
            spark.stop()
        router.stop()


@pytest.mark.parametrize(
    "env",
    [{"SPARK_ROUTER_MIGRATION": "strict"}, {"SPARK_ROUTER_JOURNAL_MAX_BYTES": "10"}],
    ids=["strict", "journal over the cap"],
)
def test_strict_sessions_get_session_changed_never_an_empty_session(
    drivers: LocalDrivers, env: dict[str, str]
) -> None:
    router = Router(drivers, **env)
    spark = SparkSession.builder.remote(router.url).create()
    try:
        spark.conf.set("spark.sql.shuffle.partitions", "5")
        if "SPARK_ROUTER_JOURNAL_MAX_BYTES" in env:
            wait_until(lambda: "more than journal_max_bytes" in router.log(), 10, "the log")
            assert router.metric("spark_router_journal_overflows_total") == 1
        _kill(_victim_of(drivers, spark))
        # What Spark answers a continuing session on the new driver, seen on the wire.
        req = base_pb2.ConfigRequest(
            session_id=spark.client._session_id,
            client_observed_server_side_session_id=spark.client._server_session_id,
        )
        req.user_context.user_id = spark.client._user_id or ""
        req.operation.get.keys.append("spark.sql.shuffle.partitions")
        with (
            grpc.insecure_channel(f"127.0.0.1:{router.port}") as ch,
            pytest.raises(grpc.RpcError) as err,
        ):
            base_pb2_grpc.SparkConnectServiceStub(ch).Config(req, timeout=60)
        assert "SESSION_CHANGED" in (err.value.details() or "")
        # pyspark marks the session closed on SESSION_CHANGED: an error, never an empty session.
        with pytest.raises(Exception, match=r"SESSION_CHANGED|NO_ACTIVE_SESSION"):
            spark.conf.get("spark.sql.shuffle.partitions")
        assert spark.client.is_closed
    finally:
        with contextlib.suppress(Exception):  # the session is gone by design
            spark.stop()
        router.stop()


def _cli(*args: str) -> tuple[int, str]:
    proc = spawn(["-m", "router.cli", *args], capture_stderr=True)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out + err


def test_drain_move_idle_moves_a_live_session_with_its_state(
    drivers: LocalDrivers, redis_url: str
) -> None:
    router = Router(drivers, SPARK_ROUTER_REGISTRY=redis_url)
    spark = SparkSession.builder.remote(router.url).create()
    try:
        spark.conf.set("spark.sql.shuffle.partitions", "7")
        spark.sql("CREATE OR REPLACE TEMP VIEW sql_view AS SELECT id * 3 AS v FROM range(10)")
        spark.range(5).selectExpr("id * 10 AS w").createOrReplaceTempView("df_view")
        spark.udf.register("plus_one", lambda x: x + 1, "long")
        query = "SELECT (SELECT sum(v) FROM sql_view) AS a, sum(plus_one(w)) AS b FROM df_view"
        before = spark.sql(query).collect()
        home = _victim_of(drivers, spark)

        code, out = _cli("drain", home.address, "--registry", redis_url, "--move-idle")
        assert code == 0 and "its 1 session(s) move with their state" in out, out
        # The router hears of the mark by pub/sub; the session's next call moves it.
        wait_until(
            lambda: int(spark.conf.get(PORT_CONF)) != home.port,
            15,
            "the session to move off the drained driver",
        )
        assert spark.conf.get("spark.sql.shuffle.partitions") == "7"
        assert spark.sql(query).collect() == before
        assert "(drain)" in router.log()

        code, out = _cli("sessions", "--registry", redis_url, "--driver", home.address)
        assert code == 0 and out.splitlines() == ["SESSION  DRIVER  POOL  OWNER  CREATED  MOVES"]
        code, out = _cli(
            "drain", home.address, "--registry", redis_url, "--move-idle", "--wait", "5"
        )
        assert code == 0 and "its 0 session(s)" in out, out
    finally:
        spark.stop()
        router.stop()


def test_a_session_moved_back_to_a_driver_that_released_it_goes_on_under_a_new_id_there(
    drivers: LocalDrivers, redis_url: str
) -> None:
    """Spark refuses a released session id for the rest of a driver's life (SESSION_CLOSED).

    Drained off its first driver (which releases it) and then losing the second, a session
    has only the first left: the router opens it there under an id of its own, replays its
    state, and the client keeps its session id and server-side id.
    """
    router = Router(drivers, SPARK_ROUTER_REGISTRY=redis_url)
    spark = SparkSession.builder.remote(router.url).create()
    try:
        spark.conf.set("spark.sql.shuffle.partitions", "7")
        spark.sql("CREATE OR REPLACE TEMP VIEW sql_view AS SELECT id * 3 AS v FROM range(10)")
        home = _victim_of(drivers, spark)
        seen = spark.client._server_session_id
        code, out = _cli("drain", home.address, "--registry", redis_url, "--move-idle")
        assert code == 0, out
        wait_until(
            lambda: int(spark.conf.get(PORT_CONF)) != home.port,
            15,
            "the session to move off the drained driver",
        )
        assert _cli("drain", home.address, "--registry", redis_url, "--undo")[0] == 0
        wait_until(
            lambda: f"{home.address} (default, active)" in router.log().rsplit("membership:")[-1],
            15,
            "the router to hear of the undrain",
        )
        second = _victim_of(drivers, spark)
        _kill(second)
        assert spark.conf.get("spark.sql.shuffle.partitions") == "7"
        assert spark.sql("SELECT sum(v) AS s FROM sql_view").collect()[0].s == 135
        assert int(spark.conf.get(PORT_CONF)) == home.port
        assert spark.client._server_session_id == seen
        log = router.log()
        assert f"moved from {second.address} to {home.address} (driver down)" in log, log[-3000:]
        assert "SESSION_CLOSED" not in log, log[-3000:]
    finally:
        spark.stop()
        router.stop()
