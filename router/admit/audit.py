"""The audit trail: one JSON line per event, to a file, stdout or both, off the hot path.

Events are plain dicts built by the pure functions below; `AuditLog.offer` queues one
without waiting for anything, and a writer task hands batches to a thread
(`asyncio.to_thread`), so the event loop never blocks on a disk.

Event reference. Every line has `time` (RFC 3339, UTC, milliseconds: 2025-01-31T12:00:00.123Z)
and `event`, and `replica` when the log was given one (`AuditSettings.replica`). Each event
has exactly the fields listed, `null` when unknown; names are those of the house (DESIGN.md):
- session.created: user, groups, session, pool, driver, conf (confs given with the session,
  redacted; the data plane does not read Config calls, so null there for now).
- session.released: user, session, pool, driver (a ReleaseSession that reached the driver).
- session.moved: user, session, pool, from_driver, driver (the new one), reason
  (driver_down, drain, admin, ...).
- session.expired: user, session, pool, driver, reason (idle): a pin that lapsed in the
  registry (registry.expired_pins: found by one replica, once).
- execution: one per ExecutePlan: user, groups, session, operation, pool, driver, plan (the
  plan kind, see `read_plan`), sql and sql_sha256 (per `Redaction.sql`: one or neither),
  status (gRPC code name, "OK"), duration_ms, rows and bytes returned (null when not counted).
- denied: kind (authentication, policy, ownership, quota, budget), reason (a short label such
  as no_role, invalid, max_sessions), message (what the client was told), status, method,
  user, groups, session, pool, peer.
- admin: admin (the authenticated admin's user), groups, action (drain, move, release, ...),
  target (a driver or session), result ("ok" or what failed), params (redacted).
User, groups and session are as the router decided them; `groups` is a sorted list.

Invariants:
- Secrets never appear. The builders take no credential at all (no token, key or password
  parameter); a conf pair whose key matches a `Redaction.keys` glob (case-insensitive;
  `*password*`, `*secret*`, `*token*`, `*key*` by default) keeps its key and gets the value
  "[redacted]". SQL goes by `Redaction.sql`: "sha256" (the default: the hex digest of the
  whole text, nothing of the text itself), "text" or "off". "text" is cut to
  `sql_max_chars` (then "…[cut N chars]") and, best effort, blanks the value of `SET k=v` and
  any string literal right after a secret-looking name (`OPTIONS (password 'x')`,
  `api_key = 'x'`); a secret in SQL that no such name precedes (a literal passed to a
  function) is kept, so sites that need certainty keep "sha256".
- Bounded. Every string field is cut at `MAX_FIELD_CHARS`, lists and confs at `MAX_ITEMS`
  items; the queue holds at most `queue_size` events (memory ≈ queue_size * (0.5 KB +
  sql_max_chars) at worst). Each line is one JSON object (newlines inside values escaped),
  keys sorted, UTF-8.
- Never blocks the hot path: `offer` is an append and a gauge update (0.5 µs; 2 µs with a
  Prometheus gauge). A full queue is counted and, by `when_full`:
  - "drop": the event is dropped (`dropped("queue_full")`) and offer returns False;
  - "refuse" (fail closed, for sites that must not lose a record): `accepting` turns False
    once `queue_size` events wait, and `check()` raises `AuditUnavailable` so that the proxy
    refuses a call BEFORE forwarding it. The records of calls already let in are still taken,
    up to twice `queue_size` (calls in flight are bounded by `max_streams`, far below), so an
    admitted call's record is never lost to a race. A sink that fails keeps its batch and
    retries every `retry_seconds`; meanwhile the queue fills and calls are refused.
- Sinks. The file is opened O_APPEND|O_CREAT (mode 0640); before each batch its path is
  stat'ed against the open descriptor: a file renamed away or deleted (logrotate's default
  `create` mode) is left to its new name and a new one is created at the path; `copytruncate`
  needs nothing (appends land at the new end). Each batch is one write() (Linux does not
  interleave it with other processes' appends, so `--workers N` may share one file). Lines
  are not fsync'd: a host crash may lose the last batch. stdout gets the same lines.
- A write error (disk full, permission, a directory at the path) is logged once per distinct
  error and sink, counted per failed batch (`write_error(sink)`), and the writer goes on; in
  "drop" mode the failed batch is lost for that sink (`dropped("write_error")`), and a line
  torn by a partial write is ended before the next one. When the sink works again that is
  logged once.
- `close()` stops taking events and drains the queue, bounded by `close_timeout_seconds`;
  what is left then is counted (`dropped("shutdown")`). Close the log after the gRPC server
  has finished its calls, so their records are in the queue.
- OpenTelemetry log records are not produced (yet): JSON lines only.

Plan kind and SQL (`read_plan`): the kind is the name of the plan's root relation type ("sql",
"read", "project", ...), of its command ("sql_command", "create_dataframe_view", ...), or
"compressed" (a plan the client compressed is not inflated: no SQL); the SQL is the text of a
`sql` relation at the root or down the chain of single-input relations (`input`, and
`with_relations.root`), of a `sql_command`, or below a command's input relation
(`df.write...`). Field names and numbers come from pyspark's generated descriptors, but the
bytes are walked, not parsed whole: `ExecutePlanRequest.ParseFromString` refuses plans nested
deeper than upb's limit (about 50 chained transformations: "Exceeded
upb_DecodeOptions_MaxDepth"), and builds every node of a big plan. The walk follows at most
`_PLAN_LEVELS` relations and reads at most `_LEVEL_FIELDS` fields per message (the last
occurrence of a field wins, as in protobuf's own parse; repeated occurrences of one message
field are not merged). Measured (Python 3.11, pyspark 4.3.0, protobuf 7 upb, a busy 2-CPU
host; walk vs ParseFromString): typical 120 B `sql_command` 5-8 µs vs 0.6-0.9 µs; 1 MB
`local_relation` 5 µs vs 40 µs; 1 MB project of 40,000 columns over a sql relation 60-90 µs
vs 1.7-8.7 ms; 1.1 MB SQL text 0.1 ms (its UTF-8 decode) vs 0.1 ms; a chain of 100 projects
0.2 ms vs refused. Rendering adds the sha256 (~0.9 ms per MB of SQL) or, in "text" mode, the
redaction scan: ~1 µs for a text without a secret-looking word, at worst ~1.6 ms for
`sql_max_chars` (4096) of `key = '...'` pairs. Run it only when the audit is enabled
(`AuditLog.enabled`): it is per ExecutePlan, on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import functools
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import grpc
import prometheus_client
from pyspark.sql.connect.proto import base_pb2, commands_pb2, relations_pb2

from router.admit.quotas import QuotaExceeded
from router.config import ConfigError, Settings
from router.errors import OverBudget, PermissionDenied, PolicyDenied, RouterError, Unauthenticated

__all__ = [
    "DEFAULT_REDACT_KEYS",
    "DENIAL_KINDS",
    "DROP_REASONS",
    "MAX_FIELD_CHARS",
    "MAX_ITEMS",
    "REDACTED",
    "SINKS",
    "AuditEvent",
    "AuditLog",
    "AuditMetrics",
    "AuditSettings",
    "AuditUnavailable",
    "PlanInfo",
    "PrometheusAuditMetrics",
    "Redaction",
    "admin_action",
    "denial_of",
    "denied",
    "execution",
    "is_secret_key",
    "read_plan",
    "redact",
    "render_sql",
    "rfc3339",
    "session_created",
    "session_expired",
    "session_moved",
    "session_released",
]

log = logging.getLogger(__name__)

AuditEvent = dict[str, Any]
SqlMode = Literal["text", "sha256", "off"]
FullMode = Literal["drop", "refuse"]

DEFAULT_REDACT_KEYS = ("*password*", "*secret*", "*token*", "*key*")
REDACTED = "[redacted]"
MAX_FIELD_CHARS = 1024  # any string field; the router bounds most already
MAX_ITEMS = 256  # groups, conf pairs, params
DENIAL_KINDS = frozenset({"authentication", "policy", "ownership", "quota", "budget"})
DROP_REASONS = ("queue_full", "write_error", "shutdown")  # label values of dropped()
SINKS = ("file", "stdout")  # label values of write_error() and written()


class AuditUnavailable(RouterError):
    """The audit cannot take the record of this call (`audit_when_full: refuse`), so it is refused.

    RESOURCE_EXHAUSTED, like OverBudget: a bounded resource of the replica (the audit queue)
    is full. pyspark does not retry it, so a client learns at once instead of hanging through
    UNAVAILABLE's ~10 minutes of backoff while, say, the audit disk is full; a site that
    chose to fail closed wants the refusal seen, and the user retries when it clears.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# --- settings


