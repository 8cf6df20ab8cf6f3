"""Journal capture on the way through: the calls that built a session's state.

What counts as state is sessions/journal.py's decision (`classify`, a slow path run only for
the methods in `protocol.JOURNALED`); this module writes the entries to the registry as the
calls succeed.

Invariants:
- Only successful calls are journaled, in the order they succeeded. A state-building result
  stream is journaled on its `result_complete` message, before the client sees that message:
  pyspark may end the call right then, which would cancel anything done after it. One that
  names its operation is journaled as STARTED before it reaches the driver and COMPLETED
  on that message, by this replica or by the one a reattaching client reached after this
  one died (`stream_entry`; journal.settle pairs the two).
- AddArtifacts client streams are kept (`Tape`) up to `journal_max_bytes`; over it, an entry
  just over the cap marks the journal overflowed, which is sticky: the session moves strictly.
- A registry outage loses neither the call nor the entry: entries that could not be written
  wait here, in order, and `flush` (the replica's periodic work) writes them back once the
  registry answers, as Placement does for pins. While a session has entries waiting, its
  later ones queue behind them, so order holds. What waits is bounded (`PENDING_MAX_BYTES`
  in all): a session whose entries do not fit is marked overflowed when written back (it
  moves strictly), never replayed with a gap.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from registry.base import Registry, RegistryUnavailable
from router.dataplane import protocol, wire
from router.dataplane.protocol import Method
from router.sessions import journal
from router.telemetry import Telemetry

log = logging.getLogger(__name__)

# The most bytes of journal entries kept for write-back during a registry outage, in all.
PENDING_MAX_BYTES = 64 * 1024 * 1024

_OVERFLOWED = b""  # in a waiting list: the session's journal is to be marked overflowed


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
        self._pending: dict[str, list[bytes]] = {}  # key -> entries waiting for the registry
        self._pending_bytes = 0

    @staticmethod
    def entry(method: Method, request: bytes) -> bytes | None:
        """The journal entry of a call that builds session state, else None (most calls)."""
        if method.name not in protocol.JOURNALED or journal.classify(method.name, request) is None:
            return None
        return journal.JournalEntry(method.name, request).encode()

    async def stream_entry(
        self, session_id: str, method: Method, operation_id: str | None, request: bytes
    ) -> bytes | None:
        """What a result stream journals once its result is complete (None: nothing).

        A state-building ExecutePlan that names its operation gets its STARTED mark journaled
        now and journals its COMPLETED mark then; so does any ReattachExecute, which may be
        the end of such a call begun through a replica that died (journal.settle pairs them).
        """
        if method.name == "ReattachExecute":
            return None if operation_id is None else journal.completed(operation_id)
        entry = self.entry(method, request)
        if entry is None or operation_id is None or method.name != "ExecutePlan":
            return entry
        await self.append(session_id, journal.started(entry))
        return journal.completed(operation_id)

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

    async def copy(self, source: str, clone: str, clone_id: str) -> None:
        """Start a clone's journal (key `clone`, id `clone_id`) as a copy of its source's."""
        try:
            entries = await self._registry.journal(source)
        except RegistryUnavailable as exc:
            self._on_registry_error(exc)
            return
        if entries is None:  # the source outgrew its journal: so does the clone
            await self.append(clone, bytes(self.max_bytes + 1))
            return
        for raw in journal.settle(entries):  # what runs in the source now is not the clone's
            try:
                entry = journal.for_session(raw, clone_id)
            except (ValueError, wire.WireError):  # a damaged entry: the clone moves strictly
                entry = bytes(self.max_bytes + 1)
            await self.append(clone, entry)

    async def append(self, session_id: str, entry: bytes) -> None:
        """Add one entry to a session's journal; say so once when the session outgrows it."""
        waiting = self._pending.get(session_id)
        if waiting is not None:  # behind entries of the outage: keep the order
            self._wait(session_id, entry)
            return
        try:
            kept = await self._registry.journal_append(session_id, entry, self.max_bytes)
        except RegistryUnavailable as exc:
            self._on_registry_error(exc)
            self._wait(session_id, entry)
            return
        self._counted(session_id, entry, kept)

    def _wait(self, key: str, entry: bytes) -> None:
        """Keep an entry for write-back, or mark the session overflowed when over the bound."""
        waiting = self._pending.setdefault(key, [])
        if waiting and waiting[-1] is _OVERFLOWED:
            return
        if self._pending_bytes + len(entry) > PENDING_MAX_BYTES:
            waiting.append(_OVERFLOWED)
            return
        waiting.append(entry)
        self._pending_bytes += len(entry)

    @property
    def needs_flush(self) -> bool:
        """Whether entries of an outage wait to be written back."""
        return bool(self._pending)

    async def flush(self) -> None:
        """Write back the entries of an outage, in order; stop at the first failure."""
        for key in list(self._pending):
            waiting = self._pending[key]
            while waiting:
                entry = waiting[0]
                raw = bytes(self.max_bytes + 1) if entry is _OVERFLOWED else entry
                try:
                    kept = await self._registry.journal_append(key, raw, self.max_bytes)
                except RegistryUnavailable as exc:
                    self._on_registry_error(exc)
                    return
                waiting.pop(0)
                self._pending_bytes -= len(entry)
                self._counted(key, raw, kept)
            del self._pending[key]

    def forget(self, key: str) -> None:
        """Drop what waits for a session that was released."""
        for entry in self._pending.pop(key, ()):
            self._pending_bytes -= len(entry)

    def _counted(self, session_id: str, entry: bytes, kept: bool) -> None:
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
