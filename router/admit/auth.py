"""Who is calling: the authenticators of `auth` (none, token, jwt, trusted-header, mtls).

Invariants:
- Modes are tried in the order of `settings.auth`. A mode whose credential is absent passes
  to the next; a credential that is present but bad fails the call (UNAUTHENTICATED) at once,
  so a bad token never falls through to a weaker mode. Nothing at all → UNAUTHENTICATED with a
  message that says what to send.
- A bearer token belongs to exactly one mode: with both token and jwt on, JWT-shaped tokens
  (three dot-separated parts) are the jwt mode's and all others the token mode's; with only
  one of them on, every bearer token is that one's.
- A trusted header is believed only from `trusted_proxies`; from any other peer it is refused,
  never ignored (a client that forges it learns so, instead of being served as someone else).
- Hot path: a known token, or a JWT verified before and not expired, costs one sha256 and one
  dict lookup: no signature check, no I/O, no log line. File reads and JWKS fetches run in
  `start()`'s background tasks, or (an unknown JWT key) in one shared, rate-limited refresh.
- Secrets never reach a log line or an error message: not a token, not any part of it.

Degraded modes:
- token file broken or gone on reload → the tokens loaded before stay, one warning per change.
- JWKS unreachable → the keys fetched last stay; with none yet every JWT is refused "unknown
  signing key" until a fetch succeeds (retried every `_RETRY_SECONDS` while failing, and on an
  unknown kid at most every `kid_refresh_seconds`). A replica never fails to start for it.
- A JWT cached as verified is served until its exp (plus leeway), even if its key leaves the
  JWKS in between, unless a refresh sees a key vanish: then the whole cache is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import jwt
import prometheus_client
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from common.addresses import redact_url, split_host_port
from router.admit import tokens
from router.config import ConfigError, Settings
from router.errors import Unauthenticated

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# A verified JWT is remembered this many at most; when full the cache starts over (cheaper
# than LRU bookkeeping on every hit, and a refill costs one signature check per token).
JWT_CACHE_SIZE = 10_000
# While the JWKS cannot be fetched, try again this often (the refresh interval may be hours).
_RETRY_SECONDS = 10.0
_DISCOVERY_PATH = "/.well-known/openid-configuration"
_PEER_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a call is from, as vouched for by one authenticator."""

    user: str
    groups: frozenset[str]
    mode: str  # the authenticator that vouched: "token", "jwt", "trusted-header", "mtls"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a call brings: read lazily, the hot path builds this per call."""

    metadata: Mapping[str, str | bytes]  # the call's metadata as a dict (keys lower-case)
    # grpc peer, asked only by trusted-header mode: "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555"
    peer: Callable[[], str]
    auth_context: Callable[[], Mapping[str, Sequence[bytes]]]  # grpc context.auth_context


ANONYMOUS = Identity("", frozenset(), "none")


def bearer(metadata: Mapping[str, str | bytes]) -> str | None:
    """The token of `authorization: Bearer …`, or None when there is none."""
    raw = metadata.get("authorization")
    if raw is None:
        return None
    value = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = rest.strip()
    return token or None


def peer_ip(peer: str) -> IPAddress | None:
    """The IP address of a grpc peer string (IPv4-mapped IPv6 as IPv4); None for unix sockets."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        rest = unquote(rest)  # some grpc versions send ipv6:%5B::1%5D:port
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                return None
            host = rest[1:end]
        else:
            host = rest.rpartition(":")[0]
    else:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _names(value: Any) -> frozenset[str]:
    """Groups from a list, or from one space- or comma-separated string."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(p for p in value.replace(",", " ").split() if p)
    if isinstance(value, (list, tuple)):
        return frozenset(str(v).strip() for v in value if isinstance(v, (str, int)) and str(v))
    return frozenset()


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


class _NoCount:
    def inc(self, amount: float = 1) -> None:
        pass


