"""Kerberos users: verify an `authorization: Negotiate <token>` header with a service keytab.

Not wired into `auth` yet: this is the verifying half of the coming `auth: kerberos` mode.

Invariants:
- `gssapi` (the `kerberos` extra, built against MIT krb5) is imported on first use only: the
  router runs without it, and only a call that needs it says it is missing.
- The acceptor's credentials come from the given keytab, for the given service principal
  only (a credential store, not $KRB5_KTNAME or the process's default keytab): a token made
  for any other service is refused even if its key happens to be in the same keytab.
- Secrets never reach an error message: not the token, not any part of it, not the keytab's
  bytes. GSS's own texts (they name principals and causes, never keys) are kept short.
- `short_name` is pure: strip `@REALM` of a one-component principal of an allowed realm;
  everything else (another realm, no realm, `service/host@REALM`) is refused.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection
from typing import Any

from router.errors import Unauthenticated

_SCHEME = "negotiate"
# A Kerberos AP-REQ in SPNEGO is a few KB; anything far larger is not a token of ours.
MAX_TOKEN_BYTES = 64 * 1024
_MAX_REASON_CHARS = 200


def _gssapi() -> Any:
    """The gssapi module; RuntimeError naming the extra to install when it is missing."""
    try:
        import gssapi
    except ImportError as exc:  # pragma: no cover - the test environment has the extra
        raise RuntimeError(
            "Kerberos needs the gssapi package: pip install 'spark-session-router[kerberos]' "
            "(it builds against MIT krb5: apt-get install libkrb5-dev)"
        ) from exc
    return gssapi


def parse_negotiate(header_value: str | None) -> bytes:
    """The token of `Negotiate <base64>` (pure); Unauthenticated for anything else."""
    if header_value is None or not header_value.strip():
        raise Unauthenticated(
            "no Kerberos credentials: send 'authorization: Negotiate <SPNEGO token>' (kinit first)",
            reason="missing",
        )
    scheme, _, value = header_value.strip().partition(" ")
    if scheme.lower() != _SCHEME:
        raise Unauthenticated(
            "the authorization header is not 'Negotiate <SPNEGO token>'", reason="invalid"
        )
    value = value.strip()
    if not value:
        raise Unauthenticated("the Negotiate header carries no token", reason="missing")
    if len(value) > MAX_TOKEN_BYTES * 4 // 3 + 4:
        raise Unauthenticated("the Negotiate token is too large", reason="invalid")
    try:
        token = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Unauthenticated("the Negotiate token is not valid base64", reason="invalid") from None
    if not token:
        raise Unauthenticated("the Negotiate header carries no token", reason="missing")
    return token


def verify_negotiate(header_value: str | None, keytab: str, service: str) -> str:
    """The initiator principal ('alice@REALM') of a valid `Negotiate` header for `service`.

    `service` is the acceptor's full principal ('HTTP/host@REALM'), `keytab` a path to a
    keytab holding its key. Unauthenticated (reason missing, invalid or expired) otherwise.
    """
    token = parse_negotiate(header_value)
    gssapi = _gssapi()
    try:
        name = gssapi.Name(service, gssapi.NameType.kerberos_principal)
        creds = gssapi.Credentials(name=name, usage="accept", store={"keytab": keytab})
    except gssapi.exceptions.GSSError as exc:
        # Our own configuration, not the caller's fault: say so without the GSS internals.
        raise RuntimeError(
            f"cannot use the keytab {keytab!r} for {service!r}: {_gss_text(exc)}"
        ) from None
    context = gssapi.SecurityContext(creds=creds, usage="accept")
    try:
        # A failure that comes with an error token for the peer is kept by gssapi and raised
        # on the context's next use: `complete` and the name are read inside the try too.
        context.step(token)  # its reply (the AP-REP of mutual auth) is for a client that waits
        complete = context.complete
        initiator = str(context.initiator_name) if complete else ""
    except gssapi.exceptions.GSSError as exc:
        reason = "expired" if _is_expired(gssapi, exc) else "invalid"
        what = "ticket has expired (kinit again)" if reason == "expired" else "token was refused"
        raise Unauthenticated(f"the Kerberos {what}: {_gss_text(exc)}", reason=reason) from None
    if not complete:
        # Kerberos in one round trip is the only exchange gRPC metadata allows.
        raise Unauthenticated(
            "the Negotiate token needs more than one round trip (send a Kerberos token, not NTLM)",
            reason="invalid",
        )
    return initiator


def short_name(principal: str, realms: Collection[str]) -> str:
    """The user of `alice@REALM` for an allowed REALM: 'alice' (pure).

    Unauthenticated (reason refused) for a realm not in `realms`, a principal with no realm
    and a multi-component (service) principal such as 'HTTP/host@REALM'.
    """
    user, at, realm = principal.rpartition("@")
    if not at or not user or not realm:
        raise Unauthenticated(f"the Kerberos principal {principal!r} has no realm", "refused")
    if realm not in realms:
        allowed = ", ".join(sorted(realms)) or "none"
        raise Unauthenticated(
            f"the Kerberos realm {realm!r} is not allowed here (allowed: {allowed})", "refused"
        )
    if "/" in user or "@" in user or "\\" in user:
        raise Unauthenticated(
            f"the Kerberos principal {principal!r} is not a user principal", "refused"
        )
    return user


def _is_expired(gssapi: Any, exc: Exception) -> bool:
    """Whether a GSS failure means an expired ticket (GSS code or the krb5 minor code)."""
    expired_types = tuple(
        t
        for t in (
            getattr(gssapi.exceptions, "ExpiredContextError", None),
            getattr(gssapi.exceptions, "ExpiredCredentialsError", None),
        )
        if isinstance(t, type)
    )
    if expired_types and isinstance(exc, expired_types):
        return True
    return "expired" in _gss_text(exc).lower()


def _gss_text(exc: Exception) -> str:
    """GSS's cause of a failure in one short line: the krb5 (minor) text when it has one.

    python-gssapi's str() is 'Major (N): TEXT, Minor (N): TEXT'; the minor text says what
    happened ('Ticket expired', 'Request is a replay'), the major one only its class. GSS
    names causes and principals there, never key material.
    """
    text = " ".join(str(exc).split())
    major, _, minor = text.partition(", Minor (")
    minor = minor.partition("): ")[2].strip()
    major = major.partition("): ")[2].strip() or major
    if minor and minor.lower() != "unknown error":
        text = minor
    else:
        text = major.removesuffix(" Minor code may provide more information").rstrip(". ")
    return (text or type(exc).__name__)[:_MAX_REASON_CHARS]
