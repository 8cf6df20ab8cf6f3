"""Fixtures for end-to-end tests against real Spark Connect drivers (needs Java 17+).

* `spark_drivers` (session): two local drivers (`router.local.LocalDrivers`), started on first
  use and stopped at the end of the session. Tests may use `.addresses` / `.drivers`; a test
  that stops one of them must start it again (`driver.start(); driver.wait_ready()`).
* `spark_connect` (function): `spark_connect("127.0.0.1:15003")` opens a pyspark session straight
  to a driver; every session opened is stopped after the test.
* `java` (session): the JavaInfo found. Java 17 is a stated prerequisite of this project, so
  a machine without it fails these tests with the fix in the message; nothing is skipped.

Tests marked `own_drivers` start JVMs of their own. They are moved before the first test that
uses `spark_drivers`, so no more than two JVMs of this suite run at any time.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from router.local import JavaInfo, JavaNotFound, JavaTooOld, LocalDrivers, check_java

log = logging.getLogger(__name__)

OWN_DRIVERS = "own_drivers"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{OWN_DRIVERS}: starts its own Spark drivers; runs before the session's spark_drivers",
    )


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Run `own_drivers` tests before `spark_drivers` is first used (it lives to the end)."""
    own = [item for item in items if item.get_closest_marker(OWN_DRIVERS) is not None]
    if not own:
        return
    rest = [item for item in items if item.get_closest_marker(OWN_DRIVERS) is None]
    first = next(
        (i for i, item in enumerate(rest) if "spark_drivers" in getattr(item, "fixturenames", ())),
        len(rest),
    )
    items[:] = rest[:first] + own + rest[first:]


@pytest.fixture(scope="session")
def java() -> JavaInfo:
    """The Java the drivers will use; fails (never skips) without Java 17+."""
    try:
        return check_java()
    except (JavaNotFound, JavaTooOld) as exc:
        pytest.fail(f"the e2e tests need Java 17+ for real Spark drivers: {exc}")


@pytest.fixture(scope="session")
def spark_drivers(
    java: JavaInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDrivers]:
    """Two local Spark Connect drivers on 127.0.0.1, shared by the whole test session."""
    drivers = LocalDrivers(
        2, work_dir=tmp_path_factory.mktemp("spark-drivers"), startup_timeout=240
    )
    with drivers:
        drivers.start(progress=False)
        log.info(
            "spark_drivers ready: %s",
            ", ".join(f"{d.address} in {d.ready_after:.1f} s" for d in drivers.drivers),
        )
        yield drivers


@pytest.fixture
def spark_connect() -> Iterator[Callable[[str], Any]]:
    """A factory of pyspark sessions straight to a driver ("host:port"), stopped after the test."""
    from pyspark.sql import SparkSession

    sessions: list[tuple[str, Any]] = []

    def connect(address: str) -> Any:
        session = SparkSession.builder.remote(f"sc://{address}").create()
        sessions.append((address, session))
        return session

    yield connect
    for address, session in sessions:
        if not _accepts(address):
            # stop() would retry ReleaseSession against a dead driver for ~10 minutes.
            session.release_session_on_close = False
        session.stop()


def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
            return True
    except OSError:
        return False
