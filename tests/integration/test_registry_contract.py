"""The registry contract (registry/base.py), run against every store.

MemoryRegistry runs on an injected clock: "time passes" by advancing it. RedisRegistry runs
on a real redis-server with short TTLs: time passes by itself and conditions are polled
with a deadline. "A second instance sharing the store" is the same object for memory
(its events reach only its own iterators) and a second RedisRegistry on the same Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from registry.base import Registry, RegistryUnavailable
from registry.memory import MemoryRegistry
from registry.models import DrainMode, Driver, DriverState, Event, EventKind, Pin, session_key
from registry.redis import RedisRegistry
from tests.helpers import Listener, free_port

WAIT = 5.0  # seconds: the most any condition below may take to hold


class Harness:
    """One store under test: opens instances, lets time pass, counts subscribers."""

    kind = ""

    async def open(self, pin_ttl: float = 60.0) -> Registry:
        """An instance of the store."""
        raise NotImplementedError

    async def peer(self, registry: Registry) -> Registry:
        """Another instance sharing `registry`'s store (as another replica would)."""
        raise NotImplementedError

    async def subscribers(self) -> int:
        """How many events() iterators are subscribed right now."""
        raise NotImplementedError

    async def tick(self) -> None:
        """Let a little store time pass."""
        raise NotImplementedError

    async def forget_scripts(self) -> None:
        """Make the store forget cached server-side scripts (as a restarted Redis does)."""

    async def aclose(self) -> None:
        """Close every instance opened."""
        raise NotImplementedError


class MemoryHarness(Harness):
    kind = "memory"

    def __init__(self) -> None:
        self.now = 1_000.0
        self.registry: MemoryRegistry | None = None

    async def open(self, pin_ttl: float = 60.0) -> Registry:
        self.registry = MemoryRegistry(pin_ttl=pin_ttl, clock=lambda: self.now)
        return self.registry

    async def peer(self, registry: Registry) -> Registry:
        return registry

    async def subscribers(self) -> int:
        return 0 if self.registry is None else len(self.registry._subscribers)

    async def tick(self) -> None:
        self.now += 0.1
        await asyncio.sleep(0)

    async def aclose(self) -> None:
        if self.registry is not None:
            await self.registry.close()


class RedisHarness(Harness):
    kind = "redis"

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list[RedisRegistry] = []
        self.pin_ttls: dict[int, float] = {}
        self.admin = aioredis.Redis.from_url(url, decode_responses=True)

    async def open(self, pin_ttl: float = 60.0) -> Registry:
        registry = RedisRegistry.from_url(self.url, pin_ttl=pin_ttl)
        self.opened.append(registry)
        self.pin_ttls[id(registry)] = pin_ttl
        return registry

    async def peer(self, registry: Registry) -> Registry:
        return await self.open(self.pin_ttls[id(registry)])  # replicas share one pin_ttl

    async def subscribers(self) -> int:
        counts = await self.admin.pubsub_numsub("{spark-router}:events")
        return int(counts[0][1])

    async def tick(self) -> None:
        await asyncio.sleep(0.02)

    async def forget_scripts(self) -> None:
        await self.admin.script_flush()

    async def aclose(self) -> None:
        for registry in self.opened:
            await registry.close()
        await self.admin.aclose()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """Each store in turn (redis: on the session's redis-server, emptied first)."""
    harness: Harness
    if request.param == "memory":
        harness = MemoryHarness()
    else:
        harness = RedisHarness(request.getfixturevalue("redis_url"))
    yield harness
    await harness.aclose()


async def eventually(
    store: Harness, cond: Callable[[], Awaitable[bool]], what: str, within: float = WAIT
) -> None:
    """Let store time pass until `cond` holds; fail after `within` wall-clock seconds."""
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await store.tick()


@pytest.fixture
async def listen(store: Harness) -> AsyncIterator[Callable[[Registry], Awaitable[Listener]]]:
    """Start listeners that are subscribed by the time they are returned."""
    listeners: list[Listener] = []

    async def start(registry: Registry) -> Listener:
        before = await store.subscribers()
        listener = Listener(registry, WAIT)
        listeners.append(listener)
        deadline = time.monotonic() + WAIT
        while await store.subscribers() <= before:
            assert time.monotonic() < deadline, "events() did not subscribe"
            assert not listener.task.done(), "events() ended before subscribing"
            await asyncio.sleep(0.01)
        return listener

    yield start
    for listener in listeners:
        await listener.stop()


Listen = Callable[[Registry], Awaitable[Listener]]
MARKER = Driver("marker:1")


