"""Within quota: sessions, running operations and calls per second, per user and per pool.

Limits (`quotas:` in the policy file, parsed by `QuotaSpec.parse`; every limit optional,
absent = unlimited):

    quotas:
      default: {sessions: 10, running: 4, calls_per_second: 100, burst: 200}
      users:  {alice: {sessions: 3}}
      groups: {analytics: {running: 2}}
      pools:  {etl: {calls_per_second: 500, burst: 1000}}   # the pool's total, all users

Rules (`Quotas.for_user`, `Quotas.for_pool`, pure and cached per (user, groups)):
1. field by field, a user's own override wins; else the largest value any of their groups
   sets; else the default; nothing set anywhere: unlimited;
2. `calls_per_second` and `burst` go together, from the level (user, group, default) that
   sets the rate; a burst left out there is the rate (at least 1); a `burst` without a rate
   at its level is an error. (So a user given a lower rate never keeps the default's
   larger burst.) Of several groups, the one with the largest rate (then burst) wins;
3. a pool's limit is the total of all its users' calls, on top of each user's own;
4. `sessions` and `running` may be 0 (nothing allowed); a rate must be > 0.

Refusal: `QuotaExceeded` (RESOURCE_EXHAUSTED, which pyspark does not retry) whose message
names the limit, its value, the current count and the setting to raise; `retry_after`
(seconds, for rate limits) is sent by dataplane/proxy.py as the trailing metadata
"retry-after", so a client may wait that long.

Cross-replica accounting (`QuotaGate`; N = replicas sharing the registry, as counted at the
last slot sync; pure local parts: `TokenLeases`, `SlotLeases`, `share`):

- Sessions per user: checked only when a NEW session is pinned (a path that already talks
  to the registry), never on a known session's call: `quota_session_acquire` counts the
  session key atomically in Redis; a key counts while its pin lives, so ReleaseSession
  (`release_session`, and the pin's release) frees the slot at once and an expired pin
  frees it when it expires. Exact while the registry answers: never over the limit.
  A key acquired whose pin never gets bound counts for SESSION_RESERVE_SECONDS. Sessions
  opened while the user had no session limit are not counted.
- Running operations per user (ExecutePlan streams open): a leased semaphore. A replica
  leases slots from Redis one at a time (`quota_slots_acquire`, atomic: the slots leased
  to live replicas never pass the limit) and reuses them locally, with no round trip,
  while they are in use or idle; a slot idle for `idle_seconds` goes back at the next
  `sync` (every `sync_seconds`). Leases live `slot_lease_seconds` (S) after a replica's
  last renewal, renewed by `sync` every S/3: a dead replica's slots stay taken for at most
  S seconds (under-admission, never over). A replica finding the user at the limit while
  slots are idle on other replicas waits up to `slot_wait_seconds` for them to come back
  before refusing.
- Calls per second per user and per pool: leased token buckets. The bucket (rate r, burst
  b) lives in Redis and is refilled by Redis's clock; a replica leases up to
  cap = max(1, min(ceil(r * L), floor(b / N))) tokens at a time (L = `lease_seconds`),
  sized to its own recent demand, spends them locally with no round trip, and asks
  again only when they are gone (after a grant short of what it asked, only once its
  share of a refill is there: N*cap/r seconds later, at most b/r). Tokens it leased
  lapse unused after `token_hold_seconds` and are never handed back.
  Accuracy: calls admitted by all replicas in any window of T seconds
      <= r*T + b + sum of the replicas' caps  <=  r*T + b + N*ceil(r*L),
  and <= r*T + 2b once every replica has synced (then the caps sum to at most b). The
  long-run rate never exceeds r: the excess over one exact bucket is a fixed number of
  calls (tokens leased before the window), not a rate, spent within `token_hold_seconds`
  of their lease. Example: r=50, b=50, N=2, T=10 s: at most 600 calls (650 before the
  replicas know of each other).
- Registry down (`RegistryUnavailable` from any quota operation): each replica enforces
  `share(limit, N)` = ceil(limit / N) of every limit on its own (a local exact bucket of
  rate r/N, burst share(b, N); a local count of running operations and of sessions opened
  during the outage) until a `sync` reaches the registry again. Over an outage the cluster
  admits at most N*share of each limit: for rates r*T + N*share(b, N) (about r*T + b),
  plus the tokens leased before the outage (at most the caps); for sessions and
  operations, that many new ones on top of those counted before (a user may reach about
  twice a limit during an outage). Sessions opened during the outage are counted in the
  registry once it is back (even past the limit). Entering and leaving this mode logs one
  line each and calls `on_degraded(True/False)` (the quota degraded gauge).

Registry cost: a known session's call costs no round trip while its replica holds tokens:
about 1/cap round trips per call for a busy bucket (a lease is one EVALSHA; INFO
commandstats counts 4 commands with TIME, GET and SET), a sequence of operations reusing
leased slots costs none, a new session one EVALSHA. With no quota configured the gate does
nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from registry.base import Registry, RegistryUnavailable
from registry.models import split_key
from router.errors import RouterError

__all__ = [
    "LIMITS",
    "RETRY_AFTER",
    "SESSION_RESERVE_SECONDS",
    "Limit",
    "Operation",
    "PoolLimits",
    "QuotaError",
    "QuotaExceeded",
    "QuotaGate",
    "QuotaSpec",
    "Quotas",
    "Rate",
    "SlotLeases",
    "TokenBucket",
    "TokenLeases",
    "UserLimits",
    "share",
]

log = logging.getLogger(__name__)

RETRY_AFTER = "retry-after"
"""The trailing metadata of a rate refusal: seconds (3 decimals) the client may wait."""

SESSION_RESERVE_SECONDS = 60.0
"""How long a session counts after its acquire before its pin exists (a failed placement)."""

LIMITS = ("sessions", "running", "calls_per_second", "pool_calls_per_second")
"""Every `QuotaExceeded.limit` (the label of the refusals metric)."""

_CACHE_SIZE = 4096  # resolved limits kept per (user, groups); cleared whole when full
_FORCE = 2**31 - 1  # a limit no count reaches: record a session whatever the count


# --- the policy file's `quotas:` ------------------------------------------------------------


class QuotaError(ValueError):
    """The `quotas:` section is not valid (the message says where and why)."""


class _LimitsSpec(BaseModel):
    """The limits of one level: the default, a user or a group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sessions: int | None = Field(
        default=None, ge=0, strict=True, description="sessions open at once"
    )
    running: int | None = Field(
        default=None,
        ge=0,
        strict=True,
        description="operations running at once (ExecutePlan streams)",
    )
    calls_per_second: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="calls per second (token bucket rate)"
    )
    burst: int | None = Field(
        default=None, ge=1, strict=True, description="calls at once above the rate"
    )

    @model_validator(mode="after")
    def _burst_needs_a_rate(self) -> _LimitsSpec:
        if self.burst is not None and self.calls_per_second is None:
            raise ValueError("burst needs calls_per_second at the same level")
        return self


