"""The admin listener, the probes and gRPC health: a running replica, fake drivers, real Redis.

In-process replicas for the API, probes and health; `spark-router serve` as a subprocess for
the CLI (`drivers | sessions | drain --admin URL`), its fake drivers in processes of their
own so that blocking on the CLI never stalls a driver's answers to the router's probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc, relations_pb2

from loadtest.fake_driver import FakeDriver
from registry import open_registry
from registry.models import Driver, DriverState
from router.admin.http import not_ready
from router.config import load_settings
from router.server import Replica, StartupError
from tests.helpers import free_port, read_line_matching, spawn, stderr_of, stop, wait_until
from tests.redis_server import RedisServer

Stub = base_pb2_grpc.SparkConnectServiceStub
TOKEN = "admin-s3cret"
PORT_KEY = "spark.connect.grpc.binding.port"
SPARK = "spark.connect.SparkConnectService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Fast probes: a stopped driver is down after one failed probe, back after one good one.
FAST_PROBES: dict[str, Any] = {
    "probe_interval_seconds": 0.1,
    "probe_timeout_seconds": 1.0,
    "fail_threshold": 1,
    "recover_threshold": 1,
    "membership_poll_seconds": 0.2,
}


def _config(session: str, user: str = "alice", observed: str | None = None) -> Any:
    req = base_pb2.ConfigRequest(session_id=session)
    req.user_context.user_id = user
    if observed is not None:
        req.client_observed_server_side_session_id = observed
    req.operation.get.keys.append(PORT_KEY)
    return req


async def _port_of(stub: Stub, session: str, user: str = "alice") -> int:
    return int((await stub.Config(_config(session, user), timeout=20)).pairs[0].value)


async def _poll(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Re-run an async `check` until true; AssertionError naming `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def _watch_until(watch: Any, status: int, timeout: float = 10.0) -> None:
    """Read a health Watch stream until it reports `status`."""

    async def read() -> None:
        while (await watch.read()).status != status:
            pass

    await asyncio.wait_for(read(), timeout)


@dataclass
class Env:
    """A started replica in front of fake drivers, a gRPC client and an HTTP client."""

    drivers: list[FakeDriver]
    replica: Replica
    stub: Stub
    health: Any
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.replica.admin_port}"

    async def api(
        self, method: str, path: str, body: Any = None, token: str | None = TOKEN, raw: bytes = b""
    ) -> tuple[int, Any]:
        """(status, parsed JSON) of one admin request."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = json.dumps(body).encode() if body is not None else raw or None
        async with self.http.request(method, self.base + path, data=data, headers=headers) as r:
            assert r.content_type == "application/json", (path, r.content_type)
            return r.status, await r.json()

    async def get(self, path: str) -> tuple[int, str]:
        """(status, text) of one request without a token."""
        async with self.http.get(self.base + path) as r:
            return r.status, await r.text()

    def driver_at(self, port: int) -> FakeDriver:
        return next(d for d in self.drivers if d.port == port)


@contextlib.asynccontextmanager
async def _env(registry: str, registered: bool, **settings: Any) -> AsyncIterator[Env]:
    """Two fake drivers (registered in the registry as an agent would, or static) and a replica."""
    drivers: list[FakeDriver] = []

    async def stop_drivers() -> None:  # those in the list by then: a test may replace them
        for d in drivers:
            await d.stop()

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(stop_drivers)
        for _ in range(2):
            drivers.append(FakeDriver())
            await drivers[-1].start()
        if registered:
            store = open_registry(registry)
            stack.push_async_callback(store.close)
            for d in drivers:
                await store.upsert_driver(Driver(d.address), ttl=None)
        static = [] if registered else [d.address for d in drivers]
        replica = Replica(
            load_settings(
                listen="127.0.0.1:0",
                admin_listen="127.0.0.1:0",
                registry=registry,
                drivers=static,
                **settings,
            )
        )
        stack.push_async_callback(replica.stop, 0)
        await replica.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
        stack.push_async_callback(channel.close)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        stack.push_async_callback(http.close)
        yield Env(drivers, replica, Stub(channel), health_pb2_grpc.HealthStub(channel), http)


