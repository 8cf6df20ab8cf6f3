"""The Envoy ext_authz server (`spark-router authz`): the router's admission, asked by Envoy.

An `envoy.service.auth.v3.Authorization` gRPC server. For every request Envoy sends a
CheckRequest; the answer runs the SAME code as a replica's: `admit/auth.py` authenticates
(every mode of `auth`; mtls reads the client certificate Envoy verified), `admit/policy.py`
decides (the policy file, reloaded as a replica reloads it), with the router's messages.

What it answers, by the request's path:
- `/spark.connect.SparkConnectService/*`: authenticate, then the policy's pool (the one
  `x-spark-pool` asks for, else the caller's default). Allowed: OK with the headers the router
  behind Envoy trusts (`trusted_user_header`, `trusted_groups_header`: comma-separated, sorted;
  `x-spark-pool` when the policy chose the default) set, overwriting whatever the client sent,
  and `authorization` removed. Denied: UNAUTHENTICATED (HTTP 401) or PERMISSION_DENIED (403),
  in CheckResponse.status and as the `grpc-status` / `grpc-message` headers of the denied
  response, which are what a gRPC client behind Envoy sees: "spark-router: <the router's
  message>".
- `/api` and `/api/...` (the admin API): authenticate, then the admin role (admin_users,
  admin_groups, a policy role with admin: true). Denied: 401 / 403 with the admin API's JSON
  body `{"error": "..."}`.
- anything else: PERMISSION_DENIED naming the path.

Invariants:
- A denial is the answer to any request it cannot judge: no HTTP attributes, headers over
  `max_metadata_bytes`, a pool name over `max_identifier_length`, a bug (INTERNAL, logged
  once with its traceback). The server never crashes on a CheckRequest.
- Without a pool asked and with a default pool the caller may not use, the router refuses new
  sessions only (a session placed before may be on a pool they may use); this server cannot
  see the session (it rides in the body), so it refuses the call: fail closed.
- Quotas and session ownership need the session: they stay in the router, which believes the
  headers set here only from Envoy's address (`auth: trusted-header`, `trusted_proxies`).
- Tokens never reach a log line or an answer: admit/ messages hold none, log lines name the
  path without its query and the user, never a header.
- `auth: none` is refused at start-up: there would be nobody to vouch for.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import grpc
import grpc.aio
from cryptography import x509
from cryptography.x509.oid import NameOID
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_health.v1 import health as grpc_health  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.lifecycle import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_STARTUP_FAILURE,
    Signals,
    finish_unless_forced,
)
from router.admit.auth import Authenticator, Credentials, Identity
from router.admit.policy import ADMIN_CLOSED, admin_by_role, may_administer, no_admin_role
from router.admit.policy_file import PolicyFile
from router.config import ConfigError, Settings
from router.errors import RouterError, Unauthenticated

log = logging.getLogger(__name__)

SERVICE = "envoy.service.auth.v3.Authorization"
GRPC_PREFIX = "/spark.connect.SparkConnectService/"
ADMIN_PREFIX = "/api"
POOL_HEADER = "x-spark-pool"  # dataplane/protocol.py's POOL_HEADER (admit/ does not import it)
# How long in-flight checks may finish on stop (Envoy retries or fails them by its own rules).
_STOP_GRACE_SECONDS = 2.0
# The most of a refused path quoted back (it is the client's text).
_QUOTED_PATH = 200

_HTTP = {
    grpc.StatusCode.UNAUTHENTICATED: http_status_pb2.StatusCode.Unauthorized,
    grpc.StatusCode.PERMISSION_DENIED: http_status_pb2.StatusCode.Forbidden,
    grpc.StatusCode.INVALID_ARGUMENT: http_status_pb2.StatusCode.BadRequest,
    grpc.StatusCode.INTERNAL: http_status_pb2.StatusCode.InternalServerError,
}
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass(frozen=True)
class Decision:
    """What the server answers one CheckRequest (pure data; `to_response` makes the proto)."""

    code: grpc.StatusCode  # OK: allowed
    message: str = ""  # what the client is told (denied), "" when allowed
    kind: str = "grpc"  # grpc, admin or unknown: how a denial is put
    set_headers: tuple[tuple[str, str], ...] = ()  # allowed: set for the upstream, overwriting
    remove_headers: tuple[str, ...] = ()  # allowed: removed before the upstream sees them
    user: str | None = None  # who, when known (log lines)

    @property
    def allowed(self) -> bool:
        """Whether the request goes on to the upstream."""
        return bool(self.code == grpc.StatusCode.OK)


def _denied(code: grpc.StatusCode, message: str, kind: str, user: str | None = None) -> Decision:
    return Decision(code, message, kind, user=user)


def request_headers(http: Any) -> dict[str, str]:
    """The request's headers, keys lower-case: the `headers` map, else `header_map`."""
    found = {str(k).lower(): str(v) for k, v in http.headers.items()}
    if not found and http.HasField("header_map"):
        for h in http.header_map.headers:
            value = h.value if h.value else h.raw_value.decode("utf-8", "replace")
            key = h.key.lower()
            # Envoy joins repeated headers with a comma in `headers`; do the same here.
            found[key] = f"{found[key]},{value}" if key in found else value
    return found


