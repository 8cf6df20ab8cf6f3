"""Session → driver: the pin cache, the registry pin and the ring.

The first call of a session asks the ring (of the session's pool) for a driver and binds
a pin in the registry; the registry returns the winning pin if another caller bound one
first, and this replica follows it. Later calls of a known session are answered from a
bounded local cache without any registry round trip.

`choose` is the pure decision; `Placement` does the I/O around it.
"""

from __future__ import annotations

from collections import OrderedDict

from registry.base import Registry
from registry.models import DEFAULT_POOL, Pin
from router.errors import NoLiveDriver
from router.ring import Rings


def choose(session_id: str, pool: str, rings: Rings) -> str:
    """The driver a new session goes to; raise NoLiveDriver when the pool has none."""
    address = rings.pick(pool, session_id)
    if address is None:
        if pool not in rings.pools:
            known = ", ".join(sorted(rings.pools)) or "none"
            raise NoLiveDriver(f"pool {pool!r} has no drivers (pools: {known})")
        raise NoLiveDriver(f"pool {pool!r} has no driver that takes new sessions")
    return address


class PinCache:
    """A bounded LRU of session → pin."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._pins: OrderedDict[str, Pin] = OrderedDict()

    def get(self, session_id: str) -> Pin | None:
        """The cached pin, refreshed as most recently used."""
        pin = self._pins.get(session_id)
        if pin is not None:
            self._pins.move_to_end(session_id)
        return pin

    def put(self, pin: Pin) -> None:
        """Cache a pin, evicting the least recently used one when full."""
        self._pins[pin.session_id] = pin
        self._pins.move_to_end(pin.session_id)
        while len(self._pins) > self._capacity:
            self._pins.popitem(last=False)

    def drop(self, session_id: str) -> None:
        """Forget a session."""
        self._pins.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._pins)


class Placement:
    """Finds the driver of a session: cache, then registry pin, then ring."""

    def __init__(self, registry: Registry, rings: Rings, cache_size: int) -> None:
        self._registry = registry
        self.rings = rings
        self.cache = PinCache(cache_size)

    def update_membership(self, rings: Rings) -> None:
        """Swap in rings built from a new membership snapshot."""
        self.rings = rings

    async def place(self, session_id: str, pool: str | None) -> Pin:
        """The pin of a session, creating it on the session's first call."""
        pin = self.cache.get(session_id)
        if pin is not None:
            return pin
        pin = await self._registry.get_pin(session_id)
        if pin is None:
            pool = pool or DEFAULT_POOL
            address = choose(session_id, pool, self.rings)
            pin = await self._registry.bind(Pin(session_id, address, pool))
        self.cache.put(pin)
        return pin

    async def release(self, session_id: str) -> None:
        """Forget a session everywhere (after a successful ReleaseSession)."""
        self.cache.drop(session_id)
        await self._registry.release(session_id)