class _Counts:
    """The counter's children of one mode, bound once (labels() per call would cost a lookup)."""

    def __init__(self, counter: prometheus_client.Counter | None, mode: str) -> None:
        def child(result: str) -> Any:
            return _NoCount() if counter is None else counter.labels(mode, result)

        self.ok = child("ok")
        self.cached = child("cached")
        self.missing = child("missing")
        self.invalid = child("invalid")
        self.expired = child("expired")
        self.refused = child("refused")


class _Mode:
    """One way of proving who one is; check() returns None when its credential is absent."""

    name = ""

    def __init__(self, counts: _Counts) -> None:
        self.counts = counts

    async def check(self, creds: Credentials, token: str | None) -> Identity | None:
        """The caller's identity, None if this mode's credential is absent; raises if bad."""
        raise NotImplementedError

    def fail(self, result: str, message: str) -> Unauthenticated:
        """Count a refusal and make its error (the message must hold no secret)."""
        getattr(self.counts, result).inc()
        return Unauthenticated(message, result)

    async def start(self) -> None:
        """Begin background work, if any."""

    async def close(self) -> None:
        """End background work, if any."""


# --- token -----------------------------------------------------------------------------


class Reloader:
    """Calls `reload` every `seconds` in a task of its own, from `start` until `close`."""

    def __init__(self, reload: Callable[[], Awaitable[object]], seconds: float, what: str) -> None:
        self._reload = reload
        self._seconds = seconds
        self._what = what
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._seconds)
            try:
                await self._reload()
            except Exception:  # a bug here must not end reloading for good
                log.exception("%s reload failed", self._what)

    def start(self) -> None:
        """Start the task; idempotent."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self._what} reload")

    async def close(self) -> None:
        """Stop the task."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file: its mtime, size and inode (None if it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class _TokenMode(_Mode):
    """Bearer tokens looked up by sha256 in the token file, reloaded when the file changes."""

    name = "token"

    def __init__(
        self,
        path: Path,
        counts: _Counts,
        claims: Callable[[str], bool],
        reload_seconds: float,
    ) -> None:
        super().__init__(counts)
        self._path = path
        self._claims = claims
        self._signature = file_signature(path)
        try:
            self._table = self._identities(tokens.load(path))
        except tokens.TokenFileError as exc:
            raise ConfigError(f"auth token: {exc}") from None
        self._watch = Reloader(self.reload, reload_seconds, "token file")

    @staticmethod
    def _identities(table: dict[str, tuple[str, frozenset[str]]]) -> dict[str, Identity]:
        return {digest: Identity(user, groups, "token") for digest, (user, groups) in table.items()}

    @property
    def size(self) -> int:
        """How many tokens are loaded."""
        return len(self._table)

    async def check(self, creds: Credentials, token: str | None) -> Identity | None:
        """The token's owner; unknown tokens fail."""
        if token is None or not self._claims(token):
            return None
        found = self._table.get(hashlib.sha256(token.encode("utf-8")).hexdigest())
        if found is None:
            raise self.fail(
                "invalid",
                "unknown token: it is not in this router's token file (revoked or mistyped?); "
                "an operator issues one with `spark-router token add USER`",
            )
        self.counts.ok.inc()
        return found

    def _read_if_changed(self) -> dict[str, Identity] | None:
        """The new table if the file changed and parses; runs in a thread."""
        signature = file_signature(self._path)
        if signature == self._signature:
            return None
        # Remember the signature even when the file is broken: one warning per change, and
        # the next good write (a new mtime) is picked up.
        self._signature = signature
        try:
            return self._identities(tokens.load(self._path))
        except tokens.TokenFileError as exc:
            log.warning("%s; keeping the %d tokens loaded before", exc, len(self._table))
            return None

    async def reload(self) -> bool:
        """Re-read the token file if its mtime, size or inode changed; True if swapped."""
        table = await asyncio.to_thread(self._read_if_changed)
        if table is None:
            return False
        self._table = table  # swapped whole: a call sees the old table or the new one
        log.info("token file %s reloaded: %d tokens", self._path, len(table))
        return True

    async def start(self) -> None:
        """Watch the token file."""
        self._watch.start()

    async def close(self) -> None:
        """Stop watching."""
        await self._watch.close()


