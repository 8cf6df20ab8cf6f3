"""User-space instructions per call and per MB, counted by callgrind: repeatable where time is not.

``python -m loadtest.instructions [--calls 400] [--streams 8] [--before DIR]`` starts two fake
drivers and a load generator (``loadtest.bench_client``) natively, then for each proxy — the
router (1 worker, memory://), the bare grpc.aio passthrough, and the router of another checkout
``--before DIR`` (e.g. ``git worktree add /tmp/before HEAD~1``) — starts it under
``valgrind --tool=callgrind --instr-atstart=no``, warms it up (every session placed, channels
up), switches counting on, sends exactly ``--calls`` unary calls (Config, AnalyzePlan,
ReleaseExecute in turn) or ``--streams`` ExecutePlan streams of 100 x 160 kB, switches counting
off and reads the total. It prints instructions per unary call and per streamed MB, and the
ratios to the passthrough.

Why: on a shared 2-core machine the benchmark's CPU-time ratios (loadtest/bench.py) swing by
±15 % from run to run; instruction counts of one binary on one input do not. They leave out
the kernel (syscalls, TCP), which the router and the passthrough pay alike per message, and
so they measure the Python and gRPC work that the router's code decides. Background work is
kept out of the window (probes every 600 s, membership every 60 s, TTL batches hourly).

Needs valgrind (``apt-get install valgrind``); each proxy takes 1-3 minutes under it.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from loadtest.procs import wait_for

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
_QUIET = {
    "OTEL_TRACES_EXPORTER": "none",
    "SPARK_ROUTER_PROBE_INTERVAL_SECONDS": "600",
    "SPARK_ROUTER_MEMBERSHIP_POLL_SECONDS": "60",
    "SPARK_ROUTER_PIN_TOUCH_INTERVAL_SECONDS": "3600",
}
_SESSIONS = 64
_STARTUP_SECONDS = 600.0  # an interpreter importing pyspark under valgrind is slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Run:
    """The processes of one measurement; all killed on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(
        self, args: Sequence[str], cwd: Path, *, pipe: bool = False, callgrind: str | None = None
    ) -> subprocess.Popen[str]:
        cmd = [sys.executable, *args]
        if callgrind is not None:
            cmd = [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={callgrind}",
                *cmd,
            ]
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **_QUIET},
            stdin=subprocess.PIPE if pipe else None,
            stdout=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=30)


def _ask(client: subprocess.Popen[str], command: dict[str, Any]) -> dict[str, Any]:
    stdin: IO[str] | None = client.stdin
    stdout: IO[str] | None = client.stdout
    assert stdin is not None and stdout is not None
    stdin.write(json.dumps(command) + "\n")
    stdin.flush()
    answer: dict[str, Any] = json.loads(stdout.readline())
    return answer


def _load(
    client: subprocess.Popen[str], target: str, sessions: list[str], op: str, count: int
) -> dict[str, Any]:
    """Exactly `count` calls (or streams), closed loop; the client's answer."""
    loops = 8 if op == "unary" else 2
    now = time.monotonic()
    return _ask(
        client,
        {
            "op": op,
            "targets": [target],
            "sessions": sessions,
            "concurrency": loops,
            "channels": 4,
            "header": False,
            "start": now,
            "end": now + 3600,
            "calls": max(1, count // loops),
            "keep_latencies": False,
            "batches": 100,
            "batch_bytes": 160_000,
        },
    )


def _collected(out: str) -> int:
    """The instructions a callgrind dump counted."""
    total = 0
    for path in glob.glob(out + "*"):
        for line in Path(path).read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def _dumped(out: str) -> bool:
    return _collected(out) > 0


def measure(
    name: str,
    cwd: Path,
    drivers: list[str],
    counts: tuple[int, int],
    run: _Run,
    client: subprocess.Popen[str],
) -> dict[str, float]:
    """Instructions per unary call and per MB of one proxy (`cwd`: which checkout's code)."""
    calls, streams = counts
    port = _free_port()
    result: dict[str, float] = {}
    for op, count in (("unary", calls), ("stream", streams)):
        out = f"/tmp/spark-router-callgrind.{os.getpid()}.{name}.{op}"
        for stale in glob.glob(out + "*"):
            os.remove(stale)
        if name == "passthrough":
            args = ["-m", "loadtest.passthrough", "--upstream", drivers[0]]
        else:
            args = ["-m", "router.cli", "serve", "--driver", drivers[0], "--driver", drivers[1]]
            args += ["--admin-listen", "off", "--log-level", "warning"]
        proxy = run.spawn([*args, "--listen", f"127.0.0.1:{port}"], cwd, callgrind=out)
        try:
            wait_for(lambda: _accepts(port), _STARTUP_SECONDS, f"{name} to listen")
            sessions = [str(uuid.uuid4()) for _ in range(_SESSIONS)]
            _load(client, f"127.0.0.1:{port}", sessions, op, _SESSIONS)  # warm-up
            subprocess.run(
                ["callgrind_control", "-i", "on", str(proxy.pid)], check=True, capture_output=True
            )
            answer = _load(client, f"127.0.0.1:{port}", sessions, op, count)
            subprocess.run(
                ["callgrind_control", "-i", "off", str(proxy.pid)], check=True, capture_output=True
            )
            subprocess.run(
                ["callgrind_control", "-d", str(proxy.pid)], check=True, capture_output=True
            )
            wait_for(functools.partial(_dumped, out), 60, f"{name}'s callgrind dump")
            if answer.get("errors"):
                raise SystemExit(f"{name}: {answer['errors']} errors: {answer.get('error_sample')}")
            if op == "unary":
                result["per_call"] = _collected(out) / answer["calls"]
            else:
                result["per_mb"] = _collected(out) / (answer["bytes"] / 1e6)
        finally:
            proxy.kill()
            proxy.wait(timeout=30)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print instructions per call and per MB, with ratios to the passthrough."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.instructions")
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--before", type=Path, help="another checkout whose router to count too")
    args = parser.parse_args(argv)
    run = _Run()
    try:
        ports = [_free_port(), _free_port()]
        for port in ports:
            run.spawn(["-m", "loadtest.fake_driver", "--listen", f"127.0.0.1:{port}"], ROOT)
        wait_for(lambda: all(_accepts(p) for p in ports), 30, "the fake drivers to listen")
        drivers = [f"127.0.0.1:{p}" for p in ports]
        client = run.spawn(["-m", "loadtest.bench_client"], ROOT, pipe=True)
        assert client.stdout is not None
        client.stdout.readline()  # {"ready": pid}
        proxies: list[tuple[str, Path]] = [("passthrough", ROOT), ("router", ROOT)]
        if args.before is not None:
            proxies.append(("router-before", args.before.resolve()))
        results = {}
        for name, cwd in proxies:
            counts = (args.calls, args.streams)
            results[name] = measure(name, cwd, drivers, counts, run, client)
            r = results[name]
            print(f"{name:14s} {r['per_call']:>12,.0f} instructions/call {r['per_mb']:>14,.0f} /MB")
        base = results["passthrough"]
        for name, r in results.items():
            if name != "passthrough":
                print(
                    f"{name} ÷ passthrough: {r['per_call'] / base['per_call']:.3f} per call, "
                    f"{r['per_mb'] / base['per_mb']:.3f} per MB"
                )
    finally:
        run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