@dataclass(frozen=True)
class Redaction:
    """What of a conf or a SQL text may be written (pure; the builders' only rules)."""

    keys: tuple[str, ...] = DEFAULT_REDACT_KEYS  # globs, case-insensitive
    sql: SqlMode = "sha256"
    sql_max_chars: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))  # a list from YAML: hashable now
        problems = []
        if self.sql not in ("text", "sha256", "off"):
            problems.append(f"audit_sql must be text, sha256 or off, not {self.sql!r}")
        if self.sql_max_chars < 1:
            problems.append(f"audit_sql_max_chars must be at least 1, not {self.sql_max_chars}")
        if any(not k for k in self.keys):
            problems.append("audit_redact_keys must not hold an empty pattern")
        if problems:
            raise ConfigError("\n".join(problems))


DEFAULT_REDACTION = Redaction()


@dataclass(frozen=True)
class AuditSettings:
    """The audit's settings, built once from the router's Settings."""

    file: Path | None = None  # append JSON lines here
    stdout: bool = False  # and/or to stdout
    queue_size: int = 10_000
    when_full: FullMode = "drop"
    batch_size: int = 512  # events per write
    retry_seconds: float = 1.0  # refuse mode: a failed batch is retried this often
    close_timeout_seconds: float = 5.0
    replica: str | None = None  # stamped on every event that has none
    redaction: Redaction = field(default_factory=Redaction)

    def __post_init__(self) -> None:
        problems = []
        if self.queue_size < 1:
            problems.append(f"audit_queue_size must be at least 1, not {self.queue_size}")
        if self.when_full not in ("drop", "refuse"):
            problems.append(f"audit_when_full must be drop or refuse, not {self.when_full!r}")
        if self.batch_size < 1:
            problems.append(f"audit batch size must be at least 1, not {self.batch_size}")
        if self.retry_seconds <= 0 or self.close_timeout_seconds < 0:
            problems.append("audit retry and close timeouts must be positive")
        if problems:
            raise ConfigError("\n".join(problems))

    @classmethod
    def from_settings(cls, settings: Settings, replica: str | None = None) -> AuditSettings:
        """The audit_* settings of a replica."""
        return cls(
            file=settings.audit_file,
            stdout=settings.audit_stdout,
            queue_size=settings.audit_queue_size,
            when_full=settings.audit_when_full,
            retry_seconds=settings.audit_retry_seconds,
            close_timeout_seconds=settings.audit_close_timeout_seconds,
            replica=replica,
            redaction=Redaction(
                keys=tuple(settings.audit_redact_keys),
                sql=settings.audit_sql,
                sql_max_chars=settings.audit_sql_max_chars,
            ),
        )

    @property
    def enabled(self) -> bool:
        """Whether anything is audited (a file or stdout)."""
        return self.file is not None or self.stdout


