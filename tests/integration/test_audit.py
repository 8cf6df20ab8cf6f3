"""The audit trail through real replicas in front of fake drivers (router/admit/audit.py).

Users authenticate with bearer tokens (`auth: token`) and a policy file gives them roles
(and quinn a quota of no sessions at all). The registry is `memory://`: one replica per
test. A full queue is made by pointing `audit_file` at a FIFO nobody reads yet: the audit's
writer thread then blocks in open(), holding its first batch, and later events wait in the
queue until a reader opens the FIFO (`FifoReader`, always opened before the replica stops,
so no thread stays blocked).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
import yaml
from pyspark.sql.connect.proto import base_pb2

from loadtest.fake_driver import FakeDriver
from router.admit import tokens
from router.server import Replica
from tests.helpers import AUDIT_FIELDS, eventually
from tests.integration.test_cluster import Cluster, Stub, _settings

# Groups given unsorted: the audit must write them sorted.
USERS: dict[str, list[str]] = {
    "alice": ["etl", "analysts", "zeta", "beta", "mu"],
    "root": ["platform"],  # an admin by the policy
    "dave": ["visitors"],  # in no role
    "quinn": ["analysts"],  # a quota of no sessions
}
ALICE_GROUPS = ["analysts", "beta", "etl", "mu", "zeta"]
POLICY: dict[str, Any] = {
    "roles": {
        "analysts": {"groups": ["analysts"], "pools": ["*"]},
        "platform": {"groups": ["platform"], "pools": ["*"], "admin": True},
    },
    "quotas": {"users": {"quinn": {"sessions": 0}}},
}
PORT_KEY = "spark.connect.grpc.binding.port"
SLOW = ("x-fake-delay-ms", "60000")  # the driver answers in a minute: the stream stays open
WAIT = 10.0

STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def _new() -> str:
    return str(uuid.uuid4())


def _user(name: str) -> base_pb2.UserContext:
    context = base_pb2.UserContext()
    context.user_id = name
    return context


def _lines(data: bytes | str) -> list[dict[str, Any]]:
    """Every complete line of an audit sink as JSON (an unfinished last line is left)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines()]


def _read(path: Path) -> list[dict[str, Any]]:
    return _lines(path.read_bytes()) if path.exists() else []


def _check_fields(event: Mapping[str, Any]) -> None:
    """Exactly the documented fields, plus time, event and replica (this process's)."""
    assert set(event) == AUDIT_FIELDS[event["event"]] | {"time", "event", "replica"}, event
    assert STAMP.match(event["time"]), event
    assert event["replica"] == f"{socket.gethostname()}:{os.getpid()}", event


def _of(events: list[dict[str, Any]], name: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e for e in events if e["event"] == name and all(e.get(k) == v for k, v in match.items())
    ]


def _one(events: list[dict[str, Any]], name: str, **match: Any) -> dict[str, Any]:
    found = _of(events, name, **match)
    assert len(found) == 1, (name, match, events)
    return found[0]


@dataclass
class World:
    """The tokens, the policy file and the two fake drivers of one test."""

    token_file: Path
    issued: dict[str, str]
    policy_file: Path
    drivers: list[FakeDriver]

    def cluster(self, **settings: object) -> Cluster:
        """One replica on memory://, token auth, the policy, and these (audit) settings."""
        replica = Replica(
            _settings(
                "memory://",
                [d.address for d in self.drivers],
                auth=["token"],
                token_file=self.token_file,
                policy_file=self.policy_file,
                **settings,
            )
        )
        return Cluster([replica])

    def md(self, user: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.issued[user]}"), *extra)

    async def config(self, stub: Stub, user: str, session: str, **conf: str) -> Any:
        """A Config call of `user` on `session`: a set of `conf`, else a get of the port."""
        request = base_pb2.ConfigRequest(session_id=session, user_context=_user(user))
        if conf:
            for key, value in conf.items():
                request.operation.set.pairs.add(key=key, value=value)
        else:
            request.operation.get.keys.append(PORT_KEY)
        return await stub.Config(request, metadata=self.md(user), timeout=20)

    def execute(
        self,
        stub: Stub,
        user: str,
        session: str,
        operation: str,
        *extra: tuple[str, str],
        sql: str | None = None,
        command: str | None = None,
    ) -> Any:
        """An ExecutePlan stream (started, not read): a sql relation, a sql_command or a range."""
        request = base_pb2.ExecutePlanRequest(
            session_id=session, user_context=_user(user), operation_id=operation
        )
        if sql is not None:
            request.plan.root.sql.query = sql
        elif command is not None:
            request.plan.command.sql_command.sql = command
        else:
            request.plan.root.range.end = 3
        return stub.ExecutePlan(request, metadata=self.md(user, *extra), timeout=60)

    async def run(self, stub: Stub, user: str, session: str, **kwargs: Any) -> str:
        """Run an ExecutePlan to its end; its operation id."""
        operation = _new()
        responses = [r async for r in self.execute(stub, user, session, operation, **kwargs)]
        assert responses and responses[-1].HasField("result_complete"), responses
        return operation

    def executions(self, session: str) -> int:
        """ExecutePlan calls of `session` the drivers saw."""
        return sum(
            1
            for d in self.drivers
            for c in d.calls
            if c.method == "ExecutePlan" and c.session_id == session
        )

    def driver_at(self, port: int) -> FakeDriver:
        return next(d for d in self.drivers if d.port == port)