@pytest.fixture
async def env(redis_url: str) -> AsyncIterator[Env]:
    """A replica on the Redis registry with two registered drivers and an admin token."""
    async with _env(redis_url, registered=True, admin_token=TOKEN, **FAST_PROBES) as e:
        yield e


# --- the admin API ----------------------------------------------------------------------


async def test_drivers_and_sessions_after_known_traffic(env: Env) -> None:
    before = time.time()
    sessions = [str(uuid.uuid4()) for _ in range(12)]
    ports = {s: await _port_of(env.stub, s, user="alice") for s in sessions}
    after = time.time()
    per_port = Counter(ports.values())
    assert len(per_port) == 2  # both drivers hold some

    status, body = await env.api("GET", "/api/drivers")
    assert status == 200
    by_address = {d["address"]: d for d in body["drivers"]}
    assert set(by_address) == {d.address for d in env.drivers}
    for d in env.drivers:
        assert by_address[d.address] == {
            "address": d.address,
            "pool": "default",
            "weight": 1,
            "state": "active",
            "registered": True,
            "drain": None,
            "sessions": per_port[d.port],
            "health": "up",
        }

    s = sessions[0]
    status, record = await env.api("GET", f"/api/sessions/{s}")
    assert status == 200
    created = dt.datetime.fromisoformat(record.pop("created")).timestamp()
    assert int(before) <= created <= after
    assert record == {
        "session_id": s,
        "key": f"alice/{s}",
        "driver": env.driver_at(ports[s]).address,
        "pool": "default",
        "owner": "alice",
        "moves": 0,
        "server_side_id": None,
    }

    home = env.drivers[0]
    status, body = await env.api("GET", f"/api/sessions?driver={home.address}")
    assert status == 200
    assert {r["session_id"] for r in body["sessions"]} == {
        s for s, p in ports.items() if p == home.port
    }
    assert all(r["driver"] == home.address and r["owner"] == "alice" for r in body["sessions"])
    status, body = await env.api("GET", "/api/sessions?limit=3")
    assert status == 200 and len(body["sessions"]) == 3
    status, body = await env.api("GET", "/api/sessions")
    assert {r["session_id"] for r in body["sessions"]} == set(sessions)
    assert await env.api("GET", "/api/sessions/no-such-session") == (
        404,
        {"error": "no session 'no-such-session' is pinned"},
    )


async def test_drain_and_undrain_steer_new_sessions(env: Env) -> None:
    drained, other = env.drivers
    old = [str(uuid.uuid4()) for _ in range(10)]
    ports = {s: await _port_of(env.stub, s) for s in old}
    on_drained = sum(p == drained.port for p in ports.values())

    status, result = await env.api(
        "POST", f"/api/drivers/{drained.address}/drain", {"mode": "keep"}
    )
    assert (status, result) == (
        200,
        {"address": drained.address, "drain": "keep", "sessions": on_drained},
    )
    _, body = await env.api("GET", "/api/drivers")
    marks = {d["address"]: d["drain"] for d in body["drivers"]}
    assert marks == {drained.address: "keep", other.address: None}
    # The replica answering places nothing new there at once; old sessions stay put.
    new = [await _port_of(env.stub, str(uuid.uuid4())) for _ in range(20)]
    assert set(new) == {other.port}
    assert {s: await _port_of(env.stub, s) for s in old} == ports

    status, result = await env.api(
        "POST", f"/api/drivers/{drained.address}/drain", {"mode": "move-idle"}
    )
    assert status == 200 and result["drain"] == "move-idle"
    status, result = await env.api("POST", f"/api/drivers/{drained.address}/drain")  # no body: keep
    assert status == 200 and result["drain"] == "keep"

    status, result = await env.api("DELETE", f"/api/drivers/{drained.address}/drain")
    assert (status, result["drain"]) == (200, None)
    again = [await _port_of(env.stub, str(uuid.uuid4())) for _ in range(30)]
    assert drained.port in again
    _, body = await env.api("GET", "/api/drivers")
    assert all(d["drain"] is None for d in body["drivers"])


