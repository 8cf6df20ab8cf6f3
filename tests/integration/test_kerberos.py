"""verify_negotiate (router/admit/kerberos.py) against a real MIT KDC (tests/kdc.py).

The realm is the session's throw-away `kdc`; a user gets a ticket from its keytab with kinit,
a gssapi initiator context makes the token for the router's service, and the acceptor side
verifies it with the service's keytab, exactly as the router will.
"""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gssapi
import pytest

from router.admit.kerberos import short_name, verify_negotiate
from router.errors import Unauthenticated
from tests.kdc import KDC

SERVICE = "HTTP/127.0.0.1"
OTHER_SERVICE = "HTTP/other.router.test"
SPNEGO = gssapi.Mechanism.from_sasl_name("SPNEGO")
_names = itertools.count()


@dataclass(frozen=True)
class Realm:
    """The session KDC with a router service and a user, both with keytabs."""

    kdc: KDC
    service: str  # full principal, HTTP/127.0.0.1@ROUTER.TEST
    service_keytab: Path
    other_service: str
    other_keytab: Path


@pytest.fixture(scope="module")
def realm(kdc: KDC) -> Realm:
    """The router's service principal (and another service's) in the session realm."""
    return Realm(
        kdc=kdc,
        service=kdc.principal(SERVICE),
        service_keytab=kdc.add_principal(SERVICE),
        other_service=kdc.principal(OTHER_SERVICE),
        other_keytab=kdc.add_principal(OTHER_SERVICE),
    )


@pytest.fixture
def krb5_env(realm: Realm, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's libkrb5 reads the test realm's krb5.conf, never /etc/krb5.conf."""
    monkeypatch.setenv("KRB5_CONFIG", str(realm.kdc.krb5_conf))
    monkeypatch.setenv("KRB5RCACHEDIR", str(realm.kdc.dir))
    monkeypatch.delenv("KRB5CCNAME", raising=False)
    monkeypatch.delenv("KRB5_KTNAME", raising=False)
    yield


def user_ccache(realm: Realm, tmp_path: Path, lifetime: str | None = None) -> tuple[str, Path]:
    """A fresh user principal with a ticket in its own ccache: (principal, ccache path)."""
    name = f"user{next(_names)}"
    keytab = realm.kdc.add_principal(name)
    ccache = tmp_path / f"{name}.ccache"
    realm.kdc.kinit(name, keytab, ccache, lifetime=lifetime)
    return realm.kdc.principal(name), ccache


def negotiate_header(ccache: Path, service: str, mech: gssapi.Mechanism | None = None) -> str:
    """`Negotiate <token>` for `service`, made from the ticket in `ccache` (the client side)."""
    creds = gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"})
    target = gssapi.Name(service, gssapi.NameType.kerberos_principal)
    context = gssapi.SecurityContext(name=target, creds=creds, usage="initiate", mech=mech)
    token = context.step()
    assert token
    return "Negotiate " + base64.b64encode(token).decode()


def test_a_valid_ticket_yields_the_users_principal(
    realm: Realm, krb5_env: None, tmp_path: Path
) -> None:
    principal, ccache = user_ccache(realm, tmp_path)
    header = negotiate_header(ccache, realm.service)
    got = verify_negotiate(header, str(realm.service_keytab), realm.service)
    assert got == principal
    assert short_name(got, {realm.kdc.realm}) == principal.split("@")[0]


def test_the_scheme_is_case_insensitive(realm: Realm, krb5_env: None, tmp_path: Path) -> None:
    principal, ccache = user_ccache(realm, tmp_path)
    header = negotiate_header(ccache, realm.service).replace("Negotiate", "negotiate", 1)
    assert verify_negotiate(header, str(realm.service_keytab), realm.service) == principal


def test_a_token_for_another_service_is_refused(
    realm: Realm, krb5_env: None, tmp_path: Path
) -> None:
    _, ccache = user_ccache(realm, tmp_path)
    header = negotiate_header(ccache, realm.other_service)
    with pytest.raises(Unauthenticated) as err:
        verify_negotiate(header, str(realm.service_keytab), realm.service)
    assert err.value.reason == "invalid"
    assert_no_secret(str(err.value), header, realm.service_keytab)


def test_another_services_key_in_the_same_keytab_does_not_help(
    realm: Realm, krb5_env: None, tmp_path: Path
) -> None:
    """Acceptor credentials are bound to the service's name, not to the whole keytab."""
    both = tmp_path / "both.keytab"
    both.write_bytes(realm.service_keytab.read_bytes())
    realm.kdc.kadmin(f"ktadd -k {both} -norandkey {realm.other_service}")
    _, ccache = user_ccache(realm, tmp_path)
    header = negotiate_header(ccache, realm.other_service)
    with pytest.raises(Unauthenticated) as err:
        verify_negotiate(header, str(both), realm.service)
    assert err.value.reason == "invalid"
    # and the token is good for the service it was made for
    assert verify_negotiate(header, str(both), realm.other_service).startswith("user")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Negotiate", "missing"),
        ("Negotiate   ", "missing"),
        ("Bearer abc.def.ghi", "invalid"),
        ("Negotiate not*base64!", "invalid"),
        ("Negotiate " + base64.b64encode(b"garbage, not a GSS token").decode(), "invalid"),
        ("Negotiate " + base64.b64encode(bytes(range(256)) * 4).decode(), "invalid"),
    ],
)
def test_malformed_headers_are_refused(
    realm: Realm, krb5_env: None, header: str | None, reason: str
) -> None:
    with pytest.raises(Unauthenticated) as err:
        verify_negotiate(header, str(realm.service_keytab), realm.service)
    assert err.value.reason == reason
    if header:
        assert_no_secret(str(err.value), header, realm.service_keytab)


