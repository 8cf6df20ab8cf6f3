"""Journal entries survive a registry outage: kept in order, written back, bounded."""

from __future__ import annotations

import pytest

from registry.base import RegistryUnavailable
from registry.memory import MemoryRegistry
from router.dataplane import recorder
from router.dataplane.recorder import Recorder
from router.telemetry import Telemetry


class FlakyRegistry(MemoryRegistry):
    """The memory store, whose journal appends fail while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def journal_append(self, session_id: str, entry: bytes, cap: int) -> bool:
        if self.down:
            raise RegistryUnavailable("test: registry is down")
        return await super().journal_append(session_id, entry, cap)


def _recorder(reg: FlakyRegistry, cap: int = 1_000) -> tuple[Recorder, list[RegistryUnavailable]]:
    errors: list[RegistryUnavailable] = []
    return Recorder(reg, cap, Telemetry(), errors.append), errors


async def test_entries_of_an_outage_are_written_back_in_order() -> None:
    reg = FlakyRegistry()
    rec, errors = _recorder(reg)
    await rec.append("alice/s1", b"one")
    reg.down = True
    await rec.append("alice/s1", b"two")
    await rec.append("alice/s2", b"other")
    assert errors and rec.needs_flush
    reg.down = False
    await rec.append("alice/s1", b"three")  # queued behind "two", not ahead of it
    assert await reg.journal("alice/s1") == [b"one"]
    reg.down = True
    await rec.flush()  # still down: nothing lost
    assert rec.needs_flush
    reg.down = False
    await rec.flush()
    assert not rec.needs_flush
    assert await reg.journal("alice/s1") == [b"one", b"two", b"three"]
    assert await reg.journal("alice/s2") == [b"other"]


async def test_a_released_session_drops_what_waits() -> None:
    reg = FlakyRegistry()
    rec, _ = _recorder(reg)
    reg.down = True
    await rec.append("alice/s1", b"one")
    rec.forget("alice/s1")
    reg.down = False
    await rec.flush()
    assert await reg.journal("alice/s1") == []


async def test_over_the_bound_a_session_is_marked_overflowed_never_replayed_with_a_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recorder, "PENDING_MAX_BYTES", 10)
    reg = FlakyRegistry()
    rec, _ = _recorder(reg)
    reg.down = True
    await rec.append("alice/s1", b"12345")
    await rec.append("alice/s1", b"6789012")  # does not fit: the journal is to overflow
    await rec.append("alice/s1", b"3")
    reg.down = False
    await rec.flush()
    assert await reg.journal("alice/s1") is None  # overflowed: the session moves strictly
