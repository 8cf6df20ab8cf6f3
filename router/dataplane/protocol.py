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
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import xxhash

from registry.models import session_key
from router.dataplane import wire
from router.errors import BadRequest

SERVICE = "spark.connect.SparkConnectService"
PATH_PREFIX = f"/{SERVICE}/"

SESSION_HEADER = "x-spark-session-id"
POOL_HEADER = "x-spark-pool"

# Every Spark Connect request starts with these two fields.
SESSION_ID_FIELD = 1
USER_CONTEXT_FIELD = 2
USER_ID_FIELD = 1  # inside UserContext

# Spark accepts only UUIDs as session ids (INVALID_HANDLE.FORMAT otherwise): so does the router,
# in the canonical 8-4-4-4-12 form every client sends, before it pins anything.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")

# The longest user_id, pool and operation id kept (`max_identifier_length` sets it).
MAX_IDENTIFIER_LENGTH = 256

# Client input quoted in an error message is cut to this many characters.
QUOTED_CHARS = 80


def clip(value: str) -> str:
    """Client input as an error message may quote it: repr'd, at most QUOTED_CHARS shown."""
    if len(value) <= QUOTED_CHARS:
        return repr(value)
    return f"{value[:QUOTED_CHARS]!r}… ({len(value)} characters)"


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


# Calls that only clean up: for a dead driver the router answers them itself (releases.py).
NOTHING_TO_MOVE = frozenset({"ReleaseExecute", "ReleaseSession"})

# Calls that start something new, rather than continue or clean up an operation: a session
# on a driver drained with move-idle moves on one of these when nothing of it is running.
STARTS_FRESH = frozenset({"ExecutePlan", "AnalyzePlan", "Config", "AddArtifacts", "ArtifactStatus"})

# Methods whose successful calls may build session state worth replaying (recorder.py).
JOURNALED = frozenset({"Config", "ExecutePlan"})

# ReleaseExecuteRequest.release_until (a cumulative release, as opposed to release_all).
RELEASE_UNTIL_FIELD = 6

# CloneSessionResponse.new_session_id: the clone, created on the source's driver.
CLONE_NEW_SESSION_FIELD = 3

# ExecutePlanResponse.result_complete: the last message of a successful execution.
RESULT_COMPLETE_FIELD = 14

# What an ExecutePlan response tells besides its results: ids (session 1, operation 12,
# response 13, server-side session 15), the schema (7, Spark 4's first message),
# execution_progress (18, every couple of seconds while the query runs) and the plan's
# metrics (4, just before result_complete). A query cut off can run again elsewhere: the
# client is not told these twice and its results are compared, not resent (proxy.py).
METRICS_FIELD = 4
SCHEMA_FIELD = 7
PROGRESS_FIELD = 18
_ID_FIELDS = frozenset({1, 12, 13, 15})
_NOTE_FIELDS = _ID_FIELDS | {METRICS_FIELD, SCHEMA_FIELD, PROGRESS_FIELD}


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


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """Who and what one call is about, read in one pass over its metadata and first request.

    Nothing downstream walks the first message again (the journal's slow path aside):
    `observed_spans` lets a moved session's observed id be cut out by slicing, and
    `releases_until` says whether a ReleaseExecute is a cumulative release.
    """

    method: Method
    session_id: str
    user_id: str  # as the client claimed it (user_context.user_id); see `as_user`
    key: str  # the session's registry key: (user, session id), registry.models.session_key
    pool: str | None = None
    operation_id: str | None = None  # when the method names one
    observed_id: str | None = None  # client_observed_server_side_session_id, if sent
    observed_spans: tuple[tuple[int, int], ...] = ()  # where that field sits in the bytes
    releases_until: bool = False  # ReleaseExecute: release_until rather than release_all
    rewrite_user: str | None = None  # the authenticated user every request must carry instead

    @property
    def user(self) -> str:
        """The user the session belongs to: the authenticated one, else the claimed one."""
        return self.rewrite_user if self.rewrite_user is not None else self.user_id

    def as_user(self, user: str) -> RequestInfo:
        """The call as the authenticated `user` makes it (identity: rewrite): keyed by them."""
        if user == self.user_id:
            return self
        return replace(self, key=session_key(user, self.session_id), rewrite_user=user)

    def without_observed(self, first: bytes) -> bytes:
        """The first request without its observed server-side id (for a moved session)."""
        if not self.observed_spans:
            return first
        pieces, keep_from = [], 0
        for start, end in self.observed_spans:
            pieces.append(first[keep_from:start])
            keep_from = end
        pieces.append(first[keep_from:])
        return b"".join(pieces)


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise wire.WireError(f"{what} is not valid UTF-8") from exc


