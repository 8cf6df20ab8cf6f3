"""Child processes for the benchmark: started so they cannot outlive it, measured from /proc.

* Every child gets ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` before exec, so the kernel kills it if
  the benchmark dies (even by SIGKILL). PDEATHSIG fires when the *thread* that forked the child
  ends, so children are forked from the main thread only (it lives as long as the process).
* Children run in a process group of their own (except where ``new_session=False``, for
  Envoy, which was seen to get SIGTERM when started under setsid); :meth:`Child.stop` signals
  the whole group, waits, and SIGKILLs the group and any descendant left over.
* A :class:`Reaper` covers what PDEATHSIG cannot: grandchildren that are not set up to die
  with their parent (the router's ``--workers`` processes, say). It is a tiny process of its
  own, *without* PDEATHSIG, that holds the process groups of the children; when its stdin
  closes (the benchmark ended, however it ended) it SIGKILLs every group still registered.
* CPU time of a process tree is utime + stime (fields 14 and 15 of ``/proc/<pid>/stat``, all
  threads included) summed over the process and its live descendants, as read by
  :func:`common.procs.read_stat`, the one /proc reader.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from common.procs import CLOCK_TICKS, child_setup, read_stat
from common.procs import descendants as live_descendants

__all__ = [
    "CLOCK_TICKS",
    "Child",
    "Reaper",
    "cpu_seconds",
    "descendants",
    "spawn",
    "tree_cpu_seconds",
    "wait_for",
]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0.0 if it is gone."""
    proc = read_stat(pid)
    return 0.0 if proc is None else proc.cpu_seconds


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren, ...), zombies excluded."""
    return [proc.pid for proc in live_descendants(pid)]


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its live descendants."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in descendants(pid))


_REAPER = """
import os, signal, sys
groups = set()
for line in sys.stdin:
    line = line.strip()
    if line.startswith("+"):
        groups.add(int(line[1:]))
    elif line.startswith("-"):
        groups.discard(int(line[1:]))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


class Reaper:
    """Kills registered process groups when this process ends, even by SIGKILL.

    The reaper reads ``+PGID`` / ``-PGID`` lines; at end of input (our side closed, or we
    died) it SIGKILLs every group still registered. It runs in its own session, so a Ctrl-C
    in the terminal does not stop it before it has done its work.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _REAPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )

    def _say(self, line: str) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.closed:
            return
        with contextlib.suppress(OSError):
            stdin.write(line.encode())
            stdin.flush()

    def watch(self, pgid: int) -> None:
        """Kill group ``pgid`` if it still exists when we end."""
        self._say(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        """Group ``pgid`` is gone (its pid may be reused): leave it alone."""
        self._say(f"-{pgid}\n")

    def close(self, timeout: float = 10.0) -> None:
        """End input; the reaper kills what is left and exits."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout)


class Child:
    """One started process (and its process group); stop() leaves nothing behind."""

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        log: Path | None,
        reaper: Reaper | None = None,
    ) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.reaper = reaper
        self._own_group = False

    @property
    def pid(self) -> int:
        """The process id."""
        return int(self.proc.pid)

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the child's log (stdout and stderr), for error messages."""
        if self.log is None:
            return ""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the group), wait up to ``timeout``, then SIGKILL the group and leftovers."""
        leftovers = descendants(self.pid) if self.alive() else []
        if self.alive():
            self._signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        if self.alive():
            self._signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        for pid in leftovers:  # e.g. workers that left the group, or a fork that lingers
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self._own_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            if self.reaper is not None:
                self.reaper.forget(self.pid)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self._own_group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)


def spawn(
    name: str,
    args: Sequence[str],
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    new_session: bool = True,
    pipes: bool = False,
    reaper: Reaper | None = None,
) -> Child:
    """Start ``args`` so it dies with this process; output goes to ``log`` (or pipes).

    With ``pipes`` the child's stdin and stdout are pipes (stderr still goes to ``log``).
    A ``reaper`` kills the child's process group if we end without stopping it.
    Must be called from the main thread (see the module docstring).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("spawn() must run on the main thread (PR_SET_PDEATHSIG)")
    full_env = dict(os.environ)
    full_env.update(env or {})
    out: IO[bytes] | int = subprocess.DEVNULL
    handle: IO[bytes] | None = None
    if log is not None:
        handle = log.open("ab")
        out = handle
    try:
        proc = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=full_env,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else out,
            stderr=out,
            start_new_session=new_session,
            preexec_fn=child_setup(os.getpid()),
            close_fds=True,
        )
    finally:
        if handle is not None:
            handle.close()
    child = Child(name, proc, log, reaper if new_session else None)
    child._own_group = new_session
    if new_session and reaper is not None:
        reaper.watch(proc.pid)
    return child


def wait_for(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    """Poll ``cond`` until true; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