async def next_is_marker(reg: Registry, listener: Listener) -> None:
    """Nothing was announced since the last event: the next event is a marker made now."""
    await reg.upsert_driver(MARKER)
    assert await listener.next() == Event(EventKind.DRIVER_JOINED, driver=MARKER)
    await reg.remove_driver(MARKER.address)
    assert await listener.next() == Event(EventKind.DRIVER_LEFT, driver=MARKER)


# --- pins -------------------------------------------------------------------------------


async def test_bind_first_wins(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    assert await reg.get_pin("s1") is None
    first = Pin("s1", "d1:15002", "gold")
    assert await reg.bind(first) == first
    assert await other.bind(Pin("s1", "d2:15002")) == first
    assert await other.get_pin("s1") == first
    assert await reg.get_pin("s2") is None


async def test_racing_moves_tell_the_winner_by_its_move_token(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    await reg.bind(Pin("s1", "d1:1"))
    # Two replicas build the same move but for its token: only one compare-and-set lands.
    mine = Pin("s1", "d2:1", server_side_id="srv-1", move_token="a" * 32)
    theirs = Pin("s1", "d2:1", server_side_id="srv-1", move_token="b" * 32)
    assert await reg.move("s1", "d1:1", mine) == mine
    winner = await other.move("s1", "d1:1", theirs)
    assert winner == mine and winner != theirs  # the loser sees it lost
    assert (await other.get_pin("s1")) == mine  # the token survives the store


async def test_a_learned_server_side_id_is_kept_and_announced(
    store: Harness, listen: Listen
) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    heard = await listen(other)
    await reg.bind(Pin("s1", "d1:1"))
    learned = Pin("s1", "d1:1", seen_id="srv-1")
    assert await reg.move("s1", "d1:1", learned) == learned  # same driver: only the id changes
    found = await other.get_pin("s1")
    assert found is not None and found.seen_id == "srv-1" and found.move_token is None
    event = await heard.next()
    assert event.pin is not None and event.pin.seen_id == "srv-1"


async def test_the_drivers_a_session_was_moved_off_survive_the_store(
    store: Harness, listen: Listen
) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    heard = await listen(other)
    await reg.bind(Pin("s1", "d1:1"))
    left = Pin("s1", "d2:1", server_side_id="srv-1", move_token="t", moved_off=("d1:1",))
    assert await reg.move("s1", "d1:1", left) == left
    found = await other.get_pin("s1")
    assert found is not None and found.moved_off == ("d1:1",) and found.seen_id is None
    assert found.released_on == ()
    drained = Pin("s1", "d3:1", move_token="u", moved_off=("d1:1", "d2:1"), released_on=("d2:1",))
    assert await reg.move("s1", "d2:1", drained) == drained
    found = await other.get_pin("s1")
    assert found is not None and (found.moved_off, found.released_on) == (
        ("d1:1", "d2:1"),
        ("d2:1",),
    )
    event = await heard.next()
    assert event.pin is not None and event.pin.moved_off == ("d1:1",)
    event = await heard.next()
    assert event.pin is not None and event.pin.released_on == ("d2:1",)
    # Moved back to a driver that released it: under an id of its own there.
    back = Pin("s1", "d2:1", move_token="v", upstream_id="u-1")
    assert await reg.move("s1", "d3:1", back) == back
    found = await other.get_pin("s1")
    assert found is not None and found.upstream_id == "u-1" and found.driver_session_id == "u-1"
    event = await heard.next()
    assert event.pin is not None and event.pin.upstream_id == "u-1"


async def test_any_text_is_a_valid_identifier(store: Harness, listen: Listen) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    heard = await listen(other)
    session = 'sé ssion "1" {x}:pin:\\'
    first = Pin(session, "[::1]:15002", 'pool "ü"')
    assert await reg.bind(first) == first
    assert await other.get_pin(session) == first
    moved = Pin(session, "driver-2.example:15002", "")
    assert await reg.move(session, "[::1]:15002", moved) == moved
    assert await heard.next() == Event(EventKind.PIN_MOVED, pin=moved, session_id=session)
    odd = Driver("[::1]:15002", pool='pool "ü"', weight=7, state=DriverState.DOWN)
    await reg.upsert_driver(odd)
    assert list(await other.drivers()) == [odd]
    assert await heard.next() == Event(EventKind.DRIVER_JOINED, driver=odd)


async def test_concurrent_binds_agree_on_one_winner(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    candidates = [Pin("s1", f"d{i}:15002") for i in range(50)]
    results = await asyncio.gather(
        *((reg if i % 2 else other).bind(pin) for i, pin in enumerate(candidates))
    )
    assert len(set(results)) == 1
    assert results[0] in candidates
    assert await reg.get_pin("s1") == results[0]


async def test_move_compare_and_set(store: Harness, listen: Listen) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    heard = await listen(other)
    await reg.bind(Pin("s1", "d1:1"))
    moved = Pin("s1", "d2:1", "gold")
    assert await reg.move("s1", "d1:1", moved) == moved
    assert await other.get_pin("s1") == moved
    assert await heard.next() == Event(EventKind.PIN_MOVED, pin=moved, session_id="s1")

    # A replica that lost the race (it still expected d1) follows the winner; no event.
    assert await other.move("s1", "d1:1", Pin("s1", "d3:1")) == moved
    assert await reg.get_pin("s1") == moved
    # No pin: nothing to move, nothing created.
    assert await reg.move("ghost", "d1:1", Pin("ghost", "d2:1")) is None
    assert await reg.get_pin("ghost") is None
    await next_is_marker(reg, heard)


async def test_release(store: Harness, listen: Listen) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    heard = await listen(other)
    await reg.bind(Pin("s1", "d1:1"))
    await reg.release("s1")
    assert await other.get_pin("s1") is None
    assert await heard.next() == Event(EventKind.PIN_RELEASED, session_id="s1")
    await reg.release("s1")  # nothing left: nothing announced
    await next_is_marker(reg, heard)
    # Released sessions bind afresh.
    assert await reg.bind(Pin("s1", "d2:1")) == Pin("s1", "d2:1")


async def test_pin_expires_after_ttl(store: Harness) -> None:
    reg = await store.open(pin_ttl=1.0)
    await reg.bind(Pin("s1", "d1:1"))
    assert await reg.get_pin("s1") == Pin("s1", "d1:1")

    async def gone() -> bool:
        return await reg.get_pin("s1") is None

    await eventually(store, gone, "the pin to expire")
    assert await reg.bind(Pin("s1", "d2:1")) == Pin("s1", "d2:1")


async def test_touch_keeps_pins_alive(store: Harness) -> None:
    reg = await store.open(pin_ttl=1.0)
    other = await store.peer(reg)
    await reg.bind(Pin("kept", "d1:1"))
    await reg.bind(Pin("dropped", "d1:1"))
    await other.touch([])  # an empty batch is fine

    async def dropped_gone_while_kept_touched() -> bool:
        await other.touch(["kept", "never-bound"])
        return await reg.get_pin("dropped") is None

    await eventually(store, dropped_gone_while_kept_touched, "the untouched pin to expire")
    assert await reg.get_pin("kept") == Pin("kept", "d1:1")
    assert await reg.get_pin("never-bound") is None  # touch creates nothing

    async def kept_gone() -> bool:
        return await reg.get_pin("kept") is None

    await eventually(store, kept_gone, "the pin to expire once no longer touched")


async def test_lapsed_pins_are_reported_once_to_one_instance(store: Harness) -> None:
    reg = await store.open(pin_ttl=1.0)
    other = await store.peer(reg)
    lapsing = Pin("lapsing", "d1:1", "etl", owner="alice")
    await reg.bind(lapsing)
    await reg.bind(Pin("released", "d1:1"))
    await reg.bind(Pin("kept", "d1:1"))
    await reg.bind(Pin("moving", "d1:1"))
    await reg.move("moving", "d1:1", Pin("moving", "d2:1", move_token="t"))
    await reg.release("released")
    assert await reg.expired_pins() == [] and await other.expired_pins() == []
    found: list[Pin] = []

    async def lapsed() -> bool:
        await other.touch(["kept"])
        found.extend(await reg.expired_pins())
        found.extend(await other.expired_pins())
        return {p.session_id for p in found} >= {"lapsing", "moving"}

    await eventually(store, lapsed, "the untouched pins to be reported")
    # Each lapsed pin once, to whichever instance asked first; with its driver and pool as
    # they were (the moved one's new driver); neither the released nor the touched one.
    by_id = {p.session_id: p for p in found}
    assert sorted(p.session_id for p in found) == ["lapsing", "moving"]
    assert by_id["lapsing"] == Pin("lapsing", "d1:1", "etl")
    assert by_id["lapsing"].owner == "alice"
    assert by_id["moving"].driver == "d2:1"
    assert await reg.get_pin("kept") == Pin("kept", "d1:1")
    assert await reg.expired_pins() == [] and await other.expired_pins() == []


async def test_a_lapsed_pin_bound_afresh_is_reported_and_the_new_one_is_not(
    store: Harness,
) -> None:
    reg = await store.open(pin_ttl=1.0)
    await reg.bind(Pin("again", "d1:1"))

    async def gone() -> bool:
        return await reg.get_pin("again") is None

    await eventually(store, gone, "the pin to expire")
    await reg.bind(Pin("again", "d2:1"))  # the session came back: pinned afresh elsewhere
    found: list[Pin] = []

    async def reported() -> bool:
        found.extend(await reg.expired_pins())
        return bool(found)

    await eventually(store, reported, "the lapsed pin to be reported")
    assert [(p.session_id, p.driver) for p in found] == [("again", "d1:1")]
    assert await reg.get_pin("again") == Pin("again", "d2:1")
    await reg.release("again")
    assert await reg.expired_pins() == []  # released, not lapsed


async def test_expired_pins_honours_its_limit(store: Harness) -> None:
    reg = await store.open(pin_ttl=1.0)
    for i in range(5):
        await reg.bind(Pin(f"s{i}", "d1:1"))
    found: list[Pin] = []

    async def all_reported() -> bool:
        batch = await reg.expired_pins(limit=2)
        assert len(batch) <= 2
        found.extend(batch)
        return len(found) >= 5

    await eventually(store, all_reported, "every lapsed pin, two at a time")
    assert sorted(p.session_id for p in found) == [f"s{i}" for i in range(5)]


# --- drivers ----------------------------------------------------------------------------


async def test_drivers_expire_without_heartbeat(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    static = Driver("static:1", pool="gold", weight=3)
    beating = Driver("beating:1", state=DriverState.DRAINING)
    await reg.upsert_driver(static)
    await reg.upsert_driver(beating, ttl=1.0)
    await reg.upsert_driver(Driver("stillborn:1"), ttl=0)  # expired on arrival
    assert sorted(await other.drivers(), key=lambda d: d.address) == [beating, static]

    async def only_static() -> bool:
        return list(await other.drivers()) == [static]

    await eventually(store, only_static, "the heartbeat driver to expire")


async def test_upsert_events(store: Harness, listen: Listen) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    heard = await listen(other)
    driver = Driver("d1:1")
    await reg.upsert_driver(driver, ttl=30)
    assert await heard.next() == Event(EventKind.DRIVER_JOINED, driver=driver)
    await reg.upsert_driver(driver, ttl=30)  # a plain heartbeat: silent
    heavier = Driver("d1:1", weight=2)
    await reg.upsert_driver(heavier, ttl=30)
    assert await heard.next() == Event(EventKind.DRIVER_CHANGED, driver=heavier)
    draining = Driver("d1:1", weight=2, state=DriverState.DRAINING)
    await reg.upsert_driver(draining, ttl=30)
    assert await heard.next() == Event(EventKind.DRIVER_CHANGED, driver=draining)
    moved_pool = Driver("d1:1", pool="gold", weight=2, state=DriverState.DRAINING)
    await reg.upsert_driver(moved_pool, ttl=30)
    assert await heard.next() == Event(EventKind.DRIVER_CHANGED, driver=moved_pool)
    await reg.upsert_driver(moved_pool, ttl=30)
    await reg.upsert_driver(moved_pool)  # made static, same record: silent
    await next_is_marker(reg, heard)
    assert list(await other.drivers()) == [moved_pool]


async def test_expired_driver_rejoins(store: Harness, listen: Listen) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    heard = await listen(other)
    driver = Driver("d1:1")
    await reg.upsert_driver(driver, ttl=1.0)
    assert await heard.next() == Event(EventKind.DRIVER_JOINED, driver=driver)

    async def expired() -> bool:
        return not await other.drivers()

    await eventually(store, expired, "the driver to expire")
    await reg.upsert_driver(driver, ttl=1.0)
    assert await heard.next() == Event(EventKind.DRIVER_JOINED, driver=driver)


async def test_remove_driver(store: Harness, listen: Listen) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    heard = await listen(other)
    driver = Driver("d1:1", pool="gold", weight=4, state=DriverState.DRAINING)
    await reg.upsert_driver(driver, ttl=30)
    assert await heard.next() == Event(EventKind.DRIVER_JOINED, driver=driver)
    await reg.remove_driver("d1:1")
    assert await heard.next() == Event(EventKind.DRIVER_LEFT, driver=driver)
    assert list(await other.drivers()) == []
    await reg.remove_driver("d1:1")  # gone already: silent
    await reg.remove_driver("never:1")
    await next_is_marker(reg, heard)


# --- events -----------------------------------------------------------------------------


async def test_every_listener_hears_every_change(store: Harness, listen: Listen) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    near, far = await listen(reg), await listen(other)
    await reg.bind(Pin("s1", "d1:1"))
    await reg.move("s1", "d1:1", Pin("s1", "d2:1"))
    await other.release("s1")
    expected = [
        Event(EventKind.PIN_MOVED, pin=Pin("s1", "d2:1"), session_id="s1"),
        Event(EventKind.PIN_RELEASED, session_id="s1"),
    ]
    for listener in (near, far):
        assert [await listener.next() for _ in expected] == expected


async def test_close_ends_events(store: Harness, listen: Listen) -> None:
    reg = await store.open()
    first, second = await listen(reg), await listen(reg)
    await reg.close()
    await asyncio.wait_for(asyncio.gather(first.task, second.task), WAIT)
    assert first.queue.empty() and second.queue.empty()


# --- journals ---------------------------------------------------------------------------

CAP = 1_000_000


async def test_journal_keeps_entries_in_order(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    assert await reg.journal("s1") == []
    entries = [b"first", bytes(range(256)), b"", b"\xff\xfe not utf-8 \x80", b"x" * 300_000]
    for entry in entries:
        assert await reg.journal_append("s1", entry, CAP)
    assert await other.journal("s1") == entries
    assert await other.journal("s2") == []  # journals are per session
    assert await reg.journal_append('sé ssion "1" {x}:journal:', b"odd", CAP)
    assert await other.journal('sé ssion "1" {x}:journal:') == [b"odd"]


async def test_journal_cap_marks_it_overflowed_for_good(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    assert await reg.journal_append("s1", b"a" * 6, cap=10)
    assert await other.journal_append("s1", b"b" * 4, cap=10)  # exactly the cap: fits
    assert await reg.journal("s1") == [b"a" * 6, b"b" * 4]
    assert not await other.journal_append("s1", b"c", cap=10)
    assert await reg.journal("s1") is None
    # Sticky: even an entry that would fit a larger cap is refused now.
    assert not await reg.journal_append("s1", b"", cap=CAP)
    assert await other.journal("s1") is None
    # An entry larger than the cap on its own overflows an empty journal.
    assert not await reg.journal_append("s2", b"x" * 11, cap=10)
    assert await reg.journal("s2") is None
    assert await reg.journal("s3") == []  # other sessions are untouched


async def test_journal_drop(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    await reg.bind(Pin("s1", "d1:1"))
    await reg.journal_append("s1", b"one", CAP)
    await reg.journal_append("s2", b"x" * 11, cap=10)  # overflowed
    await other.journal_drop("s1")
    await other.journal_drop("s2")
    assert await reg.journal("s1") == []
    assert await reg.journal("s2") == []  # the overflow mark goes too
    assert await reg.get_pin("s1") == Pin("s1", "d1:1")  # the pin is not the journal
    await reg.journal_drop("s1")  # nothing left: fine
    await reg.journal_drop("never")
    assert await reg.journal_append("s2", b"fresh", cap=10)
    assert await other.journal("s2") == [b"fresh"]


async def test_journal_expires_with_the_pin_unless_touched(store: Harness) -> None:
    reg = await store.open(pin_ttl=1.0)
    other = await store.peer(reg)
    for session in ("kept", "dropped"):
        await reg.bind(Pin(session, "d1:1"))
        assert await reg.journal_append(session, session.encode(), CAP)
    assert not await reg.journal_append("overflowed", b"x" * 11, cap=10)

    async def untouched_gone_while_kept_touched() -> bool:
        await other.touch(["kept"])
        return (
            await reg.get_pin("dropped") is None
            and await reg.journal("dropped") == []
            and await reg.journal("overflowed") == []
        )

    await eventually(store, untouched_gone_while_kept_touched, "untouched journals to expire")
    assert await reg.get_pin("kept") == Pin("kept", "d1:1")
    assert await reg.journal("kept") == [b"kept"]

    async def kept_gone() -> bool:
        return await reg.get_pin("kept") is None and await reg.journal("kept") == []

    await eventually(store, kept_gone, "the journal to expire once no longer touched")


async def test_concurrent_appends_keep_every_entry_once(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    entries = [f"entry-{i}".encode() for i in range(200)]
    appended = await asyncio.gather(
        *((reg if i % 2 else other).journal_append("s1", e, CAP) for i, e in enumerate(entries))
    )
    assert all(appended)
    journal = await reg.journal("s1")
    assert journal is not None
    assert sorted(journal) == sorted(entries)
    assert len(journal) == len(entries)


async def test_concurrent_appends_never_pass_the_cap(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    entries = [b"%02d" % i for i in range(40)]  # 2 bytes each: 10 fit in 20
    appended = await asyncio.gather(
        *((reg if i % 2 else other).journal_append("s1", e, cap=20) for i, e in enumerate(entries))
    )
    assert appended.count(True) == 10
    assert await other.journal("s1") is None


async def test_journal_survives_a_store_that_forgot_its_scripts(store: Harness) -> None:
    reg = await store.open()
    assert await reg.journal_append("s1", b"before", CAP)
    assert await reg.journal("s1") == [b"before"]
    await store.forget_scripts()
    assert await reg.journal("s1") == [b"before"]
    await store.forget_scripts()
    assert await reg.journal_append("s1", b"after", CAP)
    assert await reg.journal("s1") == [b"before", b"after"]


async def test_a_moved_pin_keeps_its_server_side_alias(
    store: Harness, listen: Callable[[Registry], Awaitable[Listener]]
) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    listener = await listen(other)
    await reg.bind(Pin("s-alias", "d1"))
    moved = Pin("s-alias", "d2", "default", "server-side-1")
    assert await reg.move("s-alias", "d1", moved) == moved
    assert await reg.get_pin("s-alias") == moved
    assert await other.get_pin("s-alias") == moved
    event = await listener.next()
    assert event.pin == moved  # other replicas learn the alias with the move


async def test_drain_marks_are_shared_and_announced(
    store: Harness, listen: Callable[[Registry], Awaitable[Listener]]
) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    listener = await listen(other)
    await reg.set_draining("d1:15002", True)
    assert await other.draining() == {"d1:15002": DrainMode.KEEP}
    event = await listener.next()
    assert event.kind is EventKind.DRIVER_CHANGED and event.driver is not None
    assert event.driver.address == "d1:15002"
    await reg.set_draining("d1:15002", True, DrainMode.MOVE_IDLE)
    assert await other.draining() == {"d1:15002": DrainMode.MOVE_IDLE}
    await reg.set_draining("d1:15002", False)
    assert await other.draining() == {}


async def test_pins_keep_owner_created_and_moves(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    pin = Pin("s1", "d1:1", "gold", owner="ann", created=1_700_000_000.5)
    await reg.bind(pin)
    assert await other.get_pin("s1") is None  # ann's session is keyed by her too
    got = await other.get_pin(pin.key)
    assert got is not None
    assert (got.owner, got.created, got.moves) == ("ann", 1_700_000_000.5, 0)
    moved = Pin("s1", "d2:1", "gold", "srv-1", owner="ann", created=1_700_000_000.5, moves=1)
    await reg.move(pin.key, "d1:1", moved)
    got = await other.get_pin(pin.key)
    assert got == moved and got is not None and got.moves == 1 and got.owner == "ann"


async def test_sessions_lists_the_pins_of_a_driver(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    for n in range(5):
        await reg.bind(Pin(f"s{n}", "d1:1" if n < 3 else "d2:1"))
    await reg.move("s0", "d1:1", Pin("s0", "d2:1"))
    await reg.release("s1")
    assert sorted(p.session_id for p in await other.sessions("d1:1")) == ["s2"]
    assert sorted(p.session_id for p in await other.sessions("d2:1")) == ["s0", "s3", "s4"]
    assert sorted(p.session_id for p in await other.sessions()) == ["s0", "s2", "s3", "s4"]
    assert len(await other.sessions("d2:1", limit=2)) == 2
    assert await other.sessions("nowhere:1") == []


async def test_sessions_leaves_out_expired_pins(store: Harness) -> None:
    reg = await store.open(pin_ttl=1.0)
    await reg.bind(Pin("old", "d1:1"))
    await reg.bind(Pin("kept", "d1:1"))

    async def old_gone() -> bool:
        await reg.touch(["kept"], ["d1:1"])
        return [p.session_id for p in await reg.sessions("d1:1")] == ["kept"]

    await eventually(store, old_gone, "the untouched pin to leave the driver's sessions")


# --- sessions are (user, id) and an id is claimed by one user ------------------------------


async def test_pins_of_two_users_with_one_session_id_are_apart(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    alice = Pin("s1", "d1:1", owner="alice")
    mallory = Pin("s1", "d2:1", owner="mallory/x")  # a '/' in a user stays in its half
    assert await reg.bind(alice) == alice
    assert await reg.bind(mallory) == mallory
    got = await other.get_pin(alice.key)
    assert got == alice and got is not None and got.owner == "alice"
    got = await other.get_pin(mallory.key)
    assert got is not None and (got.owner, got.driver) == ("mallory/x", "d2:1")
    await other.release(mallory.key)
    assert await reg.get_pin(alice.key) == alice
    listed = {(p.session_id, p.owner) for p in await reg.sessions()}
    assert listed == {("s1", "alice")}


async def test_a_session_id_is_claimed_by_its_first_user(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    assert await reg.claim("s1", "alice") == "alice"
    assert await other.claim("s1", "mallory") == "alice"
    assert await other.claim("s1", "alice") == "alice"
    assert await other.claim("s2", "mallory") == "mallory"


async def test_a_claim_expires_with_its_pins_and_touch_keeps_it(store: Harness) -> None:
    reg = await store.open(pin_ttl=1.0)
    await reg.claim("kept", "alice")
    await reg.bind(Pin("kept", "d1:1", owner="alice"))
    await reg.claim("dropped", "alice")

    async def dropped_is_free() -> bool:
        await reg.touch([session_key("alice", "kept")])
        return await reg.claim("dropped", "bob") == "bob"

    await eventually(store, dropped_is_free, "the untouched claim to expire")
    assert await reg.claim("kept", "bob") == "alice"


# --- quota counters ---------------------------------------------------------------------


async def counted(reg: Registry, user: str) -> int:
    """How many sessions count against `user` now (an acquire that can never be granted)."""
    grant = await reg.quota_session_acquire(user, "probe/never-bound", 0, 60.0)
    assert not grant.granted
    return grant.current


async def test_concurrent_session_acquires_never_pass_the_limit(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    keys = [session_key("alice", f"s{i}") for i in range(40)]
    grants = await asyncio.gather(
        *(
            (reg if i % 2 else other).quota_session_acquire("alice", k, 5, 60.0)
            for i, k in enumerate(keys)
        )
    )
    won = [k for k, g in zip(keys, grants, strict=True) if g.granted]
    assert len(won) == 5
    assert sorted(g.current for g in grants if g.granted) == [1, 2, 3, 4, 5]
    assert {g.current for g in grants if not g.granted} == {5}
    # A session counted already is refreshed, not refused, at the limit.
    assert await other.quota_session_acquire("alice", won[0], 5, 60.0) == (True, 5)
    assert await counted(reg, "alice") == 5
    # Another user is unaffected.
    assert await reg.quota_session_acquire("bob", session_key("bob", "s0"), 1, 60.0) == (True, 1)


async def test_a_released_session_frees_its_slot(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    first, second, third = (session_key("alice", s) for s in ("s1", "s2", "s3"))
    assert (await reg.quota_session_acquire("alice", first, 2, 60.0)).granted
    assert (await reg.quota_session_acquire("alice", second, 2, 60.0)).granted
    assert await other.quota_session_acquire("alice", third, 2, 60.0) == (False, 2)
    await other.quota_session_release("alice", first)
    assert await reg.quota_session_acquire("alice", third, 2, 60.0) == (True, 2)
    await reg.quota_session_release("alice", "never-counted")  # nothing to release: fine
    await reg.quota_session_release("nobody", first)


async def test_a_session_counts_while_its_pin_lives_and_its_release_frees_it(
    store: Harness,
) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    pin = Pin("s1", "d1:1", owner="alice")
    # A reservation shorter than anything: from then on only the pin keeps it counted.
    assert (await reg.quota_session_acquire("alice", pin.key, 1, 0.001)).granted
    await reg.bind(pin)
    await store.tick()
    await store.tick()
    assert await other.quota_session_acquire("alice", session_key("alice", "s2"), 1, 60.0) == (
        False,
        1,
    )
    await other.release(pin.key)  # ReleaseSession forgets the pin: the slot is free
    assert await reg.quota_session_acquire("alice", session_key("alice", "s2"), 1, 60.0) == (
        True,
        1,
    )


async def test_an_unbound_session_stops_counting_when_its_reservation_expires(
    store: Harness,
) -> None:
    reg = await store.open()
    assert (await reg.quota_session_acquire("alice", session_key("alice", "s1"), 1, 0.3)).granted
    assert await counted(reg, "alice") == 1

    async def free() -> bool:
        return await counted(reg, "alice") == 0

    await eventually(store, free, "the reservation to expire")
    assert (await reg.quota_session_acquire("alice", session_key("alice", "s2"), 1, 60.0)).granted


async def test_touched_sessions_keep_counting_and_expired_pins_free_their_slot(
    store: Harness,
) -> None:
    reg = await store.open(pin_ttl=1.0)
    other = await store.peer(reg)
    kept, dropped = Pin("kept", "d1:1", owner="alice"), Pin("dropped", "d1:1", owner="alice")
    for pin in (kept, dropped):
        assert (await reg.quota_session_acquire("alice", pin.key, 5, 0.001)).granted
        await reg.bind(pin)

    async def dropped_gone_while_kept_touched() -> bool:
        await other.touch([kept.key])
        return await reg.get_pin(dropped.key) is None

    await eventually(store, dropped_gone_while_kept_touched, "the untouched pin to expire")
    # Past pin_ttl since the acquire: the touched session still counts, the expired one not.
    assert await counted(other, "alice") == 1

    async def none_counted() -> bool:
        return await counted(reg, "alice") == 0

    await eventually(store, none_counted, "the pin to expire once no longer touched")


async def test_concurrent_slot_acquires_never_pass_the_limit(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    grants = await asyncio.gather(
        *(
            (reg if i % 2 else other).quota_slots_acquire("alice", f"r{i % 2}", 7, 30.0)
            for i in range(30)
        )
    )
    assert sum(g.granted for g in grants) == 7
    assert max(g.held for g in grants) == 7
    assert all(g.held == 7 for g in grants if not g.granted)
    assert (await reg.quota_slots_acquire("bob", "r0", 1, 30.0)).granted  # bob is apart


async def test_slot_syncs_set_what_a_replica_holds_and_count_replicas(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    assert await reg.quota_slots_sync("r1", {"alice": (2, 1)}, 30.0) == 1
    assert await other.quota_slots_acquire("alice", "r2", 3, 30.0) == (True, 3, 2)
    assert await other.quota_slots_acquire("alice", "r2", 3, 30.0) == (False, 3, 2)
    # r1 hands its slots back (0 held): r2 may lease them.
    assert await reg.quota_slots_sync("r1", {"alice": (0, 0)}, 30.0) == 2
    assert await other.quota_slots_acquire("alice", "r2", 3, 30.0) == (True, 2, 2)
    assert await other.quota_slots_acquire("alice", "r2", 3, 30.0) == (True, 3, 3)
    # A sync is absolute: r2 says it holds one (idle), so two more may be leased.
    assert await other.quota_slots_sync("r2", {"alice": (1, 0)}, 30.0) == 2
    assert await reg.quota_slots_acquire("alice", "r1", 3, 30.0) == (True, 2, 1)
    assert await reg.quota_slots_sync("r1", {}, 30.0) == 2  # a plain renewal


async def test_the_slots_of_a_dead_replica_expire_with_its_lease(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    assert (await reg.quota_slots_acquire("alice", "dead", 3, 1.0)).granted
    assert (await reg.quota_slots_acquire("alice", "dead", 3, 1.0)).granted
    # The live replica's slot keeps the user's record alive long after the dead lease.
    assert await other.quota_slots_acquire("alice", "live", 3, 30.0) == (True, 3, 3)
    assert await other.quota_slots_acquire("alice", "live", 3, 30.0) == (False, 3, 3)

    async def freed() -> bool:
        # The live replica keeps renewing; the dead one stopped.
        await other.quota_slots_sync("live", {"alice": (1, 1)}, 30.0)
        return (await other.quota_slots_acquire("alice", "live", 3, 30.0)).granted

    await eventually(store, freed, "the dead replica's lease to expire")
    assert await other.quota_slots_acquire("alice", "live", 3, 30.0) == (True, 3, 3)
    assert await other.quota_slots_sync("live", {"alice": (3, 3)}, 30.0) == 1


async def test_concurrent_token_leases_never_pass_the_bucket(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    grants = await asyncio.gather(
        *(
            (reg if i % 2 else other).quota_tokens_lease("user:alice", 0.001, 20, 3)
            for i in range(30)
        )
    )
    assert sum(g.granted for g in grants) == 20
    assert all(g.retry_after == 0 for g in grants if g.granted)
    refused = [g for g in grants if not g.granted]
    assert refused and all(g.retry_after > 0 for g in refused)
    assert (await reg.quota_tokens_lease("user:bob", 0.001, 20, 3)).granted == 3  # apart


async def test_tokens_refill_with_time_up_to_the_burst(store: Harness) -> None:
    reg = await store.open()
    other = await store.peer(reg)
    assert await reg.quota_tokens_lease("pool:etl", 10.0, 5, 100) == (5, 0.0)  # a full burst
    empty = await other.quota_tokens_lease("pool:etl", 10.0, 5, 1)
    assert empty.granted == 0 and 0 < empty.retry_after <= 0.1 + 1e-6

    async def refilled() -> bool:
        return (await other.quota_tokens_lease("pool:etl", 10.0, 5, 1)).granted == 1

    await eventually(store, refilled, "a token to come back")
    with pytest.raises(ValueError, match="rate > 0"):
        await reg.quota_tokens_lease("pool:etl", 0.0, 5, 1)
    with pytest.raises(ValueError, match="want >= 1"):
        await reg.quota_tokens_lease("pool:etl", 1.0, 5, 0)


async def test_quota_operations_on_an_unreachable_redis_raise_registry_unavailable() -> None:
    reg = RedisRegistry.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    try:
        operations: list[Callable[[], Awaitable[object]]] = [
            lambda: reg.quota_session_acquire("alice", "alice/s1", 1, 60.0),
            lambda: reg.quota_session_release("alice", "alice/s1"),
            lambda: reg.quota_slots_acquire("alice", "r1", 1, 30.0),
            lambda: reg.quota_slots_sync("r1", {"alice": (1, 1)}, 30.0),
            lambda: reg.quota_tokens_lease("user:alice", 1.0, 1, 1),
        ]
        for operation in operations:
            with pytest.raises(RegistryUnavailable):
                await operation()
    finally:
        await reg.close()
