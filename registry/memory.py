"""In-process registry: the embedded default for a single replica (`memory://`).

State lives in dicts owned by one event loop; every operation completes without awaiting
anything, so each one is atomic with respect to other calls on that loop. Pins are not
shared between processes: with `--workers N` or several replicas every process places a
new session by the same deterministic ring, so static drivers still agree; anything
dynamic (moves, membership changes) needs the shared Redis registry.

Expiry follows the contract in base.py, measured with an injected clock so tests need no
sleeps. Events reach the `events()` iterators of this instance only. A session's journal is a
list of entries with its byte count; an overflowed journal keeps no entries, only the mark.

Quota counters follow base.py with the same arithmetic as the Redis scripts: per user the
counted session keys with their reservation expiry (a key counts while its pin is live or
until then), per user the slots each replica holds (held, busy) with a lease expiry per
replica, per bucket (tokens, time of the last refill).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from registry.base import DEFAULT_PIN_TTL, check_bucket
from registry.models import (
    DrainMode,
    Driver,
    Event,
    EventKind,
    Pin,
    SessionGrant,
    SlotGrant,
    TokenGrant,
    drain_marker,
    split_key,
)

_CLOSED = object()
# Lapsed pins kept for expired_pins; past this many (nobody asks), the oldest are forgotten.
_MAX_LAPSED = 100_000


@dataclass
class _Journal:
    """One session's journal: its entries, their total size, the overflow mark, its expiry."""

    expires: float
    entries: list[bytes] = field(default_factory=list)
    size: int = 0
    overflowed: bool = False


