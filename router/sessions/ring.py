"""Consistent-hash rings over the drivers that take new sessions, one ring per pool.

A `Rings` value is built from a membership snapshot and never edited: when membership
changes, a new one replaces it whole. Only drivers in state `active` are on a ring;
draining and down drivers keep the sessions pinned to them but get no new ones. The ring
decides where a *new* or *moving* session goes; existing sessions follow their pins, so
adding a driver moves nobody.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from uhashring import HashRing

from registry.models import Driver

# Virtual nodes per driver. Measured over 30 random sets of 4 drivers and 10,000 sessions:
# 160 vnodes left the worst driver 17.8 % off even, 1,000 stays within 9 %. Building a
# ring of 1,000 points per driver takes ~1 ms per driver, once per membership change.
VNODES = 1000


@dataclass(frozen=True)
class Rings:
    """Immutable per-pool consistent-hash rings built from one membership snapshot."""

    drivers: Mapping[str, Driver] = field(default_factory=lambda: MappingProxyType({}))
    _rings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    @classmethod
    def build(cls, drivers: Iterable[Driver]) -> Rings:
        """Rings over the given membership snapshot."""
        members = {d.address: d for d in drivers}
        by_pool: dict[str, dict[str, dict[str, int]]] = {}
        for d in members.values():
            if d.takes_new_sessions and d.weight > 0:
                by_pool.setdefault(d.pool, {})[d.address] = {"weight": d.weight, "vnodes": VNODES}
        rings = {pool: HashRing(nodes=nodes) for pool, nodes in by_pool.items()}
        return cls(MappingProxyType(members), MappingProxyType(rings))

    @property
    def pools(self) -> frozenset[str]:
        """Pools that have at least one driver (in any state)."""
        return frozenset(d.pool for d in self.drivers.values())

    def pick(self, pool: str, key: str, avoid: str | Collection[str] | None = None) -> str | None:
        """The driver a new session `key` goes to in `pool` (none of `avoid`); None if none is."""
        ring = self._rings.get(pool)
        if ring is None:
            return None
        avoided = (avoid,) if isinstance(avoid, str) else avoid or ()
        node: str = ring.get_node(key)
        if node not in avoided:
            return node
        # The next distinct driver along the ring: where the session would go without it.
        return next((n for n in ring.iterate_nodes(key, distinct=True) if n not in avoided), None)
