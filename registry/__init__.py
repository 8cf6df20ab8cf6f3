"""Where cluster state lives: pins and driver membership, behind one contract (base.py).

`open_registry(url)` picks the store from the URL: `memory://` for the in-process store,
`redis://`, `rediss://`, `unix://` or `redis+sentinel://` for the shared Redis store
(redis-py is imported only then).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from registry.base import Registry, RegistryUnavailable

__all__ = ["REGISTRY_SCHEMES", "Registry", "RegistryUnavailable", "open_registry"]

_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
REGISTRY_SCHEMES = ("memory", *_REDIS_SCHEMES)


def open_registry(url: str, **options: Any) -> Registry:
    """The registry store named by `url`, built with `options` (e.g. pin_ttl)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from registry.memory import MemoryRegistry

        return MemoryRegistry(**options)
    if scheme in _REDIS_SCHEMES:
        from registry.redis import RedisRegistry

        return RedisRegistry.from_url(url, **options)
    accepted = ", ".join(f"{s}://" for s in REGISTRY_SCHEMES)
    shown = url.split("://", 1)[0] + "://..." if "://" in url else url
    raise ValueError(f"unsupported registry URL {shown!r}: use one of {accepted}")
