"""What state a session built on its driver, so that a move can build it again elsewhere.

A session's *journal* is the ordered list of the raw requests (`JournalEntry`) of the calls
that built server-side session state. When a session moves to a fresh driver, the router
replays them there (each through `for_replay`) before the session's next call, so the
user's SparkSession carries on with its confs, temp views and functions.

What is journaled (`classify` returns the kind; field paths as pyspark 4.3.0 sends them):
- "config": `Config` whose operation (3) is `set` (1) or `unset` (6): `spark.conf.set/unset`
  and the builder's `.config(...)`. Reads (get, get_all, ...) are not.
- "temp_view": ExecutePlan plan(3).command(2).create_dataframe_view(3):
  `df.createOrReplaceTempView`, `df.createGlobalTempView`, ...
- "function": plan.command.register_function(1): `spark.udf.register`, `registerJavaFunction`.
- "table_function": plan.command.register_table_function(10): `spark.udtf.register`.
- "data_source": plan.command.register_data_source(12): `spark.dataSource.register`.
- "catalog": plan.root(1).catalog(200) set_current_database(2) / set_current_catalog(25) /
  drop_temp_view(15) / drop_global_temp_view(16): `spark.catalog.setCurrentDatabase`, ...
- "sql": SQL whose statement changes only session state. `spark.sql(text)` sends
  plan.command.sql_command(5).input(6) = a Relation with sql(10).query(1), or, with
  `spark.sql(text, df=...)`, with_relations(41).root(1).sql(10).query(1); older clients send
  sql_command.sql(1); a plan.root holding such a relation counts too. The statements:
  `SET k=v`, `SET TIME ZONE`, `SET VAR`, `SET CATALOG`, `SET COLLATION`, `RESET`, `USE`,
  `CREATE [OR REPLACE] [GLOBAL] TEMP[ORARY] ...` (views, functions), `DECLARE` (session
  variables), `DROP TEMPORARY FUNCTION|VARIABLE`, and `DROP VIEW` of a name that can denote
  a temp view (one part, or `global_temp.<name>`). Keywords are matched case-insensitively
  after leading blanks and comments (`--`, nested `/* */`), never inside string literals.
- Plans the client compressed (plan.compressed_operation(3), ZSTD; pyspark does this above the
  server's `spark.connect.session.planCompression.threshold`, 10 MiB by default) are
  classified from the first `PEEK_BYTES` decompressed bytes when they hold a Command.

Never journaled: queries, reads of confs or of the catalog, and everything that touches
persistent storage or the cluster (INSERT, CTAS, CREATE TABLE/VIEW/FUNCTION without
TEMPORARY, DROP TABLE, writes, streaming, CACHE TABLE, EXECUTE IMMEDIATE, SQL scripts):
replaying those on another driver would repeat a write or do needless work. A compressed
root relation, a compressed `DROP VIEW` and anything malformed are not journaled either.

Invariants:
- `classify` is cheap enough for every request: it walks a few levels of top-level fields
  over a zero-copy view of the bytes and lexes only the first tokens of a SQL text; it
  never raises on malformed input (it returns None).
- Callers append an entry only after its call succeeded, in the order the calls completed,
  and replay in that order, so later calls (a RESET, a DROP, a second `SET k`) override
  earlier ones exactly as they did on the first driver. The one exception is a state-building
  ExecutePlan that names its operation: its STARTED mark goes in first, its COMPLETED mark
  when any replica sees the result complete, and `settle` (run before every replay) puts
  the call at its completion's place, or leaves it out if it never completed.
- `for_replay` sends the request as it was, minus what ties it to the old driver:
  `operation_id` and `request_options` (a replay is not reattachable and needs no
  ReleaseExecute) and `client_observed_server_side_session_id` (the new driver has a fresh
  server-side session). The one rewrite: a SQL `DROP VIEW name` is replayed as
  `Catalog.drop_temp_view(name)` (or `drop_global_temp_view`), because SQL cannot tell a
  temp view from a persistent one and a replay must never drop a persistent view.
- The journal of a session holds at most a capped number of bytes of encoded entries (the
  registry enforces it atomically, `DEFAULT_CAP` unless configured). The first entry that
  does not fit marks the journal overflowed for good: an incomplete journal would rebuild
  the wrong state, so such a session is never replayed (it gets SESSION_CHANGED instead).
- Known limits: state held elsewhere on the driver is not captured — artifacts (AddArtifacts,
  e.g. large `createDataFrame` data cached as artifacts, added jars), cached or checkpointed
  DataFrames; a temp view whose plan refers to them fails to replay, and the move fails
  honestly rather than silently.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from router.dataplane import wire
from router.dataplane.protocol import METHODS, SESSION_ID_FIELD

__all__ = [
    "COMPLETED",
    "DEFAULT_CAP",
    "PEEK_BYTES",
    "STARTED",
    "JournalEntry",
    "classify",
    "completed",
    "for_replay",
    "settle",
    "started",
]

DEFAULT_CAP = 4 * 1024 * 1024  # bytes of encoded entries per session
PEEK_BYTES = 64 * 1024  # most bytes of a compressed Command decompressed to classify it

# ExecutePlanRequest
_EP_PLAN, _EP_REQUEST_OPTIONS, _EP_OPERATION_ID = 3, 5, 6
# Plan.op_type
_PLAN_ROOT, _PLAN_COMMAND, _PLAN_COMPRESSED = 1, 2, 3
# Plan.CompressedOperation
_CO_DATA, _CO_OP_TYPE, _CO_CODEC = 1, 2, 3
_OP_TYPE_COMMAND, _CODEC_ZSTD = 2, 1
# Command.command_type
_CMD_SQL = 5
_COMMAND_KINDS = {1: "function", 3: "temp_view", 10: "table_function", 12: "data_source"}
# SqlCommand: sql (deprecated string), input (Relation)
_SQLCMD_SQL, _SQLCMD_INPUT = 1, 6
# Relation: common is not part of the rel_type oneof
_REL_COMMON, _REL_SQL, _REL_WITH_RELATIONS, _REL_CATALOG = 1, 10, 41, 200
_SQL_QUERY = 1
_WITH_RELATIONS_ROOT = 1
# Catalog.cat_type members that change session state
_CAT_SET_DATABASE, _CAT_DROP_TEMP_VIEW, _CAT_DROP_GLOBAL_TEMP_VIEW, _CAT_SET_CATALOG = 2, 15, 16, 25
_CATALOG_STATE = {
    _CAT_SET_DATABASE,
    _CAT_DROP_TEMP_VIEW,
    _CAT_DROP_GLOBAL_TEMP_VIEW,
    _CAT_SET_CATALOG,
}
# ConfigRequest.operation → Operation.op_type
_CONFIG_OPERATION = 3
_CONFIG_SET, _CONFIG_UNSET = 1, 6
_CONFIG_OPS = range(1, 8)

_GLOBAL_TEMP_DATABASE = "global_temp"  # Spark's default spark.sql.globalTempDatabase
_MAX_NESTING = 8  # with_relations inside with_relations...
_MAX_SET_TOKENS = 256  # how far `SET key ... = value` is searched for its `=`

# --- zero-copy reads over (possibly truncated) wire data (wire.iter_fields walks) ---------


def _message(view: memoryview, field: int, partial: bool = False) -> memoryview | None:
    """The payload of the last occurrence of a message field (no copy), or None."""
    found: memoryview | None = None
    for number, wtype, _, start, end in wire.iter_fields(view, partial):
        if number == field:
            if wtype != wire.LEN:
                raise wire.WireError(f"field {field} is not length-delimited")
            found = view[start:end]
    return found


def _oneof(
    view: memoryview, members: range | set[int] | None, partial: bool = False
) -> tuple[int, memoryview] | None:
    """The member of a message-typed oneof that is set, and its payload; None if unset."""
    # The last member on the wire wins. `members` None: every field but a Relation's
    # `common`. Occurrences of one member would merge; the last is enough to read its kind.
    found: tuple[int, memoryview] | None = None
    for number, wtype, _, start, end in wire.iter_fields(view, partial):
        if (number != _REL_COMMON) if members is None else (number in members):
            if wtype != wire.LEN:
                raise wire.WireError(f"field {number} is not length-delimited")
            found = (number, view[start:end])
    return found


def _varint_field(view: memoryview, field: int) -> int | None:
    """The last value of a top-level varint field, or None."""
    value: int | None = None
    for number, wtype, _, start, _ in wire.iter_fields(view):
        if number == field and wtype == wire.VARINT:
            value = wire.read_varint(cast(bytes, view), start)[0]
    return value


def _text(view: memoryview, partial: bool) -> str:
    """UTF-8 text; from a prefix, whatever decodes (its first tokens are what matter)."""
    return bytes(view).decode("utf-8", "ignore" if partial else "strict")


# --- SQL -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    """One SQL token."""

    text: str  # as written; a backquoted identifier without its quotes
    word: str = ""  # an unquoted word upper-cased (keyword or identifier); else ""
    name: bool = False  # an identifier: an unquoted word or a backquoted name


def _skip_blank(sql: str, pos: int) -> int:
    """Position of the first character at or after `pos` that is not blank or comment."""
    end = len(sql)
    while pos < end:
        if sql[pos].isspace():
            pos += 1
        elif sql.startswith("--", pos):
            newline = sql.find("\n", pos)
            pos = end if newline < 0 else newline + 1
        elif sql.startswith("/*", pos):
            depth, pos = 1, pos + 2  # Spark's bracketed comments nest
            while depth and pos < end:
                if sql.startswith("/*", pos):
                    depth, pos = depth + 1, pos + 2
                elif sql.startswith("*/", pos):
                    depth, pos = depth - 1, pos + 2
                else:
                    pos += 1
        else:
            return pos
    return end


def _is_word_char(c: str) -> bool:
    """Whether `c` can be part of an unquoted SQL word."""
    return c.isalnum() or c == "_"


def _tokens(sql: str) -> Iterator[_Token]:
    """Lex SQL lazily: words, backquoted identifiers, string literals (as "'"), symbols."""
    pos, end = 0, len(sql)
    while True:
        pos = _skip_blank(sql, pos)
        if pos >= end:
            return
        c = sql[pos]
        if _is_word_char(c):
            start = pos
            while pos < end and _is_word_char(sql[pos]):
                pos += 1
            yield _Token(sql[start:pos], sql[start:pos].upper(), name=True)
        elif c == "`":
            parts: list[str] = []
            while True:
                close = sql.find("`", pos + 1)
                if close < 0:
                    return  # unterminated: not a statement Spark would run
                parts.append(sql[pos + 1 : close])
                pos = close + 1
                if not sql.startswith("`", pos):
                    break
                parts.append("`")  # `` inside backquotes is one backquote
            yield _Token("".join(parts), name=True)
        elif c in "'\"":
            pos += 1
            while pos < end and sql[pos] != c:
                pos += 2 if sql[pos] == "\\" else 1
            pos += 1
            yield _Token("'")
        else:
            pos += 1
            yield _Token(c)


def _take(tokens: Iterator[_Token], n: int) -> list[_Token]:
    """The next `n` tokens (fewer at the end of the text)."""
    out: list[_Token] = []
    for token in tokens:
        out.append(token)
        if len(out) == n:
            break
    return out


def _drop_view_target(sql: str) -> tuple[bool, str] | None:
    """For `DROP VIEW [IF EXISTS] name`: (is global temp, view name) if it can be a temp view."""
    tokens = _take(_tokens(sql), 12)
    words = [t.word for t in tokens]
    if words[:2] != ["DROP", "VIEW"]:
        return None
    rest = tokens[4:] if words[2:4] == ["IF", "EXISTS"] else tokens[2:]
    names: list[str] = []
    i = 0
    while i < len(rest) and rest[i].name:
        if rest[i].word == "IDENTIFIER":
            return None  # an IDENTIFIER('...') clause: not worth guessing
        names.append(rest[i].text)
        i += 1
        if i < len(rest) - 1 and rest[i].text == ".":
            i += 1
            continue
        break
    if not names or any(t.text != ";" for t in rest[i:]):
        return None
    if len(names) == 1:
        return False, names[0]
    if len(names) == 2 and names[0].lower() == _GLOBAL_TEMP_DATABASE:
        return True, names[1]
    return None  # db.view or catalog.db.view: a persistent view


def _sql_changes_session(sql: str) -> bool:
    """Whether a SQL statement changes only session state (see the module docstring)."""
    tokens = _tokens(sql)
    head_tokens = _take(tokens, 6)
    head = [t.word for t in head_tokens]
    if not head:
        return False
    first = head[0]
    if first in ("RESET", "USE", "DECLARE"):
        return True
    if first == "SET":
        if len(head) == 1:
            return False  # SET: list the confs
        if head[1] in ("TIME", "VAR", "VARIABLE", "CATALOG", "COLLATION"):
            return True
        if head[1] == "ROLE":
            return False
        # SET key=value changes a conf; SET key and SET -v only read it.
        seen = head_tokens + _take(tokens, _MAX_SET_TOKENS)
        return any(t.text == "=" and not t.name for t in seen)
    if first == "CREATE":
        rest = head[3:] if head[1:3] == ["OR", "REPLACE"] else head[1:]
        if rest[:1] == ["GLOBAL"]:
            rest = rest[1:]
        return rest[:1] in (["TEMP"], ["TEMPORARY"])
    if first == "DROP":
        if head[1:2] in (["TEMP"], ["TEMPORARY"]):
            return head[2:3] in (["FUNCTION"], ["VARIABLE"])
        if head[1:2] == ["VIEW"]:
            return _drop_view_target(sql) is not None
    return False


# --- classification --------------------------------------------------------------------


def classify(method: str, request: bytes) -> str | None:
    """The kind of session state a call builds ("config", "temp_view", ...), or None."""
    try:
        view = memoryview(request)
        if method == "Config":
            return _classify_config(view)
        if method == "ExecutePlan":
            plan = _message(view, _EP_PLAN)
            return None if plan is None else _classify_plan(plan)
    except (ValueError, TypeError):  # WireError, UnicodeDecodeError, a non-bytes request
        return None
    return None


def _classify_config(view: memoryview) -> str | None:
    """The kind of a ConfigRequest: "config" for set and unset."""
    operation = _message(view, _CONFIG_OPERATION)
    if operation is None:
        return None
    op = _oneof(operation, _CONFIG_OPS)
    return "config" if op is not None and op[0] in (_CONFIG_SET, _CONFIG_UNSET) else None


def _classify_plan(plan: memoryview) -> str | None:
    """The kind of an ExecutePlan's plan: a command, a root relation, or a compressed command."""
    op = _oneof(plan, {_PLAN_ROOT, _PLAN_COMMAND, _PLAN_COMPRESSED})
    if op is None:
        return None
    member, payload = op
    if member == _PLAN_COMMAND:
        return _classify_command(payload, partial=False)
    if member == _PLAN_ROOT:
        return _classify_root(payload)
    command = _inflate_command(payload)
    return None if command is None else _classify_command(command, partial=True)


