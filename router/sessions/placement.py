"""Session → driver: the pin cache, the registry pin and the ring.

The first call of a session asks the ring of the session's pool for a driver and binds a
pin in the registry; the registry returns the winning pin if another replica bound one
first, and this replica follows it. Later calls of a known session are answered from a
bounded local cache without any registry round trip; their TTL refreshes are collected
and written in one batch by `flush`, called periodically by the replica.

A new pin (a session's first call, a clone) may be refused before it is made: the `admit`
hook of `place` and `pin_clone` (the quotas' session count, dataplane/proxy.py) is awaited
with the session key when, and only when, the session has no pin yet, after its id is
claimed and before the pin is bound (in an outage too: the hook copes with the registry
itself). Whatever it raises ends the placement, and no pin is made.

Registry outage (degraded mode, `RegistryUnavailable` from any operation):
- known sessions keep routing from the cache;
- new sessions are placed by the ring alone and remembered as pending; `flush` writes
  them back once the registry answers again (if another replica bound the session
  meanwhile, its pin wins and this replica follows it);
- the `spark_router_registry_degraded` gauge is 1 and one warning is logged per outage.

`choose` is the pure decision; `Placement` does the I/O around it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace

from registry.base import Registry, RegistryUnavailable
from registry.models import DriverState, Event, EventKind, Pin, session_key
from router.errors import NoLiveDriver, PermissionDenied, UnknownPool
from router.sessions.ring import Rings
from router.telemetry import Telemetry

log = logging.getLogger(__name__)

Admit = Callable[[str], Awaitable[None]]
"""Awaited with a session's key before its first pin is made; raises to refuse it."""

Created = Callable[[Pin], None]
"""Called with a session's first pin once it is made here (the audit's session.created)."""


def choose(
    session_id: str,
    pool: str,
    rings: Rings,
    avoid: str | None = None,
    closed: Collection[str] = (),
    refused: Collection[str] = (),
) -> str:
    """The driver a new (or moving) session goes to; raise if the pool has no driver for it.

    `closed` are drivers the session moved off (Pin.moved_off), `refused` those of them that
    released it (Pin.released_on). It goes back to a closed one only when nothing else is
    left (it may still run the session's old operations), and to a refused one only when
    nothing at all is (Spark refuses a released id there for the rest of the driver's life).
    """
    current = () if avoid is None else (avoid,)
    address = None
    for also in (closed, refused) if closed else ():
        address = rings.pick(pool, session_id, {*also, *current})
        if address is not None:
            break
    if address is None:
        address = rings.pick(pool, session_id, avoid)
    if address is None:
        if pool not in rings.pools:
            known = ", ".join(sorted(rings.pools)) or "none"
            raise UnknownPool(f"pool {pool!r} has no drivers (pools: {known})")
        members = {d.address: d.state.value for d in rings.drivers.values() if d.pool == pool}
        if avoid in members and members[avoid] != "down":  # a live one being moved off
            members[avoid] += " (the one being left)"
        raise NoLiveDriver.in_pool(pool, members)
    return address


