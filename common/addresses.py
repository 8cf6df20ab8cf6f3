"""HOST:PORT addresses and URLs as every program here parses and shows them.

Invariants: an address is `host:port` or `[v6]:port` with a port of 1-65535 (0 only where
a listener asks the kernel for a port); a URL shown in a log line, an error or an answer
never carries its password (`redact_url`).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["address_problem", "redact_url", "split_host_port"]

_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def split_host_port(value: str) -> tuple[str, int]:
    """Split 'host:port' (or '[v6]:port') into its parts; raise ValueError when malformed."""
    m = _HOST_PORT.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:15002)")
    port = int(m.group(2))
    if port > 65535:
        raise ValueError(f"{value!r}: port {port} is out of range")
    return m.group(1), port


def address_problem(name: str, value: str) -> str | None:
    """Why `value` is not a dialable HOST:PORT (port 1-65535), or None."""
    m = _HOST_PORT.match(value)
    if m is None:
        return f"{name}: {value!r} is not HOST:PORT (e.g. 10.0.0.5:15002)"
    if not 0 < int(m.group(2)) <= 65535:
        return f"{name}: {value!r} has port {int(m.group(2))}, expected 1-65535"
    return None


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    # rpartition: a password may itself contain '@'; Sentinel URLs list several hosts.
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))