def _classify_command(command: memoryview, partial: bool) -> str | None:
    """The kind of a Command (`partial`: only a prefix of it)."""
    op = _oneof(command, range(1, 1000), partial)
    if op is None:
        return None
    member, payload = op
    if member in _COMMAND_KINDS:
        return _COMMAND_KINDS[member]
    if member != _CMD_SQL:
        return None
    sql = _sql_command_text(payload, partial)
    if sql is None or not _sql_changes_session(sql):
        return None
    if partial and _drop_view_target(sql) is not None:
        return None  # would need rewriting for replay, and the rewrite needs the whole name
    return "sql"


def _classify_root(relation: memoryview) -> str | None:
    """The kind of a root relation: a session-changing catalog call or SQL statement."""
    op = _oneof(relation, None)
    if op is None:
        return None
    member, payload = op
    if member == _REL_CATALOG:
        catalog = _oneof(payload, range(1, 1000))
        return "catalog" if catalog is not None and catalog[0] in _CATALOG_STATE else None
    sql = _relation_sql(relation, partial=False)
    return "sql" if sql is not None and _sql_changes_session(sql) else None


def _sql_command_text(sql_command: memoryview, partial: bool) -> str | None:
    """The SQL of a SqlCommand: from its `input` relation, else its deprecated `sql` string."""
    text: memoryview | None = None
    relation: memoryview | None = None
    for number, wtype, _, start, end in wire.iter_fields(sql_command, partial):
        if wtype != wire.LEN:
            continue
        if number == _SQLCMD_SQL:
            text = sql_command[start:end]
        elif number == _SQLCMD_INPUT:
            relation = sql_command[start:end]
    if relation is not None:
        return _relation_sql(relation, partial)
    return None if text is None else _text(text, partial)


