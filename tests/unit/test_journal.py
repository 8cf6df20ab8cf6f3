"""router/journal.py: classification of real pyspark requests, replay form, entry encoding.

The requests are captured afresh on every run: the real pyspark 4.3 client talks to a small
gRPC server that records each raw request message and answers through the fake driver's
servicer methods, so the tests see exactly the bytes pyspark puts on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from pyspark.sql.connect.proto import base_pb2, commands_pb2, relations_pb2

from loadtest.fake_driver import FakeDriver
from router.dataplane import wire
from router.dataplane.protocol import METHODS, SERVICE, Shape
from router.sessions import journal
from router.sessions.journal import JournalEntry, classify, for_replay

_SERVICE = base_pb2.DESCRIPTOR.services_by_name["SparkConnectService"]
START_TIMEOUT = 10.0

# --- capturing what pyspark sends -------------------------------------------------------


def _request_class(method: str) -> Any:
    return getattr(base_pb2, _SERVICE.methods_by_name[method].input_type.name)


class CaptureServer:
    """A Spark Connect server on 127.0.0.1 that records raw requests; FakeDriver answers."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="capture-server", daemon=True)

    def __enter__(self) -> CaptureServer:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT) or self._error is not None:
            raise RuntimeError(f"capture server did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to __enter__
            self._error = exc
            self._ready.set()

    def _handler(self, driver: FakeDriver, name: str) -> grpc.RpcMethodHandler:
        serve = getattr(driver, name)
        parse = _request_class(name).FromString
        shape = METHODS[name].shape
        records = self.records

        def serialize(response: Any) -> bytes:
            return bytes(response.SerializeToString())

        if shape is Shape.UNARY_UNARY:

            async def unary(raw: bytes, context: Any) -> Any:
                records.append((name, raw))
                return await serve(parse(raw), context)

            return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)
        if shape is Shape.UNARY_STREAM:

            async def stream(raw: bytes, context: Any) -> AsyncIterator[Any]:
                records.append((name, raw))
                async for response in serve(parse(raw), context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(stream, response_serializer=serialize)

        async def client_stream(requests: AsyncIterator[bytes], context: Any) -> Any:
            async def parsed() -> AsyncIterator[Any]:
                async for raw in requests:
                    records.append((name, raw))
                    yield parse(raw)

            return await serve(parsed(), context)

        return grpc.stream_unary_rpc_method_handler(client_stream, response_serializer=serialize)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        driver = FakeDriver()
        server = grpc.aio.server()
        handlers = {name: self._handler(driver, name) for name in METHODS}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = driver.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(0)


@dataclass
class Captured:
    """What pyspark sent for each labelled API call."""

    calls: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)

    def main(self, label: str) -> tuple[str, bytes]:
        """The Config or ExecutePlan request an API call was about (its last one)."""
        sent = [r for r in self.calls[label] if r[0] in ("Config", "ExecutePlan")]
        assert sent, f"{label}: pyspark sent no Config/ExecutePlan: {self.calls[label]}"
        return sent[-1]


