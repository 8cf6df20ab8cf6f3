"""The contract every registry store implements (memory.py, and the Redis store).

Invariants every store keeps:
- `bind` is create-if-absent: of two concurrent binds of one session, both callers get
  the same winning pin back.
- `move` is compare-and-set: it changes the pin only if it still names `expected`, and
  always returns the pin as it now is, so a caller that lost the race follows the winner.
- The store holds no policy: it never chooses a driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from registry.models import Driver, Pin


class Registry(Protocol):
    """Where pins and driver membership live."""

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
        """Forget a session's pin (ReleaseSession)."""
        ...

    async def drivers(self) -> Sequence[Driver]:
        """Every known driver, whatever its state."""
        ...

    async def upsert_driver(self, driver: Driver) -> None:
        """Add a driver or replace its record."""
        ...

    async def remove_driver(self, address: str) -> None:
        """Forget a driver."""
        ...

    async def close(self) -> None:
        """Release the store's resources."""
        ...