def _relation_sql(relation: memoryview, partial: bool) -> str | None:
    """The query of a `sql` relation, possibly wrapped in with_relations; else None."""
    for _ in range(_MAX_NESTING):
        op = _oneof(relation, None, partial)
        if op is None:
            return None
        member, payload = op
        if member == _REL_SQL:
            query = _message(payload, _SQL_QUERY, partial)
            return None if query is None else _text(query, partial)
        if member != _REL_WITH_RELATIONS:
            return None
        root = _message(payload, _WITH_RELATIONS_ROOT, partial)
        if root is None:
            return None
        relation = root
    return None


def _inflate_command(compressed: memoryview) -> memoryview | None:
    """The first PEEK_BYTES of a ZSTD-compressed Command; None for anything else."""
    data = _message(compressed, _CO_DATA)
    if (
        data is None
        or _varint_field(compressed, _CO_OP_TYPE) != _OP_TYPE_COMMAND
        or _varint_field(compressed, _CO_CODEC) != _CODEC_ZSTD
    ):
        return None
    try:
        import zstandard  # a dependency of pyspark[connect]; loaded only when needed
    except ImportError:
        return None
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while len(out) < PEEK_BYTES:
                chunk = reader.read(PEEK_BYTES - len(out))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError:
        return None
    return memoryview(bytes(out))


