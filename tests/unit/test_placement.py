"""Placement: ring for new sessions, pins for known ones, cache without registry trips."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from registry.base import RegistryUnavailable
from registry.memory import MemoryRegistry
from registry.models import Driver, DriverState, Event, EventKind, Pin
from router.errors import NoLiveDriver, UnknownPool
from router.sessions.placement import PinCache, Placement, choose
from router.sessions.ring import Rings


class CountingRegistry(MemoryRegistry):
    """The memory store, counting round trips; `down` makes every operation fail."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0
        self.binds = 0
        self.touched: list[set[str]] = []
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise RegistryUnavailable("test: registry is down")

    async def get_pin(self, session_id: str) -> Pin | None:
        self._check()
        self.lookups += 1
        return await super().get_pin(session_id)

    async def bind(self, pin: Pin) -> Pin:
        self._check()
        self.binds += 1
        return await super().bind(pin)

    async def touch(self, session_ids: Collection[str], drivers: Collection[str] = ()) -> None:
        self._check()
        self.touched.append(set(session_ids))
        await super().touch(session_ids, drivers)

    async def release(self, session_id: str) -> None:
        self._check()
        await super().release(session_id)


RINGS = Rings.build([Driver("127.0.0.1:1"), Driver("127.0.0.1:2")])


async def test_first_call_follows_the_ring_and_pins() -> None:
    reg = CountingRegistry()
    placement = Placement(reg, RINGS, cache_size=10)
    pin = await placement.place("s1", None)
    assert pin == Pin("s1", RINGS.pick("default", "s1") or "", "default")
    assert await reg.get_pin("s1") == pin


async def test_known_session_uses_the_cache_not_the_registry() -> None:
    reg = CountingRegistry()
    placement = Placement(reg, RINGS, cache_size=10)
    await placement.place("s1", None)
    lookups = reg.lookups
    for _ in range(100):
        await placement.place("s1", None)
    assert reg.lookups == lookups


async def test_existing_pin_wins_over_the_ring() -> None:
    reg = CountingRegistry()
    other = "127.0.0.1:2" if RINGS.pick("default", "s1") == "127.0.0.1:1" else "127.0.0.1:1"
    await reg.bind(Pin("s1", other))
    assert (await Placement(reg, RINGS, 10).place("s1", None)).driver == other


async def test_membership_change_does_not_move_pinned_sessions() -> None:
    reg = CountingRegistry()
    placement = Placement(reg, RINGS, 10)
    pins = {s: await placement.place(s, None) for s in (f"s{i}" for i in range(50))}
    placement.update_membership(Rings.build([*RINGS.drivers.values(), Driver("127.0.0.1:3")]))
    placement.cache = PinCache(10)  # force registry lookups
    for session, pin in pins.items():
        assert await placement.place(session, None) == pin


async def test_release_forgets_the_session() -> None:
    reg = CountingRegistry()
    placement = Placement(reg, RINGS, 10)
    await placement.place("s1", None)
    await placement.release("s1")
    assert await reg.get_pin("s1") is None and len(placement.cache) == 0


def test_choose_explains_unknown_and_empty_pools() -> None:
    rings = Rings.build([Driver("127.0.0.1:1", pool="etl", state=DriverState.DOWN)])
    with pytest.raises(UnknownPool, match=r"pool 'bi' has no drivers \(pools: etl\)"):
        choose("s", "bi", rings)
    with pytest.raises(NoLiveDriver, match="pool 'etl' has no driver that takes new sessions"):
        choose("s", "etl", rings)


def test_a_move_avoids_drivers_that_released_the_session_until_nothing_else_is_left() -> None:
    drivers = [Driver(f"127.0.0.1:{p}") for p in (1, 2, 3)]
    rings = Rings.build(drivers)
    # Sessions whose next driver along the ring (leaving :1) would be :2, a closed one.
    sessions = [f"s{i}" for i in range(400) if rings.pick("default", f"s{i}", "127.0.0.1:1")]
    to_two = [s for s in sessions if rings.pick("default", s, "127.0.0.1:1") == "127.0.0.1:2"]
    assert to_two
    for s in to_two:
        assert choose(s, "default", rings, "127.0.0.1:1", ("127.0.0.1:2",)) == "127.0.0.1:3"
    # Only closed drivers left: the session goes to one of them rather than nowhere.
    two = Rings.build(drivers[:2])
    assert choose("s", "default", two, "127.0.0.1:1", ("127.0.0.1:2",)) == "127.0.0.1:2"
    # One released it (certain SESSION_CLOSED), one it only left: the latter, whatever the ring.
    closed = ("127.0.0.1:2", "127.0.0.1:3")
    for s in sessions:
        assert choose(s, "default", rings, "127.0.0.1:1", closed, ("127.0.0.1:2",)) == closed[1]
        assert choose(s, "default", rings, "127.0.0.1:1", closed, ("127.0.0.1:3",)) == closed[0]


