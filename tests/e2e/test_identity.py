"""Who is calling, proven with real Spark drivers and the real pyspark client.

Each router is `spark-router serve` in a subprocess (env SPARK_ROUTER_* settings) in front of
the session's two drivers. Each pyspark client runs in a subprocess too: gRPC reads its test
CA from GRPC_DEFAULT_SSL_ROOTS_FILE_PATH once, when first used in a process. A client prints
one JSON line per statement it ran (its rows); an error ends it with a traceback on stderr.
Clients that do not depend on each other run at the same time.

Which user the driver saw: Spark Connect's `current_user()` is the driver JVM's OS user, not
the caller's user_context.user_id, so it shows nothing here. A driver keys sessions by
(user_id, session_id), so the client makes a temp view `whoami` in a session id of its own
and reports its driver; the test then asks that driver directly, as each candidate user with
that session id, whether the view is there. Only the user the router made of the caller has it.
That check is plain gRPC straight to the driver, so it runs in the test's own process.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import jwt
import pytest
import trustme
from pyspark.sql import SparkSession

from router.admit import tokens
from router.local import LocalDrivers
from tests.e2e.secure import write_leaf
from tests.helpers import ROOT, free_port, spawn, stderr_of, stderr_text, stop, wait_until

CLIENT_TIMEOUT = 120.0
JWT_SECRET = "e2e-identity-hs256-secret-of-at-least-32-bytes"
JWT_ISSUER = "https://idp.e2e.example"
JWT_AUDIENCE = "spark-router-e2e"
PORT_CONF = "spark.connect.grpc.binding.port"

CLIENT = textwrap.dedent(
    """
    import json, os, sys

    import grpc
    from pyspark.sql.connect.client.core import DefaultChannelBuilder
    from pyspark.sql.connect.session import SparkSession

    spec = json.loads(sys.argv[1])
    builder = SparkSession.builder
    if spec.get("client_cert"):
        cert, key = spec["client_cert"]

        class ClientCertChannel(DefaultChannelBuilder):
            # TLS with a client certificate: pyspark's URL has no parameter for one.
            def toChannel(self):
                with open(os.environ["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"], "rb") as f:
                    roots = f.read()
                with open(key, "rb") as f:
                    private_key = f.read()
                with open(cert, "rb") as f:
                    chain = f.read()
                creds = grpc.ssl_channel_credentials(roots, private_key, chain)
                return self._secure_channel(self.endpoint, creds)

        builder = builder.channelBuilder(ClientCertChannel(spec["url"]))
    else:
        builder = builder.remote(spec["url"])
    spark = builder.create()
    if not spec.get("retries", True):
        spark.client.set_retry_policies([])  # fail at once instead of retrying for minutes
    print(json.dumps({"session_id": spark.session_id}), flush=True)
    for statement in spec["sql"]:
        rows = [list(row) for row in spark.sql(statement).collect()]
        print(json.dumps({"rows": rows}), flush=True)
    if spec.get("keep_session"):
        os._exit(0)  # no spark.stop(): the session is not released
    spark.stop()
    """
)


@dataclass
class Run:
    """What one pyspark client process did."""

    code: int
    stderr: str
    session_id: str | None = None
    results: list[list[list[Any]]] = field(default_factory=list)  # rows of each statement

    def __str__(self) -> str:
        return f"exit {self.code}, results {self.results}\nstderr:\n{self.stderr[-4000:]}"


def pyspark(
    url: str,
    *sql: str,
    roots: Path | None = None,
    client_cert: tuple[Path, Path] | None = None,
    retries: bool = True,
    keep_session: bool = False,
) -> dict[str, Any]:
    """The spec of one client run: connect to `url`, run each statement and collect it."""
    return {
        "url": url,
        "sql": list(sql),
        "roots": str(roots) if roots else None,
        "client_cert": [str(p) for p in client_cert] if client_cert else None,
        "retries": retries,
        "keep_session": keep_session,
    }


def run_clients(*specs: dict[str, Any]) -> list[Run]:
    """Run the clients at the same time, each in its own process; their Runs, in order."""
    procs = []
    for spec in specs:
        env = dict(os.environ)
        env.pop("SPARK_CONNECT_AUTHENTICATE_TOKEN", None)
        env.pop("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", None)
        if spec["roots"]:
            env["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = spec["roots"]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, json.dumps(spec)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + CLIENT_TIMEOUT
    runs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            run = Run(proc.returncode, err)
            for line in out.splitlines():
                if line.startswith("{"):
                    doc = json.loads(line)
                    if "session_id" in doc:
                        run.session_id = doc["session_id"]
                    else:
                        run.results.append(doc["rows"])
            runs.append(run)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return runs


def run_client(spec: dict[str, Any]) -> Run:
    """Run one client."""
    return run_clients(spec)[0]


class Router:
    """`spark-router serve` on 127.0.0.1 in front of the session's drivers, in a subprocess."""

    def __init__(self, drivers: LocalDrivers, **env: str) -> None:
        self.port = free_port()
        args = ["-m", "router.cli", "serve", "--listen", f"127.0.0.1:{self.port}"]
        for address in drivers.addresses:
            args += ["--driver", address]
        settings = {"SPARK_ROUTER_ADMIN_LISTEN": "127.0.0.1:0", "SPARK_ROUTER_LOG_LEVEL": "info"}
        settings.update(env)
        self.proc: subprocess.Popen[str] = spawn(args, env=settings)
        self.url = f"sc://127.0.0.1:{self.port}/"

    def wait_listening(self) -> Router:
        wait_until(self._listening, 30, f"the router on {self.port} to listen")
        assert self.proc.poll() is None, stderr_of(self.proc)
        return self

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0 or self.proc.poll() is not None

    def log(self) -> str:
        """What the router logged so far."""
        return stderr_text(self.proc)

    def stop(self) -> None:
        assert stop(self.proc) == 0, stderr_of(self.proc)


