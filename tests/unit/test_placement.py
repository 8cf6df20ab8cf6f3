"""Placement: ring for new sessions, pins for known ones, cache without registry trips."""

from __future__ import annotations

import pytest

from registry.memory import MemoryRegistry
from registry.models import Driver, DriverState, Pin
from router.errors import NoLiveDriver
from router.placement import PinCache, Placement, choose
from router.ring import Rings


class CountingRegistry(MemoryRegistry):
    """The memory store, counting round trips."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0
        self.binds = 0

    async def get_pin(self, session_id: str) -> Pin | None:
        self.lookups += 1
        return await super().get_pin(session_id)

    async def bind(self, pin: Pin) -> Pin:
        self.binds += 1
        return await super().bind(pin)


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
    with pytest.raises(NoLiveDriver, match=r"pool 'bi' has no drivers \(pools: etl\)"):
        choose("s", "bi", rings)
    with pytest.raises(NoLiveDriver, match="pool 'etl' has no driver that takes new sessions"):
        choose("s", "etl", rings)


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
