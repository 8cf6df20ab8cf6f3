"""A fast, in-process stand-in for a Spark Connect driver, built on the real pyspark protos.

The router forwards raw gRPC bytes to its drivers; integration tests and benchmarks point it at
this fake instead of a JVM that needs 15 s to start and half a gigabyte of memory. The fake
serves the twelve ``spark.connect.SparkConnectService`` methods with small, valid responses that
carry the request's ``session_id`` and a ``server_side_session_id`` that is stable per
(user_id, session_id) for the life of one driver instance (and differs between instances, like a
restarted Spark driver). ``Config.get("spark.connect.grpc.binding.port")`` answers the port this
fake listens on, which is how a test proves which driver served a session. Methods it does not
know (a "newer Spark") are served by a raw stream-stream handler that echoes every request
message back unchanged.

Every call is recorded in :attr:`FakeDriver.calls` (method, session, metadata, propagated
deadline, request count and bytes, whether the peer cancelled it). Faults are injected per call
through request metadata, overriding the constructor defaults:

``x-fake-delay-ms: N``
    wait N ms before answering (cancellable).
``x-fake-status: NAME`` / ``x-fake-details: TEXT``
    abort with that ``grpc.StatusCode`` name, with a Spark-like ``grpc-status-details-bin``
    trailer (an ``ErrorInfo`` with errorClass ``FAKE_ERROR``) and ``x-fake-trailer: kept``.
``x-fake-batches: N`` / ``x-fake-batch-bytes: B``
    ExecutePlan result size: N ``arrow_batch`` responses of B bytes each, then ``result_complete``.
    The payload is not valid Arrow data; it is one reused bytes object, and responses are made
    one at a time as gRPC asks for them, so the fake never buffers a result.
``x-fake-abort-after: K``
    ExecutePlan / ReattachExecute send K responses, then abort with UNAVAILABLE.
``x-fake-trailer-echo: V``
    on success send initial metadata ``x-fake-initial: V`` and trailing metadata
    ``x-fake-trailer: V``.

Faults that no header can ask for — calls the router makes on its own, such as replaying a
moved session's journal — are planned on the driver instead: ``fail_next(method, status,
times=K, after=N, session_id=S)`` lets N more calls of ``method`` (of session S, if given:
probes and other sessions pass untouched) through, then fails the next K with ``status``
(the same Spark-like trailer as ``x-fake-status``), then serves normally again.

Like a Spark driver started with ``spark.connect.authenticate.token``, a fake given ``token``
fails every call without ``authorization: Bearer <token>`` with UNAUTHENTICATED; given
``credentials`` (``grpc.ServerCredentials``) it serves TLS, as a driver behind a TLS sidecar.

Command line: ``python -m loadtest.fake_driver --listen 127.0.0.1:0`` prints
``fake driver listening on HOST:PORT`` once serving and stops cleanly on SIGTERM / SIGINT;
``--tls-cert FILE --tls-key FILE`` serve TLS, ``--token T`` requires that bearer token.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NoReturn, TypeAlias

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc, common_pb2, types_pb2

from common.lifecycle import Signals

__all__ = [
    "ABORT_AFTER_HEADER",
    "BATCHES_HEADER",
    "BATCH_BYTES_HEADER",
    "DELAY_HEADER",
    "DETAILS_HEADER",
    "KNOWN_METHODS",
    "SERVICE_NAME",
    "STATUS_HEADER",
    "TRAILER_ECHO_HEADER",
    "CallRecord",
    "FakeDriver",
    "main",
]

SERVICE_NAME = "spark.connect.SparkConnectService"
_METHOD_PREFIX = f"/{SERVICE_NAME}/"
KNOWN_METHODS = frozenset(
    m.name for m in base_pb2.DESCRIPTOR.services_by_name["SparkConnectService"].methods
)

DELAY_HEADER = "x-fake-delay-ms"
STATUS_HEADER = "x-fake-status"
DETAILS_HEADER = "x-fake-details"
BATCHES_HEADER = "x-fake-batches"
BATCH_BYTES_HEADER = "x-fake-batch-bytes"
ABORT_AFTER_HEADER = "x-fake-abort-after"
TRAILER_ECHO_HEADER = "x-fake-trailer-echo"
_TRAILER_KEY = "x-fake-trailer"
_INITIAL_KEY = "x-fake-initial"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

SPARK_VERSION = "4.3.0-fake"
BINDING_PORT_CONF = "spark.connect.grpc.binding.port"
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_SERVER_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    # gRPC sets SO_REUSEPORT by default: a second server on a busy port would bind without
    # error and the kernel would share connections between the two. Fail like Spark instead.
    ("grpc.so_reuseport", 0),
]

# grpc ships no type information mypy picks up here, so these are mostly documentation.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Metadata: TypeAlias = tuple[tuple[str, str | bytes], ...]


@dataclass
class CallRecord:
    """One RPC as the fake driver saw it."""

    method: str
    session_id: str
    user_id: str
    metadata: dict[str, str | bytes]
    time_remaining: float | None
    requests: int = 1
    request_bytes: int = 0
    cancelled: bool = False
    done: bool = False


@dataclass
class _Operation:
    """What the driver remembers about one ExecutePlan: its size and the response ids sent."""

    total: int  # responses in the full result, result_complete included
    batch_bytes: int
    sent_ids: list[str] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)

    def response_id(self, index: int) -> str:
        """The id of response ``index``: the one sent before if any, else a new one."""
        if index < len(self.sent_ids):
            return self.sent_ids[index]
        response_id = str(uuid.uuid4())
        self.positions[response_id] = len(self.sent_ids)
        self.sent_ids.append(response_id)
        return response_id


@dataclass
class _Fault:
    """Planned failures of one method: let ``skip`` calls through, then fail ``times``."""

    code: grpc.StatusCode
    details: str
    skip: int
    times: int
    session_id: str | None  # only this session's calls count; None: every call


@dataclass
class _Session:
    confs: dict[str, str] = field(default_factory=dict)
    operations: dict[str, _Operation] = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _payload(size: int) -> bytes:
    """One shared arrow_batch payload of ``size`` bytes (reused for every message)."""
    return b"\x00" * size


def _status_code(name: str) -> grpc.StatusCode:
    """The grpc.StatusCode called ``name`` (case-insensitive)."""
    try:
        return grpc.StatusCode[name.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown grpc status code name: {name!r}") from None


def _error_trailers(
    code: grpc.StatusCode,
    message: str,
    error_class: str,
    exception_class: str,
    extra: Metadata = (),
    sql_state: str | None = None,
) -> Metadata:
    """Trailing metadata shaped like Spark's: a google.rpc.Status with one ErrorInfo."""
    info_metadata = {"errorClass": error_class, "classes": json.dumps([exception_class])}
    if sql_state is not None:
        info_metadata["sqlState"] = sql_state
    info = error_details_pb2.ErrorInfo(
        reason=exception_class, domain="org.apache.spark", metadata=info_metadata
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return ((_STATUS_DETAILS_KEY, status.SerializeToString()), *extra)


def _session_of(raw: bytes) -> tuple[str, str]:
    """Best-effort (session_id, user_id) from a raw request of an unknown method."""
    try:
        # Field 1 is the session id and field 2 the UserContext in every Spark Connect request.
        msg = base_pb2.ReleaseSessionRequest.FromString(raw)
        return str(msg.session_id), str(msg.user_context.user_id)
    except Exception:
        return "", ""


class _Call:
    """Per-call bookkeeping: the record, the fault settings and the success metadata."""

    def __init__(self, driver: FakeDriver, method: str, context: Context) -> None:
        self.driver = driver
        self.context = context
        metadata: dict[str, str | bytes] = {}
        for key, value in context.invocation_metadata() or ():
            metadata[key] = value
        self.metadata = metadata
        self.record = CallRecord(
            method=method,
            session_id="",
            user_id="",
            metadata=metadata,
            time_remaining=context.time_remaining(),
        )
        driver.calls.append(self.record)
        if driver.keep_calls is not None and len(driver.calls) > 2 * driver.keep_calls:
            del driver.calls[: -driver.keep_calls]  # amortised: trimmed once per keep_calls
        context.add_done_callback(self._on_done)
        self.echo = self._text(TRAILER_ECHO_HEADER)
        self.observed: str | None = None  # client_observed_server_side_session_id, if sent

    def _on_done(self, _context: Any) -> None:
        # grpc.aio runs done callbacks when the RPC ends. If the handler has not finished by
        # then, the peer ended the call (cancel or deadline). context.cancelled() is not usable
        # here: it reads False even for cancelled calls (grpc/grpc#36193).
        if not self.record.done:
            self.record.cancelled = True

    def __enter__(self) -> _Call:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A cancelled coroutine handler sees CancelledError; a streaming handler suspended at
        # `yield` is closed with GeneratorExit instead.
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError | GeneratorExit):
            self.record.cancelled = True
        self.record.done = True

    def set_session(self, request: Any) -> None:
        """Record the session, user and size of a (first) request message."""
        self.record.session_id = str(request.session_id)
        self.record.user_id = str(request.user_context.user_id)
        self.record.request_bytes += int(request.ByteSize())

    def _text(self, key: str) -> str | None:
        value = self.metadata.get(key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else value

    async def abort(self, code: grpc.StatusCode, details: str, trailers: Metadata = ()) -> NoReturn:
        """End the call with ``code``; the record is marked done before the status goes out.

        (grpc.aio sends the status inside ``context.abort`` before raising, so a client can
        see the error before the handler has unwound.)
        """
        self.record.done = True
        await self.context.abort(code, details, trailers)
        raise AssertionError("unreachable: context.abort returned")  # pragma: no cover

    async def abort_spark(
        self,
        code: grpc.StatusCode,
        error_class: str,
        message: str,
        exception_class: str = "org.apache.spark.SparkSQLException",
        sql_state: str | None = None,
    ) -> NoReturn:
        """Abort the call the way Spark reports an error class."""
        details = f"[{error_class}] {message}"
        trailers = _error_trailers(code, details, error_class, exception_class, sql_state=sql_state)
        await self.abort(code, details, trailers)

    async def int_header(self, key: str, default: int) -> int:
        """A non-negative integer fault header, or ``default``; aborts on a bad value."""
        text = self._text(key)
        if text is None:
            return default
        try:
            value = int(text)
            if value < 0:
                raise ValueError(text)
        except ValueError:
            await self.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad {key} header: {text!r}")
        return value

    async def prelude(self, drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """Apply the delay and status faults; then send echo initial metadata if asked.

        ``drain`` (client-streaming calls) reads the rest of the request stream before a
        status fault aborts the call: a grpc.aio client still writing requests when the
        server ends the call may report INTERNAL instead of the server's status.
        """
        token = self.driver.token
        if token is not None and self._text("authorization") != f"Bearer {token}":
            # What Spark's PreSharedKeyAuthenticationInterceptor answers.
            await self.abort(grpc.StatusCode.UNAUTHENTICATED, "Invalid authentication token")
        delay_ms = await self.int_header(DELAY_HEADER, self.driver.delay_ms)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        status_name = self._text(STATUS_HEADER) or self.driver.fail_status
        if status_name:
            try:
                code = _status_code(status_name)
            except ValueError as exc:
                await self.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if code is not grpc.StatusCode.OK:
                if drain is not None:
                    await drain()
                await self.abort_fake(code, self._text(DETAILS_HEADER) or "fake failure")
        fault = self.driver._planned_fault(self.record.method, self.record.session_id)
        if fault is not None:
            if drain is not None:
                await drain()
            await self.abort_fake(fault.code, fault.details)
        if self.driver.check_observed_session_id:
            await self.check_observed()
        if self.echo is not None:
            await self.context.send_initial_metadata(((_INITIAL_KEY, self.echo),))

    async def abort_fake(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """Abort with a Spark-like error trailer plus ``x-fake-trailer: kept``."""
        trailers = _error_trailers(
            code,
            details,
            "FAKE_ERROR",
            "org.apache.spark.sql.AnalysisException",
            extra=((_TRAILER_KEY, "kept"),),
        )
        await self.abort(code, details, trailers)

    async def check_observed(self) -> None:
        """Fail like Spark when the client observed a different server-side session id."""
        if self.observed is None:
            return
        expected = self.driver.server_side_session_id(self.record.user_id, self.record.session_id)
        if self.observed != expected:
            await self.abort_spark(
                grpc.StatusCode.INTERNAL,
                "INVALID_HANDLE.SESSION_CHANGED",
                f"The handle {self.record.session_id} is invalid. The existing Spark server "
                "driver instance has restarted. Please reconnect.",
            )

    def succeed(self) -> None:
        """Set the echo trailer on a successful call."""
        if self.echo is not None:
            self.context.set_trailing_metadata(((_TRAILER_KEY, self.echo),))


class _UnknownMethods(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Serves methods of the Spark Connect service that pyspark 4.3 does not define."""

    def __init__(self, driver: FakeDriver) -> None:
        self._driver = driver

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        """A raw stream-stream echo handler for unknown methods of the service, else None."""
        method: str = handler_call_details.method
        if not method.startswith(_METHOD_PREFIX):
            return None
        name = method[len(_METHOD_PREFIX) :]
        if name in KNOWN_METHODS:
            return None
        driver = self._driver

        async def echo(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
            async for chunk in driver._echo(name, requests, context):
                yield chunk

        return grpc.stream_stream_rpc_method_handler(echo)


class _Malformed:
    """A request message that does not parse."""


_MALFORMED = _Malformed()
# What grpc-java (Spark's server) answers for a request that does not parse.
_UNPARSABLE = "Invalid protobuf byte sequence"


def _tolerant(handler: Any) -> Any:
    """`handler` answering an unparsable request INTERNAL, as Spark does, not UNKNOWN.

    Python grpc reports a failing deserializer as UNKNOWN ("Unexpected DecodeError"), the
    status a crash gets; tests that fuzz the router must tell the two apart.
    """
    parse = handler.request_deserializer

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception:  # DecodeError, or anything a corrupt message makes protobuf raise
            return _MALFORMED

    async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for request in requests:
            if request is _MALFORMED:
                await context.abort(grpc.StatusCode.INTERNAL, _UNPARSABLE)
            yield request

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            if request is _MALFORMED:
                await context.abort(grpc.StatusCode.INTERNAL, _UNPARSABLE)
            return await inner_uu(request, context)

        return handler._replace(request_deserializer=deserialize, unary_unary=unary_unary)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            if request is _MALFORMED:
                await context.abort(grpc.StatusCode.INTERNAL, _UNPARSABLE)
            async for response in inner_us(request, context):
                yield response

        return handler._replace(request_deserializer=deserialize, unary_stream=unary_stream)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
            return await inner_su(checked(requests, context), context)

        return handler._replace(request_deserializer=deserialize, stream_unary=stream_unary)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for response in inner_ss(checked(requests, context), context):
            yield response

    return handler._replace(request_deserializer=deserialize, stream_stream=stream_stream)


class _Tolerant:
    """The server as the generated code sees it: its handlers made `_tolerant` on the way in."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the registered handlers below serve the same paths."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Register `handlers`, each tolerant of unparsable requests."""
        self._server.add_registered_method_handlers(
            service, {name: _tolerant(h) for name, h in handlers.items()}
        )


class FakeDriver:
    """An asyncio gRPC server that answers Spark Connect calls like a tiny, instant Spark."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        delay_ms: int = 0,
        fail_status: str | None = None,
        batches: int = 1,
        batch_bytes: int = 64,
        check_observed_session_id: bool = False,
        keep_calls: int | None = None,
        credentials: grpc.ServerCredentials | None = None,
        token: str | None = None,
    ) -> None:
        """Configure the driver; nothing listens until :meth:`start`.

        ``keep_calls`` bounds :attr:`calls` to about that many recent records (None: all),
        so a long benchmark does not grow the fake without limit.
        """
        if fail_status is not None:
            _status_code(fail_status)  # validate early
        if min(delay_ms, batches, batch_bytes, port) < 0:
            raise ValueError("delay_ms, batches, batch_bytes and port must be >= 0")
        self.host = host
        self.port = port
        self.delay_ms = delay_ms
        self.fail_status = fail_status
        self.batches = batches
        self.batch_bytes = batch_bytes
        self.check_observed_session_id = check_observed_session_id
        self.instance_id = uuid.uuid4()
        self.calls: list[CallRecord] = []
        self.keep_calls = keep_calls
        self.credentials = credentials
        self.token = token
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._faults: dict[str, _Fault] = {}  # method -> its planned failures
        self._server: grpc.aio.Server | None = None

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> int:
        """Bind and start serving; returns (and stores in ``self.port``) the bound port.

        Raises OSError when the address cannot be bound (a busy port is not shared).
        """
        if self._server is not None:
            raise RuntimeError("fake driver already started")
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        base_pb2_grpc.add_SparkConnectServiceServicer_to_server(self, _Tolerant(server))  # type: ignore[no-untyped-call]
        server.add_generic_rpc_handlers((_UnknownMethods(self),))
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            if self.credentials is None:
                port = int(server.add_insecure_port(f"{host}:{self.port}"))
            else:
                port = int(server.add_secure_port(f"{host}:{self.port}", self.credentials))
        except RuntimeError as exc:  # grpc >= 1.5x raises when the port is busy
            raise OSError(f"fake driver could not bind {host}:{self.port}") from exc
        if port == 0:  # older grpc returned 0 instead
            raise OSError(f"fake driver could not bind {host}:{self.port}")
        await server.start()
        self._server = server
        self.port = port
        return port

    async def stop(self, grace: float | None = 0) -> None:
        """Stop serving; in-flight calls get ``grace`` seconds (0 / None: cancel them now)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)

    async def wait_for_termination(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> FakeDriver:
        """Start the driver."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the driver."""
        await self.stop()

    @property
    def address(self) -> str:
        """``host:port`` to dial (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # ----------------------------------------------------------------------------- test helpers

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``predicate`` every 10 ms until it is true; TimeoutError after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_error: BaseException | None = None
        while True:
            try:
                if predicate():
                    return
                last_error = None
            except Exception as exc:  # e.g. calls[-1] before any call arrived
                last_error = exc
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
        try:
            name = inspect.getsource(predicate).strip()
        except (OSError, TypeError):
            name = getattr(predicate, "__qualname__", repr(predicate))
        recent = "\n  ".join(repr(c) for c in self.calls[-5:]) or "(none)"
        error = f"; last evaluation raised {last_error!r}" if last_error is not None else ""
        raise TimeoutError(
            f"fake driver {self.address}: condition still false after {timeout}s{error}: {name}\n"
            f"{len(self.calls)} call(s) recorded; the last ones:\n  {recent}"
        )

    def fail_next(
        self,
        method: str,
        status: str = "UNAVAILABLE",
        *,
        times: int = 1,
        after: int = 0,
        session_id: str | None = None,
        details: str = "fake planned failure",
    ) -> None:
        """Let ``after`` more calls of ``method`` through, then fail ``times`` with ``status``.

        With ``session_id`` only that session's calls count. Replaces any failures planned
        for ``method`` before; ``times=0`` cancels them.
        """
        code = _status_code(status)
        if times < 0 or after < 0:
            raise ValueError("times and after must be >= 0")
        if times == 0:
            self._faults.pop(method, None)
            return
        self._faults[method] = _Fault(code, details, after, times, session_id)

    def _planned_fault(self, method: str, session_id: str) -> _Fault | None:
        """The failure planned for this call of ``method``, if any (consumes one)."""
        fault = self._faults.get(method)
        if fault is None or fault.session_id not in (None, session_id):
            return None
        if fault.skip:
            fault.skip -= 1
            return None
        fault.times -= 1
        if not fault.times:
            del self._faults[method]
        return fault

    def server_side_session_id(self, user_id: str, session_id: str) -> str:
        """The server-side session id this driver hands out for (user_id, session_id)."""
        return str(uuid.uuid5(self.instance_id, f"{user_id}\x00{session_id}"))

    # ----------------------------------------------------------------------------- internals

    def _session(self, call: _Call) -> _Session:
        key = (call.record.user_id, call.record.session_id)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session()
        return session

    def _ids(self, call: _Call) -> tuple[str, str]:
        record = call.record
        return record.session_id, self.server_side_session_id(record.user_id, record.session_id)

    @staticmethod
    def _note(call: _Call, request: Any) -> None:
        """Record the session, user, size and observed server-side id of a first request."""
        call.set_session(request)
        try:
            if request.HasField("client_observed_server_side_session_id"):
                call.observed = str(request.client_observed_server_side_session_id)
        except ValueError:  # ReleaseSessionRequest has no such field
            pass

    async def _begin(self, call: _Call, request: Any) -> None:
        """Record a unary request and apply the faults common to every method."""
        self._note(call, request)
        await call.prelude()

    def _static_confs(self) -> dict[str, str]:
        return {BINDING_PORT_CONF: str(self.port)}

    def _conf_defaults(self) -> dict[str, str]:
        return {
            **self._static_confs(),
            "spark.sql.session.timeZone": "Etc/UTC",
            "spark.sql.ansi.enabled": "true",
        }

    async def _results(
        self, call: _Call, op_id: str, op: _Operation, start: int
    ) -> AsyncIterator[Any]:
        """ExecutePlanResponses ``start``.. of ``op``, made one at a time as they are sent."""
        abort_after = await call.int_header(ABORT_AFTER_HEADER, -1)
        session_id, server_side = self._ids(call)
        payload = _payload(op.batch_bytes)
        last = op.total - 1
        indexes: Sequence[int] = range(start, op.total)
        if start > last:
            indexes = [last]  # everything was sent: answer just result_complete again
        for sent, index in enumerate(indexes):
            if sent == abort_after:
                await call.abort(grpc.StatusCode.UNAVAILABLE, "fake abort mid-stream")
            response = base_pb2.ExecutePlanResponse(
                session_id=session_id,
                server_side_session_id=server_side,
                operation_id=op_id,
                response_id=op.response_id(index) if start <= last else str(uuid.uuid4()),
            )
            if index == last:
                response.result_complete.SetInParent()
            else:
                response.arrow_batch.row_count = 1
                response.arrow_batch.data = payload
            yield response

    # ----------------------------------------------------------------------------- servicer

    async def ExecutePlan(self, request: Any, context: Context) -> AsyncIterator[Any]:
        """Stream ``batches`` arrow batches, then result_complete."""
        with _Call(self, "ExecutePlan", context) as call:
            await self._begin(call, request)
            batches = await call.int_header(BATCHES_HEADER, self.batches)
            batch_bytes = await call.int_header(BATCH_BYTES_HEADER, self.batch_bytes)
            op_id = str(request.operation_id) if request.HasField("operation_id") else ""
            op_id = op_id or str(uuid.uuid4())
            op = _Operation(total=batches + 1, batch_bytes=batch_bytes)
            self._session(call).operations[op_id] = op
            async for response in self._results(call, op_id, op, 0):
                yield response
            call.succeed()

    async def ReattachExecute(self, request: Any, context: Context) -> AsyncIterator[Any]:
        """Continue a known operation after ``last_response_id``."""
        with _Call(self, "ReattachExecute", context) as call:
            await self._begin(call, request)
            op_id = str(request.operation_id)
            session = self._sessions.get((call.record.user_id, call.record.session_id))
            op = session.operations.get(op_id) if session is not None else None
            if op is None:
                await call.abort_spark(
                    grpc.StatusCode.INTERNAL,
                    "INVALID_HANDLE.OPERATION_NOT_FOUND",
                    f"The handle {op_id} is invalid. Operation not found.",
                    sql_state="HY000",
                )
            start = 0
            if request.HasField("last_response_id"):
                position = op.positions.get(str(request.last_response_id))
                if position is None:
                    await call.abort_spark(
                        grpc.StatusCode.INTERNAL,
                        "INVALID_CURSOR.POSITION_NOT_FOUND",
                        f"The position {request.last_response_id} is not found.",
                        sql_state="HY109",
                    )
                start = position + 1
            async for response in self._results(call, op_id, op, start):
                yield response
            call.succeed()

    async def AnalyzePlan(self, request: Any, context: Context) -> Any:
        """A minimal valid answer of the requested analyze kind."""
        with _Call(self, "AnalyzePlan", context) as call:
            await self._begin(call, request)
            session_id, server_side = self._ids(call)
            response = base_pb2.AnalyzePlanResponse(
                session_id=session_id, server_side_session_id=server_side
            )
            id_schema = types_pb2.DataType(
                struct=types_pb2.DataType.Struct(
                    fields=[
                        types_pb2.DataType.StructField(
                            name="id",
                            data_type=types_pb2.DataType(long=types_pb2.DataType.Long()),
                            nullable=False,
                        )
                    ]
                )
            )
            kind = request.WhichOneof("analyze")
            if kind == "spark_version":
                response.spark_version.version = SPARK_VERSION
            elif kind == "schema":
                response.schema.schema.CopyFrom(id_schema)
            elif kind == "ddl_parse":
                response.ddl_parse.parsed.CopyFrom(id_schema)
            elif kind == "explain":
                response.explain.explain_string = "== Physical Plan ==\nFakeScan [id#0L]\n"
            elif kind == "tree_string":
                response.tree_string.tree_string = "root\n |-- id: long (nullable = false)\n"
            elif kind == "is_local":
                response.is_local.is_local = False
            elif kind == "is_streaming":
                response.is_streaming.is_streaming = False
            elif kind == "input_files":
                response.input_files.SetInParent()
            elif kind == "same_semantics":
                response.same_semantics.result = False
            elif kind == "semantic_hash":
                response.semantic_hash.result = 0
            elif kind == "persist":
                response.persist.SetInParent()
            elif kind == "unpersist":
                response.unpersist.SetInParent()
            elif kind == "get_storage_level":
                response.get_storage_level.storage_level.CopyFrom(
                    common_pb2.StorageLevel(use_memory=True, use_disk=True, replication=1)
                )
            elif kind == "json_to_ddl":
                response.json_to_ddl.ddl_string = "id BIGINT NOT NULL"
            call.succeed()
            return response

    async def Config(self, request: Any, context: Context) -> Any:
        """Per-session confs: set, get, get_with_default, get_option, get_all, unset, ..."""
        with _Call(self, "Config", context) as call:
            await self._begin(call, request)
            session_id, server_side = self._ids(call)
            response = base_pb2.ConfigResponse(
                session_id=session_id, server_side_session_id=server_side
            )
            confs = self._session(call).confs
            defaults = self._conf_defaults()
            static = self._static_confs()
            op = request.operation
            kind = op.WhichOneof("op_type")

            def lookup(key: str) -> str | None:
                if key in static:
                    return static[key]
                return confs.get(key, defaults.get(key))

            if kind in ("set", "unset"):
                keys = [p.key for p in op.set.pairs] if kind == "set" else list(op.unset.keys)
                for key in keys:
                    if key in static:
                        await call.abort_spark(
                            grpc.StatusCode.INTERNAL,
                            "CANNOT_MODIFY_CONFIG",
                            f'Cannot modify the value of the Spark config: "{key}".',
                            exception_class="org.apache.spark.sql.AnalysisException",
                            sql_state="46110",
                        )
                if kind == "set":
                    for pair in op.set.pairs:
                        if pair.HasField("value"):
                            confs[pair.key] = pair.value
                        else:
                            confs.pop(pair.key, None)
                else:
                    for key in keys:
                        confs.pop(key, None)
            elif kind == "get":
                for key in op.get.keys:
                    value = lookup(key)
                    if value is None:
                        await call.abort_spark(
                            grpc.StatusCode.INTERNAL,
                            "SQL_CONF_NOT_FOUND",
                            f'The SQL config "{key}" cannot be found. '
                            "Please verify that the config exists.",
                            exception_class="org.apache.spark.SparkNoSuchElementException",
                            sql_state="42K0I",
                        )
                    response.pairs.add(key=key, value=value)
            elif kind == "get_with_default":
                for pair in op.get_with_default.pairs:
                    value = lookup(pair.key)
                    if value is None and pair.HasField("value"):
                        value = pair.value
                    response.pairs.add(key=pair.key, value=value)
            elif kind == "get_option":
                for key in op.get_option.keys:
                    response.pairs.add(key=key, value=lookup(key))
            elif kind == "get_all":
                prefix = op.get_all.prefix if op.get_all.HasField("prefix") else ""
                merged = {**defaults, **confs, **static}
                for key in sorted(merged):
                    if key.startswith(prefix):
                        response.pairs.add(key=key, value=merged[key])
            elif kind == "is_modifiable":
                for key in op.is_modifiable.keys:
                    response.pairs.add(key=key, value="false" if key in static else "true")
            call.succeed()
            return response

    async def AddArtifacts(self, request_iterator: AsyncIterator[Any], context: Context) -> Any:
        """Consume every request; report each artifact name as received with a good CRC."""
        with _Call(self, "AddArtifacts", context) as call:
            names: list[str] = []
            call.record.requests = 0
            # Read the whole stream before any fault, so a failing call never races the
            # client's writes (see _Call.prelude).
            async for request in request_iterator:
                if call.record.requests == 0:
                    self._note(call, request)
                else:
                    call.record.request_bytes += int(request.ByteSize())
                call.record.requests += 1
                payload = request.WhichOneof("payload")
                if payload == "batch":
                    names.extend(a.name for a in request.batch.artifacts)
                elif payload == "begin_chunk":
                    names.append(request.begin_chunk.name)
            await call.prelude()
            session_id, server_side = self._ids(call)
            response = base_pb2.AddArtifactsResponse(
                session_id=session_id, server_side_session_id=server_side
            )
            for name in names:
                response.artifacts.add(name=name, is_crc_successful=True)
            call.succeed()
            return response

    async def ArtifactStatus(self, request: Any, context: Context) -> Any:
        """Every requested artifact is reported missing."""
        with _Call(self, "ArtifactStatus", context) as call:
            await self._begin(call, request)
            session_id, server_side = self._ids(call)
            response = base_pb2.ArtifactStatusesResponse(
                session_id=session_id, server_side_session_id=server_side
            )
            for name in request.names:
                response.statuses[name].exists = False
            call.succeed()
            return response

    async def Interrupt(self, request: Any, context: Context) -> Any:
        """Nothing runs, so nothing is interrupted (an operation id interrupt echoes the id)."""
        with _Call(self, "Interrupt", context) as call:
            await self._begin(call, request)
            session_id, server_side = self._ids(call)
            response = base_pb2.InterruptResponse(
                session_id=session_id, server_side_session_id=server_side
            )
            if request.WhichOneof("interrupt") == "operation_id":
                response.interrupted_ids.append(request.operation_id)
            call.succeed()
            return response

    async def ReleaseExecute(self, request: Any, context: Context) -> Any:
        """Echo the operation id; ``release_all`` forgets the operation."""
        with _Call(self, "ReleaseExecute", context) as call:
            await self._begin(call, request)
            session_id, server_side = self._ids(call)
            if request.WhichOneof("release") == "release_all":
                session = self._sessions.get((call.record.user_id, call.record.session_id))
                if session is not None:
                    session.operations.pop(str(request.operation_id), None)
            call.succeed()
            return base_pb2.ReleaseExecuteResponse(
                session_id=session_id,
                server_side_session_id=server_side,
                operation_id=request.operation_id,
            )

    async def ReleaseSession(self, request: Any, context: Context) -> Any:
        """Forget the session's confs and operations."""
        with _Call(self, "ReleaseSession", context) as call:
            await self._begin(call, request)
            session_id, server_side = self._ids(call)
            self._sessions.pop((call.record.user_id, call.record.session_id), None)
            call.succeed()
            return base_pb2.ReleaseSessionResponse(
                session_id=session_id, server_side_session_id=server_side
            )

    async def FetchErrorDetails(self, request: Any, context: Context) -> Any:
        """No stored errors: a response with only the ids."""
        with _Call(self, "FetchErrorDetails", context) as call:
            await self._begin(call, request)
            session_id, server_side = self._ids(call)
            call.succeed()
            return base_pb2.FetchErrorDetailsResponse(
                session_id=session_id, server_side_session_id=server_side
            )

    async def CloneSession(self, request: Any, context: Context) -> Any:
        """Copy the session's confs to a new session id."""
        with _Call(self, "CloneSession", context) as call:
            await self._begin(call, request)
            session_id, server_side = self._ids(call)
            new_id = str(request.new_session_id) if request.HasField("new_session_id") else ""
            new_id = new_id or str(uuid.uuid4())
            user_id = call.record.user_id
            source = self._sessions.get((user_id, session_id))
            clone = self._sessions[(user_id, new_id)] = _Session()
            if source is not None:
                clone.confs.update(source.confs)
            call.succeed()
            return base_pb2.CloneSessionResponse(
                session_id=session_id,
                server_side_session_id=server_side,
                new_session_id=new_id,
                new_server_side_session_id=self.server_side_session_id(user_id, new_id),
            )

    async def GetStatus(self, request: Any, context: Context) -> Any:
        """The ids, plus a state for each operation id asked about."""
        with _Call(self, "GetStatus", context) as call:
            await self._begin(call, request)
            session_id, server_side = self._ids(call)
            response = base_pb2.GetStatusResponse(
                session_id=session_id, server_side_session_id=server_side
            )
            if request.HasField("operation_status"):
                operations = self._session(call).operations
                state = base_pb2.GetStatusResponse.OperationStatus
                for op_id in request.operation_status.operation_ids:
                    response.operation_statuses.add(
                        operation_id=op_id,
                        state=(
                            state.OPERATION_STATE_SUCCEEDED
                            if op_id in operations
                            else state.OPERATION_STATE_UNKNOWN
                        ),
                    )
            call.succeed()
            return response

    async def _echo(
        self, name: str, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        """Raw echo for unknown methods: every request message comes back unchanged."""
        with _Call(self, name, context) as call:
            record = call.record
            record.requests = 0

            async def drain() -> None:
                async for raw in requests:
                    record.requests += 1
                    record.request_bytes += len(raw)

            async for raw in requests:
                record.requests += 1
                record.request_bytes += len(raw)
                if record.requests == 1:
                    record.session_id, record.user_id = _session_of(raw)
                    await call.prelude(drain)
                yield raw
            if call.record.requests == 0:
                await call.prelude()
            call.succeed()


# --------------------------------------------------------------------------------- CLI


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _status_name(value: str) -> str:
    try:
        _status_code(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.fake_driver",
        description="A fast Spark Connect stand-in for router tests and benchmarks.",
    )
    parser.add_argument(
        "--listen", type=_parse_listen, default=("127.0.0.1", 0), metavar="HOST:PORT"
    )
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--fail-status", type=_status_name, default=None, metavar="NAME")
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--batch-bytes", type=int, default=64)
    parser.add_argument(
        "--check-observed-session-id",
        action="store_true",
        help="fail like Spark (INVALID_HANDLE.SESSION_CHANGED) when a request's "
        "client_observed_server_side_session_id is not this driver's id",
    )
    parser.add_argument(
        "--keep-calls",
        type=int,
        default=10_000,
        help="recent calls kept for inspection (bounds memory in long runs)",
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM chain")
    parser.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert")
    parser.add_argument("--token", help="require authorization: Bearer TOKEN on every call")
    return parser


def _credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """TLS server credentials from --tls-cert/--tls-key, or None."""
    if not (args.tls_cert or args.tls_key):
        return None
    with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


async def _serve(args: argparse.Namespace, credentials: grpc.ServerCredentials | None) -> None:
    host, port = args.listen
    driver = FakeDriver(
        host,
        port,
        delay_ms=args.delay_ms,
        fail_status=args.fail_status,
        batches=args.batches,
        batch_bytes=args.batch_bytes,
        check_observed_session_id=args.check_observed_session_id,
        keep_calls=args.keep_calls,
        credentials=credentials,
        token=args.token,
    )
    async with Signals() as signals:
        await driver.start()
        print(f"fake driver listening on {driver.address}", flush=True)
        try:
            await signals.stopping.wait()
        finally:
            await driver.stop(grace=0.5)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fake driver until SIGTERM / SIGINT; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        asyncio.run(_serve(args, _credentials(args)))
    except OSError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
