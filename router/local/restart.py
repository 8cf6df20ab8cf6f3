"""When `up` starts a local driver again after it died: capped exponential backoff (pure).

Invariants
----------
* No I/O and no hidden time: every reading of the clock is passed in (`now`, monotonic
  seconds), so tests need no sleeps. The watcher in `up` does the waiting and the starting.
* The n-th failure in a row waits `initial * factor ** (n - 1)` seconds, capped at `max_delay`:
  a driver that cannot start (port taken, JVM exits, not ready in time) is retried ever more
  slowly, but forever, and never in a tight loop.
* A failure is "in a row" unless the driver had been ready for at least `reset_after` seconds:
  a driver that ran healthily for that long is started again after `initial`.
* A crash of a running driver and a failed start count alike.
"""

from __future__ import annotations

__all__ = ["RestartBackoff"]


class RestartBackoff:
    """The restart policy of one driver: how long to wait before each start after a failure."""

    def __init__(
        self,
        initial: float = 1.0,
        factor: float = 2.0,
        max_delay: float = 60.0,
        reset_after: float = 120.0,
    ) -> None:
        if initial <= 0:
            raise ValueError(f"initial must be positive, not {initial}")
        if factor < 1:
            raise ValueError(f"factor must be at least 1, not {factor}")
        if max_delay < initial:
            raise ValueError(f"max_delay ({max_delay}) must be at least initial ({initial})")
        if reset_after < 0:
            raise ValueError(f"reset_after must not be negative, not {reset_after}")
        self.initial = initial
        self.factor = factor
        self.max_delay = max_delay
        self.reset_after = reset_after
        self.streak = 0  # failures since the driver was last healthy for reset_after
        self.restarts = 0  # starts asked for after a failure, over the driver's lifetime
        self._delay = 0.0  # the last delay given; grown by multiplying, so it cannot overflow
        self._ready_at: float | None = None  # when the running driver became ready

    def __repr__(self) -> str:
        return (
            f"RestartBackoff(streak={self.streak}, restarts={self.restarts}, "
            f"delay={self._delay:g}, ready_at={self._ready_at})"
        )

    def on_ready(self, now: float) -> None:
        """The driver answers: healthy from `now`."""
        self._ready_at = now

    def on_failure(self, now: float) -> float:
        """The driver exited or failed to start at `now`: seconds to wait before the next start."""
        if self._ready_at is not None and now - self._ready_at >= self.reset_after:
            self.streak = 0
        self._ready_at = None
        if self.streak == 0:
            self._delay = self.initial
        else:
            self._delay = min(self.max_delay, self._delay * self.factor)
        self.streak += 1
        self.restarts += 1
        return self._delay
