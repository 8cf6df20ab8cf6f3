"""The contract every registry store implements (memory.py and redis.py).

Invariants every store keeps:
- `bind` is create-if-absent: of two concurrent binds of one session, both callers get
  the same winning pin back.
- `move` is compare-and-set: it changes the pin only if it still names `expected`, and
  always returns the pin as it now is, so a caller that lost the race follows the winner.
- Pins expire `pin_ttl` seconds after they were bound or last touched; `touch` refreshes
  many at once (callers batch it, never one write per call).
- A driver registered with a `ttl` is live until that long after its last upsert (its
  heartbeat); without one (static drivers) until it is removed. `drivers()` lists only
  live drivers.
- Changes made through one store instance are announced to the `events()` of every
  instance sharing the store (other replicas), so caches never need polling.
- Stores raise `RegistryUnavailable` when they cannot reach their backend, nothing else;
  they hold no policy and never choose a driver.
- `sessions(driver)` lists the live pins naming that driver, whichever replica bound or
  moved them.
- A session's journal (router/journal.py; opaque bytes here) keeps its entries in append
  order, each exactly once however many instances append concurrently. It holds at most
  `cap` bytes in all: an append that would exceed it is refused and marks the journal
  overflowed, for good (until dropped or expired): `journal()` then answers None, because
  a journal with a gap must never be replayed. It expires `pin_ttl` after its last append
  or `touch`, like the pin, and `journal_drop` forgets it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Protocol

from registry.models import DrainMode, Driver, Event, Pin

DEFAULT_PIN_TTL = 2 * 3600.0
"""Seconds an idle session's pin lives, for every store (`pin_ttl_seconds` sets it)."""


class RegistryUnavailable(Exception):
    """The registry's backend cannot be reached right now."""


class Registry(Protocol):
    """Where pins and driver membership live.

    Sessions are named by their key (models.session_key: user and session id) in every
    operation below, and a pin is stored under `pin.key`: two users sending one session id
    have two sessions, in Spark and here. `claim` binds a session id to one user.
    """

    async def get_pin(self, session_id: str) -> Pin | None:
        """The pin of a session, or None."""
        ...

    async def bind(self, pin: Pin) -> Pin:
        """Store `pin` unless the session is already pinned; return the pin in force."""
        ...

    async def move(self, session_id: str, expected: str, pin: Pin) -> Pin | None:
        """Replace the pin if it still names driver `expected`; return the pin in force."""
        ...

    async def release(self, session_id: str) -> None:
        """Forget a session's pin (ReleaseSession) and announce it."""
        ...

    async def touch(self, session_ids: Collection[str], drivers: Collection[str] = ()) -> None:
        """Refresh the TTL of the pins of active sessions (and `drivers`' session lists) at once.

        The claims of their session ids are refreshed too.
        """
        ...

    async def claim(self, session_id: str, owner: str) -> str:
        """Bind a session id to `owner` unless another user holds it: the owner in force.

        A claim lives as long as a pin (refreshed by `touch` of any key of that id).
        """
        ...

    async def journal_append(self, session_id: str, entry: bytes, cap: int) -> bool:
        """Append an entry within `cap` bytes in all; False if refused (journal overflowed)."""
        ...

    async def journal(self, session_id: str) -> list[bytes] | None:
        """The session's entries in order; [] if none; None once the journal overflowed."""
        ...

    async def journal_drop(self, session_id: str) -> None:
        """Forget a session's journal (ReleaseSession)."""
        ...

    async def drivers(self) -> Sequence[Driver]:
        """Every live driver, whatever its state."""
        ...

    async def upsert_driver(self, driver: Driver, ttl: float | None = None) -> None:
        """Register a driver or refresh its record (a heartbeat when `ttl` is given)."""
        ...

    async def remove_driver(self, address: str) -> None:
        """Deregister a driver and announce it."""
        ...

    async def set_draining(
        self, address: str, draining: bool, mode: DrainMode = DrainMode.KEEP
    ) -> None:
        """Mark a driver draining (no new sessions) or take the mark off, and announce it.

        The mark is kept apart from the driver's record, which its agent rewrites with every
        heartbeat, and applies to static drivers too.
        """
        ...

    async def draining(self) -> Mapping[str, DrainMode]:
        """The drivers marked draining, each with its mode."""
        ...

    async def sessions(self, driver: str | None = None, limit: int = 1000) -> list[Pin]:
        """Up to `limit` live pins: those on `driver`, or any (for operators, not the hot path)."""
        ...

    def events(self) -> AsyncIterator[Event]:
        """Changes made by any instance sharing this store, from now on (until close)."""
        ...

    async def close(self) -> None:
        """Release the store's resources; open `events()` iterators end."""
        ...
