"""The membership merge (pure) and placement reading "down" from the snapshot alone."""

from __future__ import annotations

from registry.memory import MemoryRegistry
from registry.models import DrainMode, Driver, DriverState
from router.membership import merge
from router.sessions.placement import Placement
from router.sessions.ring import Rings

ACTIVE, DRAINING, DOWN = DriverState.ACTIVE, DriverState.DRAINING, DriverState.DOWN


def test_static_and_registry_drivers_are_merged_sorted_and_the_record_wins() -> None:
    static = [Driver("b:1"), Driver("a:1")]
    dynamic = [Driver("b:1", pool="etl", weight=3), Driver("c:1", state=DOWN)]
    assert merge(static, dynamic, {}, ()) == (
        Driver("a:1"),
        Driver("b:1", pool="etl", weight=3),
        Driver("c:1", state=DOWN),
    )


def test_a_drain_mark_drains_an_active_driver_and_never_revives_a_down_one() -> None:
    dynamic = [Driver("a:1"), Driver("b:1", state=DOWN)]
    draining = {"a:1": DrainMode.KEEP, "b:1": DrainMode.MOVE_IDLE}
    assert [d.state for d in merge([], dynamic, draining, ())] == [DRAINING, DOWN]


def test_this_replicas_down_verdict_wins_over_registry_and_drain() -> None:
    dynamic = [Driver("a:1"), Driver("b:1")]
    merged = merge([Driver("c:1")], dynamic, {"a:1": DrainMode.KEEP}, {"a:1", "c:1"})
    assert [(d.address, d.state) for d in merged] == [
        ("a:1", DOWN),
        ("b:1", ACTIVE),
        ("c:1", DOWN),
    ]


def test_marks_and_verdicts_for_other_addresses_add_no_member() -> None:
    merged = merge([Driver("a:1")], [], {"x:1": DrainMode.KEEP}, {"y:1"})
    assert merged == (Driver("a:1"),)


def test_equal_inputs_give_equal_snapshots() -> None:
    def snapshot() -> tuple[Driver, ...]:
        return merge([Driver("b:1"), Driver("a:1")], [Driver("c:1")], {"b:1": DrainMode.KEEP}, ())

    assert snapshot() == snapshot()


def test_placement_asks_the_snapshot_for_members_and_health_only_for_strangers() -> None:
    rings = Rings.build(merge([Driver("a:1"), Driver("b:1")], [], {}, {"b:1"}))
    asked: list[str] = []

    def is_down(address: str) -> bool:
        asked.append(address)
        return True

    placement = Placement(MemoryRegistry(), rings, 10, is_down=is_down)
    assert placement.is_live("a:1")  # the snapshot says active: no second opinion
    assert not placement.is_live("b:1")
    assert asked == []
    assert not placement.is_live("elsewhere:1")  # not a member: this replica's own check
    assert asked == ["elsewhere:1"]
    assert Placement(MemoryRegistry(), rings, 10).is_live("elsewhere:1")  # followed
