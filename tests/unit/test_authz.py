"""The ext_authz decisions (router/authz.py) against Envoy's real CheckRequest protos."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trustme
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2

from router.admit import tokens
from router.admit.auth import Authenticator
from router.admit.policy_file import PolicyFile
from router.authz import Judge, certificate_context, grpc_message, to_response
from router.config import ConfigError, Settings, load_settings

GRPC_PATH = "/spark.connect.SparkConnectService/ExecutePlan"
POLICY = {
    "roles": {
        "analysts": {"groups": ["analytics"], "pools": ["default", "bi"], "default_pool": "bi"},
        "etl": {"users": ["ann"], "pools": ["etl"], "default_pool": "etl"},
        "platform": {"groups": ["platform"], "pools": ["*"], "admin": True},
    },
    "deny_users": ["mallory"],
}
NO_CREDENTIALS = (
    "spark-router: no credentials: send `authorization: Bearer <token>` "
    "(pyspark: sc://HOST:15002/;use_ssl=true;token=<token>)"
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SPARK_ROUTER_"):
            monkeypatch.delenv(key)


class World:
    """A token file of five users, a policy file, and a Judge over both."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        token_file = tmp_path / "tokens.yaml"
        self.tokens = {
            "alice": tokens.add(token_file, "alice", ["zeta", "analytics"]),
            "ann": tokens.add(token_file, "ann"),
            "root": tokens.add(token_file, "root", ["platform"]),
            "mallory": tokens.add(token_file, "mallory", ["platform"]),
            "nobody": tokens.add(token_file, "nobody"),
        }
        policy_file = tmp_path / "policy.yaml"
        policy_file.write_text(yaml.safe_dump(POLICY))
        self.settings = load_settings(
            auth=["token"], token_file=token_file, policy_file=policy_file, **settings
        )
        policy = PolicyFile(policy_file, "default", 60)
        self.judge = Judge(self.settings, Authenticator.from_settings(self.settings), policy)

    async def check(self, request: Any) -> Any:
        response = to_response(await self.judge.decide(request))
        # What goes on the wire is what Envoy parses: check that it round-trips.
        return external_auth_pb2.CheckResponse.FromString(response.SerializeToString())


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def request(
    path: str, headers: dict[str, str] | None = None, *, method: str = "POST", **source: str
) -> Any:
    """A CheckRequest as Envoy's ext_authz HTTP filter sends it (headers lower-case)."""
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.id, http.method, http.path, http.host, http.scheme = "7", method, path, "router", "https"
    http.protocol = "HTTP/2"
    given = {":path": path, ":method": method, ":authority": "router", **(headers or {})}
    for key, value in given.items():
        http.headers[key] = value
    req.attributes.source.address.socket_address.address = "10.0.0.9"
    req.attributes.source.address.socket_address.port_value = 40000
    for key, value in source.items():
        setattr(req.attributes.source, key, value)
    return req


def bearer(token: str, **more: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "content-type": "application/grpc", **more}


def added(response: Any) -> dict[str, str]:
    headers = response.ok_response.headers
    assert all(
        h.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD for h in headers
    )
    return {h.header.key: h.header.value for h in headers}


def denied(response: Any) -> tuple[int, int, dict[str, str], str]:
    """(CheckResponse code, HTTP status, response headers, body) of a denial."""
    assert response.HasField("denied_response") and not response.HasField("ok_response")
    d = response.denied_response
    return (
        response.status.code,
        d.status.code,
        {h.header.key: h.header.value for h in d.headers},
        d.body,
    )


# --- gRPC paths ---------------------------------------------------------------------------


async def test_a_known_token_is_let_through_with_the_users_headers_and_default_pool(
    world: World,
) -> None:
    response = await world.check(request(GRPC_PATH, bearer(world.tokens["alice"])))
    assert response.status.code == 0 and response.HasField("ok_response")
    assert added(response) == {
        "x-spark-user": "alice",
        "x-spark-groups": "analytics,zeta",  # sorted, comma-separated
        "x-spark-pool": "bi",  # the policy chose the role's default
    }
    assert list(response.ok_response.headers_to_remove) == ["authorization"]


async def test_a_pool_asked_for_and_allowed_is_left_as_sent(world: World) -> None:
    headers = bearer(world.tokens["alice"], **{"x-spark-pool": "default"})
    response = await world.check(request(GRPC_PATH, headers))
    assert added(response) == {"x-spark-user": "alice", "x-spark-groups": "analytics,zeta"}


