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

import logging
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any, NoReturn

import grpc
import grpc.aio

from registry.models import Pin
from router import errors, protocol
from router.errors import BadRequest, DriverUnreachable
from router.placement import Placement
from router.protocol import Method, RequestInfo, Shape
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

    def __init__(self, placement: Placement, upstreams: Upstreams) -> None:
        self._placement = placement
        self._upstreams = upstreams
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
        if method.shape is Shape.UNARY_UNARY:
            return grpc.unary_unary_rpc_method_handler(partial(self._unary_unary, method))
        if method.shape is Shape.UNARY_STREAM:
            return grpc.unary_stream_rpc_method_handler(partial(self._unary_stream, method))
        if method.shape is Shape.STREAM_UNARY:
            return grpc.stream_unary_rpc_method_handler(partial(self._stream_unary, method))
        return grpc.stream_stream_rpc_method_handler(partial(self._stream_stream, method))

    # --- the four shapes ------------------------------------------------------------------

    async def _unary_unary(
        self, method: Method, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        info, pin, md, timeout = await self._route(method, request, context)
        call = self._upstreams.channel(pin.driver).unary_unary(method.path)(
            request, metadata=md, timeout=timeout
        )
        response = await self._relay_unary(context, call, pin)
        if method.name == "ReleaseSession":
            await self._placement.release(info.session_id)
        return response

    async def _unary_stream(
        self, method: Method, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        _, pin, md, timeout = await self._route(method, request, context)
        call = self._upstreams.channel(pin.driver).unary_stream(method.path)(
            request, metadata=md, timeout=timeout
        )
        async for response in self._relay_stream(context, call, pin):
            yield response

    async def _stream_unary(
        self,
        method: Method,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        first = await self._first_request(method, requests, context)
        _, pin, md, timeout = await self._route(method, first, context)
        call = self._upstreams.channel(pin.driver).stream_unary(method.path)(
            _chain(first, requests), metadata=md, timeout=timeout
        )
        return await self._relay_unary(context, call, pin)

    async def _stream_stream(
        self,
        method: Method,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        first = await self._first_request(method, requests, context)
        _, pin, md, timeout = await self._route(method, first, context)
        call = self._upstreams.channel(pin.driver).stream_stream(method.path)(
            _chain(first, requests), metadata=md, timeout=timeout
        )
        async for response in self._relay_stream(context, call, pin):
            yield response

    # --- shared steps -------------------------------------------------------------------

    async def _route(
        self, method: Method, first: bytes, context: grpc.aio.ServicerContext
    ) -> tuple[RequestInfo, Pin, list[tuple[str, str | bytes]], float | None]:
        """Identify and place a call: (info, pin, metadata to forward, upstream timeout)."""
        raw_md = context.invocation_metadata()
        try:
            info = protocol.identify(method, _as_dict(raw_md), first)
            pin = await self._placement.place(info.session_id, info.pool)
        except Exception as exc:
            await _abort(context, exc)
        remaining = context.time_remaining()
        timeout = None if remaining is None or remaining > _NO_DEADLINE else max(remaining, 0.0)
        return info, pin, forwardable(raw_md), timeout

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
        self, context: grpc.aio.ServicerContext, call: Any, pin: Pin
    ) -> AsyncIterator[bytes]:
        """Relay a response stream one message at a time, then its trailers."""
        try:
            await self._relay_initial(context, call)
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                yield response
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
