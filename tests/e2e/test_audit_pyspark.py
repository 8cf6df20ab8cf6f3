"""The audit trail of real pyspark sessions through `spark-router serve` and real Spark drivers.

One router (token auth, a policy file with roles and a quota, audit_file, the admin API) in
front of the session's two drivers. Users: alice (analysts: the default pool), bob (in no
role), carol (analysts, but a quota of 0 sessions), root (platform: admin). Each event kind
is checked field by field, with exactly the fields the event reference (admit/audit.py)
lists; then every secret the test used is looked for in the audit file and the router's
log, and none may be there.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from pyspark.errors import PySparkException
from pyspark.sql import SparkSession

from router.admit import tokens
from tests.helpers import AUDIT_FIELDS, free_port, serve_router, stderr_text, stop, wait_until

SECRET_CONF = "s3cr3t-conf-value-e2e-audit"
BAD_TOKEN = "not-a-token-e2e-audit-0123456789"
POLICY = {
    "roles": {
        "analysts": {"groups": ["analysts"], "pools": ["default"], "default_pool": "default"},
        "platform": {"groups": ["platform"], "pools": ["*"], "admin": True},
    },
    "quotas": {"users": {"carol": {"sessions": 0}}},
}
USERS = {"alice": ["analysts"], "bob": ["nobody"], "carol": ["analysts"], "root": ["platform"]}
COMMON = {"time", "event", "replica"}


@dataclass
class Router:
    proc: subprocess.Popen[str]
    port: int
    admin: int
    audit: Path
    issued: dict[str, str]
    drivers: list[str]

    def url(self, token: str) -> str:
        return f"sc://127.0.0.1:{self.port}/;authorization=Bearer {token}"

    def session(self, user: str) -> SparkSession:
        spark = SparkSession.builder.remote(self.url(self.issued[user])).create()
        spark.client.set_retry_policies([])  # a refusal at once, not minutes of retries
        return spark

    def events(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line]

    def wait_for(
        self, what: str, match: Callable[[dict[str, Any]], bool], timeout: float = 15
    ) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in self.events() if match(e)]
            return bool(found)

        wait_until(seen, timeout, f"the audit line of {what}")
        return found[-1]

    def api(self, method: str, path: str, user: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.issued[user]}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def router(spark_drivers: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    work = tmp_path_factory.mktemp("audit-e2e")
    token_file = work / "tokens.yaml"
    issued = {u: tokens.add(token_file, u, groups) for u, groups in USERS.items()}
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    audit = work / "audit.jsonl"
    admin = free_port()
    env = {
        "SPARK_ROUTER_AUTH": "token",
        "SPARK_ROUTER_TOKEN_FILE": str(token_file),
        "SPARK_ROUTER_POLICY_FILE": str(policy),
        "SPARK_ROUTER_AUDIT_FILE": str(audit),
        "SPARK_ROUTER_ADMIN_LISTEN": f"127.0.0.1:{admin}",
    }
    proc, port = serve_router(spark_drivers.addresses, env=env)
    wait_until(lambda: _answers(f"http://127.0.0.1:{admin}/healthz"), 30, "the admin API to answer")
    r = Router(proc, port, admin, audit, issued, list(spark_drivers.addresses))
    yield r
    assert stop(proc) == 0
    _no_secret_anywhere(r, [*issued.values(), BAD_TOKEN, SECRET_CONF])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _exact(event: dict[str, Any]) -> None:
    """The event has exactly its kind's fields (and the common ones)."""
    assert set(event) == AUDIT_FIELDS[event["event"]] | COMMON, event
    assert event["time"].endswith("Z") and "T" in event["time"]
    assert event["replica"]


def _no_secret_anywhere(router: Router, secrets: list[str]) -> None:
    texts = {"audit": router.audit.read_text(), "router log": stderr_text(router.proc)}
    for rotated in router.audit.parent.glob("audit.jsonl.*"):
        texts[rotated.name] = rotated.read_text()
    for name, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret is in the {name}"


def test_a_session_its_queries_temp_view_and_release_are_on_the_record(router: Router) -> None:
    spark = router.session("alice")
    sid = spark.session_id
    spark.conf.set("spark.audit.e2e.password", SECRET_CONF)
    assert [r.id for r in spark.range(5).collect()] == [0, 1, 2, 3, 4]
    query = "SELECT 42 AS answer"
    assert spark.sql(query).collect()[0].answer == 42
    spark.range(3).createOrReplaceTempView("audited_view")
    assert spark.sql("SELECT count(*) AS n FROM audited_view").collect()[0].n == 3
    spark.stop()

    created = router.wait_for(
        "alice's session", lambda e: e["event"] == "session.created" and e["session"] == sid
    )
    _exact(created)
    assert created["user"] == "alice"
    assert created["groups"] == ["analysts"]
    assert created["pool"] == "default"
    assert created["driver"] in router.drivers
    driver = created["driver"]

    released = router.wait_for(
        "alice's release", lambda e: e["event"] == "session.released" and e["session"] == sid
    )
    _exact(released)
    assert released == {**released, "user": "alice", "pool": "default", "driver": driver}

    runs = [e for e in router.events() if e["event"] == "execution" and e["session"] == sid]
    for run in runs:
        _exact(run)
        assert run["user"] == "alice" and run["groups"] == ["analysts"]
        assert run["pool"] == "default" and run["driver"] == driver
        assert run["status"] == "OK", run
        assert isinstance(run["duration_ms"], float) and run["duration_ms"] >= 0
        assert run["operation"] and len(run["operation"]) == 36  # pyspark's operation uuid
        assert run["sql"] is None  # audit_sql: sha256, the default
    by_plan: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_plan.setdefault(run["plan"], []).append(run)
    assert "range" in by_plan, sorted(by_plan)
    assert by_plan["range"][0]["bytes"] > 0  # its Arrow batch came back through the router
    digest = hashlib.sha256(query.encode()).hexdigest()
    assert any(r["sql_sha256"] == digest for r in by_plan.get("sql_command", [])), by_plan
    view = by_plan.get("create_dataframe_view")
    assert view and view[0]["sql_sha256"] is None, sorted(by_plan)
    assert len({r["operation"] for r in runs}) == len(runs)  # one line per ExecutePlan


