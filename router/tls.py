"""TLS on the listener, TLS to drivers, and the backend token: credentials built from files.

Listener (`server_credentials`): `grpc.dynamic_ssl_server_credentials` with a
`CertificateReloader`, which gRPC calls before every TLS handshake. It stats tls_cert_file,
tls_key_file and tls_client_ca_file; when any of them changed (inode, mtime or size) it
re-reads them, so the next new connection is served the new certificate, no restart; open
connections keep theirs. A swap caught half-way (a key that does not match its certificate,
a file that does not parse yet) keeps the certificate served so far, warns once per bad
state and is tried again at the next connection. At start-up the same problems are errors
(`TLSConfigError`) naming the setting and the file.

Client certificates (`tls_client_auth`): `none` asks for none; `require` asks for one and gRPC
verifies it against tls_client_ca_file in the handshake, so a client without a valid one is
refused before any call. There is no working `optional`: grpc Python's server credentials
offer only "do not request" or "request, require and verify" (`require_client_authentication`
maps to GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE or ..._REQUEST_AND_REQUIRE_..._AND_VERIFY in
cygrpc's credentials.pyx.pxi), so under `optional` the server would never ask and no client
would ever send a certificate; config.py refuses it. Consequently an x509 certificate in a
call's auth context is always one gRPC verified (`verified_peer`).

Drivers (`driver_dialing`): plaintext unless driver_tls; with it `grpc.ssl_channel_credentials`
(driver_tls_ca_file, else the system roots; driver_tls_cert_file/key_file for mTLS) and
`grpc.ssl_target_name_override` when driver_tls_server_name is set. driver_token becomes the
`authorization: Bearer` metadata of every call to a driver, probes included; it is never
logged, and DriverDialing keeps it out of its repr.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.health import DriverDialing
from router.config import Settings

__all__ = [
    "CertificateReloader",
    "TLSConfigError",
    "build_dialing",
    "driver_dialing",
    "server_credentials",
    "verified_peer",
]

log = logging.getLogger(__name__)

_Kind = Literal["certificates", "key"]
# (inode, mtime in ns, size) of each watched file; None where the file cannot be stat'ed.
_Signature = tuple[tuple[int, int, int] | None, ...]


class TLSConfigError(Exception):
    """A certificate, key or CA file cannot be used; str() names the setting and the file."""


def _read_pem(path: Path, setting: str, kind: _Kind) -> bytes:
    """The bytes of a PEM file, checked to hold certificates or one unencrypted private key."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{setting} {path}: {exc.strerror or exc}") from exc
    try:
        if kind == "certificates":
            certs = x509.load_pem_x509_certificates(data)
            _warn_if_expired(certs[0], setting, path)
        else:
            serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography's word for an encrypted key without a password
        raise TLSConfigError(
            f"{setting} {path}: the key is encrypted; gRPC needs an unencrypted PEM key"
        ) from exc
    except ValueError as exc:
        what = "PEM certificates" if kind == "certificates" else "a PEM private key"
        raise TLSConfigError(f"{setting} {path}: does not hold {what} ({exc})") from exc
    return data


def _warn_if_expired(cert: x509.Certificate, setting: str, path: Path) -> None:
    """Say so when a certificate has expired: clients will refuse it, so the reason is here."""
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        log.warning("%s %s: the certificate expired on %s", setting, path, cert.not_valid_after_utc)


def _check_key_matches(chain: bytes, key: bytes, cert_setting: str, cert_path: Path) -> None:
    """The chain's first certificate must carry the key's public half (else no handshake works)."""
    leaf = x509.load_pem_x509_certificates(chain)[0]
    private = serialization.load_pem_private_key(key, password=None)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*raw) != private.public_key().public_bytes(*raw):
        raise TLSConfigError(
            f"{cert_setting} {cert_path}: its certificate does not match the private key"
        )


# --------------------------------------------------------------------------- the listener


