"""Helpers shared by the test suites: free ports, bounded waits, subprocess servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import psutil

from registry.base import Registry
from registry.models import Event

ROOT = Path(__file__).resolve().parents[1]

# The audit.py docstring's event reference: each event's fields, besides time, event, replica.
AUDIT_FIELDS: dict[str, set[str]] = {
    "session.created": {"user", "groups", "session", "pool", "driver", "conf"},
    "session.released": {"user", "session", "pool", "driver"},
    "session.moved": {"user", "session", "pool", "from_driver", "driver", "reason"},
    "session.expired": {"user", "session", "pool", "driver", "reason"},
    "execution": {
        "user",
        "groups",
        "session",
        "operation",
        "pool",
        "driver",
        "plan",
        "sql",
        "sql_sha256",
        "status",
        "duration_ms",
        "rows",
        "bytes",
    },
    "denied": {
        "kind",
        "reason",
        "message",
        "status",
        "method",
        "user",
        "groups",
        "session",
        "pool",
        "peer",
    },
    "admin": {"admin", "groups", "action", "target", "result", "params"},
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition", every: float = 0.02
) -> None:
    """Poll `cond` until true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def read_line_matching(
    proc: subprocess.Popen[str], needle: str, timeout: float, seen: list[str] | None = None
) -> str:
    """Read the process's stdout until a line containing `needle`; fail after `timeout`.

    Reads the raw file descriptor: a buffered readline() may pull several lines into
    Python's buffer, after which select() on the descriptor would wait for nothing.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    lines = seen if seen is not None else []
    pending = _pending.pop(fd, b"")
    try:
        while True:
            while b"\n" in pending:
                raw, pending = pending.split(b"\n", 1)
                line = raw.decode("utf-8", "replace") + "\n"
                lines.append(line)
                if needle in line:
                    return line
            if time.monotonic() > deadline:
                break
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                pending += chunk
            elif proc.poll() is not None:
                break
    finally:
        _pending[fd] = pending
    raise AssertionError(
        f"no line with {needle!r} after {timeout}s (exit {proc.poll()}); stdout:\n"
        + "".join(lines)
        + stderr_of(proc)
    )


# Bytes read past the matched line, per stdout descriptor, for the next read_line_matching.
_pending: dict[int, bytes] = {}


def spawn(
    args: Sequence[str], env: dict[str, str] | None = None, capture_stderr: bool = False
) -> subprocess.Popen[str]:
    """Start a Python module of this project as a subprocess in its own process group.

    stderr goes to a temporary file (a pipe nobody reads could fill and block a long-lived
    server) unless `capture_stderr` asks for a pipe, for short runs read with communicate().
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    err: int | IO[bytes] = subprocess.PIPE
    if not capture_stderr:
        err = tempfile.NamedTemporaryFile(prefix="spawn-stderr-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        start_new_session=True,
    )
    if not isinstance(err, int):
        _stderr_files[proc.pid] = Path(err.name)
        err.close()
    return proc


_stderr_files: dict[int, Path] = {}


def listening(port: int, proc: subprocess.Popen[str] | None = None) -> bool:
    """Whether 127.0.0.1:`port` accepts connections (or `proc`, meant to serve it, exited)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return True
    return proc is not None and proc.poll() is not None


def serve_router(
    drivers: Sequence[str], *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """`spark-router serve` on a free loopback port in front of `drivers`, once it listens."""
    port = free_port()
    args = ["-m", "router.cli", "serve", "--listen", f"127.0.0.1:{port}", *extra]
    for address in drivers:
        args += ["--driver", address]
    proc = spawn(args, env=env)
    wait_until(lambda: listening(port, proc), 30, f"the router on {port} to listen")
    assert proc.poll() is None, stderr_of(proc)
    return proc, port


def stderr_text(proc: subprocess.Popen[str]) -> str:
    """Everything a spawned process wrote to stderr so far."""
    path = _stderr_files.get(proc.pid)
    if path is None or not path.exists():
        return ""
    return path.read_text(errors="replace")


def stderr_of(proc: subprocess.Popen[str]) -> str:
    """The end of a spawned process's stderr, for failure messages."""
    text = stderr_text(proc)
    return "\nstderr:\n" + text[-5000:] if text else ""


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    """Signal a subprocess and wait for it; kill its group if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise
        finally:
            close_pipes(proc)
    close_pipes(proc)
    return proc.returncode


def alive(proc: psutil.Process) -> bool:
    """Whether a process still runs (a zombie waiting to be reaped does not)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def gone(pid: int) -> bool:
    """True if pid no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def close_pipes(proc: subprocess.Popen[str]) -> None:
    """Close a subprocess's pipes (unclosed files are warnings, and warnings are errors)."""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            if pipe is proc.stdout and not pipe.closed:
                _pending.pop(pipe.fileno(), None)
            pipe.close()
    path = _stderr_files.pop(proc.pid, None)
    if path is not None:
        path.unlink(missing_ok=True)


async def eventually(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `cond` from async code until true; AssertionError naming `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def until_notified(
    event: asyncio.Event,
    cond: Callable[[], bool],
    timeout: float,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Re-check `cond` each time `event` is set; AssertionError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        event.clear()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"condition still false after {timeout}s{describe()}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), remaining)


class Listener:
    """Collects the events of one registry events() iterator in a task."""

    def __init__(self, registry: Registry, wait: float = 5.0) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.wait = wait
        self.task = asyncio.create_task(self._run(registry))

    async def _run(self, registry: Registry) -> None:
        async for event in registry.events():
            self.queue.put_nowait(event)

    async def next(self, timeout: float | None = None) -> Event:
        """The next event, or a failure after `timeout` seconds."""
        return await asyncio.wait_for(self.queue.get(), timeout or self.wait)

    async def stop(self) -> None:
        """Cancel the task (if still running) and wait for it."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def reap(procs: Sequence[subprocess.Popen[bytes]], directory: Path, timeout: float = 10.0) -> None:
    """Kill what is left of a test server's processes (their groups) and delete its directory."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    shutil.rmtree(directory, ignore_errors=True)