def _refused(spark: SparkSession) -> str:
    with pytest.raises((grpc.RpcError, PySparkException)) as caught:
        spark.range(1).collect()
    return str(caught.value)


def test_denials_say_who_what_and_why(router: Router) -> None:
    bob = router.session("bob")
    assert "bob" in _refused(bob)
    denial = router.wait_for(
        "bob's refusal", lambda e: e["event"] == "denied" and e["user"] == "bob"
    )
    _exact(denial)
    assert (denial["kind"], denial["reason"], denial["status"]) == (
        "policy",
        "no_role",
        "PERMISSION_DENIED",
    )
    assert denial["groups"] == ["nobody"]
    assert denial["session"] == bob.session_id
    assert denial["method"] and denial["peer"].startswith("ipv4:127.0.0.1")
    assert "bob" in denial["message"]

    carol = router.session("carol")
    assert "sessions" in _refused(carol)
    denial = router.wait_for(
        "carol's refusal", lambda e: e["event"] == "denied" and e["user"] == "carol"
    )
    _exact(denial)
    assert (denial["kind"], denial["reason"], denial["status"]) == (
        "quota",
        "sessions",
        "RESOURCE_EXHAUSTED",
    )
    assert denial["groups"] == ["analysts"] and denial["session"] == carol.session_id

    stranger = SparkSession.builder.remote(router.url(BAD_TOKEN)).create()
    stranger.client.set_retry_policies([])
    _refused(stranger)
    denial = router.wait_for(
        "the bad token's refusal",
        lambda e: e["event"] == "denied" and e["kind"] == "authentication",
    )
    _exact(denial)
    assert (denial["reason"], denial["status"], denial["user"]) == (
        "invalid",
        "UNAUTHENTICATED",
        None,
    )
    assert denial["session"] == stranger.session_id
    for spark in (bob, carol, stranger):
        spark.release_session_on_close = False  # refused: there is no session to release
        spark.stop()


def test_admin_drain_and_move_are_on_the_record_with_the_admins_identity(
    router: Router,
) -> None:
    status, answer = router.api("POST", f"/api/drivers/{router.drivers[0]}/drain", "alice", {})
    assert status == 403, answer
    refusal = router.wait_for(
        "alice's admin refusal",
        lambda e: e["event"] == "denied" and e["reason"] == "no_admin_role",
    )
    _exact(refusal)
    assert (refusal["kind"], refusal["user"], refusal["groups"]) == (
        "policy",
        "alice",
        ["analysts"],
    )
    assert refusal["method"] == f"POST /api/drivers/{router.drivers[0]}/drain"

    target = router.drivers[1]
    status, answer = router.api("POST", f"/api/drivers/{target}/drain", "root", {"mode": "keep"})
    assert status == 200, answer
    try:
        drain = router.wait_for("root's drain", lambda e: e.get("action") == "drain")
        _exact(drain)
        assert drain == {
            **drain,
            "admin": "root",
            "groups": ["platform"],
            "target": target,
            "result": "ok",
            "params": {"mode": "keep"},
        }
        # A new session now lands on the other driver; moved by the admin, it keeps its view.
        spark = router.session("alice")
        spark.range(4).createOrReplaceTempView("moving_view")
        sid = spark.session_id
        status, answer = router.api("DELETE", f"/api/drivers/{target}/drain", "root")
        assert status == 200, answer
        status, answer = router.api(
            "POST", f"/api/sessions/{sid}/move?user=alice", "root", {"driver": target}
        )
        assert status == 200, answer
        assert spark.sql("SELECT count(*) AS n FROM moving_view").collect()[0].n == 4
        spark.stop()
    finally:
        router.api("DELETE", f"/api/drivers/{target}/drain", "root")
    undrain = router.wait_for("root's undrain", lambda e: e.get("action") == "undrain")
    assert (undrain["admin"], undrain["target"], undrain["result"]) == ("root", target, "ok")
    moved = router.wait_for(
        "the admin's move", lambda e: e["event"] == "session.moved" and e["session"] == sid
    )
    _exact(moved)
    assert moved == {
        **moved,
        "user": "alice",
        "pool": "default",
        "from_driver": router.drivers[0],
        "driver": target,
        "reason": "admin",
    }
    move = router.wait_for("root's move", lambda e: e.get("action") == "move")
    _exact(move)
    assert (move["admin"], move["target"], move["result"]) == ("root", sid, "ok")
    assert move["params"] == {"user": "alice", "driver": target}
