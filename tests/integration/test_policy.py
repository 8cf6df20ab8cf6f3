"""Roles and pools through real replicas: who may use which pool, deny lists, reload, admin.

Two pools of one fake driver each ("etl" and "bi", registered in the real Redis as an agent
would), so the driver a session lands on tells its pool. Users authenticate with bearer
tokens (`auth: token`); the policy file (router/admit/policy.py) says what each may do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml

from loadtest.fake_driver import FakeDriver
from registry import open_registry
from registry.models import Driver, session_key
from router.admit import tokens
from router.server import Replica
from tests.helpers import eventually
from tests.integration.test_admin import _env, _poll
from tests.integration.test_cluster import Cluster, Stub, _settings
from tests.integration.test_ownership import _bearer, _config

# Short, so that reload tests are quick; waits allow many intervals for a loaded CI machine.
RELOAD_SECONDS = 0.2
RELOAD_WAIT = 25 * RELOAD_SECONDS
ROUTER_DEFAULT_POOL = "bi"  # not "etl", so that a role's default_pool is told from it

# Every user the tests authenticate, with the groups their token carries.
USERS: dict[str, list[str]] = {
    "alice": ["analysts"],
    "bob": ["etl-team"],
    "carol": ["analysts", "contractors"],
    "mallory": ["analysts"],
    "erin": ["readers"],
    "frank": ["ops"],
    "dave": ["visitors"],
    "olga": ["sre"],
}


def _new() -> str:
    """A fresh session id."""
    return str(uuid.uuid4())


def _write(path: Path, policy: Mapping[str, Any] | str) -> None:
    """Replace the policy file atomically, as a config map or `mv` would (never half a file)."""
    text = policy if isinstance(policy, str) else yaml.safe_dump(dict(policy), sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class World:
    """The token file, the policy file and the two pools' drivers of one test."""

    redis_url: str
    token_file: Path
    issued: dict[str, str]
    policy_file: Path
    etl: FakeDriver
    bi: FakeDriver

    def write(self, policy: Mapping[str, Any] | str) -> None:
        """Rewrite the policy file."""
        _write(self.policy_file, policy)

    def cluster(self, policy: Mapping[str, Any], replicas: int = 1) -> Cluster:
        """Replicas on the Redis registry with token auth and `policy` as their policy file."""
        self.write(policy)
        settings = _settings(
            self.redis_url,
            auth=["token"],
            token_file=self.token_file,
            policy_file=self.policy_file,
            policy_reload_seconds=RELOAD_SECONDS,
            default_pool=ROUTER_DEFAULT_POOL,
        )
        return Cluster([Replica(settings) for _ in range(replicas)])

    def _metadata(self, user: str, pool: str | None) -> tuple[tuple[str, str], ...]:
        """The user's bearer token, and x-spark-pool if a pool is asked for."""
        pool_header = (("x-spark-pool", pool),) if pool is not None else ()
        return (*_bearer(self.issued[user]), *pool_header)

    async def pool(self, stub: Stub, session: str, user: str, pool: str | None = None) -> str:
        """The pool whose driver answered a Config call of `user` on `session`."""
        resp = await stub.Config(
            _config(session, user), metadata=self._metadata(user, pool), timeout=20
        )
        port = int(resp.pairs[0].value)
        by_port = {self.etl.port: "etl", self.bi.port: "bi"}
        assert port in by_port, f"answered by port {port}, not a pool's driver"
        return by_port[port]

    async def refused(self, stub: Stub, session: str, user: str, pool: str | None = None) -> str:
        """The details of the PERMISSION_DENIED a Config call of `user` on `session` gets."""
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Config(
                _config(session, user), metadata=self._metadata(user, pool), timeout=20
            )
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, err.value
        return err.value.details() or ""

    def reached(self, session: str) -> bool:
        """Whether any driver saw a call of `session`."""
        return any(c.session_id == session for d in (self.etl, self.bi) for c in d.calls)


@pytest.fixture
async def world(redis_url: str, drivers: list[FakeDriver], tmp_path: Path) -> AsyncIterator[World]:
    """Tokens for USERS, drivers[0] registered in pool etl and drivers[1] in pool bi."""
    token_file = tmp_path / "tokens.yaml"
    issued = {user: tokens.add(token_file, user, groups) for user, groups in USERS.items()}
    etl, bi = drivers
    store = open_registry(redis_url)
    try:
        await store.upsert_driver(Driver(etl.address, pool="etl"), ttl=None)
        await store.upsert_driver(Driver(bi.address, pool="bi"), ttl=None)
    finally:
        await store.close()
    yield World(redis_url, token_file, issued, tmp_path / "policy.yaml", etl, bi)


