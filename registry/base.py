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

Quota counters (the limits and what to do over them are router/admit/quotas.py's; stores
only count, each operation one atomic step, so concurrent callers on any instances never
count past a limit):
- Sessions per user: a session key counts while its pin lives (bound, moved, touched; a
  released or expired pin frees it) or, before the pin exists, until `ttl` after the
  `quota_session_acquire` that counted it. An acquire purges keys that no longer count,
  refreshes a key counted already (granted whatever the count), else counts it only if
  fewer than `limit` keys count. `quota_session_release` stops counting a key at once.
  `touch` keeps the user's counter alive with its sessions' pins.
- Operation slots: each replica leases slots per user; a replica's leases live `lease_ttl`
  after its last `quota_slots_acquire` or `quota_slots_sync` (its renewal), then count
  no more (a dead replica's slots free themselves). An acquire grants one slot if the
  slots leased to live replicas are fewer than `limit`; a sync sets what this replica
  holds (0 returns them all) and answers how many replicas hold live leases.
- Call tokens: one token bucket per name, refilled at `rate` per second (by the store's
  clock) up to `burst`; `quota_tokens_lease` takes up to `want` whole tokens at once. A
  bucket left alone long enough to be full again may be forgotten (it is full).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Protocol

from registry.models import DrainMode, Driver, Event, Pin, SessionGrant, SlotGrant, TokenGrant

DEFAULT_PIN_TTL = 2 * 3600.0
"""Seconds an idle session's pin lives, for every store (`pin_ttl_seconds` sets it)."""


def check_bucket(rate: float, burst: int, want: int) -> None:
    """ValueError unless a token bucket's arguments make sense (every store checks them)."""
    if not (rate > 0 and math.isfinite(rate)) or burst < 1 or want < 1:
        raise ValueError(
            f"a token bucket needs rate > 0, burst >= 1 and want >= 1, got "
            f"rate={rate!r} burst={burst!r} want={want!r}"
        )


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

    async def expired_pins(self, limit: int = 1000) -> list[Pin]:
        """Up to `limit` pins that lapsed by their TTL (idle for pin_ttl, never released),
        each reported once, to one caller of any instance; oldest first where known."""
        ...

    async def quota_session_acquire(
        self, user: str, key: str, limit: int, ttl: float
    ) -> SessionGrant:
        """Count session `key` against `user`'s `limit` unless that many count already.

        A key counts while its pin lives, or for `ttl` seconds after this call (the time
        its pin has to be bound); a key that counts already is refreshed and granted.
        """
        ...

    async def quota_session_release(self, user: str, key: str) -> None:
        """Stop counting session `key` against `user` (ReleaseSession)."""
        ...

    async def quota_slots_acquire(
        self, user: str, replica: str, limit: int, lease_ttl: float
    ) -> SlotGrant:
        """Lease one more of `user`'s operation slots to `replica` if fewer than `limit` are
        leased to live replicas; renews `replica`'s leases for `lease_ttl` seconds."""
        ...

    async def quota_slots_sync(
        self, replica: str, held: Mapping[str, tuple[int, int]], lease_ttl: float
    ) -> int:
        """Set the slots `replica` holds per user to `held` (user -> (held, busy); 0 held
        returns them), renew its leases for `lease_ttl`: how many replicas hold live leases."""
        ...

    async def quota_tokens_lease(
        self, bucket: str, rate: float, burst: int, want: int
    ) -> TokenGrant:
        """Take up to `want` tokens from the bucket (refilled at `rate`/s, holding <= `burst`)."""
        ...

    def events(self) -> AsyncIterator[Event]:
        """Changes made by any instance sharing this store, from now on (until close)."""
        ...

    async def close(self) -> None:
        """Release the store's resources; open `events()` iterators end."""
        ...
