"""Helpers shared by the test suites: free ports, bounded waits, subprocess servers."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    """Poll `cond` until true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def read_line_matching(
    proc: subprocess.Popen[str], needle: str, timeout: float, seen: list[str] | None = None
) -> str:
    """Read the process's stdout until a line containing `needle`; fail after `timeout`."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    lines = seen if seen is not None else []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if needle in line:
                return line
        elif proc.poll() is not None:
            break
    raise AssertionError(
        f"no line with {needle!r} after {timeout}s (exit {proc.poll()}); output:\n" + "".join(lines)
    )


def spawn(args: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
    """Start a Python module or console command of this project as a subprocess."""
    env = dict(os.environ)
    env.update(kwargs.pop("env", {}) or {})  # type: ignore[arg-type]
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,  # type: ignore[call-overload]
    )


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


def close_pipes(proc: subprocess.Popen[str]) -> None:
    """Close a subprocess's pipes (unclosed files are warnings, and warnings are errors)."""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
