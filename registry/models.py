"""The records cluster state is made of: drivers and pins.

A driver is one Spark Connect server; a pin is the registry's record that a session
lives on a driver. Both are immutable values: a change is a new record.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from common.health import DriverState

__all__ = ["DEFAULT_POOL", "DrainMode", "Driver", "DriverState", "Event", "EventKind", "Pin"]

DEFAULT_POOL = "default"


@dataclass(frozen=True)
class Driver:
    """One Spark Connect server the router can place sessions on."""

    address: str  # host:port the router dials; also the driver's identity
    pool: str = DEFAULT_POOL
    weight: int = 1
    state: DriverState = DriverState.ACTIVE

    @property
    def takes_new_sessions(self) -> bool:
        return self.state is DriverState.ACTIVE


class DrainMode(str, enum.Enum):
    """What an operator's drain mark asks of a driver's sessions."""

    KEEP = "keep"  # no new sessions; current ones stay until they end
    MOVE_IDLE = "move-idle"  # also move each session on its next call that starts no operation


def drain_marker(address: str, draining: bool) -> Driver:
    """The driver as a drain event shows it (replicas re-read membership on any change)."""
    return Driver(address, state=DriverState.DRAINING if draining else DriverState.ACTIVE)


@dataclass(frozen=True)
class Pin:
    """The record session -> driver."""

    session_id: str
    driver: str  # Driver.address
    pool: str = DEFAULT_POOL
    # For a session moved to another driver: the server-side session id its client saw
    # first, which the router keeps showing it (None: never moved, nothing rewritten).
    server_side_id: str | None = None
    # A token unique to the move that wrote this pin (None: bound, never moved). Two replicas
    # moving one session at once build pins that are otherwise equal; the token tells the
    # one whose compare-and-set won from the one that lost (and must follow, not replay).
    move_token: str | None = None
    # What operators see; not part of where calls go, so pins compare without them.
    owner: str | None = field(default=None, compare=False)  # user_id of the first call
    created: float | None = field(default=None, compare=False)  # unix time of the first call
    moves: int = field(default=0, compare=False)  # how often it moved to another driver


class EventKind(str, enum.Enum):
    """What changed in the registry."""

    DRIVER_JOINED = "driver_joined"
    DRIVER_LEFT = "driver_left"
    DRIVER_CHANGED = "driver_changed"
    PIN_MOVED = "pin_moved"
    PIN_RELEASED = "pin_released"


@dataclass(frozen=True)
class Event:
    """One change, as replicas hear of it (to keep their pin caches and rings coherent)."""

    kind: EventKind
    driver: Driver | None = None  # DRIVER_*: the driver as it now is (LEFT: as it was)
    pin: Pin | None = None  # PIN_MOVED: the new pin
    session_id: str | None = None  # PIN_*: the session