# --- replay ----------------------------------------------------------------------------


def for_replay(method: str, request: bytes, upstream: str | None = None) -> bytes:
    """The request as a new driver must get it (module docstring); WireError if malformed.

    `upstream`: the session id the new driver knows the session by (Pin.upstream_id).
    """
    body = _for_replay(method, request)
    return body if upstream is None else wire.replace_string(body, SESSION_ID_FIELD, upstream)


def _for_replay(method: str, request: bytes) -> bytes:
    known = METHODS.get(method)
    drop: set[int] = set()
    if known is not None and known.observed_field is not None:
        drop.add(known.observed_field)
    if method == "ExecutePlan":
        drop |= {_EP_OPERATION_ID, _EP_REQUEST_OPTIONS}
        target = _replayed_drop_view(request)
        if target is not None:
            drop.add(_EP_PLAN)
            return wire.strip_fields(request, drop) + wire.encode_len_field(
                _EP_PLAN, _drop_plan(*target)
            )
    return wire.strip_fields(request, drop) if drop else request


def _replayed_drop_view(request: bytes) -> tuple[bool, str] | None:
    """(global, name) when the ExecutePlan is an (uncompressed) SQL `DROP VIEW` to rewrite."""
    plan = _message(memoryview(request), _EP_PLAN)
    op = None if plan is None else _oneof(plan, {_PLAN_ROOT, _PLAN_COMMAND, _PLAN_COMPRESSED})
    if op is None:
        return None
    member, payload = op
    sql: str | None = None
    if member == _PLAN_ROOT:
        sql = _relation_sql(payload, partial=False)
    elif member == _PLAN_COMMAND:
        command = _oneof(payload, range(1, 1000))
        if command is not None and command[0] == _CMD_SQL:
            sql = _sql_command_text(command[1], partial=False)
    return None if sql is None else _drop_view_target(sql)


