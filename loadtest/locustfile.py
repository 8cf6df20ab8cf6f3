"""Locust workloads for a Spark Connect router (or any Spark Connect endpoint).

Two users; name the one you want on the command line (Locust would otherwise mix both):

``RawCallsUser`` — raw Spark Connect calls at a high rate, for the router in front of the fake
drivers (``python -m loadtest.fake_driver``): Config, AnalyzePlan, ReleaseExecute, and
ExecutePlan streams whose size the fake driver takes from metadata, over many sessions (each user
keeps ``--raw-sessions`` and now and then releases one and starts a new one). Requests are
pre-serialized bytes; Locust reports every call and every whole stream (its bytes as the
response length).

``SparkSessionUser`` — the real pyspark client, for a router in front of real Spark drivers:
each user opens a session, sets confs, builds a temp view, runs small queries, now and then a
large ``toPandas()``, and now and then releases its session and opens a new one. pyspark runs
inside Locust's gevent-patched process (gRPC's gevent mode is switched on by
``loadtest.grpc_user``): checked with pyspark 4.3 and grpcio 1.85. Its work is CPU-bound in the
user's greenlet (Arrow decoding), so keep users per Locust process low and add processes
(``--processes N``) for more.

Headless runs (``--run-time`` bounds the run; ``--stop-timeout`` lets running tasks finish)::

    # fake drivers behind the router: ~1-2k calls/s per router worker on 2 cores
    locust -f loadtest/locustfile.py RawCallsUser --headless -u 50 -r 25 --run-time 1m \\
        --host 127.0.0.1:15002 --csv raw --only-summary

    # real Spark behind the router (e.g. `spark-router up`)
    locust -f loadtest/locustfile.py SparkSessionUser --headless -u 8 -r 2 --run-time 5m \\
        --host sc://127.0.0.1:15002 --spark-topandas-rows 1000000 --stop-timeout 60

Every option below is also an environment variable (``SPARK_LOAD_*``, see ``--help``).
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import gevent  # type: ignore[import-untyped]
from locust import User, constant, events, task
from locust.env import Environment

from loadtest.grpc_user import GrpcUser, measure
from loadtest.spark_calls import (
    ANALYZE,
    CONFIG,
    EXECUTE,
    RELEASE_EXECUTE,
    RELEASE_SESSION,
    SessionCalls,
    stream_metadata,
)

__all__ = ["RawCallsUser", "SparkSessionUser"]

_DEFAULTS: dict[str, Any] = {
    "raw_sessions": 4,
    "raw_session_header": False,
    "raw_stream_batches": 50,
    "raw_stream_batch_bytes": 160_000,
    "spark_topandas_rows": 1_000_000,
    "spark_think_seconds": 1.0,
}


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    """Options of these users, also as SPARK_LOAD_* environment variables."""
    parser.add_argument(
        "--raw-sessions",
        type=int,
        default=_DEFAULTS["raw_sessions"],
        env_var="SPARK_LOAD_RAW_SESSIONS",
        help="RawCallsUser: sessions each user keeps open (it renews them now and then)",
    )
    parser.add_argument(
        "--raw-session-header",
        action="store_true",
        default=_DEFAULTS["raw_session_header"],
        env_var="SPARK_LOAD_RAW_SESSION_HEADER",
        help="RawCallsUser: send x-spark-session-id (what a ring-hash proxy such as Envoy needs)",
    )
    parser.add_argument(
        "--raw-stream-batches",
        type=int,
        default=_DEFAULTS["raw_stream_batches"],
        env_var="SPARK_LOAD_RAW_STREAM_BATCHES",
        help="RawCallsUser: messages of a large ExecutePlan stream (fake drivers)",
    )
    parser.add_argument(
        "--raw-stream-batch-bytes",
        type=int,
        default=_DEFAULTS["raw_stream_batch_bytes"],
        env_var="SPARK_LOAD_RAW_STREAM_BATCH_BYTES",
        help="RawCallsUser: bytes per message of a large ExecutePlan stream",
    )
    parser.add_argument(
        "--spark-topandas-rows",
        type=int,
        default=_DEFAULTS["spark_topandas_rows"],
        env_var="SPARK_LOAD_TOPANDAS_ROWS",
        help="SparkSessionUser: rows of the occasional large toPandas()",
    )
    parser.add_argument(
        "--spark-think-seconds",
        type=float,
        default=_DEFAULTS["spark_think_seconds"],
        env_var="SPARK_LOAD_THINK_SECONDS",
        help="SparkSessionUser: mean pause between a user's actions",
    )


def _option(environment: Environment, name: str) -> Any:
    options = environment.parsed_options
    return getattr(options, name, _DEFAULTS[name]) if options is not None else _DEFAULTS[name]


class RawCallsUser(GrpcUser):
    """Raw Spark Connect calls as fast as the endpoint answers (no wait between tasks)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        """Open this user's sessions (they are placed on their first call)."""
        env = self.environment
        self.header = bool(_option(env, "raw_session_header"))
        self.large = stream_metadata(
            int(_option(env, "raw_stream_batches")), int(_option(env, "raw_stream_batch_bytes"))
        )
        self.small = stream_metadata(1, 1024)
        count = max(1, int(_option(env, "raw_sessions")))
        self.sessions = [SessionCalls(str(uuid.uuid4())) for _ in range(count)]

    def _pick(self) -> SessionCalls:
        return random.choice(self.sessions)

    def _md(self, session: SessionCalls, extra: tuple[tuple[str, str], ...] = ()) -> Any:
        return (*extra, *session.header) if self.header else extra or None

    @task(6)
    def config(self) -> None:
        """Config get_with_default (pyspark's spark.conf.get)."""
        s = self._pick()
        self.unary(CONFIG, s.config_get, metadata=self._md(s))

    @task(3)
    def analyze(self) -> None:
        """AnalyzePlan spark_version."""
        s = self._pick()
        self.unary(ANALYZE, s.analyze, metadata=self._md(s))

    @task(6)
    def release_execute(self) -> None:
        """ReleaseExecute: pyspark sends about one per result message."""
        s = self._pick()
        self.unary(RELEASE_EXECUTE, s.release_execute, metadata=self._md(s))

    @task(3)
    def execute_small(self) -> None:
        """A small query: ExecutePlan with one small batch, then its ReleaseExecute."""
        self._execute("ExecutePlan small", self.small)

    @task(1)
    def execute_large(self) -> None:
        """A large result: ExecutePlan of --raw-stream-batches messages, then ReleaseExecute."""
        self._execute("ExecutePlan large", self.large)

    def _execute(self, name: str, size: tuple[tuple[str, str], ...]) -> None:
        s = self._pick()
        operation = str(uuid.uuid4())
        self.stream(EXECUTE, s.execute(operation), name=name, metadata=self._md(s, size))
        self.unary(RELEASE_EXECUTE, s.release_execute_for(operation), metadata=self._md(s))

    @task(1)
    def renew_session(self) -> None:
        """Release one session (ReleaseSession) and start a new one in its place."""
        index = random.randrange(len(self.sessions))
        old = self.sessions[index]
        self.unary(RELEASE_SESSION, old.release_session, metadata=self._md(old))
        self.sessions[index] = SessionCalls(str(uuid.uuid4()))


