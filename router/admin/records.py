"""What operators ask of the cluster: drivers, sessions, drains — as plain JSON-ready records.

The admin HTTP API (admin.py) and the `spark-router drivers | sessions | drain` commands
(cli.py, talking to the registry directly or to a replica's admin API) share these, so a
record looks the same whichever way it was fetched. Only registry reads and writes here;
a replica adds its own health view on top.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from registry.base import Registry
from registry.models import DrainMode, Pin, session_key

# An operator's listing, not the hot path: enough for any real driver, still bounded.
MAX_LISTED = 100_000
# An error names this many drivers at most: enough to spot the typo, never a huge message.
_NAMED_DRIVERS = 10


def pin_record(pin: Pin) -> dict[str, Any]:
    """A session's pin as the admin API and CLI show it."""
    created = (
        None
        if pin.created is None
        else dt.datetime.fromtimestamp(pin.created, dt.timezone.utc).isoformat(timespec="seconds")
    )
    return {
        "session_id": pin.session_id,
        "owner": pin.owner,  # the user whose session it is (half of its key)
        "key": pin.key,
        "driver": pin.driver,
        "pool": pin.pool,
        "created": created,
        "moves": pin.moves,
        "server_side_id": pin.server_side_id,
    }


async def driver_records(registry: Registry, static: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every driver the registry knows, or that is marked draining, with its session count."""
    drivers = {d.address: d for d in await registry.drivers()}
    marks = await registry.draining()
    records = []
    for address in sorted(drivers.keys() | marks.keys() | set(static)):
        d = drivers.get(address)
        sessions = await registry.sessions(address, limit=MAX_LISTED)
        mode = marks.get(address)
        records.append(
            {
                "address": address,
                "pool": d.pool if d else None,
                "weight": d.weight if d else None,
                "state": d.state.value if d else None,
                "registered": d is not None,
                "drain": mode.value if mode else None,
                "sessions": len(sessions),
            }
        )
    return records


async def session_records(
    registry: Registry, driver: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Pins of one driver's sessions, or of any sessions, up to `limit`."""
    pins = await registry.sessions(driver, limit=limit)
    return [pin_record(p) for p in sorted(pins, key=lambda p: (p.session_id, p.owner or ""))]


class AmbiguousSession(LookupError):
    """A session id that more than one user has a session under; name the user."""


async def find_pin(registry: Registry, session_id: str, user: str | None = None) -> Pin | None:
    """The pin of a session by id (and user): None if there is none.

    A session is (user, id). Without `user`, an id alone is looked up as an ownerless pin,
    then among all pins (an operator's call, not the hot path); AmbiguousSession when
    several users have one under that id.
    """
    if user is not None:
        return await registry.get_pin(session_key(user, session_id))
    pin = await registry.get_pin(session_id)
    if pin is not None:
        return pin
    found = [p for p in await registry.sessions(limit=MAX_LISTED) if p.session_id == session_id]
    if len(found) > 1:
        users = ", ".join(sorted(p.owner or "" for p in found))
        raise AmbiguousSession(
            f"session id {session_id!r} is used by users {users}: name one (?user=)"
        )
    return found[0] if found else None


async def session_record(
    registry: Registry, session_id: str, user: str | None = None
) -> dict[str, Any] | None:
    """One session's pin, or None (AmbiguousSession: see find_pin)."""
    pin = await find_pin(registry, session_id, user)
    return None if pin is None else pin_record(pin)


class UnknownDriver(LookupError):
    """A drain or undrain of an address no one knows as a driver; str() names those that are."""


async def set_drain(
    registry: Registry, address: str, mode: DrainMode | None, static: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Mark a driver draining in `mode`, or take the mark off (None); the resulting state.

    Only a known driver: registered, one of `static` (a replica's own), already marked (so
    the mark of a driver since gone can still be taken off) or holding pinned sessions (a
    static driver seen from the registry alone). Anything else is a typo that would stay
    listed as a phantom driver: UnknownDriver, before anything is written.
    """
    registered = {d.address for d in await registry.drivers()}
    marks = await registry.draining()
    known = address in registered or address in static or address in marks
    if not known and not await registry.sessions(address, limit=1):
        raise UnknownDriver(_unknown(address, registered | set(static) | set(marks)))
    await registry.set_draining(address, mode is not None, mode or DrainMode.KEEP)
    remaining = await registry.sessions(address, limit=MAX_LISTED)
    return {"address": address, "drain": mode.value if mode else None, "sessions": len(remaining)}


def _unknown(address: str, drivers: set[str]) -> str:
    """The message of UnknownDriver: which drivers there are (a bounded list)."""
    named = sorted(drivers)
    shown = named[:_NAMED_DRIVERS] + (
        [f"{len(named) - _NAMED_DRIVERS} more"] if len(named) > _NAMED_DRIVERS else []
    )
    return (
        f"no driver {address} is registered, configured or marked draining "
        f"(drivers: {', '.join(shown) or 'none'})"
    )
