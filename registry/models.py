"""The records cluster state is made of: drivers and pins (and what quota counters answer).

A driver is one Spark Connect server; a pin is the registry's record that a session
lives on a driver. Both are immutable values: a change is a new record.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import quote, unquote

from common.health import DriverState

__all__ = [
    "DEFAULT_POOL",
    "DrainMode",
    "Driver",
    "DriverState",
    "Event",
    "EventKind",
    "Pin",
    "SessionGrant",
    "SlotGrant",
    "TokenGrant",
    "session_key",
    "split_key",
]

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


@functools.lru_cache(maxsize=4096)
def _quoted(user: str) -> str:
    return quote(user, safe="")


def session_key(user: str | None, session_id: str) -> str:
    """The registry key of a session: (user, session id), as Spark keys its sessions.

    `alice/<uuid>` (the user percent-encoded, so it holds no "/"); a session without a user
    is its id alone, which is also how pins were keyed before sessions had owners.
    Session ids never contain "/" (the data plane refuses them), so the key splits back.
    """
    return f"{_quoted(user)}/{session_id}" if user else session_id


def split_key(key: str) -> tuple[str | None, str]:
    """(user or None, session id) of a key made by `session_key`."""
    user, sep, session_id = key.rpartition("/")
    return (unquote(user) or None, session_id) if sep else (None, key)


@dataclass(frozen=True)
class Pin:
    """The record session -> driver."""

    session_id: str  # the id the client sends (Spark's session_id)
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
    # The session's user: half of its key (session_key), so equal keys mean equal owners.
    owner: str | None = field(default=None, compare=False)
    created: float | None = field(default=None, compare=False)  # unix time of the first call
    moves: int = field(default=0, compare=False)  # how often it moved to another driver
    # The server-side session id the session's first driver gave its client, learned from
    # a response (dataplane/proxy.py): the identity a move keeps when the client never
    # sends its observed id. Not part of where calls go.
    seen_id: str | None = field(default=None, compare=False)
    # Drivers this session moved off, the latest last. Later moves avoid them: Spark refuses
    # a released id (SESSION_CLOSED) for the rest of a driver's life, and a driver that only
    # hung still holds the session's old operations (a reattach there finds another run of
    # an operation id). Not part of where calls go.
    moved_off: tuple[str, ...] = field(default=(), compare=False)
    # Of those, the ones told to release it (a drain, an operator's move): never chosen again
    # while any other driver is left, since the refusal there is certain.
    released_on: tuple[str, ...] = field(default=(), compare=False)
    # The session id its driver knows the session by, when not the client's: a session moved
    # to a driver that had released its id gets a new one there (Spark refuses a released id
    # for the rest of a driver's life). The data plane rewrites requests to it and responses
    # back (dataplane/protocol.py). None: the client's own id.
    upstream_id: str | None = None

    @property
    def driver_session_id(self) -> str:
        """The session id to send the driver."""
        return self.upstream_id or self.session_id

    @property
    def key(self) -> str:
        """The registry key of the session (its owner and id)."""
        return session_key(self.owner, self.session_id)


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
    session_id: str | None = None  # PIN_*: the session's key (session_key)


class SessionGrant(NamedTuple):
    """What `quota_session_acquire` answers: whether the session counts now, and the count."""

    granted: bool
    current: int  # the user's sessions counted now (with this one if granted)


class SlotGrant(NamedTuple):
    """What `quota_slots_acquire` answers (sums over the replicas with live leases)."""

    granted: bool
    held: int  # slots leased to all replicas now (with this one if granted)
    busy: int  # of those, in use as the replicas last reported (each renewal, each acquire)


class TokenGrant(NamedTuple):
    """What `quota_tokens_lease` answers."""

    granted: int  # tokens taken from the bucket, 0 to the number wanted
    retry_after: float  # with none granted: seconds until the bucket holds one token; else 0
