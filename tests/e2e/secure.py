"""Certificate helpers shared by the e2e tests of TLS and authentication."""

from __future__ import annotations

from pathlib import Path

import trustme


def write_leaf(
    ca: trustme.CA, directory: Path, name: str, *hosts: str, common_name: str | None = None
) -> tuple[Path, Path]:
    """Issue a certificate for `hosts` from `ca`; write its chain and key: (cert, key) paths.

    `common_name` sets the subject CN (a client certificate naming its user); `hosts` become
    the subject alternative names (host names, IP addresses, or e-mail addresses with an @).
    """
    leaf = ca.issue_cert(*hosts, common_name=common_name)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key