class Routers:
    """Routers started together (each costs an interpreter start-up), stopped on exit."""

    def __init__(self, drivers: LocalDrivers, *envs: dict[str, str]) -> None:
        self.routers = [Router(drivers, **env) for env in envs]

    def __enter__(self) -> list[Router]:
        try:
            for router in self.routers:
                router.wait_listening()
        except BaseException:
            self._stop_all()
            raise
        return self.routers

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop_all()

    def _stop_all(self) -> None:
        errors = []
        for router in self.routers:
            try:
                router.stop()
            except BaseException as error:  # stop every router, then report
                errors.append(error)
        if errors:
            raise errors[0]


@dataclass(frozen=True)
class Certs:
    server_ca: Path  # what clients trust
    server_cert: Path
    server_key: Path
    client_ca: Path  # what the mTLS router trusts
    dave_cert: Path
    dave_key: Path
    stranger_cert: Path  # a CN=dave certificate from a CA the router does not trust
    stranger_key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("identity-certs")
    server_ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server_ca.cert_pem.write_to_path(str(directory / "server-ca.pem"))
    client_ca.cert_pem.write_to_path(str(directory / "client-ca.pem"))
    server = write_leaf(server_ca, directory, "router", "127.0.0.1", "localhost")
    dave = write_leaf(client_ca, directory, "dave", "dave@example", common_name="dave")
    stranger = write_leaf(other_ca, directory, "stranger", "dave@example", common_name="dave")
    roots, client_roots = directory / "server-ca.pem", directory / "client-ca.pem"
    return Certs(roots, *server, client_roots, *dave, *stranger)


@dataclass(frozen=True)
class Tokens:
    file: Path
    alice: str
    mallory: str


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> Tokens:
    path = tmp_path_factory.mktemp("identity-tokens") / "tokens.yaml"
    return Tokens(path, tokens.add(path, "alice", ["analysts"]), tokens.add(path, "mallory", []))


def _tls(certs: Certs) -> dict[str, str]:
    return {
        "SPARK_ROUTER_TLS_CERT_FILE": str(certs.server_cert),
        "SPARK_ROUTER_TLS_KEY_FILE": str(certs.server_key),
    }


def _token_auth(certs: Certs, issued: Tokens, **extra: str) -> dict[str, str]:
    return {
        **_tls(certs),
        "SPARK_ROUTER_AUTH": "token",
        "SPARK_ROUTER_TOKEN_FILE": str(issued.file),
        **extra,
    }


@pytest.fixture(scope="module")
def token_router(spark_drivers: LocalDrivers, certs: Certs, issued: Tokens) -> Iterator[Router]:
    """TLS, auth token, identity rewrite (the default)."""
    with Routers(spark_drivers, _token_auth(certs, issued)) as (router,):
        yield router


def _failed(run: Run, code: str) -> None:
    """The client failed with gRPC status `code` before any statement returned."""
    assert run.code != 0, run
    assert f"StatusCode.{code}" in run.stderr, run
    assert run.results == [], run


WHOAMI = ("CREATE TEMP VIEW whoami AS SELECT 1", f"SET {PORT_CONF}")


@dataclass(frozen=True)
class Whoami:
    """A whoami client's URL: a fresh session id of its own, and a claimed user_id."""

    url: str
    session: str
    claimed: str


def whoami(base: str, claimed: str = "pyspark-user") -> Whoami:
    """Connect to `base` claiming user `claimed`, in a fresh session id.

    Run it with `keep_session=True`: a released session's id stays closed on the driver.
    """
    session = str(uuid.uuid4())
    return Whoami(f"{base};user_id={claimed};session_id={session}", session, claimed)


