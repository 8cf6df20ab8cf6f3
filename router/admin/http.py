"""The admin HTTP listener of a replica: /metrics, /healthz, /readyz and the admin API (JSON).

Endpoints (`admin_listen`, default 127.0.0.1:9464, this machine only: a container's probes
and scrapes need 0.0.0.0:9464; `off` turns the listener off):
- `GET /metrics`: Prometheus text; with `--workers N` it sums every worker (telemetry.py).
- `GET /healthz`: 200 while the process runs (a liveness probe: restart me if it fails).
- `GET /readyz`: 200 `{"ready": true}` when the replica has a driver that takes new sessions
  and a usable registry; else 503 `{"ready": false, "reasons": [...]}`. 503 from the moment
  shutdown begins, while in-flight calls still drain, so load balancers take the replica
  out before it stops accepting.
- `/api/...`: drivers (with this replica's own health view), sessions, drain / undrain (of a
  known driver only: registered, static, marked or holding sessions; else 404), move a
  session; the records of operations.py, as `spark-router drivers | sessions | drain
  --admin URL` (control.py) expects them. `GET /api/quotas`: the policy file's quotas and
  what THIS replica counts against them (QuotaGate.usage: its running operations, leased
  slots and tokens, recent calls; the cluster's totals live in the registry), as
  `spark-router quotas --admin URL` prints it.

Invariants:
- Who may use `/api/`: with `admin_token` set, a request carrying `Authorization: Bearer
  <token>` (compared in constant time); with `auth` on (admit/auth.py: the same modes as
  the data plane, but mtls — this listener is plain HTTP), an authenticated user listed in
  `admin_users` or in one of `admin_groups`. Either of these set: anyone else gets 401 (no
  or bad credentials) or 403 (a user without the admin role). Neither: the API is open to
  whoever reaches the listener. Probes and /metrics stay open (kubelets and Prometheus
  carry no token). Tokens are never logged nor echoed.
- Every `/api/` answer is JSON; errors are `{"error": "..."}` with a fitting status: 400 bad
  input, 401 no or wrong token, 404 unknown session, driver or endpoint, 409 a move the cluster
  cannot do as asked, 413 a body over 64 KiB, 503 registry unreachable or nowhere to move.
  A request aiohttp cannot parse (a line or header over 8190 bytes: 431; else 400) gets a
  JSON error too, on any path, logged at info without a traceback (_QuietHandler).
  Nothing here crashes the replica; an unexpected error is a 500 logged once.
- The API writes only through the registry (drain marks, pins), so every replica sees the
  change; the replica answering also re-reads membership at once. With `--workers N`
  each worker binds the port (SO_REUSEPORT) and answers for itself: probes and health
  columns are that worker's view (with `memory://` so is the registry).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from common.addresses import split_host_port
from registry.base import Registry, RegistryUnavailable
from registry.models import DrainMode, Driver, Pin
from router.admin import records as operations
from router.admit import audit
from router.admit.audit import AuditLog
from router.admit.auth import Authenticator, Credentials
from router.admit.policy import ADMIN_CLOSED, admin_by_role, may_administer, no_admin_role
from router.admit.policy_file import PolicyFile
from router.admit.quotas import QuotaGate
from router.config import Settings
from router.dataplane.proxy import Proxy
from router.errors import RouterError, Unauthenticated
from router.health import Health
from router.sessions.placement import Placement
from router.telemetry import Telemetry

log = logging.getLogger(__name__)

# How long in-flight admin requests (a move asks its driver, up to 10 s) may finish on stop.
_SHUTDOWN_SECONDS = 5.0
# Request bodies are a few fields; anything larger is a mistake or an attack (413).
_MAX_BODY_BYTES = 64 * 1024
_DEFAULT_LIMIT = 1000
# A readiness answer names this many drivers at most: enough to see why, never a huge body.
_NAMED_DRIVERS = 10
# Of a malformed request's parse error (it may quote the client's bytes), this much is kept.
_QUOTED_CHARS = 200

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The audit's name of each API route ("admin" events); keys: (method, route pattern).
_ACTIONS = {
    ("GET", "/api/drivers"): "list_drivers",
    ("POST", "/api/drivers/{address}/drain"): "drain",
    ("DELETE", "/api/drivers/{address}/drain"): "undrain",
    ("GET", "/api/sessions"): "list_sessions",
    ("GET", "/api/sessions/{session_id}"): "show_session",
    ("POST", "/api/sessions/{session_id}/move"): "move",
    ("GET", "/api/quotas"): "quotas",
}


@dataclass(frozen=True)
class _Caller:
    """Who called the API, as the audit names them."""

    user: str | None
    groups: frozenset[str] = frozenset()


_ANONYMOUS = _Caller("anonymous")  # the API is open (no admin_token, no auth)
_TOKEN = _Caller("admin_token")  # the shared admin_token, not a user
_UNKNOWN = _Caller(None)  # refused before (or for lack of) credentials


class Operated(Protocol):
    """What the listener reads and acts on: a started replica (server.Replica)."""

    settings: Settings
    registry: Registry
    telemetry: Telemetry
    placement: Placement
    health: Health
    proxy: Proxy
    auth: Authenticator
    policy: PolicyFile | None
    quotas: QuotaGate | None
    audit: AuditLog
    static_drivers: tuple[str, ...]
    shutting_down: bool
    registry_reachable: bool

    async def refresh_membership(self) -> None:
        """Re-read drivers and drain marks now."""
        ...


def not_ready(drivers: Iterable[Driver], degraded: bool, shutting_down: bool) -> list[str]:
    """Why a replica should get no new clients now; empty when it is ready."""
    reasons = []
    if shutting_down:
        reasons.append("shutting down: finishing in-flight calls")
    members = list(drivers)
    if not any(d.takes_new_sessions for d in members):
        shown = [f"{d.address} {d.state.value}" for d in members[:_NAMED_DRIVERS]]
        if len(members) > _NAMED_DRIVERS:
            shown.append(f"{len(members) - _NAMED_DRIVERS} more")
        reasons.append(f"no driver takes new sessions ({', '.join(shown) or 'none known'})")
    if degraded:
        reasons.append("registry unreachable: new sessions are placed by the ring alone")
    return reasons


class ApiError(Exception):
    """An admin API request that fails with `status`; str() is the message the caller sees."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status, headers)


