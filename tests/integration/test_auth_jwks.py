"""JWT auth against a real (local) OIDC issuer: discovery, JWKS, key rotation, outages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from router.admit.auth import Authenticator, Credentials, Identity
from router.config import Settings
from router.errors import Unauthenticated
from tests.helpers import eventually, free_port

AUDIENCE = "spark"


class Issuer:
    """An OIDC issuer on 127.0.0.1: discovery document and a JWKS the test can change."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.keys: dict[str, Any] = {}  # kid → private key
        self.served: list[str] = []  # the kids the JWKS lists now
        self.jwks_hits = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_key(self, kid: str, key: Any | None = None, serve: bool = True) -> None:
        self.keys[kid] = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if serve:
            self.served.append(kid)

    def sign(self, kid: str, **claims: Any) -> str:
        now = int(time.time())
        body = {"sub": "alice", "iss": self.url, "aud": AUDIENCE, "iat": now, "exp": now + 300}
        body.update(claims)
        key = self.keys[kid]
        alg = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

    def _jwk(self, kid: str) -> dict[str, Any]:
        key = self.keys[kid]
        if isinstance(key, ec.EllipticCurvePrivateKey):
            data = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            return {**data, "kid": kid, "alg": "ES256", "use": "sig"}
        data = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        return {**data, "kid": kid, "alg": "RS256", "use": "sig"}

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/keys"})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        return web.json_response({"keys": [self._jwk(kid) for kid in self.served]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/keys", self._jwks)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Issuer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    async with Issuer() as i:
        i.add_key("k1")
        yield i


def call(token: str) -> Credentials:
    return Credentials({"authorization": f"Bearer {token}"}, lambda: "ipv4:127.0.0.1:1", lambda: {})


def settings_for(issuer: Issuer, **more: Any) -> Settings:
    return Settings(auth=["jwt"], jwt_issuer=issuer.url, jwt_audience=[AUDIENCE], **more)


async def accepted_within(auth: Authenticator, token: str, timeout: float) -> Identity:
    """Retry until accepted; the last refusal is raised after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await auth.authenticate(call(token))
        except Unauthenticated:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def background_tasks() -> list[str]:
    return [
        t.get_name()
        for t in asyncio.all_tasks()
        if t.get_name().startswith(("jwks", "token-file")) and not t.done()
    ]


async def test_discovery_then_verify_and_close_leaves_no_tasks(issuer: Issuer) -> None:
    auth = Authenticator.from_settings(settings_for(issuer))
    await auth.start()
    await auth.start()  # idempotent
    try:
        assert issuer.jwks_hits == 1
        identity = await auth.authenticate(call(issuer.sign("k1", groups=["etl"])))
        assert identity == Identity("alice", frozenset({"etl"}), "jwt")
        forged = issuer.sign("k1", iss="http://elsewhere")
        with pytest.raises(Unauthenticated, match="another issuer"):
            await auth.authenticate(call(forged))
    finally:
        await auth.close()
    assert background_tasks() == []


async def test_rotation_picked_up_by_unknown_kid_refresh(issuer: Issuer) -> None:
    # The periodic refresh is 300 s away: only the unknown-kid refresh can find k2.
    auth = Authenticator.from_settings(settings_for(issuer))
    await auth.start()
    try:
        issuer.add_key("k2", ec.generate_private_key(ec.SECP256R1()))  # rotation, new kid
        identity = await auth.authenticate(call(issuer.sign("k2", sub="bob")))
        assert identity.user == "bob" and issuer.jwks_hits == 2
        # A made-up kid right after: no second fetch within the rate limit, still refused.
        issuer.add_key("k3", serve=False)
        with pytest.raises(Unauthenticated, match="unknown signing key"):
            await auth.authenticate(call(issuer.sign("k3")))
        assert issuer.jwks_hits == 2
        # Old keys keep working after the rotation.
        assert (await auth.authenticate(call(issuer.sign("k1")))).user == "alice"
    finally:
        await auth.close()


async def test_rotation_picked_up_by_periodic_refresh(issuer: Issuer) -> None:
    # Settings refuse intervals under 5 s; a copy skips validation to keep the test short.
    settings = settings_for(issuer).model_copy(update={"jwks_refresh_seconds": 0.2})
    auth = Authenticator.from_settings(settings, kid_refresh_seconds=3600)
    await auth.start()
    try:
        issuer.add_key("k2", serve=False)
        token = issuer.sign("k2", sub="bob")
        with pytest.raises(Unauthenticated, match="unknown signing key"):
            await auth.authenticate(call(token))  # spends the one unknown-kid refresh
        issuer.served.append("k2")  # the issuer publishes k2 only now
        assert (await accepted_within(auth, token, timeout=10)).user == "bob"
    finally:
        await auth.close()


async def test_issuer_down_at_startup_then_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "router.admit.auth")
    down = Issuer(free_port())
    down.add_key("k1")
    auth = Authenticator.from_settings(
        settings_for(down), kid_refresh_seconds=0.1, http_timeout_seconds=2
    )
    await auth.start()  # does not raise: a replica starts without its issuer
    try:
        token = down.sign("k1")
        with pytest.raises(Unauthenticated, match="could not be fetched yet"):
            await auth.authenticate(call(token))
        with pytest.raises(Unauthenticated, match="could not be fetched yet"):
            await auth.authenticate(call(token))
        warnings = [r for r in caplog.records if "cannot be fetched" in r.getMessage()]
        assert len(warnings) == 1  # one per outage, not one per attempt
        async with down:
            assert (await accepted_within(auth, token, timeout=10)).user == "alice"
    finally:
        await auth.close()


async def test_issuer_down_later_keeps_the_keys(
    issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "router.admit.auth")
    settings = settings_for(issuer).model_copy(update={"jwks_refresh_seconds": 0.1})
    auth = Authenticator.from_settings(settings, http_timeout_seconds=2)
    await auth.start()
    try:
        await issuer.stop()
        await eventually(
            lambda: any("cannot be fetched" in r.getMessage() for r in caplog.records),
            "a periodic refresh to fail",
        )
        # A fresh token (not in the cache) still verifies with the key fetched before.
        assert (await auth.authenticate(call(issuer.sign("k1", sub="carol")))).user == "carol"
    finally:
        await auth.close()