def _has_whoami(port: int, user: str, session: str) -> bool:
    """Whether the driver's session (user, session) holds the whoami view (asked directly)."""
    url = f"sc://127.0.0.1:{port}/;user_id={user};session_id={session}"
    spark = SparkSession.builder.remote(url).create()
    try:
        return bool(spark.catalog.tableExists("whoami"))
    finally:
        spark.stop()


def assert_ran_as(run: Run, probe: Whoami, user: str) -> None:
    """The whoami client's session on its driver is `user`'s, not the claimed user's."""
    assert run.code == 0 and len(run.results) == 2, run
    assert run.session_id == probe.session, run
    port = int(run.results[1][0][1])
    assert user != probe.claimed
    assert not _has_whoami(port, probe.claimed, probe.session), f"{probe.claimed} has it: {run}"
    assert _has_whoami(port, user, probe.session), f"{user} has not: {run}"


def test_token_auth_admits_a_known_token_and_says_what_to_send(
    token_router: Router, certs: Certs, issued: Tokens
) -> None:
    base = f"{token_router.url};use_ssl=true"
    unknown = tokens.new_token()
    ok, missing, wrong = run_clients(
        pyspark(f"{base};token={issued.alice}", "select 1", roots=certs.server_ca),
        pyspark(base, "select 1", roots=certs.server_ca),
        pyspark(f"{base};token={unknown}", "select 1", roots=certs.server_ca),
    )
    assert ok.code == 0 and ok.results == [[[1]]], f"{ok}\n{token_router.log()[-3000:]}"

    _failed(missing, "UNAUTHENTICATED")
    assert "authorization: Bearer <token>" in missing.stderr, missing
    assert ";token=<token>" in missing.stderr, missing

    _failed(wrong, "UNAUTHENTICATED")
    assert "unknown token" in wrong.stderr and "spark-router token add" in wrong.stderr, wrong
    for secret in (unknown, unknown[len(tokens.TOKEN_PREFIX) :][:12], issued.alice):
        assert secret not in wrong.stderr, wrong
        assert secret not in token_router.log()