def peer_string(source: Any) -> str:
    """The downstream client as a grpc peer string ('ipv4:1.2.3.4:5'), '' when unknown."""
    if not source.HasField("address") or not source.address.HasField("socket_address"):
        return ""
    sock = source.address.socket_address
    try:
        ip = ipaddress.ip_address(sock.address)
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv6Address):
        return f"ipv6:[{ip}]:{sock.port_value}"
    return f"ipv4:{ip}:{sock.port_value}"


def certificate_context(source: Any) -> dict[str, list[bytes]]:
    """The client certificate Envoy verified, as grpc's auth_context names it.

    From `source.certificate` (the URL-encoded PEM, with `include_peer_certificate: true`):
    its subject CN and its SANs (DNS, URI, e-mail), as grpc's own TLS would give them. Without
    it, from `source.principal` (a SAN, or the subject when the certificate has none).
    """
    if source.certificate:
        try:
            cert = x509.load_pem_x509_certificate(unquote(source.certificate).encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return {}
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        context: dict[str, list[bytes]] = {"x509_pem_cert": [b"present"]}
        if names:
            context["x509_common_name"] = [str(names[0].value).encode("utf-8")]
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans = None
        if sans is not None:
            found = [
                *sans.get_values_for_type(x509.DNSName),
                *sans.get_values_for_type(x509.UniformResourceIdentifier),
                *sans.get_values_for_type(x509.RFC822Name),
            ]
            if found:
                context["x509_subject_alternative_name"] = [v.encode("utf-8") for v in found]
        return context
    principal = source.principal.strip()
    if not principal:
        return {}
    if "=" in principal and "://" not in principal:  # a subject DN: CN=alice,O=example
        for part in principal.split(","):
            key, _, value = part.strip().partition("=")
            if key.strip().upper() == "CN" and value.strip():
                return {"x509_common_name": [value.strip().encode("utf-8")]}
        return {"x509_pem_cert": [b"present"]}  # a certificate, naming nobody usable
    return {"x509_subject_alternative_name": [principal.encode("utf-8")]}


class Judge:
    """Decides CheckRequests with the router's admit/ code; holds no I/O but theirs."""

    def __init__(self, settings: Settings, auth: Authenticator, policy: PolicyFile | None) -> None:
        if not settings.auth_enabled:
            raise ConfigError(
                "spark-router authz needs auth (token, jwt, trusted-header or mtls): with auth "
                "none there is nobody to vouch for a caller"
            )
        self._settings = settings
        self._auth = auth
        self._policy = policy
        self._user_header = settings.trusted_user_header.lower()
        self._groups_header = settings.trusted_groups_header.lower()

    async def decide(self, request: Any) -> Decision:
        """The answer to one CheckRequest; never raises."""
        try:
            return await self._decide(request)
        except Exception:
            log.exception("authz: unexpected error while checking a request")
            return _denied(
                grpc.StatusCode.INTERNAL, "internal error (see the authz server's log)", "unknown"
            )

    async def _decide(self, request: Any) -> Decision:
        attributes = request.attributes
        if not attributes.HasField("request") or not attributes.request.HasField("http"):
            return _denied(
                grpc.StatusCode.PERMISSION_DENIED,
                "the check carries no HTTP request attributes (is this Envoy's ext_authz HTTP "
                "filter?)",
                "unknown",
            )
        http = attributes.request.http
        path = (http.path or "").partition("?")[0]
        if path.startswith(GRPC_PREFIX):
            kind = "grpc"
        elif path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            kind = "admin"
        else:
            return _denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"path {path[:_QUOTED_PATH]!r} is neither Spark Connect "
                f"({GRPC_PREFIX}...) nor the admin API ({ADMIN_PREFIX}/...)",
                "unknown",
            )
        headers = request_headers(http)
        size = sum(len(k) + len(v) for k, v in headers.items())
        limit = self._settings.max_metadata_bytes
        if size > limit:
            return _denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the request's headers are {size} bytes; at most {limit} are accepted "
                "(max_metadata_bytes)",
                kind,
            )
        source = attributes.source
        credentials = Credentials(
            headers, lambda: peer_string(source), lambda: certificate_context(source)
        )
        if kind == "admin":
            return await self._admin(credentials)
        return await self._spark(credentials, headers.get(POOL_HEADER))

    def _allowed(self, identity: Identity, pool: str | None = None) -> Decision:
        set_headers = [(self._user_header, identity.user)]
        remove = ["authorization"]
        if identity.groups:
            set_headers.append((self._groups_header, ",".join(sorted(identity.groups))))
        else:
            remove.append(self._groups_header)  # none: and none the client made up either
        if pool is not None:
            set_headers.append((POOL_HEADER, pool))
        return Decision(
            grpc.StatusCode.OK,
            set_headers=tuple(set_headers),
            remove_headers=tuple(remove),
            user=identity.user,
        )

    async def _spark(self, credentials: Credentials, asked: str | None) -> Decision:
        identity: Identity | None = None
        sent = asked
        try:
            if asked is not None:
                asked = asked.strip() or None
            maximum = self._settings.max_identifier_length
            if asked is not None and len(asked) > maximum:
                return _denied(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{POOL_HEADER} is {len(asked)} characters long; at most {maximum} are "
                    "accepted (max_identifier_length)",
                    "grpc",
                )
            identity = await self._auth.authenticate(credentials)
            pool = None if self._policy is None else self._policy.current.pool_for(identity, asked)
        except RouterError as exc:  # Unauthenticated, PolicyDenied: as the router says them
            user = None if identity is None else identity.user
            return _denied(exc.code, f"spark-router: {exc}", "grpc", user)
        return self._allowed(identity, pool if pool != sent else None)

    async def _admin(self, credentials: Credentials) -> Decision:
        settings = self._settings
        policy = None if self._policy is None else self._policy.current
        if not admin_by_role(settings, policy):
            return _denied(grpc.StatusCode.PERMISSION_DENIED, ADMIN_CLOSED, "admin")
        try:
            identity = await self._auth.authenticate(credentials)
        except Unauthenticated as exc:
            return _denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "the admin API needs the credentials of a user in admin_users, admin_groups "
                f"or an admin role: {exc}",
                "admin",
            )
        if not may_administer(identity, settings, policy):
            return _denied(
                grpc.StatusCode.PERMISSION_DENIED, no_admin_role(identity), "admin", identity.user
            )
        return self._allowed(identity)


