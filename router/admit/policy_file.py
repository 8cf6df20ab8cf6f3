"""The policy file (`policy_file`): read at start, swapped whole when it changes.

A replica checks the file's mtime, size and inode every `policy_reload_seconds`. A file that
changed and parses replaces the policy and the quotas together for calls that start
afterwards; a broken one keeps both as loaded before, with one warning per change (the
next good write is picked up). The file holds the mapping `Policy.parse` reads (`roles`,
`deny_users`, `deny_groups`) and `quotas:` (`QuotaSpec.parse`), at its top level or under
a `policy:` key (a `quotas:` beside that `policy:` key is read too, but only one of the two).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from router.admit.auth import Reloader, file_signature
from router.admit.policy import Policy, PolicyError
from router.admit.quotas import QuotaError, Quotas, QuotaSpec
from router.config import ConfigError

log = logging.getLogger(__name__)

_QUOTAS = "quotas"


@dataclass(frozen=True)
class Loaded:
    """What one read of the policy file gave: swapped whole, so both always match."""

    policy: Policy
    quotas: Quotas


def read_policy_file(path: Path, default_pool: str) -> Loaded:
    """The policy and the quotas in the file; PolicyError naming the file and the problem."""
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"policy file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy file {path} is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise PolicyError(f"policy file {path} must be a mapping (roles, deny_users, ...)")
    data = dict(data or {})
    quotas_data = data.pop(_QUOTAS, None)
    if set(data) == {"policy"}:
        inner = data["policy"]
        if inner is not None and not isinstance(inner, dict):
            raise PolicyError(f"policy file {path}: policy must be a mapping (roles, ...)")
        data = dict(inner or {})
        if _QUOTAS in data:
            if quotas_data is not None:
                raise PolicyError(
                    f"policy file {path}: quotas is given twice (at the top and under "
                    "policy); keep one"
                )
            quotas_data = data.pop(_QUOTAS)
    if quotas_data is not None and not isinstance(quotas_data, dict):
        raise PolicyError(
            f"policy file {path}: quotas must be a mapping (default, users, groups, pools)"
        )
    try:
        policy = Policy.parse(data, default_pool)
        quotas = QuotaSpec.parse(quotas_data)
    except (PolicyError, QuotaError) as exc:
        raise PolicyError(f"policy file {path}: {exc}") from None
    return Loaded(policy, quotas)


def read_policy(path: Path, default_pool: str) -> Policy:
    """The policy in the file; PolicyError naming the file and the problem."""
    return read_policy_file(path, default_pool).policy


class PolicyFile:
    """The current policy and quotas of a replica, kept in step with its file."""

    def __init__(self, path: Path, default_pool: str, reload_seconds: float) -> None:
        """Read the file now: ConfigError if it is missing or not a policy."""
        self._path = path
        self._default_pool = default_pool
        self._reload_seconds = reload_seconds
        self._signature = file_signature(path)
        try:
            self._loaded = read_policy_file(path, default_pool)
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None
        self._followers: list[Callable[[Loaded], None]] = []
        self._watch = Reloader(self.reload, reload_seconds, "policy file")

    @property
    def current(self) -> Policy:
        """The policy now."""
        return self._loaded.policy

    @property
    def quotas(self) -> Quotas:
        """The quotas now (loaded with `current`)."""
        return self._loaded.quotas

    def follow(self, callback: Callable[[Loaded], None]) -> None:
        """Call `callback` with what a reload swapped in, at once after each swap."""
        self._followers.append(callback)

    def _read_if_changed(self) -> Loaded | None:
        """The new policy and quotas if the file changed and parses; runs in a thread."""
        signature = file_signature(self._path)
        if signature == self._signature:
            return None
        self._signature = signature  # a broken file warns once, not every interval
        try:
            return read_policy_file(self._path, self._default_pool)
        except PolicyError as exc:
            log.warning("%s; keeping the policy loaded before (and its quotas)", exc)
            return None

    async def reload(self) -> bool:
        """Re-read the file if it changed; True if the policy and quotas were swapped."""
        loaded = await asyncio.to_thread(self._read_if_changed)
        if loaded is None:
            return False
        self._loaded = loaded  # swapped whole: a call decides on the old one or the new
        for callback in self._followers:
            callback(loaded)
        log.info(
            "policy file %s reloaded: %d roles, quotas %s",
            self._path,
            len(loaded.policy.roles),
            "on" if loaded.quotas.active else "off",
        )
        return True

    async def start(self) -> None:
        """Watch the file; idempotent."""
        self._watch.start()

    async def close(self) -> None:
        """Stop watching."""
        await self._watch.close()