# --- pure helpers: time, bounds, redaction


_second: tuple[int, str] = (-1, "")  # the last whole second formatted (strftime is slow)


def rfc3339(epoch: float) -> str:
    """`epoch` (seconds) as RFC 3339 UTC with milliseconds: 2025-01-31T12:00:00.123Z."""
    global _second
    seconds, ms = divmod(int(epoch * 1000), 1000)
    if _second[0] != seconds:
        _second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{_second[1]}.{ms:03d}Z"


def _cut_mark(n: int) -> str:
    return f"…[cut {n} chars]"


def _cut(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + _cut_mark(len(text) - limit)


def _clip(value: object, limit: int = MAX_FIELD_CHARS) -> str | None:
    if value is None:
        return None
    return _cut(value if isinstance(value, str) else str(value), limit)


def _groups(groups: Iterable[str] | None) -> list[str]:
    listed = sorted({_cut(g) for g in groups or ()})
    if len(listed) > MAX_ITEMS:
        return [*listed[:MAX_ITEMS], f"…[{len(listed) - MAX_ITEMS} more]"]
    return listed


def _status(status: grpc.StatusCode | str | None) -> str | None:
    if isinstance(status, grpc.StatusCode):
        return str(status.name)
    return _clip(status, 64)


@functools.lru_cache(maxsize=16)
def _key_rules(keys: tuple[str, ...]) -> tuple[re.Pattern[str], tuple[str, ...] | None]:
    """The globs as one regex, and as plain words when every glob is `*word*` (the defaults)."""
    pattern = re.compile("|".join(fnmatch.translate(k.lower()) for k in keys) or "(?!)", re.S)
    inner = [k[1:-1].lower() for k in keys if len(k) > 2 and k[0] == k[-1] == "*"]
    plain = len(inner) == len(keys) and not any(c in w for w in inner for c in "*?[")
    return pattern, tuple(inner) if plain else None


def is_secret_key(key: str, keys: tuple[str, ...] = DEFAULT_REDACT_KEYS) -> bool:
    """Whether a conf key matches one of the globs `keys` (case-insensitive)."""
    pattern, words = _key_rules(keys)
    lowered = key.lower()
    if words is not None:
        return any(w in lowered for w in words)
    return pattern.match(lowered) is not None


def redact(
    conf: Mapping[str, object] | None, keys: tuple[str, ...] = DEFAULT_REDACT_KEYS
) -> dict[str, str]:
    """Conf pairs as they may be written: secret-looking keys' values are "[redacted]"."""
    out: dict[str, str] = {}
    conf = conf or {}
    for i, (key, value) in enumerate(conf.items()):
        if i == MAX_ITEMS:
            out["…"] = f"[{len(conf) - MAX_ITEMS} more]"
            break
        name = str(key)
        out[_cut(name)] = REDACTED if is_secret_key(name, keys) else _cut(str(value))
    return out


# `SET key = value` as a whole statement (after blanks and line comments).
_SET = re.compile(
    r"\A(?:\s|--[^\n]*\n)*SET\s+(?P<key>`[^`]*`|[^\s=]+)\s*=(?P<value>.*)\Z", re.I | re.S
)
# Quoted tokens: string literals ('...', "...") and `names`; one cut off by the length bound
# runs to the end of the text.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*(?:'|\Z)|\"(?:[^\"\\]|\\.)*(?:\"|\Z)|`[^`]*(?:`|\Z)", re.S)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _name_before(text: str, end: int, start: int) -> str:
    """The bare name right before text[end] (blanks and one `=` between), not before `start`."""
    while end > start and text[end - 1].isspace():
        end -= 1
    if end > start and text[end - 1] == "=":
        end -= 1
        while end > start and text[end - 1].isspace():
            end -= 1
    first = end
    while first > start and end - first < MAX_FIELD_CHARS and text[first - 1] in _NAME_CHARS:
        first -= 1
    return text[first:end]


def _redact_sql(text: str, keys: tuple[str, ...]) -> str:
    """Blank the literal after a secret-looking name: one linear scan of the quoted tokens."""
    words = _key_rules(keys)[1]
    if words is not None:
        lowered = text.lower()
        if not any(w in lowered for w in words):
            return text  # no secret-looking name anywhere (the common case, at C speed)
    whole = _SET.match(text)
    if whole and is_secret_key(whole["key"].strip("`"), keys):
        return text[: whole.start("value")] + REDACTED
    out: list[str] = []
    done = 0  # text[:done] is in out
    after = 0  # where the previous quoted token ended
    previous = ""  # that token
    for m in _QUOTED.finditer(text):
        token = m[0]
        if token[0] != "`":
            name = _name_before(text, m.start(), after)
            if not name and previous and text[after : m.start()].strip() in ("", "="):
                name = previous.strip("`'\"")  # OPTIONS ('a.password' = 'x')
            if name and is_secret_key(name, keys):
                out.append(text[done : m.start()])
                out.append(f"'{REDACTED}'")
                done = m.end()
        after, previous = m.end(), token
    if not out:
        return text
    out.append(text[done:])
    return "".join(out)


def render_sql(
    text: str | None, redaction: Redaction = DEFAULT_REDACTION
) -> tuple[str | None, str | None]:
    """(sql, sql_sha256) as they may be written under `redaction.sql`: one or neither is set."""
    if text is None or redaction.sql == "off":
        return None, None
    if redaction.sql == "sha256":
        return None, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    limit = redaction.sql_max_chars
    head = text[:limit]  # cut first: redaction's cost stays bounded by the limit
    shown = _redact_sql(head, redaction.keys)
    return (shown + _cut_mark(len(text) - limit) if len(text) > limit else shown), None


# --- plan kind and SQL from ExecutePlanRequest bytes


@dataclass(frozen=True, slots=True)
class PlanInfo:
    """What the audit tells of a plan: its kind and the SQL text it carries (if any)."""

    kind: str | None
    sql: str | None


_PLAN_LEVELS = 128  # relations followed down an input chain
_LEVEL_FIELDS = 256  # fields read per message at most
_NO_PLAN = PlanInfo(None, None)


class _Malformed(Exception):
    pass


def _number(message: Any, name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)


_REQ_PLAN = _number(base_pb2.ExecutePlanRequest, "plan")
_PLAN_ROOT = _number(base_pb2.Plan, "root")
_PLAN_COMMAND = _number(base_pb2.Plan, "command")
_PLAN_COMPRESSED = _number(base_pb2.Plan, "compressed_operation")
_REL_SQL = _number(relations_pb2.Relation, "sql")
_SQL_QUERY = _number(relations_pb2.SQL, "query")
_REL_WITH_RELATIONS = _number(relations_pb2.Relation, "with_relations")
_WITH_RELATIONS_ROOT = _number(relations_pb2.WithRelations, "root")
_CMD_SQL = _number(commands_pb2.Command, "sql_command")
_SQL_COMMAND_TEXT = _number(commands_pb2.SqlCommand, "sql")
_SQL_COMMAND_INPUT = _number(commands_pb2.SqlCommand, "input")


def _oneof(message: Any, oneof: str) -> dict[int, str]:
    return {f.number: f.name for f in message.DESCRIPTOR.oneofs_by_name[oneof].fields}


def _relation_child(member: Any, name: str | None = None) -> int | None:
    """The field (named `name`, or the first) of a member's type holding one Relation."""
    if member.message_type is None:
        return None
    relation = relations_pb2.Relation.DESCRIPTOR
    for f in member.message_type.fields:
        # protobuf 6+ has is_repeated (and 7 dropped label); older ones only label
        repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED
        single = f.message_type is relation and not repeated
        if single and (name is None or f.name == name):
            return int(f.number)
    return None


_REL_KINDS = _oneof(relations_pb2.Relation, "rel_type")
_CMD_KINDS = _oneof(commands_pb2.Command, "command_type")
_rel_fields = relations_pb2.Relation.DESCRIPTOR.fields_by_number
# Relation type -> its input field: project.input(1), filter.input(1), ..., not join or set_op.
_REL_INPUT = {
    n: child for n in _REL_KINDS if (child := _relation_child(_rel_fields[n], "input")) is not None
}
_REL_INPUT[_REL_WITH_RELATIONS] = _WITH_RELATIONS_ROOT
_cmd_fields = commands_pb2.Command.DESCRIPTOR.fields_by_number
_CMD_INPUT = {
    n: child for n in _CMD_KINDS if (child := _relation_child(_cmd_fields[n])) is not None
}


Span = tuple[int, int, int]  # (field number, start, end) of a length-delimited field in the buffer


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _last(buf: bytes, pos: int, end: int, numbers: Collection[int]) -> Span | None:
    """The last length-delimited field of `numbers` in buf[pos:end], first `_LEVEL_FIELDS` only."""
    found: Span | None = None
    for _ in range(_LEVEL_FIELDS):
        if pos >= end:
            break
        key = buf[pos]  # one byte for fields 1-15, the common case: no call
        pos += 1
        if key >= 0x80:
            key, pos = _varint(buf, pos - 1)
        wtype = key & 7
        if wtype == 2:
            length = buf[pos] if pos < end else 0x80
            pos += 1
            if length >= 0x80:
                length, pos = _varint(buf, pos - 1)
            if pos + length > end:
                raise _Malformed
            if key >> 3 in numbers:
                found = (key >> 3, pos, pos + length)
            pos += length
        elif wtype == 0:
            _, pos = _varint(buf, pos)
        elif wtype == 1:
            pos += 8
        elif wtype == 5:
            pos += 4
        else:  # groups: Spark Connect's protos have none
            raise _Malformed
    if pos > end:
        raise _Malformed
    return found


def _text(buf: bytes, span: Span, number: int) -> str | None:
    hit = _last(buf, span[1], span[2], (number,))
    return None if hit is None else buf[hit[1] : hit[2]].decode("utf-8", "replace")


def _relation_sql(buf: bytes, relation: Span) -> str | None:
    for _ in range(_PLAN_LEVELS):
        member = _last(buf, relation[1], relation[2], _REL_KINDS)
        if member is None:
            return None
        if member[0] == _REL_SQL:
            return _text(buf, member, _SQL_QUERY)
        child = _REL_INPUT.get(member[0])
        if child is None:
            return None
        inner = _last(buf, member[1], member[2], (child,))
        if inner is None:
            return None
        relation = inner
    return None


def read_plan(request: bytes) -> PlanInfo:
    """The plan kind and SQL of a serialized ExecutePlanRequest (pure, never raises)."""
    buf = request
    try:
        plan = _last(buf, 0, len(buf), (_REQ_PLAN,))
        if plan is None:
            return _NO_PLAN
        op = _last(buf, plan[1], plan[2], (_PLAN_ROOT, _PLAN_COMMAND, _PLAN_COMPRESSED))
        if op is None:
            return _NO_PLAN
        if op[0] == _PLAN_COMPRESSED:
            return PlanInfo("compressed", None)
        kinds = _REL_KINDS if op[0] == _PLAN_ROOT else _CMD_KINDS
        member = _last(buf, op[1], op[2], kinds)
        if member is None:
            return _NO_PLAN
    except _Malformed:
        return _NO_PLAN
    try:
        return PlanInfo(kinds[member[0]], _sql_of(buf, op, member))
    except _Malformed:
        return PlanInfo(kinds[member[0]], None)


def _sql_of(buf: bytes, op: Span, member: Span) -> str | None:
    if op[0] == _PLAN_ROOT:
        return _relation_sql(buf, op)
    if member[0] == _CMD_SQL:
        inner = _last(buf, member[1], member[2], (_SQL_COMMAND_INPUT,))
        return _text(buf, member, _SQL_COMMAND_TEXT) if inner is None else _relation_sql(buf, inner)
    child = _CMD_INPUT.get(member[0])
    if child is None:
        return None
    inner = _last(buf, member[1], member[2], (child,))
    return None if inner is None else _relation_sql(buf, inner)


# --- event builders (pure)


def _event(name: str, now: float | None, **fields: Any) -> AuditEvent:
    event: AuditEvent = {"time": rfc3339(time.time() if now is None else now), "event": name}
    for key, value in fields.items():
        event[key] = _clip(value) if isinstance(value, str) else value
    return event


def session_created(
    *,
    user: str,
    session: str,
    pool: str | None,
    driver: str | None,
    groups: Iterable[str] = (),
    conf: Mapping[str, object] | None = None,
    redaction: Redaction = DEFAULT_REDACTION,
    now: float | None = None,
) -> AuditEvent:
    """A session placed on a driver for the first time."""
    return _event(
        "session.created",
        now,
        user=user,
        groups=_groups(groups),
        session=session,
        pool=pool,
        driver=driver,
        conf=None if conf is None else redact(conf, redaction.keys),
    )


def session_released(
    *, user: str, session: str, pool: str | None, driver: str | None, now: float | None = None
) -> AuditEvent:
    """A session released by its client (ReleaseSession)."""
    return _event("session.released", now, user=user, session=session, pool=pool, driver=driver)


def session_moved(
    *,
    user: str,
    session: str,
    pool: str | None,
    from_driver: str | None,
    driver: str,
    reason: str,
    now: float | None = None,
) -> AuditEvent:
    """A session re-pinned from `from_driver` to `driver`, and why."""
    return _event(
        "session.moved",
        now,
        user=user,
        session=session,
        pool=pool,
        from_driver=from_driver,
        driver=driver,
        reason=reason,
    )


def session_expired(
    *,
    user: str | None,
    session: str,
    pool: str | None,
    driver: str | None,
    reason: str = "idle",
    now: float | None = None,
) -> AuditEvent:
    """A session the router forgot without a release (its pin expired)."""
    return _event(
        "session.expired", now, user=user, session=session, pool=pool, driver=driver, reason=reason
    )


def execution(
    *,
    user: str,
    session: str,
    pool: str | None,
    driver: str | None,
    status: grpc.StatusCode | str | None,
    duration_ms: float | None,
    groups: Iterable[str] = (),
    operation: str | None = None,
    plan: PlanInfo | None = None,
    rows: int | None = None,
    bytes_returned: int | None = None,
    redaction: Redaction = DEFAULT_REDACTION,
    now: float | None = None,
) -> AuditEvent:
    """One ExecutePlan as it ended; `plan` from `read_plan` of its request."""
    sql, digest = render_sql(plan.sql if plan else None, redaction)
    event = _event(
        "execution",
        now,
        user=user,
        groups=_groups(groups),
        session=session,
        operation=operation,
        pool=pool,
        driver=driver,
        plan=plan.kind if plan else None,
        status=_status(status),
        duration_ms=None if duration_ms is None else round(duration_ms, 3),
        rows=rows,
        bytes=bytes_returned,
    )
    event["sql"] = sql  # bounded by sql_max_chars, not MAX_FIELD_CHARS
    event["sql_sha256"] = digest
    return event


def denial_of(exc: BaseException) -> tuple[str, str] | None:
    """(kind, reason) of a refusal the audit records, None for any other failure.

    Kinds by error: Unauthenticated authentication, PolicyDenied policy, another
    PermissionDenied ownership (a foreign session or user_id), QuotaExceeded quota (its
    limit), OverBudget budget (its setting); bad input and driver failures are not denials.
    """
    if isinstance(exc, Unauthenticated):
        return "authentication", exc.reason
    if isinstance(exc, PolicyDenied):
        return "policy", exc.reason
    if isinstance(exc, PermissionDenied):
        return "ownership", "foreign"
    if isinstance(exc, QuotaExceeded):
        return "quota", exc.limit
    if isinstance(exc, OverBudget):
        return "budget", exc.limit
    return None


def denied(
    kind: str,
    reason: str,
    *,
    user: str | None,
    status: grpc.StatusCode | str,
    message: str | None = None,
    groups: Iterable[str] = (),
    session: str | None = None,
    method: str | None = None,
    pool: str | None = None,
    peer: str | None = None,
    now: float | None = None,
) -> AuditEvent:
    """A call refused by the router: `kind` one of DENIAL_KINDS, `reason` a short label."""
    if kind not in DENIAL_KINDS:
        raise ValueError(f"denial kind {kind!r} is not one of {sorted(DENIAL_KINDS)}")
    return _event(
        "denied",
        now,
        kind=kind,
        reason=reason,
        message=message,
        status=_status(status),
        method=method,
        user=user,
        groups=_groups(groups),
        session=session,
        pool=pool,
        peer=peer,
    )


def admin_action(
    admin: str,
    action: str,
    target: str | None,
    result: str,
    *,
    groups: Iterable[str] = (),
    params: Mapping[str, object] | None = None,
    redaction: Redaction = DEFAULT_REDACTION,
    now: float | None = None,
) -> AuditEvent:
    """An admin API action by the authenticated `admin`; `result` "ok" or what failed."""
    return _event(
        "admin",
        now,
        admin=admin,
        groups=_groups(groups),
        action=action,
        target=target,
        result=result,
        params=None if params is None else redact(params, redaction.keys),
    )


# --- metrics


class AuditMetrics(Protocol):
    """What the log reports; telemetry.py owns the metrics behind it."""

    def queue_depth(self, depth: int) -> None:
        """Events waiting to be written (queued plus the batch being written)."""

    def dropped(self, reason: str, count: int) -> None:
        """Events lost: queue_full, write_error (per sink) or shutdown."""

    def refused(self) -> None:
        """A call refused because the audit could not take its record (refuse mode)."""

    def write_error(self, sink: str) -> None:
        """A batch a sink (file, stdout) failed to write."""

    def written(self, sink: str, count: int) -> None:
        """Events a sink wrote."""


class _NoMetrics:
    def queue_depth(self, depth: int) -> None:
        pass

    def dropped(self, reason: str, count: int) -> None:
        pass

    def refused(self) -> None:
        pass

    def write_error(self, sink: str) -> None:
        pass

    def written(self, sink: str, count: int) -> None:
        pass


@dataclass(frozen=True)
class PrometheusAuditMetrics:
    """AuditMetrics on Prometheus objects made elsewhere (telemetry.py)."""

    depth: prometheus_client.Gauge  # no labels
    drops: prometheus_client.Counter  # labels: reason
    refusals: prometheus_client.Counter  # no labels
    errors: prometheus_client.Counter  # labels: sink
    lines: prometheus_client.Counter  # labels: sink

    def queue_depth(self, depth: int) -> None:
        """Set the depth gauge."""
        self.depth.set(depth)

    def dropped(self, reason: str, count: int) -> None:
        """Count lost events."""
        self.drops.labels(reason).inc(count)

    def refused(self) -> None:
        """Count a refused call."""
        self.refusals.inc()

    def write_error(self, sink: str) -> None:
        """Count a failed batch."""
        self.errors.labels(sink).inc()

    def written(self, sink: str, count: int) -> None:
        """Count written events."""
        self.lines.labels(sink).inc(count)


# --- sinks (I/O; run in the writer's thread)


class _WriteFailed(Exception):
    def __init__(self, written: int, cause: OSError) -> None:
        super().__init__(str(cause))
        self.written = written
        self.cause = cause


class _Sink:
    name = ""

    def __init__(self) -> None:
        self.torn = False  # a partial line was left: end it before the next one
        self.errors_seen: set[tuple[str, int | None, str]] = set()

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FileSink(_Sink):
    name = "file"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _ensure_open(self) -> int:
        fd = self._fd
        if fd is not None:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None:
                fst = os.fstat(fd)
                if (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev):
                    return fd
            self._fd = None  # rotated away or deleted: the old file keeps what it has
            os.close(fd)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags, 0o640)
        return self._fd

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                raise _WriteFailed(0, OSError(errno.EBADF, "audit file closed"))
            try:
                fd = self._ensure_open()
            except OSError as exc:
                raise _WriteFailed(0, exc) from None
            view, done = memoryview(data), 0
            while done < len(view):
                try:
                    done += os.write(fd, view[done:])
                except OSError as exc:
                    raise _WriteFailed(done, exc) from None

    def close(self) -> None:
        # A write still running in an abandoned thread closes nothing under it: wait for it
        # only briefly and otherwise leave the descriptor to process exit.
        if self._lock.acquire(timeout=0.5):
            try:
                self._closed = True
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
            finally:
                self._lock.release()


