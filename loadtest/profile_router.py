"""Profile the router's hot path with py-spy under the benchmark's unary and streaming loads.

``python -m loadtest.profile_router [--seconds 15] [--out DIR]`` starts two fake drivers, a
one-worker router (memory://) and a load generator, exactly as ``loadtest.bench`` does, then
for each workload (``throughput``: 32 unary calls in flight; ``stream``: ExecutePlan streams of
500 x 160 kB) samples the router with ``py-spy record --format raw`` (collapsed stacks, native
frames off, idle frames dropped) while the load runs, and prints the functions with the most
samples: *self* (the frame on top of the stack) and *inclusive* (anywhere on the stack). The raw
files are kept in ``--out`` for flame graphs (``flamegraph.pl``, speedscope.app).

Needs ``py-spy`` (``pip install py-spy``) and permission to ptrace the router (root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from loadtest.bench import (
    VARIANTS,
    Services,
    Workload,
    measure,
    start_services,
    warm_up,
)

__all__ = ["main", "summarize"]


_CATEGORIES = (
    ("the router's own code (self)", lambda top, stack: _ours(top)),
    ("gRPC poller thread (C core)", lambda top, stack: "Thread.run (threading.py" in stack),
    ("gRPC Cython callbacks on the event loop", lambda top, stack: top.startswith("Handle._run")),
    ("grpc.aio Python (calls, reads)", lambda top, stack: "grpc/" in top),
    ("asyncio event loop", lambda top, stack: "asyncio/" in top or "selectors.py" in top),
)


def _ours(frame: str) -> bool:
    return "router/" in frame or "registry/" in frame


def _function(frame: str) -> str:
    """``fn (path/to/module.py:123)`` -> ``fn (module.py)``: samples add up per function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.10/", "python3.11/", "python3.12/", "python3.13/"):
        path = path.split(marker, 1)[-1]
    if "/router/" in path or "/registry/" in path or "/loadtest/" in path:
        path = "/".join(path.split("/")[-2:])
    return f"{name} ({path})" if where else frame


def summarize(raw: str, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Shares of samples from py-spy's raw (collapsed) output.

    ``categories``: where the time went (the frame on top of each stack, classified);
    ``self``: functions on top of the stack; ``router``: the router's own functions anywhere
    on the stack (inclusive, so what they call in grpc/asyncio counts too).
    """
    categories: collections.Counter[str] = collections.Counter()
    self_counts: collections.Counter[str] = collections.Counter()
    router_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread ", "Task-"))]
        if not frames:
            continue
        total += count
        top_frame = _function(frames[-1])
        self_counts[top_frame] += count
        for frame in {_function(f) for f in frames if _ours(f)}:
            router_counts[frame] += count
        for name, test in _CATEGORIES:
            if test(frames[-1], stack):
                categories[name] += count
                break
        else:
            categories["other"] += count
    if not total:
        return {"categories": [], "self": [], "router": []}
    # Entry points (cli, server) are on every stack of the loop: not informative.
    skip = {f for f, c in router_counts.items() if c >= 0.5 * total}
    return {
        "categories": [(f, c / total) for f, c in categories.most_common()],
        "self": [(f, c / total) for f, c in self_counts.most_common(top)],
        "router": [
            (f, c / total) for f, c in router_counts.most_common(top + len(skip)) if f not in skip
        ][:top],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run both profiles and print their top frames."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.profile_router")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=None, help="keep the raw profiles here")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    console = Console()
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        console.print("py-spy not found: pip install py-spy")
        return 1
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="router-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="router-profile-run-"))
    services = Services(work)
    router = next(v for v in VARIANTS if v.name == "router")
    runs = [
        Workload("throughput", "unary", 32, 2, 8, 256, args.seconds, 1.0),
        Workload("stream", "stream", 2, 1, 2, 8, args.seconds, 1.0),
    ]
    try:
        start_services(services, [router], 2, Path(tempfile.gettempdir()), console, print)
        warm_up(services, [router], runs)
        pid = services.proxies["router"].pid
        for workload in runs:
            raw = out / f"router-{workload.name}.txt"
            spy = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--rate",
                    str(args.rate),
                    "--duration",
                    str(int(args.seconds)),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                sample = measure(services, router, workload, 0)
            finally:
                try:
                    _, err = spy.communicate(timeout=args.seconds + 30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    _, err = spy.communicate()
            if spy.returncode != 0 or not raw.exists():
                console.print(f"py-spy failed ({spy.returncode}): {err[-2000:]}")
                return 1
            shares = summarize(raw.read_text(), args.top)
            rate = (
                f"{sample.calls_per_s:,.0f} calls/s"
                if workload.op == "unary"
                else f"{sample.mb_per_s:,.0f} MB/s"
            )
            cpu = (sample.proxy_cpu_s or 0.0) / sample.seconds
            console.print(
                f"\n[bold]{workload.name}[/bold]: {rate}, router {cpu:.2f} cores (under py-spy)"
            )
            for title, key in (
                ("where the samples were (top of stack)", "categories"),
                ("functions on top of the stack (self)", "self"),
                ("the router's functions (inclusive)", "router"),
            ):
                console.print(f"  [bold]{title}[/bold]")
                for frame, share in shares[key]:
                    console.print(f"  {share:6.1%}  {frame}")
            console.print(f"  raw profile: {raw}")
    finally:
        services.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