class _PoolSpec(BaseModel):
    """A pool's limits: the total of all its users' calls."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calls_per_second: float = Field(..., gt=0, allow_inf_nan=False)
    burst: int | None = Field(default=None, ge=1, strict=True)


class QuotaSpec(BaseModel):
    """The `quotas:` section of the policy file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: _LimitsSpec = _LimitsSpec()
    users: dict[str, _LimitsSpec] = Field(default_factory=dict)
    groups: dict[str, _LimitsSpec] = Field(default_factory=dict)
    pools: dict[str, _PoolSpec] = Field(default_factory=dict)

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> Quotas:
        """The quotas in `data` (the `quotas:` mapping; None: no quotas); QuotaError if bad."""
        try:
            spec = cls.model_validate(data or {})
        except ValidationError as exc:
            raise QuotaError(_explain(exc)) from None
        return Quotas(spec)


def _explain(exc: ValidationError) -> str:
    """A pydantic error as one line per problem, its place in the file first."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"] if part != "[key]")
        lines.append(f"quotas{'.' + where if where else ''}: {error['msg']}")
    return "; ".join(lines)


# --- resolved limits ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """A count limit and the setting that sets it (named in refusals)."""

    value: int
    source: str  # e.g. "quotas.users.alice.sessions"


@dataclass(frozen=True, slots=True)
class Rate:
    """A calls-per-second limit: a token bucket."""

    per_second: float
    burst: int
    source: str  # e.g. "quotas.default.calls_per_second"


@dataclass(frozen=True, slots=True)
class UserLimits:
    """One caller's limits (None: unlimited)."""

    user: str
    sessions: Limit | None
    running: Limit | None
    rate: Rate | None
    bucket: str  # the name of the user's token bucket


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """One pool's limit on all its users' calls together (None: unlimited)."""

    pool: str
    rate: Rate | None
    bucket: str


def _rate(spec: _LimitsSpec | _PoolSpec, source: str) -> Rate | None:
    if spec.calls_per_second is None:
        return None
    burst = spec.burst if spec.burst is not None else max(1, math.ceil(spec.calls_per_second))
    return Rate(spec.calls_per_second, burst, source)