def _capture_all(server: CaptureServer) -> Captured:
    from pyspark.sql import SparkSession
    from pyspark.sql.datasource import DataSource
    from pyspark.sql.functions import udtf

    captured = Captured()
    url = f"sc://127.0.0.1:{server.port}"
    spark: Any = None

    def df() -> Any:
        return spark.range(3)

    def step(label: str, call: Callable[[], object]) -> None:
        start = len(server.records)
        # The fake driver's answers are not valid Arrow data, so calls that read results
        # fail after sending: the request is what this test is after.
        with contextlib.suppress(Exception):
            call()
        captured.calls[label] = [r for r in server.records[start:] if r[0] != "ReleaseExecute"]

    start = len(server.records)
    spark = SparkSession.builder.remote(url).config("spark.sql.shuffle.partitions", "5").create()
    captured.calls["builder.config"] = server.records[start:]
    try:
        step("conf.set", lambda: spark.conf.set("spark.sql.ansi.enabled", "false"))
        step("conf.unset", lambda: spark.conf.unset("spark.sql.ansi.enabled"))
        step("conf.get", lambda: spark.conf.get("spark.sql.shuffle.partitions", "1"))
        step("conf.getAll", lambda: spark.conf.getAll)
        for label, text in SQL_CAPTURED.items():
            step(label, lambda text=text: spark.sql(text))  # type: ignore[misc]
        step("sql kwargs", lambda: spark.sql("CREATE TEMP VIEW k AS SELECT * FROM {d}", d=df()))
        step("sql args", lambda: spark.sql("SELECT :a", args={"a": 1}))
        step("createOrReplaceTempView", lambda: df().createOrReplaceTempView("t1"))
        step("createGlobalTempView", lambda: df().createGlobalTempView("g1"))
        step("udf.register", lambda: spark.udf.register("plus1", lambda x: x + 1, "int"))
        step(
            "udf.registerJavaFunction",
            lambda: spark.udf.registerJavaFunction("jf", "com.example.F", "int"),
        )
        spark.conf.set("spark.sql.execution.pythonUDTF.arrow.enabled", "false")  # read by @udtf

        @udtf(returnType="x: int")  # type: ignore[arg-type]  # pyspark's stub expects a function
        class Numbers:
            def eval(self, n: int) -> Iterator[tuple[int]]:
                yield (n,)

        step("udtf.register", lambda: spark.udtf.register("numbers", Numbers))

        class Source(DataSource):
            @classmethod
            def name(cls) -> str:
                return "source"

        step("dataSource.register", lambda: spark.dataSource.register(Source))
        step("catalog.setCurrentDatabase", lambda: spark.catalog.setCurrentDatabase("default"))
        step("catalog.setCurrentCatalog", lambda: spark.catalog.setCurrentCatalog("spark_catalog"))
        step("catalog.dropTempView", lambda: spark.catalog.dropTempView("t1"))
        step("catalog.dropGlobalTempView", lambda: spark.catalog.dropGlobalTempView("g1"))
        step("catalog.listTables", lambda: spark.catalog.listTables())
        step("catalog.currentDatabase", lambda: spark.catalog.currentDatabase())
        step("collect", lambda: df().collect())
        step("saveAsTable", lambda: df().write.saveAsTable("persistent"))
        step("cache", lambda: df().cache())
    finally:
        spark.stop()

    # A session told to compress every plan over 100 bytes (real Spark: over 10 MiB).
    compressing = SparkSession.builder.remote(url).create()
    try:
        compressing.conf.set("spark.connect.session.planCompression.threshold", "100")
        compressing.conf.set("spark.connect.session.planCompression.defaultAlgorithm", "ZSTD")
        pad = " -- padding\n" * 100
        step("compressed SET", lambda: compressing.sql("SET spark.x=1" + pad))
        step("compressed DROP VIEW", lambda: compressing.sql("DROP VIEW v" + pad))
        step("compressed SELECT", lambda: compressing.sql("SELECT 1" + pad))
        wide = compressing.range(3).selectExpr(*[f"id AS c{i}" for i in range(50)])
        step("compressed temp view", lambda: wide.createOrReplaceTempView("wide"))
        step("compressed collect", lambda: wide.collect())
    finally:
        compressing.stop()
    return captured


