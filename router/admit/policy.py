"""May they: decisions about an authenticated identity, pure and synchronous.

Two sources, one answer:
- settings alone (`admin_users`, `admin_groups`): `is_admin`, as before a policy exists;
- a policy (`Policy`, parsed from the policy file by `Policy.parse`): roles with users and
  groups, per role the pools it may use and its default pool, the admin role, a deny list.

Rules of a policy, in order (`Policy.pool_for`):
1. a denied user, or a member of a denied group, is refused everything;
2. the caller's roles are every role naming the user or one of their groups; a caller in
   none is refused (a policy lists who may use the router; nobody is let in by omission);
3. the pool: the one the call asks for (`x-spark-pool`) if one of their roles allows it,
   else refused naming the pool and the user; no pool asked: the default pool of their first
   role (roles in file order) that has one, else the router's `default_pool`, which must then
   be allowed too;
4. admin: a role with `admin: true` (or settings' admin users and groups).
An anonymous identity (auth none, user "") is never an admin, so turning auth off never
turns the admin API open by role. Decisions take a snapshot (the parsed policy) and an
identity; reloading the file swaps the snapshot for new calls, and sessions already placed
stay where they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router.admit.auth import Identity
from router.config import Settings
from router.errors import PolicyDenied

__all__ = [
    "ADMIN_CLOSED",
    "ANY_POOL",
    "Policy",
    "PolicyError",
    "RoleSpec",
    "admin_by_role",
    "is_admin",
    "may_administer",
    "no_admin_role",
]

ANY_POOL = "*"  # in a role's pools: every pool
_MAX_DECIDED = 4096  # callers x pools asked whose decision a snapshot remembers


def is_admin(identity: Identity, settings: Settings) -> bool:
    """Whether the identity may use the admin API (a listed user, or in a listed group)."""
    if not identity.user:
        return False
    if identity.user in settings.admin_users:
        return True
    return not identity.groups.isdisjoint(settings.admin_groups)


# What a caller of the admin API is told when auth is on but nobody holds the admin role.
ADMIN_CLOSED = (
    "the admin API is closed: auth is on but no admin_users, admin_groups or admin_token is set"
)


def admin_by_role(settings: Settings, policy: Policy | None) -> bool:
    """Whether users' credentials may open the admin API: some user or group holds the role."""
    if not settings.auth_enabled:
        return False
    return bool(
        settings.admin_users
        or settings.admin_groups
        or (policy is not None and any(r.spec.admin for r in policy.roles))
    )


def may_administer(identity: Identity, settings: Settings, policy: Policy | None) -> bool:
    """Whether the caller may use the admin API: the policy's answer, else settings' alone."""
    return is_admin(identity, settings) if policy is None else policy.is_admin(identity, settings)


def no_admin_role(identity: Identity) -> str:
    """The refusal of an authenticated caller without the admin role."""
    return (
        f"user {identity.user!r} has no admin role (admin_users, admin_groups, or a "
        "policy role with admin: true)"
    )


class PolicyError(ValueError):
    """The policy file is not a valid policy (the message says where and why)."""


