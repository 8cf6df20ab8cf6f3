"""Authenticators (router/admit/auth.py), the token file, is_admin and `spark-router token`."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry, Counter

from router.admit import tokens
from router.admit.auth import (
    ANONYMOUS,
    Authenticator,
    Credentials,
    Identity,
    _JwtMode,
    bearer,
    peer_ip,
)
from router.admit.policy import is_admin
from router.cli import cli
from router.config import ConfigError, Settings
from router.errors import Unauthenticated

SECRET = "s" * 40
ISSUER = "https://idp.example"
AUDIENCE = "spark"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SPARK_ROUTER_"):
            monkeypatch.delenv(key)


class Counts:
    """A private counter shaped like Telemetry().authentications."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.counter = Counter("auth", "test", ["mode", "result"], registry=self.registry)

    def __call__(self, mode: str, result: str) -> float:
        value = self.registry.get_sample_value("auth_total", {"mode": mode, "result": result})
        return value or 0.0


def creds(
    metadata: Mapping[str, str | bytes] | None = None,
    peer: str = "ipv4:127.0.0.1:5555",
    context: Mapping[str, Sequence[bytes]] | None = None,
) -> Credentials:
    return Credentials(dict(metadata or {}), lambda: peer, lambda: context or {})


def with_token(token: str, **more: str) -> Credentials:
    return creds({"authorization": f"Bearer {token}", **more})


def assert_no_secret(message: str, token: str) -> None:
    assert token not in message
    for i in range(0, max(len(token) - 8, 1), 3):
        assert token[i : i + 8] not in message, "the message quotes a part of the token"


async def refused(auth: Authenticator, c: Credentials) -> str:
    with pytest.raises(Unauthenticated) as info:
        await auth.authenticate(c)
    return str(info.value)


