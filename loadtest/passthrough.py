"""The floor of a grpc.aio proxy: raw bytes to one upstream, nothing else.

The benchmark runs it as the "passthrough" variant, to separate what the router's own logic
costs (identify, place, journal, telemetry) from what forwarding a call through grpc.aio costs
at all. It does what the router does on its hot path and no more: every unary call and every
unary-stream call (ExecutePlan, ReattachExecute) is replayed on one channel to ``--upstream`` with
the same bytes, metadata (less the connection headers), deadline and cancellation; errors come
back with their code and details.

``python -m loadtest.passthrough --listen 127.0.0.1:0 --upstream 127.0.0.1:15002`` prints
``passthrough listening on HOST:PORT`` and stops on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

import grpc
import grpc.aio

from common.lifecycle import Signals

__all__ = ["Passthrough", "main"]

_STREAMS = ("/ExecutePlan", "/ReattachExecute")
_DROP = frozenset({"user-agent", "content-type", "te", "host"})
_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


def _forward(context: Any) -> tuple[list[tuple[str, Any]], float | None]:
    metadata = [
        (k, v)
        for k, v in context.invocation_metadata() or ()
        if k not in _DROP and not k.startswith((":", "grpc-"))
    ]
    remaining = context.time_remaining()
    return metadata, None if remaining is None or remaining > 1e8 else max(remaining, 0.0)


class Passthrough(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """Forwards unary and unary-stream calls as raw bytes to one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        """A unary-stream handler for the two streaming methods, unary-unary for the rest."""
        path: str = handler_call_details.method
        if path.endswith(_STREAMS):
            return grpc.unary_stream_rpc_method_handler(partial(self._stream, path))
        return grpc.unary_unary_rpc_method_handler(partial(self._unary, path))

    async def _unary(self, path: str, request: bytes, context: Any) -> bytes:
        metadata, timeout = _forward(context)
        try:
            response: bytes = await self._channel.unary_unary(path)(
                request, metadata=metadata, timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        return response

    async def _stream(self, path: str, request: bytes, context: Any) -> AsyncIterator[bytes]:
        metadata, timeout = _forward(context)
        call = self._channel.unary_stream(path)(request, metadata=metadata, timeout=timeout)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        finally:
            call.cancel()


async def _serve(listen: str, upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream, options=_OPTIONS)
    server = grpc.aio.server(options=_OPTIONS)
    server.add_generic_rpc_handlers((Passthrough(channel),))
    host = listen.rsplit(":", 1)[0]
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"passthrough listening on {host}:{port}", flush=True)
    try:
        async with Signals() as signals:
            await signals.stopping.wait()
    finally:
        await server.stop(0.5)
        await channel.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM / SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.passthrough")
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.listen, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