# --- pools by role -----------------------------------------------------------------------


async def test_a_role_allows_the_pool_asked_for_and_refuses_others_naming_pool_and_user(
    world: World,
) -> None:
    policy = {
        "roles": {
            "analysts": {"groups": ["analysts"], "pools": ["etl", "bi"]},
            "loaders": {"users": ["bob"], "pools": ["etl"]},
        }
    }
    async with world.cluster(policy) as cluster:
        stub = cluster.stubs[0]
        assert await world.pool(stub, _new(), "alice", pool="etl") == "etl"
        assert await world.pool(stub, _new(), "alice", pool="bi") == "bi"
        assert await world.pool(stub, _new(), "bob", pool="etl") == "etl"
        # A pool that exists but that bob's roles do not allow, and one nobody has.
        for user, pool in (("bob", "bi"), ("alice", "gpu")):
            s = _new()
            details = await world.refused(stub, s, user, pool=pool)
            assert f"user {user!r} may not use pool {pool!r}" in details, details
            assert not world.reached(s)


async def test_the_default_pool_comes_from_the_first_role_with_one_else_the_router(
    world: World,
) -> None:
    policy = {
        "roles": {
            "loaders": {"groups": ["etl-team"], "pools": ["etl", "bi"], "default_pool": "etl"},
            "readers": {"groups": ["readers"], "pools": ["*"]},
            # frank's roles in file order: none, etl, bi; the first that has one wins.
            "ops-any": {"groups": ["ops"], "pools": ["etl", "bi"]},
            "ops-etl": {"groups": ["ops"], "pools": ["etl"], "default_pool": "etl"},
            "ops-bi": {"groups": ["ops"], "pools": ["bi"], "default_pool": "bi"},
            "narrow": {"users": ["alice"], "pools": ["etl"]},
        }
    }
    async with world.cluster(policy) as cluster:
        stub = cluster.stubs[0]
        assert await world.pool(stub, _new(), "bob") == "etl"  # his group's role's default
        assert await world.pool(stub, _new(), "bob", pool="bi") == "bi"  # the header wins
        assert await world.pool(stub, _new(), "erin") == ROUTER_DEFAULT_POOL  # no default
        assert await world.pool(stub, _new(), "frank") == "etl"
        # No default in her roles and the router's default is not one she may use.
        s = _new()
        details = await world.refused(stub, s, "alice")
        assert f"user 'alice' may not use pool {ROUTER_DEFAULT_POOL!r}" in details, details
        assert not world.reached(s)


async def test_denied_users_and_groups_are_refused_and_others_served(world: World) -> None:
    policy = {
        "roles": {"everyone": {"groups": ["analysts"], "pools": ["*"], "default_pool": "etl"}},
        "deny_users": ["mallory"],
        "deny_groups": ["contractors"],
    }
    async with world.cluster(policy) as cluster:
        stub = cluster.stubs[0]
        # Both are in the role that allows every pool: the deny list comes first.
        for user in ("mallory", "carol"):
            for pool in (None, "etl"):
                s = _new()
                details = await world.refused(stub, s, user, pool=pool)
                assert "deny list" in details and repr(user) in details, details
                assert not world.reached(s)
        assert await world.pool(stub, _new(), "alice") == "etl"


async def test_a_user_in_no_role_is_refused(world: World) -> None:
    policy = {"roles": {"everyone": {"groups": ["analysts"], "pools": ["*"]}}}
    async with world.cluster(policy) as cluster:
        stub = cluster.stubs[0]
        for pool in (None, "etl"):
            s = _new()
            details = await world.refused(stub, s, "dave", pool=pool)
            assert "'dave' has no role" in details, details
            assert not world.reached(s)
        assert await world.pool(stub, _new(), "alice", pool="etl") == "etl"


# --- reload --------------------------------------------------------------------------------


async def _new_sessions_go_to(world: World, stub: Stub, user: str, pool: str) -> None:
    """Wait until a new session of `user` without x-spark-pool lands on `pool`."""

    async def check() -> bool:
        return await world.pool(stub, _new(), user) == pool

    await _poll(check, f"new sessions of {user} to go to {pool}", RELOAD_WAIT)


