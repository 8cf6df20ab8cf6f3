"""Fuzzing a running router: random and mutated requests and metadata, each a clean status.

`spark-router serve` runs as a real process in front of a fake driver. Hypothesis sends it
random bytes, valid Spark Connect requests mutated (bytes flipped, cut, inserted, repeated),
large and non-ASCII payloads and repeated or odd metadata, on every method shape. Each call
must end with a status the router or the driver chose (never UNKNOWN, which is what grpc
answers for an exception nobody handled), the replica must keep serving, and its memory must
stay flat. The number of examples is bounded, and so is the wall-clock time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyspark.sql.connect.proto import base_pb2, relations_pb2

from tests.helpers import read_line_matching, spawn, stop
from tests.integration.test_serve_cli import _serve

PREFIX = "/spark.connect.SparkConnectService/"
UNARY = ["AnalyzePlan", "Config", "ArtifactStatus", "Interrupt", "ReleaseExecute"]
UNARY += ["ReleaseSession", "FetchErrorDetails", "CloneSession", "GetStatus"]
STREAMS = ["ExecutePlan", "ReattachExecute"]
EXAMPLES = 250
BUDGET_SECONDS = 150.0  # the whole fuzz run, however many examples that leaves
CALL_TIMEOUT = 5.0


def _valid(session: str) -> list[bytes]:
    """A few real requests to mutate."""
    user = base_pb2.UserContext(user_id="fuzz")
    conf = base_pb2.ConfigRequest(session_id=session, user_context=user)
    conf.operation.set.pairs.add(key="spark.sql.shuffle.partitions", value="3")
    plan = base_pb2.ExecutePlanRequest(session_id=session, user_context=user, operation_id="op")
    plan.plan.root.CopyFrom(relations_pb2.Relation(range=relations_pb2.Range(end=5, step=1)))
    clone = base_pb2.CloneSessionRequest(session_id=session, user_context=user)
    release = base_pb2.ReleaseExecuteRequest(session_id=session, user_context=user)
    return [m.SerializeToString() for m in (conf, plan, clone, release)]


SESSIONS = [str(uuid.uuid4()) for _ in range(4)]
VALID = [raw for s in SESSIONS for raw in _valid(s)]


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid request mutated."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    raw = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "huge"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "repeat":
            raw += raw[: draw(st.integers(0, len(raw)))]
        elif op == "huge":  # a long (non-ASCII) string field appended
            raw += b"\x0a" + bytes([0x80, 0x80, 0x04]) + ("é" * 32768).encode()[:65536]
    return bytes(raw)


_KEYS = ["x-spark-session-id", "x-spark-pool", "authorization", "x-spark-user", "x-other"]
_VALUES = st.one_of(
    st.sampled_from(SESSIONS),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
)
metadata = st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), max_size=4)


@pytest.fixture(scope="module")
def router() -> Iterator[tuple[str, int]]:
    """A fake driver and `spark-router serve` in front of it: (router address, router pid)."""
    driver = spawn(["-m", "loadtest.fake_driver", "--listen", "127.0.0.1:0"])
    address = read_line_matching(driver, "listening on", timeout=30).rsplit(" ", 1)[1].strip()
    proc, port = _serve("--driver", address, "--admin-listen", "off")
    try:
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        codes = (stop(proc), stop(driver))
    assert codes == (0, 0)


def _healthy_call(channel: grpc.Channel) -> None:
    req = base_pb2.ConfigRequest(session_id=str(uuid.uuid4()))
    req.operation.get.keys.append("spark.connect.grpc.binding.port")
    channel.unary_unary(PREFIX + "Config")(req.SerializeToString(), timeout=CALL_TIMEOUT)


def test_fuzzed_calls_each_get_a_clean_status_and_the_replica_stays_flat(
    router: tuple[str, int],
) -> None:
    address, pid = router
    channel = grpc.insecure_channel(address)
    process = psutil.Process(pid)
    for _ in range(300):  # warm: caches, channels and allocator arenas exist before measuring
        _healthy_call(channel)
    before = process.memory_info().rss
    deadline = time.monotonic() + BUDGET_SECONDS
    seen: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        st.sampled_from(UNARY + STREAMS + ["AddArtifacts", "NoSuchMethod"]),
        st.lists(bodies(), min_size=1, max_size=3),
        metadata,
    )
    def one_call(method: str, messages: list[bytes], md: list[tuple[str, str]]) -> None:
        if time.monotonic() > deadline:
            return
        path = PREFIX + method
        try:
            if method in STREAMS:
                for _ in channel.unary_stream(path)(messages[0], metadata=md, timeout=CALL_TIMEOUT):
                    pass
            elif method == "AddArtifacts":
                channel.stream_unary(path)(iter(messages), metadata=md, timeout=CALL_TIMEOUT)
            elif method == "NoSuchMethod":  # a newer client's method: forwarded stream-stream
                call = channel.stream_stream(path)(
                    iter(messages), metadata=md, timeout=CALL_TIMEOUT
                )
                for _ in call:
                    pass
            else:
                channel.unary_unary(path)(messages[0], metadata=md, timeout=CALL_TIMEOUT)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert code is not grpc.StatusCode.UNKNOWN, f"{method}: {exc.details()}"
            assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} hung"
            assert exc.details(), f"{method}: {code.name} without a message"
        seen[code.name] = seen.get(code.name, 0) + 1

    one_call()
    assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    _healthy_call(channel)  # still serving
    assert sum(seen.values()) >= 50, seen  # the budget left room for a real run
    assert "INVALID_ARGUMENT" in seen and "OK" in seen, seen  # checks and driver both reached
    for _ in range(300):
        _healthy_call(channel)
    after = process.memory_info().rss
    assert after < before * 1.25 + 16 * 1024 * 1024, (before, after, seen)
    channel.close()
