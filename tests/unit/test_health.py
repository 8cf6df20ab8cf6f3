"""The router's driver health: thresholds for probes, confirmation for passive failures."""

from __future__ import annotations

from router.config import load_settings
from router.upstreams import Health


class ScriptedProbe:
    """A probe whose answers the test decides."""

    def __init__(self) -> None:
        self.ok: dict[str, bool] = {}
        self.calls: list[str] = []

    async def __call__(self, address: str, timeout: float) -> bool:
        self.calls.append(address)
        return self.ok.get(address, True)


def _health(changes: list[tuple[str, bool]], probe: ScriptedProbe) -> Health:
    settings = load_settings(fail_threshold=3, recover_threshold=2)

    async def on_change(address: str, live: bool) -> None:
        changes.append((address, live))

    return Health(settings, on_change, probe)


async def test_down_only_after_the_threshold_and_back_after_recovery() -> None:
    changes: list[tuple[str, bool]] = []
    health = _health(changes, ScriptedProbe())
    for _ in range(2):
        await health.report("d1", False)
    assert not health.is_down("d1") and changes == []  # two failures: still live
    await health.report("d1", True)  # a success resets the streak
    for _ in range(2):
        await health.report("d1", False)
    assert not health.is_down("d1")
    await health.report("d1", False)
    assert health.is_down("d1") and changes == [("d1", False)]
    assert health.down == {"d1"}
    await health.report("d1", True)
    assert health.is_down("d1")  # one good probe is not enough
    await health.report("d1", True)
    assert not health.is_down("d1") and changes == [("d1", False), ("d1", True)]


async def test_a_passive_failure_confirmed_by_a_probe_is_down_at_once() -> None:
    changes: list[tuple[str, bool]] = []
    probe = ScriptedProbe()
    health = _health(changes, probe)
    probe.ok["d1"] = False
    assert await health.confirm_failure("d1") is True
    assert health.is_down("d1") and changes == [("d1", False)]
    assert probe.calls == ["d1"]
    assert await health.confirm_failure("d1") is True  # already down: no new probe
    assert probe.calls == ["d1"]


async def test_a_passive_failure_the_probe_contradicts_is_noise() -> None:
    changes: list[tuple[str, bool]] = []
    health = _health(changes, ScriptedProbe())
    assert await health.confirm_failure("d1") is False
    assert not health.is_down("d1") and changes == []
