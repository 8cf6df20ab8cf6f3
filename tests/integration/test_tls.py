"""TLS on the router's port, TLS to drivers, and the backend token, with fake drivers.

Certificates are made per test with trustme; every wait is bounded and polls a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import trustme
from pyspark.sql.connect.proto import base_pb2

from agent.sidecar import Agent, AgentSettings
from common.health import probe
from loadtest.fake_driver import FakeDriver
from registry.memory import MemoryRegistry
from router.config import Settings, load_settings
from router.server import Replica, StartupError, is_loopback
from router.tls import build_dialing, server_credentials, verified_peer
from tests.helpers import eventually

WAIT = 10.0
CONFIG = "/spark.connect.SparkConnectService/Config"
BINDING_PORT = "spark.connect.grpc.binding.port"
# Own subchannels: a new channel must make a new connection (and so a new TLS handshake).
FRESH = [("grpc.use_local_subchannel_pool", 1)]


class Pki:
    """A test CA and the PEM files of certificates it issued, in one directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.ca = trustme.CA()
        self.directory = directory
        self.name = name
        self.ca_file = directory / f"{name}-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    @property
    def root(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def issue(self, label: str, *names: str) -> tuple[Path, Path]:
        """A certificate for `names`, as (chain file, key file)."""
        leaf = self.ca.issue_cert(*names)
        cert = self.directory / f"{self.name}-{label}.pem"
        key = self.directory / f"{self.name}-{label}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return cert, key


def _pki(tmp_path: Path, name: str) -> Pki:
    return Pki(tmp_path, name)


def _request() -> bytes:
    data: bytes = base_pb2.ConfigRequest(
        session_id=str(uuid.uuid4()),
        user_context=base_pb2.UserContext(user_id="alice"),
        operation=base_pb2.ConfigRequest.Operation(
            get=base_pb2.ConfigRequest.Get(keys=[BINDING_PORT])
        ),
    ).SerializeToString()
    return data


async def _binding_port(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()
) -> str:
    """The binding port the driver behind `channel` answers (which driver served the call)."""
    raw = await channel.unary_unary(CONFIG)(_request(), timeout=WAIT, metadata=metadata or None)
    response = base_pb2.ConfigResponse.FromString(raw)
    return next(str(p.value) for p in response.pairs if p.key == BINDING_PORT)


def _tls_channel(
    port: int, root: bytes, cert: Path | None = None, key: Path | None = None
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root,
        None if key is None else key.read_bytes(),
        None if cert is None else cert.read_bytes(),
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=FRESH)


async def _answers(channel: grpc.aio.Channel) -> bool:
    """Whether a call over `channel` gets through (a refused handshake is UNAVAILABLE)."""
    try:
        await channel.unary_unary(CONFIG)(_request(), timeout=2.0)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
        return False
    return True


def _settings(driver: FakeDriver, **values: Any) -> Settings:
    return load_settings(
        listen="127.0.0.1:0", admin_listen="off", drivers=[driver.address], **values
    )


# --------------------------------------------------------------------------- the listener


async def test_a_client_trusting_the_ca_is_served_over_tls(
    tmp_path: Path, driver: FakeDriver
) -> None:
    server = _pki(tmp_path, "server")
    cert, key = server.issue("router", "localhost", "127.0.0.1")
    async with Replica(_settings(driver, tls_cert_file=cert, tls_key_file=key)) as replica:
        async with _tls_channel(replica.port, server.root) as channel:
            assert await _binding_port(channel) == str(driver.port)
        async with _tls_channel(replica.port, _pki(tmp_path, "stranger").root) as channel:
            assert not await _answers(channel)  # the router's certificate is not from that CA
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}", FRESH) as plain:
            assert not await _answers(plain)  # TLS only


async def test_require_admits_a_valid_client_certificate_only(
    tmp_path: Path, driver: FakeDriver
) -> None:
    server, clients, strangers = (_pki(tmp_path, n) for n in ("server", "clients", "strangers"))
    cert, key = server.issue("router", "localhost", "127.0.0.1")
    settings = _settings(
        driver,
        tls_cert_file=cert,
        tls_key_file=key,
        tls_client_ca_file=clients.ca_file,
        tls_client_auth="require",
    )
    alice = clients.issue("alice", "alice@example.com")
    mallory = strangers.issue("mallory", "mallory@example.com")
    async with Replica(settings) as replica:
        async with _tls_channel(replica.port, server.root, *alice) as channel:
            assert await _binding_port(channel) == str(driver.port)
        async with _tls_channel(replica.port, server.root) as channel:
            assert not await _answers(channel)  # no certificate: refused in the handshake
        async with _tls_channel(replica.port, server.root, *mallory) as channel:
            assert not await _answers(channel)  # a certificate of another CA: refused