def _jwt(sub: str, *, exp_in: float = 600, audience: str = JWT_AUDIENCE) -> str:
    now = dt.datetime.now(dt.timezone.utc)
    claims = {
        "sub": sub,
        "iss": JWT_ISSUER,
        "aud": audience,
        "iat": now - dt.timedelta(seconds=1200),
        "exp": now + dt.timedelta(seconds=exp_in),
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def test_jwt_auth_runs_as_the_subject_and_refuses_expired_or_foreign_tokens(
    spark_drivers: LocalDrivers, certs: Certs
) -> None:
    env = {
        **_tls(certs),
        "SPARK_ROUTER_AUTH": "jwt",
        "SPARK_ROUTER_JWT_SECRET": JWT_SECRET,
        "SPARK_ROUTER_JWT_ISSUER": JWT_ISSUER,
        "SPARK_ROUTER_JWT_AUDIENCE": JWT_AUDIENCE,
    }
    expired = _jwt("erin", exp_in=-600)  # well past the 30 s leeway
    foreign = _jwt("erin", audience="another-service")
    with Routers(spark_drivers, env) as (router,):
        probe = whoami(f"{router.url};use_ssl=true;token={_jwt('erin')}")
        base = f"{router.url};use_ssl=true;token="
        ok, old, other = run_clients(
            pyspark(probe.url, *WHOAMI, keep_session=True, roots=certs.server_ca),
            pyspark(base + expired, "select 1", roots=certs.server_ca),
            pyspark(base + foreign, "select 1", roots=certs.server_ca),
        )
        log = router.log()
    assert_ran_as(ok, probe, "erin")
    _failed(old, "UNAUTHENTICATED")
    assert "token expired" in old.stderr, old
    _failed(other, "UNAUTHENTICATED")
    assert f"another audience (accepted: {JWT_AUDIENCE})" in other.stderr, other
    for token, run in ((expired, old), (foreign, other)):
        signature = token.rsplit(".", 1)[1]
        assert signature not in run.stderr and signature not in log, run


def test_trusted_header_is_believed_only_from_trusted_proxies(
    spark_drivers: LocalDrivers,
) -> None:
    trusted = {
        "SPARK_ROUTER_AUTH": "trusted-header",
        "SPARK_ROUTER_TRUSTED_PROXIES": "127.0.0.1/32",
    }
    elsewhere = {**trusted, "SPARK_ROUTER_TRUSTED_PROXIES": "127.0.0.2/32"}
    with Routers(spark_drivers, trusted, elsewhere) as (near, far):
        probe = whoami(f"{near.url};x-spark-user=carol")
        believed, refused = run_clients(
            pyspark(probe.url, *WHOAMI, keep_session=True),
            pyspark(f"{far.url};x-spark-user=carol", "select 1"),
        )
    assert_ran_as(believed, probe, "carol")
    _failed(refused, "UNAUTHENTICATED")
    assert "only accepted from trusted_proxies" in refused.stderr, refused


def test_mtls_runs_as_the_certificates_cn_and_refuses_a_client_without_one(
    spark_drivers: LocalDrivers, certs: Certs
) -> None:
    env = {
        **_tls(certs),
        "SPARK_ROUTER_TLS_CLIENT_CA_FILE": str(certs.client_ca),
        "SPARK_ROUTER_TLS_CLIENT_AUTH": "require",
        "SPARK_ROUTER_AUTH": "mtls",
    }
    with Routers(spark_drivers, env) as (router,):
        base = f"{router.url};use_ssl=true"
        probe = whoami(base)
        dave, anonymous, stranger = run_clients(
            pyspark(
                probe.url,
                *WHOAMI,
                keep_session=True,
                roots=certs.server_ca,
                client_cert=(certs.dave_cert, certs.dave_key),
            ),
            pyspark(base, "select 1", roots=certs.server_ca, retries=False),
            pyspark(
                base,
                "select 1",
                roots=certs.server_ca,
                client_cert=(certs.stranger_cert, certs.stranger_key),
                retries=False,
            ),
        )
    assert_ran_as(dave, probe, "dave")
    # No certificate, or one from a CA the router does not trust: the handshake fails, so
    # no call reaches the router (it would answer UNAUTHENTICATED, "present a client ...").
    for refused in (anonymous, stranger):
        _failed(refused, "UNAVAILABLE")
        assert "failed to connect to all addresses" in refused.stderr, refused


def test_a_claimed_user_is_rewritten_or_refused(
    spark_drivers: LocalDrivers, token_router: Router, certs: Certs, issued: Tokens
) -> None:
    reject = _token_auth(certs, issued, SPARK_ROUTER_IDENTITY="reject")
    alice = f";use_ssl=true;token={issued.alice}"
    with Routers(spark_drivers, reject) as (strict,):
        probe = whoami(f"{token_router.url}{alice}", claimed="root")
        rewritten, refused, honest = run_clients(
            pyspark(probe.url, *WHOAMI, keep_session=True, roots=certs.server_ca),
            pyspark(f"{strict.url}{alice};user_id=root", "select 1", roots=certs.server_ca),
            pyspark(f"{strict.url}{alice};user_id=alice", "select 1", roots=certs.server_ca),
        )
        log = strict.log()
    assert_ran_as(rewritten, probe, "alice")
    _failed(refused, "PERMISSION_DENIED")
    assert "claims user_id 'root'" in refused.stderr, refused
    assert "authenticated as 'alice'" in refused.stderr, refused
    assert honest.code == 0 and honest.results == [[[1]]], f"{honest}\n{log[-3000:]}"


def test_another_user_cannot_take_over_a_session_on_any_replica(
    spark_drivers: LocalDrivers, certs: Certs, issued: Tokens, redis_url: str
) -> None:
    env = _token_auth(certs, issued, SPARK_ROUTER_REGISTRY=redis_url)
    session = str(uuid.uuid4())
    with Routers(spark_drivers, env, env) as (one, two):
        alice = f";use_ssl=true;token={issued.alice};session_id={session}"
        mallory = f";use_ssl=true;token={issued.mallory};session_id={session}"
        created = run_client(
            pyspark(
                one.url + alice,
                "CREATE TEMP VIEW secret AS SELECT 42 AS v",
                "SELECT v FROM secret",
                roots=certs.server_ca,
                keep_session=True,
            )
        )
        assert created.code == 0 and created.results == [[], [[42]]], (
            f"{created}\n{one.log()[-3000:]}"
        )
        assert created.session_id == session
        # mallory, claiming alice on one replica and herself on the other.
        here, there = run_clients(
            pyspark(
                f"{one.url}{mallory};user_id=alice", "SELECT v FROM secret", roots=certs.server_ca
            ),
            pyspark(
                f"{two.url}{mallory};user_id=mallory", "SELECT v FROM secret", roots=certs.server_ca
            ),
        )
        for run in (here, there):
            _failed(run, "PERMISSION_DENIED")
            assert f"session {session} belongs to another user" in run.stderr, run
        # alice's session is untouched, and the other replica serves it to her.
        again = run_client(pyspark(two.url + alice, "SELECT v FROM secret", roots=certs.server_ca))
        assert again.code == 0 and again.results == [[[42]]], f"{again}\n{two.log()[-3000:]}"
        assert again.session_id == session
