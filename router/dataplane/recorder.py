"""Journal capture on the way through: the calls that built a session's state.

What counts as state is sessions/journal.py's decision (`classify`, a slow path run only for
the methods in `protocol.JOURNALED`); this module writes the entries to the registry as the
calls succeed.

Invariants:
- Only successful calls are journaled, in the order they succeeded. A state-building result
  stream is journaled on its `result_complete` message, before the client sees that message:
  pyspark may end the call right then, which would cancel anything done after it.
- AddArtifacts client streams are kept (`Tape`) up to `journal_max_bytes`; over it, an entry
  just over the cap marks the journal overflowed, which is sticky: the session moves strictly.
- A registry outage loses the entry (said in metrics as a registry error), never the call.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from registry.base import Registry, RegistryUnavailable
from router.dataplane import protocol
from router.dataplane.protocol import Method
from router.sessions import journal
from router.telemetry import Telemetry

log = logging.getLogger(__name__)


class Recorder:
    """Appends the journal entries of state-building calls to the session's journal."""

    def __init__(
        self,
        registry: Registry,
        max_bytes: int,
        telemetry: Telemetry,
        on_registry_error: Callable[[RegistryUnavailable], None],
    ) -> None:
        self._registry = registry
        self.max_bytes = max_bytes
        self._telemetry = telemetry
        self._on_registry_error = on_registry_error

    @staticmethod
    def entry(method: Method, request: bytes) -> bytes | None:
        """The journal entry of a call that builds session state, else None (most calls)."""
        if method.name not in protocol.JOURNALED or journal.classify(method.name, request) is None:
            return None
        return journal.JournalEntry(method.name, request).encode()

    async def record(self, session_id: str, method: Method, request: bytes) -> None:
        """Journal a successful unary call that built session state."""
        entry = self.entry(method, request)
        if entry is not None:
            await self.append(session_id, entry)

    def tape(self, method: Method) -> Tape | None:
        """A tape for a client stream worth journaling (AddArtifacts), else None."""
        return Tape(self.max_bytes) if method.name == journal.ARTIFACTS else None

    async def record_tape(self, session_id: str, method: Method, tape: Tape) -> None:
        """Journal a client stream that succeeded: its messages, or the overflow mark."""
        if tape.overflowed:
            # An entry just over the cap marks the journal overflowed (sticky): strict.
            await self.append(session_id, bytes(self.max_bytes + 1))
        else:
            entry = journal.JournalEntry(method.name, journal.frame(tape.messages))
            await self.append(session_id, entry.encode())

    async def append(self, session_id: str, entry: bytes) -> None:
        """Add one entry to a session's journal; say so once when the session outgrows it."""
        try:
            kept = await self._registry.journal_append(session_id, entry, self.max_bytes)
        except RegistryUnavailable as exc:
            self._on_registry_error(exc)
            return
        if kept:
            self._telemetry.journal_bytes.inc(len(entry))
        else:
            self._telemetry.journal_overflows.inc()
            log.warning(
                "session %s built more than journal_max_bytes=%d of state: if its driver "
                "dies it moves strictly (the client gets SESSION_CHANGED)",
                session_id,
                self.max_bytes,
            )


class Tape:
    """Keeps the messages of a client stream as they are forwarded, up to a byte cap."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._size = 0
        self.messages: list[bytes] = []
        self.overflowed = False

    async def record(self, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Pass `stream` through, keeping a copy of what fits under the cap."""
        async for message in stream:
            if not self.overflowed:
                self._size += len(message)
                if self._size > self._cap:
                    self.overflowed, self.messages = True, []
                else:
                    self.messages.append(message)
            yield message
