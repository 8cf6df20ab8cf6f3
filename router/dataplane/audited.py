"""What the data plane puts on the record: the audit events (admit/audit.py) of its calls.

The proxy holds one `Audited` when the audit is on (audit_file or audit_stdout) and None
otherwise, so a replica without an audit pays nothing per call. Every method here builds an
event from what the call already knows and offers it to the log's queue: no I/O, no wait
(the log's writer thread does the writing). Plans are read (`audit.read_plan`, a bounded
walk of the bytes) only for ExecutePlan, once per call.
"""

from __future__ import annotations

import time

import grpc

from registry.models import Pin
from router.admit import audit
from router.admit.audit import AuditLog, PlanInfo
from router.admit.auth import Identity
from router.dataplane.protocol import RequestInfo

__all__ = ["Audited"]


class Audited:
    """The audit events of one replica's calls, offered to `log` (which must be enabled)."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self._redaction = log.settings.redaction

    def check(self) -> None:
        """Raise AuditUnavailable when a new call must be refused (audit_when_full: refuse)."""
        self.log.check()

    def denied(
        self,
        exc: BaseException,
        method: str,
        peer: str | None,
        info: RequestInfo | None = None,
        caller: Identity | None = None,
    ) -> None:
        """A call refused by authentication, policy, ownership, quota or budget; any other
        failure is not a denial and records nothing."""
        denial = audit.denial_of(exc)
        if denial is None:
            return
        kind, reason = denial
        code = getattr(exc, "code", grpc.StatusCode.UNKNOWN)
        # Only a user the router vouched for, or (auth off) the one the request claims: a
        # failed authentication names nobody, whatever user_id its request wrote.
        user = caller.user if caller is not None else None
        if user is None and kind != "authentication" and info is not None:
            user = info.user or None
        self.log.offer(
            audit.denied(
                kind,
                reason,
                user=user,
                status=code,
                message=str(exc),
                groups=caller.groups if caller is not None else (),
                session=info.session_id if info is not None else None,
                method=method,
                pool=info.pool if info is not None else None,
                peer=peer,
            )
        )

    def plan(self, request: bytes) -> PlanInfo:
        """What an ExecutePlan runs (kind and SQL), read from its request's bytes."""
        return audit.read_plan(request)

    def execution(
        self,
        info: RequestInfo,
        caller: Identity | None,
        pin: Pin,
        plan: PlanInfo,
        status: grpc.StatusCode | str,
        started: float,
        bytes_returned: int,
    ) -> None:
        """One ExecutePlan as it ended; `started` its time.perf_counter() at the start."""
        self.log.offer(
            audit.execution(
                user=info.user,
                groups=caller.groups if caller is not None else (),
                session=info.session_id,
                operation=info.operation_id,
                pool=pin.pool,
                driver=pin.driver,
                plan=plan,
                status=status,
                duration_ms=(time.perf_counter() - started) * 1000,
                bytes_returned=bytes_returned,
                redaction=self._redaction,
            )
        )

    def created(self, pin: Pin, groups: frozenset[str] = frozenset()) -> None:
        """A session pinned for the first time (a clone too)."""
        self.log.offer(
            audit.session_created(
                user=pin.owner or "",
                groups=groups,
                session=pin.session_id,
                pool=pin.pool,
                driver=pin.driver,
                redaction=self._redaction,
            )
        )

    def released(self, pin: Pin) -> None:
        """A session its client released."""
        self.log.offer(
            audit.session_released(
                user=pin.owner or "", session=pin.session_id, pool=pin.pool, driver=pin.driver
            )
        )

    def moved(self, old: Pin, new: Pin, reason: str) -> None:
        """A session moved from `old.driver` to `new.driver`, and why."""
        self.log.offer(
            audit.session_moved(
                user=old.owner or "",
                session=old.session_id,
                pool=old.pool,
                from_driver=old.driver,
                driver=new.driver,
                reason=reason,
            )
        )