@dataclass(frozen=True)
class Quotas:
    """Parsed quotas: a snapshot that decisions read and a policy reload replaces whole."""

    spec: QuotaSpec = field(default_factory=QuotaSpec)
    _users: dict[tuple[str, frozenset[str]], UserLimits] = field(
        default_factory=dict, compare=False, repr=False
    )
    _pools: dict[str, PoolLimits] = field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def active(self) -> bool:
        """Whether any limit is set anywhere (none: the gate does nothing at all)."""
        spec = self.spec
        levels = [spec.default, *spec.users.values(), *spec.groups.values()]
        return bool(spec.pools) or any(
            s.sessions is not None or s.running is not None or s.calls_per_second is not None
            for s in levels
        )

    @functools.cached_property
    def has_rates(self) -> bool:
        """Whether any calls-per-second limit is set (else calls are never counted)."""
        spec = self.spec
        levels = [spec.default, *spec.users.values(), *spec.groups.values()]
        return bool(spec.pools) or any(s.calls_per_second is not None for s in levels)

    def for_user(self, user: str, groups: frozenset[str]) -> UserLimits:
        """The caller's limits (rules 1 and 2 of the module docstring); cached."""
        key = (user, groups)
        found = self._users.get(key)
        if found is None:
            if len(self._users) >= _CACHE_SIZE:
                self._users.clear()
            found = self._users[key] = self._resolve(user, groups)
        return found

    def for_pool(self, pool: str) -> PoolLimits:
        """The pool's limit on all its users' calls together; cached."""
        found = self._pools.get(pool)
        if found is None:
            if len(self._pools) >= _CACHE_SIZE:
                self._pools.clear()
            spec = self.spec.pools.get(pool)
            rate = None if spec is None else _rate(spec, f"quotas.pools.{pool}.calls_per_second")
            found = self._pools[pool] = PoolLimits(pool, rate, f"pool:{pool}")
        return found

    def _resolve(self, user: str, groups: frozenset[str]) -> UserLimits:
        spec = self.spec
        own = spec.users.get(user)
        theirs = [(g, spec.groups[g]) for g in sorted(groups) if g in spec.groups]

        def count(name: str) -> Limit | None:
            if own is not None and getattr(own, name) is not None:
                return Limit(getattr(own, name), f"quotas.users.{user}.{name}")
            best: Limit | None = None
            for group, limits in theirs:
                value = getattr(limits, name)
                if value is not None and (best is None or value > best.value):
                    best = Limit(value, f"quotas.groups.{group}.{name}")
            if best is not None:
                return best
            value = getattr(spec.default, name)
            return None if value is None else Limit(value, f"quotas.default.{name}")

        rate: Rate | None = None
        if own is not None and own.calls_per_second is not None:
            rate = _rate(own, f"quotas.users.{user}.calls_per_second")
        else:
            for group, limits in theirs:
                found = _rate(limits, f"quotas.groups.{group}.calls_per_second")
                if found is not None and (
                    rate is None or (found.per_second, found.burst) > (rate.per_second, rate.burst)
                ):
                    rate = found
            if rate is None:
                rate = _rate(spec.default, "quotas.default.calls_per_second")
        return UserLimits(user, count("sessions"), count("running"), rate, f"user:{user}")


# --- refusals -------------------------------------------------------------------------------


