"""In-process registry: the embedded default for a single replica.

State lives in dicts owned by one event loop; every operation completes without awaiting
anything, so each one is atomic with respect to other calls on that loop. Pins are not
shared between processes: with `--workers N` or several replicas every process places a
new session by the same deterministic ring, so static drivers still agree; anything
dynamic (moves, membership changes) needs the shared Redis registry.
"""

from __future__ import annotations

from collections.abc import Sequence

from registry.models import Driver, Pin


class MemoryRegistry:
    """Pins and drivers in process memory."""

    def __init__(self) -> None:
        self._pins: dict[str, Pin] = {}
        self._drivers: dict[str, Driver] = {}

    async def get_pin(self, session_id: str) -> Pin | None:
        """The pin of a session, or None."""
        return self._pins.get(session_id)

    async def bind(self, pin: Pin) -> Pin:
        """Store `pin` unless the session is already pinned; return the pin in force."""
        return self._pins.setdefault(pin.session_id, pin)

    async def move(self, session_id: str, expected: str, pin: Pin) -> Pin | None:
        """Replace the pin if it still names driver `expected`; return the pin in force."""
        current = self._pins.get(session_id)
        if current is not None and current.driver == expected:
            self._pins[session_id] = pin
            return pin
        return current

    async def release(self, session_id: str) -> None:
        """Forget a session's pin."""
        self._pins.pop(session_id, None)

    async def drivers(self) -> Sequence[Driver]:
        """Every known driver."""
        return list(self._drivers.values())

    async def upsert_driver(self, driver: Driver) -> None:
        """Add a driver or replace its record."""
        self._drivers[driver.address] = driver

    async def remove_driver(self, address: str) -> None:
        """Forget a driver."""
        self._drivers.pop(address, None)

    async def close(self) -> None:
        """Nothing to release."""

    def pin_count(self) -> int:
        """How many sessions are pinned (for tests and metrics)."""
        return len(self._pins)
