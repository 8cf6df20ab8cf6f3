"""The token file of `auth: token`: hashes of bearer tokens → user and groups.

Format (YAML)::

    tokens:
      - sha256: <hex sha256 of the token>
        user: alice
        groups: [analysts, etl]
        created: "2025-01-31T12:00:00+00:00"

Invariants: the file never holds a token, only its sha256, so reading it (or a backup of it)
gives nobody a credential; `add` returns the token exactly once. Writes are atomic (a temporary
file in the same folder, fsync'd, then renamed over the old one, mode 0600), so a reader, such
as a replica reloading on mtime, sees the old file or the new one, never half of one. Two
`add`s racing on one file may lose one of the two entries (no lock): run them one at a time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Tells a router token from a JWT or another system's secret at a glance (and to scanners).
TOKEN_PREFIX = "ssr_"
# A hash prefix shorter than this is too likely to name more than one token by accident.
MIN_HASH_PREFIX = 6

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX = re.compile(r"^[0-9a-f]+$")


class TokenFileError(Exception):
    """The token file cannot be read, written or understood; str() names the file and why."""


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One line of the token file (no token in it, only its hash)."""

    sha256: str
    user: str
    groups: tuple[str, ...]
    created: str


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe, with the router's prefix)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """The hex sha256 a token is filed under."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _parse(path: Path, text: str) -> list[TokenEntry]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Line, column and problem only: str(exc) quotes a snippet of the file, and a file
        # someone edited by hand may hold what should never be quoted (a pasted token).
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "syntax error"
        raise TokenFileError(f"token file {path} is not valid YAML{where}: {problem}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("tokens", []), list):
        raise TokenFileError(f"token file {path} must be a mapping with a list `tokens`")
    entries: list[TokenEntry] = []
    for i, item in enumerate(doc.get("tokens") or []):
        where = f"token file {path}, entry {i + 1}"
        if not isinstance(item, dict):
            raise TokenFileError(f"{where}: must be a mapping of sha256, user, groups")
        digest = item.get("sha256")
        if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
            raise TokenFileError(f"{where}: sha256 must be 64 hex digits")
        user = item.get("user")
        if not isinstance(user, str) or not user.strip():
            raise TokenFileError(f"{where}: user must be a non-empty string")
        groups = item.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise TokenFileError(f"{where}: groups must be a list of names")
        created = item.get("created", "")
        entries.append(
            TokenEntry(
                digest.lower(), user.strip(), tuple(groups), "" if created is None else str(created)
            )
        )
    return entries


def _read(path: Path) -> list[TokenEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenFileError(
            f"token file {path} does not exist (create it with `spark-router token add USER "
            f"--token-file {path}`)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"token file {path} cannot be read: {exc}") from None
    return _parse(path, text)


def list_entries(path: Path) -> list[TokenEntry]:
    """Every entry of the token file, in file order."""
    return _read(Path(path))


def load(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """The lookup table a replica serves from: sha256 → (user, groups)."""
    return {e.sha256: (e.user, frozenset(e.groups)) for e in _read(Path(path))}


def _write(path: Path, entries: list[TokenEntry]) -> None:
    doc: dict[str, Any] = {
        "tokens": [
            {"sha256": e.sha256, "user": e.user, "groups": list(e.groups), "created": e.created}
            for e in entries
        ]
    }
    text = (
        "# spark-router token file: sha256 of each token -> user and groups. "
        "Edit with `spark-router token`.\n" + yaml.safe_dump(doc, sort_keys=False)
    )
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise TokenFileError(f"token file {path} cannot be written: {exc}") from None
    try:
        # mkstemp already makes it 0600; say so explicitly, umask or not.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise TokenFileError(f"token file {path} cannot be written: {exc}") from None


def _check_name(kind: str, name: str) -> str:
    name = name.strip()
    if not name or any(c.isspace() for c in name) or "," in name:
        raise TokenFileError(f"{kind} {name!r} must be non-empty, without spaces or commas")
    return name


def add(path: Path, user: str, groups: list[str] | tuple[str, ...] = ()) -> str:
    """File a new token for `user` (creating the file if need be) and return the token."""
    path = Path(path)
    user = _check_name("user", user)
    checked = tuple(dict.fromkeys(_check_name("group", g) for g in groups))
    entries = _read(path) if path.exists() else []
    token = new_token()
    created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    entries.append(TokenEntry(token_hash(token), user, checked, created))
    _write(path, entries)
    return token


def remove(path: Path, user_or_hash_prefix: str) -> list[TokenEntry]:
    """Remove every token of a user, or the one token whose hash starts with the prefix."""
    path = Path(path)
    key = user_or_hash_prefix.strip()
    entries = _read(path)
    gone = [e for e in entries if e.user == key]
    if not gone:
        prefix = key.lower()
        if len(prefix) < MIN_HASH_PREFIX or not _HEX.match(prefix):
            raise TokenFileError(
                f"no user {key!r} in {path} (a hash prefix needs {MIN_HASH_PREFIX}+ hex digits)"
            )
        gone = [e for e in entries if e.sha256.startswith(prefix)]
        if not gone:
            raise TokenFileError(f"no user or token hash {key!r} in {path}")
        if len(gone) > 1:
            raise TokenFileError(
                f"hash prefix {key!r} matches {len(gone)} tokens in {path}: give more digits"
            )
    _write(path, [e for e in entries if e not in gone])
    return gone