class SparkSessionUser(User):
    """A notebook-like pyspark user through the router (see the module docstring)."""

    request_type = "pyspark"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        host = self.host or ""
        if "://" not in host:
            host = f"sc://{host}"
        self.url = host.replace("grpc://", "sc://", 1)
        self.rows = int(_option(environment, "spark_topandas_rows"))
        self.think = float(_option(environment, "spark_think_seconds"))
        self.spark: Any = None

    def wait_time(self) -> float:
        """A pause of 0.5 to 1.5 times --spark-think-seconds between actions."""
        return random.uniform(self.think / 2, self.think * 1.5)

    def _measure(self, name: str) -> Any:
        return measure(self.environment, self.request_type, name)

    def on_start(self) -> None:
        """Open a session and build its state."""
        self._open()

    def _open(self) -> None:
        from pyspark.sql import SparkSession

        with self._measure("open session") as m:
            self.spark = SparkSession.builder.remote(self.url).create()
            m.context["version"] = self.spark.version  # the first call reaches a driver
        if self.spark is None:
            return
        with self._measure("conf.set"):
            self.spark.conf.set("spark.sql.shuffle.partitions", "4")
            self.spark.conf.set("spark.sql.session.timeZone", "UTC")
        with self._measure("create temp view"):
            self.spark.range(10_000).selectExpr("id", "id % 10 AS k").createOrReplaceTempView(
                "events"
            )

    def _ready(self) -> bool:
        if self.spark is None:
            self._open()
        return self.spark is not None

    @task(10)
    def small_query(self) -> None:
        """GROUP BY over the session's temp view."""
        if self._ready():
            with self._measure("sql group by") as m:
                rows = self.spark.sql("SELECT k, count(*) AS n FROM events GROUP BY k").collect()
                m.response_length = len(rows)

    @task(5)
    def conf_get(self) -> None:
        """Read a conf the session set."""
        if self._ready():
            with self._measure("conf.get"):
                if self.spark.conf.get("spark.sql.shuffle.partitions") != "4":
                    raise AssertionError("the session lost its conf")

    @task(5)
    def count(self) -> None:
        """A filtered count."""
        if self._ready():
            with self._measure("range count"):
                self.spark.range(100_000).filter("id % 3 = 0").count()

    @task(1)
    def to_pandas(self) -> None:
        """The occasional large result (--spark-topandas-rows)."""
        if self._ready():
            with self._measure(f"toPandas {self.rows:,} rows") as m:
                df = self.spark.range(self.rows).selectExpr("id", "id * 2 AS b").toPandas()
                if len(df) != self.rows:
                    raise AssertionError(f"toPandas returned {len(df)} rows")
                m.response_length = int(df.memory_usage(index=False).sum())

    @task(1)
    def renew_session(self) -> None:
        """Release the session and open a new one."""
        self._close()
        self._open()

    def _close(self) -> None:
        spark, self.spark = self.spark, None
        if spark is None:
            return
        bound = gevent.Timeout(10, TimeoutError("spark.stop() took more than 10 s"))
        with self._measure("release session"), bound:
            spark.stop()

    def on_stop(self) -> None:
        """Release the session (bounded: 10 s)."""
        self._close()
