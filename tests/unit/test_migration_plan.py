"""The mover's pure decision: identity, replay and release of one move, without servers."""

from __future__ import annotations

import pytest

from registry.models import Pin
from router.sessions.migration import MovePlan, Reason, Release, plan

JOURNAL = [b"set-a", b"view-v"]
FRESH = Pin("s", "d1:1")  # never moved: the client saw d1's own id
MOVED = Pin("s", "d2:1", server_side_id="first-id", moves=1)  # shows d1's id on d2


@pytest.mark.parametrize(
    ("reason", "release"),
    [
        (Reason.DRIVER_DOWN, Release.NONE),
        (Reason.DRAIN, Release.BACKGROUND),
        (Reason.ADMIN, Release.AWAIT),
    ],
)
def test_state_and_identity_come_along_and_the_old_driver_is_told_per_reason(
    reason: Reason, release: Release
) -> None:
    assert plan(FRESH, reason, "replay", JOURNAL, "seen-id") == MovePlan(
        "seen-id", tuple(JOURNAL), release
    )


@pytest.mark.parametrize("reason", list(Reason))
def test_an_earlier_moves_alias_wins_over_the_observed_id(reason: Reason) -> None:
    # The client still sees the first driver's id; what it sends now may be stale or absent.
    decided = plan(MOVED, reason, "replay", JOURNAL, "other-id")
    assert decided is not None and decided.alias == "first-id"
    decided = plan(MOVED, reason, "replay", JOURNAL, None)
    assert decided is not None and decided.alias == "first-id"


@pytest.mark.parametrize("reason", list(Reason))
def test_the_learned_id_is_the_identity_when_the_call_shows_none(reason: Reason) -> None:
    # A client that never sends its observed id, or a move during the session's first call.
    learned = Pin("s", "d1:1", seen_id="learned-id")
    decided = plan(learned, reason, "replay", JOURNAL, None)
    assert decided is not None and decided.alias == "learned-id"
    decided = plan(learned, reason, "replay", JOURNAL, "observed-id")  # what it sends wins
    assert decided is not None and decided.alias == "observed-id"
    strict = plan(learned, reason, "strict", JOURNAL, None)  # no state, so no identity
    assert strict is None if reason is Reason.DRAIN else strict.alias is None  # type: ignore[union-attr]


@pytest.mark.parametrize("reason", [Reason.DRIVER_DOWN, Reason.ADMIN])
def test_an_unknown_identity_still_replays_the_state(reason: Reason) -> None:
    # Whoever saw no id gets the whole session; whoever did gets SESSION_CHANGED from Spark.
    assert plan(FRESH, reason, "replay", JOURNAL, None) == MovePlan(
        None, tuple(JOURNAL), Release.NONE if reason is Reason.DRIVER_DOWN else Release.AWAIT
    )
    decided = plan(FRESH, reason, "replay", JOURNAL, "")  # an empty field is no id
    assert decided is not None and decided.alias is None


@pytest.mark.parametrize("reason", [Reason.DRIVER_DOWN, Reason.ADMIN])
@pytest.mark.parametrize(("migration", "entries"), [("strict", JOURNAL), ("replay", None)])
def test_strict_or_overflowed_moves_without_state_or_identity(
    reason: Reason, migration: str, entries: list[bytes] | None
) -> None:
    for pin in (FRESH, MOVED):  # an earlier alias is dropped too: the state is not there
        decided = plan(pin, reason, migration, entries, "seen-id")
        assert decided is not None
        assert (decided.alias, decided.replay) == (None, ())


@pytest.mark.parametrize(
    ("migration", "entries", "observed"),
    [("strict", JOURNAL, "seen-id"), ("replay", None, "seen-id"), ("replay", JOURNAL, None)],
)
def test_a_drain_leaves_a_session_that_would_be_noticed(
    migration: str, entries: list[bytes] | None, observed: str | None
) -> None:
    assert plan(FRESH, Reason.DRAIN, migration, entries, observed) is None


def test_an_empty_journal_moves_with_identity_and_nothing_to_replay() -> None:
    assert plan(FRESH, Reason.DRAIN, "replay", [], "seen-id") == MovePlan(
        "seen-id", (), Release.BACKGROUND
    )


def test_reasons_are_the_metric_labels() -> None:
    assert [r.value for r in Reason] == ["driver_down", "drain", "admin"]