def grpc_message(text: str) -> str:
    """`text` percent-encoded as the gRPC spec wants grpc-message (UTF-8, printable ASCII kept)."""
    out = []
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def to_response(decision: Decision) -> Any:
    """The CheckResponse of a decision (pure)."""
    code = decision.code.value[0]
    if decision.allowed:
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header(k, v) for k, v in decision.set_headers],
                headers_to_remove=list(decision.remove_headers),
            ),
        )
    http_status = _HTTP.get(decision.code, http_status_pb2.StatusCode.Forbidden)
    if decision.kind == "admin":
        body = json.dumps({"error": decision.message})
        headers = [_header("content-type", "application/json")]
    else:
        body = decision.message
        headers = [
            _header("content-type", "application/grpc"),
            _header("grpc-status", str(code)),
            _header("grpc-message", grpc_message(decision.message)),
        ]
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code, message=decision.message),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status), headers=headers, body=body
        ),
    )


class _Checks:
    """The Check method: bytes in, so a request that is not a CheckRequest still gets a denial.

    grpc's own handling of an undecodable request is UNKNOWN with a traceback in the log; an
    Envoy with `failure_mode_allow` would let such a request through on any error. An answer
    is always a CheckResponse.
    """

    def __init__(self, judge: Judge) -> None:
        self._judge = judge

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler of Authorization/Check."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check,
                    request_deserializer=None,  # bytes: parsed in check()
                    response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
                )
            },
        )

    async def check(self, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        """Answer one Check."""
        try:
            request = external_auth_pb2.CheckRequest.FromString(raw)
        except DecodeError:
            decision = _denied(
                grpc.StatusCode.PERMISSION_DENIED,
                "the check is not a valid envoy.service.auth.v3.CheckRequest",
                "unknown",
            )
            log.info("authz: refused a malformed check from %s", context.peer())
            return to_response(decision)
        decision = await self._judge.decide(request)
        if not decision.allowed:
            path = request.attributes.request.http.path.partition("?")[0][:_QUOTED_PATH]
            log.info(
                "authz: refused %s to %s: %s %s",
                path or "(no path)",
                decision.user or "an unknown caller",
                decision.code.name,
                decision.message,
            )
        return to_response(decision)


class AuthzServer:
    """`spark-router authz`: the admit/ chain behind Envoy's ext_authz, on `authz_listen`."""

    def __init__(self, settings: Settings) -> None:
        """Build the authenticator and read the policy file (ConfigError if they are bad)."""
        self.settings = settings
        self.auth = Authenticator.from_settings(settings)
        self.policy = (
            None
            if settings.policy_file is None
            else PolicyFile(
                settings.policy_file, settings.default_pool, settings.policy_reload_seconds
            )
        )
        self.judge = Judge(settings, self.auth, self.policy)
        self._server: grpc.aio.Server | None = None
        self._health: Any = grpc_health.aio.HealthServicer()
        self.port = 0

    async def start(self) -> int:
        """Start reloading credentials and policy, bind and serve; the bound port.

        OSError if the address cannot be bound.
        """
        host, _ = self.settings.authz_host_port
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_metadata_size", self.settings.max_metadata_bytes),
            ]
        )
        server.add_generic_rpc_handlers((_Checks(self.judge).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            bound = int(server.add_insecure_port(self.settings.authz_listen))
        except RuntimeError as exc:
            raise OSError(
                f"cannot listen on {self.settings.authz_listen}: {exc} (is the port in use?)"
            ) from None
        await self.auth.start()
        if self.policy is not None:
            await self.policy.start()
        await server.start()
        self._server = server
        self.port = bound
        for service in ("", SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._warn_if_open(host)
        log.info(
            "spark-router authz listening on %s:%d (auth %s, policy %s)",
            host,
            bound,
            ", ".join(self.auth.modes),
            self.settings.policy_file or "none",
        )
        return bound

    def _warn_if_open(self, host: str) -> None:
        from router.server import is_loopback

        if not is_loopback(host):
            log.warning(
                "authz server on %s beyond loopback: anyone who reaches it can test credentials "
                "and read users' names and groups from its answers; keep it next to Envoy "
                "(127.0.0.1) or on a network only Envoy reaches",
                self.settings.authz_listen,
            )

    async def stop(self, grace: float = _STOP_GRACE_SECONDS) -> None:
        """Stop serving (checks in flight get `grace` seconds), then background work."""
        server, self._server = self._server, None
        if server is not None:
            await self._health.enter_graceful_shutdown()
            await server.stop(grace)
        await self.auth.close()
        if self.policy is not None:
            await self.policy.close()


async def serve_authz(server: AuthzServer, ready: asyncio.Event | None = None) -> None:
    """Run `server` until SIGTERM/SIGINT; a second signal cuts the grace short."""
    async with Signals() as signals:
        await server.start()
        if ready is not None:
            ready.set()
        await signals.stopping.wait()
        log.info("authz: shutting down")
        finished, _ = await finish_unless_forced(server.stop(), signals)
        if not finished:
            await server.stop(0)


def run_authz(settings: Settings) -> int:
    """Run the ext_authz server in this process until signalled; the exit code."""
    from router.server import StartupError, run_async

    try:
        server = AuthzServer(settings)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    try:
        run_async(serve_authz(server), settings.event_loop)
    except (OSError, StartupError) as exc:
        log.error("authz: could not start: %s", exc)
        return EXIT_STARTUP_FAILURE
    return EXIT_OK
