"""Every Prometheus metric of a replica, declared once.

Each replica owns a `Telemetry` with its own CollectorRegistry (so several replicas in one
process — tests, `up` — keep separate numbers); the admin endpoint exports it. Labels come
from fixed sets (pool names, outcomes), never a session id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Telemetry:
    """The metrics of one replica."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry_degraded = Gauge(
            "spark_router_registry_degraded",
            "1 while the registry is unreachable: known sessions route from cache, "
            "new sessions by the ring alone",
            registry=self.registry,
        )
        self.pins_pending = Gauge(
            "spark_router_pins_pending_writeback",
            "pins made during a registry outage, not yet written to the registry",
            registry=self.registry,
        )
        self.sessions_placed = Counter(
            "spark_router_sessions_placed",
            "new sessions placed, by pool and how (ring, registry pin, degraded ring)",
            ["pool", "source"],
            registry=self.registry,
        )
        self.sessions_moved = Counter(
            "spark_router_sessions_moved",
            "sessions moved to another driver by this replica (one per session and move), "
            "by pool and reason (driver_down, drain, admin)",
            ["pool", "reason"],
            registry=self.registry,
        )
        self.journal_overflows = Counter(
            "spark_router_journal_overflows",
            "sessions whose replayable state exceeded journal_max_bytes (they move strictly)",
            registry=self.registry,
        )
        self.live_drivers = Gauge(
            "spark_router_live_drivers",
            "drivers taking new sessions, by pool",
            ["pool"],
            registry=self.registry,
        )
        self.registry_errors = Counter(
            "spark_router_registry_errors",
            "registry operations that failed because the registry was unreachable",
            registry=self.registry,
        )

    def value(self, name: str, **labels: str) -> float:
        """The current value of a sample (for tests and the admin API)."""
        got = self.registry.get_sample_value(name, labels or None)
        return 0.0 if got is None else got
