"""The policy file (`policy_file`): read at start, swapped whole when it changes.

A replica checks the file's mtime, size and inode every `policy_reload_seconds`. A file that
changed and parses replaces the policy for calls that start afterwards; a broken one keeps
the policy loaded before, with one warning per change (the next good write is picked up).
The file holds the mapping `Policy.parse` reads (`roles`, `deny_users`, `deny_groups`), at
its top level or under a `policy:` key.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import yaml

from router.admit.auth import Reloader, file_signature
from router.admit.policy import Policy, PolicyError
from router.config import ConfigError

log = logging.getLogger(__name__)


def read_policy(path: Path, default_pool: str) -> Policy:
    """The policy in the file; PolicyError naming the file and the problem."""
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"policy file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy file {path} is not valid YAML: {exc}") from None
    if isinstance(data, dict) and set(data) == {"policy"}:
        data = data["policy"]
    if data is not None and not isinstance(data, dict):
        raise PolicyError(f"policy file {path} must be a mapping (roles, deny_users, ...)")
    try:
        return Policy.parse(data, default_pool)
    except PolicyError as exc:
        raise PolicyError(f"policy file {path}: {exc}") from None


class PolicyFile:
    """The current policy of a replica, kept in step with its file."""

    def __init__(self, path: Path, default_pool: str, reload_seconds: float) -> None:
        """Read the file now: ConfigError if it is missing or not a policy."""
        self._path = path
        self._default_pool = default_pool
        self._reload_seconds = reload_seconds
        self._signature = file_signature(path)
        try:
            self.current = read_policy(path, default_pool)
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None
        self._watch = Reloader(self.reload, reload_seconds, "policy file")

    def _read_if_changed(self) -> Policy | None:
        """The new policy if the file changed and parses; runs in a thread."""
        signature = file_signature(self._path)
        if signature == self._signature:
            return None
        self._signature = signature  # a broken file warns once, not every interval
        try:
            return read_policy(self._path, self._default_pool)
        except PolicyError as exc:
            log.warning("%s; keeping the policy loaded before", exc)
            return None

    async def reload(self) -> bool:
        """Re-read the file if it changed; True if the policy was swapped."""
        policy = await asyncio.to_thread(self._read_if_changed)
        if policy is None:
            return False
        self.current = policy  # swapped whole: a call decides on the old one or the new
        log.info("policy file %s reloaded: %d roles", self._path, len(policy.roles))
        return True

    async def start(self) -> None:
        """Watch the file; idempotent."""
        self._watch.start()

    async def close(self) -> None:
        """Stop watching."""
        await self._watch.close()