# --- jwt -------------------------------------------------------------------------------


class _JwtMode(_Mode):
    """JWTs verified with a secret, a PEM key or the issuer's JWKS; verified tokens cached."""

    name = "jwt"

    def __init__(
        self,
        settings: Settings,
        counts: _Counts,
        claims: Callable[[str], bool],
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        kid_refresh_seconds: float,
        http_timeout_seconds: float,
    ) -> None:
        super().__init__(counts)
        self._claims = claims
        self._clock = clock
        self._monotonic = monotonic
        self._kid_refresh_seconds = kid_refresh_seconds
        self._http_timeout = http_timeout_seconds
        secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self._algorithms = list(settings.jwt_algorithms) or (
            ["HS256"] if secret else ["RS256", "ES256", "EdDSA"]
        )
        self._audience = list(settings.jwt_audience) or None
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_seconds
        self._user_claim = settings.jwt_user_claim
        self._groups_claim = settings.jwt_groups_claim
        self._refresh_seconds = settings.jwks_refresh_seconds
        self._options: dict[str, Any] = {
            "require": ["exp"],  # a token that never expires would be cached forever
            "verify_aud": self._audience is not None,
            # Short keys are an error here, never a warning on the hot path.
            "enforce_minimum_key_length": True,
        }
        # Exactly one key source, in this order of precedence.
        self._static_key: Any = None
        self._jwks_url: str | None = None
        self._discovery_url: str | None = None
        if settings.jwt_jwks_url:
            self._jwks_url = settings.jwt_jwks_url
        elif settings.jwt_key_file is not None:
            self._static_key = self._load_key_file(settings.jwt_key_file)
        elif secret:
            if len(secret.encode("utf-8")) < 32:
                raise ConfigError("auth jwt: jwt_secret must be at least 32 bytes (HS256)")
            self._static_key = secret
        elif settings.jwt_issuer:
            self._discovery_url = settings.jwt_issuer.rstrip("/") + _DISCOVERY_PATH
        self._keys: dict[str, jwt.PyJWK] = {}  # kid ("" when the JWKS gives none) → key
        self._keys_fetched = False
        self._failing = False
        self._cache: dict[str, tuple[Identity, float]] = {}  # sha256 → (identity, exp)
        self._last_kid_refresh = -math.inf
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._http: aiohttp.ClientSession | None = None

    @staticmethod
    def _load_key_file(path: Path) -> Any:
        try:
            return load_pem_public_key(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"auth jwt: jwt_key_file {path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"auth jwt: jwt_key_file {path} is not a PEM public key") from exc

    @property
    def uses_jwks(self) -> bool:
        """Whether keys come from a JWKS (a URL or OIDC discovery)."""
        return self._static_key is None

    @property
    def key_ids(self) -> frozenset[str]:
        """The kids of the JWKS keys held now."""
        return frozenset(self._keys)

    async def check(self, creds: Credentials, token: str | None) -> Identity | None:
        """The token's subject; expired, forged or foreign tokens fail."""
        if token is None or not self._claims(token):
            return None
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        hit = self._cache.get(digest)
        if hit is not None:
            identity, exp = hit
            if self._clock() <= exp + self._leeway:
                self.counts.cached.inc()
                return identity
            self._cache.pop(digest, None)
            raise self.fail("expired", "token expired: get a new one from your identity provider")
        key = await self._key_for(token)
        claims = self._verify(token, key)
        user = claims.get(self._user_claim)
        if not isinstance(user, str) or not user.strip():
            raise self.fail("invalid", f"token has no user: claim {self._user_claim!r} is unset")
        identity = Identity(user.strip(), _names(claims.get(self._groups_claim)), "jwt")
        if len(self._cache) >= JWT_CACHE_SIZE:
            self._cache.clear()
        self._cache[digest] = (identity, float(claims["exp"]))
        self.counts.ok.inc()
        return identity

    def _verify(self, token: str, key: Any) -> dict[str, Any]:
        # Our own fixed messages: PyJWT's could one day quote a part of the token.
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise self.fail(
                "expired", "token expired: get a new one from your identity provider"
            ) from None
        except jwt.ImmatureSignatureError:
            raise self.fail("invalid", "token not yet valid (nbf is in the future)") from None
        except jwt.InvalidAudienceError:
            raise self.fail(
                "invalid",
                f"token is for another audience (accepted: {', '.join(self._audience or [])})",
            ) from None
        except jwt.InvalidIssuerError:
            raise self.fail(
                "invalid", f"token is from another issuer (accepted: {self._issuer})"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise self.fail("invalid", f"token has no {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise self.fail("invalid", "token signature does not verify") from None
        except jwt.InvalidAlgorithmError:
            raise self.fail(
                "invalid",
                f"token algorithm not accepted (accepted: {', '.join(self._algorithms)})",
            ) from None
        except jwt.InvalidKeyError:
            raise self.fail("invalid", "token signing key is not usable (too short?)") from None
        except jwt.PyJWTError:
            raise self.fail("invalid", "malformed token: not a valid JWT") from None
        return claims

    def _find(self, kid: Any) -> jwt.PyJWK | None:
        if isinstance(kid, str):
            return self._keys.get(kid)
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))  # a token without kid, a JWKS of one key
        return None

    async def _key_for(self, token: str) -> Any:
        if self._static_key is not None:
            return self._static_key
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise self.fail("invalid", "malformed token: not a valid JWT") from None
        key = self._find(kid)
        if key is None:
            # A new kid is how rotation looks from here: refresh, at most every so often, so
            # tokens with made-up kids cannot make us hammer the issuer.
            now = self._monotonic()
            if (
                self._inflight is not None
                or now - self._last_kid_refresh >= self._kid_refresh_seconds
            ):
                self._last_kid_refresh = now
                await self._refresh_shared()
                key = self._find(kid)
        if key is None:
            why = "" if self._keys_fetched else " (the issuer's keys could not be fetched yet)"
            raise self.fail("invalid", f"unknown signing key: not in the issuer's JWKS{why}")
        return key

    async def _refresh_shared(self) -> bool:
        """One refresh at a time; concurrent callers wait for the one in flight."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._refresh(), name="jwks-refresh")
            self._inflight.add_done_callback(self._refresh_done)
        # Shielded: one caller giving up (a cancelled call) does not cancel everyone's refresh.
        return await asyncio.shield(self._inflight)

    def _refresh_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._http_timeout)
            )
        return self._http

    async def _get_json(self, url: str) -> Any:
        async with self._session().get(url, headers={"accept": "application/json"}) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            return await resp.json(content_type=None)

    async def _fetch_keys(self) -> dict[str, jwt.PyJWK]:
        if self._jwks_url is None:
            assert self._discovery_url is not None
            doc = await self._get_json(self._discovery_url)
            uri = doc.get("jwks_uri") if isinstance(doc, dict) else None
            if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
                raise ValueError(f"{redact_url(self._discovery_url)} names no jwks_uri")
            self._jwks_url = uri
        doc = await self._get_json(self._jwks_url)
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError("not a JWKS (no list `keys`)")
        keys: dict[str, jwt.PyJWK] = {}
        for item in doc["keys"]:
            if not isinstance(item, dict) or item.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(item)
            except jwt.PyJWTError:
                continue  # a key type we cannot use; the others still count
            if key.algorithm_name in self._algorithms:
                keys[str(item.get("kid") or "")] = key
        if not keys:
            raise ValueError(f"no usable signing key for {', '.join(self._algorithms)}")
        return keys

    async def _refresh(self) -> bool:
        """Fetch the JWKS (after discovery if need be); keep the old keys on failure."""
        source = self._jwks_url or self._discovery_url or ""
        try:
            keys = await self._fetch_keys()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            if not self._failing:  # one warning per outage, not one per retry
                log.warning(
                    "JWKS %s cannot be fetched (%s); keeping the %d keys held",
                    redact_url(source),
                    exc or type(exc).__name__,
                    len(self._keys),
                )
            self._failing = True
            return False
        if set(self._keys) - set(keys):
            self._cache.clear()  # a key was withdrawn: re-verify everything once
        self._keys = keys  # swapped whole
        self._keys_fetched = True
        if self._failing:
            log.info("JWKS %s fetched again: %d keys", redact_url(self._jwks_url or ""), len(keys))
        self._failing = False
        return True

    async def _poll(self, ok: bool) -> None:
        while True:
            await asyncio.sleep(
                self._refresh_seconds if ok else min(self._refresh_seconds, _RETRY_SECONDS)
            )
            try:
                ok = await self._refresh_shared()
            except Exception:  # a bug here must not end refreshing for good
                log.exception("JWKS refresh failed")
                ok = False

    async def start(self) -> None:
        """Fetch the JWKS once (a failure is a warning), then refresh it in the background."""
        if self._static_key is not None or self._started:
            return
        self._started = True
        # The first fetch is awaited so a replica starts serving with keys when it can; it is
        # bounded by the HTTP timeout.
        ok = await self._refresh_shared()
        self._task = asyncio.create_task(self._poll(ok), name="jwks-poll")

    async def close(self) -> None:
        """Stop refreshing and close the HTTP client."""
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._inflight = None
        self._started = False
        if self._http is not None:
            await self._http.close()
            self._http = None


# --- trusted-header, mtls --------------------------------------------------------------


class _TrustedHeaderMode(_Mode):
    """The user a trusted proxy names in a header; refused from anyone else."""

    name = "trusted-header"

    def __init__(self, settings: Settings, counts: _Counts) -> None:
        super().__init__(counts)
        self._networks = [ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies]
        self._user_header = settings.trusted_user_header.lower()
        self._groups_header = settings.trusted_groups_header.lower()
        self._trusted: dict[str, bool] = {}  # peer string → verdict; one connection, many calls

    def trusts(self, peer: str) -> bool:
        """Whether the peer is one of trusted_proxies."""
        verdict = self._trusted.get(peer)
        if verdict is None:
            ip = peer_ip(peer)
            verdict = ip is not None and any(ip in net for net in self._networks)
            if len(self._trusted) >= _PEER_CACHE_SIZE:
                self._trusted.clear()
            self._trusted[peer] = verdict
        return verdict

    async def check(self, creds: Credentials, token: str | None) -> Identity | None:
        """The user the header names, if a trusted proxy sent it."""
        raw = creds.metadata.get(self._user_header)
        if raw is None:
            return None
        if not self.trusts(creds.peer()):
            raise self.fail(
                "refused",
                f"header {self._user_header} is only accepted from trusted_proxies; "
                "this peer is not one",
            )
        user = _text(raw).strip()
        if not user:
            raise self.fail("invalid", f"header {self._user_header} is empty")
        groups_raw = creds.metadata.get(self._groups_header)
        groups = (
            frozenset(g.strip() for g in _text(groups_raw).split(",") if g.strip())
            if groups_raw is not None
            else frozenset()
        )
        self.counts.ok.inc()
        return Identity(user, groups, "trusted-header")


_CN = "x509_common_name"
_SAN = "x509_subject_alternative_name"
_CERT_KEYS = (_CN, _SAN, "x509_pem_cert")


class _MtlsMode(_Mode):
    """The user named by the client certificate the TLS handshake verified."""

    name = "mtls"

    def __init__(self, settings: Settings, counts: _Counts) -> None:
        super().__init__(counts)
        self._field = _CN if settings.mtls_user_from == "cn" else _SAN
        self._what = "subject CN" if settings.mtls_user_from == "cn" else "subject alternative name"

    async def check(self, creds: Credentials, token: str | None) -> Identity | None:
        """The certificate's CN or first SAN; None without a client certificate."""
        context = creds.auth_context()
        if not context or not any(context.get(k) for k in _CERT_KEYS):
            return None
        values = context.get(self._field) or ()
        user = ""
        for value in values:
            with contextlib.suppress(UnicodeDecodeError):
                user = value.decode("utf-8").strip()
            break  # the first one, decodable or not
        if not user:
            raise self.fail("invalid", f"client certificate has no {self._what} naming a user")
        self.counts.ok.inc()
        return Identity(user, frozenset(), "mtls")


# --- the chain -------------------------------------------------------------------------


def _missing_message(modes: Sequence[str], listen: str) -> str:
    try:
        port = split_host_port(listen)[1] or 15002
    except ValueError:
        port = 15002
    asks: list[str] = []
    if "token" in modes or "jwt" in modes:
        asks.append(
            "send `authorization: Bearer <token>` "
            f"(pyspark: sc://HOST:{port}/;use_ssl=true;token=<token>)"
        )
    if "mtls" in modes:
        asks.append("present a client certificate")
    if "trusted-header" in modes:
        asks.append("come through a trusted proxy (it sets the user header)")
    return "no credentials: " + " or ".join(asks)


class Authenticator:
    """The modes of `settings.auth`, chained in order; `authenticate` is the per-call check."""

    def __init__(self, modes: Sequence[_Mode], missing_message: str, missing: Any) -> None:
        self._modes = tuple(modes)
        self.enabled = bool(self._modes)
        self._missing_text = missing_message
        self._missing = missing
        self._wants_bearer = any(m.name in ("token", "jwt") for m in self._modes)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        counter: prometheus_client.Counter | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        token_reload_seconds: float = 1.0,
        kid_refresh_seconds: float = 10.0,
        http_timeout_seconds: float = 5.0,
    ) -> Authenticator:
        """Build the chain; reads the token file and key file now (raises ConfigError)."""
        names = [m for m in settings.auth if m != "none"]
        both = "token" in names and "jwt" in names

        def token_claims(token: str) -> bool:
            return not (both and _looks_like_jwt(token))

        def jwt_claims(token: str) -> bool:
            return not both or _looks_like_jwt(token)

        modes: list[_Mode] = []
        for name in names:
            counts = _Counts(counter, name)
            if name == "token":
                if settings.token_file is None:
                    raise ConfigError("auth token needs token_file")
                modes.append(
                    _TokenMode(settings.token_file, counts, token_claims, token_reload_seconds)
                )
            elif name == "jwt":
                modes.append(
                    _JwtMode(
                        settings,
                        counts,
                        jwt_claims,
                        clock,
                        monotonic,
                        kid_refresh_seconds,
                        http_timeout_seconds,
                    )
                )
            elif name == "trusted-header":
                modes.append(_TrustedHeaderMode(settings, counts))
            elif name == "mtls":
                modes.append(_MtlsMode(settings, counts))
            else:  # config.py admits only the modes above
                raise ConfigError(f"unknown auth mode {name!r}")
        # A call with no credential at all is counted once, against the first mode.
        missing = _Counts(counter, names[0]).missing if names else _NoCount()
        return cls(modes, _missing_message(names, settings.listen), missing)

    @property
    def modes(self) -> tuple[str, ...]:
        """The names of the chained modes, in order."""
        return tuple(m.name for m in self._modes)

    async def authenticate(self, creds: Credentials) -> Identity:
        """Who the call is from; raises errors.Unauthenticated."""
        if not self.enabled:
            return ANONYMOUS
        token = bearer(creds.metadata) if self._wants_bearer else None
        for mode in self._modes:
            identity = await mode.check(creds, token)
            if identity is not None:
                return identity
        self._missing.inc()
        raise Unauthenticated(self._missing_text, "missing")

    async def start(self) -> None:
        """Start background work: token-file reload, JWKS fetch and refresh; idempotent."""
        for mode in self._modes:
            await mode.start()

    async def close(self) -> None:
        """Stop all background work."""
        for mode in self._modes:
            await mode.close()