@pytest.fixture
async def world(drivers: list[FakeDriver], tmp_path: Path) -> AsyncIterator[World]:
    token_file = tmp_path / "tokens.yaml"
    issued = {user: tokens.add(token_file, user, groups) for user, groups in USERS.items()}
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(POLICY, sort_keys=False), encoding="utf-8")
    yield World(token_file, issued, policy_file, drivers)


class FifoReader:
    """Reads a FIFO in a thread, once started, until its writer closes it or `stop`.

    The read end is opened non-blocking, so the thread never waits in open() for a writer
    that may never come; Linux reports no hang-up before a writer has connected.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        """Open the FIFO for reading (idempotent): a writer blocked in open() goes on."""
        if self._thread is None:
            opened = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(opened,), name="audit-fifo-reader", daemon=True
            )
            self._thread.start()
            assert opened.wait(WAIT), "the FIFO reader did not open the FIFO"

    def _run(self, opened: threading.Event) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            self.error = exc
            opened.set()
            return
        opened.set()
        try:
            deadline = time.monotonic() + 120  # bounded, whatever the test does
            while not self._stop.is_set() and time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 0.05)
                if not ready:
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    return  # the writer closed it
                with self._lock:
                    self._data += chunk
        except OSError as exc:
            self.error = exc
        finally:
            os.close(fd)

    def lines(self) -> list[dict[str, Any]]:
        """The complete lines read so far, as JSON."""
        with self._lock:
            data = bytes(self._data)
        return _lines(data)

    def stop(self) -> None:
        """Stop reading and wait for the thread (the replica stopped first: no writer left)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(WAIT)
            assert not self._thread.is_alive(), "the FIFO reader is still running"
        assert self.error is None, self.error


def _value(replica: Replica, name: str, **labels: str) -> float:
    return replica.telemetry.value(name, **labels)


def _depth(replica: Replica) -> float:
    return _value(replica, "spark_router_audit_queue_depth")


def _dropped(replica: Replica, reason: str) -> float:
    return _value(replica, "spark_router_audit_dropped_total", reason=reason)


def _written(replica: Replica) -> float:
    return _value(replica, "spark_router_audit_written_total", sink="file")


async def _all(stream: Any) -> list[Any]:
    return [response async for response in stream]


# --- a full queue --------------------------------------------------------------------------