async def test_a_rewritten_policy_applies_to_new_calls_and_placed_sessions_stay(
    world: World,
) -> None:
    before = {
        "roles": {
            "alice": {"users": ["alice"], "pools": ["etl", "bi"], "default_pool": "etl"},
            "bob": {"users": ["bob"], "pools": ["etl", "bi"], "default_pool": "etl"},
            "carol": {"users": ["carol"], "pools": ["etl"], "default_pool": "etl"},
        }
    }
    after = {
        "roles": {
            "alice": {"users": ["alice"], "pools": ["bi"], "default_pool": "bi"},
            "bob": {"users": ["bob"], "pools": ["etl", "bi"], "default_pool": "bi"},
            "carol": {"users": ["carol"], "pools": ["etl"], "default_pool": "etl"},
        },
        "deny_users": ["carol"],
    }
    # Two replicas: the second knows the sessions from their pins in Redis alone.
    async with world.cluster(before, replicas=2) as cluster:
        first = cluster.stubs[0]
        alice_etl, alice_bi, bob_etl, carol_etl = _new(), _new(), _new(), _new()
        assert await world.pool(first, alice_etl, "alice") == "etl"
        assert await world.pool(first, alice_bi, "alice", pool="bi") == "bi"
        assert await world.pool(first, bob_etl, "bob") == "etl"
        assert await world.pool(first, carol_etl, "carol") == "etl"

        world.write(after)
        for stub in cluster.stubs:
            await _new_sessions_go_to(world, stub, "alice", "bi")
            await _new_sessions_go_to(world, stub, "bob", "bi")
        for stub in cluster.stubs:
            details = await world.refused(stub, _new(), "alice", pool="etl")
            assert "user 'alice' may not use pool 'etl'" in details, details
            # Placed sessions keep their pool and driver while the policy still allows it,
            # even where the new default pool differs (bob's) ...
            assert await world.pool(stub, alice_bi, "alice") == "bi"
            assert await world.pool(stub, bob_etl, "bob") == "etl"
            # ... and are refused once it does not, or the user is denied.
            details = await world.refused(stub, alice_etl, "alice")
            assert "'alice'" in details and "'etl'" in details, details
            details = await world.refused(stub, carol_etl, "carol")
            assert "deny list" in details, details
        registry = cluster.replicas[1].registry
        for user, s, driver in (("alice", alice_bi, world.bi), ("bob", bob_etl, world.etl)):
            pin = await registry.get_pin(session_key(user, s))
            assert pin is not None and pin.driver == driver.address, pin
        assert not any(c.session_id == alice_bi for c in world.etl.calls)
        assert not any(c.session_id == bob_etl for c in world.bi.calls)


async def test_a_placed_session_still_allowed_is_served_when_new_ones_have_no_pool(
    world: World,
) -> None:
    # After the reload alice may use etl but names no default, and the router's default
    # (bi) is not hers: a new session without x-spark-pool has no pool, her etl one does.
    before = {"roles": {"alice": {"users": ["alice"], "pools": ["etl"], "default_pool": "etl"}}}
    after = {"roles": {"alice": {"users": ["alice"], "pools": ["etl"]}}}
    async with world.cluster(before) as cluster:
        stub = cluster.stubs[0]
        placed = _new()
        assert await world.pool(stub, placed, "alice") == "etl"
        world.write(after)

        async def reloaded() -> bool:
            try:
                await world.pool(stub, _new(), "alice")
            except grpc.aio.AioRpcError as exc:
                return exc.code() is grpc.StatusCode.PERMISSION_DENIED
            return False

        await _poll(reloaded, "new sessions without a pool to be refused", RELOAD_WAIT)
        assert await world.pool(stub, placed, "alice") == "etl"


