"""Sessions are (user, session id): the registry key, and the user rewritten on the wire."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyspark.sql.connect.proto import base_pb2

from registry.memory import MemoryRegistry
from registry.models import Driver, Pin, session_key, split_key
from router.dataplane import protocol
from router.dataplane.protocol import METHODS
from router.errors import BadRequest, PermissionDenied
from router.sessions.placement import Placement
from router.sessions.ring import Rings

users = st.text(max_size=30)
session_ids = st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s)


@given(users, session_ids)
def test_a_key_splits_back_into_user_and_session(user: str, session_id: str) -> None:
    key = session_key(user, session_id)
    assert split_key(key) == ((user or None), session_id)
    assert (key == session_id) is (not user)  # ownerless pins keep the old key


def test_two_users_one_session_id_are_two_keys() -> None:
    sid = str(uuid.uuid4())
    assert session_key("alice", sid) != session_key("mallory", sid)
    assert session_key("a/b", sid) == f"a%2Fb/{sid}"  # a user cannot forge another's key


def test_pin_key_names_its_owner() -> None:
    assert Pin("s1", "d:1", owner="alice").key == "alice/s1"
    assert Pin("s1", "d:1").key == "s1"


def test_a_session_id_with_a_slash_is_refused() -> None:
    req = base_pb2.ConfigRequest(session_id="alice/0f0e0d0c-0b0a-4908-8706-050403020100")
    with pytest.raises(BadRequest, match="not a UUID"):
        protocol.identify(METHODS["Config"], {}, req.SerializeToString())


@given(st.text(max_size=20), st.text(max_size=20), st.text(max_size=20))
def test_with_user_replaces_only_the_user(claimed: str, name: str, user: str) -> None:
    req = base_pb2.ExecutePlanRequest(session_id="s1", operation_id="op-1")
    req.user_context.user_id = claimed
    req.user_context.user_name = name
    req.client_observed_server_side_session_id = "srv-1"
    out = base_pb2.ExecutePlanRequest.FromString(protocol.with_user(req.SerializeToString(), user))
    assert out.user_context.user_id == user
    assert out.user_context.user_name == name
    assert (out.session_id, out.operation_id) == ("s1", "op-1")
    assert out.client_observed_server_side_session_id == "srv-1"


def test_with_user_adds_a_user_context_when_there_is_none() -> None:
    raw = base_pb2.ConfigRequest(session_id="s1").SerializeToString()
    assert base_pb2.ConfigRequest.FromString(
        protocol.with_user(raw, "bob")
    ).user_context.user_id == ("bob")


def test_as_user_keys_the_call_by_the_authenticated_user() -> None:
    s1 = str(uuid.uuid4())
    req = base_pb2.ConfigRequest(session_id=s1)
    req.user_context.user_id = "root"
    info = protocol.identify(METHODS["Config"], {}, req.SerializeToString())
    assert (info.key, info.user, info.rewrite_user) == (f"root/{s1}", "root", None)
    assert info.as_user("root") is info  # nothing to rewrite
    alice = info.as_user("alice")
    assert (alice.key, alice.user, alice.rewrite_user, alice.user_id) == (
        f"alice/{s1}",
        "alice",
        "alice",
        "root",
    )


RINGS = Rings.build([Driver("127.0.0.1:1"), Driver("127.0.0.1:2")])


async def test_a_claimed_session_id_refuses_another_user() -> None:
    reg = MemoryRegistry()
    placement = Placement(reg, RINGS, cache_size=10)
    mine = await placement.place("s1", None, "alice", claim=True)
    assert mine.key == "alice/s1" and mine.owner == "alice"
    with pytest.raises(PermissionDenied, match="belongs to another user") as refused:
        await placement.place("s1", None, "mallory", claim=True)
    assert "alice" not in str(refused.value)  # the owner is not named to others
    # Another replica sharing the registry refuses too.
    other = Placement(reg, RINGS, cache_size=10)
    with pytest.raises(PermissionDenied):
        await other.place("s1", None, "mallory", claim=True)
    assert await other.place("s1", None, "alice", claim=True) == mine


async def test_without_claims_two_users_get_two_sessions() -> None:
    reg = MemoryRegistry()
    placement = Placement(reg, RINGS, cache_size=10)
    alice = await placement.place("s1", None, "alice")
    mallory = await placement.place("s1", None, "mallory")
    assert alice.key != mallory.key
    await placement.release(mallory.key)
    assert await reg.get_pin(alice.key) == alice  # mallory's release left alice's pin
    assert await reg.get_pin(mallory.key) is None