# spark.sql texts captured from pyspark, and the kind each must get.
SQL_CAPTURED = {
    "sql SET": "SET spark.sql.shuffle.partitions=4",
    "sql SET read": "SET spark.sql.shuffle.partitions",
    "sql RESET": "RESET",
    "sql USE": "USE default",
    "sql CREATE TEMP VIEW": "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
    "sql CREATE TEMPORARY FUNCTION": "CREATE TEMPORARY FUNCTION f AS 'com.example.F'",
    "sql DROP TEMPORARY FUNCTION": "DROP TEMPORARY FUNCTION IF EXISTS f",
    "sql DROP VIEW": "DROP VIEW IF EXISTS `my v`",
    "sql DROP VIEW global": "DROP VIEW global_temp.gv",
    "sql DROP VIEW persistent": "DROP VIEW db.v",
    "sql SELECT": "SELECT 1",
    "sql SELECT 'SET x'": "SELECT 'SET x=1'",
    "sql CREATE TABLE": "CREATE TABLE t (a INT)",
    "sql CREATE VIEW": "CREATE VIEW pv AS SELECT 1",
    "sql INSERT": "INSERT INTO t VALUES (1)",
}


@pytest.fixture(scope="module")
def captured() -> Iterator[Captured]:
    """Every labelled call, captured from the real pyspark client once per module."""
    with CaptureServer() as server:
        yield _capture_all(server)


# --- classification of what pyspark sends -----------------------------------------------

EXPECTED = {
    "builder.config": "config",
    "conf.set": "config",
    "conf.unset": "config",
    "conf.get": None,
    "conf.getAll": None,
    "sql SET": "sql",
    "sql SET read": None,
    "sql RESET": "sql",
    "sql USE": "sql",
    "sql CREATE TEMP VIEW": "sql",
    "sql CREATE TEMPORARY FUNCTION": "sql",
    "sql DROP TEMPORARY FUNCTION": "sql",
    "sql DROP VIEW": "sql",
    "sql DROP VIEW global": "sql",
    "sql DROP VIEW persistent": None,
    "sql SELECT": None,
    "sql SELECT 'SET x'": None,
    "sql CREATE TABLE": None,
    "sql CREATE VIEW": None,
    "sql INSERT": None,
    "sql kwargs": "sql",
    "sql args": None,
    "createOrReplaceTempView": "temp_view",
    "createGlobalTempView": "temp_view",
    "udf.register": "function",
    "udf.registerJavaFunction": "function",
    "udtf.register": "table_function",
    "dataSource.register": "data_source",
    "catalog.setCurrentDatabase": "catalog",
    "catalog.setCurrentCatalog": "catalog",
    "catalog.dropTempView": "catalog",
    "catalog.dropGlobalTempView": "catalog",
    "catalog.listTables": None,
    "catalog.currentDatabase": None,
    "collect": None,
    "saveAsTable": None,
    "compressed SET": "sql",
    "compressed DROP VIEW": None,
    "compressed SELECT": None,
    "compressed temp view": "temp_view",
    "compressed collect": None,
}


@pytest.mark.parametrize(("label", "kind"), EXPECTED.items())
def test_classify_what_pyspark_sends(captured: Captured, label: str, kind: str | None) -> None:
    method, raw = captured.main(label)
    assert classify(method, raw) == kind


def test_incidental_calls_are_not_journaled(captured: Captured) -> None:
    # Conf reads pyspark makes by itself, AnalyzePlan, ReleaseSession: nothing to replay.
    for label, calls in captured.calls.items():
        main = captured.main(label) if label != "cache" else None
        for method, raw in calls:
            if (method, raw) != main:
                assert classify(method, raw) is None, (label, method)


def _execute(raw: bytes) -> Any:
    return base_pb2.ExecutePlanRequest.FromString(raw)


