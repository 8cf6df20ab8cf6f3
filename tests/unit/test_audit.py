"""The audit trail (router/admit/audit.py): events, redaction, plans, sinks, a full queue."""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import inspect
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from pyspark.sql.connect.proto import base_pb2, relations_pb2

from router.admit import audit
from router.admit.audit import (
    REDACTED,
    AuditLog,
    AuditSettings,
    AuditUnavailable,
    PlanInfo,
    PrometheusAuditMetrics,
    Redaction,
    read_plan,
    redact,
    render_sql,
)
from router.config import ConfigError
from router.errors import RouterError, to_status
from tests.helpers import eventually

NOW = 1738324800.1239  # 2025-01-31T12:00:00.123Z
STAMP = "2025-01-31T12:00:00.123Z"
WAIT = 5.0
LOGGER = "router.admit.audit"


class Metrics:
    """AuditMetrics that remembers every report."""

    def __init__(self) -> None:
        self.depths: list[int] = []
        self.drops: Counter[str] = Counter()
        self.refusals = 0
        self.errors: Counter[str] = Counter()
        self.lines: Counter[str] = Counter()

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def dropped(self, reason: str, count: int) -> None:
        self.drops[reason] += count

    def refused(self) -> None:
        self.refusals += 1

    def write_error(self, sink: str) -> None:
        self.errors[sink] += 1

    def written(self, sink: str, count: int) -> None:
        self.lines[sink] += count


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def numbered(i: int) -> dict[str, Any]:
    return audit.session_released(user="u", session=f"s{i}", pool="p", driver="d:1", now=NOW)


async def flushed(log: AuditLog) -> None:
    await asyncio.wait_for(log.flush(), WAIT)


@pytest.fixture
async def opened() -> AsyncIterator[Callable[..., AuditLog]]:
    """Makes AuditLogs (not started) and closes every one after the test."""
    logs: list[AuditLog] = []

    def make(metrics: Metrics | None = None, **kwargs: Any) -> AuditLog:
        log = AuditLog(AuditSettings(**kwargs), metrics)
        logs.append(log)
        return log

    yield make
    for log in logs:
        await log.close(timeout=WAIT)


# --- events, field by field


def test_time_is_rfc3339_utc_with_milliseconds() -> None:
    assert audit.rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert audit.rfc3339(NOW) == STAMP
    assert audit.rfc3339(NOW + 1.5) == "2025-01-31T12:00:01.623Z"