async def test_a_full_queue_in_drop_mode_drops_the_newest_events_and_serves_every_call(
    world: World, tmp_path: Path
) -> None:
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    bound = 4
    try:
        async with world.cluster(
            audit_file=fifo, audit_queue_size=bound, audit_when_full="drop"
        ) as cluster:
            stub, replica = cluster.stubs[0], cluster.replicas[0]
            try:
                sessions = [_new() for _ in range(3)]
                for s in sessions:  # a session.created each
                    await world.config(stub, "alice", s)
                operations = [await world.run(stub, "alice", sessions[0]) for _ in range(6)]
                for s in sessions:  # known sessions: no event, and still served
                    await world.config(stub, "alice", s)
                # 9 events for a bound of 4: the writer holds the first (blocked in open),
                # 3 wait, the 5 newest are dropped; every call above succeeded.
                await eventually(
                    lambda: _dropped(replica, "queue_full") == 5, "5 events dropped", WAIT
                )
                assert _depth(replica) == bound
                assert _written(replica) == 0
                await world.config(stub, "alice", _new())  # one more: dropped too
                assert _dropped(replica, "queue_full") == 6
                assert _depth(replica) == bound

                reader.start()
                await eventually(lambda: len(reader.lines()) >= bound, "the queued lines", WAIT)
                await eventually(lambda: _depth(replica) == 0, "the queue drained", WAIT)
                got = reader.lines()
                assert [(e["event"], e["session"]) for e in got] == [
                    ("session.created", s) for s in sessions
                ] + [("execution", sessions[0])]
                assert got[3]["operation"] == operations[0]  # the oldest kept, not the newest
                for event in got:
                    _check_fields(event)
                # The queue drained: new events are written again, nothing more is dropped.
                later = await world.run(stub, "alice", sessions[1])
                await eventually(lambda: len(reader.lines()) == bound + 1, "a new line", WAIT)
                assert reader.lines()[-1]["operation"] == later
                assert _dropped(replica, "queue_full") == 6
                assert _written(replica) == bound + 1
            finally:
                reader.start()  # whatever happened, the writer's open() returns before stop
        assert _dropped(replica, "shutdown") == 0  # the writer was not left blocked
        assert _depth(replica) == 0
    finally:
        reader.stop()


