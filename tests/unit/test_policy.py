"""The policy's pure decisions (router/admit/policy.py): pools, default pools, deny, admin."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.admit.auth import ANONYMOUS, Identity
from router.admit.policy import Policy, PolicyError
from router.admit.policy_file import Loaded, PolicyFile, read_policy, read_policy_file
from router.config import ConfigError, Settings
from router.errors import PermissionDenied, PolicyDenied

POLICY = {
    "roles": {
        "analysts": {"groups": ["analytics"], "pools": ["default", "bi"], "default_pool": "bi"},
        "etl": {"users": ["ann"], "pools": ["etl"], "default_pool": "etl"},
        "platform": {"groups": ["platform"], "pools": ["*"], "admin": True},
    },
    "deny_users": ["mallory"],
    "deny_groups": ["contractors"],
}


def who(user: str, *groups: str) -> Identity:
    return Identity(user, frozenset(groups), "token")


@pytest.fixture
def policy() -> Policy:
    return Policy.parse(POLICY, default_pool="default")


def test_a_pool_a_role_allows_is_used_and_others_are_refused_naming_both(policy: Policy) -> None:
    assert policy.pool_for(who("bob", "analytics"), "default") == "default"
    with pytest.raises(PermissionDenied) as err:
        policy.pool_for(who("bob", "analytics"), "etl")
    assert "'bob' may not use pool 'etl'" in str(err.value)
    assert "bi, default" in str(err.value)


def test_without_a_pool_the_first_roles_default_pool_is_used(policy: Policy) -> None:
    assert policy.pool_for(who("bob", "analytics"), None) == "bi"
    assert policy.pool_for(who("ann"), None) == "etl"
    # In two roles: the file's first role with a default wins; both roles' pools are allowed.
    assert policy.pool_for(who("ann", "analytics"), None) == "bi"
    assert policy.pool_for(who("ann", "analytics"), "etl") == "etl"
    # A role without a default pool sends calls to the router's default pool.
    assert policy.pool_for(who("root", "platform"), None) == "default"
    assert policy.pool_for(who("root", "platform"), "any-pool") == "any-pool"


def test_the_deny_list_and_callers_without_a_role_are_refused(policy: Policy) -> None:
    for caller in (who("mallory", "platform"), who("carl", "analytics", "contractors")):
        with pytest.raises(PermissionDenied, match="deny list"):
            policy.pool_for(caller, "default")
        assert not policy.is_admin(caller, Settings())
    with pytest.raises(PermissionDenied, match="no role"):
        policy.pool_for(who("eve", "sales"), None)


def test_admin_comes_from_an_admin_role_or_the_settings(policy: Policy) -> None:
    assert policy.is_admin(who("root", "platform"), Settings())
    assert not policy.is_admin(who("bob", "analytics"), Settings())
    assert policy.is_admin(who("bob", "analytics"), Settings(admin_users=["bob"]))
    assert not policy.is_admin(ANONYMOUS, Settings(admin_users=[""]))


def test_an_empty_policy_lets_nobody_in() -> None:
    with pytest.raises(PermissionDenied, match="no role"):
        Policy.parse({}, "default").pool_for(who("bob"), None)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"roles": {"r": {"pools": ["a"], "default_pool": "b"}}}, "default_pool 'b' is not one"),
        ({"roles": {"r": {"pool": ["a"]}}}, "policy.roles.r.pool: Extra inputs"),
        ({"rolez": {}}, "policy.rolez"),
        ({"roles": {"r": {"users": "ann"}}}, "policy.roles.r.users"),
    ],
)
def test_a_bad_policy_is_refused_saying_where(data: dict[str, object], says: str) -> None:
    with pytest.raises(PolicyError) as err:
        Policy.parse(data, "default")
    assert says in str(err.value)


def test_each_refusal_says_its_reason(policy: Policy) -> None:
    cases = [("mallory", (), "deny_list"), ("zed", (), "no_role"), ("bob", ("analytics",), "pool")]
    for user, groups, reason in cases:
        with pytest.raises(PolicyDenied) as err:
            policy.pool_for(who(user, *groups), "etl")
        assert err.value.reason == reason, user


def test_a_placed_sessions_pool_is_checked_against_the_policy_of_now(policy: Policy) -> None:
    policy.check_pool(who("ann"), "etl")
    with pytest.raises(PolicyDenied, match="'ann' may not use pool 'bi'"):
        policy.check_pool(who("ann"), "bi")
    with pytest.raises(PolicyDenied, match="deny list"):
        policy.check_pool(who("ann", "contractors"), "etl")


def test_the_policy_file_is_read_at_its_top_level_or_under_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    assert [r.name for r in read_policy(path, "default").roles] == ["analysts", "etl", "platform"]
    path.write_text(yaml.safe_dump({"policy": POLICY}))
    assert len(read_policy(path, "default").roles) == 3
    path.write_text("roles: [1, 2")
    with pytest.raises(PolicyError, match=f"policy file {path} is not valid YAML"):
        read_policy(path, "default")
    path.write_text("roles:\n  x:\n    pools: [a]\n    default_pool: b\n")
    with pytest.raises(PolicyError, match=r"policy file .*roles\.x.*default_pool 'b'"):
        read_policy(path, "default")


async def test_a_changed_file_swaps_the_policy_and_a_broken_one_keeps_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    held = PolicyFile(path, "default", reload_seconds=60)
    first = held.current
    assert not await held.reload()  # unchanged
    changed = {**POLICY, "deny_users": ["bob"]}
    path.write_text(yaml.safe_dump(changed) + "\n# a longer file: a new size\n")
    assert await held.reload()
    with pytest.raises(PolicyDenied, match="deny list"):
        held.current.pool_for(who("bob", "analytics"), None)
    swapped = held.current
    path.write_text("roles: [")
    assert not await held.reload()
    assert held.current is swapped and swapped is not first
    assert "keeping the policy loaded before" in caplog.text
    path.unlink()
    with pytest.raises(ConfigError, match="policy file"):
        PolicyFile(path, "default", reload_seconds=60)


# --- quotas: in the policy file ---------------------------------------------------------------

QUOTAS = {"default": {"sessions": 10}, "users": {"ann": {"sessions": 3, "running": 1}}}


def test_quotas_are_read_beside_the_roles_or_under_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    assert not read_policy_file(path, "default").quotas.active  # none: no quotas at all
    for data in (
        {**POLICY, "quotas": QUOTAS},
        {"policy": {**POLICY, "quotas": QUOTAS}},
        {"policy": POLICY, "quotas": QUOTAS},
    ):
        path.write_text(yaml.safe_dump(data))
        loaded = read_policy_file(path, "default")
        assert len(loaded.policy.roles) == 3
        ann = loaded.quotas.for_user("ann", frozenset())
        assert ann.sessions is not None and ann.sessions.value == 3
        assert ann.sessions.source == "quotas.users.ann.sessions"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {**POLICY, "quotas": {"users": {"ann": {"sessions": -1}}}},
            r"quotas\.users\.ann\.sessions",
        ),
        ({**POLICY, "quotas": {"default": {"burst": 5}}}, r"quotas\.default.*burst needs"),
        ({**POLICY, "quotas": [1, 2]}, "quotas must be a mapping"),
        ({"policy": {**POLICY, "quotas": QUOTAS}, "quotas": QUOTAS}, "quotas is given twice"),
    ],
)
def test_bad_quotas_name_the_file_and_the_place(
    tmp_path: Path, data: dict[str, object], message: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError, match=f"policy file {path}: .*{message}"):
        read_policy_file(path, "default")


async def test_a_reload_swaps_policy_and_quotas_together_and_a_broken_file_keeps_both(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({**POLICY, "quotas": QUOTAS}))
    held = PolicyFile(path, "default", reload_seconds=60)
    swapped: list[Loaded] = []
    held.follow(swapped.append)
    first = (held.current, held.quotas)
    assert held.quotas.active
    path.write_text(yaml.safe_dump({**POLICY, "deny_users": ["bob"]}) + "# no quotas now\n")
    assert await held.reload()
    assert not held.quotas.active and held.current is not first[0]
    assert swapped == [Loaded(held.current, held.quotas)]
    now = (held.current, held.quotas)
    path.write_text(yaml.safe_dump({**POLICY, "quotas": {"default": {"running": "x"}}}))
    assert not await held.reload()
    assert held.current is now[0] and held.quotas is now[1] and len(swapped) == 1
    assert "quotas.default.running" in caplog.text
    assert "keeping the policy loaded before (and its quotas)" in caplog.text
