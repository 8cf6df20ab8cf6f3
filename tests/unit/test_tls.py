"""router/tls.py without a server: certificate reloading, credential building, config errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from common.health import PLAINTEXT, DriverDialing
from router.config import ConfigError, load_settings
from router.tls import (
    CertificateReloader,
    TLSConfigError,
    build_dialing,
    driver_dialing,
    server_credentials,
    verified_peer,
)


def _write_leaf(ca: trustme.CA, directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A certificate for localhost from `ca`, written as NAME.pem (chain) and NAME.key."""
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


def _replace(target: Path, source: Path) -> None:
    """Swap a file's contents the way a careful deployment does: write aside, then rename."""
    aside = target.with_suffix(target.suffix + ".new")
    aside.write_bytes(source.read_bytes())
    os.replace(aside, target)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


# --------------------------------------------------------------------------- reloading


def test_unchanged_files_keep_the_configuration(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = _write_leaf(ca, tmp_path)
    reloader = CertificateReloader(cert, key)
    assert isinstance(reloader.initial, grpc.ServerCertificateConfiguration)
    assert reloader() is None
    assert reloader() is None
    assert reloader.reloads == 0


def test_a_swapped_certificate_is_handed_over_once(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = _write_leaf(ca, tmp_path)
    reloader = CertificateReloader(cert, key)
    new_cert, new_key = _write_leaf(trustme.CA(), tmp_path, "next")
    _replace(key, new_key)
    _replace(cert, new_cert)
    assert isinstance(reloader(), grpc.ServerCertificateConfiguration)
    assert reloader.reloads == 1
    assert reloader() is None  # handed over: gRPC keeps using it


def test_a_change_of_the_client_ca_reloads_too(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = _write_leaf(ca, tmp_path)
    client_ca = tmp_path / "clients.pem"
    ca.cert_pem.write_to_path(str(client_ca))
    reloader = CertificateReloader(cert, key, client_ca)
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    _replace(client_ca, other)
    assert reloader() is not None


def test_a_half_done_swap_keeps_serving_and_warns_once(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = _write_leaf(ca, tmp_path)
    reloader = CertificateReloader(cert, key)
    new_cert, new_key = _write_leaf(trustme.CA(), tmp_path, "next")
    _replace(cert, new_cert)  # the key is not there yet
    with caplog.at_level(logging.WARNING, logger="router.tls"):
        assert reloader() is None
        assert reloader() is None
    warnings = [r for r in caplog.records if "cannot be served yet" in r.getMessage()]
    assert len(warnings) == 1
    assert "does not match the private key" in warnings[0].getMessage()
    _replace(key, new_key)
    assert reloader() is not None  # retried at the next connection, and now it fits
    assert reloader.reloads == 1


def test_a_file_being_rewritten_in_place_is_retried(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = _write_leaf(ca, tmp_path)
    reloader = CertificateReloader(cert, key)
    cert.write_bytes(b"-----BEGIN CERT")  # caught half-way through a copy
    assert reloader() is None
    new_cert, new_key = _write_leaf(trustme.CA(), tmp_path, "next")
    key.write_bytes(new_key.read_bytes())
    cert.write_bytes(new_cert.read_bytes())
    assert reloader() is not None


# --------------------------------------------------------------------------- start-up errors


def test_a_missing_file_is_named(ca: trustme.CA, tmp_path: Path) -> None:
    cert, _ = _write_leaf(ca, tmp_path)
    missing = tmp_path / "nope.key"
    with pytest.raises(TLSConfigError, match=rf"tls_key_file {missing}: No such file"):
        CertificateReloader(cert, missing)


def test_a_file_without_pem_is_named(ca: trustme.CA, tmp_path: Path) -> None:
    _, key = _write_leaf(ca, tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match=rf"tls_cert_file {junk}: does not hold PEM cert"):
        CertificateReloader(junk, key)
    cert, _ = _write_leaf(ca, tmp_path, "other")
    with pytest.raises(TLSConfigError, match=rf"tls_key_file {junk}: does not hold a PEM private"):
        CertificateReloader(cert, junk)


def test_an_encrypted_key_is_explained(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = _write_leaf(ca, tmp_path)
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="the key is encrypted"):
        CertificateReloader(cert, key)


def test_a_key_of_another_certificate_is_refused(ca: trustme.CA, tmp_path: Path) -> None:
    cert, _ = _write_leaf(ca, tmp_path)
    _, other_key = _write_leaf(ca, tmp_path, "other")
    with pytest.raises(TLSConfigError, match="does not match the private key"):
        CertificateReloader(cert, other_key)


def test_a_bad_client_ca_is_named(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = _write_leaf(ca, tmp_path)
    missing = tmp_path / "clients.pem"
    settings = load_settings(
        tls_cert_file=cert,
        tls_key_file=key,
        tls_client_ca_file=missing,
        tls_client_auth="require",
    )
    with pytest.raises(TLSConfigError, match=rf"tls_client_ca_file {missing}"):
        server_credentials(settings)


def test_server_credentials(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = _write_leaf(ca, tmp_path)
    settings = load_settings(tls_cert_file=cert, tls_key_file=key)
    assert isinstance(server_credentials(settings), grpc.ServerCredentials)


# --------------------------------------------------------------------------- config


def test_optional_client_auth_is_refused(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = _write_leaf(ca, tmp_path)
    common = {"tls_cert_file": cert, "tls_key_file": key, "tls_client_ca_file": cert}
    with pytest.raises(ConfigError, match="tls_client_auth optional is not supported"):
        load_settings(tls_client_auth="optional", **common)
    with pytest.raises(ConfigError, match="auth mtls needs tls_client_auth require"):
        load_settings(auth="mtls", tls_client_auth="none", **common)
    assert load_settings(tls_client_auth="require", **common).tls_client_auth == "require"


# --------------------------------------------------------------------------- drivers


def test_plaintext_without_a_token_is_the_default() -> None:
    assert driver_dialing(load_settings()) == PLAINTEXT
    assert PLAINTEXT.credentials is None and PLAINTEXT.metadata == ()


def test_the_token_becomes_a_bearer_header_never_shown() -> None:
    dialing = driver_dialing(load_settings(driver_token="s3cret-token"))
    assert dialing.metadata == (("authorization", "Bearer s3cret-token"),)
    assert dialing.credentials is None
    assert "s3cret" not in repr(dialing)


@pytest.mark.parametrize("token", ["", "  ", "a\nb", "tab\there"])
def test_an_unusable_token_is_refused_without_echoing_it(token: str) -> None:
    with pytest.raises(TLSConfigError) as failure:
        build_dialing(tls=False, token=token)
    assert token.strip() == "" or token not in str(failure.value)


def test_tls_to_drivers_with_a_name_override(ca: trustme.CA, tmp_path: Path) -> None:
    roots = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(roots))
    cert, key = _write_leaf(ca, tmp_path, "router")
    dialing = driver_dialing(
        load_settings(
            driver_tls=True,
            driver_tls_ca_file=roots,
            driver_tls_cert_file=cert,
            driver_tls_key_file=key,
            driver_tls_server_name="driver.internal",
        )
    )
    assert isinstance(dialing.credentials, grpc.ChannelCredentials)
    assert dialing.options == (("grpc.ssl_target_name_override", "driver.internal"),)
    assert driver_dialing(load_settings(driver_tls=True)).options == ()  # system roots


def test_driver_tls_file_errors_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    with pytest.raises(TLSConfigError, match=rf"driver_tls_ca_file {missing}"):
        driver_dialing(load_settings(driver_tls=True, driver_tls_ca_file=missing))


def test_a_dialing_value_is_plain_and_frozen() -> None:
    dialing = DriverDialing(metadata=(("authorization", "Bearer x"),))
    with pytest.raises(AttributeError):
        dialing.metadata = ()  # type: ignore[misc]


# --------------------------------------------------------------------------- verified_peer


def test_verified_peer() -> None:
    assert not verified_peer({})
    assert not verified_peer({"transport_security_type": [b"ssl"]})
    assert not verified_peer({"transport_security_type": [b"local"], "x509_pem_cert": [b"x"]})
    assert verified_peer({"transport_security_type": [b"ssl"], "x509_pem_cert": [b"-----BEGIN"]})
