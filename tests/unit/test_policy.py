"""The policy's pure decisions (router/admit/policy.py): pools, default pools, deny, admin."""

from __future__ import annotations

import pytest

from router.admit.auth import ANONYMOUS, Identity
from router.admit.policy import Policy, PolicyError
from router.config import Settings
from router.errors import PermissionDenied

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
