"""Child processes that cannot outlive their parent, and what /proc says about processes.

Invariants
----------
* **A child dies with its parent.** `child_setup` is a `preexec_fn` that sets
  `prctl(PR_SET_PDEATHSIG, SIGKILL)` in the child before exec (Linux only; elsewhere it is
  None and nothing is set), and kills the child at once if the parent is already gone. The flag
  survives exec, so the kernel SIGKILLs the program even when the parent is SIGKILLed. libc's
  prctl is resolved once in the parent: nothing is loaded between fork and exec.
* **Forked from a thread that lives as long as the process.** PDEATHSIG fires when the *thread*
  that forked the child ends, not the process. `spawn` therefore forks every child from one
  long-lived daemon thread, never from the caller's thread, which may be short-lived (a worker
  thread, `asyncio.to_thread`). The thread is started again after a fork.
* **One /proc reader.** Every reading comes from `read_stat`, which parses
  `/proc/<pid>/stat` after the *last* `)` (a command name may hold spaces and parentheses).
  A process that is gone, or a system without /proc, reads as None (or as no processes):
  callers treat "cannot tell" as "not there". A `Proc` remembers its start time, so a pid
  reused by another process is never taken for the one seen before.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = [
    "CLOCK_TICKS",
    "Proc",
    "alive",
    "child_setup",
    "descendants",
    "die_with_parent",
    "read_stat",
    "related",
    "signal_group",
    "spawn",
    "wait_gone",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

_T = TypeVar("_T")
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- dying with the parent


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved in the parent (never dlopen between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _load_prctl()


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; else nothing)."""
    setup = child_setup(os.getppid())
    if setup is not None:
        setup()


def child_setup(parent_pid: int) -> Callable[[], None] | None:
    """preexec_fn: die with SIGKILL when the parent goes away (Linux)."""
    prctl = _PRCTL
    if prctl is None:
        return None
    args = (
        ctypes.c_int(_PR_SET_PDEATHSIG),
        ctypes.c_ulong(signal.SIGKILL),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )

    def setup() -> None:
        prctl(*args)
        if os.getppid() != parent_pid:  # parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


class _Spawner:
    """Forks children from one long-lived daemon thread.

    PR_SET_PDEATHSIG fires when the forking *thread* exits, so forking from a caller's thread
    that later ends (a worker thread, `asyncio.to_thread`) would kill the child. A daemon
    thread lives until the process exits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], _T]) -> _T:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._run, args=(self._queue,), name="spark-router-spawner", daemon=True
                )
                self._thread.start()
            future: Future[_T] = Future()
            self._queue.put((fn, future))
        return future.result()

    @staticmethod
    def _run(jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
        while True:
            fn, future = jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


_SPAWNER = _Spawner()


def spawn(
    args: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Popen in a new session with PDEATHSIG=SIGKILL, forked from the long-lived spawner thread."""

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(args),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            start_new_session=True,
            preexec_fn=child_setup(os.getpid()),
            close_fds=True,
        )

    return _SPAWNER.call(start)


# --------------------------------------------------------------------------- /proc readings


@dataclass(frozen=True)
class Proc:
    """One process as its /proc/<pid>/stat read at one moment."""

    pid: int
    state: str  # "R", "S", ...; "Z" (zombie) and "X" (dead) hold nothing but a pid
    ppid: int
    pgid: int
    cpu_ticks: int  # utime + stime of all its threads, in CLOCK_TICKS
    start_time: str  # field 22: tells a reused pid apart

    @property
    def live(self) -> bool:
        """Whether it still runs (not a zombie, not dead)."""
        return self.state not in ("Z", "X")

    @property
    def cpu_seconds(self) -> float:
        """CPU time used so far (user + system, all threads), in seconds."""
        return self.cpu_ticks / CLOCK_TICKS


def read_stat(pid: int) -> Proc | None:
    """The process `pid` from /proc/<pid>/stat; None if it is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # Fields after the name, 0-based: state=0, ppid=1, pgrp=2, utime=11, stime=12, starttime=19.
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20:
        return None
    return Proc(
        pid=pid,
        state=fields[0],
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        cpu_ticks=int(fields[11]) + int(fields[12]),
        start_time=fields[19],
    )


def _live_table() -> dict[int, Proc]:
    """Every live process by pid; empty without /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    table: dict[int, Proc] = {}
    for name in names:
        if name.isdigit():
            proc = read_stat(int(name))
            if proc is not None and proc.live:
                table[proc.pid] = proc
    return table


def _descendant_pids(table: Mapping[int, Proc], pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found: set[int] = set()
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.add(child)
        todo.extend(children.get(child, []))
    return found


def descendants(pid: int) -> list[Proc]:
    """Live descendants of pid (children, grandchildren, ...), zombies excluded, by pid."""
    table = _live_table()
    return [table[child] for child in sorted(_descendant_pids(table, pid))]


def related(pid: int, pgid: int) -> list[Proc]:
    """Live descendants of pid (whatever their group) and members of group pgid, by pid."""
    table = _live_table()
    found = {proc.pid for proc in table.values() if proc.pgid == pgid and proc.pid != pid}
    found |= _descendant_pids(table, pid)
    return [table[child] for child in sorted(found)]


def alive(proc: Proc) -> bool:
    """True if the same process (not a reused pid) still runs and is not a zombie."""
    now = read_stat(proc.pid)
    return now is not None and now.start_time == proc.start_time and now.live


def wait_gone(procs: Sequence[Proc], timeout: float) -> list[Proc]:
    """Wait up to timeout for procs to end; returns those still alive."""
    deadline = time.monotonic() + timeout
    left = [proc for proc in procs if alive(proc)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [proc for proc in left if alive(proc)]
    return left


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """killpg, ignoring an empty group; True if the group existed."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