class RoleSpec(BaseModel):
    """One role of the policy file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    users: tuple[str, ...] = Field((), description="users in the role")
    groups: tuple[str, ...] = Field((), description="groups whose members are in the role")
    pools: tuple[str, ...] = Field((), description='pools the role may use ("*": every pool)')
    default_pool: str | None = Field(None, description="pool of calls that name none")
    admin: bool = Field(False, description="may use the admin API (drain, move, sessions)")

    @model_validator(mode="after")
    def _default_is_allowed(self) -> RoleSpec:
        if self.default_pool is not None and not self.allows(self.default_pool):
            raise ValueError(
                f"default_pool {self.default_pool!r} is not one of the role's pools {self.pools}"
            )
        return self

    def allows(self, pool: str) -> bool:
        """Whether the role may use `pool`."""
        return ANY_POOL in self.pools or pool in self.pools


class _PolicySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    roles: dict[str, RoleSpec] = Field(default_factory=dict)
    deny_users: tuple[str, ...] = ()
    deny_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Role:
    """A role as decisions use it."""

    name: str
    spec: RoleSpec

    def has(self, identity: Identity) -> bool:
        """Whether the identity is in the role."""
        spec = self.spec
        return identity.user in spec.users or not identity.groups.isdisjoint(spec.groups)


@dataclass(frozen=True)
class Policy:
    """A parsed policy: a snapshot that decisions read and a reload replaces whole."""

    roles: tuple[Role, ...]
    deny_users: frozenset[str]
    deny_groups: frozenset[str]
    default_pool: str  # the router's own (settings.default_pool)
    # (user, groups, pool asked) -> the pool or the refusal: decided once per caller and
    # snapshot (20 roles cost ~12 µs a call otherwise). Bounded: cleared when full.
    _decided: dict[tuple[str, frozenset[str], str | None], str | PolicyDenied] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None, default_pool: str) -> Policy:
        """The policy in `data` (the file's `policy:` mapping); PolicyError if it is not one."""
        try:
            spec = _PolicySpec.model_validate(data or {})
        except ValidationError as exc:
            raise PolicyError(_explain(exc)) from None
        roles = tuple(Role(name, role) for name, role in spec.roles.items())
        return cls(roles, frozenset(spec.deny_users), frozenset(spec.deny_groups), default_pool)

    def roles_of(self, identity: Identity) -> tuple[Role, ...]:
        """The caller's roles, in file order."""
        return tuple(r for r in self.roles if r.has(identity))

    def _check_not_denied(self, identity: Identity) -> None:
        if identity.user in self.deny_users or not identity.groups.isdisjoint(self.deny_groups):
            raise PolicyDenied(f"user {identity.user!r} is on the router's deny list", "deny_list")

    def pool_for(self, identity: Identity, asked: str | None) -> str:
        """The pool the caller's call goes to; PolicyDenied naming the pool and the user."""
        key = (identity.user, identity.groups, asked)
        decided = self._decided.get(key)
        if decided is None:
            try:
                decided = self._pool_for(identity, asked)
            except PolicyDenied as exc:
                decided = exc
            if len(self._decided) >= _MAX_DECIDED:
                self._decided.clear()
            self._decided[key] = decided
        if isinstance(decided, PolicyDenied):
            raise PolicyDenied(str(decided), decided.reason)
        return decided

    def _pool_for(self, identity: Identity, asked: str | None) -> str:
        self._check_not_denied(identity)
        roles = self.roles_of(identity)
        if not roles:
            raise PolicyDenied(
                f"user {identity.user!r} has no role in the router's policy; ask an operator "
                "to add the user or one of their groups to a role",
                "no_role",
            )
        if asked is None:
            asked = next(
                (r.spec.default_pool for r in roles if r.spec.default_pool), self.default_pool
            )
        if not any(r.spec.allows(asked) for r in roles):
            raise self._not_theirs(identity, asked, roles)
        return asked

    def check_pool(self, identity: Identity, pool: str) -> None:
        """PolicyDenied unless the caller may use `pool` (a placed session's, after a reload)."""
        self._check_not_denied(identity)
        roles = self.roles_of(identity)
        if not any(r.spec.allows(pool) for r in roles):
            raise self._not_theirs(identity, pool, roles)

    @staticmethod
    def _not_theirs(identity: Identity, pool: str, roles: tuple[Role, ...]) -> PolicyDenied:
        allowed = sorted({p for r in roles for p in r.spec.pools})
        return PolicyDenied(
            f"user {identity.user!r} may not use pool {pool!r} "
            f"(their roles allow: {', '.join(allowed) or 'none'})",
            "pool",
        )

    def is_admin(self, identity: Identity, settings: Settings) -> bool:
        """Whether the caller may use the admin API: an admin role, or settings' admins."""
        if not identity.user:
            return False
        if identity.user in self.deny_users or not identity.groups.isdisjoint(self.deny_groups):
            return False
        if any(r.spec.admin for r in self.roles_of(identity)):
            return True
        return is_admin(identity, settings)


def _explain(exc: ValidationError) -> str:
    """A pydantic error as one line per problem, its place in the file first."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "policy"
        lines.append(f"policy.{where}: {error['msg']}")
    return "; ".join(lines)
