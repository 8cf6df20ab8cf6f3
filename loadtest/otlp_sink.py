"""A tiny OTLP/gRPC trace sink: accepts every export, keeps nothing, counts requests and bytes.

The benchmark points a "tracing on" router at it (``OTEL_TRACES_EXPORTER=otlp``,
``OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT``, ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``),
so the router pays for building and exporting spans without a real collector on the machine.
Any unary method is answered with an empty message, which is a valid (empty)
``ExportTraceServiceResponse`` (also for metrics and logs).

``python -m loadtest.otlp_sink --listen 127.0.0.1:0`` prints
``otlp sink listening on HOST:PORT``; on SIGTERM / SIGINT it prints the counts and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from common.lifecycle import Signals

__all__ = ["Sink", "main"]


class Sink(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """Answers every unary call with an empty message; counts calls and request bytes."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        """The same handler for every method."""
        return grpc.unary_unary_rpc_method_handler(self._export)

    async def _export(self, request: bytes, context: Any) -> bytes:
        self.requests += 1
        self.bytes += len(request)
        return b""


async def _serve(host: str, port: int) -> None:
    sink = Sink()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    server.add_generic_rpc_handlers((sink,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"otlp sink listening on {host}:{bound}", flush=True)
    try:
        async with Signals() as signals:
            await signals.stopping.wait()
    finally:
        await server.stop(0.5)
        print(f"otlp sink: {sink.requests} exports, {sink.bytes} bytes", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sink until SIGTERM / SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.otlp_sink")
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = str(args.listen).rpartition(":")
    asyncio.run(_serve(host or "127.0.0.1", int(port or 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