class _StdoutSink(_Sink):
    name = "stdout"

    def write(self, data: bytes) -> None:
        stream = sys.stdout  # looked up each time: tests and embedders swap it
        try:
            binary = getattr(stream, "buffer", None)
            if binary is not None:
                stream.flush()
                binary.write(data)
                binary.flush()
            else:
                stream.write(data.decode("utf-8"))
                stream.flush()
        except OSError as exc:
            raise _WriteFailed(0, exc) from None
        except ValueError as exc:  # closed stream
            raise _WriteFailed(0, OSError(errno.EBADF, str(exc))) from None


def _encode(events: list[AuditEvent]) -> bytes:
    lines = [
        json.dumps(e, separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str)
        for e in events
    ]
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


# --- the log


class AuditLog:
    """The audit of one replica: a bounded queue and a writer task. Use from the event loop."""

    def __init__(self, settings: AuditSettings, metrics: AuditMetrics | None = None) -> None:
        """Sinks are opened by the writer, on the first batch (a bad path is a write error)."""
        self.settings = settings
        self.redaction = settings.redaction
        self._metrics: AuditMetrics = metrics or _NoMetrics()
        self._sinks: list[_Sink] = []
        if settings.file is not None:
            self._sinks.append(_FileSink(settings.file))
        if settings.stdout:
            self._sinks.append(_StdoutSink())
        self._queue: deque[AuditEvent] = deque()
        self._writing = 0  # events of the batch in the writer's hands
        self._refuse = settings.when_full == "refuse"
        # Refuse mode: past queue_size new calls are refused; records of admitted calls
        # are still taken up to the hard ceiling.
        self._ceiling = settings.queue_size * (2 if self._refuse else 1)
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._refusing = False
        self._lost_logged = False
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """Whether events go anywhere; build none when not."""
        return bool(self._sinks)

    @property
    def depth(self) -> int:
        """Events queued or being written."""
        return len(self._queue) + self._writing

    @property
    def accepting(self) -> bool:
        """Whether a new call may start: False when closed, or full in refuse mode."""
        if self._closed:
            return not self._sinks
        return not self._refuse or self.depth < self.settings.queue_size

    def check(self) -> None:
        """AuditUnavailable if a call must be refused because its record could not be kept."""
        if self.accepting or not self._refuse:
            return
        self._metrics.refused()
        if self._closed:
            raise AuditUnavailable("the router is shutting down; retry on another replica")
        if not self._refusing:
            self._refusing = True
            log.warning(
                "audit queue full (%d records waiting, audit_when_full: refuse): refusing "
                "calls until the audit catches up",
                self.depth,
            )
        raise AuditUnavailable(
            "the router's audit trail cannot take more records now; retry shortly"
        )

    def offer(self, event: AuditEvent) -> bool:
        """Queue `event` (owned by the log from now on); False if it was dropped. Never waits."""
        if not self._sinks:
            return True
        if self._closed:
            self._metrics.dropped("shutdown", 1)
            return False
        depth = len(self._queue) + self._writing
        if depth >= self._ceiling:
            self._metrics.dropped("queue_full", 1)
            if self._refuse and not self._lost_logged:
                self._lost_logged = True
                log.error("audit queue over its ceiling in refuse mode: records are lost")
            return False
        if self.settings.replica is not None and "replica" not in event:
            event["replica"] = self.settings.replica
        self._queue.append(event)
        self._metrics.queue_depth(depth + 1)
        self._idle.clear()
        if not self._wakeup.is_set():
            self._wakeup.set()
        return True

    async def start(self) -> None:
        """Start the writer; idempotent (and nothing once closed)."""
        if not self._closed:
            self._spawn()

    def _spawn(self) -> None:
        if self._task is None and self._sinks:
            self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def flush(self) -> None:
        """Wait until every event offered so far was handed to the sinks (or dropped).

        Returns only once the writer ran (`start`); callers bound it with a timeout.
        """
        await self._idle.wait()

    async def close(self, timeout: float | None = None) -> int:
        """Stop taking events, write what is queued within `timeout`; the number of events lost."""
        self._closed = True
        timeout = self.settings.close_timeout_seconds if timeout is None else timeout
        if self._queue:
            self._spawn()  # never started: still drain
        task, self._task = self._task, None
        self._wakeup.set()
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except asyncio.TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        lost = len(self._queue) + self._writing
        if lost:
            self._metrics.dropped("shutdown", lost)
            log.warning("audit closed with %d records unwritten after %.1fs", lost, timeout)
        self._queue.clear()
        self._writing = 0
        self._idle.set()
        self._metrics.queue_depth(0)
        for sink in self._sinks:
            sink.close()
        return lost

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            count = min(len(self._queue), self.settings.batch_size)
            batch = [self._queue.popleft() for _ in range(count)]
            self._writing = count
            try:
                await self._deliver(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end auditing for good
                log.exception("audit writer failed on a batch of %d records", count)
                self._metrics.dropped("write_error", count)
            self._writing = 0
            self._metrics.queue_depth(len(self._queue))
            if self._refusing and self.accepting:
                self._refusing = self._lost_logged = False
                log.info("audit caught up: accepting calls again")

    async def _deliver(self, batch: list[AuditEvent]) -> None:
        data: bytes | None = None
        pending = {sink: b"" for sink in self._sinks}  # sink -> bytes still to write ("": all)
        while True:
            data, pending = await asyncio.to_thread(self._write, batch, data, pending)
            if not pending:
                return
            if not self._refuse:
                self._metrics.dropped("write_error", len(batch) * len(pending))
                return
            await asyncio.sleep(self.settings.retry_seconds)  # fail closed: keep the batch

    def _write(
        self, batch: list[AuditEvent], data: bytes | None, pending: dict[_Sink, bytes]
    ) -> tuple[bytes, dict[_Sink, bytes]]:
        """Write the batch to each pending sink (in a thread); the sinks still pending."""
        data = _encode(batch) if data is None else data
        failed: dict[_Sink, bytes] = {}
        for sink, rest in pending.items():
            chunk = rest or data
            if sink.torn:
                chunk = b"\n" + chunk
            try:
                sink.write(chunk)
            except _WriteFailed as exc:
                self._failed(sink, exc.cause)
                if exc.written and self._refuse:
                    failed[sink] = chunk[exc.written :]  # the retry finishes the torn line
                else:
                    sink.torn = sink.torn or exc.written > 0
                    failed[sink] = rest
                continue
            sink.torn = False
            self._metrics.written(sink.name, len(batch))
            if sink.errors_seen:
                sink.errors_seen.clear()
                log.info("audit %s writes again", sink.name)
        return data, failed

    def _failed(self, sink: _Sink, exc: OSError) -> None:
        self._metrics.write_error(sink.name)
        key = (type(exc).__name__, exc.errno, exc.strerror or str(exc))
        if key not in sink.errors_seen and len(sink.errors_seen) < 64:
            sink.errors_seen.add(key)
            where = f" {sink.path}" if isinstance(sink, _FileSink) else ""
            mode = "retrying" if self._refuse else "records of this batch lost"
            log.error("audit %s%s: write failed: %s (%s)", sink.name, where, exc, mode)
