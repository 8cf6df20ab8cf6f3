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
- Quotas (admit/quotas.py, with a policy file): every call but those that only end things
  (ReleaseExecute, ReleaseSession, Interrupt) counts against its caller's and its pool's
  calls per second (local leased tokens: no registry round trip in the steady state,
  nothing at all when no rate is set), an ExecutePlan stream holds one of its
  caller's running-operation slots until it ends however it ends, and a session's first pin
  (or a clone's) counts against its owner's sessions. A refusal is RESOURCE_EXHAUSTED with
  trailing metadata "retry-after" for rate limits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, NoReturn

import grpc
import grpc.aio

from registry.base import Registry
from registry.models import Pin, split_key
from router import errors
from router.admit.audit import AuditLog, PlanInfo
from router.admit.auth import Authenticator, Credentials, Identity
from router.admit.policy_file import PolicyFile
from router.admit.quotas import Operation, QuotaExceeded, QuotaGate
from router.config import Settings
from router.dataplane import protocol
from router.dataplane.audited import Audited
from router.dataplane.budget import Budget, Held
from router.dataplane.protocol import Method, RequestInfo, Shape
from router.dataplane.recorder import Recorder
from router.dataplane.releases import Releases
from router.dataplane.rerun import Shown
from router.errors import (
    BadRequest,
    DriverUnreachable,
    NoLiveDriver,
    OverBudget,
    PermissionDenied,
    PolicyDenied,
    RerunDiffers,
    RouterError,
    status_of,
)
from router.health import Health
from router.sessions.migration import Mover, Reason
from router.sessions.placement import Admit, Created, Placement
from router.telemetry import CallObservation, MethodMetrics
from router.upstreams import Upstreams

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

# Calls that only end things are never counted against a rate: refusing them would keep
# results, operations or sessions alive, against every other limit.
_UNRATED = frozenset({"ReleaseExecute", "ReleaseSession", "Interrupt"})

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


def _as_dict(
    metadata: Metadata | None, single: frozenset[str] = frozenset()
) -> dict[str, str | bytes]:
    """The metadata as a dict; BadRequest when a key of `single` comes twice, differently."""
    if not metadata:
        return {}
    found = dict(metadata)
    if len(found) != len(metadata):  # a key repeated: rare, so checked only then
        for key in single & found.keys():
            values = {v for k, v in metadata if k == key}
            if len(values) > 1:
                raise BadRequest(
                    f"metadata {key!r} was sent {len(values)} times with different values; "
                    "send it once"
                )
    return found


class Proxy(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """The generic handler: identifies, places and forwards every Spark Connect call."""

    def __init__(
        self,
        placement: Placement,
        upstreams: Upstreams,
        health: Health,
        registry: Registry,
        settings: Settings,
        auth: Authenticator | None = None,
        policy: PolicyFile | None = None,
        quotas: QuotaGate | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self._placement = placement
        # None without audit_file / audit_stdout: the hot path then records nothing.
        self._audit = Audited(audit) if audit is not None and audit.enabled else None
        # None with auth none: the hot path then skips admission altogether.
        self._auth = auth if auth is not None and auth.enabled else None
        self._policy = policy if self._auth is not None else None  # Settings: it needs auth
        self._quotas = quotas if self._policy is not None else None  # the policy file's
        self._reject_spoofing = settings.identity == "reject"
        # Credentials are the router's business: with authentication on, or a token of its
        # own for drivers, the client's authorization (and identity headers) never go on.
        strip: set[str] = set()
        if self._auth is not None:
            strip |= {"authorization", settings.trusted_user_header, settings.trusted_groups_header}
        if settings.driver_token is not None:
            strip.add("authorization")
        self._strip = frozenset(strip)
        self._to_drivers = tuple(upstreams.auth_metadata)  # the driver token, if any
        # Headers that name who or what a call is about: one value each, never "last wins".
        self._single = frozenset(
            {
                protocol.SESSION_HEADER,
                protocol.POOL_HEADER,
                "authorization",
                settings.trusted_user_header,
                settings.trusted_groups_header,
            }
        )
        self._max_identifier = settings.max_identifier_length
        # Only a replaying move keeps a session's identity, so only then is it worth learning.
        self._learn = settings.migration == "replay"
        self._upstreams = upstreams
        self._health = health
        self._registry = registry
        self._settings = settings
        self._telemetry = placement.telemetry
        self.budget = Budget(
            settings.max_streams,
            settings.max_streams_per_connection,
            settings.max_request_bytes_in_flight,
        )
        self.open_streams: dict[str, int] = {}  # session key -> its response streams open here
        self._mover = Mover(placement, registry, upstreams, settings.migration, self._telemetry)
        if self._audit is not None:
            self._mover.on_moved = self._audit.moved
        self.recorder = Recorder(
            registry, settings.journal_max_bytes, self._telemetry, placement.note_registry_error
        )
        self._releases = Releases(upstreams, self._telemetry, self._release)
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
        # partial() keeps the coroutine / async-generator nature grpc.aio inspects; the
        # method's metric children are bound here once, not looked up per call.
        label = method.name if method.name in protocol.METHODS else "other"
        metrics = self._telemetry.method_metrics(label)
        if method.shape is Shape.UNARY_UNARY:
            return grpc.unary_unary_rpc_method_handler(partial(self._unary_unary, method, metrics))
        if method.shape is Shape.UNARY_STREAM:
            return grpc.unary_stream_rpc_method_handler(
                partial(self._unary_stream, method, metrics)
            )
        if method.shape is Shape.STREAM_UNARY:
            return grpc.stream_unary_rpc_method_handler(
                partial(self._stream_unary, method, metrics)
            )
        return grpc.stream_stream_rpc_method_handler(partial(self._stream_stream, method, metrics))

    # --- the four shapes ------------------------------------------------------------------
    # Each shape is one coroutine (or async generator) per call that observes itself:
    # metrics and the call's span start and end here. Unary-request shapes may be retried
    # once on a new placement when the driver could not be reached and nothing was sent to
    # the client yet; client-streaming ones cannot (their requests are consumed as they are
    # forwarded).

    async def _unary_unary(
        self,
        method: Method,
        metrics: MethodMetrics,
        request: bytes,
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        raw_md = context.invocation_metadata()
        obs = CallObservation(self._telemetry, metrics, "unary", raw_md, context)
        with obs, await self._admitted(context, method, len(request)):
            info, md, pin, caller = await self._routed(method, raw_md, request, context, obs)
            timeout = _timeout(context)
            placement = self._placement
            if method.name == "ReleaseExecute" and placement.is_live(pin.driver):
                released = self._releases.coalesce(method, info, pin, _as_user(info, request), md)
                if released is not None:
                    return released
            for attempt in (1, 2):
                if method.name in protocol.NOTHING_TO_MOVE and not placement.is_live(pin.driver):
                    return await self._releases.answer_for_dead_driver(method, info)
                call = self._dial("unary_unary", method, pin, info, request, md, timeout, obs)
                try:
                    response: bytes = await call
                    obs.first_response()
                    break
                except grpc.aio.AioRpcError as exc:
                    pin = await self._failed_over(
                        exc, attempt, pin, method, request, info, md, context, obs
                    )
                except asyncio.CancelledError:
                    if not self._was_cut(pin):
                        raise
                    pin = await self._failed_over(
                        None, attempt, pin, method, request, info, md, context, obs
                    )
            if pin.server_side_id is None and pin.seen_id is None and self._learn:
                self._learned(method, pin, response)
            await _relay_metadata(context, call)
            if method.name in protocol.JOURNALED:
                await self.recorder.record(info.key, method, _as_user(info, request))
            elif method.name == "ReleaseSession":
                await self._release(info.key, pin)
            elif method.name == "CloneSession":
                await self._cloned(pin, response, caller, md, context)
            return _for_client(method, pin, response)

    async def _unary_stream(
        self,
        method: Method,
        metrics: MethodMetrics,
        request: bytes,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        raw_md = context.invocation_metadata()
        obs = CallObservation(self._telemetry, metrics, "stream", raw_md, context)
        call: Any = None
        key: str | None = None
        operation: Operation | None = None
        audited: Audited | None = None  # an ExecutePlan's record, once it was let in
        running: Any = None  # its pool's gauge of open ExecutePlan streams
        plan = PlanInfo(None, None)
        status = grpc.StatusCode.OK
        with obs, await self._admitted(context, method, len(request)):
            try:
                info, md, pin, caller = await self._routed(method, raw_md, request, context, obs)
                if method.name == "ExecutePlan" and self._quotas is not None:
                    operation = await self._operation(method, info, caller, context)
                if method.name == "ExecutePlan":
                    running = self._telemetry.operations_running.labels(pin.pool)
                    running.inc()
                    if self._audit is not None:
                        audited = self._audit
                        plan = audited.plan(request)
                timeout = _timeout(context)
                key = info.key
                self.open_streams[key] = self.open_streams.get(key, 0) + 1
                # Before the driver has it: the call may end through another replica.
                entry = await self.recorder.stream_entry(
                    key, method, info.operation_id, _as_user(info, request)
                )
                for attempt in (1, 2):
                    call = self._dial("unary_stream", method, pin, info, request, md, timeout, obs)
                    try:
                        response = await call.read()
                        obs.first_response()
                        break
                    except grpc.aio.AioRpcError as exc:
                        pin = await self._failed_over(
                            exc, attempt, pin, method, request, info, md, context, obs
                        )
                    except asyncio.CancelledError:
                        if not self._was_cut(pin):
                            raise
                        pin = await self._failed_over(
                            None, attempt, pin, method, request, info, md, context, obs
                        )
                if pin.server_side_id is None and pin.seen_id is None and self._learn:
                    self._learned(method, pin, response)
                journal = None if entry is None else (key, entry)
                rerun = None
                if method.name == "ExecutePlan":

                    async def rerun(cut: Pin) -> tuple[Any, Pin]:
                        nonlocal pin
                        if context.cancelled():  # the client left as its driver went down
                            raise asyncio.CancelledError
                        moved = await self._placed(method, request, info, md, context, obs)
                        if moved.driver == cut.driver:  # back already: it may hold the run
                            await _abort(context, _cut_off(cut))
                        pin = moved  # the run's record names the driver that finished it
                        args = (method, moved, info, request, md, _timeout(context), obs)
                        return self._dial("unary_stream", *args), moved

                async for message in self._relay_stream(
                    context, call, pin, method, obs, response, journal, rerun
                ):
                    yield message
            except BaseException as exc:
                status = status_of(exc, context)[0]
                raise
            finally:
                if audited is not None:
                    audited.execution(
                        info, caller, pin, plan, status, obs.start, obs.bytes_to_client
                    )
                if running is not None:
                    running.dec()
                if operation is not None:
                    operation.end()  # however the stream ended: its slot is free here
                if key is not None:
                    if self.open_streams[key] <= 1:
                        del self.open_streams[key]
                    else:
                        self.open_streams[key] -= 1
                if call is not None and not call.done():
                    call.cancel()  # the client went away before the stream began

    async def _stream_unary(
        self,
        method: Method,
        metrics: MethodMetrics,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        raw_md = context.invocation_metadata()
        obs = CallObservation(self._telemetry, metrics, "unary", raw_md, context)
        with obs, await self._admitted(context, method, 0) as held:
            first = await self._first_request(method, requests, context)
            await self._holding(context, method, held, len(first))
            info, md, pin, _ = await self._routed(method, raw_md, first, context, obs)
            outgoing = self._outgoing_stream(method, pin, info, first, requests, obs)
            tape = self.recorder.tape(method)
            call = self._upstreams.call(pin.driver, "stream_unary", method.path)(
                tape.record(outgoing) if tape else outgoing,
                metadata=obs.forwarding(pin.driver, pin.pool, md),
                timeout=_timeout(context),
            )
            try:
                response: bytes = await call
            except grpc.aio.AioRpcError as exc:
                await self._relay_error(context, exc, pin)
            except asyncio.CancelledError:
                if not self._was_cut(pin):
                    raise
                await _abort(context, _cut_off(pin))
            await _relay_metadata(context, call)
            obs.first_response()
            if pin.server_side_id is None and pin.seen_id is None and self._learn:
                self._learned(method, pin, response)
            if tape is not None:
                await self.recorder.record_tape(info.key, method, tape)
            return _for_client(method, pin, response)

    async def _stream_stream(
        self,
        method: Method,
        metrics: MethodMetrics,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        raw_md = context.invocation_metadata()
        obs = CallObservation(self._telemetry, metrics, "stream", raw_md, context)
        with obs, await self._admitted(context, method, 0) as held:
            first = await self._first_request(method, requests, context)
            await self._holding(context, method, held, len(first))
            info, md, pin, _ = await self._routed(method, raw_md, first, context, obs)
            call = self._upstreams.call(pin.driver, "stream_stream", method.path)(
                self._outgoing_stream(method, pin, info, first, requests, obs),
                metadata=obs.forwarding(pin.driver, pin.pool, md),
                timeout=_timeout(context),
            )
            async for message in self._relay_stream(context, call, pin, method, obs):
                yield message

    async def _admitted(
        self, context: grpc.aio.ServicerContext, method: Method, request_bytes: int
    ) -> Held:
        """The call's share of the memory budget, or the call refused (RESOURCE_EXHAUSTED)."""
        try:
            return self.budget.open(context.peer(), request_bytes)
        except OverBudget as exc:
            await self._refuse(context, exc, method)

    async def _holding(
        self, context: grpc.aio.ServicerContext, method: Method, held: Held, request_bytes: int
    ) -> None:
        """A client stream's first request counted in its call's share, or the call refused."""
        try:
            held.hold(request_bytes)
        except OverBudget as exc:
            await self._refuse(context, exc, method)

    # --- moved sessions: identity, journal, replay ------------------------------------------

    async def _outgoing_stream(
        self,
        method: Method,
        pin: Pin,
        info: RequestInfo,
        first: bytes,
        rest: AsyncIterator[bytes],
        obs: CallObservation,
    ) -> AsyncIterator[bytes]:
        alias, upstream = pin.server_side_id, pin.upstream_id
        user = info.rewrite_user
        obs.bytes_to_driver += len(first)
        yield _first_for(info, pin, first)
        async for request in rest:
            obs.bytes_to_driver += len(request)
            request = protocol.for_driver(method, alias, request, upstream)
            yield request if user is None else protocol.with_user(request, user)

    def _dial(
        self,
        shape: str,
        method: Method,
        pin: Pin,
        info: RequestInfo,
        request: bytes,
        md: list[tuple[str, str | bytes]],
        timeout: float | None,
        obs: CallObservation,
    ) -> Any:
        """Start the upstream call of a unary-request shape on the driver of `pin`."""
        return self._upstreams.call(pin.driver, shape, method.path)(
            _first_for(info, pin, request),
            metadata=obs.forwarding(pin.driver, pin.pool, md),
            timeout=timeout,
        )

    async def _failed_over(
        self,
        exc: grpc.aio.AioRpcError | None,
        attempt: int,
        pin: Pin,
        method: Method,
        request: bytes,
        info: RequestInfo,
        md: list[tuple[str, str | bytes]],
        context: grpc.aio.ServicerContext,
        obs: CallObservation,
    ) -> Pin:
        """After a first attempt found its driver gone: the pin to retry on; else the error.

        `exc` None: the call was cut (its driver marked down while it ran).
        """
        obs.first_response()
        if attempt == 1 and (exc is None or await self._driver_died(exc, pin)):
            return await self._placed(method, request, info, md, context, obs)
        if exc is None:
            await _abort(context, _cut_off(pin))
        await self._relay_error(context, exc, pin)

    def _was_cut(self, pin: Pin) -> bool:
        """Whether a cancelled upstream call was the router's cut (Upstreams.cut).

        Its driver was marked down, so a client's own cancel at that very moment is taken
        for a cut too: that call then does a little work for a client that is gone.
        """
        return not self._placement.is_live(pin.driver)

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
        refuse_new: RouterError | None = None,
        admit: Admit | None = None,
        caller: Identity | None = None,
    ) -> Pin:
        """The session's pin, moving it (sessions/migration.py) if its driver is dead.

        `refuse_new`: the error a session that has no pin yet gets instead of one; `admit`
        (the session quota) is awaited before such a session gets one; `caller` is who the
        audit names for a session created or refused here.

        With no live driver in the pool, the call waits (once, at most
        `no_driver_wait_seconds` after a driver of the pool went down) for one to recover,
        then fails FAILED_PRECONDITION naming the pool, its drivers and their probe errors.
        """
        waited = False
        created = self._creation(caller)
        while True:
            lead = ""
            try:
                pin = await self._placement.place(
                    info.session_id,
                    info.pool,
                    info.user or None,
                    claim=self._auth is not None,
                    refuse_new=refuse_new,
                    admit=admit,
                    created=created,
                )
                if self._placement.is_live(pin.driver):
                    if pin.key in self._placement.stale:
                        return await self._rebuilt(method, info, md, pin, obs)
                    if pin.driver in self._placement.move_idle:
                        return await self._move_idle(method, info, md, pin, obs)
                    return await self._connected(pin, waited)
                if method.name in protocol.NOTHING_TO_MOVE:
                    return pin  # answered for the dead driver (releases.py): nothing to rebuild
                lead = f"driver {pin.driver} is down and "
                pin, obs.moved = await self._mover.move(
                    pin, Reason.DRIVER_DOWN, observed=info.observed_id, metadata=md
                )
                return await self._connected(pin, waited)
            except NoLiveDriver as exc:
                wait = self._settings.no_driver_wait_seconds
                if not waited and await self._health.await_recovery(exc.drivers, wait):
                    waited = True
                    continue
                await _abort(context, exc.explained(self._health.last_errors, lead))
            except Exception as exc:  # refuse_new, admit, a foreign session's id, ...
                await self._refuse(context, exc, method, info, caller)

    async def _connected(self, pin: Pin, waited: bool) -> Pin:
        """`pin`, once its driver's channel connects if the call waited for a recovery.

        The probe that found the driver back used a channel of its own; the data plane's
        may still be in reconnect backoff and would fail the call at once (fail-fast).
        """
        if waited:
            await self._upstreams.ready(pin.driver, self._settings.no_driver_wait_seconds)
        return pin

    async def _rebuilt(
        self,
        method: Method,
        info: RequestInfo,
        md: list[tuple[str, str | bytes]],
        pin: Pin,
        obs: CallObservation,
    ) -> Pin:
        """A session whose driver restarted on its address: its state replayed there first.

        As a move from a dead driver, onto the same address: its identity kept, its journal
        replayed, so the client carries on instead of getting SESSION_CHANGED.
        """
        if method.name in protocol.NOTHING_TO_MOVE:
            return pin  # a release rebuilds nothing; the session stays marked
        await self._connected(pin, waited=True)  # the driver is back: its channel may not be
        new, obs.moved = await self._mover.move(
            pin, Reason.DRIVER_DOWN, observed=info.observed_id, target=pin.driver, metadata=md
        )
        self._placement.stale.discard(pin.key)  # also when the mover left it (strict, overflow)
        return new

    async def _move_idle(
        self,
        method: Method,
        info: RequestInfo,
        md: list[tuple[str, str | bytes]],
        pin: Pin,
        obs: CallObservation,
    ) -> Pin:
        """Move a session off a driver drained with move-idle, if it can go unnoticed now.

        It goes only on a call that starts something new while none of its streams is open
        here, with its identity kept and its state replayed (the mover leaves a session
        whose journal overflowed); otherwise it stays (for now, or until the driver is
        retired, when it moves as from a dead driver).
        """
        if (
            method.name not in protocol.STARTS_FRESH
            or info.key in self.open_streams
            or self._settings.migration != "replay"
            # The client has not shown its server-side id yet: a later call will. Checked
            # here too, so such calls cost no journal read.
            or not (pin.server_side_id or info.observed_id or pin.seen_id)
        ):
            return pin
        try:
            new, obs.moved = await self._mover.move(
                pin, Reason.DRAIN, observed=info.observed_id, metadata=md
            )
        except NoLiveDriver:
            return pin  # nowhere to go: the drained driver keeps it
        return new

    def _learned(self, method: Method, pin: Pin, response: Any) -> None:
        """Learn the server-side id a new session's client now saw (once per session).

        A move keeps it as the session's identity even for a client that never sends its
        observed id, and for a session that moves during its very first call.
        """
        if isinstance(response, bytes):
            seen = protocol.server_side_of(method, response)
            if seen is not None:
                self._placement.learn(pin, seen)

    async def _release(self, key: str, pin: Pin | None = None) -> None:
        """Forget a released session: its pin and journal, and journal entries still waiting;
        it counts against its user's sessions no more."""
        if self._audit is not None:
            pin = pin or self._placement.cache.peek(key)
            if pin is not None:
                self._audit.released(pin)
        self.recorder.forget(key)
        await self._placement.release(key)
        if self._quotas is not None:
            await self._quotas.release_session(key)

    async def _cloned(
        self,
        pin: Pin,
        response: bytes,
        caller: Identity | None,
        md: list[tuple[str, str | bytes]],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Pin a clone where its source lives, its journal a copy of the source's.

        Spark made the clone on the source's driver: its calls must go there too (the ring
        could send them anywhere), and a move of the clone must rebuild its own state. A
        clone is a new session of the source's owner: over their session quota, it is
        released on the driver again and the call refused.
        """
        clone_id = protocol.clone_of(response)
        if clone_id is None:
            return
        try:
            clone = await self._placement.pin_clone(
                pin,
                clone_id,
                claim=self._auth is not None,
                admit=self._admission(caller),
                created=self._creation(caller),
            )
        except PermissionDenied:
            log.warning("clone %s of session %s: its id belongs to another user", clone_id, pin)
            return
        except QuotaExceeded as exc:
            made = Pin(clone_id, pin.driver, pin.pool, owner=pin.owner)
            await self._mover.release_on(made, md)  # the client never hears of it
            await self._refuse(context, exc, protocol.METHODS["CloneSession"], None, caller)
        await self.recorder.copy(pin.key, clone.key, clone_id)

    async def move_session(self, key: str, target: str | None = None) -> Pin:
        """Move a session (by key) now, for the admin API, as sessions/migration.py moves any.

        Raises LookupError for an unknown session, NoLiveDriver when there is nowhere to go.
        """
        pin = await self._registry.get_pin(key)
        if pin is None:
            raise LookupError(f"no session {split_key(key)[1]!r} is pinned")
        if target == pin.driver:
            return pin
        moved, _ = await self._mover.move(pin, Reason.ADMIN, target=target)
        return moved

    # --- shared steps -------------------------------------------------------------------

    async def _routed(
        self,
        method: Method,
        raw_md: Metadata | None,
        first: bytes,
        context: grpc.aio.ServicerContext,
        obs: CallObservation,
    ) -> tuple[RequestInfo, list[tuple[str, str | bytes]], Pin, Identity | None]:
        """Identify, admit and place a call: (info, metadata to forward, pin, caller).

        Bad input, missing or bad credentials, a foreign user and a quota reached end the
        call. The pin of a known session on a live driver comes from the cache (no registry,
        no await but the authenticator's, which answers a known credential from memory, and
        the rate quota's, which answers from leased tokens); anything else goes down the
        slow path (`_placed`): place, claim, follow or move. The caller is None without auth.
        """
        identity = None
        asked: RequestInfo | None = None  # what a refusal's record names
        try:
            if self._audit is not None:
                self._audit.check()  # audit_when_full: refuse, and its queue full
            metadata = _as_dict(raw_md, self._single)
            info = asked = protocol.identify(method, metadata, first, self._max_identifier)
            refuse_new = None
            if self._auth is not None:
                credentials = Credentials(metadata, context.peer, context.auth_context)
                identity = await self._auth.authenticate(credentials)
                info = asked = self._as_caller(info, identity)
                if self._policy is not None:
                    try:
                        pool = self._policy.current.pool_for(identity, info.pool)
                    except PolicyDenied as exc:
                        if info.pool is not None or exc.reason != "pool":
                            raise
                        # Their default pool is not theirs: that refuses new sessions only,
                        # a session placed before may still be on a pool they may use.
                        refuse_new = exc
                    else:
                        if pool != info.pool:
                            info = replace(info, pool=pool)
        except RouterError as exc:
            await self._refuse(context, exc, method, asked, identity)
        if self._telemetry.tracer is not None:
            obs.identified(info.session_id, info.user, info.operation_id)
        md = self._forwarded(raw_md)
        placement = self._placement
        pin = placement.known(info.key)
        gate = self._quotas
        if (
            gate is not None
            and identity is not None
            and gate.quotas.has_rates
            and method.name not in _UNRATED
        ):
            # Before a new session is placed: a call refused here makes no pin. The pool is
            # the one the call goes to: a known session's own.
            try:
                await gate.admit_call(
                    identity.user, identity.groups, info.pool if pin is None else pin.pool
                )
            except QuotaExceeded as exc:
                await self._refuse(context, exc, method, info, identity)
        if pin is None or pin.driver in placement.move_idle or not placement.is_live(pin.driver):
            admit = self._admission(identity)
            pin = await self._placed(
                method, first, info, md, context, obs, refuse_new, admit, identity
            )
        if pin.pool != info.pool and identity is not None and self._policy is not None:
            # Placed before (another pool asked, or a reload since): it stays where it is,
            # if the policy still lets the caller use that pool.
            try:
                self._policy.current.check_pool(identity, pin.pool)
            except PolicyDenied as exc:
                await self._refuse(context, exc, method, info, identity)
        return info, md, pin, identity

    def _creation(self, caller: Identity | None) -> Created | None:
        """The audit's hook for a new pin of `caller` (None: the audit is off)."""
        if self._audit is None:
            return None
        return partial(self._audit.created, groups=caller.groups if caller else frozenset())

    def _admission(self, caller: Identity | None) -> Admit | None:
        """The session quota's hook for a new pin of `caller` (None: nothing to count)."""
        gate = self._quotas
        if gate is None or caller is None or not gate.quotas.active:
            return None
        groups = caller.groups

        async def admit(key: str) -> None:
            await gate.admit_session(key, groups)

        return admit

    async def _operation(
        self,
        method: Method,
        info: RequestInfo,
        caller: Identity | None,
        context: grpc.aio.ServicerContext,
    ) -> Operation | None:
        """An ExecutePlan's running-operation slot (None: not counted), or the call refused."""
        gate = self._quotas
        if gate is None or caller is None or not gate.quotas.active:
            return None
        try:
            return await gate.start_operation(caller.user, caller.groups)
        except QuotaExceeded as exc:
            await self._refuse(context, exc, method, info, caller)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        exc: BaseException,
        method: Method,
        info: RequestInfo | None = None,
        caller: Identity | None = None,
    ) -> NoReturn:
        """End a call the router refuses: counted by what refused it (policy, quota, budget),
        on the record when the audit is on and it is a denial (authentication, policy,
        ownership, quota, budget); a quota's RESOURCE_EXHAUSTED carries retry-after."""
        t = self._telemetry
        if isinstance(exc, PolicyDenied):
            t.denials.labels(exc.reason).inc()
        elif isinstance(exc, QuotaExceeded):
            t.quota_refusals.labels(exc.limit).inc()
        elif isinstance(exc, OverBudget):
            t.over_budget(exc.limit)
        if self._audit is not None:
            self._audit.denied(exc, method.name, context.peer(), info, caller)
        await _abort(context, exc)

    def _as_caller(self, info: RequestInfo, identity: Identity) -> RequestInfo:
        """The call as its authenticated caller makes it (identity: rewrite), or refused."""
        if identity.user == info.user_id:
            return info
        if self._reject_spoofing:
            self._telemetry.ownership_refusals.labels("spoofed").inc()
            raise PermissionDenied(
                f"the request claims user_id {info.user_id!r} but the caller authenticated "
                f"as {identity.user!r}; connect with sc://…/;user_id={identity.user} (or "
                "leave user_id out and let the router set it)"
            )
        return info.as_user(identity.user)

    def _forwarded(self, raw_md: Metadata | None) -> list[tuple[str, str | bytes]]:
        """The metadata sent on to the driver: the client's, less credentials, plus ours."""
        md = forwardable(raw_md)
        if self._strip:
            md = [(k, v) for k, v in md if k not in self._strip]
        if self._to_drivers:
            md.extend(self._to_drivers)
        return md

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

    async def _relay_stream(
        self,
        context: grpc.aio.ServicerContext,
        call: Any,
        pin: Pin,
        method: Method,
        obs: CallObservation,
        first: Any = None,
        journal: tuple[str, bytes] | None = None,
        rerun: Callable[[Pin], Awaitable[tuple[Any, Pin]]] | None = None,
    ) -> AsyncIterator[bytes]:
        """Relay a response stream one message at a time (`first` already read), then trailers.

        `journal` (session, entry) is a state-building call's journal entry: appended when its
        result is complete, before the client sees that: pyspark may end the call right then,
        which would cancel anything this handler meant to do after its last message.

        `rerun` starts the same call again on the session's next driver. It is used once, when
        the driver dies (or is cut off) mid-stream: the client would otherwise reattach to an
        operation the new driver never heard of, which pyspark refuses once it received any
        response (RESPONSE_ALREADY_RECEIVED). `rerun.Shown` keeps the second run from
        telling the client anything twice, and stops it if its results differ.
        """
        # None: the client sees the driver's responses as they are (a session never moved).
        shown_as = pin.server_side_id or pin.upstream_id
        shown = Shown() if rerun is not None else None
        try:
            initial = await call.initial_metadata()
            if initial:
                await _send_initial(context, initial)
            response = first if first is not None else await call.read()
            obs.first_response()
            while True:
                try:
                    while response is not grpc.aio.EOF:
                        if shown is not None and not shown.admit(response):
                            response = await call.read()  # the client has it from the first run
                            continue
                        obs.bytes_to_client += len(response)
                        if journal is not None and protocol.completes(response):
                            await self.recorder.append(*journal)
                            journal = None
                        yield response if shown_as is None else _for_client(method, pin, response)
                        response = await call.read()
                    if shown is not None:
                        shown.ended()
                    break
                except grpc.aio.AioRpcError as exc:
                    if shown is None or not shown.rerunnable:
                        raise
                    if not await self._driver_died(exc, pin):
                        raise
                except asyncio.CancelledError:
                    if shown is None or not shown.rerunnable or not self._was_cut(pin):
                        raise
                assert rerun is not None  # shown is set only with a rerun
                shown.rerun()  # once: a second driver lost ends the call
                call.cancel()
                lost = pin.driver
                call, pin = await rerun(pin)
                self._telemetry.executions_rerun.labels(pin.pool).inc()
                log.info(
                    "session %s: ExecutePlan cut off with %s after %d results, running it "
                    "again on %s",
                    pin.session_id,
                    lost,
                    shown.results,
                    pin.driver,
                )
                shown_as = pin.server_side_id or pin.upstream_id
                response = await call.read()
            trailing = await call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
        except grpc.aio.AioRpcError as exc:
            await self._relay_error(context, exc, pin)
        except RerunDiffers as exc:
            log.warning(
                "session %s: ExecutePlan stopped on %s: %s", pin.session_id, pin.driver, exc
            )
            await _abort(context, exc)
        except asyncio.CancelledError:
            if not self._was_cut(pin):
                raise
            await _abort(context, _cut_off(pin))  # the client reattaches, and moves
        finally:
            # Client cancel, deadline or an error on our side: stop the driver's work too.
            if not call.done():
                call.cancel()
        if journal is not None:  # a stream that ended without a result_complete message
            await self.recorder.append(*journal)

    async def _relay_error(
        self, context: grpc.aio.ServicerContext, exc: grpc.aio.AioRpcError, pin: Pin
    ) -> NoReturn:
        code, details = exc.code(), exc.details()
        if errors.is_transport_failure(code, details):
            await _abort(
                context, DriverUnreachable(f"driver {pin.driver} (pool {pin.pool}): {details}")
            )
        await _end(context, code, details or "", tuple(exc.trailing_metadata() or ()))


def _cut_off(pin: Pin) -> DriverUnreachable:
    """What a call cut off its driver gets: UNAVAILABLE, which clients retry at once."""
    return DriverUnreachable(
        f"driver {pin.driver} (pool {pin.pool}) was marked down by health probes while "
        "this call ran; retry: the session moves to a live driver"
    )


def _first_for(info: RequestInfo, pin: Pin, first: bytes) -> bytes:
    """The first request as the driver must see it: observed id cut (moved), session id the
    driver's (Pin.upstream_id), user rewritten."""
    body = first if pin.server_side_id is None else info.without_observed(first)
    if pin.upstream_id is not None:
        body = protocol.to_upstream(body, pin.upstream_id)
    user = info.rewrite_user
    return body if user is None else protocol.with_user(body, user)


def _for_client(method: Method, pin: Pin, response: bytes) -> bytes:
    """A response as the client of a moved session must see it (protocol.for_client)."""
    if pin.server_side_id is None and pin.upstream_id is None:
        return response
    own = None if pin.upstream_id is None else pin.session_id
    return protocol.for_client(method, pin.server_side_id, response, own)


def _as_user(info: RequestInfo, request: bytes) -> bytes:
    """A request as its authenticated user sends it (what the journal keeps)."""
    user = info.rewrite_user
    return request if user is None else protocol.with_user(request, user)


async def _relay_metadata(context: grpc.aio.ServicerContext, call: Any) -> None:
    """After a single response: relay the driver's initial and trailing metadata."""
    initial = await call.initial_metadata()
    if initial:
        await _send_initial(context, initial)
    trailing = await call.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(tuple(trailing))


async def _send_initial(context: grpc.aio.ServicerContext, initial: Metadata) -> None:
    """Relay the driver's initial metadata (less what a proxy must not pass on)."""
    forwarded = forwardable(initial)
    if forwarded:
        await context.send_initial_metadata(tuple(forwarded))


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    """The upstream deadline: what is left of the client's, or none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE else max(remaining, 0.0)


async def _end(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str, trailers: Any = ()
) -> NoReturn:
    """End a call with a status (context.abort raises to unwind the handler)."""
    await context.abort(code, details, trailers)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End a call with the status errors.to_status gives for `exc`, and its trailers
    (RouterError.trailers: a quota's retry-after)."""
    trailers = exc.trailers() if isinstance(exc, RouterError) else ()
    await _end(context, *errors.to_status(exc), trailers)
