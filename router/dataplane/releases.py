"""ReleaseExecute coalescing, and the answers the router gives for a dead driver.

pyspark releases a result as it reads it, one ReleaseExecute(release_until) per response
message (500+ for a large toPandas), from a background thread that ignores the answers.
`release_until` is cumulative, so only the newest one waiting matters.

Invariants:
- A ReleaseExecute(release_until) for a live driver is answered at once; at most one per
  (session, operation) is in flight to the driver, and while it is, later ones replace each
  other: the newest goes when the one in flight is done. A `release_all` goes through as
  itself (the proxy forwards it) and drops what waits.
- A call that only cleans up (ReleaseExecute, ReleaseSession) for a session whose driver is
  dead never moves the session (pyspark sends it without the server-side id it saw, so a move
  would lose the identity the client checks); the router answers it itself: the operation
  died with its driver. The answer carries no server-side id, which pyspark accepts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc.aio

from registry.models import Pin
from router.dataplane import protocol
from router.dataplane.protocol import Method, RequestInfo
from router.telemetry import Telemetry
from router.upstreams import Upstreams

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]
_Key = tuple[str, str]  # (session key, operation)


def released(session_id: str, operation: str) -> bytes:
    """The ReleaseExecuteResponse the router gives itself (no server-side id: pyspark accepts)."""
    from pyspark.sql.connect.proto import base_pb2

    answer = base_pb2.ReleaseExecuteResponse(session_id=session_id, operation_id=operation)
    return bytes(answer.SerializeToString())


class Releases:
    """Coalesces ReleaseExecute(release_until) per operation and answers for dead drivers."""

    def __init__(
        self,
        upstreams: Upstreams,
        telemetry: Telemetry,
        forget_session: Callable[[str], Awaitable[None]],
    ) -> None:
        self._upstreams = upstreams
        self._telemetry = telemetry
        self._forget_session = forget_session  # after a ReleaseSession: drop the pin
        self._releasing: set[_Key] = set()
        self._next: dict[_Key, tuple[Pin, bytes, Metadata]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def coalesce(
        self, method: Method, info: RequestInfo, pin: Pin, request: bytes, md: Metadata
    ) -> bytes | None:
        """The answer to a ReleaseExecute(release_until) now; None to forward it (release_all)."""
        operation = info.operation_id or ""
        key = (pin.key, operation)
        if not info.releases_until:
            self._next.pop(key, None)
            return None
        if key in self._releasing:
            if key in self._next:
                self._telemetry.releases_coalesced.inc()
            self._next[key] = (pin, request, md)
        else:
            self._releasing.add(key)
            task = asyncio.ensure_future(self._forward(method, key, pin, request, md))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return protocol.for_client(method, pin.server_side_id, released(info.session_id, operation))

    async def _forward(
        self, method: Method, key: _Key, pin: Pin, request: bytes, md: Metadata
    ) -> None:
        """Send a release, then the newest one that arrived meanwhile, until none waits."""
        try:
            while True:
                try:
                    await self._upstreams.channel(pin.driver).unary_unary(method.path)(
                        protocol.for_driver(method, pin.server_side_id, request, pin.upstream_id),
                        metadata=md,
                        timeout=30,
                    )
                except grpc.aio.AioRpcError as exc:  # the client would ignore it too
                    log.debug("release for %s on %s: %s", key, pin.driver, exc.code().name)
                waiting = self._next.pop(key, None)
                if waiting is None:
                    return
                pin, request, md = waiting
        finally:
            self._releasing.discard(key)

    async def answer_for_dead_driver(self, method: Method, info: RequestInfo) -> bytes:
        """Answer a call that only cleans up, for a session whose driver is dead."""
        from pyspark.sql.connect.proto import base_pb2

        if method.name == "ReleaseSession":
            await self._forget_session(info.key)
            return bytes(
                base_pb2.ReleaseSessionResponse(session_id=info.session_id).SerializeToString()
            )
        return released(info.session_id, info.operation_id or "")