def test_wire_shapes_pyspark_uses(captured: Captured) -> None:
    """Where pyspark 4.3 puts what the classifier looks for (documents the field paths)."""
    config = base_pb2.ConfigRequest.FromString(captured.main("conf.set")[1])
    assert config.operation.WhichOneof("op_type") == "set"
    assert base_pb2.ConfigRequest.FromString(captured.main("conf.unset")[1]).operation.HasField(
        "unset"
    )
    sql = _execute(captured.main("sql SET")[1])
    assert sql.plan.command.sql_command.input.sql.query == SQL_CAPTURED["sql SET"]
    assert not sql.plan.command.sql_command.sql  # the deprecated field stays empty
    assert sql.HasField("operation_id") and len(sql.request_options) == 2
    kwargs = _execute(captured.main("sql kwargs")[1]).plan.command.sql_command.input
    assert kwargs.with_relations.root.sql.query.startswith("CREATE TEMP VIEW k AS SELECT")
    view = _execute(captured.main("createOrReplaceTempView")[1]).plan.command
    assert view.create_dataframe_view.name == "t1" and view.create_dataframe_view.replace
    assert _execute(
        captured.main("createGlobalTempView")[1]
    ).plan.command.create_dataframe_view.is_global
    udf = _execute(captured.main("udf.register")[1]).plan.command.register_function
    assert udf.function_name == "plus1" and udf.HasField("python_udf")
    java = _execute(captured.main("udf.registerJavaFunction")[1]).plan.command.register_function
    assert java.HasField("java_udf")
    assert _execute(captured.main("udtf.register")[1]).plan.command.HasField(
        "register_table_function"
    )
    assert _execute(captured.main("dataSource.register")[1]).plan.command.HasField(
        "register_data_source"
    )
    catalog = _execute(captured.main("catalog.setCurrentDatabase")[1]).plan.root.catalog
    assert catalog.set_current_database.db_name == "default"
    compressed = _execute(captured.main("compressed SET")[1]).plan.compressed_operation
    assert compressed.op_type == base_pb2.Plan.CompressedOperation.OP_TYPE_COMMAND
    inflated = commands_pb2.Command.FromString(zstandard.decompress(compressed.data))
    assert inflated.sql_command.input.sql.query.startswith("SET spark.x=1")


# --- classification of SQL text ---------------------------------------------------------

SESSION_SQL = [
    "SET spark.sql.shuffle.partitions=4",
    "set x = 1",
    "SET x='a=b'",
    "SET x=1;",
    "  \n\t SET x=1",
    "-- a note\nSET x=1",
    "/* a /* nested */ comment */ SET x=1",
    "SET TIME ZONE 'UTC'",
    "SET TIME ZONE LOCAL",
    "SET VAR v = 1",
    "SET VARIABLE (a, b) = (SELECT 1, 2)",
    "SET CATALOG spark_catalog",
    "SET COLLATION UTF8_LCASE",
    "RESET",
    "reset spark.sql.shuffle.partitions",
    "USE default",
    "use namespace db",
    "USE CATALOG c",
    "CREATE TEMP VIEW v AS SELECT 1",
    "CREATE OR REPLACE TEMPORARY VIEW v AS SELECT 1",
    "create or replace global temp view v as select 1",
    "CREATE GLOBAL TEMPORARY VIEW v AS SELECT 1",
    "CREATE TEMPORARY VIEW v USING parquet OPTIONS (path '/x')",
    "CREATE TEMPORARY FUNCTION f AS 'com.example.F'",
    "CREATE OR REPLACE TEMPORARY FUNCTION f AS 'com.example.F'",
    "DROP TEMPORARY FUNCTION f",
    "DROP TEMP FUNCTION IF EXISTS f",
    "DECLARE v INT DEFAULT 1",
    "DECLARE OR REPLACE VARIABLE v = 1",
    "DROP TEMPORARY VARIABLE v",
    "DROP VIEW v",
    "DROP VIEW IF EXISTS v;",
    "DROP VIEW global_temp.v",
    "DROP VIEW `odd ``name```",
]