async def test_each_event_kind_is_one_line_with_its_fields(
    tmp_path: Path, opened: Callable[..., AuditLog]
) -> None:
    path = tmp_path / "audit.log"
    log = opened(file=path, replica="r1")
    sql = "SELECT * FROM sales"
    events = [
        audit.session_created(
            user="bob",
            groups=["etl", "analysts", "etl"],
            session="s-1",
            pool="bi",
            driver="d1:15002",
            conf={"spark.sql.shuffle.partitions": "8"},
            now=NOW,
        ),
        audit.session_released(user="bob", session="s-1", pool="bi", driver="d1:15002", now=NOW),
        audit.session_moved(
            user="bob",
            session="s-1",
            pool="bi",
            from_driver="d1:15002",
            driver="d2:15002",
            reason="driver_down",
            now=NOW,
        ),
        audit.session_expired(user=None, session="s-2", pool="bi", driver="d2:15002", now=NOW),
        audit.execution(
            user="bob",
            groups=["analysts"],
            session="s-1",
            operation="op-1",
            pool="bi",
            driver="d2:15002",
            plan=PlanInfo("sql", sql),
            status=grpc.StatusCode.OK,
            duration_ms=12.34567,
            rows=3,
            bytes_returned=2048,
            now=NOW,
        ),
        audit.denied(
            "policy",
            "pool",
            user="eve",
            groups=["guests"],
            status=grpc.StatusCode.PERMISSION_DENIED,
            message="user 'eve' may not use pool 'etl'",
            session="s-9",
            method="ExecutePlan",
            pool="etl",
            peer="ipv4:10.0.0.9:5555",
            now=NOW,
        ),
        audit.admin_action(
            "root", "drain", "d1:15002", "ok", groups=["platform"], params={"wait": "30"}, now=NOW
        ),
    ]
    for event in events:
        assert log.offer(event)
    await log.start()
    await flushed(log)
    created, released, moved, expired, execution, denial, admin = lines_of(path)
    base = {"time": STAMP, "replica": "r1"}
    assert created == base | {
        "event": "session.created",
        "user": "bob",
        "groups": ["analysts", "etl"],
        "session": "s-1",
        "pool": "bi",
        "driver": "d1:15002",
        "conf": {"spark.sql.shuffle.partitions": "8"},
    }
    assert released == base | {
        "event": "session.released",
        "user": "bob",
        "session": "s-1",
        "pool": "bi",
        "driver": "d1:15002",
    }
    assert moved == base | {
        "event": "session.moved",
        "user": "bob",
        "session": "s-1",
        "pool": "bi",
        "from_driver": "d1:15002",
        "driver": "d2:15002",
        "reason": "driver_down",
    }
    assert expired == base | {
        "event": "session.expired",
        "user": None,
        "session": "s-2",
        "pool": "bi",
        "driver": "d2:15002",
        "reason": "idle",
    }
    assert execution == base | {
        "event": "execution",
        "user": "bob",
        "groups": ["analysts"],
        "session": "s-1",
        "operation": "op-1",
        "pool": "bi",
        "driver": "d2:15002",
        "plan": "sql",
        "sql": None,  # sha256 is the default
        "sql_sha256": hashlib.sha256(sql.encode()).hexdigest(),
        "status": "OK",
        "duration_ms": 12.346,
        "rows": 3,
        "bytes": 2048,
    }
    assert denial == base | {
        "event": "denied",
        "kind": "policy",
        "reason": "pool",
        "message": "user 'eve' may not use pool 'etl'",
        "status": "PERMISSION_DENIED",
        "method": "ExecutePlan",
        "user": "eve",
        "groups": ["guests"],
        "session": "s-9",
        "pool": "etl",
        "peer": "ipv4:10.0.0.9:5555",
    }
    assert admin == base | {
        "event": "admin",
        "admin": "root",
        "groups": ["platform"],
        "action": "drain",
        "target": "d1:15002",
        "result": "ok",
        "params": {"wait": "30"},
    }
    # One compact object per line, keys sorted.
    first = path.read_text(encoding="utf-8").splitlines()[1]
    assert first == json.dumps(released, separators=(",", ":"), sort_keys=True)


def test_a_denial_of_an_unknown_kind_is_a_bug_caught_at_once() -> None:
    with pytest.raises(ValueError, match="denial kind"):
        audit.denied("vibes", "x", user="u", status="PERMISSION_DENIED")


def test_strings_and_lists_are_bounded() -> None:
    long = "u" * 5000
    event = audit.execution(
        user=long,
        groups=[f"g{i:04d}" for i in range(300)],
        session="s",
        pool=None,
        driver=None,
        status="OK",
        duration_ms=None,
        now=NOW,
    )
    assert event["user"] == "u" * audit.MAX_FIELD_CHARS + "…[cut 3976 chars]"
    assert len(event["groups"]) == audit.MAX_ITEMS + 1
    assert event["groups"][-1] == "…[44 more]"
    conf = redact({f"k{i}": "v" for i in range(300)}, ("nothing",))
    assert len(conf) == audit.MAX_ITEMS + 1 and conf["…"] == "[44 more]"


def test_the_builders_take_no_credentials() -> None:
    builders: list[Callable[..., dict[str, Any]]] = [
        audit.session_created,
        audit.session_released,
        audit.session_moved,
        audit.session_expired,
        audit.execution,
        audit.denied,
        audit.admin_action,
    ]
    for builder in builders:
        for name in inspect.signature(builder).parameters:
            for pattern in ("*token*", "*password*", "*secret*", "*key*", "*credential*"):
                assert not fnmatch.fnmatch(name, pattern), f"{builder.__name__}({name})"


# --- redaction