async def test_a_full_queue_in_refuse_mode_refuses_new_calls_and_keeps_every_admitted_record(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.admit.audit")
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    bound = 4
    slow: list[Any] = []
    reading: list[asyncio.Future[list[Any]]] = []
    try:
        async with world.cluster(
            audit_file=fifo, audit_queue_size=bound, audit_when_full="refuse"
        ) as cluster:
            stub, replica = cluster.stubs[0], cluster.replicas[0]
            try:
                s = _new()
                await world.config(stub, "alice", s)  # session.created: the writer holds it
                # Admitted while the queue has room; their records come when they end.
                slow_ops = [_new() for _ in range(bound)]
                slow = [world.execute(stub, "alice", s, op, SLOW) for op in slow_ops]
                reading = [asyncio.ensure_future(_all(call)) for call in slow]
                await eventually(
                    lambda: world.executions(s) == bound, "the slow streams on the driver", WAIT
                )
                quick = [await world.run(stub, "alice", s) for _ in range(bound - 1)]
                assert _depth(replica) == bound  # created + 3 executions wait

                seen = world.executions(s)
                refused_op = _new()
                refusals: list[Callable[[], Awaitable[Any]]] = [
                    lambda: _all(world.execute(stub, "alice", s, refused_op)),
                    lambda: world.config(stub, "alice", s),
                    lambda: world.config(stub, "alice", _new()),  # a new session: no record
                ]
                for n, call in enumerate(refusals, 1):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call()
                    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
                    assert "audit trail" in (err.value.details() or ""), err.value.details()
                    assert _value(replica, "spark_router_audit_refused_total") == n
                assert world.executions(s) == seen  # refused before it was forwarded
                warned = [r for r in caplog.records if "refusing calls" in r.getMessage()]
                assert len(warned) == 1, warned

                # The admitted streams end (cancelled) past queue_size: their records are
                # still taken, up to twice it; none is dropped.
                for call in slow:
                    call.cancel()
                await asyncio.gather(*reading, return_exceptions=True)
                await eventually(lambda: _depth(replica) == 2 * bound, "8 records waiting", WAIT)
                assert _dropped(replica, "queue_full") == 0

                reader.start()
                await eventually(lambda: len(reader.lines()) == 2 * bound, "every record", WAIT)
                got = reader.lines()
                for event in got:
                    _check_fields(event)
                assert got[0]["event"] == "session.created" and got[0]["session"] == s
                runs = {e["operation"]: e["status"] for e in got if e["event"] == "execution"}
                assert runs == {op: "OK" for op in quick} | {op: "CANCELLED" for op in slow_ops}
                assert refused_op not in json.dumps(got)
                # Drained: calls are admitted again, and on the record.
                await eventually(lambda: _depth(replica) == 0, "the queue drained", WAIT)
                again = await world.run(stub, "alice", s)
                await eventually(lambda: len(reader.lines()) == 2 * bound + 1, "its line", WAIT)
                assert reader.lines()[-1]["operation"] == again
                assert _value(replica, "spark_router_audit_refused_total") == len(refusals)
                assert any("caught up" in r.getMessage() for r in caplog.records)
            finally:
                for call in slow:
                    call.cancel()
                await asyncio.gather(*reading, return_exceptions=True)
                reader.start()
        assert _dropped(replica, "shutdown") == 0
        assert _dropped(replica, "queue_full") == 0
    finally:
        reader.stop()


# --- rotation ------------------------------------------------------------------------------


async def test_a_file_renamed_away_keeps_its_lines_and_a_new_one_takes_the_next(
    world: World, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    rotated = tmp_path / "audit.log.1"
    umask = os.umask(0o022)  # read it (before any thread of the replica creates a file)
    os.umask(umask)
    async with world.cluster(audit_file=path) as cluster:
        stub, replica = cluster.stubs[0], cluster.replicas[0]
        s = _new()
        await world.config(stub, "alice", s)
        first = await world.run(stub, "alice", s)
        await eventually(lambda: len(_read(path)) == 2, "the first lines", WAIT)
        os.rename(path, rotated)  # logrotate's create mode
        second = await world.run(stub, "alice", s)
        await eventually(lambda: len(_read(path)) == 1, "a line in a new file", WAIT)
        assert [e["event"] for e in _read(rotated)] == ["session.created", "execution"]
        assert _read(rotated)[1]["operation"] == first
        assert [e.get("operation") for e in _read(path)] == [second]
        assert oct(path.stat().st_mode & 0o777) == oct(0o640 & ~umask)  # O_CREAT, 0640
        assert _written(replica) == 3


# --- sessions whose pins lapse -------------------------------------------------------------


async def test_a_session_left_idle_past_its_pin_ttl_is_recorded_expired_once(
    world: World, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    quick = {"pin_ttl_seconds": 1.0, "pin_touch_interval_seconds": 0.2}
    async with world.cluster(audit_file=path, membership_poll_seconds=0.1, **quick) as cluster:
        stub, replica = cluster.stubs[0], cluster.replicas[0]
        idle, busy = _new(), _new()
        port = int((await world.config(stub, "alice", idle)).pairs[0].value)
        await world.config(stub, "alice", busy)

        def expired() -> list[dict[str, Any]]:
            return _of(_read(path), "session.expired")

        deadline = time.monotonic() + WAIT
        while not expired() and time.monotonic() < deadline:
            await world.config(stub, "alice", busy)  # its pin is touched: it never lapses
            await asyncio.sleep(0.1)  # pacing the busy session's calls, not a wait
        lapsed = expired()
        assert len(lapsed) == 1, lapsed
        _check_fields(lapsed[0])
        assert {k: lapsed[0][k] for k in ("user", "session", "pool", "driver", "reason")} == {
            "user": "alice",
            "session": idle,
            "pool": "default",
            "driver": world.driver_at(port).address,
            "reason": "idle",
        }
        assert _value(replica, "spark_router_sessions_expired_total", pool="default") == 1
        await world.config(stub, "alice", busy)
        assert len(expired()) == 1  # reported once; the busy one never


# --- every event kind, field by field ------------------------------------------------------


async def test_each_event_kind_through_the_router_has_its_fields(
    world: World, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    sql = "SELECT 1 AS x"
    command = "SHOW TABLES"
    async with (
        world.cluster(audit_file=path) as cluster,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
    ):
        stub, replica = cluster.stubs[0], cluster.replicas[0]
        base = f"http://127.0.0.1:{replica.admin_port}"

        async def api(method: str, route: str, user: str, body: Any = None) -> tuple[int, Any]:
            headers = {"Authorization": f"Bearer {world.issued[user]}"}
            data = None if body is None else json.dumps(body).encode()
            async with http.request(method, base + route, data=data, headers=headers) as r:
                return r.status, await r.json()

        s = _new()
        port = int((await world.config(stub, "alice", s)).pairs[0].value)
        home = world.driver_at(port).address
        other = next(d.address for d in world.drivers if d.address != home)
        by_sql = await world.run(stub, "alice", s, sql=sql)
        by_command = await world.run(stub, "alice", s, command=command)

        # Refusals: a bad token, a user in no role, a quota.
        bad_token = "ssr_" + "x" * 43
        request = base_pb2.ConfigRequest(session_id=_new(), user_context=_user("alice"))
        request.operation.get.keys.append(PORT_KEY)
        bad_session = request.session_id
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Config(request, metadata=(("authorization", f"Bearer {bad_token}"),))
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        dave_session, quinn_session = _new(), _new()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await world.config(stub, "dave", dave_session)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await world.config(stub, "quinn", quinn_session)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

        # The admin API: a drain by the admin, the same refused to alice, the undrain, a move.
        drain = f"/api/drivers/{home}/drain"
        status, body = await api("POST", drain, "root", {"mode": "keep"})
        assert status == 200, body
        status, body = await api("POST", drain, "alice", {"mode": "keep"})
        assert status == 403, body
        status, body = await api("DELETE", drain, "root")
        assert status == 200, body
        status, body = await api("POST", f"/api/sessions/{s}/move", "root", {"driver": other})
        assert status == 200 and body["driver"] == other, body

        release = base_pb2.ReleaseSessionRequest(session_id=s, user_context=_user("alice"))
        await stub.ReleaseSession(release, metadata=world.md("alice"), timeout=20)

        expected = [
            "session.created",
            "execution",
            "execution",
            "denied",
            "denied",
            "denied",
            "admin",
            "denied",
            "admin",
            "session.moved",
            "admin",
            "session.released",
        ]
        await eventually(lambda: len(_read(path)) >= len(expected), "every line", WAIT)
        events = _read(path)
        assert [e["event"] for e in events] == expected, events
        for event in events:
            _check_fields(event)

        assert _one(events, "session.created") == events[0] | {
            "user": "alice",
            "groups": ALICE_GROUPS,
            "session": s,
            "pool": "default",
            "driver": home,
            "conf": None,
        }
        runs = {e["operation"]: e for e in _of(events, "execution")}
        for operation, kind, text in ((by_sql, "sql", sql), (by_command, "sql_command", command)):
            run = runs[operation]
            assert {k: run[k] for k in AUDIT_FIELDS["execution"] - {"duration_ms", "bytes"}} == {
                "user": "alice",
                "groups": ALICE_GROUPS,
                "session": s,
                "operation": operation,
                "pool": "default",
                "driver": home,
                "plan": kind,
                "sql": None,
                "sql_sha256": hashlib.sha256(text.encode()).hexdigest(),
                "status": "OK",
                "rows": None,
            }
            assert isinstance(run["duration_ms"], (int, float)) and run["duration_ms"] >= 0
            assert isinstance(run["bytes"], int) and run["bytes"] > 0

        invalid = _one(events, "denied", kind="authentication")
        assert invalid["reason"] == "invalid" and invalid["status"] == "UNAUTHENTICATED"
        assert invalid["method"] == "Config" and invalid["session"] == bad_session
        assert invalid["groups"] == [] and invalid["peer"]
        # Nobody the router vouched for: not the user_id the request claims ("alice").
        assert invalid["user"] is None
        line = next(raw for raw in path.read_text().splitlines() if bad_session in raw)
        assert bad_token not in line and bad_token[4:20] not in line

        no_role = _one(events, "denied", reason="no_role")
        assert {k: no_role[k] for k in ("kind", "status", "user", "groups", "session")} == {
            "kind": "policy",
            "status": "PERMISSION_DENIED",
            "user": "dave",
            "groups": ["visitors"],
            "session": dave_session,
        }
        assert "'dave' has no role" in no_role["message"]
        quota = _one(events, "denied", kind="quota")
        assert {k: quota[k] for k in ("reason", "status", "user", "groups", "session")} == {
            "reason": "sessions",
            "status": "RESOURCE_EXHAUSTED",
            "user": "quinn",
            "groups": ["analysts"],
            "session": quinn_session,
        }
        assert "quotas.users.quinn.sessions" in quota["message"]

        drained, undrained, moved_by = _of(events, "admin")
        assert drained == drained | {
            "admin": "root",
            "groups": ["platform"],
            "action": "drain",
            "target": home,
            "result": "ok",
            "params": {"mode": "keep"},
        }
        assert undrained == undrained | {
            "admin": "root",
            "action": "undrain",
            "target": home,
            "result": "ok",
            "params": None,
        }
        assert moved_by == moved_by | {
            "admin": "root",
            "action": "move",
            "target": s,
            "result": "ok",
            "params": {"driver": other},
        }
        not_admin = _one(events, "denied", reason="no_admin_role")
        assert not_admin == not_admin | {
            "kind": "policy",
            "status": "PERMISSION_DENIED",
            "method": f"POST {drain}",
            "user": "alice",
            "groups": ALICE_GROUPS,
            "session": None,
            "pool": None,
            "peer": "ipv4:127.0.0.1:0",
        }
        assert "'alice' has no admin role" in not_admin["message"]

        assert _one(events, "session.moved") == events[9] | {
            "user": "alice",
            "session": s,
            "pool": "default",
            "from_driver": home,
            "driver": other,
            "reason": "admin",
        }
        assert _one(events, "session.released") == events[11] | {
            "user": "alice",
            "session": s,
            "pool": "default",
            "driver": other,  # where it lives since the move
        }


# --- secrets -------------------------------------------------------------------------------


async def test_no_token_nor_secret_value_reaches_the_audit_or_the_log(
    world: World,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "audit.log"
    secret = "hunter2-" + uuid.uuid4().hex
    bad_tokens = ["ssr_" + uuid.uuid4().hex, "ssr_" + uuid.uuid4().hex]  # gRPC, admin API
    secret_conf = {"spark.hadoop.fs.s3a.secret.key": secret, "my.api.token": secret}
    set_secret = f"SET spark.my.password={secret}"
    select_secret = f"SELECT * FROM t WHERE api_key = '{secret}'"
    # SQL as text (cut, secrets blanked): the mode where a secret could slip through.
    async with (
        world.cluster(audit_file=path, audit_stdout=True, audit_sql="text") as cluster,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
    ):
        stub, replica = cluster.stubs[0], cluster.replicas[0]
        s = _new()
        await world.config(stub, "alice", s, **secret_conf)  # the session's first call
        await world.run(stub, "alice", s, command=set_secret)
        await world.run(stub, "alice", s, sql=select_secret)
        for user in ("dave", "quinn"):
            with pytest.raises(grpc.aio.AioRpcError):
                await world.config(stub, user, _new())
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Config(
                base_pb2.ConfigRequest(session_id=_new(), user_context=_user("alice")),
                metadata=(("authorization", f"Bearer {bad_tokens[0]}"),),
                timeout=20,
            )
        base = f"http://127.0.0.1:{replica.admin_port}"
        for user in ("root", "alice"):  # an admin's request and a refused one
            headers = {"Authorization": f"Bearer {world.issued[user]}"}
            async with http.get(base + "/api/drivers", headers=headers) as r:
                assert r.status == (200 if user == "root" else 403)
        headers = {"Authorization": f"Bearer {bad_tokens[1]}"}
        async with http.get(base + "/api/drivers", headers=headers) as r:
            assert r.status == 401
        await eventually(lambda: len(_read(path)) >= 9, "every line", WAIT)
    text = path.read_text(encoding="utf-8")
    events = _lines(text)
    assert [e["event"] for e in events] == [
        "session.created",
        "execution",
        "execution",
        "denied",
        "denied",
        "denied",
        "admin",
        "denied",
        "denied",
    ]
    for event in events:
        _check_fields(event)
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith('{"')] == text.splitlines()
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "listening on" in logged  # the replica's log was captured
    used = {**{f"{u}'s token": t for u, t in world.issued.items()}, "a bad token": bad_tokens[0]}
    used |= {"a bad admin token": bad_tokens[1], "a secret value": secret}
    for where, haystack in (("audit file", text), ("stdout", out), ("log", logged)):
        for name, value in used.items():
            assert value not in haystack, f"{name} in the {where}"
    # The SQL is there, the secrets blanked; a conf, if the router records it, is redacted.
    assert [e["sql"] for e in _of(events, "execution")] == [
        "SET spark.my.password=[redacted]",
        "SELECT * FROM t WHERE api_key = '[redacted]'",
    ]
    conf = _one(events, "session.created")["conf"]
    assert conf is None or conf == dict.fromkeys(secret_conf, "[redacted]"), conf
