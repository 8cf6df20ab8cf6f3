"""In-process registry: the embedded default for a single replica (`memory://`).

State lives in dicts owned by one event loop; every operation completes without awaiting
anything, so each one is atomic with respect to other calls on that loop. Pins are not
shared between processes: with `--workers N` or several replicas every process places a
new session by the same deterministic ring, so static drivers still agree; anything
dynamic (moves, membership changes) needs the shared Redis registry.

Expiry follows the contract in base.py, measured with an injected clock so tests need no
sleeps. Events reach the `events()` iterators of this instance only. A session's journal is a
list of entries with its byte count; an overflowed journal keeps no entries, only the mark.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from registry.base import DEFAULT_PIN_TTL
from registry.models import DrainMode, Driver, Event, EventKind, Pin, drain_marker, split_key

_CLOSED = object()


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
        self._drivers: dict[str, tuple[Driver, float]] = {}
        self._subscribers: list[asyncio.Queue[object]] = []
        self._draining: dict[str, DrainMode] = {}
        self._journals: dict[str, _Journal] = {}
        self._claims: dict[str, tuple[str, float]] = {}  # session id -> (owner, expiry)
        self._claims_sweep_at = 1024

    # --- pins ---------------------------------------------------------------------------

    async def get_pin(self, session_id: str) -> Pin | None:
        """The pin of a session, or None."""
        entry = self._pins.get(session_id)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._pins[session_id]
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