NOT_SESSION_SQL = [
    "",
    "   ",
    "-- only a comment",
    "/* unterminated comment",
    "SELECT 1",
    "SELECT 'SET x=1'",
    "'SET x=1'",
    "/* SET x=1 */ SELECT 1",
    "-- SET x=1\nSELECT 1",
    "SETX=1",
    "SET",
    "SET -v",
    "SET spark.sql.shuffle.partitions",
    "SET ROLE admin",
    "CREATE TABLE t (a INT)",
    "CREATE TABLE t AS SELECT 1",
    "CREATE VIEW v AS SELECT 1",
    "CREATE OR REPLACE VIEW v AS SELECT 1",
    "CREATE FUNCTION f AS 'com.example.F'",
    "CREATE DATABASE temp",
    "DROP FUNCTION f",
    "DROP TABLE t",
    "DROP VIEW db.v",
    "DROP VIEW cat.db.v",
    "DROP VIEW IDENTIFIER('v')",
    "DROP VIEW v, w",
    "DROP VIEW",
    "INSERT INTO t VALUES (1)",
    "INSERT OVERWRITE TABLE t SELECT 1",
    "DELETE FROM t WHERE a = 1",
    "MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE",
    "ALTER TABLE t SET TBLPROPERTIES ('a'='b')",
    "CACHE TABLE t",
    "CACHE TABLE c AS SELECT 1",
    "UNCACHE TABLE t",
    "EXPLAIN SET x=1",
    "EXECUTE IMMEDIATE 'SET x=1'",
    "BEGIN SET VAR x = 1; END",
    "WITH a AS (SELECT 1) SELECT * FROM a",
    "SHOW TABLES",
    "DESCRIBE TABLE t",
]


def _sql_request(text: str, shape: str = "input") -> bytes:
    """An ExecutePlanRequest carrying `text` the way pyspark does (or another way)."""
    request = base_pb2.ExecutePlanRequest(
        session_id="00112233-4455-6677-8899-aabbccddeeff",
        operation_id="op-1",
        client_observed_server_side_session_id="old-server-side",
    )
    request.request_options.add().reattach_options.reattachable = True
    relation = relations_pb2.Relation(sql=relations_pb2.SQL(query=text))
    relation.common.plan_id = 7
    if shape == "input":  # pyspark 4
        request.plan.command.sql_command.input.CopyFrom(relation)
    elif shape == "sql":  # the deprecated field older clients use
        request.plan.command.sql_command.sql = text
    elif shape == "with_relations":
        request.plan.command.sql_command.input.with_relations.root.CopyFrom(relation)
    else:  # a query whose root is the SQL relation
        request.plan.root.CopyFrom(relation)
    return bytes(request.SerializeToString())


@pytest.mark.parametrize("shape", ["input", "sql", "with_relations", "root"])
@pytest.mark.parametrize("text", SESSION_SQL)
def test_session_sql_is_journaled(text: str, shape: str) -> None:
    assert classify("ExecutePlan", _sql_request(text, shape)) == "sql"


@pytest.mark.parametrize("shape", ["input", "sql", "root"])
@pytest.mark.parametrize("text", NOT_SESSION_SQL)
def test_other_sql_is_not(text: str, shape: str) -> None:
    assert classify("ExecutePlan", _sql_request(text, shape)) is None


def test_the_last_oneof_member_on_the_wire_wins() -> None:
    # Protobuf: of two members of a oneof, the later one is the one set.
    command = base_pb2.Plan(command=_execute(_sql_request("SET x=1")).plan.command)
    query = base_pb2.Plan(root=relations_pb2.Relation(range=relations_pb2.Range(end=3)))
    request = base_pb2.ExecutePlanRequest(session_id="s").SerializeToString()
    # Two occurrences of `plan` merge: a command, then a root.
    raw = request + wire.encode_len_field(3, command.SerializeToString())
    raw += wire.encode_len_field(3, query.SerializeToString())
    assert base_pb2.ExecutePlanRequest.FromString(raw).plan.WhichOneof("op_type") == "root"
    assert classify("ExecutePlan", raw) is None