async def test_move_a_session_and_its_next_call_lands_on_the_other_driver(env: Env) -> None:
    s = str(uuid.uuid4())
    first = await env.stub.Config(_config(s))
    original = first.server_side_session_id
    home = env.driver_at(int(first.pairs[0].value))
    other = next(d for d in env.drivers if d is not home)

    status, pin = await env.api("POST", f"/api/sessions/{s}/move")
    assert status == 200
    assert (pin["driver"], pin["moves"], pin["owner"]) == (other.address, 1, "alice")
    assert pin["server_side_id"] == original  # identity learned from its driver, kept
    # A real client carries on: its next call reaches the other driver, same identity.
    got = await env.stub.Config(_config(s, observed=original))
    assert int(got.pairs[0].value) == other.port
    assert got.server_side_session_id == original
    assert env.drivers[env.drivers.index(other)].calls[-1].session_id == s

    status, pin = await env.api("POST", f"/api/sessions/{s}/move", {"driver": home.address})
    assert (status, pin["driver"], pin["moves"]) == (200, home.address, 2)
    assert int((await env.stub.Config(_config(s, observed=original))).pairs[0].value) == home.port
    status, pin = await env.api("POST", f"/api/sessions/{s}/move", {"driver": home.address})
    assert (status, pin["moves"]) == (200, 2)  # already there: nothing to do

    status, body = await env.api("POST", "/api/sessions/nope/move")
    assert (status, body) == (404, {"error": "no session 'nope' is pinned"})
    status, body = await env.api("POST", f"/api/sessions/{s}/move", {"driver": "127.0.0.1:1"})
    assert status == 409 and "127.0.0.1:1 is not one of this replica's drivers" in body["error"]
    await env.api("POST", f"/api/drivers/{other.address}/drain", {"mode": "keep"})
    status, body = await env.api("POST", f"/api/sessions/{s}/move", {"driver": other.address})
    assert status == 409 and f"{other.address} is draining" in body["error"]
    # Nowhere to go: the only other driver is drained.
    status, body = await env.api("POST", f"/api/sessions/{s}/move")
    assert status == 503 and body["error"].startswith(f"cannot move session '{s}'")
    assert int((await env.stub.Config(_config(s, observed=original))).pairs[0].value) == home.port


async def test_the_token_guards_the_api_and_not_the_probes(env: Env) -> None:
    for token in (None, "wrong", TOKEN + "x"):
        status, body = await env.api("GET", "/api/drivers", token=token)
        assert status == 401 and "Authorization: Bearer" in body["error"]
    async with env.http.get(
        env.base + "/api/drivers", headers={"Authorization": f"Basic {TOKEN}"}
    ) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    for path in ("/healthz", "/readyz", "/metrics"):
        status, _ = await env.get(path)
        assert status == 200, path
    status, text = await env.get("/metrics")
    assert "spark_router_" in text


async def test_with_auth_on_the_admin_role_comes_from_config(
    redis_url: str, tmp_path: Path
) -> None:
    from router.admit import tokens

    path = tmp_path / "tokens.yaml"
    ops = tokens.add(path, "olga", ["sre"])
    dev = tokens.add(path, "dan", ["analysts"])
    settings = {"auth": ["token"], "token_file": path, "admin_groups": ["sre"]}
    async with _env(redis_url, registered=False, admin_token=TOKEN, **settings) as e:
        assert (await e.api("GET", "/api/drivers", token=ops))[0] == 200  # in an admin group
        assert (await e.api("GET", "/api/drivers", token=TOKEN))[0] == 200  # admin_token too
        status, body = await e.api("GET", "/api/drivers", token=dev)
        assert status == 403 and "'dan' has no admin role" in body["error"]
        for token in (None, "ssr_not-a-token"):
            status, body = await e.api("GET", "/api/drivers", token=token)
            assert status == 401 and "admin_groups" in body["error"]
            assert "ssr_not-a-token" not in body["error"]
        assert (await e.get("/readyz"))[0] == 200  # probes stay open
    async with _env(redis_url, registered=False, **settings | {"admin_groups": []}) as e:
        status, body = await e.api("GET", "/api/drivers", token=ops)
        assert status == 403 and "admin API is closed" in body["error"]