class PinCache:
    """A bounded LRU of session key → pin, counting its sessions per (pool, driver) for metrics.

    Keys are `Pin.key` (registry.models.session_key): the session's user and id.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._pins: OrderedDict[str, Pin] = OrderedDict()
        self.counts: Counter[tuple[str, str]] = Counter()

    def _count(self, pin: Pin, delta: int) -> None:
        key = (pin.pool, pin.driver)
        self.counts[key] += delta
        if not self.counts[key]:
            del self.counts[key]

    def get(self, key: str) -> Pin | None:
        """The cached pin, refreshed as most recently used."""
        pin = self._pins.get(key)
        if pin is not None:
            self._pins.move_to_end(key)
        return pin

    def put(self, pin: Pin) -> None:
        """Cache a pin, evicting the least recently used one when full."""
        key = pin.key
        old = self._pins.get(key)
        if old is not None:
            self._count(old, -1)
        self._pins[key] = pin
        self._count(pin, 1)
        self._pins.move_to_end(key)
        while len(self._pins) > self._capacity:
            _, evicted = self._pins.popitem(last=False)
            self._count(evicted, -1)

    def peek(self, key: str) -> Pin | None:
        """The cached pin, leaving the LRU order alone."""
        return self._pins.get(key)

    def replace(self, pin: Pin) -> None:
        """Update a pin only if this cache holds the session."""
        key = pin.key
        old = self._pins.get(key)
        if old is not None:
            self._count(old, -1)
            self._count(pin, 1)
            self._pins[key] = pin

    def drop(self, key: str) -> Pin | None:
        """Forget a session; its pin if it was cached."""
        old = self._pins.pop(key, None)
        if old is not None:
            self._count(old, -1)
        return old

    def keys_on(self, address: str) -> list[str]:
        """The keys of the cached sessions pinned to a driver."""
        return [key for key, pin in self._pins.items() if pin.driver == address]

    def __len__(self) -> int:
        return len(self._pins)


# Learned ids waiting for the registry: a bound against a flood of new sessions during an
# outage of the tick; a session left out learns its id again on its next call.
_MAX_LEARNED = 100_000


class Placement:
    """Finds the driver of a session: cache, then registry pin, then ring."""

    def __init__(
        self,
        registry: Registry,
        rings: Rings,
        cache_size: int,
        default_pool: str = "default",
        telemetry: Telemetry | None = None,
        is_down: Callable[[str], bool] = lambda address: False,
    ) -> None:
        self._registry = registry
        # This replica's own health view, asked only about drivers outside the snapshot:
        # for members, the snapshot already carries it (membership.merge).
        self.is_down = is_down
        self.rings = rings
        self.cache = PinCache(cache_size)
        self.default_pool = default_pool
        self.telemetry = telemetry or Telemetry()
        self._active: set[str] = set()  # sessions used since the last flush
        self._pending: dict[str, Pin] = {}  # placed while the registry was down
        # Sessions whose driver's process exited under them (lost_state), bounded by the cache.
        self.stale: set[str] = set()
        self._learned: dict[str, Pin] = {}  # pins whose seen id waits to be written
        self.degraded = False
        self.move_idle: frozenset[str] = frozenset()  # drivers drained with move-idle

    def update_membership(self, rings: Rings, move_idle: frozenset[str] = frozenset()) -> None:
        """Swap in rings built from a new membership snapshot (and the move-idle drains)."""
        self.rings = rings
        self.move_idle = move_idle

    def lost_state(self, address: str) -> int:
        """Mark the cached sessions of a driver whose process exited (up restarts it on the
        same address): each is rebuilt there on its next call (dataplane/proxy.py). How many."""
        keys = self.cache.keys_on(address)
        self.stale.update(keys)
        return len(keys)

    def known(self, key: str) -> Pin | None:
        """The cached pin of a known session key (TTL refreshed in the next batch), else None."""
        if self.stale and key in self.stale:
            return None  # the slow path rebuilds it first
        pin = self.cache.get(key)
        if pin is not None:
            self._active.add(key)
        return pin

    async def place(
        self,
        session_id: str,
        pool: str | None,
        owner: str | None = None,
        *,
        claim: bool = False,
        refuse_new: Exception | None = None,
        admit: Admit | None = None,
        created: Created | None = None,
    ) -> Pin:
        """The pin of (owner, session id), creating it on the session's first call.

        With `claim` (authentication on), a session id is one user's: a new pin for an id
        that another user holds is PermissionDenied, on every replica (registry.claim).
        During a registry outage the claim cannot be checked; the pin is made anyway.
        `refuse_new` is raised instead of making a pin for a session that has none; `admit`
        (the module docstring) is awaited before one is made, `created` called once it is
        (not when another replica's pin won).
        """
        key = session_key(owner, session_id)
        pin = self.known(key)
        if pin is not None:
            return pin
        pool = pool or self.default_pool
        try:
            pin = await self._registry.get_pin(key)
            if pin is not None:
                self._registry_ok()
                return self._placed(pin, "registry")
        except RegistryUnavailable as exc:
            self._registry_down(exc)
            if refuse_new is not None:
                raise refuse_new from None
            new = self._new_pin(session_id, pool, owner)
            if admit is not None:
                await admit(key)
            if created is not None:
                created(new)
            return self._placed(self._pending_pin(new))
        if refuse_new is not None:
            raise refuse_new
        new = self._new_pin(session_id, pool, owner)
        return await self._bind_new(new, "ring", claim, admit, created)

    async def pin_clone(
        self,
        source: Pin,
        clone_id: str,
        *,
        claim: bool = False,
        admit: Admit | None = None,
        created: Created | None = None,
    ) -> Pin:
        """Pin a clone of `source` to the source's driver (same owner and pool): the pin in force.

        With `claim`, a clone id another user holds is PermissionDenied. During a registry
        outage the pin is kept here and written back later, as a new session's would be.
        `admit` is awaited before the pin is made (a clone is a new session).
        """
        pin = Pin(clone_id, source.driver, source.pool, owner=source.owner, created=time.time())
        return await self._bind_new(pin, "clone", claim, admit, created)

    async def _bind_new(
        self,
        pin: Pin,
        source: str,
        claim: bool,
        admit: Admit | None = None,
        created: Created | None = None,
    ) -> Pin:
        """Bind a new session's pin (claiming its id first with `claim`, then `admit`): the
        pin in force.

        During a registry outage the claim cannot be checked; the pin is kept here and
        written back by `flush`.
        """
        admitted = admit is None
        try:
            owner = pin.owner
            if claim and owner and await self._registry.claim(pin.session_id, owner) != owner:
                raise PermissionDenied(
                    f"session {pin.session_id} belongs to another user; start a new session "
                    "(a new SparkSession) instead of reusing its id"
                )
            if admit is not None:
                await admit(pin.key)
                admitted = True
            bound = await self._registry.bind(pin)
            self._registry_ok()
        except RegistryUnavailable as exc:
            self._registry_down(exc)
            if admit is not None and not admitted:  # the claim failed: admit it anyway
                await admit(pin.key)
            if created is not None:
                created(pin)
            return self._placed(self._pending_pin(pin))
        if created is not None and bound == pin:  # else another replica made it first
            created(pin)
        return self._placed(bound, source)

    def _pending_pin(self, pin: Pin) -> Pin:
        """Keep a pin made during a registry outage, to be written back by `flush`."""
        self._pending[pin.key] = pin
        self.telemetry.pins_pending.set(len(self._pending))
        return pin

    def _placed(self, pin: Pin, source: str = "degraded") -> Pin:
        """Count and cache a session's pin as placed from `source`."""
        self.telemetry.sessions_placed.labels(pin.pool, source).inc()
        self.cache.put(pin)
        return pin

    def _new_pin(self, session_id: str, pool: str, owner: str | None) -> Pin:
        address = choose(session_id, pool, self.rings)
        return Pin(session_id, address, pool, owner=owner, created=time.time())

    def learn(self, pin: Pin, seen: str) -> None:
        """Note the server-side id a session's driver showed its client (written by the tick).

        Cached at once, so this replica's next move of the session keeps that identity; the
        registry hears of it within a membership poll (`write_learned`), so other replicas'
        do too. An outage pin just carries it when it is written back.
        """
        key = pin.key
        if len(self._learned) >= _MAX_LEARNED:
            return  # not cached either: the session learns it again on a later call
        learned = replace(pin, seen_id=seen)
        self.cache.replace(learned)
        if key in self._pending:
            self._pending[key] = learned
        else:
            self._learned[key] = learned

    @property
    def has_learned(self) -> bool:
        """Whether learned ids wait to be written to the registry."""
        return bool(self._learned)

    async def write_learned(self) -> None:
        """Write learned ids into their pins (compare-and-set: a pin moved since is left be)."""
        learned, self._learned = self._learned, {}
        try:
            for key, pin in learned.items():
                winner = await self._registry.move(key, pin.driver, pin)
                if winner is not None and winner != pin:
                    self.cache.replace(winner)  # moved meanwhile: the id it had is moot
            self._registry_ok()
        except RegistryUnavailable as exc:
            self._registry_down(exc)  # the cache keeps them; this replica's moves still do

    def is_live(self, address: str) -> bool:
        """Whether a pinned session may keep using `address`.

        Pins are the truth: a driver this replica does not know (another replica's static
        driver, say) is followed, not moved away from. Only health moves a session — the
        registry or this replica's probes saying the driver is down. For a member the
        snapshot alone answers (it has both merged in); for a driver outside it, only this
        replica's own passive check can have found it dead.
        """
        driver = self.rings.drivers.get(address)
        if driver is not None:
            return driver.state is not DriverState.DOWN
        return not self.is_down(address)

    async def move(self, pin: Pin, new: Pin) -> tuple[Pin, bool]:
        """Compare-and-set a session's pin to `new`: (the pin in force, whether it is `new`).

        The registry replaces the pin only if it still names `pin.driver`: of several
        replicas moving one session, one wins and the others follow its pin. What `new`
        says (driver, kept identity) is sessions/migration.py's decision.
        """
        try:
            winner = await self._registry.move(pin.key, pin.driver, new)
        except RegistryUnavailable as exc:
            # Degraded: move locally by the ring, as for a new session; written back later.
            self._registry_down(exc)
            winner = new
            self._pending[pin.key] = new
        if winner is None:  # the pin expired or was released meanwhile: bind afresh
            winner = await self._registry.bind(new)
        self.cache.put(winner)
        self.stale.discard(pin.key)  # moved, or followed another replica's move: rebuilt
        return winner, winner == new

    async def release(self, key: str) -> None:
        """Forget a session (by key) everywhere, after a successful ReleaseSession."""
        cached = self.cache.drop(key)
        self.telemetry.sessions_released.labels(cached.pool if cached else "unknown").inc()
        self._active.discard(key)
        self.stale.discard(key)
        if self._pending.pop(key, None) is not None:
            self.telemetry.pins_pending.set(len(self._pending))
            return
        try:
            await self._registry.release(key)
            await self._registry.journal_drop(key)
        except RegistryUnavailable as exc:
            # The pin expires by its TTL; nothing else depends on it.
            self._registry_down(exc)

    async def expired(self, limit: int = 1000) -> list[Pin]:
        """Pins that lapsed in the registry since anyone last asked (each to one replica),
        counted by pool; none while the registry is unreachable."""
        try:
            lapsed = await self._registry.expired_pins(limit)
        except RegistryUnavailable as exc:
            self._registry_down(exc)
            return []
        for pin in lapsed:
            self.telemetry.sessions_expired.labels(pin.pool).inc()
        return lapsed

    def on_event(self, event: Event) -> None:
        """Apply a pin change announced by another replica."""
        if event.kind is EventKind.PIN_MOVED and event.pin is not None:
            self.cache.replace(event.pin)
        elif event.kind is EventKind.PIN_RELEASED and event.session_id is not None:
            self.cache.drop(event.session_id)

    async def flush(self) -> None:
        """Periodic registry work: write back pins of the outage, refresh TTLs in one batch."""
        reached = False  # whether the registry answered anything this time
        try:
            for key, pin in list(self._pending.items()):
                winner = await self._registry.bind(pin)
                reached = True
                del self._pending[key]
                if winner != pin:
                    log.warning(
                        "session %s was pinned to %s by another replica during the outage; "
                        "following it (was %s here)",
                        pin.session_id,
                        winner.driver,
                        pin.driver,
                    )
                    self.cache.replace(winner)
            active, self._active = self._active, set()
            if active:
                pins = (self.cache.peek(s) for s in active)
                drivers = {p.driver for p in pins if p is not None}
                await self._registry.touch(active, drivers)
                reached = True
            if reached:
                self._registry_ok()
        except RegistryUnavailable as exc:
            self._registry_down(exc)
        self.telemetry.pins_pending.set(len(self._pending))

    @property
    def needs_flush(self) -> bool:
        """Whether outage pins wait to be written back (flush at the next tick)."""
        return bool(self._pending) or self.degraded

    def note_registry_ok(self) -> None:
        """Another registry operation (membership) succeeded: the outage may be over."""
        self._registry_ok()

    def note_registry_error(self, exc: RegistryUnavailable) -> None:
        """Count an error of another registry operation (membership, events)."""
        self._registry_down(exc)

    def _registry_down(self, exc: RegistryUnavailable) -> None:
        self.telemetry.registry_errors.inc()
        if not self.degraded:
            self.degraded = True
            self.telemetry.registry_degraded.set(1)
            log.warning(
                "registry unavailable (%s): degraded: known sessions route from cache, "
                "new sessions by the ring alone until it is back",
                exc,
            )

    def _registry_ok(self) -> None:
        if self.degraded and not self._pending:
            self.degraded = False
            self.telemetry.registry_degraded.set(0)
            log.warning("registry is back: routing normally again")