# --- malformed input --------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff",
        b"\x1a\x05abc",  # plan claims more bytes than there are
        b"\x18\x01",  # plan as a varint
        b"\x1a\x02\x10\x01",  # plan.command as a varint
        b"\x1a\x04\x12\x02\x2a\x00",  # an empty sql_command
        b"\x1a\x05\x12\x03\x2a\x01\xff",  # a truncated sql_command
    ],
)
def test_malformed_bytes_are_not_journaled(raw: bytes) -> None:
    assert classify("ExecutePlan", raw) is None
    assert classify("Config", raw) is None


def test_every_prefix_of_real_requests_is_handled(captured: Captured) -> None:
    for label in EXPECTED:
        method, raw = captured.main(label)
        for end in range(len(raw)):
            assert classify(method, raw[:end]) in (None, *journal_kinds())


def test_invalid_sql_text_and_bad_compression_are_not_journaled() -> None:
    raw = _sql_request("SET x=1")
    assert classify("ExecutePlan", raw) == "sql"
    assert classify("ExecutePlan", raw.replace(b"SET x=1", b"S\xffT x=1")) is None  # not UTF-8
    compressed = base_pb2.ExecutePlanRequest(session_id="s")
    compressed.plan.compressed_operation.data = b"(\xb5/\xfd not zstd"
    compressed.plan.compressed_operation.op_type = base_pb2.Plan.CompressedOperation.OP_TYPE_COMMAND
    compressed.plan.compressed_operation.compression_codec = base_pb2.COMPRESSION_CODEC_ZSTD
    assert classify("ExecutePlan", compressed.SerializeToString()) is None


@given(st.sampled_from(["Config", "ExecutePlan", "AnalyzePlan", "Nope"]), st.binary())
def test_classify_never_raises(method: str, raw: bytes) -> None:
    assert classify(method, raw) in (None, *journal_kinds())


def journal_kinds() -> tuple[str, ...]:
    """Every kind classify can return."""
    return ("config", "temp_view", "function", "table_function", "data_source", "catalog", "sql")


# --- for_replay -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label", [k for k, kind in EXPECTED.items() if kind and not k.startswith("sql DROP VIEW")]
)
def test_for_replay_strips_what_ties_a_request_to_its_driver(
    captured: Captured, label: str
) -> None:
    method, raw = captured.main(label)  # (DROP VIEW is rewritten: tested below)
    replayed = _request_class(method).FromString(for_replay(method, raw))
    original = _request_class(method).FromString(raw)
    assert not replayed.HasField("client_observed_server_side_session_id")
    original.ClearField("client_observed_server_side_session_id")
    if method == "ExecutePlan":
        assert original.HasField("operation_id") and original.request_options
        assert not replayed.HasField("operation_id")
        assert not replayed.request_options
        original.ClearField("operation_id")
        original.ClearField("request_options")
    assert replayed == original


def test_for_replay_keeps_other_bytes_as_they_were(captured: Captured) -> None:
    method, raw = captured.main("builder.config")  # the first call: no observed id yet
    assert for_replay(method, raw) == raw
    method, raw = captured.main("udf.register")
    replayed = for_replay(method, raw)
    plan = base_pb2.ExecutePlanRequest.FromString(raw).plan.SerializeToString()
    assert plan in replayed  # the pickled function travels byte for byte
    assert for_replay("Unknown", raw) == raw


@pytest.mark.parametrize(
    ("label", "is_global", "name"),
    [("sql DROP VIEW", False, "my v"), ("sql DROP VIEW global", True, "gv")],
)
def test_drop_view_is_replayed_as_a_temp_view_drop(
    captured: Captured, label: str, is_global: bool, name: str
) -> None:
    method, raw = captured.main(label)
    replayed = base_pb2.ExecutePlanRequest.FromString(for_replay(method, raw))
    catalog = replayed.plan.root.catalog
    if is_global:
        assert catalog.drop_global_temp_view.view_name == name
    else:
        assert catalog.drop_temp_view.view_name == name
    original = base_pb2.ExecutePlanRequest.FromString(raw)
    assert not replayed.HasField("operation_id") and not replayed.request_options
    assert not replayed.HasField("client_observed_server_side_session_id")
    assert (replayed.session_id, replayed.client_type) == (
        original.session_id,
        original.client_type,
    )
    assert replayed.user_context == original.user_context