async def _peer_seen(credentials: grpc.ServerCredentials, client: grpc.ChannelCredentials) -> Any:
    """The auth context and verified_peer() of one call to a bare server with `credentials`.

    Dynamic credentials serve one server only (gRPC hands their initial configuration to the
    first server that binds them), so every call here gets new ones.
    """
    seen: dict[str, Any] = {}

    async def handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        seen["context"] = context.auth_context()
        seen["verified"] = verified_peer(seen["context"])
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t", {"M": grpc.unary_unary_rpc_method_handler(handler)}
            ),
        )
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", client, FRESH) as channel:
            await channel.unary_unary("/t/M")(b"", timeout=WAIT)
    finally:
        await server.stop(0)
    return seen


async def test_grpc_cannot_ask_for_a_client_certificate_without_requiring_it(
    tmp_path: Path,
) -> None:
    """Why config.py refuses tls_client_auth optional (router/tls.py's docstring)."""
    server, clients, strangers = (_pki(tmp_path, n) for n in ("server", "clients", "strangers"))
    cert, key = server.issue("router", "localhost", "127.0.0.1")
    pair = [(key.read_bytes(), cert.read_bytes())]
    alice_cert, alice_key = clients.issue("alice", "alice@example.com")
    mallory_cert, mallory_key = strangers.issue("mallory", "mallory@example.com")
    alice = grpc.ssl_channel_credentials(
        server.root, alice_key.read_bytes(), alice_cert.read_bytes()
    )
    mallory = grpc.ssl_channel_credentials(
        server.root, mallory_key.read_bytes(), mallory_cert.read_bytes()
    )
    for client in (alice, mallory):
        # "Optional" as grpc Python offers it: client CA given, require_client_authentication off.
        optional = grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration(pair, root_certificates=clients.root),
            lambda: None,
            require_client_authentication=False,
        )
        seen = await _peer_seen(optional, client)
        # Not even the valid certificate arrives: the server never asked for one.
        assert "x509_pem_cert" not in seen["context"] and not seen["verified"]
    # Under require the certificate arrives, verified by gRPC.
    settings = load_settings(
        tls_cert_file=cert,
        tls_key_file=key,
        tls_client_ca_file=clients.ca_file,
        tls_client_auth="require",
    )
    seen = await _peer_seen(server_credentials(settings), alice)
    assert seen["verified"]
    assert seen["context"]["x509_subject_alternative_name"] == [b"alice@example.com"]


async def test_a_certificate_swapped_on_disk_is_served_to_the_next_connection(
    tmp_path: Path, driver: FakeDriver
) -> None:
    old, new = _pki(tmp_path, "old"), _pki(tmp_path, "new")
    cert, key = old.issue("router", "localhost", "127.0.0.1")
    async with Replica(_settings(driver, tls_cert_file=cert, tls_key_file=key)) as replica:
        async with _tls_channel(replica.port, old.root) as channel:
            assert await _binding_port(channel) == str(driver.port)
        new_cert, new_key = new.issue("router", "localhost", "127.0.0.1")
        # Write aside and rename, key first: the way a cert-manager sidecar swaps files.
        for target, source in ((key, new_key), (cert, new_cert)):
            aside = target.with_suffix(".swap")
            aside.write_bytes(source.read_bytes())
            os.replace(aside, target)

        async def new_ca_verifies() -> bool:
            async with _tls_channel(replica.port, new.root) as channel:
                return await _answers(channel)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while not await new_ca_verifies():
            assert loop.time() < deadline, "the new certificate was never served"
        async with _tls_channel(replica.port, old.root) as channel:
            assert not await _answers(channel)


async def test_a_bad_certificate_file_stops_start_up_naming_it(
    tmp_path: Path, driver: FakeDriver
) -> None:
    server = _pki(tmp_path, "server")
    cert, _ = server.issue("router", "localhost")
    missing = tmp_path / "missing.key"
    with pytest.raises(StartupError, match=f"tls_key_file {missing}"):
        async with Replica(_settings(driver, tls_cert_file=cert, tls_key_file=missing)):
            pass


# --------------------------------------------------------------------------- to drivers


@contextlib.asynccontextmanager
async def _tls_driver(
    pki: Pki, name: str, client_roots: bytes | None = None, token: str | None = None
) -> AsyncIterator[FakeDriver]:
    """A fake driver serving TLS for `name` (client certificates required with client_roots)."""
    cert, key = pki.issue("driver", name)
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_roots,
        require_client_auth=client_roots is not None,
    )
    d = FakeDriver(credentials=credentials, token=token)
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