@dataclass(frozen=True)
class _Files:
    """The files the listener serves from."""

    cert: Path
    key: Path
    client_ca: Path | None

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every watched file, the client CA last when there is one."""
        return (
            (self.cert, self.key)
            if self.client_ca is None
            else (self.cert, self.key, self.client_ca)
        )


class CertificateReloader:
    """gRPC's certificate-configuration fetcher: a new configuration when the files changed.

    gRPC calls it (from its own threads) before every TLS handshake; None means "keep the
    current configuration". `initial` is what the server starts with.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        """Read the files now; TLSConfigError when they cannot be served."""
        ca = None if client_ca_file is None else Path(client_ca_file)
        self._files = _Files(Path(cert_file), Path(key_file), ca)
        self._lock = threading.Lock()
        self._served = self._signature()
        self.initial = self._load()
        self.reloads = 0  # configurations handed to gRPC after the initial one
        self._warned: _Signature | None = None  # the broken state already warned about

    def _signature(self) -> _Signature:
        """What identifies the files' current contents without reading them."""
        found: list[tuple[int, int, int] | None] = []
        for path in self._files.paths:
            try:
                st = os.stat(path)
            except OSError:
                found.append(None)
            else:
                found.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(found)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """The server configuration of the files as they are; TLSConfigError if unusable."""
        files = self._files
        chain = _read_pem(files.cert, "tls_cert_file", "certificates")
        key = _read_pem(files.key, "tls_key_file", "key")
        _check_key_matches(chain, key, "tls_cert_file", files.cert)
        roots = None
        if files.client_ca is not None:
            roots = _read_pem(files.client_ca, "tls_client_ca_file", "certificates")
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration if the files changed and can be served; else None (keep)."""
        with self._lock:
            seen = self._signature()
            if seen == self._served:
                return None
            try:
                config = self._load()
            except TLSConfigError as exc:
                # Most likely a swap in progress: keep serving, retry at the next connection.
                if seen != self._warned:
                    self._warned = seen
                    log.warning(
                        "TLS files changed but cannot be served yet, keeping the "
                        "current certificate: %s",
                        exc,
                    )
                return None
            except Exception:  # never let a reload break the handshakes of the listener
                log.exception("reloading the TLS files failed; keeping the current certificate")
                return None
            self._served = seen
            self._warned = None
            self.reloads += 1
            log.info("TLS files changed: new connections get the new certificate")
            return config


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """The listener's TLS credentials, reloading the files as they change; TLSConfigError."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise TLSConfigError("tls_cert_file and tls_key_file are needed to serve TLS")
    if settings.tls_client_auth == "optional":  # config.py refuses it; see the module docstring
        raise TLSConfigError("tls_client_auth optional is not supported by grpc's Python server")
    require = settings.tls_client_auth == "require"
    reloader = CertificateReloader(
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file if require else None,
    )
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial, reloader, require_client_authentication=require
    )


def verified_peer(auth_context: Mapping[str, Sequence[bytes]]) -> bool:
    """Whether the caller showed a client certificate gRPC verified (mTLS under `require`).

    True only over TLS with a peer certificate in the auth context; the listener asks for
    client certificates only when it also requires and verifies them, so any certificate
    found there passed verification against tls_client_ca_file.
    """
    if list(auth_context.get("transport_security_type", ())) != [b"ssl"]:
        return False
    return bool(auth_context.get("x509_pem_cert"))


# --------------------------------------------------------------------------- drivers


def build_dialing(
    *,
    tls: bool,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    server_name: str | None = None,
    token: str | None = None,
) -> DriverDialing:
    """How to dial drivers, from plain values (the agent's flags use this too); TLSConfigError."""
    metadata: tuple[tuple[str, str], ...] = ()
    if token is not None:
        if not token.strip():
            raise TLSConfigError("driver_token must not be empty (unset it to send none)")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in token):
            # Never echo the token: say what is wrong with it, not what it is.
            raise TLSConfigError("driver_token contains a line break or control character")
        metadata = (("authorization", f"Bearer {token}"),)
    if not tls:
        return DriverDialing(metadata=metadata)
    if (cert_file is None) != (key_file is None):
        raise TLSConfigError("driver_tls_cert_file and driver_tls_key_file go together")
    roots = None if ca_file is None else _read_pem(ca_file, "driver_tls_ca_file", "certificates")
    chain = key = None
    if cert_file is not None and key_file is not None:
        chain = _read_pem(cert_file, "driver_tls_cert_file", "certificates")
        key = _read_pem(key_file, "driver_tls_key_file", "key")
        _check_key_matches(chain, key, "driver_tls_cert_file", cert_file)
    credentials = grpc.ssl_channel_credentials(roots, key, chain)
    options: tuple[tuple[str, str], ...] = ()
    if server_name:
        options = (("grpc.ssl_target_name_override", server_name),)
    return DriverDialing(credentials, options, metadata)


def driver_dialing(settings: Settings) -> DriverDialing:
    """How this replica dials its drivers (channels and probes alike); TLSConfigError."""
    token = settings.driver_token
    return build_dialing(
        tls=settings.driver_tls,
        ca_file=settings.driver_tls_ca_file,
        cert_file=settings.driver_tls_cert_file,
        key_file=settings.driver_tls_key_file,
        server_name=settings.driver_tls_server_name,
        token=None if token is None else token.get_secret_value(),
    )