def _drop_plan(is_global: bool, name: str) -> bytes:
    """Plan{root{catalog{drop_temp_view|drop_global_temp_view{view_name}}}}."""
    kind = _CAT_DROP_GLOBAL_TEMP_VIEW if is_global else _CAT_DROP_TEMP_VIEW
    drop = wire.encode_len_field(1, name.encode("utf-8"))  # view_name
    catalog = wire.encode_len_field(kind, drop)
    relation = wire.encode_len_field(_REL_CATALOG, catalog)
    return wire.encode_len_field(_PLAN_ROOT, relation)


# --- entries ---------------------------------------------------------------------------

_ENTRY_VERSION = 1


@dataclass(frozen=True)
class JournalEntry:
    """One journaled call: the method name and its raw request bytes."""

    method: str
    request: bytes

    def encode(self) -> bytes:
        """Version byte, varint length of the method name, the name (UTF-8), the request."""
        name = self.method.encode("utf-8")
        return bytes((_ENTRY_VERSION,)) + wire.encode_varint(len(name)) + name + self.request

    @classmethod
    def decode(cls, data: bytes) -> JournalEntry:
        """The entry `encode` made; ValueError for anything else."""
        if not data or data[0] != _ENTRY_VERSION:
            raise ValueError("not a journal entry (unknown version)")
        size, pos = wire.read_varint(data, 1)
        end = pos + size
        if end > len(data):
            raise ValueError("truncated journal entry")
        return cls(data[pos:end].decode("utf-8"), data[end:])