@pytest.mark.parametrize(
    "broken",
    [
        "roles: {alice: {users: [alice], pools: [bi]\n",  # not YAML: an unclosed mapping
        yaml.safe_dump({"roles": {"alice": {"users": ["alice"], "pool": ["bi"]}}}),  # a typo
    ],
    ids=["invalid YAML", "invalid policy"],
)
async def test_a_broken_policy_file_keeps_the_previous_policy_with_one_warning(
    world: World, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    caplog.set_level(logging.WARNING)
    good = {"roles": {"alice": {"users": ["alice"], "pools": ["etl"], "default_pool": "etl"}}}
    fixed = {"roles": {"alice": {"users": ["alice"], "pools": ["bi"], "default_pool": "bi"}}}

    def warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and str(world.policy_file) in r.getMessage()
        ]

    async with world.cluster(good) as cluster:
        stub = cluster.stubs[0]
        assert await world.pool(stub, _new(), "alice") == "etl"
        world.write(broken)
        await eventually(lambda: bool(warnings()), "a warning about the broken file", RELOAD_WAIT)
        # For several reload intervals after it, the old policy holds and nobody warns again.
        loop = asyncio.get_running_loop()
        until = loop.time() + 4 * RELOAD_SECONDS
        while loop.time() < until:
            assert await world.pool(stub, _new(), "alice") == "etl"
            details = await world.refused(stub, _new(), "alice", pool="bi")
            assert "may not use pool 'bi'" in details, details
        assert len(warnings()) == 1, warnings()
        # The next good write is picked up.
        world.write(fixed)
        await _new_sessions_go_to(world, stub, "alice", "bi")


# --- the admin API -------------------------------------------------------------------------

ADMIN_ENDPOINTS = [
    ("GET", "/api/drivers"),
    ("POST", "/api/drivers/{driver}/drain"),
    ("DELETE", "/api/drivers/{driver}/drain"),
    ("GET", "/api/sessions"),
    ("GET", "/api/sessions/{session}"),
    ("POST", "/api/sessions/{session}/move"),
]


@pytest.mark.parametrize(("method", "template"), ADMIN_ENDPOINTS)
async def test_every_admin_endpoint_needs_an_admin_role(
    redis_url: str, tmp_path: Path, method: str, template: str
) -> None:
    token_file = tmp_path / "tokens.yaml"
    issued = {user: tokens.add(token_file, user, USERS[user]) for user in ("alice", "olga")}
    policy_file = tmp_path / "policy.yaml"
    _write(
        policy_file,
        {
            "roles": {
                "admins": {"users": ["olga"], "pools": ["*"], "admin": True},
                "analysts": {"groups": ["analysts"], "pools": ["*"]},
            }
        },
    )
    # Neither admin_users, admin_groups nor admin_token: only the policy makes an admin.
    settings: dict[str, Any] = {
        "auth": ["token"],
        "token_file": token_file,
        "policy_file": policy_file,
        "policy_reload_seconds": RELOAD_SECONDS,
    }
    async with _env(redis_url, registered=True, **settings) as env:
        s = _new()
        await env.stub.Config(_config(s, "alice"), metadata=_bearer(issued["alice"]), timeout=20)
        path = template.format(driver=env.drivers[0].address, session=s)

        async def state() -> tuple[Any, Any]:
            """What the writing endpoints change: drain marks and the session's pin."""
            drivers = await env.api("GET", "/api/drivers", token=issued["olga"])
            session = await env.api("GET", f"/api/sessions/{s}", token=issued["olga"])
            return drivers, session

        seen = await state()
        status, body = await env.api(method, path, token=issued["alice"])
        assert status == 403 and "'alice'" in body["error"], (status, body)
        assert await state() == seen  # refused before it did anything
        status, body = await env.api(method, path, token=issued["olga"])
        assert status == 200, (status, body)


# --- the denials metric --------------------------------------------------------------------


async def test_denials_are_counted_by_reason(world: World) -> None:
    policy = {
        "roles": {"everyone": {"groups": ["analysts"], "pools": ["etl"]}},
        "deny_users": ["mallory"],
        "deny_groups": ["contractors"],
    }
    async with world.cluster(policy) as cluster:
        stub, telemetry = cluster.stubs[0], cluster.replicas[0].telemetry
        reasons = ("deny_list", "no_role", "pool")

        def counts() -> dict[str, float]:
            return {r: telemetry.value("spark_router_denials_total", reason=r) for r in reasons}

        start = counts()
        await world.refused(stub, _new(), "mallory")  # deny_list: the user
        await world.refused(stub, _new(), "carol", pool="etl")  # deny_list: her group
        await world.refused(stub, _new(), "dave")  # no_role
        await world.refused(stub, _new(), "alice", pool="bi")  # pool
        assert await world.pool(stub, _new(), "alice", pool="etl") == "etl"  # not counted
        end = counts()
        assert {r: end[r] - start[r] for r in reasons} == {"deny_list": 2, "no_role": 1, "pool": 1}
