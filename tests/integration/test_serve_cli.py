"""`spark-router serve` as a real process: backpressure, workers, start-up errors, shutdown."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import grpc
import psutil
import pytest
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc, relations_pb2

from tests.helpers import (
    alive,
    close_pipes,
    free_port,
    read_line_matching,
    spawn,
    stderr_of,
    stop,
    wait_until,
)

MiB = 1024 * 1024
CLI = ["-m", "router.cli"]


@pytest.fixture
def fake_driver_proc() -> Iterator[str]:
    """A fake driver in its own process; yields its address."""
    proc = spawn(["-m", "loadtest.fake_driver", "--listen", "127.0.0.1:0"])
    line = read_line_matching(proc, "listening on", timeout=30)
    yield line.rsplit(" ", 1)[1].strip()
    assert stop(proc) == 0


def _serve(*args: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = spawn([*CLI, "serve", "--listen", f"127.0.0.1:{port}", *args])
    wait_until(lambda: _accepts(port) or proc.poll() is not None, 30, "router to listen")
    assert proc.poll() is None, stderr_of(proc)
    return proc, port


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _binding_port(stub: base_pb2_grpc.SparkConnectServiceStub, session: str) -> int:
    req = base_pb2.ConfigRequest(session_id=session)
    req.operation.get.keys.append("spark.connect.grpc.binding.port")
    return int(stub.Config(req, timeout=10).pairs[0].value)


def test_slow_reader_does_not_grow_router_memory(fake_driver_proc: str) -> None:
    router, port = _serve("--driver", fake_driver_proc)
    try:
        rss = psutil.Process(router.pid).memory_info
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 128 * MiB)]
        ) as ch:
            stub = base_pb2_grpc.SparkConnectServiceStub(ch)
            _binding_port(stub, str(uuid.uuid4()))  # channels and caches exist before measuring
            baseline = rss().rss
            req = base_pb2.ExecutePlanRequest(
                session_id=str(uuid.uuid4()), plan=base_pb2.Plan(root=relations_pb2.Relation())
            )
            # 800 MiB offered by a driver that produces as fast as it is allowed to.
            stream = stub.ExecutePlan(
                req, metadata=(("x-fake-batches", "800"), ("x-fake-batch-bytes", str(MiB)))
            )
            received = 0
            peak = 0
            start = time.monotonic()
            for response in stream:
                received += len(response.arrow_batch.data)
                peak = max(peak, rss().rss)
                if received <= 32 * MiB:
                    # A slow reader: the first 32 messages take ~2 s, long enough for a
                    # buffering proxy to pull the whole result from the driver.
                    deadline = time.monotonic() + 0.0625
                    while time.monotonic() < deadline:
                        peak = max(peak, rss().rss)
                        time.sleep(0.02)
            assert received == 800 * MiB
            assert time.monotonic() - start < 120
        growth = (peak - baseline) / MiB
        # Flow-control windows plus a few 1 MiB messages (18-21 MiB measured); buffering
        # would be ~800 MiB.
        assert growth < 64, f"router RSS grew by {growth:.0f} MiB while the client was slow"
    finally:
        assert stop(router) == 0


def test_workers_share_the_port_and_stop_cleanly(fake_driver_proc: str) -> None:
    router, port = _serve("--driver", fake_driver_proc, "--workers", "2")
    try:
        parent = psutil.Process(router.pid)
        wait_until(lambda: len(_listeners(parent, port)) == 2, 30, "two workers listening")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = base_pb2_grpc.SparkConnectServiceStub(ch)
            ports = {_binding_port(stub, str(uuid.uuid4())) for _ in range(20)}
        assert ports == {int(fake_driver_proc.rsplit(":", 1)[1])}
        children = parent.children(recursive=True)
    finally:
        assert stop(router) == 0
    wait_until(lambda: not any(map(alive, children)), 10, "every worker process to exit")


def _listeners(parent: psutil.Process, port: int) -> list[int]:
    pids = []
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in conns):
            pids.append(proc.pid)
    return pids


def test_bad_configuration_exits_2_with_a_clear_message() -> None:
    proc = spawn([*CLI, "serve", "--driver", "nonsense", "--workers", "0"], capture_stderr=True)
    _, err = proc.communicate(timeout=30)
    close_pipes(proc)
    assert proc.returncode == 2
    assert "drivers: 'nonsense' is not HOST:PORT" in err
    assert "workers: Input should be greater than or equal to 1" in err


def test_no_drivers_exits_2() -> None:
    proc = spawn([*CLI, "serve"], env={"SPARK_ROUTER_DRIVERS": ""}, capture_stderr=True)
    _, err = proc.communicate(timeout=30)
    close_pipes(proc)
    assert proc.returncode == 2 and "no drivers" in err


def test_port_in_use_exits_3(fake_driver_proc: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn(
            [*CLI, "serve", "--listen", f"127.0.0.1:{port}", "--driver", fake_driver_proc],
            capture_stderr=True,
        )
        _, err = proc.communicate(timeout=30)
        close_pipes(proc)
    assert proc.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_env_and_config_file_configure_serve(fake_driver_proc: str, tmp_path: object) -> None:
    from pathlib import Path

    cfg = Path(str(tmp_path)) / "router.yaml"
    port = free_port()
    cfg.write_text(f"listen: 127.0.0.1:{port}\n")
    proc = spawn(
        [*CLI, "serve", "--config", str(cfg)], env={"SPARK_ROUTER_DRIVERS": fake_driver_proc}
    )
    try:
        wait_until(lambda: _accepts(port) or proc.poll() is not None, 30, "router to listen")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            got = _binding_port(base_pb2_grpc.SparkConnectServiceStub(ch), str(uuid.uuid4()))
        assert got == int(fake_driver_proc.rsplit(":", 1)[1])
    finally:
        assert stop(proc) == 0


def test_bad_registry_url_exits_2() -> None:
    proc = spawn(
        [*CLI, "serve", "--registry", "mongodb://x", "--driver", "127.0.0.1:1"], capture_stderr=True
    )
    _, err = proc.communicate(timeout=30)
    close_pipes(proc)
    assert proc.returncode == 2
    assert "registry: 'mongodb://x' is not a registry URL" in err


def test_serve_with_a_registry_needs_no_static_driver(
    fake_driver_proc: str, redis_url: str
) -> None:
    import asyncio

    from registry import open_registry
    from registry.models import Driver

    async def register() -> None:
        store = open_registry(redis_url)
        try:
            await store.upsert_driver(Driver(fake_driver_proc), ttl=60)
        finally:
            await store.close()

    asyncio.run(register())
    port = free_port()
    proc = spawn(
        [*CLI, "serve", "--listen", f"127.0.0.1:{port}", "--registry", redis_url],
        env={"SPARK_ROUTER_DRIVERS": ""},
    )
    try:
        wait_until(lambda: _accepts(port) or proc.poll() is not None, 30, "router to listen")
        assert proc.poll() is None, stderr_of(proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            got = _binding_port(base_pb2_grpc.SparkConnectServiceStub(ch), str(uuid.uuid4()))
        assert got == int(fake_driver_proc.rsplit(":", 1)[1])
    finally:
        assert stop(proc) == 0
