"""`spark-router authz` (router/authz.py) served for real: Envoy's Check over a gRPC channel."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.admit import tokens
from router.authz import AuthzServer
from router.config import load_settings
from tests.helpers import free_port, listening, spawn, stderr_of, stderr_text, stop, wait_until

GRPC_PATH = "/spark.connect.SparkConnectService/ExecutePlan"
POLICY = {
    "roles": {
        "analysts": {"groups": ["analytics"], "pools": ["default", "bi"], "default_pool": "bi"},
        "platform": {"users": ["root"], "pools": ["*"], "admin": True},
    },
    "deny_users": ["mallory"],
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SPARK_ROUTER_"):
            monkeypatch.delenv(key)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A token file (alice, root, mallory) and a policy file."""
    token_file = tmp_path / "tokens.yaml"
    issued = {
        "alice": tokens.add(token_file, "alice", ["analytics"]),
        "root": tokens.add(token_file, "root"),
        "mallory": tokens.add(token_file, "mallory", ["analytics"]),
    }
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(POLICY))
    return token_file, policy_file, issued


@pytest.fixture
async def authz(files: tuple[Path, Path, dict[str, str]]) -> AsyncIterator[AuthzServer]:
    """The ext_authz server on a free loopback port, token auth and the policy file."""
    token_file, policy_file, _ = files
    settings = load_settings(
        authz_listen="127.0.0.1:0", auth=["token"], token_file=token_file, policy_file=policy_file
    )
    server = AuthzServer(settings)
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture
async def stub(authz: AuthzServer) -> AsyncIterator[Any]:
    """Envoy's side: an Authorization stub over a real channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{authz.port}") as channel:
        yield external_auth_pb2_grpc.AuthorizationStub(channel)


def check_request(path: str, headers: dict[str, str]) -> Any:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.protocol = "POST", path, "router:443", "HTTP/2"
    for key, value in {":path": path, "content-type": "application/grpc", **headers}.items():
        http.headers[key] = value
    req.attributes.source.address.socket_address.address = "127.0.0.1"
    req.attributes.source.address.socket_address.port_value = 50000
    return req


def headers_of(options: Any) -> dict[str, str]:
    return {h.header.key: h.header.value for h in options}


async def test_check_over_grpc_allows_and_denies_as_the_router_does(
    stub: Any, files: tuple[Path, Path, dict[str, str]]
) -> None:
    _, _, issued = files
    ok = await stub.Check(
        check_request(GRPC_PATH, {"authorization": f"Bearer {issued['alice']}"}), timeout=10
    )
    assert ok.status.code == 0
    assert headers_of(ok.ok_response.headers) == {
        "x-spark-user": "alice",
        "x-spark-groups": "analytics",
        "x-spark-pool": "bi",
    }
    assert list(ok.ok_response.headers_to_remove) == ["authorization"]

    pool = await stub.Check(
        check_request(
            GRPC_PATH, {"authorization": f"Bearer {issued['alice']}", "x-spark-pool": "etl"}
        ),
        timeout=10,
    )
    assert pool.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    found = headers_of(pool.denied_response.headers)
    assert found["grpc-status"] == "7"
    assert found["grpc-message"] == (
        "spark-router: user 'alice' may not use pool 'etl' (their roles allow: bi, default)"
    )

    missing = await stub.Check(check_request(GRPC_PATH, {}), timeout=10)
    assert missing.status.code == 16 and missing.denied_response.status.code == 401
    assert headers_of(missing.denied_response.headers)["grpc-status"] == "16"

    admin = await stub.Check(
        check_request("/api/drivers", {"authorization": f"Bearer {issued['root']}"}), timeout=10
    )
    assert headers_of(admin.ok_response.headers) == {"x-spark-user": "root"}
    refused = await stub.Check(
        check_request("/api/drivers", {"authorization": f"Bearer {issued['alice']}"}), timeout=10
    )
    assert refused.denied_response.status.code == 403
    assert "has no admin role" in json.loads(refused.denied_response.body)["error"]

    unknown = await stub.Check(check_request("/other", {}), timeout=10)
    assert unknown.status.code == 7 and "'/other'" in unknown.status.message


async def test_malformed_checks_are_denied_and_the_server_keeps_serving(
    stub: Any, authz: AuthzServer, files: tuple[Path, Path, dict[str, str]]
) -> None:
    empty = await stub.Check(external_auth_pb2.CheckRequest(), timeout=10)
    assert empty.status.code == 7
    assert "carries no HTTP request attributes" in empty.status.message
    async with grpc.aio.insecure_channel(f"127.0.0.1:{authz.port}") as channel:
        # Bytes that are not a CheckRequest at all: a denial all the same, and it lives on.
        raw = channel.unary_unary(
            "/envoy.service.auth.v3.Authorization/Check",
            request_serializer=lambda b: b,
            response_deserializer=external_auth_pb2.CheckResponse.FromString,
        )
        junk = await raw(b"\xff\xff\xff", timeout=10)
        assert junk.status.code == 7 and junk.denied_response.status.code == 403
        assert "not a valid envoy.service.auth.v3.CheckRequest" in junk.status.message
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(
            health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"),
            timeout=10,
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    big = check_request(GRPC_PATH, {"authorization": f"Bearer {files[2]['alice']}x" + "y" * 20000})
    over = await stub.Check(big, timeout=10)
    assert over.status.code == 7 and "max_metadata_bytes" in over.status.message


async def test_no_token_text_in_logs_or_answers(
    stub: Any, files: tuple[Path, Path, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    _, _, issued = files
    caplog.set_level(logging.DEBUG)
    forged = tokens.new_token()
    answers = []
    for token in (*issued.values(), forged):
        for path in (GRPC_PATH, "/api/sessions", f"/api/x?token={token}", f"/nowhere?t={token}"):
            answers.append(
                await stub.Check(
                    check_request(path, {"authorization": f"Bearer {token}"}), timeout=10
                )
            )
    assert any(a.HasField("denied_response") for a in answers)
    assert any(a.HasField("ok_response") for a in answers)
    logged = caplog.text
    assert "refused" in logged  # denials are logged ...
    wire = b"".join(a.SerializeToString() for a in answers)
    for token in (*issued.values(), forged):
        assert token not in logged  # ... without the token
        assert token.encode() not in wire
        assert token[8:24] not in logged  # nor a part of it


def test_the_cli_serves_until_sigterm(files: tuple[Path, Path, dict[str, str]]) -> None:
    token_file, policy_file, issued = files
    port = free_port()
    env = {
        "SPARK_ROUTER_AUTH": "token",
        "SPARK_ROUTER_TOKEN_FILE": str(token_file),
        "SPARK_ROUTER_POLICY_FILE": str(policy_file),
        "SPARK_ROUTER_LOG_FORMAT": "json",
    }
    proc = spawn(["-m", "router.cli", "authz", "--listen", f"127.0.0.1:{port}"], env=env)
    try:
        wait_until(lambda: listening(port, proc), 30, f"authz on {port} to listen")
        assert proc.poll() is None, stderr_of(proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            ok = stub.Check(
                check_request(GRPC_PATH, {"authorization": f"Bearer {issued['alice']}"}),
                timeout=10,
            )
            assert ok.HasField("ok_response")
            no = stub.Check(
                check_request(GRPC_PATH, {"authorization": f"Bearer {issued['mallory']}"}),
                timeout=10,
            )
            assert no.status.code == 7
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, stderr_of(proc)
        logged = stderr_text(proc)
        assert f"authz listening on 127.0.0.1:{port}" in logged
        assert "refused" in logged and "authz: shutting down" in logged
        assert all(token not in logged for token in issued.values())
    finally:
        stop(proc)  # closes its pipes; kills it if it is still there


def test_the_cli_refuses_auth_none(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARK_ROUTER_")}
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "authz"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "authz needs auth" in done.stderr