def test_for_replay_of_hand_made_requests() -> None:
    raw = _sql_request("DROP VIEW `odd ``name```", "root")
    replayed = base_pb2.ExecutePlanRequest.FromString(for_replay("ExecutePlan", raw))
    assert replayed.plan.root.catalog.drop_temp_view.view_name == "odd `name`"
    raw = _sql_request("SET x=1", "sql")
    replayed = base_pb2.ExecutePlanRequest.FromString(for_replay("ExecutePlan", raw))
    assert replayed.plan == base_pb2.ExecutePlanRequest.FromString(raw).plan


# --- entries ----------------------------------------------------------------------------


@given(st.text(), st.binary())
def test_entry_round_trip(method: str, request: bytes) -> None:
    entry = JournalEntry(method, request)
    assert JournalEntry.decode(entry.encode()) == entry


def test_entry_is_compact() -> None:
    assert JournalEntry("Config", b"abc").encode() == b"\x01\x06Configabc"


@given(st.binary())
def test_decoding_garbage_raises_value_error_only(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        JournalEntry.decode(data)


@given(st.lists(st.binary(max_size=300), max_size=8))
def test_frame_round_trips_client_stream_messages(messages: list[bytes]) -> None:
    assert journal.unframe(journal.frame(messages)) == messages


def test_unframe_rejects_a_damaged_payload() -> None:
    with pytest.raises(wire.WireError, match="runs past the end"):
        journal.unframe(b"\x05ab")


async def test_tape_keeps_a_stream_up_to_the_cap_only() -> None:
    from router.dataplane.recorder import Tape as _Tape

    async def stream(sizes: list[int]) -> AsyncIterator[bytes]:
        for n in sizes:
            yield bytes(n)

    tape = _Tape(10)
    assert [len(m) async for m in tape.record(stream([4, 6]))] == [4, 6]
    assert [len(m) for m in tape.messages] == [4, 6] and not tape.overflowed
    tape = _Tape(10)
    assert [len(m) async for m in tape.record(stream([4, 6, 1]))] == [4, 6, 1]  # all forwarded
    assert tape.overflowed and tape.messages == []  # nothing half-kept


def _view_request(operation: str | None) -> bytes:
    req = base_pb2.ExecutePlanRequest(session_id="s")
    if operation is not None:
        req.operation_id = operation
    req.plan.command.create_dataframe_view.name = "v"
    req.plan.command.create_dataframe_view.input.range.end = 3
    return bytes(req.SerializeToString())


def test_a_started_call_counts_once_completed_at_its_completion_and_never_otherwise() -> None:
    conf = JournalEntry("Config", b"conf").encode()
    first, second, failed = (
        JournalEntry("ExecutePlan", _view_request(op)).encode() for op in "abc"
    )
    entries = [
        journal.started(first),
        journal.started(failed),  # ended in an error: never completed
        conf,
        journal.started(second),
        journal.completed("b"),
        journal.completed("a"),  # completed after the other one: replayed after it
        journal.completed("zz"),  # an operation that built nothing (any reattached query)
        journal.completed("a"),  # the same end seen twice (a stream cut, then reattached)
    ]
    assert journal.settle(entries) == [conf, second, first]
    assert journal.settle([journal.started(first)]) == []  # still running: not yet state
    assert journal.settle([b"\x09damaged", conf]) == [b"\x09damaged", conf]  # fails honestly
    assert journal.operation_of(_view_request("op-1")) == "op-1"
    assert journal.operation_of(_view_request(None)) is None