def test_conf_keys_that_look_secret_are_redacted_case_insensitively() -> None:
    conf = {
        "spark.hadoop.fs.s3a.secret.key": "AKIA-SECRET",
        "spark.hadoop.fs.s3a.access.KEY": "AKIA-ACCESS",
        "javax.jdo.option.ConnectionPassword": "hunter2",
        "spark.connect.authenticate.Token": "tok",
        "spark.sql.shuffle.partitions": "8",
        "spark.app.name": "etl",
    }
    assert redact(conf) == {
        "spark.hadoop.fs.s3a.secret.key": REDACTED,
        "spark.hadoop.fs.s3a.access.KEY": REDACTED,
        "javax.jdo.option.ConnectionPassword": REDACTED,
        "spark.connect.authenticate.Token": REDACTED,
        "spark.sql.shuffle.partitions": "8",
        "spark.app.name": "etl",
    }
    # Configured patterns replace the defaults.
    keys = ("spark.app.*", "*credential*")
    assert redact({"spark.app.name": "x", "my.Credentials": "c", "a.password": "p"}, keys) == {
        "spark.app.name": REDACTED,
        "my.Credentials": REDACTED,
        "a.password": "p",
    }
    assert audit.is_secret_key("A.PASSWORD.b") and not audit.is_secret_key("spark.master")


def test_sql_modes_text_sha256_off_and_the_length_bound() -> None:
    sql = "SELECT name FROM people WHERE id = 7"
    assert render_sql(sql, Redaction(sql="text")) == (sql, None)
    assert render_sql(sql, Redaction(sql="sha256")) == (
        None,
        hashlib.sha256(sql.encode()).hexdigest(),
    )
    assert render_sql(sql, Redaction(sql="off")) == (None, None)
    assert render_sql(None, Redaction(sql="text")) == (None, None)
    long = "SELECT " + "x" * 100
    shown, digest = render_sql(long, Redaction(sql="text", sql_max_chars=10))
    assert shown == "SELECT xxx…[cut 97 chars]" and digest is None
    # The hash is of the whole text, not of the bound.
    _, whole = render_sql(long, Redaction(sql="sha256", sql_max_chars=10))
    assert whole == hashlib.sha256(long.encode()).hexdigest()


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "SET spark.hadoop.fs.s3a.secret.key=abc123",
            "SET spark.hadoop.fs.s3a.secret.key=[redacted]",
        ),
        ("  -- go\nset `my.token` = abc123", "  -- go\nset `my.token` =[redacted]"),
        ("SET spark.sql.shuffle.partitions=8", "SET spark.sql.shuffle.partitions=8"),
        (
            "CREATE TABLE t USING jdbc OPTIONS (user 'bob', password 'abc123')",
            f"CREATE TABLE t USING jdbc OPTIONS (user 'bob', password '{REDACTED}')",
        ),
        (
            "CREATE TABLE t OPTIONS ('fs.s3a.secret.key' = \"abc123\")",
            f"CREATE TABLE t OPTIONS ('fs.s3a.secret.key' = '{REDACTED}')",
        ),
        (
            "SELECT * FROM t WHERE api_key = 'abc123'",
            f"SELECT * FROM t WHERE api_key = '{REDACTED}'",
        ),
        ("SELECT 'hello' AS greeting", "SELECT 'hello' AS greeting"),
        (
            "CREATE TABLE t OPTIONS (`db.Password` = 'abc123', `db.user` 'bob')",
            f"CREATE TABLE t OPTIONS (`db.Password` = '{REDACTED}', `db.user` 'bob')",
        ),
        ("SELECT * FROM t WHERE a = 'abc123' AND b LIKE '%key%'", None),
    ],
)
def test_text_mode_blanks_values_after_secret_looking_names(sql: str, expected: str | None) -> None:
    assert render_sql(sql, Redaction(sql="text")) == (expected or sql, None)


def test_text_mode_blanks_a_secret_literal_cut_by_the_bound() -> None:
    sql = "CREATE TABLE t OPTIONS (password 'abcdefghijklmnop')"
    shown, _ = render_sql(sql, Redaction(sql="text", sql_max_chars=40))
    assert shown is not None and "abc" not in shown
    assert shown.startswith(f"CREATE TABLE t OPTIONS (password '{REDACTED}'…[cut ")


def test_bad_settings_fail_with_one_line_each() -> None:
    with pytest.raises(ConfigError, match="audit_sql must be") as err:
        Redaction(sql="plain", sql_max_chars=0)  # type: ignore[arg-type]
    assert len(str(err.value).splitlines()) == 2
    with pytest.raises(ConfigError, match="audit_when_full must be drop or refuse"):
        AuditSettings(when_full="block")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="audit_queue_size"):
        AuditSettings(queue_size=0)
    assert not AuditSettings().enabled and AuditSettings(stdout=True).enabled


