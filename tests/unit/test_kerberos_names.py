"""short_name and parse_negotiate (router/admit/kerberos.py): pure rules, no KDC."""

from __future__ import annotations

import base64

import pytest

from router.admit.kerberos import parse_negotiate, short_name
from router.errors import Unauthenticated

REALMS = {"ROUTER.TEST", "CORP.EXAMPLE.COM"}


@pytest.mark.parametrize(
    ("principal", "user"),
    [
        ("alice@ROUTER.TEST", "alice"),
        ("bob@CORP.EXAMPLE.COM", "bob"),
        ("first.last@ROUTER.TEST", "first.last"),
    ],
)
def test_the_realm_of_an_allowed_realm_is_stripped(principal: str, user: str) -> None:
    assert short_name(principal, REALMS) == user


@pytest.mark.parametrize(
    ("principal", "says"),
    [
        ("alice@EVIL.TEST", "realm 'EVIL.TEST' is not allowed"),
        ("alice@router.test", "is not allowed"),  # realms are case-sensitive
        ("alice", "has no realm"),
        ("alice@", "has no realm"),
        ("@ROUTER.TEST", "has no realm"),
        ("HTTP/host.router.test@ROUTER.TEST", "not a user principal"),
        ("alice/admin@ROUTER.TEST", "not a user principal"),
        ("a@b@ROUTER.TEST", "not a user principal"),
    ],
)
def test_other_principals_are_refused(principal: str, says: str) -> None:
    with pytest.raises(Unauthenticated, match=says) as err:
        short_name(principal, REALMS)
    assert err.value.reason == "refused"


def test_no_allowed_realm_refuses_everyone() -> None:
    with pytest.raises(Unauthenticated, match=r"allowed: none"):
        short_name("alice@ROUTER.TEST", set())


def test_parse_negotiate_returns_the_token_bytes() -> None:
    token = b"\x60\x82token"
    assert parse_negotiate("Negotiate " + base64.b64encode(token).decode()) == token
    assert parse_negotiate("  NEGOTIATE   " + base64.b64encode(token).decode() + " ") == token


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("   ", "missing"),
        ("Negotiate", "missing"),
        ("Negotiate    ", "missing"),
        ("Basic YWxpY2U6c2VjcmV0", "invalid"),
        ("Negotiate !!!", "invalid"),
        ("Negotiate " + "A" * 200_000, "invalid"),
    ],
)
def test_parse_negotiate_refuses_malformed_headers(header: str | None, reason: str) -> None:
    with pytest.raises(Unauthenticated) as err:
        parse_negotiate(header)
    assert err.value.reason == reason
    token = (header or "").strip().partition(" ")[2].strip()
    if len(token) >= 12:
        assert token[:12] not in str(err.value)