@pytest.mark.parametrize(
    ("method", "path", "body", "raw", "status", "message"),
    [
        ("POST", "/api/drivers/nope/drain", None, b"", 400, "driver: 'nope' is not HOST:PORT"),
        ("POST", "/api/drivers/127.0.0.1:1/drain", {"mode": "all"}, b"", 400, "mode 'all' is not"),
        ("POST", "/api/drivers/127.0.0.1:1/drain", None, b"{no", 400, "not valid JSON"),
        ("POST", "/api/drivers/127.0.0.1:1/drain", ["keep"], b"", 400, "must be a JSON object"),
        ("POST", "/api/drivers/127.0.0.1:1/drain", {"mod": "keep"}, b"", 400, "unknown field"),
        ("DELETE", "/api/drivers/127.0.0.1:99999/drain", None, b"", 400, "out of range"),
        ("GET", "/api/sessions?limit=0", None, b"", 400, "limit '0' is not a whole number"),
        ("GET", "/api/sessions?limit=x", None, b"", 400, "limit 'x' is not a whole number"),
        ("GET", "/api/sessions?limit=100001", None, b"", 400, "from 1 to 100000"),
        ("GET", "/api/sessions?driver=nope", None, b"", 400, "driver: 'nope' is not HOST:PORT"),
        ("GET", "/api/sessions?drvier=a:1", None, b"", 400, "unknown parameter(s) drvier"),
        ("POST", "/api/sessions/s/move", {"driver": 5}, b"", 400, "driver must be a string"),
        ("POST", "/api/sessions/s/move", {"driver": "x"}, b"", 400, "'x' is not HOST:PORT"),
        ("POST", "/api/sessions/s/move", None, b" " * 70_000, 413, "Request Entity Too Large"),
        ("GET", "/api/nothing", None, b"", 404, "Not Found: GET /api/nothing"),
        ("GET", "/api/drivers/127.0.0.1:1/drain", None, b"", 405, "Method Not Allowed"),
    ],
)
async def test_bad_input_is_a_clear_json_error(
    env: Env, method: str, path: str, body: Any, raw: bytes, status: int, message: str
) -> None:
    got_status, got = await env.api(method, path, body, raw=raw)
    assert got_status == status and message in got["error"], got


async def test_draining_an_unknown_driver_is_404_and_leaves_no_phantom(
    env: Env, redis_url: str
) -> None:
    known = sorted(d.address for d in env.drivers)
    for method in ("POST", "DELETE"):
        status, body = await env.api(method, "/api/drivers/127.0.0.1:1/drain", {"mode": "keep"})
        assert status == 404, body
        assert body["error"] == (
            "no driver 127.0.0.1:1 is registered, configured or marked draining "
            f"(drivers: {', '.join(known)})"
        )
    _, body = await env.api("GET", "/api/drivers")
    assert sorted(d["address"] for d in body["drivers"]) == known  # no phantom entry
    store = open_registry(redis_url)
    try:
        assert await store.draining() == {}  # nothing written either
        # A marked driver that has since gone can still be undrained, then not drained again.
        gone = env.drivers[0].address
        assert (await env.api("POST", f"/api/drivers/{gone}/drain"))[0] == 200
        await store.remove_driver(gone)
        assert (await env.api("DELETE", f"/api/drivers/{gone}/drain"))[0] == 200
        assert await store.draining() == {}
        status, body = await env.api("POST", f"/api/drivers/{gone}/drain")
        assert status == 404 and f"drivers: {env.drivers[1].address})" in body["error"]
    finally:
        await store.close()


