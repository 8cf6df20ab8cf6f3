"""`--workers N`: one supervisor process running N replica processes on one port.

The workers share the listen port through SO_REUSEPORT (the kernel spreads connections);
they are started with the `spawn` method because gRPC does not survive fork. A worker that
dies is restarted, a bounded number of times (a worker that keeps dying is a configuration
or environment problem, not bad luck); one that cannot start stops the supervisor with exit
code 3. Ctrl-C reaches the supervisor, which stops its workers in order; workers die with
their supervisor (PDEATHSIG), so a SIGKILLed supervisor leaves no worker holding the port.
Workers keep their metrics in files of one directory, so /metrics of any worker sums them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import tempfile
import time

from prometheus_client import multiprocess

from common.lifecycle import EXIT_OK, EXIT_STARTUP_FAILURE
from router.config import Settings
from router.server import run_replica
from router.telemetry import MULTIPROC_ENV

log = logging.getLogger(__name__)

_MAX_RESTARTS = 5
_RESTART_WINDOW_SECONDS = 60.0


def _worker_main(settings: Settings, log_level: str) -> None:
    """Entry point of a worker process (spawned)."""
    from common.procs import die_with_parent
    from router.logs import configure_logging

    die_with_parent()  # a SIGKILLed supervisor must not leave workers holding the port
    configure_logging(log_level, settings.log_format)
    # Ctrl-C goes to the whole process group; only the supervisor acts on it and then
    # sends each worker one SIGTERM, so a worker never sees it as a second signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(run_replica(settings))


def run_workers(settings: Settings) -> int:
    """Run `settings.workers` replica processes on one port; return the exit code."""
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    forced = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping, forced
        if stopping:
            forced = True
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    # Workers keep their metrics in files here, so /metrics of any worker sums them all;
    # spawned workers import prometheus_client with this set, which is what switches it on.
    own_metrics_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        own_metrics_dir = tempfile.mkdtemp(prefix="spark-router-metrics-")
        os.environ[MULTIPROC_ENV] = own_metrics_dir
    metrics_dir = os.environ[MULTIPROC_ENV]

    def spawn() -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(target=_worker_main, args=(settings, settings.log_level), daemon=False)
        proc.start()
        return proc

    workers = [spawn() for _ in range(settings.workers)]
    restarts: list[float] = []
    exit_code = EXIT_OK
    try:
        while not stopping:
            for i, proc in enumerate(workers):
                proc.join(timeout=0.2 / len(workers))
                if proc.exitcode is None or stopping:
                    continue
                if proc.exitcode == EXIT_STARTUP_FAILURE:
                    log.error("worker %d could not start; stopping", proc.pid)
                    exit_code = EXIT_STARTUP_FAILURE
                    stopping = True
                    break
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < _RESTART_WINDOW_SECONDS]
                if len(restarts) >= _MAX_RESTARTS:
                    log.error(
                        "workers died %d times within %ss; giving up",
                        len(restarts) + 1,
                        _RESTART_WINDOW_SECONDS,
                    )
                    exit_code = 1
                    stopping = True
                    break
                restarts.append(now)
                log.warning("worker %d exited with %s; restarting it", proc.pid, proc.exitcode)
                if proc.pid is not None:
                    multiprocess.mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
                workers[i] = spawn()
    finally:
        for proc in workers:
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_grace_seconds + 5
        for proc in workers:
            while proc.exitcode is None and time.monotonic() < deadline and not forced:
                proc.join(timeout=0.2)
            if proc.exitcode is None:
                proc.kill()
                proc.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
            del os.environ[MULTIPROC_ENV]
    return exit_code
