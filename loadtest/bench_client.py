"""The benchmark's load generator: one process, driven by JSON lines on stdin.

``python -m loadtest.bench_client`` reads one command per line and answers one JSON line per
command on stdout. It lives for the whole benchmark (no start-up cost per measurement) and is
a separate process from the benchmark's orchestrator and from every proxy, so its CPU is its
own and measurable. Calls are gRPC generic calls with pre-serialized request bytes and raw
response bytes (grpc.aio): the client pays for gRPC, never for protobuf.

Commands (all times are ``time.monotonic()`` values, shared by every process on Linux):

``{"op": "unary", "targets": [...], "sessions": [...], "concurrency": N, "channels": C,
"header": bool, "start": T0, "end": T1, "calls": K | null, "keep_latencies": bool}``
    Closed-loop unary calls (Config, AnalyzePlan, ReleaseExecute in rotation), ``N`` in flight
    over ``C`` channels (each its own TCP connection). Calls begin at once (warm-up); only calls
    that *complete* in ``[T0, T1]`` count. With ``calls`` set, each loop stops after that many
    counted calls instead (latency runs), and ``end`` is only a hard bound.
``{"op": "stream", ..., "batches": B, "batch_bytes": S}``
    The same for ExecutePlan streams: each counted stream is read to its end; bytes are counted
    as they arrive inside the window. Each stream is followed by its ReleaseExecute, as pyspark
    does (the release is not counted as a call).
``{"op": "quit"}``
    Exit.

A session goes to ``targets[crc32(session) % len(targets)]``: one target for a proxy, every
driver for "direct" (perfect client-side routing). The answer carries calls, errors (with a
sample message), bytes, the latency percentiles (and every latency when asked) and the CPU
seconds this process used inside the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from loadtest.spark_calls import (
    EXECUTE,
    RELEASE_EXECUTE,
    SessionCalls,
    driver_for,
    stream_metadata,
)

__all__ = ["main", "percentile"]

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    # A channel of its own per connection: without this, channels to one target share one
    # subchannel (one TCP connection), and SO_REUSEPORT could never spread them over workers.
    ("grpc.use_local_subchannel_pool", 1),
]
_CALL_TIMEOUT = 30.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest-rank; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


@dataclass
class _Tally:
    calls: int = 0
    errors: int = 0
    bytes: int = 0
    error_sample: str = ""
    latencies_us: list[float] = field(default_factory=list)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _run(command: dict[str, Any]) -> dict[str, Any]:
    op = command["op"]
    targets: list[str] = list(command["targets"])
    sessions = [SessionCalls(s) for s in command["sessions"]]
    concurrency = int(command["concurrency"])
    channel_count = max(1, int(command.get("channels", 1)))
    header = bool(command.get("header", False))
    # Metadata every call carries (credentials of the auth variants).
    extra: tuple[tuple[str, str], ...] = tuple(
        (str(k), str(v)) for k, v in command.get("metadata", ())
    )
    start, end = float(command["start"]), float(command["end"])
    per_loop_calls = command.get("calls")
    keep = bool(command.get("keep_latencies", False))
    stream_md = stream_metadata(int(command.get("batches", 1)), int(command.get("batch_bytes", 1)))

    # channels[target] = C channels; loop i uses channel i % C of its session's target.
    channels = {
        t: [grpc.aio.insecure_channel(t, options=_CHANNEL_OPTIONS) for _ in range(channel_count)]
        for t in targets
    }
    tally = _Tally()
    try:
        # Connect every channel before the clock starts.
        await asyncio.wait_for(
            asyncio.gather(*(c.channel_ready() for cs in channels.values() for c in cs)),
            timeout=max(5.0, start - time.monotonic()),
        )

        def channel_for(loop: int, session: SessionCalls) -> grpc.aio.Channel:
            chans = channels[driver_for(session.session_id, targets)]
            return chans[loop % len(chans)]

        async def unary_loop(loop: int) -> None:
            # Each loop walks its own slice of the sessions and the three unary methods.
            mine = sessions[loop % len(sessions) :: concurrency] or sessions
            plan = itertools.cycle(
                [(s, path, body) for s in mine for path, body in s.unary][loop % 3 :]
                + [(s, path, body) for s in mine for path, body in s.unary][: loop % 3]
            )
            callables: dict[tuple[int, str], Callable[..., Any]] = {}
            counted = 0
            while True:
                session, path, body = next(plan)
                key = (id(session), path)
                fn = callables.get(key)
                if fn is None:
                    fn = callables[key] = channel_for(loop, session).unary_unary(path)
                md = (session.header if header else ()) + extra or None
                t0 = time.perf_counter_ns()
                try:
                    response = await fn(body, metadata=md, timeout=_CALL_TIMEOUT)
                    failed: BaseException | None = None
                except grpc.aio.AioRpcError as exc:
                    failed, response = exc, b""
                t1 = time.perf_counter_ns()
                now = time.monotonic()
                if now > end:
                    return
                if now < start:
                    continue
                if failed is not None:
                    tally.errors += 1
                    tally.error_sample = tally.error_sample or f"{path}: {failed}"[:500]
                else:
                    tally.calls += 1
                    tally.bytes += len(response)
                    tally.latencies_us.append((t1 - t0) / 1000)
                counted += 1
                if per_loop_calls is not None and counted >= per_loop_calls:
                    return

        async def stream_loop(loop: int) -> None:
            mine = sessions[loop % len(sessions) :: concurrency] or sessions
            counted = 0
            for session in itertools.cycle(mine):
                channel = channel_for(loop, session)
                md = (stream_md + session.header if header else stream_md) + extra
                operation = str(uuid.uuid4())
                t0 = time.perf_counter_ns()
                call = channel.unary_stream(EXECUTE)(
                    session.execute(operation), metadata=md, timeout=_CALL_TIMEOUT
                )
                try:
                    async for message in call:
                        if start <= time.monotonic() <= end:
                            tally.bytes += len(message)
                    failed: BaseException | None = None
                except grpc.aio.AioRpcError as exc:
                    failed = exc
                t1 = time.perf_counter_ns()
                # Like pyspark: release the finished operation (the driver forgets it).
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await channel.unary_unary(RELEASE_EXECUTE)(
                        session.release_execute_for(operation),
                        metadata=(session.header if header else ()) + extra or None,
                        timeout=_CALL_TIMEOUT,
                    )
                now = time.monotonic()
                if now > end:
                    return
                if now < start:
                    continue
                if failed is not None:
                    tally.errors += 1
                    tally.error_sample = tally.error_sample or f"ExecutePlan: {failed}"[:500]
                else:
                    tally.calls += 1
                    tally.latencies_us.append((t1 - t0) / 1000)
                counted += 1
                if per_loop_calls is not None and counted >= per_loop_calls:
                    return

        loop_fn = unary_loop if op == "unary" else stream_loop
        tasks = [asyncio.ensure_future(loop_fn(i)) for i in range(concurrency)]
        await _sleep_until(start)
        cpu0 = _cpu_seconds()
        done, pending = await asyncio.wait(
            tasks, timeout=max(0.0, end - time.monotonic()) + _CALL_TIMEOUT
        )
        cpu1 = _cpu_seconds()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                tally.errors += 1
                tally.error_sample = tally.error_sample or repr(task.exception())[:500]
    finally:
        await asyncio.gather(*(c.close() for cs in channels.values() for c in cs))

    lat = sorted(tally.latencies_us)
    result: dict[str, Any] = {
        "calls": tally.calls,
        "errors": tally.errors,
        "error_sample": tally.error_sample,
        "bytes": tally.bytes,
        "cpu_s": cpu1 - cpu0,
        "p50_us": percentile(lat, 0.5),
        "p99_us": percentile(lat, 0.99),
    }
    if keep:
        result["latencies_us"] = lat
    return result


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    while True:
        line = await reader.readline()
        if not line:
            return  # the orchestrator went away
        command = json.loads(line)
        if command.get("op") == "quit":
            return
        try:
            result = await _run(command)
        except Exception as exc:
            result = {"calls": 0, "errors": 1, "error_sample": f"client failed: {exc!r}"[:500]}
        print(json.dumps(result), flush=True)


def main() -> int:
    """Serve commands from stdin until "quit" or end of input."""
    asyncio.run(_serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
