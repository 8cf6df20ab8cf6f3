"""No secret ever shows: every log line, span and admin answer of a busy replica is grepped.

A replica with every kind of secret set (user tokens, a JWT secret, the driver token, the
admin token) serves good and bad calls, moves a session and answers every admin endpoint,
with logging at DEBUG and spans kept in memory; none of the secrets, nor any token a client
sent, appears in any of it.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import jwt
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pyspark.sql.connect.proto import base_pb2, base_pb2_grpc

from loadtest.fake_driver import FakeDriver
from registry.models import session_key
from router.admit import tokens
from router.config import load_settings
from router.server import Replica

Stub = base_pb2_grpc.SparkConnectServiceStub

JWT_SECRET = "jwt-secret-" + "k" * 32
DRIVER_TOKEN = "driver-token-d41d8cd98f00b204"
ADMIN_TOKEN = "admin-token-9e107d9d372bb682"


def _config(session: str, user: str = "root") -> base_pb2.ConfigRequest:
    req = base_pb2.ConfigRequest(session_id=session)
    req.user_context.user_id = user
    req.operation.set.pairs.add(key="spark.sql.shuffle.partitions", value="7")
    return req


def _jwt(sub: str, exp_in: float) -> str:
    now = time.time()
    claims = {"sub": sub, "aud": "spark", "iat": int(now), "exp": int(now + exp_in)}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


async def test_no_secret_in_logs_spans_or_admin_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.yaml"
    alice = tokens.add(path, "alice", ["sre"])
    secrets = {
        "alice's token": alice,
        "a wrong token": alice[:-6] + "000000",
        "the JWT secret": JWT_SECRET,
        "a valid JWT": _jwt("bob", 600),
        "an expired JWT": _jwt("bob", -600),
        "the driver token": DRIVER_TOKEN,
        "the admin token": ADMIN_TOKEN,
    }
    monkeypatch.setenv("SPARK_ROUTER_DRIVER_TOKEN", DRIVER_TOKEN)
    monkeypatch.setenv("SPARK_ROUTER_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("SPARK_ROUTER_JWT_SECRET", JWT_SECRET)
    drivers = [FakeDriver(), FakeDriver()]
    for d in drivers:
        await d.start()
    settings = load_settings(
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        drivers=[d.address for d in drivers],
        auth=["token", "jwt"],
        token_file=path,
        jwt_audience=["spark"],
        admin_groups=["sre"],
        log_level="debug",
    )
    replica = Replica(settings)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    replica.telemetry.use_tracer_provider(provider)
    answers: list[str] = []
    caplog.set_level(logging.DEBUG)
    await replica.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            stub = Stub(channel)
            sessions = {}
            for who in ("alice's token", "a valid JWT"):
                s = sessions[who] = str(uuid.uuid4())
                md = (("authorization", f"Bearer {secrets[who]}"),)
                await stub.Config(_config(s), metadata=md, timeout=10)
            for who in ("a wrong token", "an expired JWT", "the driver token", "the admin token"):
                md = (("authorization", f"Bearer {secrets[who]}"),)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Config(_config(str(uuid.uuid4())), metadata=md, timeout=10)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
                answers.append(refused.value.details() or "")
            # bob (the JWT) on alice's session id: refused, and said so without secrets.
            md = (("authorization", f"Bearer {secrets['a valid JWT']}"),)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Config(_config(sessions["alice's token"]), metadata=md, timeout=10)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
            answers.append(refused.value.details() or "")

        alices = sessions["alice's token"]
        key = session_key("alice", alices)
        await replica.proxy.move_session(key)  # a move logs, and its replay sends the token
        base = f"http://127.0.0.1:{replica.admin_port}"
        async with aiohttp.ClientSession() as http:
            for token in (ADMIN_TOKEN, alice, secrets["a wrong token"], None):
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                for url in (
                    "/api/drivers",
                    "/api/sessions",
                    f"/api/sessions/{alices}",
                    "/api/quotas",
                    "/api/nowhere",
                    "/metrics",
                    "/readyz",
                ):
                    async with http.get(base + url, headers=headers) as r:
                        answers.append(f"{r.status} {dict(r.headers)} {await r.text()}")
    finally:
        await replica.stop(0)
        for d in drivers:
            await d.stop()

    # Something was produced: the grep below looks at real output.
    assert any("moved" in r.getMessage() for r in caplog.records)
    assert len(spans.get_finished_spans()) >= 6
    assert any('"driver"' in a for a in answers) and any("spark_router_" in a for a in answers)
    # The driver got the driver token (so the grep is looking for a string that was in play).
    sent = [c.metadata.get("authorization") for d in drivers for c in d.calls]
    assert f"Bearer {DRIVER_TOKEN}" in sent

    produced = [("log", r.getMessage() + " " + str(r.args)) for r in caplog.records]
    for span in spans.get_finished_spans():
        texts = [span.name, str(dict(span.attributes or {}))]
        texts += [f"{e.name} {dict(e.attributes or {})}" for e in span.events]
        texts.append(str(span.status.description))
        produced += [("span", t) for t in texts]
    produced += [("answer", a) for a in answers]
    for name, secret in secrets.items():
        for where, text in produced:
            assert secret[:16] not in text, f"(a part of) {name} in a {where}: {text[:300]}"