# --- plan kind and SQL from real ExecutePlanRequest bytes


def request(build: Callable[[base_pb2.Plan], None]) -> bytes:
    req = base_pb2.ExecutePlanRequest(session_id="0b5f6a0e-0000-4000-8000-000000000001")
    req.user_context.user_id = "bob"
    req.operation_id = "9c0ffee0-0000-4000-8000-000000000002"
    build(req.plan)
    req.client_type = "_SPARK_CONNECT_PYTHON"
    data: bytes = req.SerializeToString()
    return data


def test_plan_kind_and_sql_of_a_sql_relation() -> None:
    def build(plan: base_pb2.Plan) -> None:
        plan.root.common.plan_id = 1
        plan.root.sql.query = "SELECT 1 AS one"

    assert read_plan(request(build)) == PlanInfo("sql", "SELECT 1 AS one")


def test_plan_kind_and_sql_of_a_sql_command_new_and_old_form() -> None:
    def new(plan: base_pb2.Plan) -> None:
        plan.command.sql_command.input.sql.query = "CREATE TEMP VIEW v AS SELECT 1"

    def old(plan: base_pb2.Plan) -> None:
        plan.command.sql_command.sql = "SHOW TABLES"

    assert read_plan(request(new)) == PlanInfo("sql_command", "CREATE TEMP VIEW v AS SELECT 1")
    assert read_plan(request(old)) == PlanInfo("sql_command", "SHOW TABLES")


def test_plan_kind_of_read_and_project_and_sql_below_a_chain() -> None:
    def read(plan: base_pb2.Plan) -> None:
        plan.root.read.named_table.unparsed_identifier = "db.sales"

    def project(plan: base_pb2.Plan) -> None:
        p = plan.root.project
        p.input.read.named_table.unparsed_identifier = "db.sales"
        p.expressions.add().unresolved_attribute.unparsed_identifier = "amount"

    def project_over_sql(plan: base_pb2.Plan) -> None:
        limit = plan.root.limit
        limit.limit = 10
        limit.input.project.input.sql.query = "SELECT * FROM sales"
        limit.input.project.expressions.add().unresolved_attribute.unparsed_identifier = "a"

    def with_relations(plan: base_pb2.Plan) -> None:
        wr = plan.root.with_relations
        wr.root.sql.query = "SELECT * FROM {df}"
        wr.references.add().range.end = 10

    assert read_plan(request(read)) == PlanInfo("read", None)
    assert read_plan(request(project)) == PlanInfo("project", None)
    assert read_plan(request(project_over_sql)) == PlanInfo("limit", "SELECT * FROM sales")
    assert read_plan(request(with_relations)) == PlanInfo("with_relations", "SELECT * FROM {df}")


def test_plan_kind_of_commands_and_the_sql_they_write() -> None:
    def view(plan: base_pb2.Plan) -> None:
        cmd = plan.command.create_dataframe_view
        cmd.name, cmd.replace = "v", True
        cmd.input.range.end = 5

    def write(plan: base_pb2.Plan) -> None:
        op = plan.command.write_operation
        op.input.sql.query = "SELECT * FROM staging"
        op.table.table_name = "prod.t"

    def compressed(plan: base_pb2.Plan) -> None:
        plan.compressed_operation.data = b"\x28\xb5\x2f\xfd"

    assert read_plan(request(view)) == PlanInfo("create_dataframe_view", None)
    assert read_plan(request(write)) == PlanInfo("write_operation", "SELECT * FROM staging")
    assert read_plan(request(compressed)) == PlanInfo("compressed", None)


def test_a_plan_deeper_than_protobufs_parse_limit_is_still_read() -> None:
    relation = relations_pb2.Relation()
    relation.sql.query = "SELECT 1"
    for _ in range(100):
        outer = relations_pb2.Relation()
        outer.project.input.CopyFrom(relation)
        relation = outer
    req = base_pb2.ExecutePlanRequest()
    req.plan.root.CopyFrom(relation)
    data = req.SerializeToString()
    with pytest.raises(Exception, match="MaxDepth"):
        base_pb2.ExecutePlanRequest().ParseFromString(data)
    assert read_plan(data) == PlanInfo("project", "SELECT 1")


