"""A replica's membership snapshot: who its drivers are and what state each is in (pure).

`merge` is the one place where the sources meet; placement and the rings only read its
result.

Invariants:
- The members are the static drivers and the registry's drivers, nothing else: a drain
  mark or a down verdict for another address adds no member.
- A registry record wins over a static driver of the same address (it knows the pool,
  the weight and the state its agent announced).
- An operator's drain mark turns an active driver draining; it never revives a down one.
- This replica's own probe verdict (`down`) makes a member down whatever the registry
  says. It is applied here and only here, so "down" is decided once.
- The snapshot is sorted by address: equal inputs give equal snapshots, so a replica can
  tell a real change from a re-read.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import replace

from registry.models import Driver, DriverState

__all__ = ["merge"]


def merge(
    static: Iterable[Driver],
    dynamic: Iterable[Driver],
    draining: Collection[str],
    down: Collection[str],
) -> tuple[Driver, ...]:
    """The membership snapshot: static drivers, registry records over them, drains, verdicts."""
    members = {d.address: d for d in static}
    members.update((d.address, d) for d in dynamic)
    return tuple(_overlaid(members[a], draining, down) for a in sorted(members))


def _overlaid(driver: Driver, draining: Collection[str], down: Collection[str]) -> Driver:
    """One member with this replica's verdict or an operator's drain mark applied."""
    if driver.address in down:
        return replace(driver, state=DriverState.DOWN)
    if driver.address in draining and driver.state is DriverState.ACTIVE:
        return replace(driver, state=DriverState.DRAINING)
    return driver
