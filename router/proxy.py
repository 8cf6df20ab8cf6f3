"""The data plane: one generic gRPC handler that forwards Spark Connect calls as raw bytes.

Every call under `/spark.connect.SparkConnectService/` is taken with its real shape (the
twelve known methods) or as stream-stream (methods this router does not know yet). The
first request message is read as bytes to identify the session (protocol.identify), the
session is placed (placement), and the call is replayed on the driver's channel with the
same bytes, metadata (less hop-by-hop and pseudo headers), deadline and cancellation.

Invariants:
- Messages are never deserialized or copied into new objects here; responses are relayed
  one at a time, so a slow client holds back the driver (gRPC flow control) instead of
  making the router buffer a result.
- Whatever the driver answers — status code, details, initial and trailing metadata
  (Spark's error details ride in `grpc-status-details-bin`) — reaches the client intact.
- Failures the router detects are raised as errors.RouterError and mapped to a status in
  errors.to_status; an unreachable driver is UNAVAILABLE naming the driver.
- A client that cancels (or whose deadline passes) cancels the upstream call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any, NoReturn

import grpc
import grpc.aio

from registry.base import Registry, RegistryUnavailable
from registry.models import Pin
from router import errors, journal, protocol, wire
from router.config import Settings
from router.errors import BadRequest, DriverUnreachable, NoLiveDriver
from router.placement import Placement
from router.protocol import Method, RequestInfo, Shape
from router.telemetry import CallObservation
from router.upstreams import Health, Upstreams

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]

# Never forwarded: HTTP/2 pseudo and connection headers, gRPC's own headers, and the
# user agent (the upstream channel sets its own; Spark reads the client from the request).
_DROP_EXACT = frozenset(
    {
        "te",
        "content-type",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "host",
        "user-agent",
    }
)

# Calls that only clean up: for a dead driver the router answers them itself (below).
_NOTHING_TO_MOVE = frozenset({"ReleaseExecute", "ReleaseSession"})

# Calls that start something new, rather than continue or clean up an operation: a session
# on a driver drained with move-idle moves on one of these when nothing of it is running.
_STARTS_FRESH = frozenset(
    {"ExecutePlan", "AnalyzePlan", "Config", "AddArtifacts", "ArtifactStatus"}
)

# Methods whose successful calls may build session state worth replaying.
_JOURNALED = frozenset({"Config", "ExecutePlan"})

# time_remaining() without a client deadline is effectively infinite.
_NO_DEADLINE = 1e8


def forwardable(metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
    """The metadata a proxy may pass on: no pseudo, hop-by-hop or grpc- headers."""
    if not metadata:
        return []
    return [
        (k, v)
        for k, v in metadata
        if k not in _DROP_EXACT and not k.startswith(":") and not k.startswith("grpc-")
    ]


def _as_dict(metadata: Metadata | None) -> dict[str, str | bytes]:
    return dict(metadata) if metadata else {}


class Proxy(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """The generic handler: identifies, places and forwards every Spark Connect call."""

    def __init__(
        self,
        placement: Placement,
        upstreams: Upstreams,
        health: Health,
        registry: Registry,
        settings: Settings,
    ) -> None:
        self._placement = placement
        self._upstreams = upstreams
        self._health = health
        self._registry = registry
        self._settings = settings
        self._telemetry = placement.telemetry
        self.open_streams: dict[str, int] = {}  # session -> its response streams open here
        # ReleaseExecute(release_until) per (session, operation): one forward in flight, and
        # the newest request that arrived meanwhile, sent when it is done.
        self._releasing: set[tuple[str, str]] = set()
        self._next_release: dict[tuple[str, str], tuple[Pin, bytes, Metadata]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {
            m.path: self._make_handler(m) for m in protocol.METHODS.values()
        }

    # --- grpc.GenericRpcHandler -------------------------------------------------------

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        """The handler for one call's method; None (UNIMPLEMENTED) outside the service."""
        path: str = handler_call_details.method
        handler = self._handlers.get(path)
        if handler is not None:
            return handler
        method = protocol.method_for_path(path)
        if method is None:
            return None
        # Unknown methods are rare (a newer client); build their handler per call
        # rather than growing a cache from client-chosen names.
        return self._make_handler(method)

    def _make_handler(self, method: Method) -> grpc.RpcMethodHandler:
        # partial() keeps the coroutine / async-generator nature grpc.aio inspects.
        label = method.name if method.name in protocol.METHODS else "other"
        handler: Any
        if method.shape is Shape.UNARY_UNARY:
            handler = partial(self._observed_unary, self._unary_unary, method, label)
            return grpc.unary_unary_rpc_method_handler(handler)
        if method.shape is Shape.UNARY_STREAM:
            handler = partial(self._observed_stream, self._unary_stream, method, label)
            return grpc.unary_stream_rpc_method_handler(handler)
        if method.shape is Shape.STREAM_UNARY:
            handler = partial(self._observed_unary, self._stream_unary, method, label)
            return grpc.stream_unary_rpc_method_handler(handler)
        handler = partial(self._observed_stream, self._stream_stream, method, label)
        return grpc.stream_stream_rpc_method_handler(handler)

    # --- observation: metrics and the call's span around every shape --------------------------

    async def _observed_unary(
        self, handler: Any, method: Method, label: str, request: Any, context: Any
    ) -> bytes:
        obs = self._telemetry.begin(label, "unary", context.invocation_metadata())
        code, details = grpc.StatusCode.OK, None
        try:
            response: bytes = await handler(method, request, context, obs)
            return response
        except BaseException as exc:
            code, details = _status_of(exc, context)
            raise
        finally:
            obs.end(code, details)

    async def _observed_stream(
        self, handler: Any, method: Method, label: str, request: Any, context: Any
    ) -> AsyncIterator[bytes]:
        obs = self._telemetry.begin(label, "stream", context.invocation_metadata())
        code, details = grpc.StatusCode.OK, None
        try:
            async for response in handler(method, request, context, obs):
                yield response
        except BaseException as exc:
            code, details = _status_of(exc, context)
            raise
        finally:
            obs.end(code, details)

    # --- the four shapes ------------------------------------------------------------------
    # Unary-request shapes may be retried once on a new placement when the driver could
    # not be reached and nothing was sent to the client yet; client-streaming ones cannot
    # (their requests are consumed as they are forwarded).

    async def _unary_unary(
        self,
        method: Method,
        request: bytes,
        context: grpc.aio.ServicerContext,
        obs: CallObservation,
    ) -> bytes:
        info, pin, md, timeout = await self._route(method, request, context, obs)
        if method.name == "ReleaseExecute" and self._placement.is_live(pin.driver):
            released = self._coalesce_release(method, info, pin, request, md)
            if released is not None:
                return released
        for attempt in (1, 2):
            if method.name in _NOTHING_TO_MOVE and not self._placement.is_live(pin.driver):
                return await self._answer_for_dead_driver(method, info, request)
            call = self._upstreams.channel(pin.driver).unary_unary(method.path)(
                self._outgoing(method, pin, request),
                metadata=obs.forwarding(pin.driver, pin.pool, md),
                timeout=timeout,
            )
            try:
                await call
                obs.first_response()
                break
            except grpc.aio.AioRpcError as exc:
                obs.first_response()
                if attempt == 1 and await self._driver_died(exc, pin):
                    pin = await self._placed(method, request, info, md, context, obs)
                    continue
                await self._relay_error(context, exc, pin)
        response = await self._relay_unary(context, call, pin)  # done: no second round trip
        await self._record(method, info, request)
        if method.name == "ReleaseSession":
            await self._placement.release(info.session_id)
        return self._incoming(method, pin, response)

    async def _unary_stream(
        self,
        method: Method,
        request: bytes,
        context: grpc.aio.ServicerContext,
        obs: CallObservation,
    ) -> AsyncIterator[bytes]:
        info, pin, md, timeout = await self._route(method, request, context, obs)
        call: Any = None
        session_id = info.session_id
        self.open_streams[session_id] = self.open_streams.get(session_id, 0) + 1
        try:
            for attempt in (1, 2):
                call = self._upstreams.channel(pin.driver).unary_stream(method.path)(
                    self._outgoing(method, pin, request),
                    metadata=obs.forwarding(pin.driver, pin.pool, md),
                    timeout=timeout,
                )
                try:
                    first = await call.read()
                    obs.first_response()
                except grpc.aio.AioRpcError as exc:
                    obs.first_response()
                    if attempt == 1 and await self._driver_died(exc, pin):
                        pin = await self._placed(method, request, info, md, context, obs)
                        continue
                    await self._relay_error(context, exc, pin)
                break
            # A state-building call is journaled when its result is complete, before the
            # client sees that: pyspark may end the call right then, which would cancel
            # anything this handler meant to do after its last message.
            entry = self._entry(method, request)
            async for response in self._relay_stream(context, call, pin, first, method, obs):
                if entry is not None and _completes(response):
                    await self._append(info, entry)
                    entry = None
                yield response
            if entry is not None:  # a stream that ended without a result_complete message
                await self._append(info, entry)
        finally:
            if self.open_streams[session_id] <= 1:
                del self.open_streams[session_id]
            else:
                self.open_streams[session_id] -= 1
            if call is not None and not call.done():
                call.cancel()  # the client went away before the stream began

    async def _stream_unary(
        self,
        method: Method,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
        obs: CallObservation,
    ) -> bytes:
        first = await self._first_request(method, requests, context)
        info, pin, md, timeout = await self._route(method, first, context, obs)
        outgoing = self._outgoing_stream(method, pin, first, requests, obs)
        tape = _Tape(self._settings.journal_max_bytes) if method.name == journal.ARTIFACTS else None
        call = self._upstreams.channel(pin.driver).stream_unary(method.path)(
            tape.record(outgoing) if tape else outgoing,
            metadata=obs.forwarding(pin.driver, pin.pool, md),
            timeout=timeout,
        )
        response = await self._relay_unary(context, call, pin)
        obs.first_response()
        if tape is not None and tape.overflowed:
            # An entry just over the cap marks the journal overflowed (sticky): strict.
            await self._append(info, bytes(self._settings.journal_max_bytes + 1))
        elif tape is not None:
            entry = journal.JournalEntry(method.name, journal.frame(tape.messages))
            await self._append(info, entry.encode())
        return self._incoming(method, pin, response)

    async def _stream_stream(
        self,
        method: Method,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
        obs: CallObservation,
    ) -> AsyncIterator[bytes]:
        first = await self._first_request(method, requests, context)
        _, pin, md, timeout = await self._route(method, first, context, obs)
        call = self._upstreams.channel(pin.driver).stream_stream(method.path)(
            self._outgoing_stream(method, pin, first, requests, obs),
            metadata=obs.forwarding(pin.driver, pin.pool, md),
            timeout=timeout,
        )
        async for response in self._relay_stream(context, call, pin, None, method, obs):
            yield response

    # --- moved sessions: identity, journal, replay ------------------------------------------

    def _outgoing(self, method: Method, pin: Pin, request: bytes) -> bytes:
        """A request as its driver must see it: a moved session's old server id removed."""
        if pin.server_side_id is None or method.observed_field is None:
            return request
        return wire.strip_field(request, method.observed_field)

    async def _outgoing_stream(
        self,
        method: Method,
        pin: Pin,
        first: bytes,
        rest: AsyncIterator[bytes],
        obs: CallObservation,
    ) -> AsyncIterator[bytes]:
        obs.bytes_to_driver += len(first)
        yield self._outgoing(method, pin, first)
        async for request in rest:
            obs.bytes_to_driver += len(request)
            yield self._outgoing(method, pin, request)

    def _incoming(self, method: Method, pin: Pin, response: bytes) -> bytes:
        """A response as the client must see it: a moved session keeps its first server id."""
        if pin.server_side_id is None or not method.response_server_side_field:
            return response
        return wire.replace_string(response, method.response_server_side_field, pin.server_side_id)

    def _entry(self, method: Method, request: bytes) -> bytes | None:
        """The journal entry of a call that builds session state, else None (most calls)."""
        if method.name not in _JOURNALED or journal.classify(method.name, request) is None:
            return None
        return journal.JournalEntry(method.name, request).encode()

    async def _record(self, method: Method, info: RequestInfo, request: bytes) -> None:
        """Journal a successful unary call that built session state."""
        entry = self._entry(method, request)
        if entry is not None:
            await self._append(info, entry)

    async def _append(self, info: RequestInfo, entry: bytes) -> None:
        """Add one entry to a session's journal; say so once when the session outgrows it."""
        try:
            kept = await self._registry.journal_append(
                info.session_id, entry, self._settings.journal_max_bytes
            )
        except RegistryUnavailable as exc:
            self._placement.note_registry_error(exc)
            return
        if kept:
            self._telemetry.journal_bytes.inc(len(entry))
        else:
            self._telemetry.journal_overflows.inc()
            log.warning(
                "session %s built more than journal_max_bytes=%d of state: if its driver "
                "dies it moves strictly (the client gets SESSION_CHANGED)",
                info.session_id,
                self._settings.journal_max_bytes,
            )

    async def _driver_died(self, exc: grpc.aio.AioRpcError, pin: Pin) -> bool:
        """Whether a failed call means its driver is gone (confirmed by a probe)."""
        if not errors.is_transport_failure(exc.code(), exc.details()):
            return False
        return await self._health.confirm_failure(pin.driver)

    async def _placed(
        self,
        method: Method,
        first: bytes,
        info: RequestInfo,
        md: list[tuple[str, str | bytes]],
        context: grpc.aio.ServicerContext,
        obs: CallObservation,
    ) -> Pin:
        """The session's pin, moving it (and replaying its state) if its driver is dead."""
        try:
            pin = await self._placement.place(info.session_id, info.pool, info.user_id or None)
            if self._placement.is_live(pin.driver):
                if pin.driver in self._placement.move_idle:
                    return await self._move_idle(method, first, info, md, pin, obs)
                return pin
            if method.name in _NOTHING_TO_MOVE:
                return pin
            keep = self._settings.migration == "replay"
            entries = await self._registry.journal(info.session_id) if keep else []
            if entries is None:
                keep = False  # over the cap: strict, Spark says SESSION_CHANGED
            observed = (
                wire.read_string(first, method.observed_field) if method.observed_field else None
            )
            try:
                pin, moved_here = await self._placement.move(pin, observed, keep)
            except NoLiveDriver as exc:
                raise NoLiveDriver(f"driver {pin.driver} is down and {exc}") from exc
            obs.moved = moved_here
            if moved_here and keep and entries:
                await self._replay(pin, entries, md)
            return pin
        except Exception as exc:
            await _abort(context, exc)

    async def _move_idle(
        self,
        method: Method,
        first: bytes,
        info: RequestInfo,
        md: list[tuple[str, str | bytes]],
        pin: Pin,
        obs: CallObservation,
    ) -> Pin:
        """Move a session off a driver drained with move-idle, if it can go unnoticed now.

        It goes only on a call that starts something new while none of its streams is open
        here, with its identity kept and its state replayed; otherwise it stays (for now, or
        until the driver is retired, when it moves as from a dead driver).
        """
        if (
            method.name not in _STARTS_FRESH
            or info.session_id in self.open_streams
            or self._settings.migration != "replay"
        ):
            return pin
        observed = pin.server_side_id or (
            wire.read_string(first, method.observed_field) if method.observed_field else None
        )
        if observed is None:
            return pin  # the client has not seen its server-side id yet: a later call will
        entries = await self._registry.journal(info.session_id)
        if entries is None:
            return pin  # too much state to replay: stays until the driver is retired
        try:
            new, moved_here = await self._placement.move(pin, observed, True, reason="drain")
        except NoLiveDriver:
            return pin  # nowhere to go: the drained driver keeps it
        obs.moved = moved_here
        if moved_here:
            if entries:
                await self._replay(new, entries, md)
            task = asyncio.ensure_future(self._release_on(pin, md))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return new

    async def move_session(self, session_id: str, target: str | None = None) -> Pin:
        """Move a session now (the admin API): its state replayed, its identity kept if known.

        The server-side id its client saw comes from an earlier move, or from asking its
        current driver as the session's owner; a session whose driver cannot say (dead), or
        whose journal overflowed, moves strictly: Spark answers SESSION_CHANGED on its next call.
        Raises LookupError for an unknown session, NoLiveDriver when there is nowhere to go.
        """
        pin = await self._registry.get_pin(session_id)
        if pin is None:
            raise LookupError(f"no session {session_id!r} is pinned")
        if target == pin.driver:
            return pin
        entries = await self._registry.journal(session_id)
        observed = pin.server_side_id or await self._server_side_id(pin)
        keep = self._settings.migration == "replay" and entries is not None and observed is not None
        new, moved_here = await self._placement.move(pin, observed, keep, "admin", target)
        if moved_here:
            if keep and entries:
                await self._replay(new, entries, [])
            await self._release_on(pin, [])
        return new

    async def _server_side_id(self, pin: Pin) -> str | None:
        """The server-side id a session has on its driver (asked as its owner), or None."""
        from pyspark.sql.connect.proto import base_pb2

        request = base_pb2.ConfigRequest(session_id=pin.session_id)
        request.user_context.user_id = pin.owner or ""
        request.operation.is_modifiable.keys.append("spark.sql.shuffle.partitions")
        try:
            response = await self._upstreams.channel(pin.driver).unary_unary(
                protocol.PATH_PREFIX + "Config"
            )(request.SerializeToString(), timeout=10)
        except grpc.aio.AioRpcError:
            return None
        field = protocol.METHODS["Config"].response_server_side_field
        return wire.read_string(response, field) or None

    async def _release_on(self, pin: Pin, md: list[tuple[str, str | bytes]]) -> None:
        """Close a moved session on the driver it left (best effort: the driver may be gone)."""
        from pyspark.sql.connect.proto import base_pb2

        request = base_pb2.ReleaseSessionRequest(session_id=pin.session_id)
        request.user_context.user_id = pin.owner or ""
        path = protocol.PATH_PREFIX + "ReleaseSession"
        try:
            await self._upstreams.channel(pin.driver).unary_unary(path)(
                request.SerializeToString(), metadata=md, timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            log.info("session %s: release on %s failed: %s", pin.session_id, pin.driver, exc)

    def _coalesce_release(
        self, method: Method, info: RequestInfo, pin: Pin, request: bytes, md: Metadata
    ) -> bytes | None:
        """Answer a ReleaseExecute(release_until) at once; forward at most one per operation.

        pyspark releases a result as it reads it, one call per response message (500+ for a
        large toPandas), from a background thread that ignores the answers. `release_until` is
        cumulative, so only the newest one waiting matters: while one is in flight to the
        driver, later ones replace each other and the last goes when it is done. A
        release_all goes through as itself (None here), dropping what waits.
        """
        operation = wire.read_string(request, method.operation_id_field or 0) or ""
        key = (info.session_id, operation)
        if wire.read_bytes(request, _RELEASE_UNTIL_FIELD) is None:
            self._next_release.pop(key, None)
            return None
        if key in self._releasing:
            if key in self._next_release:
                self._telemetry.releases_coalesced.inc()
            self._next_release[key] = (pin, request, md)
        else:
            self._releasing.add(key)
            task = asyncio.ensure_future(self._forward_releases(method, key, pin, request, md))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return self._incoming(method, pin, _released(info.session_id, operation))

    async def _forward_releases(
        self, method: Method, key: tuple[str, str], pin: Pin, request: bytes, md: Metadata
    ) -> None:
        """Send a release, then the newest one that arrived meanwhile, until none waits."""
        try:
            while True:
                try:
                    await self._upstreams.channel(pin.driver).unary_unary(method.path)(
                        self._outgoing(method, pin, request), metadata=md, timeout=30
                    )
                except grpc.aio.AioRpcError as exc:  # the client would ignore it too
                    log.debug("release for %s on %s: %s", key, pin.driver, exc.code().name)
                waiting = self._next_release.pop(key, None)
                if waiting is None:
                    return
                pin, request, md = waiting
        finally:
            self._releasing.discard(key)

    async def _answer_for_dead_driver(
        self, method: Method, info: RequestInfo, request: bytes
    ) -> bytes:
        """Answer a call that only cleans up, for a session whose driver is dead.

        pyspark sends ReleaseExecute without the server-side id it saw, so such a call must
        not move the session (the move would lose the id the client checks); and there is
        nothing to release: the operation died with its driver. The answer carries no
        server-side id, which pyspark accepts.
        """
        from pyspark.sql.connect.proto import base_pb2

        if method.name == "ReleaseSession":
            await self._placement.release(info.session_id)
            return bytes(
                base_pb2.ReleaseSessionResponse(session_id=info.session_id).SerializeToString()
            )
        operation = wire.read_string(request, method.operation_id_field or 0) or ""
        return _released(info.session_id, operation)

    async def _replay(
        self, pin: Pin, entries: list[bytes], md: list[tuple[str, str | bytes]]
    ) -> None:
        """Rebuild a moved session's state on its new driver, in the original order."""
        start = time.perf_counter()
        with self._telemetry.span(
            "journal.replay", **{"spark.session_id": pin.session_id, "router.driver": pin.driver}
        ) as span:
            await self._replay_entries(pin, entries, md)
            if span is not None:
                span.set_attribute("router.replayed_calls", len(entries))
        self._telemetry.replay_seconds.observe(time.perf_counter() - start)
        log.info("session %s: replayed %d calls on %s", pin.session_id, len(entries), pin.driver)

    async def _replay_entries(
        self, pin: Pin, entries: list[bytes], md: list[tuple[str, str | bytes]]
    ) -> None:
        channel = self._upstreams.channel(pin.driver)
        for raw in entries:
            entry = journal.JournalEntry.decode(raw)
            path = protocol.PATH_PREFIX + entry.method
            try:
                if entry.method == journal.ARTIFACTS:
                    chunks = [
                        journal.for_replay(entry.method, m) for m in journal.unframe(entry.request)
                    ]
                    await channel.stream_unary(path)(_each(chunks), metadata=md, timeout=60)
                    continue
                body = journal.for_replay(entry.method, entry.request)
                if entry.method == "ExecutePlan":
                    async for _ in channel.unary_stream(path)(body, metadata=md, timeout=60):
                        pass
                else:
                    await channel.unary_unary(path)(body, metadata=md, timeout=60)
            except grpc.aio.AioRpcError as exc:
                raise DriverUnreachable(
                    f"session {pin.session_id} moved to driver {pin.driver}, but replaying "
                    f"its state failed: {exc.code().name}: {exc.details()}"
                ) from exc

    # --- shared steps -------------------------------------------------------------------

    async def _route(
        self,
        method: Method,
        first: bytes,
        context: grpc.aio.ServicerContext,
        obs: CallObservation,
    ) -> tuple[RequestInfo, Pin, list[tuple[str, str | bytes]], float | None]:
        """Identify and place a call: (info, pin, metadata to forward, upstream timeout)."""
        raw_md = context.invocation_metadata()
        try:
            info = protocol.identify(method, _as_dict(raw_md), first)
        except Exception as exc:
            await _abort(context, exc)
        if self._telemetry.tracer is not None:
            obs.identified(info.session_id, info.user_id, _operation_id(method, first))
        md = forwardable(raw_md)
        pin = await self._placed(method, first, info, md, context, obs)
        remaining = context.time_remaining()
        timeout = None if remaining is None or remaining > _NO_DEADLINE else max(remaining, 0.0)
        return info, pin, md, timeout

    async def _first_request(
        self, method: Method, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        try:
            return await requests.__anext__()
        except StopAsyncIteration:
            await _abort(
                context,
                BadRequest(f"{method.name}: the client closed the stream without a request"),
            )

    async def _relay_unary(self, context: grpc.aio.ServicerContext, call: Any, pin: Pin) -> bytes:
        """Relay a single response with its initial and trailing metadata, or its error."""
        try:
            response: bytes = await call
        except grpc.aio.AioRpcError as exc:
            await self._relay_error(context, exc, pin)
        await self._relay_initial(context, call)
        context.set_trailing_metadata(tuple(await call.trailing_metadata() or ()))
        return response

    async def _relay_stream(
        self,
        context: grpc.aio.ServicerContext,
        call: Any,
        pin: Pin,
        first: Any,
        method: Method,
        obs: CallObservation,
    ) -> AsyncIterator[bytes]:
        """Relay a response stream one message at a time (`first` already read), then trailers."""
        try:
            await self._relay_initial(context, call)
            response = first if first is not None else await call.read()
            obs.first_response()
            while response is not grpc.aio.EOF:
                obs.bytes_to_client += len(response)
                yield self._incoming(method, pin, response)
                response = await call.read()
            context.set_trailing_metadata(tuple(await call.trailing_metadata() or ()))
        except grpc.aio.AioRpcError as exc:
            await self._relay_error(context, exc, pin)
        finally:
            # Client cancel, deadline or an error on our side: stop the driver's work too.
            if not call.done():
                call.cancel()

    async def _relay_initial(self, context: grpc.aio.ServicerContext, call: Any) -> None:
        initial = forwardable(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(tuple(initial))

    async def _relay_error(
        self, context: grpc.aio.ServicerContext, exc: grpc.aio.AioRpcError, pin: Pin
    ) -> NoReturn:
        code, details = exc.code(), exc.details()
        if errors.is_transport_failure(code, details):
            await _abort(
                context, DriverUnreachable(f"driver {pin.driver} (pool {pin.pool}): {details}")
            )
        await _end(context, code, details or "", tuple(exc.trailing_metadata() or ()))


def _released(session_id: str, operation: str) -> bytes:
    """The ReleaseExecuteResponse the router gives itself (no server-side id: pyspark accepts)."""
    from pyspark.sql.connect.proto import base_pb2

    answer = base_pb2.ReleaseExecuteResponse(session_id=session_id, operation_id=operation)
    return bytes(answer.SerializeToString())


def _status_of(exc: BaseException, context: Any) -> tuple[grpc.StatusCode, str | None]:
    """The status a call ended with when `exc` left its handler (an abort, a cancel, a bug)."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED, None
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code, context.details()
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status, context.details()
    return grpc.StatusCode.UNKNOWN, None


def _operation_id(method: Method, first: bytes) -> str | None:
    """The operation a call is about, when its method names one (tracing only)."""
    if method.operation_id_field is None:
        return None
    try:
        return wire.read_string(first, method.operation_id_field)
    except (wire.WireError, UnicodeDecodeError):
        return None


async def _end(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str, trailers: Any = ()
) -> NoReturn:
    """End a call with a status (context.abort raises to unwind the handler)."""
    await context.abort(code, details, trailers)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End a call with the status errors.to_status gives for `exc`."""
    await _end(context, *errors.to_status(exc))


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The first request (already read to route the call) followed by the others."""
    yield first
    async for request in rest:
        yield request


async def _each(messages: list[bytes]) -> AsyncIterator[bytes]:
    """A request stream of the given messages."""
    for message in messages:
        yield message


class _Tape:
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


# ReleaseExecuteRequest.release_until (a cumulative release, as opposed to release_all).
_RELEASE_UNTIL_FIELD = 6

# ExecutePlanResponse.result_complete: the last message of a successful execution.
_RESULT_COMPLETE_FIELD = 14


def _completes(response: bytes) -> bool:
    """Whether an ExecutePlan response says the execution completed."""
    try:
        return wire.read_bytes(response, _RESULT_COMPLETE_FIELD) is not None
    except wire.WireError:
        return False
