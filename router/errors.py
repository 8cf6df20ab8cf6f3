"""The router's own errors and the one place they become gRPC statuses.

Errors that come back from a driver are not ours: proxy.py forwards their code, details
and trailers untouched. Only failures the router itself detects (bad input, no driver,
a driver that cannot be reached) are raised as `RouterError`s and mapped here. Anything
else is a bug: INTERNAL with a generic message, logged once with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import grpc

log = logging.getLogger(__name__)


class RouterError(Exception):
    """A failure the router detected itself; its str() is safe to show the client."""

    code = grpc.StatusCode.INTERNAL

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata the client gets with the status (none unless a subclass says)."""
        return ()


class BadRequest(RouterError):
    """The call cannot be routed as sent (no session, malformed message, ...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NoLiveDriver(RouterError):
    """No driver of the session's pool takes sessions now; the message names them and why.

    FAILED_PRECONDITION, not UNAVAILABLE: pyspark's DefaultPolicy (pyspark/sql/connect/
    client/retries.py) retries every UNAVAILABLE, 15 times with backoff growing 4x to 60 s —
    over ten minutes of a silent hang — and of the other codes only an INTERNAL
    INVALID_CURSOR.DISCONNECTED or an error carrying RetryInfo. FAILED_PRECONDITION is gRPC's
    "do not retry until the system's state is fixed", which is the case: a driver must come
    back first. The router itself waits for that a bounded `no_driver_wait_seconds` (a
    driver that just went down may recover) before it answers. RESOURCE_EXHAUSTED would not
    be retried either but means a limit, ABORTED invites an immediate retry.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(
        self, message: str, *, pool: str | None = None, drivers: Mapping[str, str] | None = None
    ) -> None:
        """`pool` and `drivers` (address → state), when known, let `explained` add reasons."""
        super().__init__(message)
        self.pool = pool
        self.drivers: Mapping[str, str] = dict(drivers or {})

    @classmethod
    def in_pool(cls, pool: str, drivers: Mapping[str, str]) -> NoLiveDriver:
        """No driver of `pool` takes new sessions; `drivers` is its members' states."""
        return cls(describe_pool(pool, drivers, {}), pool=pool, drivers=drivers)

    def explained(self, reasons: Mapping[str, str], lead: str = "") -> NoLiveDriver:
        """The same error naming each driver's last probe error (`reasons` by address)."""
        if self.pool is None:
            return NoLiveDriver(f"{lead}{self}")
        text = describe_pool(self.pool, self.drivers, reasons)
        return NoLiveDriver(f"{lead}{text}", pool=self.pool, drivers=self.drivers)


# At most this many drivers are named in one message (it travels in a trailer).
_MAX_NAMED_DRIVERS = 10


def describe_pool(pool: str, drivers: Mapping[str, str], reasons: Mapping[str, str]) -> str:
    """'pool P has no driver that takes new sessions (A: down, last probe: WHY; ...)' (pure)."""
    parts = []
    for address in sorted(drivers)[:_MAX_NAMED_DRIVERS]:
        why = reasons.get(address)
        state = drivers[address]
        parts.append(f"{address}: {state}, last probe: {why}" if why else f"{address}: {state}")
    if len(drivers) > _MAX_NAMED_DRIVERS:
        parts.append(f"and {len(drivers) - _MAX_NAMED_DRIVERS} more")
    listed = "; ".join(parts) or "none"
    return (
        f"pool {pool!r} has no driver that takes new sessions (drivers: {listed}); "
        "start or fix a driver, then retry"
    )


class UnknownPool(RouterError):
    """The session asked for a pool no driver belongs to."""

    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(RouterError):
    """Missing, expired or invalid credentials; the message says what to send instead."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str, reason: str = "invalid") -> None:
        """`reason`: missing, invalid, expired or refused (the audit's label)."""
        super().__init__(message)
        self.reason = reason


class PermissionDenied(RouterError):
    """An authenticated caller asked for what is not theirs (another user, a foreign session)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class PolicyDenied(PermissionDenied):
    """The policy refuses the caller: on the deny list, in no role, or a pool not theirs."""

    def __init__(self, message: str, reason: str) -> None:
        """`reason`: deny_list, no_role or pool (a metric label)."""
        super().__init__(message)
        self.reason = reason


class OverBudget(RouterError):
    """A limit of the replica's memory budget was reached; the message names it and its setting.

    RESOURCE_EXHAUSTED: gRPC's code for a quota or limit, which pyspark does not retry (the
    same burst would meet the same limit); the client sees at once what to change.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, limit: str) -> None:
        """`limit`: the setting whose value was reached (a metric label)."""
        super().__init__(message)
        self.limit = limit


class RerunDiffers(RouterError):
    """A query run again after its driver was lost did not give the results already sent.

    ABORTED: gRPC's code for an operation to retry at a higher level. pyspark does not
    retry it by itself (a blind retry would meet the same mixed results); the user's action
    runs again as a whole.
    """

    code = grpc.StatusCode.ABORTED


class DriverUnreachable(RouterError):
    """A driver refused or dropped the connection before answering."""

    code = grpc.StatusCode.UNAVAILABLE


# Texts grpc core puts in the details of an UNAVAILABLE it generated itself because the
# transport failed (as opposed to an UNAVAILABLE the driver sent, which is forwarded intact).
_TRANSPORT_FAILURES = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "socket closed",
    "connection reset",
    "broken pipe",
    "end of tcp stream",
)


def is_transport_failure(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether an upstream UNAVAILABLE was made by the transport, not sent by the driver."""
    if code != grpc.StatusCode.UNAVAILABLE or not details:
        return False
    lowered = details.lower()
    return any(text in lowered for text in _TRANSPORT_FAILURES)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception raised while handling a call to the status the client gets."""
    if isinstance(exc, RouterError):
        return exc.code, f"spark-router: {exc}"
    log.error("unexpected error while handling a call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "spark-router: internal error (see the router log)"


def status_of(exc: BaseException, context: Any) -> tuple[grpc.StatusCode, str | None]:
    """The status a call ended with when `exc` left its handler (an abort, a cancel, a bug)."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED, None
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code, context.details()
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status, context.details()
    return grpc.StatusCode.UNKNOWN, None
