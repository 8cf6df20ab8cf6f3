"""Sessions are (user, session id), and with authentication on, a session id is one user's.

Fake drivers (the `drivers` fixture) key their sessions by (user_id, session_id), as Spark
does; two replicas share one real Redis, so what one replica decides the other must honour.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
import grpc.aio
import pytest
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

from loadtest.fake_driver import FakeDriver
from registry.models import session_key
from router.admit import tokens
from router.config import Settings, load_settings
from router.server import Replica
from router.sessions import journal
from tests.integration.test_cluster import Cluster

Stub = base_pb2_grpc.SparkConnectServiceStub
PORT_KEY = "spark.connect.grpc.binding.port"


def _config(session: str, user: str, **conf: str) -> base_pb2.ConfigRequest:
    req = base_pb2.ConfigRequest(session_id=session)
    req.user_context.user_id = user
    if conf:
        for k, v in conf.items():
            req.operation.set.pairs.add(key=k, value=v)
    else:
        req.operation.get.keys.append(PORT_KEY)
    return req


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _settings(redis_url: str, drivers: Sequence[FakeDriver], **extra: object) -> Settings:
    return load_settings(
        listen="127.0.0.1:0",
        admin_listen="off",
        registry=redis_url,
        drivers=[d.address for d in drivers],
        **extra,
    )


async def test_without_auth_another_users_release_leaves_the_session_alone(
    redis_url: str, drivers: list[FakeDriver]
) -> None:
    async with Cluster([Replica(_settings(redis_url, drivers)) for _ in range(2)]) as cluster:
        a, b = cluster.stubs
        s = str(uuid.uuid4())
        await a.Config(_config(s, "alice", **{"spark.sql.shuffle.partitions": "7"}), timeout=10)
        port = (await a.Config(_config(s, "alice"), timeout=10)).pairs[0].value
        registry = cluster.replicas[0].registry
        before = await registry.journal(session_key("alice", s))
        assert before  # the conf is journaled
        # mallory sends alice's session id with her own user: her own session, on any replica.
        await b.Config(_config(s, "mallory"), timeout=10)
        await b.ReleaseSession(
            base_pb2.ReleaseSessionRequest(
                session_id=s, user_context=base_pb2.UserContext(user_id="mallory")
            ),
            timeout=10,
        )
        pin = await registry.get_pin(session_key("alice", s))
        assert pin is not None and pin.owner == "alice" and pin.driver.endswith(f":{port}")
        assert await registry.journal(session_key("alice", s)) == before
        assert await registry.get_pin(session_key("mallory", s)) is None
        # alice goes on through either replica, on her driver, with her conf.
        for stub in cluster.stubs:
            assert (await stub.Config(_config(s, "alice"), timeout=10)).pairs[0].value == port


@pytest.fixture
def token_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "tokens.yaml"
    issued = {user: tokens.add(path, user, ["analysts"]) for user in ("alice", "mallory")}
    return path, issued


async def test_the_authenticated_user_replaces_the_claimed_one(
    redis_url: str, drivers: list[FakeDriver], token_file: tuple[Path, dict[str, str]]
) -> None:
    path, issued = token_file
    settings = _settings(redis_url, drivers, auth=["token"], token_file=path)
    async with Cluster([Replica(settings), Replica(settings)]) as cluster:
        a, _ = cluster.stubs
        s = str(uuid.uuid4())
        md = (*_bearer(issued["alice"]), ("x-spark-user", "root"))
        await a.Config(_config(s, "root"), metadata=md, timeout=10)
        seen = [c for d in drivers for c in d.calls if c.session_id == s]
        assert seen and all(c.user_id == "alice" for c in seen)
        # Credentials and identity headers are the router's, never the driver's.
        assert all("authorization" not in c.metadata for c in seen)
        assert all("x-spark-user" not in c.metadata for c in seen)
        pin = await cluster.replicas[1].registry.get_pin(session_key("alice", s))
        assert pin is not None and pin.owner == "alice"


async def test_a_foreign_session_id_is_refused_on_every_replica(
    redis_url: str, drivers: list[FakeDriver], token_file: tuple[Path, dict[str, str]]
) -> None:
    path, issued = token_file
    settings = _settings(redis_url, drivers, auth=["token"], token_file=path)
    async with Cluster([Replica(settings), Replica(settings)]) as cluster:
        s = str(uuid.uuid4())
        await cluster.stubs[0].Config(
            _config(s, "alice", **{"spark.sql.shuffle.partitions": "7"}),
            metadata=_bearer(issued["alice"]),
            timeout=10,
        )
        for stub in cluster.stubs:
            for claimed in ("alice", "mallory"):  # whatever user_id mallory claims
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Config(
                        _config(s, claimed), metadata=_bearer(issued["mallory"]), timeout=10
                    )
                assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
                assert "belongs to another user" in (refused.value.details() or "")
        assert not [c for d in drivers for c in d.calls if c.user_id == "mallory"]
        # alice herself goes on through both.
        for stub in cluster.stubs:
            await stub.Config(_config(s, "alice"), metadata=_bearer(issued["alice"]), timeout=10)
        refusals = cluster.replicas[0].telemetry.value(
            "spark_router_authentications_total", mode="token", result="ok"
        )
        assert refusals >= 1


async def test_reject_mode_refuses_a_claimed_user_naming_both(
    redis_url: str, drivers: list[FakeDriver], token_file: tuple[Path, dict[str, str]]
) -> None:
    path, issued = token_file
    settings = _settings(redis_url, drivers, auth=["token"], token_file=path, identity="reject")
    async with Cluster([Replica(settings), Replica(settings)]) as cluster:
        stub = cluster.stubs[0]
        s = str(uuid.uuid4())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Config(_config(s, "bob"), metadata=_bearer(issued["alice"]), timeout=10)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        details = refused.value.details() or ""
        assert "'bob'" in details and "'alice'" in details
        assert issued["alice"] not in details
        await stub.Config(_config(s, "alice"), metadata=_bearer(issued["alice"]), timeout=10)


async def test_missing_or_unknown_tokens_are_unauthenticated(
    redis_url: str, drivers: list[FakeDriver], token_file: tuple[Path, dict[str, str]]
) -> None:
    path, issued = token_file
    settings = _settings(redis_url, drivers, auth=["token"], token_file=path)
    async with Cluster([Replica(settings), Replica(settings)]) as cluster:
        stub = cluster.stubs[0]
        s = str(uuid.uuid4())
        wrong = issued["alice"][:-4] + "xxxx"
        for md in ((), _bearer(wrong), (("authorization", "Basic YWxpY2U6cHc="),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Config(_config(s, "alice"), metadata=md, timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            details = refused.value.details() or ""
            assert "token" in details  # says what to send
            assert wrong not in details and issued["alice"] not in details
        assert not [c for d in drivers for c in d.calls if c.session_id == s]


async def test_the_driver_token_replaces_the_clients_authorization(
    redis_url: str, drivers: list[FakeDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARK_ROUTER_DRIVER_TOKEN", "driver-secret-1")
    async with Cluster([Replica(_settings(redis_url, drivers)) for _ in range(2)]) as cluster:
        s = str(uuid.uuid4())
        await cluster.stubs[0].Config(
            _config(s, "alice"), metadata=_bearer("client-secret-2"), timeout=10
        )
        seen = [c for d in drivers for c in d.calls if c.session_id == s]
        assert seen and all(c.metadata["authorization"] == "Bearer driver-secret-1" for c in seen)


async def test_clones_live_on_their_sources_driver_with_a_journal_of_their_own(
    redis_url: str, drivers: list[FakeDriver]
) -> None:
    async with Cluster([Replica(_settings(redis_url, drivers)) for _ in range(2)]) as cluster:
        a, b = cluster.stubs
        s = str(uuid.uuid4())
        await a.Config(_config(s, "alice", **{"spark.sql.shuffle.partitions": "7"}), timeout=10)
        port = (await a.Config(_config(s, "alice"), timeout=10)).pairs[0].value
        clones = []
        for _ in range(10):
            req = base_pb2.CloneSessionRequest(session_id=s)
            req.user_context.user_id = "alice"
            clones.append((await a.CloneSession(req, timeout=10)).new_session_id)
        registry = cluster.replicas[1].registry
        source_journal = await registry.journal(session_key("alice", s))
        assert source_journal
        for clone in clones:
            # Through the other replica too: on the source's driver, whatever the ring says.
            assert (await b.Config(_config(clone, "alice"), timeout=10)).pairs[0].value == port
            pin = await registry.get_pin(session_key("alice", clone))
            assert pin is not None and pin.owner == "alice" and pin.driver.endswith(f":{port}")
            copied = await registry.journal(session_key("alice", clone))
            assert copied is not None and len(copied) == len(source_journal)
            for raw in copied:  # the clone's own entries: they name the clone
                entry = journal.JournalEntry.decode(raw)
                assert base_pb2.ConfigRequest.FromString(entry.request).session_id == clone
        # A conf set on one clone is journaled for that clone alone.
        await b.Config(_config(clones[0], "alice", **{"spark.sql.ansi.enabled": "false"}))
        assert len(await registry.journal(session_key("alice", clones[0])) or []) == 2
        assert len(await registry.journal(session_key("alice", clones[1])) or []) == 1
        assert len(await registry.journal(session_key("alice", s)) or []) == 1
