"""Quotas through two real replicas sharing the real Redis: sessions, running operations,
calls per second, the Redis cost of a known session's call, the admin endpoint and the CLI.

Users authenticate with bearer tokens (`auth: token`); one role lets every user use every
pool, and the policy file's `quotas:` (router/admit/quotas.py) says how much each may do.
Calls go through both replicas at once; `dave` has no quota of his own and must never be
refused, whatever the others do.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
import yaml
from click.testing import CliRunner
from pyspark.sql.connect.proto import base_pb2

from loadtest.fake_driver import FakeDriver
from router.admin.client import AdminControl, ControlError
from router.admit import tokens
from router.cli import cli
from router.server import Replica
from tests.helpers import eventually
from tests.integration.test_cluster import Cluster, Stub, _commands, _settings

USERS: dict[str, list[str]] = {
    "alice": ["users"],  # sessions
    "bob": ["users"],  # running operations
    "carol": ["users"],  # calls per second
    "erin": ["users"],  # the Redis cost of a steady stream
    "dave": ["users"],  # nobody limits dave
    "root": ["platform"],  # the admin
}
POLICY: dict[str, Any] = {
    "roles": {
        "users": {"groups": ["users"], "pools": ["*"]},
        "platform": {"groups": ["platform"], "pools": ["*"], "admin": True},
    }
}
PORT_KEY = "spark.connect.grpc.binding.port"
RELOAD_SECONDS = 0.2


def _new() -> str:
    return str(uuid.uuid4())


def _user(name: str) -> base_pb2.UserContext:
    context = base_pb2.UserContext()
    context.user_id = name
    return context


@dataclass
class World:
    """Tokens, the policy file and the two fake drivers of one test."""

    redis_url: str
    token_file: Path
    issued: dict[str, str]
    policy_file: Path
    drivers: list[FakeDriver]

    def write(self, quotas: Mapping[str, Any]) -> None:
        """Rewrite the policy file atomically with these quotas."""
        text = yaml.safe_dump({**POLICY, "quotas": dict(quotas)}, sort_keys=False)
        tmp = self.policy_file.with_name(self.policy_file.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.policy_file)

    def cluster(self, quotas: Mapping[str, Any], **settings: object) -> Cluster:
        """Two replicas on the Redis registry, token auth, `quotas` in their policy file."""
        self.write(quotas)
        replicas = [
            Replica(
                _settings(
                    self.redis_url,
                    [d.address for d in self.drivers],
                    auth=["token"],
                    token_file=self.token_file,
                    policy_file=self.policy_file,
                    policy_reload_seconds=RELOAD_SECONDS,
                    **settings,
                )
            )
            for _ in range(2)
        ]
        return Cluster(replicas)

    def md(self, user: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.issued[user]}"), *extra)

    async def config(self, stub: Stub, user: str, session: str) -> int:
        """A Config call of `user` on `session`: the port of the driver that answered."""
        request = base_pb2.ConfigRequest(session_id=session, user_context=_user(user))
        request.operation.get.keys.append(PORT_KEY)
        response = await stub.Config(request, metadata=self.md(user), timeout=20)
        return int(response.pairs[0].value)

    def execute(self, stub: Stub, user: str, session: str, *extra: tuple[str, str]) -> Any:
        """An ExecutePlan stream of `user` on `session` (started, not read)."""
        request = base_pb2.ExecutePlanRequest(
            session_id=session, user_context=_user(user), operation_id=_new()
        )
        return stub.ExecutePlan(request, metadata=self.md(user, *extra), timeout=60)

    def executions(self, session: str) -> int:
        """ExecutePlan calls of `session` the drivers have seen."""
        return sum(
            1
            for d in self.drivers
            for c in d.calls
            if c.method == "ExecutePlan" and c.session_id == session
        )


@pytest.fixture
async def world(redis_url: str, drivers: list[FakeDriver], tmp_path: Path) -> AsyncIterator[World]:
    token_file = tmp_path / "tokens.yaml"
    issued = {user: tokens.add(token_file, user, groups) for user, groups in USERS.items()}
    yield World(redis_url, token_file, issued, tmp_path / "policy.yaml", drivers)


async def _exhausted(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The RESOURCE_EXHAUSTED a call ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    return err.value


async def _all(stream: Any) -> list[Any]:
    return [response async for response in stream]


def _refusals(cluster: Cluster, limit: str) -> float:
    return sum(
        r.telemetry.value("spark_router_quota_refusals_total", limit=limit)
        for r in cluster.replicas
    )


# --- sessions ------------------------------------------------------------------------------


async def test_sessions_are_capped_on_every_replica_and_a_release_elsewhere_frees_one(
    world: World,
) -> None:
    async with world.cluster({"users": {"alice": {"sessions": 3}}}) as cluster:
        a, b = cluster.stubs
        mine = [_new() for _ in range(3)]
        for i, session in enumerate(mine):  # through both replicas, alternately
            await world.config(cluster.stubs[i % 2], "alice", session)
        for stub in (a, b):
            refused = await _exhausted(world.config(stub, "alice", _new()))
            details = refused.details() or ""
            assert "user 'alice' is at the limit of 3 sessions (3 open)" in details, details
            assert "quotas.users.alice.sessions" in details
        for session in mine:  # known sessions carry on, on either replica
            await world.config(b, "alice", session)
            await world.config(a, "alice", session)
        for i in range(6):  # and someone else is not limited at all
            await world.config(cluster.stubs[i % 2], "dave", _new())
        assert _refusals(cluster, "sessions") == 2
        # Made through a, released through b: the slot comes back at once, everywhere.
        release = base_pb2.ReleaseSessionRequest(session_id=mine[0], user_context=_user("alice"))
        await b.ReleaseSession(release, metadata=world.md("alice"), timeout=20)
        await world.config(a, "alice", _new())
        await _exhausted(world.config(b, "alice", _new()))
        assert _refusals(cluster, "sessions") == 3


async def test_a_reload_swaps_the_quotas_with_the_policy(world: World) -> None:
    async with world.cluster({"users": {"alice": {"sessions": 1}}}) as cluster:
        a, b = cluster.stubs
        await world.config(a, "alice", _new())
        await _exhausted(world.config(b, "alice", _new()))
        world.write({"users": {"alice": {"sessions": 2}}})
        for replica in cluster.replicas:
            gate = replica.quotas
            assert gate is not None

            def raised(gate: Any = gate) -> bool:
                limit = gate.quotas.for_user("alice", frozenset({"users"})).sessions
                return limit is not None and limit.value == 2

            await eventually(raised, "the new quotas on every replica", timeout=10)
        await world.config(b, "alice", _new())
        await _exhausted(world.config(a, "alice", _new()))


# --- running operations --------------------------------------------------------------------


async def test_running_operations_are_capped_across_replicas_and_free_when_a_stream_ends(
    world: World,
) -> None:
    quick = {
        "quota_idle_seconds": 0.2,
        "quota_sync_seconds": 0.2,
        "quota_slot_lease_seconds": 6.0,
        "quota_slot_wait_seconds": 10.0,
    }
    async with world.cluster({"users": {"bob": {"running": 2}}}, **quick) as cluster:
        a, b = cluster.stubs
        slow = ("x-fake-delay-ms", "60000")  # the driver answers in a minute: the stream stays
        s1, s2 = _new(), _new()
        first = world.execute(a, "bob", s1, slow)
        second = world.execute(b, "bob", s2, slow)
        reading = [asyncio.ensure_future(_all(first)), asyncio.ensure_future(_all(second))]
        try:
            await eventually(
                lambda: world.executions(s1) == 1 and world.executions(s2) == 1,
                "both streams open on the drivers",
                timeout=20,
            )
            for stub in (a, b):
                refused = await _exhausted(_all(world.execute(stub, "bob", _new())))
                details = refused.details() or ""
                assert "user 'bob' is at the limit of 2 running operations (2 running)" in details
                assert "quotas.users.bob.running" in details
            assert _refusals(cluster, "running") == 2
            # Dave's operations are not counted against bob's.
            for stub in (a, b):
                done = await _all(world.execute(stub, "dave", _new(), ("x-fake-batches", "1")))
                assert done[-1].HasField("result_complete")
            first.cancel()  # one stream ends: its slot is free on a, then goes back
            with pytest.raises(asyncio.CancelledError):
                await reading[0]
            gate = cluster.replicas[0].quotas
            assert gate is not None
            await eventually(
                lambda: not any(u["user"] == "bob" for u in gate.usage()["users"]),
                "replica a to hand bob's idle slot back",
                timeout=10,
            )
            third = await _all(world.execute(b, "bob", _new(), ("x-fake-batches", "1")))
            assert third[-1].HasField("result_complete")
            assert _refusals(cluster, "running") == 2
        finally:
            for call in (first, second):
                call.cancel()
            await asyncio.gather(*reading, return_exceptions=True)


# --- calls per second ----------------------------------------------------------------------


async def test_calls_per_second_across_replicas_stay_within_the_documented_bound(
    world: World,
) -> None:
    rate, seconds, pace = 50, 10.0, 60.0  # each replica's client asks 60/s: 120/s in all
    async with world.cluster({"users": {"carol": {"calls_per_second": rate}}}) as cluster:
        loop = asyncio.get_running_loop()
        admitted = 0
        refused: list[grpc.aio.AioRpcError] = []
        dave_calls = 0

        async def traffic(stub: Stub, user: str, per_second: float) -> None:
            nonlocal admitted, dave_calls
            session = _new()
            start = loop.time()
            sent = 0
            while loop.time() - start < seconds:
                try:
                    await world.config(stub, user, session)
                    if user == "dave":
                        dave_calls += 1
                    else:
                        admitted += 1
                except grpc.aio.AioRpcError as exc:
                    assert user != "dave", exc  # dave is never refused
                    refused.append(exc)
                sent += 1
                await asyncio.sleep(max(0.0, start + sent / per_second - loop.time()))  # pace

        began = loop.time()
        await asyncio.gather(
            *(traffic(stub, "carol", pace) for stub in cluster.stubs),
            *(traffic(stub, "dave", 10) for stub in cluster.stubs),
        )
        elapsed = loop.time() - began
        counted = _refusals(cluster, "calls_per_second")
        # Over the limit, a call that only ends things still goes through.
        a = cluster.stubs[0]
        session = _new()
        for _ in range(200):
            try:
                await world.config(a, "carol", session)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                break
        else:
            raise AssertionError("200 calls at once and no refusal")
        release = base_pb2.ReleaseSessionRequest(session_id=session, user_context=_user("carol"))
        await a.ReleaseSession(release, metadata=world.md("carol"), timeout=20)
    # quotas.py: admitted in any T seconds <= r*T + b + N*ceil(r*L) (N=2, b=r, L=1 s).
    bound = rate * elapsed + rate + 2 * rate
    print(f"calls/s quota: {admitted} admitted in {elapsed:.1f}s (bound {bound:.0f})")
    assert rate * seconds * 0.8 <= admitted <= bound, (admitted, bound, len(refused))
    assert refused, "120 calls/s against 50/s: some must be refused"
    for exc in refused:
        assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        details = exc.details() or ""
        assert "user 'carol' is over the limit of 50 calls per second (burst 50)" in details
        trailers = dict(exc.trailing_metadata() or ())
        wait = float(trailers["retry-after"])
        assert 0 < wait <= 2.0, wait
    assert dave_calls >= 2 * 10 * seconds * 0.8
    assert counted == len(refused)


async def test_a_known_sessions_call_costs_a_small_fraction_of_a_redis_command(
    world: World,
) -> None:
    # Leases of up to min(ceil(r * L), b // N) = 2500 tokens: one per ~2500 calls per replica.
    quotas = {"users": {"erin": {"sessions": 10, "running": 4, "calls_per_second": 5000}}}
    async with world.cluster(quotas) as cluster:
        sessions = [_new() for _ in cluster.stubs]
        for stub, session in zip(cluster.stubs, sessions, strict=True):  # steady state first
            for _ in range(300):
                await world.config(stub, "erin", session)
        calls = 2000
        client = aioredis.Redis.from_url(world.redis_url)
        try:
            before = await _commands(client)

            async def worker(stub: Stub, session: str) -> None:
                for _ in range(calls // 8):
                    await world.config(stub, "erin", session)

            await asyncio.gather(
                *(
                    worker(stub, session)
                    for stub, session in zip(cluster.stubs, sessions, strict=True)
                    for _ in range(4)
                )
            )
            after = await _commands(client)
        finally:
            await client.aclose()
    per_call = (after - before) / calls
    print(f"redis commands per known-session call with quotas on: {per_call:.4f}")
    assert per_call <= 0.05, (after - before, calls)


# --- what operators see --------------------------------------------------------------------


async def test_the_admin_endpoint_and_the_cli_show_this_replicas_counts(world: World) -> None:
    async with world.cluster({"users": {"bob": {"running": 2}}}) as cluster:
        a, _ = cluster.stubs
        replica = cluster.replicas[0]
        url = f"http://127.0.0.1:{replica.admin_port}"
        s = _new()
        stream = world.execute(a, "bob", s, ("x-fake-delay-ms", "60000"))
        reading = asyncio.ensure_future(_all(stream))
        try:
            await eventually(lambda: world.executions(s) == 1, "the stream open", timeout=20)
            running = replica.telemetry.value("spark_router_operations_running", pool="default")
            assert running == 1  # the pool's usage, without a user label
            found = await asyncio.to_thread(AdminControl(url, world.issued["root"]).quotas)
            assert found["view"] == "this replica" and found["active"] is True
            gate = replica.quotas
            assert gate is not None and found["replica"] == gate.replica
            assert found["replicas"] in (1, 2)  # as counted at its last renewal
            assert [u for u in found["users"] if u["user"] == "bob"] == [
                {"user": "bob", "running": 1, "slots_leased": 1, "sessions": 1}
            ]
            # Sessions are the cluster's: one opened through the other replica counts too.
            await world.config(cluster.stubs[1], "bob", _new())
            found = await asyncio.to_thread(AdminControl(url, world.issued["root"]).quotas)
            assert [u["sessions"] for u in found["users"] if u["user"] == "bob"] == [2]
            assert found["limits"]["users"] == {"bob": {"running": 2}}
            text = json.dumps(found)
            assert not any(token in text for token in world.issued.values())
            with pytest.raises(ControlError, match="403"):  # not an admin
                await asyncio.to_thread(AdminControl(url, world.issued["dave"]).quotas)
            result = await asyncio.to_thread(
                CliRunner().invoke,
                cli,
                ["quotas", "--admin", url, "--admin-token", world.issued["root"]],
            )
            assert result.exit_code == 0, result.output
            assert "RUNNING HERE" in result.output and "bob" in result.output
            assert "SESSIONS" in result.output
        finally:
            stream.cancel()
            await asyncio.gather(reading, return_exceptions=True)


async def test_a_pools_usage_of_its_rate_is_a_metric_without_user_labels(world: World) -> None:
    quotas = {"pools": {"default": {"calls_per_second": 1000, "burst": 1000}}}
    async with world.cluster(quotas) as cluster:
        a, replica = cluster.stubs[0], cluster.replicas[0]
        session = _new()
        for _ in range(20):
            await world.config(a, "dave", session)

        def seen() -> float:
            return replica.telemetry.value("spark_router_quota_pool_calls", pool="default")

        await eventually(lambda: seen() > 0, "the pool's calls counted at a sync", timeout=10)
        assert seen() <= 20
        exposed = replica.telemetry.exposition()[0].decode()
        lines = [x for x in exposed.splitlines() if x.startswith("spark_router_quota_pool_calls")]
        assert lines and all("user" not in x for x in lines)


async def test_without_a_policy_file_there_are_no_quotas_to_show(router: Replica) -> None:
    assert router.quotas is None
    url = f"http://127.0.0.1:{router.admin_port}"
    found = await asyncio.to_thread(AdminControl(url).quotas)
    assert found["active"] is False and "no policy_file" in found["note"]
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["quotas", "--admin", url])
    assert result.exit_code == 0 and "no policy_file" in result.output, result.output