async def test_a_user_without_groups_has_any_forged_groups_header_removed(world: World) -> None:
    headers = bearer(world.tokens["ann"], **{"x-spark-user": "root", "x-spark-groups": "platform"})
    response = await world.check(request(GRPC_PATH, headers))
    assert added(response) == {"x-spark-user": "ann", "x-spark-pool": "etl"}
    assert list(response.ok_response.headers_to_remove) == ["authorization", "x-spark-groups"]


async def test_no_token_is_unauthenticated_with_the_routers_message(world: World) -> None:
    code, http, headers, body = denied(await world.check(request(GRPC_PATH, {})))
    assert (code, http) == (16, 401)
    assert headers["grpc-status"] == "16"
    assert headers["grpc-message"] == NO_CREDENTIALS  # printable ASCII: sent as it is
    assert headers["content-type"] == "application/grpc"
    assert body == NO_CREDENTIALS


async def test_an_unknown_token_is_unauthenticated_and_never_echoed(world: World) -> None:
    forged = tokens.new_token()
    response = await world.check(request(GRPC_PATH, bearer(forged)))
    code, http, headers, body = denied(response)
    assert (code, http, headers["grpc-status"]) == (16, 401, "16")
    assert body.startswith("spark-router: unknown token: it is not in this router's token file")
    assert response.status.message == body
    assert forged not in response.SerializeToString().decode("latin-1")


async def test_a_pool_not_allowed_is_permission_denied_naming_pool_user_and_allowed(
    world: World,
) -> None:
    headers = bearer(world.tokens["alice"], **{"x-spark-pool": "etl"})
    code, http, found, body = denied(await world.check(request(GRPC_PATH, headers)))
    expected = "spark-router: user 'alice' may not use pool 'etl' (their roles allow: bi, default)"
    assert (code, http, found["grpc-status"], body) == (7, 403, "7", expected)
    assert found["grpc-message"] == expected


async def test_no_role_and_the_deny_list_are_permission_denied(world: World) -> None:
    code, _, _, body = denied(await world.check(request(GRPC_PATH, bearer(world.tokens["nobody"]))))
    assert code == 7
    assert body.startswith("spark-router: user 'nobody' has no role in the router's policy")
    code, _, _, body = denied(
        await world.check(request(GRPC_PATH, bearer(world.tokens["mallory"])))
    )
    assert (code, body) == (7, "spark-router: user 'mallory' is on the router's deny list")


async def test_a_pool_name_over_the_identifier_bound_is_invalid(world: World) -> None:
    headers = bearer(world.tokens["alice"], **{"x-spark-pool": "p" * 300})
    code, http, found, body = denied(await world.check(request(GRPC_PATH, headers)))
    assert (code, http, found["grpc-status"]) == (3, 400, "3")
    assert "x-spark-pool is 300 characters long; at most 256" in body


# --- admin paths --------------------------------------------------------------------------


async def test_an_admin_is_let_into_the_admin_api(world: World) -> None:
    response = await world.check(
        request("/api/drivers?limit=5", bearer(world.tokens["root"]), method="GET")
    )
    assert response.status.code == 0
    assert added(response) == {"x-spark-user": "root", "x-spark-groups": "platform"}
    assert list(response.ok_response.headers_to_remove) == ["authorization"]


async def test_a_non_admin_gets_403_and_a_missing_token_401_as_the_admin_api_says(
    world: World,
) -> None:
    code, http, headers, body = denied(
        await world.check(request("/api/sessions", bearer(world.tokens["alice"]), method="GET"))
    )
    assert (code, http, headers["content-type"]) == (7, 403, "application/json")
    assert json.loads(body) == {
        "error": "user 'alice' has no admin role (admin_users, admin_groups, or a policy role "
        "with admin: true)"
    }
    assert "grpc-status" not in headers
    # On the deny list: no admin, whatever the role.
    code, http, _, _ = denied(await world.check(request("/api", bearer(world.tokens["mallory"]))))
    assert (code, http) == (7, 403)
    code, http, _, body = denied(await world.check(request("/api/drivers", {}, method="GET")))
    assert (code, http) == (16, 401)
    assert json.loads(body)["error"].startswith(
        "the admin API needs the credentials of a user in admin_users, admin_groups or an admin "
        "role: no credentials"
    )


