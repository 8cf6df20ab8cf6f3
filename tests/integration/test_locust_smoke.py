"""A short headless Locust run of RawCallsUser through the router in front of two fake drivers.

The router and the fake drivers run in this test's event loop; Locust runs as a real `locust`
process (its gevent monkey-patching must stay out of the test process) with a bounded run time,
in its own process group, killed in `finally` if it outlives its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from loadtest.fake_driver import FakeDriver
from router.server import Replica

ROOT = Path(__file__).resolve().parents[2]
RUN_SECONDS = 3
USERS = 10
LOCUST_TIMEOUT = 60.0
NAMES = {
    "Config",
    "AnalyzePlan",
    "ReleaseExecute",
    "ExecutePlan small",
    "ExecutePlan large",
    "ReleaseSession",
}


async def _run_locust(host: str, out: Path) -> tuple[int, str]:
    """Run Locust headless; (exit code, its output). Kills its process group on timeout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / "locustfile.py"),
        "RawCallsUser",
        "--headless",
        "--users",
        str(USERS),
        "--spawn-rate",
        str(USERS),
        "--run-time",
        f"{RUN_SECONDS}s",
        "--stop-timeout",
        "5",
        "--host",
        host,
        "--only-summary",
        "--json-file",
        str(out.with_suffix("")),
        "--raw-stream-batches",
        "20",
        "--raw-stream-batch-bytes",
        "65536",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), LOCUST_TIMEOUT)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, output.decode(errors="replace")


async def test_raw_calls_through_the_router_have_no_failures(
    router: Replica, drivers: list[FakeDriver], tmp_path: Path
) -> None:
    out = tmp_path / "stats.json"
    code, output = await _run_locust(f"127.0.0.1:{router.port}", out)
    assert code == 0, output[-5000:]

    stats = {entry["name"]: entry for entry in json.loads(out.read_text())}
    total = sum(entry["num_requests"] for entry in stats.values())
    failures = sum(entry["num_failures"] for entry in stats.values())
    assert total >= 100, f"only {total} calls in {RUN_SECONDS} s:\n{output[-3000:]}"
    assert failures / total == 0.0, output[-5000:]
    assert set(stats) >= NAMES, f"missing workloads: {NAMES - set(stats)}"
    assert all(stats[name]["num_requests"] > 0 for name in NAMES)
    # Streams report their bytes: 20 messages of 64 KiB each per large ExecutePlan.
    large = stats["ExecutePlan large"]
    assert large["total_content_length"] >= large["num_requests"] * 20 * 65536

    # Every call Locust counted reached a driver through the router (the router's own
    # health probes aside); a call cut short by the end of the run may reach it uncounted.
    seen = sum(1 for d in drivers for c in d.calls if c.user_id == "loadtest")
    assert total <= seen <= total + USERS, (total, seen)
    assert all(any(c.user_id == "loadtest" for c in d.calls) for d in drivers), "both drivers"