ARTIFACTS = "AddArtifacts"

# A state-building ExecutePlan's end may be seen by another replica than its start: the
# client reattached there (ReattachExecute) after the first replica died. So such a call,
# when it names its operation, is journaled in two parts: STARTED (the request) as it goes to
# the driver, COMPLETED (its operation id) by whichever replica sees the result complete.
# `settle` keeps a started call only once completed, at the completion's place in the order.
STARTED = "ExecutePlan.started"
COMPLETED = "ExecutePlan.completed"


def started(entry: bytes) -> bytes:
    """The STARTED mark of an ExecutePlan entry (JournalEntry.encode) that names its operation."""
    return JournalEntry(STARTED, JournalEntry.decode(entry).request).encode()


def completed(operation_id: str) -> bytes:
    """The COMPLETED mark of an operation."""
    return JournalEntry(COMPLETED, operation_id.encode("utf-8")).encode()


def operation_of(request: bytes) -> str | None:
    """The operation id an ExecutePlan request names, if any."""
    try:
        return wire.read_string(request, _EP_OPERATION_ID) or None
    except (wire.WireError, UnicodeDecodeError):
        return None


def settle(entries: Sequence[bytes]) -> list[bytes]:
    """The entries to replay: each completed STARTED call as a plain ExecutePlan entry, at its
    COMPLETED mark; started calls never completed (failed, or still running) left out."""
    out: list[bytes] = []
    running: dict[str, bytes] = {}
    for raw in entries:
        try:
            entry = JournalEntry.decode(raw)
        except ValueError:
            out.append(raw)  # damaged: the replay fails on it, honestly
            continue
        if entry.method == STARTED:
            operation = operation_of(entry.request)
            if operation is not None:
                running[operation] = entry.request
        elif entry.method == COMPLETED:
            request = running.pop(entry.request.decode("utf-8", "replace"), None)
            if request is not None:
                out.append(JournalEntry("ExecutePlan", request).encode())
        else:
            out.append(raw)
    return out


def frame(messages: Sequence[bytes]) -> bytes:
    """Several request messages of one client stream as one journal payload."""
    return b"".join(wire.encode_varint(len(m)) + m for m in messages)


def unframe(data: bytes) -> list[bytes]:
    """The request messages `frame` joined; WireError if the payload is damaged."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        size, pos = wire.read_varint(data, pos)
        if pos + size > len(data):
            raise wire.WireError("a framed journal message runs past the end")
        out.append(data[pos : pos + size])
        pos += size
    return out


def for_session(raw: bytes, session_id: str) -> bytes:
    """An encoded entry of one session as another's (a clone's): its session_id replaced.

    A clone starts with its source's state (Spark copies it on the driver), so its journal
    starts as a copy of the source's; the entries must name the clone, or a replay would
    rebuild the source. ValueError for a damaged entry.
    """
    entry = JournalEntry.decode(raw)
    if entry.method == ARTIFACTS:
        messages = [wire.replace_string(m, 1, session_id) for m in unframe(entry.request)]
        return JournalEntry(entry.method, frame(messages)).encode()
    return JournalEntry(entry.method, wire.replace_string(entry.request, 1, session_id)).encode()