def test_no_plan_and_malformed_bytes_give_nothing_and_never_raise() -> None:
    assert read_plan(base_pb2.ExecutePlanRequest(session_id="s").SerializeToString()) == PlanInfo(
        None, None
    )
    good = request(lambda plan: setattr(plan.root.sql, "query", "SELECT 1"))
    for bad in (b"\xff\xff\xff", good[:-3], b"\x1a\x10abc", b"\x0b\x0c"):
        assert read_plan(bad) in (PlanInfo(None, None), PlanInfo("sql", None))
    assert read_plan(good[:-3]) == PlanInfo(None, None)  # the plan's length runs past the end


# --- the file sink: rotation


async def test_a_renamed_file_keeps_its_lines_and_new_ones_go_to_a_new_file(
    tmp_path: Path, opened: Callable[..., AuditLog]
) -> None:
    path = tmp_path / "audit.log"
    log = opened(file=path)
    await log.start()
    for i in range(3):
        log.offer(numbered(i))
    await flushed(log)
    path.rename(tmp_path / "audit.log.1")  # logrotate's default (create) mode
    for i in range(3, 5):
        log.offer(numbered(i))
    await flushed(log)
    assert [e["session"] for e in lines_of(tmp_path / "audit.log.1")] == ["s0", "s1", "s2"]
    assert [e["session"] for e in lines_of(path)] == ["s3", "s4"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o640 & ~_umask())