class QuotaExceeded(RouterError):
    """A quota was reached; the message names the limit, its value and the current count.

    RESOURCE_EXHAUSTED, which pyspark does not retry. `retry_after` (seconds), when set,
    goes to the client as the trailing metadata "retry-after" (dataplane/proxy.py).
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        message: str,
        *,
        limit: str,
        value: float,
        current: int,
        retry_after: float | None = None,
    ) -> None:
        """`limit`: sessions, running, calls_per_second or pool_calls_per_second (a label)."""
        super().__init__(message)
        self.limit = limit
        self.value = value
        self.current = current
        self.retry_after = retry_after

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """("retry-after", seconds) when the client may try again after a wait: rounded up
        to the millisecond, so a wait is never sent as 0."""
        if self.retry_after is None:
            return ()
        seconds = max(0.001, math.ceil(self.retry_after * 1000) / 1000)
        return ((RETRY_AFTER, f"{seconds:.3f}"),)


_OUTAGE = " (this replica's share of it while the registry is unreachable)"


def _who(user: str) -> str:
    return f"user {user!r}" if user else "the anonymous user"


def _sessions_exceeded(user: str, limit: Limit, value: int, current: int) -> QuotaExceeded:
    note = _OUTAGE if value != limit.value else ""
    return QuotaExceeded(
        f"{_who(user)} is at the limit of {value} sessions{note} ({current} open); release "
        f"one (spark.stop()) or ask an operator to raise {limit.source}",
        limit="sessions",
        value=value,
        current=current,
    )


def _running_exceeded(user: str, limit: Limit, value: int, current: int) -> QuotaExceeded:
    note = _OUTAGE if value != limit.value else ""
    return QuotaExceeded(
        f"{_who(user)} is at the limit of {value} running operations{note} ({current} "
        f"running); wait for one to finish or interrupt one, or ask an operator to raise "
        f"{limit.source}",
        limit="running",
        value=value,
        current=current,
    )


def _rate_exceeded(
    whose: str, rate: Rate, seen: int, retry_after: float, degraded: bool, pool: bool
) -> QuotaExceeded:
    note = _OUTAGE if degraded else ""
    subject = f"pool {whose!r} is over its limit" if pool else f"{_who(whose)} is over the limit"
    scope = " for all its users" if pool else ""
    return QuotaExceeded(
        f"{subject} of {rate.per_second:g} calls per second{scope} (burst {rate.burst}){note}; "
        f"{seen} calls in the last second on this replica; retry after {retry_after:.2f}s, "
        f"or ask an operator to raise {rate.source}",
        limit="pool_calls_per_second" if pool else "calls_per_second",
        value=rate.per_second,
        current=seen,
        retry_after=retry_after,
    )


# --- pure local accounting ------------------------------------------------------------------


def share(limit: int, replicas: int) -> int:
    """One replica's share of a limit while the registry is down: ceil(limit / replicas).

    At least 1 for a limit of at least 1 (so every replica can still serve the user); a
    limit of 0 stays 0.
    """
    if limit <= 0:
        return 0
    return max(1, math.ceil(limit / max(1, replicas)))


@dataclass(slots=True)
class TokenBucket:
    """An exact token bucket on one clock: the arithmetic of the stores' buckets, in-process.

    Used as the replica's own bucket while the registry is down, and by tests as the
    shared bucket that leases are checked against.
    """

    tokens: float | None = None  # None: full (never used)
    last: float = 0.0

    def lease(self, now: float, rate: float, burst: int, want: int) -> tuple[int, float]:
        """(tokens granted, up to `want`; with none granted the seconds until one is there)."""
        tokens = float(burst) if self.tokens is None else self.tokens
        if self.tokens is not None and now > self.last:
            tokens += (now - self.last) * rate
        tokens = min(tokens, float(burst))
        granted = max(0, min(want, math.floor(tokens)))
        self.tokens, self.last = tokens - granted, max(now, self.last)
        return granted, 0.0 if granted else (1.0 - self.tokens) / rate


@dataclass(slots=True)
class _Lease:
    """One bucket as one replica holds it."""

    tokens: int = 0
    lapses: float = -math.inf  # when unused tokens lapse
    not_before: float = -math.inf  # no new ask before then (after a short grant)
    demand: int = 0  # calls that wanted a token since the last ask
    asked_at: float | None = None
    window: float = -math.inf  # the start of the current one-second window
    seen: int = 0  # calls in the current window
    seen_before: int = 0  # calls in the window before


class TokenLeases:
    """Tokens this replica leased from shared buckets: taken locally, asked for in batches.

    Pure (no I/O, the clock is passed in): `take_all` spends local tokens; when one runs
    out, `wait` says whether the replica may ask the shared bucket now, `want` how many to
    ask for and `granted` records the answer. Caps and bounds: the module docstring.
    """

    def __init__(self, lease_seconds: float = 1.0, hold_seconds: float = 10.0) -> None:
        if not lease_seconds > 0 or not hold_seconds > 0:
            raise ValueError("lease_seconds and hold_seconds must be > 0")
        self.lease_seconds = lease_seconds
        self.hold_seconds = hold_seconds
        self._leases: dict[str, _Lease] = {}

    def cap(self, rate: float, burst: int, replicas: int) -> int:
        """The most tokens one lease may hold: max(1, min(ceil(rate * L), burst // N))."""
        return max(1, min(math.ceil(rate * self.lease_seconds), burst // max(1, replicas)))

    def take(self, bucket: str, now: float) -> bool:
        """Spend one local token of `bucket` (counting the call); False if there is none."""
        return self.take_all((bucket,), now) is None

    def take_all(self, buckets: tuple[str, ...], now: float, count: bool = True) -> str | None:
        """Spend one local token of every bucket, or of none: the first bucket short, or None.

        With `count`, the call is counted in each bucket's demand (once per call).
        """
        leases = self._leases
        short: str | None = None
        for bucket in buckets:
            lease = leases.get(bucket)
            if lease is None:
                lease = leases[bucket] = _Lease()
            if count:
                lease.demand += 1
                if now - lease.window >= 1.0:
                    lease.seen_before = lease.seen if now - lease.window < 2.0 else 0
                    lease.window, lease.seen = now, 0
                lease.seen += 1
            if short is None and (lease.tokens <= 0 or now >= lease.lapses):
                short = bucket
        if short is not None:
            return short
        for bucket in buckets:
            leases[bucket].tokens -= 1
        return None

    def wait(self, bucket: str, now: float) -> float:
        """Seconds before this replica may ask the shared bucket again (0: now)."""
        lease = self._leases.get(bucket)
        return 0.0 if lease is None else max(0.0, lease.not_before - now)

    def want(self, bucket: str, rate: float, burst: int, now: float, replicas: int = 1) -> int:
        """How many tokens to ask for: the recent demand over the hold time, within the cap."""
        cap = self.cap(rate, burst, replicas)
        lease = self._leases.get(bucket)
        if lease is None:
            return 1
        elapsed = self.lease_seconds if lease.asked_at is None else now - lease.asked_at
        demand_per_second = lease.demand / max(elapsed, self.lease_seconds)
        return max(1, min(cap, math.ceil(demand_per_second * self.hold_seconds)))

    def granted(
        self,
        bucket: str,
        granted: int,
        wanted: int,
        retry_after: float,
        now: float,
        rate: float,
        burst: int,
        replicas: int = 1,
    ) -> None:
        """Record the shared bucket's answer to an ask of `wanted` tokens."""
        lease = self._leases.get(bucket)
        if lease is None:
            lease = self._leases[bucket] = _Lease()
        if now >= lease.lapses:
            lease.tokens = 0
        lease.tokens += granted
        lease.lapses = now + self.hold_seconds
        lease.demand, lease.asked_at = 0, now
        if granted < wanted:  # the bucket ran dry: wait for this replica's share of a refill
            refill = max(1, replicas) * self.cap(rate, burst, replicas) / rate
            lease.not_before = now + max(retry_after, refill)

    def seen(self, bucket: str, now: float) -> int:
        """Calls that wanted `bucket` in about the last second here (for refusal messages)."""
        lease = self._leases.get(bucket)
        if lease is None or now - lease.window >= 2.0:
            return 0
        return lease.seen if now - lease.window >= 1.0 else max(lease.seen, lease.seen_before)

    def held(self, bucket: str, now: float) -> int:
        """Tokens of `bucket` this replica holds now."""
        lease = self._leases.get(bucket)
        return 0 if lease is None or now >= lease.lapses else lease.tokens

    def holdings(self, now: float) -> dict[str, tuple[int, int]]:
        """Per bucket known here: (tokens held now, calls that wanted one in ~the last second)."""
        return {b: (self.held(b, now), self.seen(b, now)) for b in self._leases}

    def prune(self, now: float) -> None:
        """Forget buckets whose tokens lapsed and that saw no call for a while."""
        self._leases = {
            b: lease
            for b, lease in self._leases.items()
            if now < lease.lapses or now < lease.not_before or now - lease.window < 2.0
        }

    def __len__(self) -> int:
        return len(self._leases)


class SlotLeases:
    """Operation slots this replica leased, per user: in use (busy) or idle, locally.

    Pure (the clock is passed in). A slot is leased from the registry (`add`, already in
    use), reused locally (`try_local`), freed locally (`release`) and, idle for
    `idle_seconds` since the user's last release, handed back (`idle` says how many,
    `returned` records it).
    """

    def __init__(self, idle_seconds: float = 1.0) -> None:
        self.idle_seconds = idle_seconds
        self._held: dict[str, int] = {}
        self._busy: dict[str, int] = {}
        self._freed_at: dict[str, float] = {}

    def try_local(self, user: str, now: float, limit: int | None = None) -> bool:
        """Take an idle leased slot of `user` (below `limit` in use): whether there was one."""
        busy = self._busy.get(user, 0)
        if busy >= self._held.get(user, 0) or (limit is not None and busy >= limit):
            return False
        self._busy[user] = busy + 1
        return True

    def add(self, user: str, now: float) -> None:
        """A slot newly leased (or granted locally during an outage), in use at once."""
        self._held[user] = self._held.get(user, 0) + 1
        self._busy[user] = self._busy.get(user, 0) + 1

    def release(self, user: str, now: float) -> None:
        """An operation of `user` ended: its slot is idle (still leased)."""
        busy = self._busy.get(user, 0)
        if busy <= 0:
            return
        if busy == 1:
            del self._busy[user]
        else:
            self._busy[user] = busy - 1
        self._freed_at[user] = now

    def idle(self, now: float) -> dict[str, int]:
        """Slots to hand back: per user, those idle since a release `idle_seconds` ago."""
        found = {}
        for user, held in self._held.items():
            spare = held - self._busy.get(user, 0)
            if spare > 0 and now - self._freed_at.get(user, -math.inf) >= self.idle_seconds:
                found[user] = spare
        return found

    def returned(self, user: str, count: int) -> None:
        """`count` idle slots of `user` were handed back."""
        held = self._held.get(user, 0) - count
        held = max(held, self._busy.get(user, 0))
        if held > 0:
            self._held[user] = held
        else:
            self._held.pop(user, None)
            self._freed_at.pop(user, None)

    def busy(self, user: str) -> int:
        """Slots of `user` in use here."""
        return self._busy.get(user, 0)

    def held(self) -> dict[str, int]:
        """Slots leased here, per user (in use or idle)."""
        return dict(self._held)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """Per user (held, busy): what a sync writes."""
        return {u: (h, self._busy.get(u, 0)) for u, h in self._held.items()}


# --- the gate: the I/O around the pure parts ------------------------------------------------


class Operation:
    """One counted operation (an open ExecutePlan stream): `end()` frees its slot, once."""

    __slots__ = ("_gate", "_user")

    def __init__(self, gate: QuotaGate | None, user: str) -> None:
        self._gate = gate
        self._user = user

    def end(self) -> None:
        """The stream ended (any way): free the slot. Idempotent."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._slots.release(self._user, gate._clock())


_UNCOUNTED = Operation(None, "")


class QuotaGate:
    """Enforces the quotas of a `Quotas` snapshot across every replica of one registry.

    `quotas` is swapped whole on a policy reload. The replica calls `sync` every
    `sync_seconds` (and once at start), `close` on shutdown.
    """

    def __init__(
        self,
        registry: Registry,
        quotas: Quotas | None = None,
        *,
        replica: str | None = None,
        lease_seconds: float = 1.0,
        token_hold_seconds: float = 10.0,
        slot_lease_seconds: float = 30.0,
        sync_seconds: float = 1.0,
        idle_seconds: float = 1.0,
        slot_wait_seconds: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
        on_degraded: Callable[[bool], None] | None = None,
    ) -> None:
        self._registry = registry
        self.quotas = quotas or Quotas()
        self.replica = replica or uuid.uuid4().hex
        self._clock = clock
        self._on_degraded = on_degraded
        self._tokens = TokenLeases(lease_seconds, token_hold_seconds)
        self._slots = SlotLeases(idle_seconds)
        self._slot_lease = slot_lease_seconds
        self._sync_seconds = sync_seconds
        self._slot_wait = slot_wait_seconds
        self.replicas = 1  # live replicas at the last sync
        self.degraded = False
        self._next_renewal = -math.inf
        self._asking: dict[str, asyncio.Future[None]] = {}
        self._acquiring: Counter[str] = Counter()
        self._syncing: asyncio.Event | None = None
        self._dirty: set[str] = set()  # users whose slots the registry may count wrong
        self._fallback: dict[str, TokenBucket] = {}
        self._outage_sessions: dict[str, set[str]] = {}

    # --- calls per second -----------------------------------------------------------------

    async def admit_call(self, user: str, groups: frozenset[str], pool: str | None) -> None:
        """Count one call of `user` (in `pool`) against the rate limits; QuotaExceeded if over."""
        quotas = self.quotas
        if not quotas.has_rates:
            return
        limits = quotas.for_user(user, groups)
        pooled = None if pool is None else quotas.for_pool(pool)
        if pooled is None or pooled.rate is None:
            if limits.rate is None:
                return
            buckets: tuple[str, ...] = (limits.bucket,)
        elif limits.rate is None:
            buckets = (pooled.bucket,)
        else:
            buckets = (limits.bucket, pooled.bucket)
        now = self._clock()
        if self._tokens.take_all(buckets, now) is None:
            return  # the steady state: local tokens, no round trip
        await self._admit_slow(buckets, limits, pooled, now)

    async def _admit_slow(
        self, buckets: tuple[str, ...], limits: UserLimits, pooled: PoolLimits | None, now: float
    ) -> None:
        for _ in range(3):
            short = self._tokens.take_all(buckets, now, count=False)
            if short is None:
                return
            rate, whose, is_pool = self._rate_of(short, limits, pooled)
            wait = self._tokens.wait(short, now)
            if wait > 0:
                seen = self._tokens.seen(short, now)
                raise _rate_exceeded(whose, rate, seen, wait, False, is_pool)
            if self.degraded:
                self._admit_locally(buckets, limits, pooled, now)
                return
            await self._lease(short, rate)
            now = self._clock()
        # Other calls here spent every token leased meanwhile: the bucket is that busy.
        short = self._tokens.take_all(buckets, now, count=False)
        if short is None:
            return
        rate, whose, is_pool = self._rate_of(short, limits, pooled)
        raise _rate_exceeded(whose, rate, self._tokens.seen(short, now), 0.05, False, is_pool)

    @staticmethod
    def _rate_of(
        bucket: str, limits: UserLimits, pooled: PoolLimits | None
    ) -> tuple[Rate, str, bool]:
        if bucket == limits.bucket and limits.rate is not None:
            return limits.rate, limits.user, False
        assert pooled is not None and pooled.rate is not None
        return pooled.rate, pooled.pool, True

    async def _lease(self, bucket: str, rate: Rate) -> None:
        """Ask the shared bucket for tokens, one ask per bucket at a time."""
        pending = self._asking.get(bucket)
        if pending is not None:
            await asyncio.shield(pending)  # a cancelled waiter must not cancel the ask
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._asking[bucket] = done
        try:
            now = self._clock()
            want = self._tokens.want(bucket, rate.per_second, rate.burst, now, self.replicas)
            grant = await self._registry.quota_tokens_lease(
                bucket, rate.per_second, rate.burst, want
            )
            self._ok()
            self._tokens.granted(
                bucket,
                grant.granted,
                want,
                grant.retry_after,
                self._clock(),
                rate.per_second,
                rate.burst,
                self.replicas,
            )
        except RegistryUnavailable as exc:
            self._down(exc)
        finally:
            del self._asking[bucket]
            if not done.done():
                done.set_result(None)

    def _admit_locally(
        self, buckets: tuple[str, ...], limits: UserLimits, pooled: PoolLimits | None, now: float
    ) -> None:
        """Registry down: leased tokens first, else this replica's share of each bucket."""
        local: list[tuple[TokenBucket, float, int]] = []
        for bucket in buckets:
            if self._tokens.held(bucket, now) > 0:
                continue
            rate, whose, is_pool = self._rate_of(bucket, limits, pooled)
            per_second = rate.per_second / max(1, self.replicas)
            burst = share(rate.burst, self.replicas)
            fallback = self._fallback.setdefault(bucket, TokenBucket())
            probe = TokenBucket(fallback.tokens, fallback.last)
            got, retry_after = probe.lease(now, per_second, burst, 1)
            if not got:
                seen = self._tokens.seen(bucket, now)
                raise _rate_exceeded(whose, rate, seen, retry_after, True, is_pool)
            local.append((fallback, per_second, burst))
        for bucket in buckets:  # every bucket has a token now: spend them all
            if self._tokens.held(bucket, now) > 0:
                self._tokens.take_all((bucket,), now, count=False)
        for fallback, per_second, burst in local:
            fallback.lease(now, per_second, burst, 1)

    # --- running operations ---------------------------------------------------------------

    async def start_operation(self, user: str, groups: frozenset[str]) -> Operation:
        """Count an operation (an ExecutePlan stream) of `user`: `end()` it when the stream
        ends. QuotaExceeded if the user is at their limit of running operations."""
        limit = self.quotas.for_user(user, groups).running
        if limit is None:
            return _UNCOUNTED
        deadline = self._clock() + self._slot_wait
        while True:
            now = self._clock()
            if self._slots.try_local(user, now, limit.value):
                return Operation(self, user)
            if self.degraded:
                return self._start_locally(user, limit, now)
            while self._syncing is not None:  # its snapshot must not undo this grant
                await self._syncing.wait()
            self._acquiring[user] += 1
            try:
                grant = await self._registry.quota_slots_acquire(
                    user, self.replica, limit.value, self._slot_lease
                )
                self._ok()
            except RegistryUnavailable as exc:
                self._dirty.add(user)  # it may have been granted: the next sync says
                self._down(exc)
                continue
            finally:
                self._acquiring[user] -= 1
                if not self._acquiring[user]:
                    del self._acquiring[user]
            if grant.granted:
                self._slots.add(user, self._clock())
                return Operation(self, user)
            if grant.held <= grant.busy or self._clock() >= deadline:
                raise _running_exceeded(user, limit, limit.value, grant.held)
            # Idle slots on other replicas go back within idle + sync seconds: wait for one.
            await asyncio.sleep(min(self._sync_seconds, max(0.0, deadline - self._clock())))

    def _start_locally(self, user: str, limit: Limit, now: float) -> Operation:
        allowed = share(limit.value, self.replicas)
        busy = self._slots.busy(user)
        if busy >= allowed:
            raise _running_exceeded(user, limit, allowed, busy)
        self._slots.add(user, now)  # written to the registry by the sync that finds it back
        self._dirty.add(user)
        return Operation(self, user)

    # --- sessions -------------------------------------------------------------------------

    async def admit_session(self, key: str, groups: frozenset[str]) -> None:
        """Count a NEW session (its registry key; its user is the key's) before its pin is
        bound; QuotaExceeded if the user is at their limit of sessions."""
        user = split_key(key)[0] or ""
        limit = self.quotas.for_user(user, groups).sessions
        if limit is None:
            return
        if not self.degraded:
            try:
                grant = await self._registry.quota_session_acquire(
                    user, key, limit.value, SESSION_RESERVE_SECONDS
                )
                self._ok()
            except RegistryUnavailable as exc:
                self._down(exc)
            else:
                if not grant.granted:
                    raise _sessions_exceeded(user, limit, limit.value, grant.current)
                return
        opened = self._outage_sessions.setdefault(user, set())
        allowed = share(limit.value, self.replicas)
        if key not in opened and len(opened) >= allowed:
            raise _sessions_exceeded(user, limit, allowed, len(opened))
        opened.add(key)

    async def release_session(self, key: str) -> None:
        """A session ended (ReleaseSession): stop counting it at once."""
        user = split_key(key)[0] or ""
        opened = self._outage_sessions.get(user)
        if opened is not None:
            opened.discard(key)
        if self.degraded or not self.quotas.active:
            return  # an outage: its pin expires, and with it the count
        try:
            await self._registry.quota_session_release(user, key)
            self._ok()
        except RegistryUnavailable as exc:
            self._down(exc)

    # --- periodic work --------------------------------------------------------------------

    async def sync(self) -> None:
        """Hand back idle slots, renew leases (every slot lease / 3), learn how many replicas
        share the registry; after an outage, record the sessions opened meanwhile."""
        if self._syncing is not None:
            return  # one sync at a time: the one in flight writes what is held
        now = self._clock()
        idle = {u: n for u, n in self._slots.idle(now).items() if u not in self._acquiring}
        if not (idle or self._dirty or self.degraded or now >= self._next_renewal):
            return
        if not (self.quotas.active or self._slots.held() or self._dirty):
            return
        for user, count in idle.items():
            self._slots.returned(user, count)
        self._dirty.update(idle)
        held = self._slots.snapshot()
        snapshot = {
            u: held.get(u, (0, 0)) for u in {*held, *self._dirty} if u not in self._acquiring
        }
        self._syncing = syncing = asyncio.Event()
        try:
            replicas = await self._registry.quota_slots_sync(
                self.replica, snapshot, self._slot_lease
            )
        except RegistryUnavailable as exc:
            self._down(exc)
            return
        finally:
            self._syncing = None
            syncing.set()
        self._dirty.difference_update(snapshot)
        self.replicas = max(1, replicas)
        self._next_renewal = now + self._slot_lease / 3
        self._tokens.prune(now)
        self._ok()
        await self._record_outage_sessions()

    async def _record_outage_sessions(self) -> None:
        """Count the sessions opened during an outage, whatever the count now."""
        while self._outage_sessions and not self.degraded:
            user, opened = next(iter(self._outage_sessions.items()))
            try:
                for key in list(opened):
                    await self._registry.quota_session_acquire(
                        user, key, _FORCE, SESSION_RESERVE_SECONDS
                    )
                    opened.discard(key)
            except RegistryUnavailable as exc:
                self._down(exc)
                return
            del self._outage_sessions[user]

    async def close(self) -> None:
        """Hand every slot back (best effort): the other replicas may use them at once."""
        snapshot = {u: (0, 0) for u in {*self._slots.held(), *self._dirty}}
        if not snapshot:
            return
        with contextlib.suppress(RegistryUnavailable):  # else the leases expire by themselves
            await self._registry.quota_slots_sync(self.replica, snapshot, self._slot_lease)

    # --- what operators see --------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """What this replica counts now (the admin API): its own view, not the cluster's.

        Per user: operations running here, the slots leased here (running or idle), the
        sessions opened here during a registry outage. Per bucket (`user:NAME`,
        `pool:NAME`): tokens leased here and not spent yet, and the calls that wanted one
        in about the last second here. Session counts live in the registry only.
        """
        now = self._clock()
        users: dict[str, dict[str, Any]] = {}
        for user, (held, busy) in self._slots.snapshot().items():
            users[user] = {"user": user, "running": busy, "slots_leased": held}
        for user, opened in self._outage_sessions.items():
            found = users.setdefault(user, {"user": user, "running": 0, "slots_leased": 0})
            found["sessions_opened_in_outage"] = len(opened)
        buckets = []
        for bucket, (held, seen) in sorted(self._tokens.holdings(now).items()):
            kind, _, name = bucket.partition(":")
            buckets.append(
                {"kind": kind, "name": name, "tokens_held": held, "calls_last_second": seen}
            )
        return {
            "replica": self.replica,
            "replicas": self.replicas,
            "degraded": self.degraded,
            "active": self.quotas.active,
            "users": [users[u] for u in sorted(users)],
            "buckets": buckets,
        }

    # --- degraded mode --------------------------------------------------------------------

    def _down(self, exc: RegistryUnavailable) -> None:
        if self.degraded:
            return
        self.degraded = True
        log.warning(
            "registry unavailable (%s): quotas degraded: each limit is enforced here as "
            "this replica's share (1/%d) until the registry is back",
            exc,
            self.replicas,
        )
        if self._on_degraded is not None:
            self._on_degraded(True)

    def _ok(self) -> None:
        if not self.degraded:
            return
        self.degraded = False
        self._fallback.clear()
        log.warning("registry is back: quotas are enforced across replicas again")
        if self._on_degraded is not None:
            self._on_degraded(False)