def _header_text(value: str | bytes | None, key: str) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"metadata {key!r} is not valid UTF-8") from exc
    return value


def identify(
    method: Method,
    metadata: Mapping[str, str | bytes],
    first: bytes,
    max_length: int = MAX_IDENTIFIER_LENGTH,
) -> RequestInfo:
    """Read the session, user and pool of a call; raise BadRequest when it cannot be routed.

    `max_length` bounds the user_id, pool and operation id (characters).
    """
    return identify_call(
        method, metadata.get(SESSION_HEADER), metadata.get(POOL_HEADER), first, max_length
    )


def identify_call(
    method: Method,
    session_header: str | bytes | None,
    pool_header: str | bytes | None,
    first: bytes,
    max_length: int = MAX_IDENTIFIER_LENGTH,
) -> RequestInfo:
    """`identify` from the two headers it reads, and one walk over the first request."""
    header = _header_text(session_header, SESSION_HEADER)
    observed_field = method.observed_field
    operation_field = method.operation_id_field
    release_field = RELEASE_UNTIL_FIELD if method.name == "ReleaseExecute" else None
    body: bytes | None = None
    user_context: bytes | None = None
    operation: bytes | None = None
    observed: bytes | None = None
    spans: list[tuple[int, int]] = []
    releases_until = False
    try:
        for number, wtype, tag_start, start, end in wire.iter_fields(first):
            if number == SESSION_ID_FIELD:
                body = _len_payload(first, number, wtype, start, end)
            elif number == USER_CONTEXT_FIELD:
                user_context = _len_payload(first, number, wtype, start, end)
            elif number == observed_field:
                observed = _len_payload(first, number, wtype, start, end)
                spans.append((tag_start, end))
            elif number == operation_field:
                operation = _len_payload(first, number, wtype, start, end)
            elif number == release_field:
                releases_until = True
        body_text = _decode(body, "session_id") if body is not None else None
        user_id = ""
        if user_context:
            user_id = wire.read_string(user_context, USER_ID_FIELD) or ""
        operation_id = _decode(operation, "operation_id") if operation is not None else None
        observed_id = _decode(observed, "the observed session id") if observed is not None else None
    except wire.WireError as exc:
        raise BadRequest(
            f"{method.name}: the request is not a valid Spark Connect message ({exc})"
        ) from exc
    if header and body_text and header != body_text:
        raise BadRequest(
            f"{method.name}: header {SESSION_HEADER}={clip(header)} and request "
            f"session_id={clip(body_text)} name different sessions; send the same id in both, "
            "or drop the header"
        )
    session_id = header or body_text
    if not session_id:
        raise BadRequest(
            f"{method.name}: no session id; set the request's session_id (field 1) or the "
            f"{SESSION_HEADER} metadata, e.g. sc://host:15002/;{SESSION_HEADER}=<uuid>"
        )
    if _UUID.match(session_id) is None:  # also keeps "/" out of the registry key
        raise BadRequest(
            f"{method.name}: session id {clip(session_id)} is not a UUID; Spark accepts only "
            "UUIDs (e.g. str(uuid.uuid4()))"
        )
    pool = _header_text(pool_header, POOL_HEADER)
    for what, value in (("user_id", user_id), (POOL_HEADER, pool), ("operation_id", operation_id)):
        if value is not None and len(value) > max_length:
            raise BadRequest(
                f"{method.name}: {what} is {len(value)} characters long; at most {max_length} "
                "are accepted (max_identifier_length)"
            )
    return RequestInfo(
        method,
        session_id,
        user_id,
        session_key(user_id, session_id),
        pool,
        operation_id,
        observed_id,
        tuple(spans),
        releases_until,
    )