def test_an_oversized_token_is_refused_before_gss(realm: Realm, krb5_env: None) -> None:
    header = "Negotiate " + base64.b64encode(b"\0" * (200 * 1024)).decode()
    with pytest.raises(Unauthenticated, match="too large") as err:
        verify_negotiate(header, str(realm.service_keytab), realm.service)
    assert err.value.reason == "invalid"


def test_a_replayed_token_is_refused(realm: Realm, krb5_env: None, tmp_path: Path) -> None:
    """The acceptor's replay cache: the same authenticator twice is an attack, not a user."""
    principal, ccache = user_ccache(realm, tmp_path)
    header = negotiate_header(ccache, realm.service)
    assert verify_negotiate(header, str(realm.service_keytab), realm.service) == principal
    with pytest.raises(Unauthenticated) as err:
        verify_negotiate(header, str(realm.service_keytab), realm.service)
    assert err.value.reason == "invalid"
    assert_no_secret(str(err.value), header, realm.service_keytab)


def assert_no_secret(message: str, header: str, keytab: Path) -> None:
    """No part of the token or of the keytab's bytes is in `message`."""
    token_b64 = header.partition(" ")[2].strip()
    for i in range(0, max(len(token_b64) - 16, 1), 8):
        chunk = token_b64[i : i + 16]
        if len(chunk) == 16:
            assert chunk not in message
    raw = keytab.read_bytes()
    for i in range(0, max(len(raw) - 16, 1), 8):
        chunk = raw[i : i + 16]
        assert chunk.hex() not in message
        assert base64.b64encode(chunk).decode() not in message


def test_a_spnego_wrapped_token_is_accepted(realm: Realm, krb5_env: None, tmp_path: Path) -> None:
    """Browsers, curl and Java send SPNEGO (1.3.6.1.5.5.2) around the Kerberos token."""
    principal, ccache = user_ccache(realm, tmp_path)
    header = negotiate_header(ccache, realm.service, mech=SPNEGO)
    assert verify_negotiate(header, str(realm.service_keytab), realm.service) == principal


def test_a_principals_max_life_caps_its_tickets(
    realm: Realm, krb5_env: None, tmp_path: Path
) -> None:
    keytab = realm.kdc.add_principal("shortlived", max_life="1m")
    ccache = tmp_path / "short.ccache"
    realm.kdc.kinit("shortlived", keytab, ccache)
    creds = gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"})
    assert creds.lifetime is not None
    assert 0 < creds.lifetime <= 60


def test_an_expired_ticket_is_refused_as_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A realm of its own with a 1 s clock skew, so a 2 s ticket is out of date 3 s later."""
    with KDC(clockskew=1) as kdc:
        monkeypatch.setenv("KRB5_CONFIG", str(kdc.krb5_conf))
        monkeypatch.setenv("KRB5RCACHEDIR", str(kdc.dir))
        monkeypatch.delenv("KRB5CCNAME", raising=False)
        service = kdc.principal(SERVICE)
        service_keytab = kdc.add_principal(SERVICE)
        user_keytab = kdc.add_principal("late")
        ccache = tmp_path / "late.ccache"
        kdc.kinit("late", user_keytab, ccache, lifetime="2s")
        header = negotiate_header(ccache, service)  # made while the ticket is valid
        creds = gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"})
        assert creds.lifetime is not None and creds.lifetime <= 2
        # Waiting for the clock is the point of this test (no process to synchronise with).
        time.sleep(creds.lifetime + kdc.clockskew + 1.5)
        with pytest.raises(Unauthenticated, match="expired") as err:
            verify_negotiate(header, str(service_keytab), service)
        assert err.value.reason == "expired"
        assert_no_secret(str(err.value), header, service_keytab)


def test_a_missing_keytab_is_the_operators_error_not_the_callers(
    realm: Realm, krb5_env: None, tmp_path: Path
) -> None:
    """A router without its keytab says so (RuntimeError), it does not blame the client."""
    _, ccache = user_ccache(realm, tmp_path)
    header = negotiate_header(ccache, realm.service)
    missing = tmp_path / "absent.keytab"
    with pytest.raises(RuntimeError, match=r"absent\.keytab") as err:
        verify_negotiate(header, str(missing), realm.service)
    assert not isinstance(err.value, Unauthenticated)