async def test_a_driver_known_by_its_sessions_or_as_static_can_be_drained(
    env: Env, redis_url: str
) -> None:
    ports = {await _port_of(env.stub, str(uuid.uuid4())) for _ in range(12)}
    assert ports == {d.port for d in env.drivers}
    holder = env.drivers[0].address
    store = open_registry(redis_url)
    try:
        await store.remove_driver(holder)  # deregistered, still holding pinned sessions
        status, body = await env.api("POST", f"/api/drivers/{holder}/drain")
        assert status == 200 and body["drain"] == "keep" and body["sessions"] > 0, body
    finally:
        await store.close()
    async with _env("memory://", registered=False) as static:
        address = static.drivers[1].address
        status, body = await static.api("POST", f"/api/drivers/{address}/drain", token=None)
        assert (status, body["drain"]) == (200, "keep")


def test_cli_drain_through_the_registry_refuses_an_unknown_driver(redis_url: str) -> None:
    async def prepare() -> None:
        store = open_registry(redis_url)
        try:
            await store.upsert_driver(Driver("10.0.0.7:15002"), ttl=None)
        finally:
            await store.close()

    asyncio.run(prepare())
    code, _, err = _cli("drain", "10.0.0.8:15002", "--registry", redis_url, token=None)
    assert code == 3, err
    assert "no driver 10.0.0.8:15002 is registered" in err and "(drivers: 10.0.0.7:15002)" in err
    assert "Traceback" not in err
    code, out, err = _cli("drain", "10.0.0.7:15002", "--registry", redis_url, token=None)
    assert code == 0 and "driver 10.0.0.7:15002 is draining" in out, err


