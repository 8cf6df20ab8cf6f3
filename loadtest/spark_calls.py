"""Raw Spark Connect requests for load generators: built once with pyspark's protos, sent as bytes.

Load generators (the Locust ``RawCallsUser``, the benchmark's client processes) send requests as
pre-serialized ``bytes`` through gRPC generic calls, so the client spends its CPU on gRPC, not on
protobuf. Responses are read back as bytes too and only counted.

Every request carries ``session_id`` (field 1) and a ``user_context`` (field 2), which is all the
router reads. ``ExecutePlan`` carries a tiny SQL plan; against ``loadtest.fake_driver`` its
result size comes from the ``x-fake-batches`` / ``x-fake-batch-bytes`` metadata
(:func:`stream_metadata`).
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Sequence
from typing import Any

from pyspark.sql.connect.proto import base_pb2, relations_pb2

__all__ = [
    "ANALYZE",
    "CONFIG",
    "EXECUTE",
    "RELEASE_EXECUTE",
    "RELEASE_SESSION",
    "SERVICE",
    "SESSION_HEADER",
    "SessionCalls",
    "driver_for",
    "session_ids",
    "stream_metadata",
]

SERVICE = "spark.connect.SparkConnectService"
CONFIG = f"/{SERVICE}/Config"
ANALYZE = f"/{SERVICE}/AnalyzePlan"
RELEASE_EXECUTE = f"/{SERVICE}/ReleaseExecute"
RELEASE_SESSION = f"/{SERVICE}/ReleaseSession"
EXECUTE = f"/{SERVICE}/ExecutePlan"

SESSION_HEADER = "x-spark-session-id"
"""The metadata key a ring-hash proxy (Envoy) hashes on; the router reads it when present."""

_NAMESPACE = uuid.UUID("8f0e6c1a-54b4-4e0b-9f3c-0d6a3c1f2b7e")
CLIENT_TYPE = "spark-session-router-loadtest"


def session_ids(seed: str, count: int) -> list[str]:
    """``count`` stable session ids (UUIDs) derived from ``seed``: the same seed, the same ids."""
    return [str(uuid.uuid5(_NAMESPACE, f"{seed}/{i}")) for i in range(count)]


def driver_for(session_id: str, drivers: Sequence[str]) -> str:
    """A fixed driver per session: how a direct client emulates perfect routing."""
    return drivers[zlib.crc32(session_id.encode()) % len(drivers)]


def stream_metadata(batches: int, batch_bytes: int) -> tuple[tuple[str, str], ...]:
    """Metadata asking the fake driver for ``batches`` arrow batches of ``batch_bytes`` each."""
    return (("x-fake-batches", str(batches)), ("x-fake-batch-bytes", str(batch_bytes)))


class SessionCalls:
    """The serialized requests of one session (built once, reused for every call)."""

    def __init__(self, session_id: str, user_id: str = "loadtest") -> None:
        self.session_id = session_id
        self.user_id = user_id
        user = base_pb2.UserContext(user_id=user_id, user_name=user_id)
        common: dict[str, Any] = {
            "session_id": session_id,
            "user_context": user,
            "client_type": CLIENT_TYPE,
        }
        self.header: tuple[tuple[str, str], ...] = ((SESSION_HEADER, session_id),)
        self.config_get: bytes = base_pb2.ConfigRequest(
            **common,
            operation=base_pb2.ConfigRequest.Operation(
                get_with_default=base_pb2.ConfigRequest.GetWithDefault(
                    pairs=[base_pb2.KeyValue(key="spark.sql.shuffle.partitions", value="200")]
                )
            ),
        ).SerializeToString()
        self.config_set: bytes = base_pb2.ConfigRequest(
            **common,
            operation=base_pb2.ConfigRequest.Operation(
                set=base_pb2.ConfigRequest.Set(
                    pairs=[base_pb2.KeyValue(key="spark.sql.shuffle.partitions", value="8")]
                )
            ),
        ).SerializeToString()
        self.analyze: bytes = base_pb2.AnalyzePlanRequest(
            **common, spark_version=base_pb2.AnalyzePlanRequest.SparkVersion()
        ).SerializeToString()
        self.release_session: bytes = base_pb2.ReleaseSessionRequest(
            session_id=session_id, user_context=user, client_type=CLIENT_TYPE
        ).SerializeToString()
        plan = base_pb2.Plan(root=relations_pb2.Relation(sql=relations_pb2.SQL(query="SELECT 1")))
        self._execute = base_pb2.ExecutePlanRequest(**common, plan=plan)
        self._release = base_pb2.ReleaseExecuteRequest(
            **common, release_all=base_pb2.ReleaseExecuteRequest.ReleaseAll()
        )
        self.release_execute: bytes = self.release_execute_for(str(uuid.uuid4()))
        self.unary: tuple[tuple[str, bytes], ...] = (
            (CONFIG, self.config_get),
            (ANALYZE, self.analyze),
            (RELEASE_EXECUTE, self.release_execute),
        )
        """The unary mix of the benchmark: read-only calls (no journal writes), in rotation."""

    def execute(self, operation_id: str | None = None) -> bytes:
        """An ExecutePlan request (with ``operation_id`` if given, as pyspark sends one)."""
        if operation_id is None:
            return bytes(self._execute.SerializeToString())
        request = base_pb2.ExecutePlanRequest()
        request.CopyFrom(self._execute)
        request.operation_id = operation_id
        return bytes(request.SerializeToString())

    def release_execute_for(self, operation_id: str) -> bytes:
        """ReleaseExecute(release_all) of one operation, as pyspark sends after a result."""
        request = base_pb2.ReleaseExecuteRequest()
        request.CopyFrom(self._release)
        request.operation_id = operation_id
        return bytes(request.SerializeToString())