async def test_the_admin_api_is_closed_when_nobody_holds_the_role(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens.yaml"
    token = tokens.add(token_file, "alice")
    settings = load_settings(auth=["token"], token_file=token_file)
    judge = Judge(settings, Authenticator.from_settings(settings), None)
    code, http, _, body = denied(
        to_response(await judge.decide(request("/api/drivers", bearer(token))))
    )
    assert (code, http) == (7, 403)
    assert "the admin API is closed" in json.loads(body)["error"]
    # Without a policy file a known token goes through, with no pool of its own.
    response = to_response(await judge.decide(request(GRPC_PATH, bearer(token))))
    assert added(response) == {"x-spark-user": "alice"}


# --- what cannot be judged ----------------------------------------------------------------


async def test_an_unknown_path_is_permission_denied_naming_it(world: World) -> None:
    code, http, headers, body = denied(
        await world.check(request("/metrics", bearer(world.tokens["root"])))
    )
    assert (code, http, headers["grpc-status"]) == (7, 403, "7")
    assert "path '/metrics' is neither Spark Connect" in body


async def test_a_check_without_http_attributes_is_a_clear_denial(world: World) -> None:
    for req in (
        external_auth_pb2.CheckRequest(),
        external_auth_pb2.CheckRequest(
            attributes={"source": {"principal": "CN=alice"}, "request": {"time": {"seconds": 1}}}
        ),
    ):
        code, http, _, body = denied(await world.check(req))
        assert (code, http) == (7, 403)
        assert "carries no HTTP request attributes" in body


async def test_headers_over_the_metadata_bound_are_refused(world: World) -> None:
    headers = bearer(world.tokens["alice"], **{"x-big": "x" * 20_000})
    code, _, _, body = denied(await world.check(request(GRPC_PATH, headers)))
    assert code == 7
    assert "at most 16384 are accepted (max_metadata_bytes)" in body


async def test_headers_in_envoys_raw_header_map_are_read_too(world: World) -> None:
    req = request(GRPC_PATH)
    req.attributes.request.http.headers.clear()
    raw = req.attributes.request.http.header_map.headers
    raw.add(key="authorization", raw_value=f"Bearer {world.tokens['ann']}".encode())
    raw.add(key="x-spark-pool", raw_value=b"etl")
    response = await world.check(req)
    assert added(response) == {"x-spark-user": "ann"}


async def test_a_bug_is_an_internal_denial_not_a_crash(world: World, caplog: Any) -> None:
    code, http, _, body = denied(await world.check(object()))  # not even a CheckRequest
    assert (code, http) == (13, 500)
    assert body == "internal error (see the authz server's log)"
    assert "unexpected error" in caplog.text


# --- mtls from Envoy's source principal ---------------------------------------------------


async def test_mtls_identity_comes_from_the_source_principal(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auth mtls needs tls_client_auth require"):
        load_settings(auth=["mtls"])  # the router itself verifies client certificates
    settings = load_settings(for_authz=True, auth=["mtls"])
    judge = Judge(settings, Authenticator.from_settings(settings), None)
    response = to_response(await judge.decide(request(GRPC_PATH, principal="CN=carol,O=Example")))
    assert added(response) == {"x-spark-user": "carol"}
    code, _, _, body = denied(to_response(await judge.decide(request(GRPC_PATH))))
    assert (code, body) == (16, "spark-router: no credentials: present a client certificate")
    san = load_settings(for_authz=True, auth=["mtls"], mtls_user_from="san")
    judge = Judge(san, Authenticator.from_settings(san), None)
    response = to_response(
        await judge.decide(request(GRPC_PATH, principal="spiffe://example.org/dave"))
    )
    assert added(response) == {"x-spark-user": "spiffe://example.org/dave"}


def test_a_certificate_envoy_forwards_gives_cn_and_sans() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("erin.example", common_name="erin")
    pem = cert.cert_chain_pems[0].bytes().decode()
    req = request(GRPC_PATH, certificate=quote(pem))
    context = certificate_context(req.attributes.source)
    assert context["x509_common_name"] == [b"erin"]
    assert context["x509_subject_alternative_name"] == [b"erin.example"]
    assert certificate_context(request(GRPC_PATH, certificate="junk").attributes.source) == {}


def test_authz_needs_auth() -> None:
    settings = Settings()
    with pytest.raises(ConfigError, match="authz needs auth"):
        Judge(settings, Authenticator.from_settings(settings), None)


def test_grpc_message_is_percent_encoded_as_the_grpc_spec_says() -> None:
    assert grpc_message("pool 'bi' 100% \u2013 ok") == "pool 'bi' 100%25 %E2%80%93 ok"
