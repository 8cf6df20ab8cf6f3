"""Serve until SIGTERM/SIGINT, and the exit codes every program here returns.

Signal handlers only set flags: the first SIGTERM or SIGINT sets `stopping` (start a bounded,
orderly shutdown), a second one sets `forced` (stop now). `finish_unless_forced` runs the
orderly shutdown and gives it up at the second signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable
from types import TracebackType
from typing import TypeVar

__all__ = ["EXIT_CONFIG", "EXIT_OK", "EXIT_STARTUP_FAILURE", "Signals", "finish_unless_forced"]

EXIT_OK = 0
EXIT_CONFIG = 2  # bad usage or configuration
EXIT_STARTUP_FAILURE = 3  # could not start: port in use, no Java, registry unreachable, ...

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

T = TypeVar("T")


class Signals:
    """SIGTERM/SIGINT on the running loop while entered: `stopping` first, then `forced`."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.forced = asyncio.Event()

    def _on_signal(self) -> None:
        if self.stopping.is_set():
            self.forced.set()
        self.stopping.set()

    async def __aenter__(self) -> Signals:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self._on_signal)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)


async def finish_unless_forced(work: Awaitable[T], signals: Signals) -> tuple[bool, T | None]:
    """Await `work` unless a second signal comes first: (finished, its result).

    On a second signal `work` is cancelled (and awaited) and (False, None) is returned.
    """
    task = asyncio.ensure_future(work)
    force = asyncio.ensure_future(signals.forced.wait())
    try:
        await asyncio.wait((task, force), return_when=asyncio.FIRST_COMPLETED)
    finally:
        force.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False, None