async def _raw_http(port: int, request: bytes) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of one raw HTTP/1.1 request the server answers and then closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # to EOF: the server closes
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert "content-type: application/json" in head.decode().lower(), head
    return int(lines[0].split()[1]), json.loads(body)


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (
            b"GET /api/drivers HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            431,
            "longer than 8190 bytes",
        ),
        (b"GET /healthz?" + b"q" * 100_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 431, "8190"),
        (
            b"GET /metrics HTTP/1.1\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(300))
            + b"\r\n",
            400,
            "Too many headers",
        ),
    ],
    ids=["100KB header", "100KB URL", "300 headers"],
)
async def test_an_oversized_request_is_a_json_error_without_a_traceback(
    env: Env, caplog: pytest.LogCaptureFixture, request_bytes: bytes, status: int, message: str
) -> None:
    caplog.set_level(logging.INFO)
    got_status, body = await _raw_http(env.replica.admin_port, request_bytes)
    assert got_status == status and message in body["error"], body
    assert len(body["error"]) < 300  # the client's bytes are not echoed back
    noisy = [r for r in caplog.records if r.levelno > logging.INFO or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]
    refused = [r for r in caplog.records if "refused a malformed request" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.INFO
    assert (await env.api("GET", "/api/drivers"))[0] == 200  # and it keeps serving


async def test_a_replica_warns_when_it_listens_beyond_loopback_without_auth(
    caplog: pytest.LogCaptureFixture,
) -> None:
    driver = FakeDriver()
    await driver.start()

    async def warnings(**settings: Any) -> list[str]:
        caplog.clear()
        values = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", **settings}
        async with Replica(load_settings(drivers=[driver.address], **values)):
            pass
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    caplog.set_level(logging.WARNING, logger="router.server")
    try:
        assert await warnings() == []
        wide = await warnings(listen="0.0.0.0:0", admin_listen="0.0.0.0:0")
        assert len(wide) == 2, wide
        assert "beyond loopback without authentication" in wide[0]
        assert wide[1].startswith("admin API on 0.0.0.0:") and "can drain drivers" in wide[1]
        assert "set admin_token" in wide[1]
        # A token closes the admin API: only the gRPC port is open then.
        only_grpc = await warnings(listen="0.0.0.0:0", admin_listen="0.0.0.0:0", admin_token=TOKEN)
        assert len(only_grpc) == 1 and "without authentication" in only_grpc[0]
        admin_only = await warnings(admin_listen="0.0.0.0:0")
        assert len(admin_only) == 1 and admin_only[0].startswith("admin API on")
    finally:
        await driver.stop()


# --- probes and gRPC health -------------------------------------------------------------


def test_readiness_reasons() -> None:
    up, down = Driver("a:1"), Driver("b:1", state=DriverState.DOWN)
    assert not_ready([up, down], degraded=False, shutting_down=False) == []
    assert not_ready([down], False, False) == ["no driver takes new sessions (b:1 down)"]
    assert not_ready([], False, False) == ["no driver takes new sessions (none known)"]
    many = [Driver(f"d{n}:1", state=DriverState.DRAINING) for n in range(12)]
    assert not_ready(many, False, False)[0].endswith("d9:1 draining, 2 more)")
    reasons = not_ready([up], degraded=True, shutting_down=True)
    assert [r.split(":")[0] for r in reasons] == ["shutting down", "registry unreachable"]


async def test_health_follows_the_drivers() -> None:
    async with _env("memory://", registered=False, **FAST_PROBES) as env:
        for service in ("", SPARK):
            reply = await env.health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await env.health.Check(health_pb2.HealthCheckRequest(service="other.Service"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert await env.get("/readyz") == (200, '{"ready": true}')

        watch = env.health.Watch(health_pb2.HealthCheckRequest(service=""))
        await _watch_until(watch, SERVING)
        ports = [d.port for d in env.drivers]
        for d in env.drivers:
            await d.stop()
        await _watch_until(watch, NOT_SERVING)
        reply = await env.health.Check(health_pb2.HealthCheckRequest(service=SPARK))
        assert reply.status == NOT_SERVING
        status, text = await env.get("/readyz")
        assert status == 503
        reasons = json.loads(text)["reasons"]
        assert len(reasons) == 1 and reasons[0].startswith("no driver takes new sessions")
        assert (await env.get("/healthz"))[0] == 200

        env.drivers[:] = [FakeDriver(port=p) for p in ports]  # back on the same addresses
        for d in env.drivers:
            await d.start()
        await _watch_until(watch, SERVING)
        assert await env.get("/readyz") == (200, '{"ready": true}')
        watch.cancel()


async def test_shutdown_turns_readiness_off_before_in_flight_calls_finish() -> None:
    async with _env("memory://", registered=False, shutdown_grace_seconds=30) as env:
        watch = env.health.Watch(health_pb2.HealthCheckRequest(service=SPARK))
        await _watch_until(watch, SERVING)
        # A result stream the client does not read yet stays in flight as long as it likes
        # (flow control holds the driver back): shutdown has to wait for it.
        batches = 64
        request = base_pb2.ExecutePlanRequest(
            session_id=str(uuid.uuid4()), plan=base_pb2.Plan(root=relations_pb2.Relation())
        )
        stream = env.stub.ExecutePlan(
            request,
            metadata=(("x-fake-batches", str(batches)), ("x-fake-batch-bytes", str(1 << 20))),
        )
        assert (await stream.read()).HasField("arrow_batch")

        stopping = asyncio.ensure_future(env.replica.stop())
        await _watch_until(watch, NOT_SERVING)
        watch.cancel()  # a watcher is a call in flight too
        status, text = await env.get("/readyz")
        assert status == 503 and json.loads(text)["reasons"][0].startswith("shutting down")
        assert (await env.get("/healthz"))[0] == 200
        assert (await env.get("/metrics"))[0] == 200
        assert not stopping.done()
        # New calls are refused, so a grpc_health_probe fails too.
        with pytest.raises(grpc.aio.AioRpcError):
            await env.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)

        # The call in flight finishes within the grace, then the replica stops, admin last.
        received = 1
        while (message := await stream.read()) is not grpc.aio.EOF:
            received += message.HasField("arrow_batch")
        assert received == batches and await stream.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 20)
        with pytest.raises(aiohttp.ClientConnectionError):
            await env.get("/healthz")


async def test_readiness_follows_a_registry_outage() -> None:
    server = RedisServer()
    server.start()
    try:
        async with _env(server.url, registered=False, **FAST_PROBES) as env:
            assert (await env.get("/readyz"))[0] == 200
            server.stop()

            async def unready() -> bool:
                status, text = await env.get("/readyz")
                return status == 503 and "registry unreachable" in text

            await _poll(unready, "/readyz to report the registry outage")
            # Sessions can still be placed (by the ring alone): gRPC health stays SERVING.
            reply = await env.health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == SERVING
            server.start()

            async def ready() -> bool:
                return (await env.get("/readyz"))[0] == 200

            await _poll(ready, "/readyz to be ready again")
    finally:
        server.stop()


async def test_admin_listener_off_and_busy() -> None:
    driver = FakeDriver()
    await driver.start()
    try:
        settings = {"listen": "127.0.0.1:0", "drivers": [driver.address]}
        async with Replica(load_settings(admin_listen="off", **settings)) as replica:
            assert replica.admin is None and replica.admin_port == 0
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = f"127.0.0.1:{taken.getsockname()[1]}"
            replica = Replica(load_settings(admin_listen=busy, **settings))
            with pytest.raises(StartupError, match=f"cannot listen on admin_listen {busy}"):
                await replica.start()
            await replica.stop(0)
    finally:
        await driver.stop()


# --- the CLI against `spark-router serve` -----------------------------------------------


@pytest.fixture
def driver_procs() -> Iterator[list[str]]:
    """Two fake drivers in processes of their own; their addresses."""
    procs = [spawn(["-m", "loadtest.fake_driver", "--listen", "127.0.0.1:0"]) for _ in range(2)]
    try:
        lines = [read_line_matching(p, "listening on", timeout=30) for p in procs]
        yield [line.rsplit(" ", 1)[1].strip() for line in lines]
    finally:
        for p in procs:
            stop(p)


def _cli(*args: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    extra = ["--admin-token", token] if token else []
    proc = spawn(["-m", "router.cli", *args, *extra], capture_stderr=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    return proc.returncode, out, err


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def test_cli_drivers_sessions_and_drain_through_the_admin_api(
    redis_url: str, driver_procs: list[str]
) -> None:
    async def register() -> None:
        store = open_registry(redis_url)
        try:
            for address in driver_procs:
                await store.upsert_driver(Driver(address), ttl=None)
        finally:
            await store.close()

    asyncio.run(register())
    port, admin_port = free_port(), free_port()
    args = ["-m", "router.cli", "serve", "--listen", f"127.0.0.1:{port}"]
    args += ["--admin-listen", f"127.0.0.1:{admin_port}", "--registry", redis_url]
    for address in driver_procs:
        args += ["--driver", address]
    router = spawn(args, env={"SPARK_ROUTER_ADMIN_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{admin_port}"
    try:
        wait_until(lambda: _ready(url) or router.poll() is not None, 30, "the router's /readyz")
        assert router.poll() is None, stderr_of(router)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _drive_the_cli(Stub(channel), url, driver_procs)
    finally:
        code = stop(router)
    assert code == 0, stderr_of(router)


def _drive_the_cli(stub: Stub, url: str, addresses: Sequence[str]) -> None:
    seen: dict[str, str] = {}  # session -> the server-side id its client saw, as pyspark keeps
    where: dict[str, str] = {}  # session -> the driver its last call reached

    def address_of(session: str) -> str:
        request = _config(session, user="carol", observed=seen.get(session))
        response = stub.Config(request, timeout=20)
        seen.setdefault(session, response.server_side_session_id)
        port = int(response.pairs[0].value)
        where[session] = next(a for a in addresses if a.endswith(f":{port}"))
        return where[session]

    sessions = {s: address_of(s) for s in (str(uuid.uuid4()) for _ in range(12))}
    counts = Counter(sessions.values())
    assert len(counts) == 2

    code, out, err = _cli("drivers", "--admin", url, "--json")
    assert code == 0, err
    listed = {d["address"]: (d["state"], d["health"], d["sessions"]) for d in json.loads(out)}
    assert listed == {a: ("active", "up", counts[a]) for a in addresses}
    code, out, _ = _cli("drivers", "--admin", url)
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["ADDRESS", "POOL", "WEIGHT", "STATE", "HEALTH", "DRAIN", "SESSIONS"]
    assert [addresses[0], "default", "1", "active", "up", "-", str(counts[addresses[0]])] in rows

    drained, other = addresses
    code, out, _ = _cli("sessions", "--admin", url, "--driver", drained, "--json")
    assert code == 0
    mine = {s for s, a in sessions.items() if a == drained}
    assert {r["session_id"] for r in json.loads(out)} == mine
    one = next(iter(mine))
    code, out, _ = _cli("sessions", "--admin", url, "--session", one)
    rows = [line.split() for line in out.splitlines()]
    assert code == 0 and rows[1][:5] == [one, drained, "default", "carol", rows[1][4]]
    code, _, err = _cli("sessions", "--admin", url, "--session", "nope")
    assert code == 1 and "no session 'nope'" in err

    # drain: the replica places no new session there; --undo takes the mark off.
    code, out, _ = _cli("drain", drained, "--admin", url)
    assert code == 0 and f"driver {drained} is draining" in out
    assert {address_of(str(uuid.uuid4())) for _ in range(20)} == {other}
    code, out, _ = _cli("drain", drained, "--admin", url, "--undo")
    assert code == 0 and "takes new sessions again" in out
    assert drained in {address_of(str(uuid.uuid4())) for _ in range(30)}

    # move-idle: each session leaves on its next call; then --wait finds the driver empty.
    on_drained = {s for s, a in where.items() if a == drained}
    code, out, _ = _cli("drain", drained, "--admin", url, "--move-idle", "--json")
    assert code == 0 and json.loads(out)["drain"] == "move-idle"
    for s in on_drained:
        assert address_of(s) == other
    code, out, _ = _cli("drain", drained, "--admin", url, "--move-idle", "--wait", "10", "--json")
    assert code == 0 and json.loads(out) == {
        "address": drained,
        "drain": "move-idle",
        "sessions": 0,
    }

    code, _, err = _cli("drivers", "--admin", url, token=None)
    assert code == 3 and "401" in err and "Authorization: Bearer" in err


def test_every_worker_binds_the_admin_port(driver_procs: list[str]) -> None:
    port, admin_port = free_port(), free_port()
    args = ["-m", "router.cli", "serve", "--listen", f"127.0.0.1:{port}", "--workers", "2"]
    args += ["--admin-listen", f"127.0.0.1:{admin_port}", "--driver", driver_procs[0]]
    router = spawn(args)
    url = f"http://127.0.0.1:{admin_port}"

    def listening_workers() -> int:
        workers = psutil.Process(router.pid).children()
        return sum(
            any(c.laddr.port == admin_port and c.status == "LISTEN" for c in w.net_connections())
            for w in workers
        )

    try:
        wait_until(lambda: listening_workers() == 2 or router.poll() is not None, 30, "2 workers")
        assert router.poll() is None, stderr_of(router)
        wait_until(lambda: _ready(url), 30, "/readyz of a worker")
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            assert resp.status == 200 and b"spark_router_" in resp.read()
    finally:
        code = stop(router)
    assert code == 0, stderr_of(router)


@pytest.mark.parametrize("given_by", ["flag", "env"])
def test_up_refuses_a_taken_admin_port_before_starting_drivers(given_by: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        args = ["-m", "router.cli", "up", "--listen", f"127.0.0.1:{free_port()}"]
        flag = ["--admin-listen", busy] if given_by == "flag" else []
        env = {"SPARK_ROUTER_ADMIN_LISTEN": busy if given_by == "env" else "127.0.0.1:0"}
        proc = spawn([*args, *flag], env=env, capture_stderr=True)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            stop(proc)
    assert proc.returncode == 3
    assert f"admin_listen: cannot listen on {busy}: in use" in err
    assert "Starting" not in err  # no JVM was started for nothing
