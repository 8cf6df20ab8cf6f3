"""Fixtures shared by every suite: one real Redis server, one MIT KDC, for the session.

`redis_url` gives each test an empty database: FLUSHDB on the URL's database before the
test (our own server only ever uses db 0, so that is a FLUSHALL in effect; on a server
named by $REDIS_URL only that database is wiped, so point it at a throwaway one).
Tests that stop, freeze or restart Redis start their own `RedisServer` instead.

`kdc` is a throw-away Kerberos realm (tests/kdc.py) started on first use; without the MIT
Kerberos binaries it fails with the apt command to run (`./dev test` installs them).

Every replica a test starts, in this process or as a subprocess (which inherits the
environment), puts its admin listener on a free loopback port unless the test says
otherwise: the default 127.0.0.1:9464 would collide between replicas and with the machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from tests.kdc import KDC
from tests.redis_server import ExternalRedis, RedisServer

os.environ.setdefault("SPARK_ROUTER_ADMIN_LISTEN", "127.0.0.1:0")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | ExternalRedis]:
    """One Redis for the whole session: $REDIS_URL if set, else a redis-server we start."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield ExternalRedis(url)
        return
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer | ExternalRedis) -> Iterator[str]:
    """The session Redis's URL, its database emptied before the test."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
    yield redis_server.url


@pytest.fixture(scope="session")
def kdc() -> Iterator[KDC]:
    """One throw-away MIT KDC (realm ROUTER.TEST on 127.0.0.1) for the whole session."""
    with KDC() as server:
        yield server
