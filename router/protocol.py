"""Spark Connect knowledge the router needs: the method table and how to identify a call.

A call is identified from its metadata and the raw bytes of its first request message:
the session is the `x-spark-session-id` header when present, else field 1 (`session_id`)
of the request; the user is `user_context.user_id` (field 2 → field 1). Nothing is
deserialized with the generated classes (see wire.py).

Invariants:
- Methods unknown to the router are forwarded as stream-stream (the shape that carries any
  call on the wire), as long as field 1 of their first message names the session.
- A call whose session cannot be read, or whose header and body disagree, is rejected
  with INVALID_ARGUMENT (errors.BadRequest); the router never guesses a session.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from router import wire
from router.errors import BadRequest

SERVICE = "spark.connect.SparkConnectService"
PATH_PREFIX = f"/{SERVICE}/"

SESSION_HEADER = "x-spark-session-id"
POOL_HEADER = "x-spark-pool"

# Every Spark Connect request starts with these two fields.
SESSION_ID_FIELD = 1
USER_CONTEXT_FIELD = 2
USER_ID_FIELD = 1  # inside UserContext

# Session ids are UUIDs in Spark; anything much longer is garbage or abuse.
MAX_SESSION_ID_LENGTH = 256


class Shape(enum.Enum):
    """The four gRPC call shapes."""

    UNARY_UNARY = "unary_unary"
    UNARY_STREAM = "unary_stream"
    STREAM_UNARY = "stream_unary"
    STREAM_STREAM = "stream_stream"

    @property
    def client_streaming(self) -> bool:
        return self in (Shape.STREAM_UNARY, Shape.STREAM_STREAM)

    @property
    def server_streaming(self) -> bool:
        return self in (Shape.UNARY_STREAM, Shape.STREAM_STREAM)


@dataclass(frozen=True)
class Method:
    """What the router knows of one Spark Connect method (field numbers: SPARK_CONNECT.md)."""

    name: str
    shape: Shape
    observed_field: int | None  # request: client_observed_server_side_session_id
    response_server_side_field: int  # response: server_side_session_id
    response_session_field: int  # response: session_id
    operation_id_field: int | None = None  # request: operation_id

    @property
    def path(self) -> str:
        return PATH_PREFIX + self.name


_U, _US, _SU = Shape.UNARY_UNARY, Shape.UNARY_STREAM, Shape.STREAM_UNARY

METHODS: Mapping[str, Method] = {
    m.name: m
    for m in (
        Method("ExecutePlan", _US, 8, 15, 1, operation_id_field=6),
        Method("AnalyzePlan", _U, 17, 15, 1),
        Method("Config", _U, 8, 4, 1),
        Method("AddArtifacts", _SU, 7, 3, 2),
        Method("ArtifactStatus", _U, 5, 3, 2),
        Method("Interrupt", _U, 7, 3, 1, operation_id_field=6),
        Method("ReattachExecute", _US, 6, 15, 1, operation_id_field=3),
        Method("ReleaseExecute", _U, 7, 3, 1, operation_id_field=3),
        Method("ReleaseSession", _U, None, 2, 1),
        Method("FetchErrorDetails", _U, 5, 3, 4),
        Method("CloneSession", _U, 5, 2, 1),
        Method("GetStatus", _U, 4, 2, 1),
    )
}


def method_for_path(path: str) -> Method | None:
    """The Method for a gRPC path of the Spark Connect service; a generic one for unknown names.

    Returns None for paths outside the service (the server answers UNIMPLEMENTED).
    """
    if not path.startswith(PATH_PREFIX):
        return None
    name = path[len(PATH_PREFIX) :]
    known = METHODS.get(name)
    if known is not None:
        return known
    if not name or "/" in name:
        return None
    return Method(name, Shape.STREAM_STREAM, None, 0, 0)


@dataclass(frozen=True)
class RequestInfo:
    """Who and what one call is about, read from its metadata and first request."""

    method: Method
    session_id: str
    user_id: str
    pool: str | None = None


def _header(metadata: Mapping[str, str | bytes], key: str) -> str | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"metadata {key!r} is not valid UTF-8") from exc
    return value


def identify(method: Method, metadata: Mapping[str, str | bytes], first: bytes) -> RequestInfo:
    """Read the session, user and pool of a call; raise BadRequest when it cannot be routed."""
    header = _header(metadata, SESSION_HEADER)
    try:
        fields = wire.read_strings(first, (SESSION_ID_FIELD, USER_CONTEXT_FIELD))
        body_raw = fields.get(SESSION_ID_FIELD)
        body = body_raw.decode("utf-8") if body_raw is not None else None
        user_context = fields.get(USER_CONTEXT_FIELD)
        user_id = (wire.read_string(user_context, USER_ID_FIELD) or "") if user_context else ""
    except (wire.WireError, UnicodeDecodeError) as exc:
        raise BadRequest(
            f"{method.name}: the request is not a valid Spark Connect message ({exc})"
        ) from exc
    if header and body and header != body:
        raise BadRequest(
            f"{method.name}: header {SESSION_HEADER}={header!r} and request session_id={body!r} "
            "name different sessions; send the same id in both, or drop the header"
        )
    session_id = header or body
    if not session_id:
        raise BadRequest(
            f"{method.name}: no session id; set the request's session_id (field 1) or the "
            f"{SESSION_HEADER} metadata, e.g. sc://host:15002/;{SESSION_HEADER}=<uuid>"
        )
    if len(session_id) > MAX_SESSION_ID_LENGTH:
        raise BadRequest(
            f"{method.name}: session id is {len(session_id)} characters long; "
            f"at most {MAX_SESSION_ID_LENGTH} are accepted (Spark uses UUIDs)"
        )
    return RequestInfo(method, session_id, user_id, _header(metadata, POOL_HEADER))
