"""The operator's side of the CLI: reach the cluster through a replica's admin API or the registry.

`spark-router drivers | sessions | drain` take `--admin URL` (a replica's admin listener,
which adds that replica's health view) or `--registry URL` (the shared registry itself, for
when no replica is up). Both return the records of operations.py, so the CLI prints them
the same way. `spark-router quotas` needs `--admin URL`: it shows that replica's counts.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from registry.base import Registry, RegistryUnavailable
from registry.models import DrainMode
from router.admin import records as operations

T = TypeVar("T")


class ControlError(Exception):
    """The admin API or the registry could not do what was asked (the message says why)."""


class Control(Protocol):
    """What the operator commands need."""

    def drivers(self) -> list[dict[str, Any]]:
        """Every driver with state, drain mode and session count."""
        ...

    def sessions(self, driver: str | None, limit: int) -> list[dict[str, Any]]:
        """Sessions of one driver, or any, up to `limit`."""
        ...

    def session(self, session_id: str) -> dict[str, Any] | None:
        """One session, or None."""
        ...

    def drain(self, address: str, mode: DrainMode | None) -> dict[str, Any]:
        """Mark a driver draining in `mode`, or undrain it (None)."""
        ...


class AdminControl:
    """The admin HTTP API of one replica."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self._base = url.rstrip("/")
        if not self._base.startswith(("http://", "https://")):
            self._base = "http://" + self._base
        self._token = token
        self._timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and path.startswith("/api/sessions/"):
                return None
            raise ControlError(f"admin API {method} {path}: {exc.code} {_error_text(exc)}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ControlError(f"cannot reach the admin API at {self._base}: {exc}") from exc

    def drivers(self) -> list[dict[str, Any]]:
        """Every driver with state, health, drain mode and session count."""
        return list(self._call("GET", "/api/drivers")["drivers"])

    def sessions(self, driver: str | None, limit: int) -> list[dict[str, Any]]:
        """Sessions of one driver, or any, up to `limit`."""
        query = {"limit": str(limit), **({"driver": driver} if driver else {})}
        return list(self._call("GET", "/api/sessions?" + urllib.parse.urlencode(query))["sessions"])

    def session(self, session_id: str) -> dict[str, Any] | None:
        """One session, or None."""
        found = self._call("GET", "/api/sessions/" + urllib.parse.quote(session_id, safe=""))
        return None if found is None else dict(found)

    def quotas(self) -> dict[str, Any]:
        """The quotas and what this replica counts against them (its view only)."""
        return dict(self._call("GET", "/api/quotas"))

    def drain(self, address: str, mode: DrainMode | None) -> dict[str, Any]:
        """Mark a driver draining in `mode`, or undrain it (None)."""
        path = "/api/drivers/" + urllib.parse.quote(address, safe="") + "/drain"
        if mode is None:
            return dict(self._call("DELETE", path))
        return dict(self._call("POST", path, {"mode": mode.value}))


class RegistryControl:
    """The shared registry itself (no replica's health view)."""

    def __init__(self, open_store: Callable[[], Registry]) -> None:
        self._open = open_store

    def _run(self, work: Callable[[Registry], Awaitable[T]]) -> T:
        async def run() -> T:
            store = self._open()
            try:
                return await work(store)
            finally:
                await store.close()

        try:
            return asyncio.run(run())
        except RegistryUnavailable as exc:
            raise ControlError(f"cannot reach the registry: {exc}") from exc
        except operations.UnknownDriver as exc:  # the admin API's 404, the same words
            raise ControlError(str(exc)) from None

    def drivers(self) -> list[dict[str, Any]]:
        """Every driver with state, drain mode and session count."""
        return self._run(operations.driver_records)

    def sessions(self, driver: str | None, limit: int) -> list[dict[str, Any]]:
        """Sessions of one driver, or any, up to `limit`."""
        return self._run(lambda store: operations.session_records(store, driver, limit))

    def session(self, session_id: str) -> dict[str, Any] | None:
        """One session, or None."""
        return self._run(lambda store: operations.session_record(store, session_id))

    def drain(self, address: str, mode: DrainMode | None) -> dict[str, Any]:
        """Mark a driver draining in `mode`, or undrain it (None)."""
        return self._run(lambda store: operations.set_drain(store, address, mode))


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
        return str(body.get("error") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)