async def _body_for_record(request: web.Request) -> dict[str, object]:
    """The request's JSON object as the handler read it (aiohttp keeps the bytes); {} if none."""
    if not request.body_exists:
        return {}
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, web.HTTPException):
        return {}
    return body if isinstance(body, dict) else {}


def _message(response: web.StreamResponse) -> str:
    """The error message of an API answer made by `_error` ("" for anything else)."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes):
        return ""
    try:
        return str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError):
        return ""


def _peer(remote: str | None) -> str:
    """A grpc-style peer string for an HTTP client's address (what trusted-header reads)."""
    if not remote:
        return "unknown:"
    return f"ipv6:[{remote}]:0" if ":" in remote else f"ipv4:{remote}:0"


def _address(value: str, what: str) -> str:
    """A HOST:PORT from the request, or a 400 naming `what`."""
    try:
        split_host_port(value)
    except ValueError as exc:
        raise ApiError(400, f"{what}: {exc}") from None
    return value.strip()


async def _body(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    """The request's JSON object (empty when there is no body); 400 when it is anything else."""
    raw = await request.read()  # over client_max_size: 413 from aiohttp, made JSON by the guard
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)} (known: {known})")
    return body


class _QuietHandler(web.RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse as the API answers.

    A request line or header over aiohttp's limits (8190 bytes), too many headers or bytes
    that are not HTTP fail in the parser, before any route or middleware: aiohttp would log
    an ERROR with a traceback and answer text. That is the client's mistake, not ours: a
    JSON error (431 for an oversized line or header, else 400), one info line, no traceback.
    Anything else (a 500) keeps aiohttp's handling.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or not 400 <= status < 500:
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            status, text = 431, f"request line or a header is longer than {exc.args[1]} bytes"
        else:
            text = " ".join((exc.message or "bad request").split())[:_QUOTED_CHARS]
        log.info("admin listener: refused a malformed request from %s: %s", request.remote, text)
        if request.writer.output_size > 0:  # as aiohttp's: too late for an answer
            raise ConnectionError("a response was sent already")
        response = _error(status, f"malformed request: {text}")
        response.force_close()
        return response


class _QuietServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _QuietHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    """An AppRunner whose connections are handled by _QuietHandler (aiohttp has no option)."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # the app's start-up and freeze
        return _QuietServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **self._kwargs,
        )


class AdminListener:
    """The HTTP listener of one replica; `start` binds it, `stop` closes it."""

    def __init__(self, replica: Operated) -> None:
        self._replica = replica
        self._runner: web.AppRunner | None = None
        self.port = 0
        token = replica.settings.admin_token
        self._token = None if token is None else token.get_secret_value().encode()

    def app(self) -> web.Application:
        """The aiohttp application: probes, /metrics and the API."""
        app = web.Application(middlewares=[self._api_guard], client_max_size=_MAX_BODY_BYTES)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/drivers", self._drivers)
        app.router.add_post("/api/drivers/{address}/drain", self._drain)
        app.router.add_delete("/api/drivers/{address}/drain", self._undrain)
        app.router.add_get("/api/sessions", self._sessions)
        app.router.add_get("/api/sessions/{session_id}", self._session)
        app.router.add_post("/api/sessions/{session_id}/move", self._move)
        app.router.add_get("/api/quotas", self._quotas)
        return app

    async def start(self) -> int:
        """Bind `admin_listen` and serve; return the bound port. Raises OSError if it cannot."""
        hp = self._replica.settings.admin_host_port
        assert hp is not None, "admin_listen is off"
        host, port = hp
        # One access line per request would drown the log in probes and scrapes.
        runner = _Runner(self.app(), access_log=None, shutdown_timeout=_SHUTDOWN_SECONDS)
        await runner.setup()
        # Workers share the port like the gRPC one; a lone replica keeps the usual semantics.
        reuse_port = True if self._replica.settings.workers > 1 else None
        site = web.TCPSite(runner, host.strip("[]"), port, reuse_port=reuse_port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop listening; requests in flight get a few seconds to finish."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # --- guard: token and JSON errors for /api/ ---------------------------------------

    @web.middleware
    async def _api_guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not (request.path == "/api" or request.path.startswith("/api/")):
            return await handler(request)
        try:
            refused, caller = await self._refused(request)
            if refused is not None:
                self._record_refusal(request, refused, caller)
                return refused
            response = await handler(request)
        except ApiError as exc:
            response = _error(exc.status, str(exc))
        except RegistryUnavailable as exc:
            response = _error(503, f"registry unreachable: {exc}")
        except web.HTTPException as exc:  # no such route (404) or method (405)
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = _error(exc.status, f"{exc.reason}: {request.method} {request.path}", headers)
        except Exception:
            log.exception("admin API %s %s failed", request.method, request.path)
            response = _error(500, "internal error (see the router log)")
        await self._record(request, response, caller)
        return response

    async def _record(
        self, request: web.Request, response: web.StreamResponse, caller: _Caller
    ) -> None:
        """An API action on the audit trail: who, what, on what, and how it went."""
        log_ = self._replica.audit
        if not log_.enabled:
            return
        route = request.match_info.route.resource
        pattern = route.canonical if route is not None else request.path
        action = _ACTIONS.get((request.method, pattern), f"{request.method} {pattern}")
        info = request.match_info
        target = info.get("address") or info.get("session_id")
        params: dict[str, object] = {**request.query, **await _body_for_record(request)}
        log_.offer(
            audit.admin_action(
                caller.user or "unknown",
                action,
                target,
                "ok" if response.status < 400 else f"{response.status} {_message(response)}",
                groups=caller.groups,
                params=params or None,
                redaction=log_.settings.redaction,
            )
        )

    def _record_refusal(
        self, request: web.Request, response: web.Response, caller: _Caller
    ) -> None:
        """A caller the API refused (401: no or bad credentials, 403: no admin role)."""
        log_ = self._replica.audit
        if not log_.enabled:
            return
        unauthenticated = response.status == 401
        log_.offer(
            audit.denied(
                "authentication" if unauthenticated else "policy",
                "admin_credentials" if unauthenticated else "no_admin_role",
                user=caller.user,
                status="UNAUTHENTICATED" if unauthenticated else "PERMISSION_DENIED",
                message=_message(response),
                groups=caller.groups,
                method=f"{request.method} {request.path}",
                peer=_peer(request.remote),
            )
        )

    async def _refused(self, request: web.Request) -> tuple[web.Response | None, _Caller]:
        """The 401 / 403 answer for a caller without the admin role (None to let it in), and
        who the caller is as far as known (the audit's admin)."""
        settings = self._replica.settings
        if self._token is None and not settings.auth_enabled:
            return None, _ANONYMOUS  # nothing configured: open (the README says how to close it)
        if self._token is not None and self._authorized(request, self._token):
            return None, _TOKEN
        challenge = {"WWW-Authenticate": 'Bearer realm="spark-router"'}
        ways = []
        if self._token is not None:
            ways.append("'Authorization: Bearer <admin_token>'")
        by_role = self._by_role()
        if by_role:
            ways.append("the credentials of a user in admin_users, admin_groups or an admin role")
        if not by_role:
            if self._token is None:
                return _error(403, ADMIN_CLOSED), _UNKNOWN
            return _error(401, f"the admin API needs {ways[0]}", challenge), _UNKNOWN
        headers = {k.lower(): v for k, v in request.headers.items()}
        credentials = Credentials(headers, lambda: _peer(request.remote), dict)
        try:
            identity = await self._replica.auth.authenticate(credentials)
        except Unauthenticated as exc:
            return _error(
                401, f"the admin API needs {' or '.join(ways)}: {exc}", challenge
            ), _UNKNOWN
        caller = _Caller(identity.user, identity.groups)
        policy = self._replica.policy
        if not may_administer(identity, settings, None if policy is None else policy.current):
            log.info(
                "admin API: %s refused to user %s (no admin role)", request.path, identity.user
            )
            return _error(403, no_admin_role(identity)), caller
        return None, caller

    def _by_role(self) -> bool:
        """Whether users' credentials may open the API: some user or group holds the role."""
        policy = self._replica.policy
        return admin_by_role(self._replica.settings, None if policy is None else policy.current)

    @staticmethod
    def _authorized(request: web.Request, token: bytes) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), token)

    # --- probes and metrics -----------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"alive": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        r = self._replica
        drivers = r.placement.rings.drivers.values()
        degraded = r.placement.degraded or not r.registry_reachable
        reasons = not_ready(drivers, degraded, r.shutting_down)
        if reasons:
            return _json({"ready": False, "reasons": reasons}, 503)
        return _json({"ready": True})

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self._replica.telemetry.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # --- the API ------------------------------------------------------------------------

    async def _drivers(self, request: web.Request) -> web.Response:
        r = self._replica
        records = await operations.driver_records(r.registry, r.static_drivers)
        members = r.placement.rings.drivers
        for record in records:
            # This replica's own probes; None for a driver it does not probe (not a member).
            address = record["address"]
            known = address in members
            record["health"] = None if not known else "down" if r.health.is_down(address) else "up"
        return _json({"drivers": records})

    async def _sessions(self, request: web.Request) -> web.Response:
        query = request.query
        unknown = sorted(set(query) - {"driver", "limit"})
        if unknown:
            raise ApiError(400, f"unknown parameter(s) {', '.join(unknown)} (known: driver, limit)")
        driver = _address(query["driver"], "driver") if "driver" in query else None
        raw_limit = query.get("limit", str(_DEFAULT_LIMIT))
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = 0
        if not 1 <= limit <= operations.MAX_LISTED:
            top = operations.MAX_LISTED
            raise ApiError(400, f"limit {raw_limit!r} is not a whole number from 1 to {top}")
        records = await operations.session_records(self._replica.registry, driver, limit)
        return _json({"sessions": records})

    async def _session(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        pin = await self._find_pin(request, session_id)
        return _json(operations.pin_record(pin))

    async def _find_pin(self, request: web.Request, session_id: str) -> Pin:
        """The pin a session path (and its ?user=) names; 404 / 409 otherwise."""
        unknown = sorted(set(request.query) - {"user"})
        if unknown:
            raise ApiError(400, f"unknown parameter(s) {', '.join(unknown)} (known: user)")
        user = request.query.get("user")
        try:
            pin = await operations.find_pin(self._replica.registry, session_id, user)
        except operations.AmbiguousSession as exc:
            raise ApiError(409, str(exc)) from None
        if pin is None:
            whose = "" if user is None else f" of user {user!r}"
            raise ApiError(404, f"no session {session_id!r}{whose} is pinned")
        return pin

    async def _drain(self, request: web.Request) -> web.Response:
        address = _address(request.match_info["address"], "driver")
        body = await _body(request, frozenset({"mode"}))
        raw_mode = body.get("mode", DrainMode.KEEP.value)
        try:
            mode = DrainMode(raw_mode)
        except ValueError:
            modes = " or ".join(m.value for m in DrainMode)
            raise ApiError(400, f"mode {raw_mode!r} is not {modes}") from None
        return _json(await self._set_drain(address, mode))

    async def _undrain(self, request: web.Request) -> web.Response:
        address = _address(request.match_info["address"], "driver")
        return _json(await self._set_drain(address, None))

    async def _set_drain(self, address: str, mode: DrainMode | None) -> dict[str, Any]:
        r = self._replica
        try:
            result = await operations.set_drain(r.registry, address, mode, r.static_drivers)
        except operations.UnknownDriver as exc:
            raise ApiError(404, str(exc)) from None
        # Other replicas follow the registry's event; this one need not wait for it.
        await r.refresh_membership()
        log.info(
            "admin API: driver %s %s",
            address,
            "takes new sessions again" if mode is None else f"is draining ({mode.value})",
        )
        return result

    async def _quotas(self, request: web.Request) -> web.Response:
        if request.query:
            raise ApiError(400, f"unknown parameter(s) {', '.join(sorted(request.query))}")
        gate = self._replica.quotas
        if gate is None:
            return _json(
                {
                    "view": "this replica",
                    "active": False,
                    "note": "no policy_file: no quotas are configured",
                    "limits": None,
                    "users": [],
                    "buckets": [],
                }
            )
        usage = gate.usage()
        # Sessions are counted from pins, which every replica shares: the cluster's count.
        pins = await self._replica.registry.sessions(None, operations.MAX_LISTED)
        open_sessions = Counter(p.owner for p in pins if p.owner)
        users = {u["user"]: u for u in usage["users"]}
        for user in open_sessions.keys() - users.keys():
            users[user] = {"user": user, "running": 0, "slots_leased": 0}
        for user, entry in users.items():
            entry["sessions"] = open_sessions.get(user, 0)
        usage["users"] = [users[u] for u in sorted(users)]
        return _json(
            {
                "view": "this replica",
                "note": "sessions: each user's open sessions on all replicas (their pins); "
                "the rest is what this replica counts: running operations, slots and tokens "
                "leased here, calls here in about the last second (the other replicas' "
                "leases are in the registry)",
                **usage,
                "limits": gate.quotas.spec.model_dump(mode="json", exclude_none=True),
            }
        )

    async def _move(self, request: web.Request) -> web.Response:
        r = self._replica
        session_id = request.match_info["session_id"]
        body = await _body(request, frozenset({"driver"}))
        target = body.get("driver")
        if target is not None and not isinstance(target, str):
            raise ApiError(400, "driver must be a string HOST:PORT")
        target = None if target is None else _address(target, "driver")
        pin = await self._find_pin(request, session_id)
        if target is not None and target != pin.driver:
            # Placement follows any driver a pin names; an operator's typo must not become one.
            driver = r.placement.rings.drivers.get(target)
            if driver is None:
                raise ApiError(409, f"driver {target} is not one of this replica's drivers")
            if driver.pool != pin.pool:
                raise ApiError(
                    409,
                    f"driver {target} is in pool {driver.pool!r}, the session in {pin.pool!r}",
                )
            if not driver.takes_new_sessions or r.health.is_down(target):
                state = "down" if r.health.is_down(target) else driver.state.value
                raise ApiError(409, f"driver {target} is {state}: it takes no new sessions")
        try:
            moved = await r.proxy.move_session(pin.key, target)
        except LookupError:  # released between the look-up and the move
            raise ApiError(404, f"no session {session_id!r} is pinned") from None
        except RouterError as exc:  # no live driver left in its pool
            raise ApiError(503, f"cannot move session {session_id!r}: {exc}") from None
        return _json(operations.pin_record(moved))