async def test_the_router_dials_a_tls_driver_by_its_certificate_name(tmp_path: Path) -> None:
    drivers, routers = _pki(tmp_path, "drivers"), _pki(tmp_path, "routers")
    router_cert, router_key = routers.issue("router", "spark-router")
    async with _tls_driver(drivers, "driver.internal", client_roots=routers.root) as d:
        settings = _settings(
            d,
            driver_tls=True,
            driver_tls_ca_file=drivers.ca_file,
            driver_tls_cert_file=router_cert,
            driver_tls_key_file=router_key,
            driver_tls_server_name="driver.internal",
        )
        async with Replica(settings) as replica:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
                assert await _binding_port(channel) == str(d.port)
            # The replica's own probe dials the same way: the driver answers it.
            assert not await replica.health.confirm_failure(d.address)


async def test_without_the_name_override_the_driver_certificate_does_not_match(
    tmp_path: Path,
) -> None:
    drivers = _pki(tmp_path, "drivers")
    async with _tls_driver(drivers, "driver.internal") as d:
        dialing = build_dialing(tls=True, ca_file=drivers.ca_file)
        assert not await probe(d.address, 2.0, dialing)  # 127.0.0.1 is not driver.internal
        named = build_dialing(tls=True, ca_file=drivers.ca_file, server_name="driver.internal")
        assert await probe(d.address, 2.0, named)


class RawMetadataDriver(FakeDriver):
    """A fake driver that keeps every Config call's metadata as sent (repeated keys too)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.raw: list[tuple[str, list[str]]] = []  # (user id, authorization values)

    async def Config(self, request: Any, context: Any) -> Any:
        values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        self.raw.append((str(request.user_context.user_id), values))
        return await super().Config(request, context)


async def test_the_driver_token_reaches_the_driver_and_the_clients_does_not() -> None:
    d = RawMetadataDriver(token="driver-secret")
    async with d:
        settings = _settings(d, driver_token="driver-secret")
        async with Replica(settings) as replica:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
                client_auth = (("authorization", "Bearer the-clients-own"),)
                assert await _binding_port(channel, client_auth) == str(d.port)
            assert not await replica.health.confirm_failure(d.address)  # the probe sends it too
        served = [values for user, values in d.raw if user == "alice"]
        probes = [values for user, values in d.raw if user != "alice"]
        assert served and probes
        for values in served + probes:
            assert values == ["Bearer driver-secret"]


async def test_a_driver_refuses_a_router_without_its_token() -> None:
    async with FakeDriver(token="driver-secret") as d:
        assert not await probe(d.address, 2.0)
        assert not await probe(d.address, 2.0, build_dialing(tls=False, token="wrong"))
        assert await probe(d.address, 2.0, build_dialing(tls=False, token="driver-secret"))


async def test_the_agent_probes_through_tls_with_the_token(tmp_path: Path) -> None:
    drivers = _pki(tmp_path, "drivers")
    async with _tls_driver(drivers, "driver.internal", token="driver-secret") as d:
        dialing = build_dialing(
            tls=True,
            ca_file=drivers.ca_file,
            server_name="driver.internal",
            token="driver-secret",
        )
        registry = MemoryRegistry()
        stop = asyncio.Event()
        settings = AgentSettings(
            d.address, heartbeat_interval=0.2, probe_timeout=0.5, dialing=dialing
        )
        running = asyncio.ensure_future(Agent(settings, registry).run(stop))
        try:
            known: list[str] = []

            async def registered() -> bool:
                known[:] = [r.address for r in await registry.drivers()]
                return d.address in known

            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT
            while not await registered():
                assert loop.time() < deadline, "the agent never registered its driver"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(running, WAIT)
        await eventually(lambda: bool(d.calls), "the driver to have seen the agent's probe")
        assert all(c.metadata.get("authorization") == "Bearer driver-secret" for c in d.calls)


# --------------------------------------------------------------------------- the warning


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.0.1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("10.0.0.5", False),
        ("router.example", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def test_serving_beyond_loopback_without_auth_is_warned_about(
    driver: FakeDriver, caplog: pytest.LogCaptureFixture
) -> None:
    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if "without authentication" in r.message]

    with caplog.at_level(logging.WARNING, logger="router.server"):
        async with Replica(_settings(driver)):
            assert not warned()  # loopback only
        wide = load_settings(listen="0.0.0.0:0", admin_listen="off", drivers=[driver.address])
        async with Replica(wide):
            assert len(warned()) == 1 and "tls_cert_file" in warned()[0]