async def accepted_soon(auth: Authenticator, c: Credentials, timeout: float = 5.0) -> Identity:
    """Wait (bounded) until the call is accepted, e.g. after a background reload."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await auth.authenticate(c)
        except Unauthenticated:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


def write(path: Path, text: str) -> None:
    """Overwrite in place (same inode), as an editor might."""
    path.write_text(text)


# --- helpers: bearer, peer_ip ----------------------------------------------------------------


def test_bearer() -> None:
    assert bearer({"authorization": "Bearer abc"}) == "abc"
    assert bearer({"authorization": "bearer   abc  "}) == "abc"
    assert bearer({"authorization": b"Bearer abc"}) == "abc"
    assert bearer({"authorization": "Basic abc"}) is None
    assert bearer({"authorization": "Bearer "}) is None
    assert bearer({}) is None


def test_peer_ip() -> None:
    assert str(peer_ip("ipv4:10.1.2.3:5555")) == "10.1.2.3"
    assert str(peer_ip("ipv6:[::1]:5555")) == "::1"
    assert str(peer_ip("ipv6:%5B2001:db8::1%5D:5555")) == "2001:db8::1"
    assert str(peer_ip("ipv6:[::ffff:10.0.0.1]:1")) == "10.0.0.1"  # mapped → the IPv4 peer
    assert peer_ip("unix:/tmp/sock") is None
    assert peer_ip("ipv4:not-an-ip:1") is None


# --- none ------------------------------------------------------------------------------------


async def test_none_is_disabled_and_anonymous() -> None:
    auth = Authenticator.from_settings(Settings())
    assert not auth.enabled
    assert await auth.authenticate(creds()) == ANONYMOUS
    assert ANONYMOUS.mode == "none"


# --- token -----------------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return tmp_path / "tokens.yaml"


@pytest.fixture
async def token_auth(token_file: Path) -> AsyncIterator[tuple[Authenticator, str, Counts]]:
    token = tokens.add(token_file, "alice", ["analysts", "etl"])
    counts = Counts()
    auth = Authenticator.from_settings(
        Settings(auth=["token"], token_file=token_file),
        counts.counter,
        token_reload_seconds=0.02,
    )
    await auth.start()
    yield auth, token, counts
    await auth.close()


async def test_token_valid(token_auth: tuple[Authenticator, str, Counts]) -> None:
    auth, token, counts = token_auth
    identity = await auth.authenticate(with_token(token))
    assert identity == Identity("alice", frozenset({"analysts", "etl"}), "token")
    assert counts("token", "ok") == 1


async def test_token_unknown_and_missing(token_auth: tuple[Authenticator, str, Counts]) -> None:
    auth, token, counts = token_auth
    wrong = token[:-4] + "AAAA"
    message = await refused(auth, with_token(wrong))
    assert "unknown token" in message
    assert_no_secret(message, wrong)
    assert counts("token", "invalid") == 1
    message = await refused(auth, creds())
    assert "authorization: Bearer <token>" in message and "token=<token>" in message
    assert counts("token", "missing") == 1


async def test_token_file_reloaded_after_add_without_restart(
    token_auth: tuple[Authenticator, str, Counts], token_file: Path
) -> None:
    auth, first, _ = token_auth
    second = tokens.add(token_file, "bob")
    assert (await accepted_soon(auth, with_token(second))).user == "bob"
    assert (await auth.authenticate(with_token(first))).user == "alice"
    tokens.remove(token_file, "alice")
    deadline = time.monotonic() + 5
    while True:  # revocation takes effect on the next reload
        try:
            await auth.authenticate(with_token(first))
        except Unauthenticated:
            break
        assert time.monotonic() < deadline, "removed token still accepted"
        await asyncio.sleep(0.02)


async def test_broken_reload_keeps_old_tokens(
    token_auth: tuple[Authenticator, str, Counts],
    token_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth, token, _ = token_auth
    caplog.set_level(logging.WARNING, "router.admit.auth")
    write(token_file, "tokens: [ {sha256: nothex, user: x}\n  : : :\n")
    deadline = time.monotonic() + 5
    while not any("keeping the 1 tokens" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "no warning about the broken token file"
        await asyncio.sleep(0.02)
    assert (await auth.authenticate(with_token(token))).user == "alice"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per change, not one per check
    # A good write after a broken one is picked up.
    later = tokens.new_token()
    write(
        token_file,
        f"tokens:\n  - {{sha256: {tokens.token_hash(later)}, user: carol, groups: [g]}}\n",
    )
    assert (await accepted_soon(auth, with_token(later))).user == "carol"


def test_token_file_missing_at_startup_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        Authenticator.from_settings(Settings(auth=["token"], token_file=path))


def test_token_file_holds_hashes_only(token_file: Path) -> None:
    token = tokens.add(token_file, "alice", ["a"])
    assert token.startswith(tokens.TOKEN_PREFIX) and len(token) > 40
    text = token_file.read_text()
    assert token not in text and tokens.token_hash(token) in text
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert tokens.load(token_file) == {tokens.token_hash(token): ("alice", frozenset({"a"}))}
    (entry,) = tokens.list_entries(token_file)
    assert entry.user == "alice" and dt.datetime.fromisoformat(entry.created).tzinfo is not None


def test_remove_by_user_or_hash_prefix(token_file: Path) -> None:
    a1 = tokens.add(token_file, "alice")
    tokens.add(token_file, "alice")
    b = tokens.add(token_file, "bob")
    assert len(tokens.remove(token_file, "alice")) == 2
    with pytest.raises(tokens.TokenFileError, match="no user"):
        tokens.remove(token_file, "alice")
    with pytest.raises(tokens.TokenFileError, match="no user or token hash"):
        tokens.remove(token_file, tokens.token_hash(a1)[:8])
    (gone,) = tokens.remove(token_file, tokens.token_hash(b)[:8])
    assert gone.user == "bob" and tokens.load(token_file) == {}


# --- jwt -------------------------------------------------------------------------------------


def claims(**more: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "groups": ["analysts"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
    }
    base.update(more)
    return {k: v for k, v in base.items() if v is not None}


def hs(**more: Any) -> str:
    return jwt.encode(claims(**more), SECRET, algorithm="HS256")


def hs_auth(counts: Counts, clock: Callable[[], float] = time.time) -> Authenticator:
    settings = Settings(auth=["jwt"], jwt_secret=SECRET, jwt_issuer=ISSUER, jwt_audience=[AUDIENCE])
    return Authenticator.from_settings(settings, counts.counter, clock=clock)


async def test_jwt_hs256_valid_and_cached() -> None:
    counts = Counts()
    auth = hs_auth(counts)
    token = hs(groups="a, b c")
    identity = await auth.authenticate(with_token(token))
    assert identity == Identity("alice", frozenset({"a", "b", "c"}), "jwt")
    assert await auth.authenticate(with_token(token)) == identity
    assert (counts("jwt", "ok"), counts("jwt", "cached")) == (1, 1)


@pytest.mark.parametrize(
    ("token", "expected", "result"),
    [
        (lambda: hs(exp=int(time.time()) - 120), "expired", "expired"),
        (lambda: hs(nbf=int(time.time()) + 120), "not yet valid", "invalid"),
        (lambda: hs(aud="other"), "another audience", "invalid"),
        (lambda: hs(iss="https://evil.example"), "another issuer", "invalid"),
        (lambda: hs(exp=None), "no exp claim", "invalid"),
        (lambda: hs(sub=None), "no user", "invalid"),
        (
            lambda: jwt.encode(claims(), "x" * 40, algorithm="HS256"),
            "signature does not verify",
            "invalid",
        ),
        (lambda: hs()[:-6] + "AAAAAA", "signature does not verify", "invalid"),
        (lambda: "ey.not.jwt", "malformed", "invalid"),
    ],
)
async def test_jwt_refusals(token: Callable[[], str], expected: str, result: str) -> None:
    counts = Counts()
    auth = hs_auth(counts)
    bad = token()
    message = await refused(auth, with_token(bad))
    assert expected in message
    assert_no_secret(message, bad)
    assert counts("jwt", result) == 1 and counts("jwt", "ok") == 0


async def test_jwt_leeway_accepts_small_skew() -> None:
    auth = hs_auth(Counts())
    # 10 s past exp, within the default 30 s leeway.
    assert (await auth.authenticate(with_token(hs(exp=int(time.time()) - 10)))).user == "alice"


async def test_jwt_cached_token_refused_once_expired() -> None:
    now = [time.time()]
    counts = Counts()
    auth = hs_auth(counts, clock=lambda: now[0])
    exp = int(time.time()) + 60
    token = hs(exp=exp)
    await auth.authenticate(with_token(token))
    await auth.authenticate(with_token(token))
    assert counts("jwt", "cached") == 1
    now[0] = exp + 31  # past exp and the 30 s leeway, by the injected clock
    assert "expired" in await refused(auth, with_token(token))
    assert counts("jwt", "expired") == 1


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def test_jwt_rs256_with_key_file(tmp_path: Path) -> None:
    key, other = rsa_key(), rsa_key()
    pem = tmp_path / "idp.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    counts = Counts()
    auth = Authenticator.from_settings(
        Settings(auth=["jwt"], jwt_key_file=pem, jwt_audience=[AUDIENCE]), counts.counter
    )
    good = jwt.encode(claims(), key, algorithm="RS256")
    assert (await auth.authenticate(with_token(good))).user == "alice"
    forged = jwt.encode(claims(sub="mallory"), other, algorithm="RS256")
    assert "signature does not verify" in await refused(auth, with_token(forged))
    # An HS256 token "signed" with the public key is the classic confusion attack: refused.
    assert "algorithm not accepted" in await refused(auth, with_token(hs()))
    expired = jwt.encode(claims(exp=int(time.time()) - 100), key, algorithm="RS256")
    assert "expired" in await refused(auth, with_token(expired))


def test_jwt_short_secret_and_bad_key_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        Authenticator.from_settings(Settings(auth=["jwt"], jwt_secret="short"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        Authenticator.from_settings(Settings(auth=["jwt"], jwt_key_file=bad))


def jwk(key: rsa.RSAPrivateKey, kid: str) -> jwt.PyJWK:
    data = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return jwt.PyJWK({**data, "kid": kid, "alg": "RS256", "use": "sig"})


async def test_jwt_unknown_kid_refreshes_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    k1, k2 = rsa_key(), rsa_key()
    served = {"k1": jwk(k1, "k1")}
    fetches = []

    async def fetch(self: _JwtMode) -> dict[str, jwt.PyJWK]:
        fetches.append(1)
        return dict(served)

    monkeypatch.setattr(_JwtMode, "_fetch_keys", fetch)
    mono = [1000.0]
    counts = Counts()
    auth = Authenticator.from_settings(
        Settings(auth=["jwt"], jwt_jwks_url="https://idp.example/jwks"),
        counts.counter,
        monotonic=lambda: mono[0],
    )
    await auth.start()
    try:
        assert len(fetches) == 1
        t1 = jwt.encode(claims(), k1, algorithm="RS256", headers={"kid": "k1"})
        assert (await auth.authenticate(with_token(t1))).user == "alice"
        t2 = jwt.encode(claims(sub="bob"), k2, algorithm="RS256", headers={"kid": "k2"})
        message = await refused(auth, with_token(t2))  # unknown: one refresh, still unknown
        assert "unknown signing key" in message and len(fetches) == 2
        served["k2"] = jwk(k2, "k2")  # the issuer rotates
        await refused(auth, with_token(t2))  # within 10 s of the last refresh: none
        assert len(fetches) == 2
        mono[0] += 11
        assert (await auth.authenticate(with_token(t2))).user == "bob"
        assert len(fetches) == 3
    finally:
        await auth.close()


# --- trusted-header --------------------------------------------------------------------------


def header_auth(counts: Counts) -> Authenticator:
    settings = Settings(auth=["trusted-header"], trusted_proxies=["10.0.0.0/8", "::1"])
    return Authenticator.from_settings(settings, counts.counter)


@pytest.mark.parametrize(
    "peer",
    ["ipv4:10.1.2.3:4444", "ipv6:[::1]:5555", "ipv6:%5B::1%5D:5555", "ipv6:[::ffff:10.0.0.9]:1"],
)
async def test_trusted_header_from_trusted_peer(peer: str) -> None:
    counts = Counts()
    identity = await header_auth(counts).authenticate(
        creds({"x-spark-user": "alice", "x-spark-groups": "a, b,,"}, peer=peer)
    )
    assert identity == Identity("alice", frozenset({"a", "b"}), "trusted-header")
    assert counts("trusted-header", "ok") == 1


@pytest.mark.parametrize(
    "peer", ["ipv4:192.168.1.1:4444", "ipv6:[2001:db8::1]:5555", "unix:/tmp/s", "ipv4:11.0.0.1:1"]
)
async def test_trusted_header_from_other_peer_is_refused(peer: str) -> None:
    counts = Counts()
    message = await refused(header_auth(counts), creds({"x-spark-user": "admin"}, peer=peer))
    assert "only accepted from trusted_proxies; this peer is not one" in message
    assert counts("trusted-header", "refused") == 1


async def test_trusted_header_empty_user_is_invalid() -> None:
    assert "is empty" in await refused(
        header_auth(Counts()), creds({"x-spark-user": " "}, peer="ipv4:10.0.0.1:1")
    )


# --- mtls ------------------------------------------------------------------------------------


def mtls_settings(tmp_path: Path, **more: Any) -> Settings:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    return Settings(
        tls_cert_file=tmp_path / "cert.pem",
        tls_key_file=tmp_path / "key.pem",
        tls_client_ca_file=tmp_path / "ca.pem",
        tls_client_auth="require",
        **more,
    )


CERT_CONTEXT = {
    "transport_security_type": [b"ssl"],
    "x509_common_name": [b"alice"],
    "x509_subject_alternative_name": [b"alice.svc.example", b"other.example"],
    "x509_pem_cert": [b"-----BEGIN CERTIFICATE-----..."],
}


@pytest.mark.parametrize(("source", "user"), [("cn", "alice"), ("san", "alice.svc.example")])
async def test_mtls_cn_and_san(tmp_path: Path, source: str, user: str) -> None:
    counts = Counts()
    auth = Authenticator.from_settings(
        mtls_settings(tmp_path, auth=["mtls"], mtls_user_from=source), counts.counter
    )
    assert await auth.authenticate(creds(context=CERT_CONTEXT)) == Identity(
        user, frozenset(), "mtls"
    )
    assert counts("mtls", "ok") == 1
    # No certificate: absent (the only mode, so: missing, saying what to present).
    assert "client certificate" in await refused(
        auth, creds(context={"transport_security_type": [b"ssl"]})
    )
    assert counts("mtls", "missing") == 1


async def test_mtls_certificate_without_san_is_invalid(tmp_path: Path) -> None:
    auth = Authenticator.from_settings(mtls_settings(tmp_path, auth=["mtls"], mtls_user_from="san"))
    context = {k: v for k, v in CERT_CONTEXT.items() if k != "x509_subject_alternative_name"}
    assert "no subject alternative name" in await refused(auth, creds(context=context))


# --- the chain -------------------------------------------------------------------------------


async def test_chain_token_then_jwt(token_file: Path) -> None:
    token = tokens.add(token_file, "alice")
    counts = Counts()
    auth = Authenticator.from_settings(
        Settings(auth=["token", "jwt"], token_file=token_file, jwt_secret=SECRET),
        counts.counter,
    )
    assert auth.modes == ("token", "jwt")
    assert (await auth.authenticate(with_token(token))).mode == "token"
    assert (await auth.authenticate(with_token(hs(aud=None, sub="bob")))).mode == "jwt"
    # A bad router token is the token mode's to refuse; it is not tried as a JWT.
    assert "unknown token" in await refused(auth, with_token(tokens.new_token()))
    # A bad JWT is the jwt mode's; it is not looked up as a router token.
    assert "another issuer" not in await refused(auth, with_token(hs(exp=1)))
    assert counts("jwt", "expired") == 1


async def test_chain_bad_credential_does_not_fall_through(token_file: Path, tmp_path: Path) -> None:
    token = tokens.add(token_file, "alice")
    # A bad token is refused though a trusted proxy vouches for someone after it.
    auth = Authenticator.from_settings(
        Settings(
            auth=["token", "trusted-header"], token_file=token_file, trusted_proxies=["127.0.0.1"]
        )
    )
    bad = tokens.new_token()
    message = await refused(auth, with_token(bad, **{"x-spark-user": "alice"}))
    assert "unknown token" in message
    assert_no_secret(message, bad)
    # A forged header from an untrusted peer is refused though a good token follows it.
    auth = Authenticator.from_settings(
        Settings(
            auth=["trusted-header", "token"], token_file=token_file, trusted_proxies=["10.0.0.0/8"]
        )
    )
    assert "trusted_proxies" in await refused(auth, with_token(token, **{"x-spark-user": "root"}))
    # Absent header: the token is next in line.
    assert (await auth.authenticate(with_token(token))).user == "alice"


async def test_chain_mtls_then_token(token_file: Path, tmp_path: Path) -> None:
    token = tokens.add(token_file, "tok-user")
    auth = Authenticator.from_settings(
        mtls_settings(tmp_path, auth=["mtls", "token"], token_file=token_file)
    )
    assert (await auth.authenticate(creds(context=CERT_CONTEXT))).user == "alice"
    no_cert = Credentials(
        {"authorization": f"Bearer {token}"}, lambda: "ipv4:1.2.3.4:5", lambda: {}
    )
    assert (await auth.authenticate(no_cert)).user == "tok-user"
    message = await refused(auth, creds())
    assert "authorization: Bearer <token>" in message and "client certificate" in message


# --- policy ----------------------------------------------------------------------------------


def test_is_admin() -> None:
    settings = Settings(admin_users=["root"], admin_groups=["ops"])
    assert is_admin(Identity("root", frozenset(), "token"), settings)
    assert is_admin(Identity("bob", frozenset({"dev", "ops"}), "jwt"), settings)
    assert not is_admin(Identity("bob", frozenset({"dev"}), "jwt"), settings)
    assert not is_admin(ANONYMOUS, Settings(admin_users=[""]))


# --- spark-router token ----------------------------------------------------------------------


def test_cli_token_add_list_remove(token_file: Path) -> None:
    runner = CliRunner()
    added = runner.invoke(
        cli,
        ["token", "add", "alice", "--group", "a", "--group", "b", "--token-file", str(token_file)],
    )
    assert added.exit_code == 0, added.output
    token = added.stdout.strip()
    assert token.startswith("ssr_") and "\n" not in token  # the token alone on stdout
    assert "token=<the token above>" in added.stderr and token not in added.stderr
    assert tokens.load(token_file) == {tokens.token_hash(token): ("alice", frozenset({"a", "b"}))}
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    listed = runner.invoke(cli, ["token", "list", "--token-file", str(token_file)])
    assert listed.exit_code == 0, listed.output
    digest = tokens.token_hash(token)
    assert "alice" in listed.stdout and "a,b" in listed.stdout and digest[:12] in listed.stdout
    assert token not in listed.output and digest not in listed.output

    removed = runner.invoke(cli, ["token", "remove", digest[:10], "--token-file", str(token_file)])
    assert removed.exit_code == 0, removed.output
    assert "alice" in removed.stdout and tokens.load(token_file) == {}
    again = runner.invoke(cli, ["token", "remove", "alice", "--token-file", str(token_file)])
    assert again.exit_code == 1 and "no user" in again.stderr


def test_cli_token_file_from_settings_or_a_clear_error(
    token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli, ["token", "list"])
    assert missing.exit_code == 2 and "no token file" in missing.stderr
    monkeypatch.setenv("SPARK_ROUTER_TOKEN_FILE", str(token_file))
    assert runner.invoke(cli, ["token", "add", "bob"]).exit_code == 0
    listed = runner.invoke(cli, ["token", "list", "--json"])
    assert listed.exit_code == 0 and '"user": "bob"' in listed.stdout


async def test_mtls_with_a_real_grpc_handshake(tmp_path: Path) -> None:
    """The auth_context keys read are the ones grpc really fills in."""
    import grpc
    import grpc.aio
    import trustme

    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("alice.svc.example", common_name="alice")
    auth = Authenticator.from_settings(mtls_settings(tmp_path, auth=["mtls"]))
    seen: list[Identity] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        c = Credentials(
            dict(context.invocation_metadata() or ()), context.peer, context.auth_context
        )
        seen.append(await auth.authenticate(c))
        return b"ok"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}
            ),
        )
    )
    key_and_chain = (server_cert.private_key_pem.bytes(), server_cert.cert_chain_pems[0].bytes())
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [key_and_chain], root_certificates=ca.cert_pem.bytes(), require_client_auth=True
        ),
    )
    await server.start()
    try:
        channel_creds = grpc.ssl_channel_credentials(
            ca.cert_pem.bytes(),
            client_cert.private_key_pem.bytes(),
            client_cert.cert_chain_pems[0].bytes(),
        )
        async with grpc.aio.secure_channel(f"localhost:{port}", channel_creds) as channel:
            assert await channel.unary_unary("/t.T/M")(b"x", timeout=10) == b"ok"
    finally:
        await server.stop(None)
    assert seen == [Identity("alice", frozenset(), "mtls")]