def test_no_live_driver_names_the_pools_drivers_and_their_states() -> None:
    rings = Rings.build(
        [
            Driver("127.0.0.1:1", pool="etl", state=DriverState.DOWN),
            Driver("127.0.0.1:2", pool="etl", state=DriverState.DRAINING),
            Driver("127.0.0.1:3", pool="bi"),
        ]
    )
    with pytest.raises(NoLiveDriver) as err:
        choose("s", "etl", rings)
    assert err.value.pool == "etl"
    assert err.value.drivers == {"127.0.0.1:1": "down", "127.0.0.1:2": "draining"}
    assert "(drivers: 127.0.0.1:1: down; 127.0.0.1:2: draining)" in str(err.value)


def test_pin_cache_is_bounded_lru() -> None:
    cache = PinCache(2)
    cache.put(Pin("a", "x"))
    cache.put(Pin("b", "x"))
    assert cache.get("a") is not None  # a is now most recent
    cache.put(Pin("c", "x"))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2


async def test_memory_registry_contract() -> None:
    reg = MemoryRegistry()
    assert await reg.bind(Pin("s", "d1")) == Pin("s", "d1")
    assert await reg.bind(Pin("s", "d2")) == Pin("s", "d1")  # first bind wins
    assert await reg.move("s", "d9", Pin("s", "d3")) == Pin("s", "d1")  # lost CAS: follow
    assert await reg.move("s", "d1", Pin("s", "d3")) == Pin("s", "d3")
    assert await reg.move("gone", "d1", Pin("gone", "d3")) is None
    await reg.upsert_driver(Driver("d1"))
    await reg.upsert_driver(Driver("d1", weight=3))
    assert [d.weight for d in await reg.drivers()] == [3]
    await reg.remove_driver("d1")
    assert list(await reg.drivers()) == []


async def test_ttl_refresh_is_one_batch_per_flush() -> None:
    reg = CountingRegistry()
    placement = Placement(reg, RINGS, 100)
    for s in ("a", "b", "c"):
        await placement.place(s, None)
    for _ in range(50):
        for s in ("a", "b"):
            await placement.place(s, None)
    await placement.flush()
    assert reg.touched == [{"a", "b"}]
    await placement.flush()  # nothing active since: no write at all
    assert reg.touched == [{"a", "b"}]


async def test_registry_outage_degrades_and_recovers() -> None:
    reg = CountingRegistry()
    placement = Placement(reg, RINGS, 100)
    known = await placement.place("known", None)
    reg.down = True
    # Known sessions: from the cache, no registry trip, no error.
    assert await placement.place("known", None) == known
    assert placement.telemetry.value("spark_router_registry_degraded") == 0
    # New sessions: by the ring alone; the replica says it is degraded.
    new = await placement.place("new", None)
    assert new.driver == RINGS.pick("default", "new")
    assert placement.telemetry.value("spark_router_registry_degraded") == 1
    assert placement.telemetry.value("spark_router_pins_pending_writeback") == 1
    await placement.flush()  # still down: kept pending
    assert placement.needs_flush
    reg.down = False
    await placement.flush()
    assert await reg.get_pin("new") == new  # written back
    assert placement.telemetry.value("spark_router_registry_degraded") == 0
    assert placement.telemetry.value("spark_router_pins_pending_writeback") == 0
    assert not placement.needs_flush