class MemoryRegistry:
    """Pins and drivers in process memory."""

    def __init__(
        self, pin_ttl: float = DEFAULT_PIN_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._pin_ttl = pin_ttl
        self._clock = clock
        self._pins: dict[str, tuple[Pin, float]] = {}
        self._lapsed: deque[Pin] = deque(maxlen=_MAX_LAPSED)  # for expired_pins
        self._drivers: dict[str, tuple[Driver, float]] = {}
        self._subscribers: list[asyncio.Queue[object]] = []
        self._draining: dict[str, DrainMode] = {}
        self._journals: dict[str, _Journal] = {}
        self._claims: dict[str, tuple[str, float]] = {}  # session id -> (owner, expiry)
        self._claims_sweep_at = 1024
        # Quota counters: user -> {session key: reservation expiry}; user -> {replica:
        # (held, busy)}; replica -> lease expiry; bucket -> (tokens, last refill, full at).
        self._quota_sessions: dict[str, dict[str, float]] = {}
        self._quota_sessions_sweep_at = 1024
        self._slots: dict[str, dict[str, tuple[int, int]]] = {}
        self._replicas: dict[str, float] = {}
        self._buckets: dict[str, tuple[float, float, float]] = {}  # (..., when full again)
        self._buckets_sweep_at = 1024

    # --- pins ---------------------------------------------------------------------------

    async def get_pin(self, session_id: str) -> Pin | None:
        """The pin of a session, or None."""
        entry = self._pins.get(session_id)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._pins[session_id]
            self._lapsed.append(entry[0])
            return None
        return entry[0]

    async def bind(self, pin: Pin) -> Pin:
        """Store `pin` unless the session is already pinned; return the pin in force."""
        current = await self.get_pin(pin.key)
        if current is not None:
            return current
        self._pins[pin.key] = (pin, self._clock() + self._pin_ttl)
        return pin

    async def claim(self, session_id: str, owner: str) -> str:
        """Bind a session id to `owner` unless another user holds it: the owner in force."""
        now = self._clock()
        held = self._claims.get(session_id)
        if held is not None and held[1] > now:
            return held[0]
        if len(self._claims) >= self._claims_sweep_at:  # drop expired claims now and then
            self._claims = {k: v for k, v in self._claims.items() if v[1] > now}
            self._claims_sweep_at = max(1024, 2 * len(self._claims))
        self._claims[session_id] = (owner, now + self._pin_ttl)
        return owner

    async def move(self, session_id: str, expected: str, pin: Pin) -> Pin | None:
        """Replace the pin if it still names driver `expected`; return the pin in force."""
        current = await self.get_pin(session_id)
        if current is None or current.driver != expected:
            return current
        self._pins[session_id] = (pin, self._clock() + self._pin_ttl)
        self._publish(Event(EventKind.PIN_MOVED, pin=pin, session_id=session_id))
        return pin

    async def expired_pins(self, limit: int = 1000) -> list[Pin]:
        """Up to `limit` pins that lapsed by their TTL, each reported once."""
        now = self._clock()
        for key, (pin, expires) in list(self._pins.items()):
            if expires <= now:
                del self._pins[key]
                self._lapsed.append(pin)
        return [self._lapsed.popleft() for _ in range(min(limit, len(self._lapsed)))]

    async def release(self, session_id: str) -> None:
        """Forget a session's pin."""
        if self._pins.pop(session_id, None) is not None:
            self._publish(Event(EventKind.PIN_RELEASED, session_id=session_id))

    async def touch(self, session_ids: Collection[str], drivers: Collection[str] = ()) -> None:
        """Refresh the TTL of live pins."""
        expires = self._clock() + self._pin_ttl
        for session_id in session_ids:
            pin = await self.get_pin(session_id)
            if pin is not None:
                self._pins[session_id] = (pin, expires)
            journal = self._live_journal(session_id)
            if journal is not None:
                journal.expires = expires
            user, bare = split_key(session_id)
            held = self._claims.get(bare)
            if user is not None and held is not None and held[0] == user:
                self._claims[bare] = (user, expires)

    # --- journals -----------------------------------------------------------------------

    def _live_journal(self, session_id: str) -> _Journal | None:
        journal = self._journals.get(session_id)
        if journal is not None and journal.expires <= self._clock():
            del self._journals[session_id]
            return None
        return journal

    async def journal_append(self, session_id: str, entry: bytes, cap: int) -> bool:
        """Append an entry within `cap` bytes in all; False if refused (journal overflowed)."""
        expires = self._clock() + self._pin_ttl
        journal = self._live_journal(session_id)
        if journal is None:
            journal = self._journals[session_id] = _Journal(expires)
        journal.expires = expires
        if journal.overflowed:
            return False
        if journal.size + len(entry) > cap:
            journal.overflowed = True
            journal.entries = []  # never replayed now: keep only the mark
            return False
        journal.entries.append(bytes(entry))
        journal.size += len(entry)
        return True

    async def journal(self, session_id: str) -> list[bytes] | None:
        """The session's entries in order; [] if none; None once the journal overflowed."""
        journal = self._live_journal(session_id)
        if journal is None:
            return []
        return None if journal.overflowed else list(journal.entries)

    async def journal_drop(self, session_id: str) -> None:
        """Forget a session's journal."""
        self._journals.pop(session_id, None)

    async def sessions(self, driver: str | None = None, limit: int = 1000) -> list[Pin]:
        """Up to `limit` live pins: those on `driver`, or any."""
        found: list[Pin] = []
        for session_id in list(self._pins):
            pin = await self.get_pin(session_id)
            if pin is not None and (driver is None or pin.driver == driver):
                found.append(pin)
                if len(found) >= limit:
                    break
        return found

    def pin_count(self) -> int:
        """How many sessions are pinned (for tests and metrics)."""
        return len(self._pins)

    # --- quota counters -----------------------------------------------------------------

    def _session_counts(self, key: str, reserved: float, now: float) -> bool:
        return reserved > now or self._pins.get(key, (None, now))[1] > now

    async def quota_session_acquire(
        self, user: str, key: str, limit: int, ttl: float
    ) -> SessionGrant:
        """Count session `key` against `user`'s `limit` unless that many count already."""
        now = self._clock()
        counted = self._quota_sessions.get(user, {})
        live = {k: t for k, t in counted.items() if self._session_counts(k, t, now)}
        others = len(live) - (key in live)
        if key not in live and others >= limit:
            self._quota_sessions[user] = live
            return SessionGrant(False, others)
        live[key] = max(live.get(key, now), now + ttl)
        self._quota_sessions[user] = live
        if len(self._quota_sessions) >= self._quota_sessions_sweep_at:  # users gone quiet
            self._quota_sessions = {
                u: keys
                for u, keys in self._quota_sessions.items()
                if any(self._session_counts(k, t, now) for k, t in keys.items())
            }
            self._quota_sessions_sweep_at = max(1024, 2 * len(self._quota_sessions))
        return SessionGrant(True, others + 1)

    async def quota_session_release(self, user: str, key: str) -> None:
        """Stop counting session `key` against `user`."""
        counted = self._quota_sessions.get(user)
        if counted is not None:
            counted.pop(key, None)
            if not counted:
                del self._quota_sessions[user]

    def _live_slots(self, user: str, now: float) -> dict[str, tuple[int, int]]:
        held = {
            r: hb for r, hb in self._slots.get(user, {}).items() if self._replicas.get(r, 0) > now
        }
        if held:
            self._slots[user] = held
        else:
            self._slots.pop(user, None)
        return held

    async def quota_slots_acquire(
        self, user: str, replica: str, limit: int, lease_ttl: float
    ) -> SlotGrant:
        """Lease one more of `user`'s slots to `replica` if fewer than `limit` are leased."""
        now = self._clock()
        self._replicas[replica] = now + lease_ttl
        leases = self._live_slots(user, now)
        held = sum(h for h, _ in leases.values())
        busy = sum(b for _, b in leases.values())
        if held >= limit:
            return SlotGrant(False, held, busy)
        mine = leases.get(replica, (0, 0))
        self._slots[user] = {**leases, replica: (mine[0] + 1, mine[1] + 1)}
        return SlotGrant(True, held + 1, busy + 1)

    async def quota_slots_sync(
        self, replica: str, held: Mapping[str, tuple[int, int]], lease_ttl: float
    ) -> int:
        """Set the slots `replica` holds per user; renew its leases: live replicas."""
        now = self._clock()
        self._replicas[replica] = now + lease_ttl
        self._replicas = {r: t for r, t in self._replicas.items() if t > now}
        for user, (count, busy) in held.items():
            leases = self._live_slots(user, now)
            if count > 0:
                self._slots[user] = {**leases, replica: (count, busy)}
            elif replica in leases:
                del leases[replica]
                if not leases:
                    del self._slots[user]
        return len(self._replicas)

    async def quota_tokens_lease(
        self, bucket: str, rate: float, burst: int, want: int
    ) -> TokenGrant:
        """Take up to `want` tokens from the bucket (refilled at `rate`/s, up to `burst`)."""
        check_bucket(rate, burst, want)
        now = self._clock()
        tokens, last, _ = self._buckets.get(bucket, (float(burst), now, now))
        if now > last:
            tokens += (now - last) * rate
        tokens = min(tokens, float(burst))
        granted = max(0, min(want, math.floor(tokens)))
        tokens -= granted
        self._buckets[bucket] = (tokens, now, now + (burst - tokens) / rate)
        if len(self._buckets) >= self._buckets_sweep_at:  # a bucket full again is as none
            self._buckets = {b: v for b, v in self._buckets.items() if v[2] > now}
            self._buckets_sweep_at = max(1024, 2 * len(self._buckets))
        return TokenGrant(granted, 0.0 if granted else (1.0 - tokens) / rate)

    # --- drivers ------------------------------------------------------------------------

    async def drivers(self) -> Sequence[Driver]:
        """Every live driver."""
        now = self._clock()
        return [d for d, expires in self._drivers.values() if expires > now]

    async def upsert_driver(self, driver: Driver, ttl: float | None = None) -> None:
        """Register a driver or refresh its record."""
        now = self._clock()
        previous = self._drivers.get(driver.address)
        self._drivers[driver.address] = (driver, math.inf if ttl is None else now + ttl)
        if previous is None or previous[1] <= now:
            self._publish(Event(EventKind.DRIVER_JOINED, driver=driver))
        elif previous[0] != driver:
            self._publish(Event(EventKind.DRIVER_CHANGED, driver=driver))

    async def remove_driver(self, address: str) -> None:
        """Deregister a driver."""
        entry = self._drivers.pop(address, None)
        if entry is not None:
            self._publish(Event(EventKind.DRIVER_LEFT, driver=entry[0]))

    async def set_draining(
        self, address: str, draining: bool, mode: DrainMode = DrainMode.KEEP
    ) -> None:
        """Mark a driver draining, or take the mark off."""
        if draining:
            self._draining[address] = mode
        else:
            self._draining.pop(address, None)
        self._publish(Event(EventKind.DRIVER_CHANGED, driver=drain_marker(address, draining)))

    async def draining(self) -> Mapping[str, DrainMode]:
        """The drivers marked draining, each with its mode."""
        return dict(self._draining)

    # --- events -------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Changes made through this instance, from now on, until close()."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while True:
                item = await queue.get()
                if item is _CLOSED:
                    return
                assert isinstance(item, Event)
                yield item
        finally:
            self._subscribers.remove(queue)

    def _publish(self, event: Event) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)

    async def close(self) -> None:
        """End every events() iterator."""
        for queue in self._subscribers:
            queue.put_nowait(_CLOSED)