async def test_a_deleted_file_is_created_again(
    tmp_path: Path, opened: Callable[..., AuditLog]
) -> None:
    path = tmp_path / "audit.log"
    log = opened(file=path)
    await log.start()
    log.offer(numbered(0))
    await flushed(log)
    path.unlink()
    log.offer(numbered(1))
    await flushed(log)
    assert [e["session"] for e in lines_of(path)] == ["s1"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- a full queue


async def test_drop_mode_counts_drops_and_never_waits(
    tmp_path: Path, opened: Callable[..., AuditLog]
) -> None:
    metrics = Metrics()
    path = tmp_path / "audit.log"
    log = opened(metrics, file=path, queue_size=3, when_full="drop")
    # Not started: nothing drains, so the fourth offer finds the queue full.
    assert [log.offer(numbered(i)) for i in range(5)] == [True, True, True, False, False]
    assert metrics.drops == Counter({"queue_full": 2})
    assert log.depth == 3 and metrics.depths == [1, 2, 3]
    assert log.accepting  # drop mode never refuses a call
    log.check()
    await log.start()
    await flushed(log)
    assert [e["session"] for e in lines_of(path)] == ["s0", "s1", "s2"]
    assert metrics.depths[-1] == 0 and metrics.lines == Counter({"file": 3})
    assert log.offer(numbered(9))  # room again


async def test_refuse_mode_refuses_new_calls_until_the_writer_catches_up(
    tmp_path: Path, opened: Callable[..., AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    path = tmp_path / "audit.log"
    log = opened(metrics, file=path, queue_size=2, when_full="refuse")
    assert log.offer(numbered(0)) and log.offer(numbered(1))
    assert not log.accepting
    with caplog.at_level(logging.WARNING, LOGGER):
        for _ in range(2):
            with pytest.raises(AuditUnavailable) as err:
                log.check()
    assert isinstance(err.value, RouterError)
    assert to_status(err.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert metrics.refusals == 2
    assert [r.getMessage() for r in caplog.records].count(
        "audit queue full (2 records waiting, audit_when_full: refuse): refusing calls until "
        "the audit catches up"
    ) == 1
    # Records of calls let in before are still taken, up to twice the queue size.
    assert log.offer(numbered(2)) and log.offer(numbered(3))
    assert not log.offer(numbered(4))
    assert metrics.drops == Counter({"queue_full": 1})
    await log.start()
    await flushed(log)
    assert log.accepting
    log.check()
    assert [e["session"] for e in lines_of(path)] == ["s0", "s1", "s2", "s3"]


async def test_refuse_mode_keeps_a_failed_batch_and_writes_it_when_the_sink_is_back(
    tmp_path: Path, opened: Callable[..., AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    path = tmp_path / "audit.log"
    path.mkdir()  # a directory where the file should be: every open fails
    log = opened(metrics, file=path, queue_size=2, when_full="refuse", retry_seconds=0.01)
    await log.start()
    with caplog.at_level(logging.INFO, LOGGER):
        log.offer(numbered(0))
        log.offer(numbered(1))
        await eventually(lambda: metrics.errors["file"] >= 3, "retries of the failed batch")
        assert not log.accepting  # the batch in hand still counts: calls are refused
        path.rmdir()
        await eventually(lambda: log.depth == 0, "the retained batch written")
    assert log.accepting
    assert [e["session"] for e in lines_of(path)] == ["s0", "s1"]
    assert metrics.drops == Counter()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("write failed" in m for m in messages) == 1
    assert "audit file writes again" in messages


# --- close and write errors


async def test_close_drains_what_is_queued_and_then_refuses_offers(
    tmp_path: Path, opened: Callable[..., AuditLog]
) -> None:
    metrics = Metrics()
    path = tmp_path / "audit.log"
    log = opened(metrics, file=path, batch_size=7)
    for i in range(50):
        log.offer(numbered(i))
    assert await log.close() == 0  # never started: close still drains
    assert [e["session"] for e in lines_of(path)] == [f"s{i}" for i in range(50)]
    assert not log.offer(numbered(99)) and not log.accepting
    assert metrics.drops == Counter({"shutdown": 1})


async def test_close_is_bounded_by_its_timeout_and_counts_what_is_lost(
    tmp_path: Path, opened: Callable[..., AuditLog]
) -> None:
    metrics = Metrics()
    path = tmp_path / "audit.log"
    path.mkdir()
    log = opened(metrics, file=path, when_full="refuse", retry_seconds=0.01, batch_size=2)
    for i in range(5):
        log.offer(numbered(i))
    await log.start()
    await eventually(lambda: metrics.errors["file"] >= 1, "a failed write")
    lost = await asyncio.wait_for(log.close(timeout=0.1), WAIT)
    assert lost == 5 and metrics.drops == Counter({"shutdown": 5})
    assert log.depth == 0


async def test_a_write_error_is_counted_logged_once_and_the_writer_goes_on(
    tmp_path: Path,
    opened: Callable[..., AuditLog],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    metrics = Metrics()
    path = tmp_path / "audit.log"
    path.mkdir()
    log = opened(metrics, file=path, stdout=True)
    await log.start()
    with caplog.at_level(logging.INFO, LOGGER):
        for i in range(3):
            log.offer(numbered(i))
            await flushed(log)  # one batch each
    assert metrics.errors == Counter({"file": 3})
    assert metrics.drops == Counter({"write_error": 3})
    failures = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(failures) == 1 and "Is a directory" in failures[0].getMessage()
    assert failures[0].levelno == logging.ERROR
    # The other sink was not held up.
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["session"] for e in out] == ["s0", "s1", "s2"]
    assert metrics.lines == Counter({"stdout": 3})


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_a_full_disk_is_a_write_error_too(
    opened: Callable[..., AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    log = opened(metrics, file=Path("/dev/full"))
    await log.start()
    with caplog.at_level(logging.ERROR, LOGGER):
        for i in range(2):
            log.offer(numbered(i))
            await flushed(log)
    assert metrics.errors == Counter({"file": 2})
    failures = [r.getMessage() for r in caplog.records if "write failed" in r.getMessage()]
    assert len(failures) == 1 and "No space left on device" in failures[0]


async def test_a_line_torn_by_a_partial_write_is_ended_before_the_next(
    tmp_path: Path, opened: Callable[..., AuditLog]
) -> None:
    class HalfThenFine(audit._Sink):
        name = "file"

        def __init__(self) -> None:
            super().__init__()
            self.data = b""
            self.calls = 0

        def write(self, data: bytes) -> None:
            self.calls += 1
            if self.calls == 1:
                self.data += data[:10]
                raise audit._WriteFailed(10, OSError(28, "No space left on device"))
            self.data += data

    sink = HalfThenFine()
    log = opened(file=tmp_path / "unused")
    log._sinks = [sink]
    await log.start()
    log.offer(numbered(0))
    await flushed(log)
    log.offer(numbered(1))
    await flushed(log)
    torn, whole = sink.data.decode().split("\n")[:2]
    assert len(torn) == 10 and json.loads(whole)["session"] == "s1"


async def test_a_disabled_log_takes_everything_and_writes_nothing(
    opened: Callable[..., AuditLog],
) -> None:
    log = opened()
    assert not log.enabled and log.offer(numbered(0)) and log.accepting
    await log.start()
    assert log.depth == 0


# --- secrets never appear


async def test_no_secret_fed_in_reaches_any_output(
    tmp_path: Path, opened: Callable[..., AuditLog], capsys: pytest.CaptureFixture[str]
) -> None:
    secrets = ["AKIA-9f8e7d", "hunter2-pw", "tok-0c1d2e", "jdbc-pass-77"]
    conf = {
        "spark.hadoop.fs.s3a.secret.key": secrets[0],
        "db.password": secrets[1],
        "spark.connect.authenticate.token": secrets[2],
        "spark.app.name": "nightly",
    }
    sql = (
        f"CREATE TABLE t USING jdbc OPTIONS (url 'jdbc:x', password '{secrets[3]}') "
        f"AS SELECT '{secrets[0]}' AS k"
    )
    path = tmp_path / "audit.log"
    log = opened(file=path, stdout=True)  # sha256, the default
    plan = read_plan(request(lambda p: setattr(p.command.sql_command.input.sql, "query", sql)))
    assert plan.sql == sql
    for event in (
        audit.session_created(user="bob", session="s", pool="p", driver="d", conf=conf),
        audit.execution(
            user="bob", session="s", pool="p", driver="d", status="OK", duration_ms=1, plan=plan
        ),
        audit.admin_action("root", "release", "s", "ok", params=conf),
    ):
        log.offer(event)
    text_log = opened(file=tmp_path / "text.log", redaction=Redaction(sql="text"))
    set_plan = read_plan(
        request(
            lambda p: setattr(p.command.sql_command.input.sql, "query", f"SET a.token={secrets[2]}")
        )
    )
    text_log.offer(
        audit.execution(
            user="bob",
            session="s",
            pool="p",
            driver="d",
            status="OK",
            duration_ms=1,
            plan=set_plan,
            redaction=text_log.redaction,
        )
    )
    await log.start()
    await text_log.start()
    await flushed(log)
    await flushed(text_log)
    outputs = {
        "file": path.read_text(encoding="utf-8"),
        "stdout": capsys.readouterr().out,
        "text": (tmp_path / "text.log").read_text(encoding="utf-8"),
    }
    assert outputs["file"].count("\n") == 3 and outputs["stdout"] == outputs["file"]
    assert "SET a.token=[redacted]" in outputs["text"]
    for where, text in outputs.items():
        for secret in secrets:
            assert secret not in text, f"{secret} in {where}"
    assert REDACTED in outputs["file"] and "nightly" in outputs["file"]


# --- metrics on Prometheus


async def test_prometheus_metrics_follow_the_log(
    tmp_path: Path, opened: Callable[..., AuditLog]
) -> None:
    r = CollectorRegistry()
    metrics = PrometheusAuditMetrics(
        depth=PromGauge("audit_queue_depth", "d", registry=r),
        drops=PromCounter("audit_dropped", "d", ["reason"], registry=r),
        refusals=PromCounter("audit_refused", "r", registry=r),
        errors=PromCounter("audit_write_errors", "e", ["sink"], registry=r),
        lines=PromCounter("audit_written", "w", ["sink"], registry=r),
    )
    log = opened(metrics, file=tmp_path / "audit.log", queue_size=1, when_full="refuse")
    log.offer(numbered(0))
    log.offer(numbered(1))
    assert not log.offer(numbered(2))
    with pytest.raises(AuditUnavailable):
        log.check()
    assert r.get_sample_value("audit_queue_depth") == 2
    assert r.get_sample_value("audit_dropped_total", {"reason": "queue_full"}) == 1
    assert r.get_sample_value("audit_refused_total") == 1
    await log.start()
    await flushed(log)
    assert r.get_sample_value("audit_written_total", {"sink": "file"}) == 2
    assert r.get_sample_value("audit_queue_depth") == 0