async def test_write_back_follows_a_pin_bound_elsewhere_meanwhile() -> None:
    reg = CountingRegistry()
    placement = Placement(reg, RINGS, 100)
    reg.down = True
    mine = await placement.place("s", None)
    reg.down = False
    other = "127.0.0.1:2" if mine.driver == "127.0.0.1:1" else "127.0.0.1:1"
    await reg.bind(Pin("s", other))  # another replica got there first
    await placement.flush()
    assert (await placement.place("s", None)).driver == other


async def test_events_from_other_replicas_update_the_cache() -> None:
    placement = Placement(CountingRegistry(), RINGS, 100)
    pin = await placement.place("s", None)
    moved = Pin("s", "127.0.0.1:9", pin.pool)
    placement.on_event(Event(EventKind.PIN_MOVED, pin=moved, session_id="s"))
    assert placement.cache.get("s") == moved
    placement.on_event(Event(EventKind.PIN_MOVED, pin=Pin("other", "x"), session_id="other"))
    assert placement.cache.get("other") is None  # not cached here: not added
    placement.on_event(Event(EventKind.PIN_RELEASED, session_id="s"))
    assert placement.cache.get("s") is None


async def test_pool_from_the_call_or_the_default() -> None:
    rings = Rings.build([Driver("127.0.0.1:1", pool="etl"), Driver("127.0.0.1:2", pool="bi")])
    placement = Placement(CountingRegistry(), rings, 100, default_pool="bi")
    assert (await placement.place("a", "etl")).driver == "127.0.0.1:1"
    assert (await placement.place("b", None)).driver == "127.0.0.1:2"
    with pytest.raises(UnknownPool, match="pool 'nope'"):
        await placement.place("c", "nope")


async def test_sessions_of_a_driver_that_lost_its_state_skip_the_cache_until_rebuilt() -> None:
    placement = Placement(MemoryRegistry(), Rings.build([Driver("127.0.0.1:1")]), cache_size=10)
    a = await placement.place("a", None)
    b = await placement.place("b", None)
    assert placement.known(a.key) == a
    assert placement.lost_state("127.0.0.1:1") == 2
    assert placement.lost_state("127.0.0.1:9") == 0  # none of its sessions here
    assert placement.known(a.key) is None  # the slow path rebuilds it first
    await placement.move(a, a)
    assert placement.known(a.key) == a and placement.known(b.key) is None
    await placement.release(b.key)
    assert not placement.stale


# --- the admit hook (the session quota) ------------------------------------------------------


class Admissions:
    """An admit hook that records the keys it saw and refuses those in `refuse`."""

    def __init__(self, refuse: Collection[str] = ()) -> None:
        self.seen: list[str] = []
        self.refuse = set(refuse)

    async def __call__(self, key: str) -> None:
        self.seen.append(key)
        if key in self.refuse:
            raise PermissionError(f"refused {key}")


async def test_admit_is_asked_only_before_a_new_pin_and_a_refusal_makes_none() -> None:
    reg = CountingRegistry()
    placement = Placement(reg, RINGS, cache_size=10)
    admit = Admissions(refuse={"alice/s2"})
    await placement.place("s1", None, "alice", admit=admit)
    await placement.place("s1", None, "alice", admit=admit)  # known: cached
    await reg.bind(Pin("s3", "127.0.0.1:1", owner="alice"))  # another replica's pin
    await placement.place("s3", None, "alice", admit=admit)
    with pytest.raises(PermissionError):
        await placement.place("s2", None, "alice", admit=admit)
    assert admit.seen == ["alice/s1", "alice/s2"]
    assert await reg.get_pin("alice/s2") is None and placement.known("alice/s2") is None


async def test_admit_is_asked_during_an_outage_too_and_for_clones() -> None:
    reg = CountingRegistry()
    placement = Placement(reg, RINGS, cache_size=10)
    admit = Admissions(refuse={"bob/c2"})
    source = await placement.place("s1", None, "bob", admit=admit)
    clone = await placement.pin_clone(source, "c1", admit=admit)
    assert clone.driver == source.driver and clone.owner == "bob"
    with pytest.raises(PermissionError):
        await placement.pin_clone(source, "c2", admit=admit)
    reg.down = True
    await placement.place("s4", None, "bob", admit=admit, claim=True)
    assert admit.seen == ["bob/s1", "bob/c1", "bob/c2", "bob/s4"]
    assert placement.known("bob/s4") is not None  # pending, written back later