def _len_payload(buf: bytes, number: int, wtype: int, start: int, end: int) -> bytes:
    if wtype != wire.LEN:
        raise wire.WireError(f"field {number} has wire type {wtype}, expected length-delimited")
    return buf[start:end]


def with_user(request: bytes, user: str) -> bytes:
    """A request whose user_context.user_id is `user` (the rest of its user context kept).

    Occurrences of a message field merge in protobuf; their payloads are joined, so the
    rewritten context is the one the driver would have read, with only the user replaced.
    """
    try:
        contexts = [
            request[start:end]
            for number, wtype, _, start, end in wire.iter_fields(request)
            if number == USER_CONTEXT_FIELD and wtype == wire.LEN
        ]
    except wire.WireError as exc:
        raise BadRequest(f"the request is not a valid Spark Connect message ({exc})") from exc
    context = wire.replace_string(b"".join(contexts), USER_ID_FIELD, user)
    return wire.strip_field(request, USER_CONTEXT_FIELD) + wire.encode_len_field(
        USER_CONTEXT_FIELD, context
    )


def for_driver(
    method: Method, alias: str | None, request: bytes, upstream: str | None = None
) -> bytes:
    """A request as its driver must see it: a moved session's old server-side id removed.

    `alias` is the server-side id a moved session's client keeps seeing (None: not moved);
    `upstream` the session id its driver knows it by, if not the client's (Pin.upstream_id).
    """
    if alias is not None and method.observed_field is not None:
        request = wire.strip_field(request, method.observed_field)
    return request if upstream is None else to_upstream(request, upstream)


def to_upstream(request: bytes, upstream: str) -> bytes:
    """A request whose session_id is `upstream` (the id its driver knows the session by)."""
    try:
        return wire.replace_string(request, SESSION_ID_FIELD, upstream)
    except wire.WireError as exc:
        raise BadRequest(f"the request is not a valid Spark Connect message ({exc})") from exc


def for_client(
    method: Method, alias: str | None, response: bytes, session_id: str | None = None
) -> bytes:
    """A response as the client must see it: a moved session keeps its first server-side id,
    and (`session_id`, when its driver knows it by another id) its own session id."""
    if alias is not None and method.response_server_side_field:
        response = wire.replace_string(response, method.response_server_side_field, alias)
    if session_id is not None and method.response_session_field:
        response = wire.replace_string(response, method.response_session_field, session_id)
    return response


def server_side_of(method: Method, response: bytes) -> str | None:
    """The server-side session id a response shows its client, if it carries one."""
    if not method.response_server_side_field:
        return None
    try:
        return wire.read_string(response, method.response_server_side_field) or None
    except wire.WireError:
        return None


def clone_of(response: bytes) -> str | None:
    """The new session id a CloneSession answer names, if it is one the router can pin."""
    try:
        new_id = wire.read_string(response, CLONE_NEW_SESSION_FIELD)
    except wire.WireError:
        return None
    return new_id if new_id and _UUID.match(new_id) else None


def told(response: bytes) -> tuple[frozenset[int], int | None] | None:
    """What an ExecutePlan response tells besides ids: its note fields (schema, progress,
    metrics) and a 64-bit digest of the rest, None if there is no rest; None if malformed.

    The digest leaves the ids out: they differ between two runs of a plan on two drivers.
    XXH3 hashes ~40 GB/s here, next to nothing beside relaying the bytes (~0.7 GB/s per
    core; CRC-32, at ~3.5 GB/s, would have added a fifth to a stream's CPU).
    """
    view = memoryview(response)
    notes: set[int] = set()
    digest: int | None = None
    try:
        for number, _, start, _, end in wire.iter_fields(view):
            if number in _NOTE_FIELDS:
                if number not in _ID_FIELDS:
                    notes.add(number)
            else:
                digest = xxhash.xxh3_64_intdigest(view[start:end], seed=digest or 0)
    except wire.WireError:
        return None
    return frozenset(notes), digest


def completes(response: bytes) -> bool:
    """Whether an ExecutePlan response says the execution completed."""
    try:
        return wire.read_bytes(response, RESULT_COMPLETE_FIELD) is not None
    except wire.WireError:
        return False
