"""Consistent-hash rings: stable, balanced, weighted, per pool."""

from __future__ import annotations

import random
import uuid
from collections import Counter

import pytest

from registry.models import Driver, DriverState
from router.sessions.ring import Rings

KEYS = [str(uuid.UUID(int=i * 7919 + 17, version=4)) for i in range(10_000)]


def _drivers(n: int, pool: str = "default") -> list[Driver]:
    return [Driver(f"127.0.0.1:{15100 + i}", pool=pool) for i in range(n)]


def test_placement_is_deterministic_across_builds() -> None:
    a, b = Rings.build(_drivers(3)), Rings.build(list(reversed(_drivers(3))))
    assert all(a.pick("default", k) == b.pick("default", k) for k in KEYS[:1000])


@pytest.mark.parametrize("seed", range(10))
def test_balanced_within_15_percent_over_four_drivers(seed: int) -> None:
    # Random ports: balance must not depend on lucky addresses.
    rng = random.Random(seed)
    ports = rng.sample(range(1024, 65536), 4)
    rings = Rings.build([Driver(f"127.0.0.1:{p}") for p in ports])
    counts = Counter(rings.pick("default", k) for k in KEYS)
    assert len(counts) == 4
    even = len(KEYS) / 4
    assert all(abs(c - even) / even <= 0.15 for c in counts.values()), counts


def test_adding_a_driver_moves_only_keys_to_the_new_one() -> None:
    before, after = Rings.build(_drivers(4)), Rings.build(_drivers(5))
    new = _drivers(5)[4].address
    moved = [k for k in KEYS if before.pick("default", k) != after.pick("default", k)]
    assert all(after.pick("default", k) == new for k in moved)
    # About a fifth of the keys belong to the new driver; far from a reshuffle.
    assert 0.12 < len(moved) / len(KEYS) < 0.28


def test_weight_shifts_the_share() -> None:
    drivers = [*_drivers(2), Driver("127.0.0.1:15200", weight=2)]
    rings = Rings.build(drivers)
    counts = Counter(rings.pick("default", k) for k in KEYS)
    assert counts["127.0.0.1:15200"] > 1.5 * counts["127.0.0.1:15100"]


def test_only_active_drivers_take_new_sessions() -> None:
    drivers = [
        Driver("127.0.0.1:1", state=DriverState.DRAINING),
        Driver("127.0.0.1:2", state=DriverState.DOWN),
        Driver("127.0.0.1:3"),
    ]
    rings = Rings.build(drivers)
    assert {rings.pick("default", k) for k in KEYS[:200]} == {"127.0.0.1:3"}


def test_pools_have_their_own_rings() -> None:
    rings = Rings.build([*_drivers(2, "etl"), Driver("127.0.0.1:9000", pool="bi")])
    assert {rings.pick("bi", k) for k in KEYS[:200]} == {"127.0.0.1:9000"}
    assert rings.pick("etl", KEYS[0]) in {d.address for d in _drivers(2)}
    assert rings.pick("nope", KEYS[0]) is None
    assert rings.pools == {"etl", "bi"}


def test_pick_can_avoid_a_driver_and_then_takes_the_next_along_the_ring() -> None:
    rings = Rings.build([Driver(f"10.0.0.{n}:15002") for n in range(1, 5)])
    for n in range(200):
        key = f"s{n}"
        first = rings.pick("default", key)
        other = rings.pick("default", key, avoid=first)
        assert other is not None and other != first
        # Stable: the same key avoiding the same driver always lands on the same one.
        assert rings.pick("default", key, avoid=first) == other
    alone = Rings.build([Driver("10.0.0.1:15002")])
    assert alone.pick("default", "s", avoid="10.0.0.1:15002") is None


def test_pick_can_avoid_several_drivers() -> None:
    rings = Rings.build([Driver(f"10.0.0.{i}:15002") for i in range(1, 4)])
    for key in (f"s{i}" for i in range(50)):
        first = rings.pick("default", key)
        assert first is not None
        second = rings.pick("default", key, avoid=first)
        assert second is not None
        third = rings.pick("default", key, avoid={first, second})
        assert third not in (None, first, second)
        assert rings.pick("default", key, avoid={first, second, third}) is None
