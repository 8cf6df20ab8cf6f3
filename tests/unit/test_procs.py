"""common.procs: the one /proc reader (this process, children, zombies, odd command names),
process trees and groups, and dying with the parent; loadtest.procs reads through it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import loadtest.procs as loadtest_procs
from common.procs import (
    CLOCK_TICKS,
    alive,
    descendants,
    read_stat,
    related,
    signal_group,
    spawn,
    wait_gone,
)
from tests.helpers import gone, wait_until

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")

# A child that forks one grandchild in its own group and one ("stray") in a group of its own,
# as spark-submit's JVM and pyspark's daemon do, then prints "grandchild stray".
FAMILY = textwrap.dedent(
    """
    import os, sys
    kid = os.fork()
    if kid == 0:
        os.execvp("sleep", ["sleep", "300"])
    stray = os.fork()
    if stray == 0:
        os.setpgid(0, 0)
        os.execvp("sleep", ["sleep", "300"])
    try:
        os.setpgid(stray, stray)
    except OSError:
        pass
    print(kid, stray, flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def family() -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """(child, grandchild, stray): the child leads a process group of its own."""
    child = subprocess.Popen(
        [sys.executable, "-c", FAMILY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert child.stdout is not None and child.stdin is not None
    kid, stray = (int(pid) for pid in child.stdout.readline().split())
    try:
        yield child, kid, stray
    finally:
        for pid in (kid, stray, child.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        child.wait()
        child.stdin.close()
        child.stdout.close()


def burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_read_stat_of_this_process() -> None:
    proc = read_stat(os.getpid())
    assert proc is not None
    assert proc.pid == os.getpid()
    assert proc.ppid == os.getppid()
    assert proc.pgid == os.getpgrp()
    assert proc.state == "R"  # it is reading its own stat
    assert proc.live
    # Field 22 counts clock ticks from boot: psutil derives the creation time from it too.
    started = psutil.boot_time() + int(proc.start_time) / CLOCK_TICKS
    assert abs(started - psutil.Process().create_time()) < 0.05


def test_cpu_seconds_match_psutil_and_grow() -> None:
    before = read_stat(os.getpid())
    assert before is not None
    burn_cpu(0.3)
    after = read_stat(os.getpid())
    assert after is not None
    times = psutil.Process().cpu_times()
    assert after.cpu_seconds - before.cpu_seconds >= 0.2
    assert abs(after.cpu_seconds - (times.user + times.system)) < 0.1
    assert after.cpu_seconds == after.cpu_ticks / CLOCK_TICKS
    assert loadtest_procs.CLOCK_TICKS == CLOCK_TICKS
    assert loadtest_procs.cpu_seconds(os.getpid()) >= after.cpu_seconds
    assert loadtest_procs.tree_cpu_seconds(os.getpid()) >= after.cpu_seconds


def test_gone_process_reads_as_nothing() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert read_stat(child.pid) is None
    assert loadtest_procs.cpu_seconds(child.pid) == 0.0
    assert descendants(child.pid) == []
    assert not signal_group(child.pid, signal.SIGTERM)  # no such group


def test_command_name_with_spaces_and_parentheses() -> None:
    script = "open('/proc/self/comm', 'w').write('a) b (c) d'); print(flush=True); input()"
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdout is not None and child.stdin is not None
    try:
        child.stdout.readline()
        with open(f"/proc/{child.pid}/comm") as f:
            assert f.read().strip() == "a) b (c) d"
        proc = read_stat(child.pid)
        assert proc is not None
        assert proc.ppid == os.getpid()
        assert proc.pgid == os.getpgrp()
        assert proc.state in ("S", "R")
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


def test_zombie_is_not_live() -> None:
    child = subprocess.Popen(["true"])
    try:
        wait_until(
            lambda: getattr(read_stat(child.pid), "state", "Z") == "Z", what="the child to exit"
        )
        zombie = read_stat(child.pid)
        assert zombie is not None and not zombie.live
        assert not alive(zombie)
        assert child.pid not in [proc.pid for proc in descendants(os.getpid())]
    finally:
        child.wait()


def test_tree_and_group(family: tuple[subprocess.Popen[bytes], int, int]) -> None:
    child, kid, stray = family
    assert [proc.pid for proc in descendants(child.pid)] == sorted([kid, stray])
    assert loadtest_procs.descendants(child.pid) == sorted([kid, stray])
    assert {kid, stray, child.pid} <= set(loadtest_procs.descendants(os.getpid()))
    stat = read_stat(stray)
    assert stat is not None and stat.pgid == stray and stat.ppid == child.pid
    # Group members whatever their parent, plus descendants whatever their group.
    assert [proc.pid for proc in related(child.pid, child.pid)] == sorted([kid, stray])
    assert [proc.pid for proc in related(os.getpid(), child.pid)] == sorted(
        [proc.pid for proc in descendants(os.getpid())]
    )


def test_signal_group_and_wait_gone(family: tuple[subprocess.Popen[bytes], int, int]) -> None:
    child, kid, stray = family
    procs = related(child.pid, child.pid)
    assert all(alive(proc) for proc in procs)
    assert signal_group(child.pid, signal.SIGKILL)
    child.wait()
    # The stray left the group: it alone outlives the group kill.
    assert [proc.pid for proc in wait_gone(procs, 2.0)] == [stray]
    assert signal_group(stray, signal.SIGKILL)
    assert wait_gone(procs, 5.0) == []
    assert gone(kid) and gone(stray)


def test_alive_tells_a_reused_pid_apart() -> None:
    me = read_stat(os.getpid())
    assert me is not None and alive(me)
    assert not alive(dataclasses.replace(me, start_time="0"))


def test_spawn_makes_a_group_of_its_own() -> None:
    child = spawn(["sleep", "300"])
    try:
        proc = read_stat(child.pid)
        assert proc is not None
        assert proc.ppid == os.getpid()
        assert proc.pgid == child.pid
        assert child.pid in [p.pid for p in descendants(os.getpid())]
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_die_with_parent() -> None:
    # parent -> worker; the worker arms die_with_parent itself (no preexec_fn), as the
    # router's --workers processes do, so a SIGKILLed parent takes it along.
    worker = (
        "from common.procs import die_with_parent; die_with_parent(); "
        "print('armed', flush=True); input()"
    )
    parent_script = textwrap.dedent(
        f"""
        import subprocess, sys
        worker = subprocess.Popen([sys.executable, "-c", {worker!r}])
        print(worker.pid, flush=True)
        sys.stdin.read()
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert parent.stdout is not None and parent.stdin is not None
    try:
        # The worker inherits the parent's stdout: its "armed" and the parent's pid line
        # arrive in either order.
        lines = sorted(parent.stdout.readline().strip() for _ in range(2))
        assert lines[1] == b"armed"
        pid = int(lines[0])
        assert not gone(pid)
        parent.kill()
        parent.wait()
        wait_until(lambda: gone(pid), what="the worker to die with its parent")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        parent.stdin.close()
