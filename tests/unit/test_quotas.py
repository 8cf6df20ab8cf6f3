"""Quotas (router/admit/quotas.py): resolution, refusals, local leases, bounds, the gate.

Everything runs on simulated clocks: leases against an exact in-process bucket for the
accuracy bounds, and the gate against MemoryRegistry (shared by two gates, as two replicas
would share Redis) with the clock advanced by hand. Nothing sleeps.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import grpc
import pytest

from registry.base import RegistryUnavailable
from registry.memory import MemoryRegistry
from registry.models import Pin, SessionGrant, SlotGrant, TokenGrant, session_key
from router.admit.quotas import (
    Limit,
    QuotaError,
    QuotaExceeded,
    QuotaGate,
    Quotas,
    QuotaSpec,
    Rate,
    SlotLeases,
    TokenBucket,
    TokenLeases,
    share,
)
from router.errors import to_status

SAMPLE = {
    "default": {"sessions": 10, "running": 4, "calls_per_second": 100, "burst": 200},
    "users": {"alice": {"sessions": 3}, "carol": {"calls_per_second": 10}},
    "groups": {
        "analytics": {"running": 2, "sessions": 5},
        "science": {"running": 6, "calls_per_second": 300},
        "ops": {"calls_per_second": 300, "burst": 900},
        "empty": {},
    },
    "pools": {"etl": {"calls_per_second": 500, "burst": 1000}},
}
NOBODY: frozenset[str] = frozenset()


def groups(*names: str) -> frozenset[str]:
    return frozenset(names)


@pytest.fixture
def quotas() -> Quotas:
    return QuotaSpec.parse(SAMPLE)


# --- resolution -----------------------------------------------------------------------------


def test_a_users_own_override_wins_field_by_field(quotas: Quotas) -> None:
    limits = quotas.for_user("alice", groups("analytics"))
    assert limits.sessions == Limit(3, "quotas.users.alice.sessions")  # own, below the group's
    assert limits.running == Limit(2, "quotas.groups.analytics.running")  # not set by alice
    assert limits.rate == Rate(100.0, 200, "quotas.default.calls_per_second")


def test_the_most_generous_group_wins_over_the_default(quotas: Quotas) -> None:
    limits = quotas.for_user("bob", groups("analytics", "science", "empty"))
    assert limits.running == Limit(6, "quotas.groups.science.running")
    assert limits.sessions == Limit(5, "quotas.groups.analytics.sessions")
    # A group lower than the default still overrides it (the group is the more specific).
    assert quotas.for_user("bob", groups("analytics")).running == Limit(
        2, "quotas.groups.analytics.running"
    )
    assert quotas.for_user("bob", groups("empty")).running == Limit(4, "quotas.default.running")
    assert quotas.for_user("bob", NOBODY).sessions == Limit(10, "quotas.default.sessions")


def test_a_rate_keeps_the_burst_of_its_own_level(quotas: Quotas) -> None:
    # carol's own rate without a burst: her burst is her rate, not the default's 200.
    assert quotas.for_user("carol", NOBODY).rate == Rate(
        10.0, 10, "quotas.users.carol.calls_per_second"
    )
    # Of two groups with the same rate, the larger burst; a burst left out is the rate.
    assert quotas.for_user("dan", groups("science", "ops")).rate == Rate(
        300.0, 900, "quotas.groups.ops.calls_per_second"
    )
    assert quotas.for_user("dan", groups("science")).rate == Rate(
        300.0, 300, "quotas.groups.science.calls_per_second"
    )
    slow = QuotaSpec.parse({"default": {"calls_per_second": 0.5}})
    assert slow.for_user("x", NOBODY).rate == Rate(0.5, 1, "quotas.default.calls_per_second")


def test_absent_limits_are_unlimited() -> None:
    for quotas in (Quotas(), QuotaSpec.parse(None), QuotaSpec.parse({})):
        limits = quotas.for_user("alice", groups("analytics"))
        assert (limits.sessions, limits.running, limits.rate) == (None, None, None)
        assert quotas.for_pool("etl").rate is None
        assert not quotas.active and not quotas.has_rates
    only_sessions = QuotaSpec.parse({"users": {"alice": {"sessions": 0}}})
    assert only_sessions.active and not only_sessions.has_rates
    assert only_sessions.for_user("alice", NOBODY).sessions == Limit(
        0, "quotas.users.alice.sessions"
    )
    assert only_sessions.for_user("bob", NOBODY).sessions is None


def test_pools_have_their_own_total(quotas: Quotas) -> None:
    etl = quotas.for_pool("etl")
    assert etl.rate == Rate(500.0, 1000, "quotas.pools.etl.calls_per_second")
    assert etl.bucket == "pool:etl" != quotas.for_user("etl", NOBODY).bucket
    assert quotas.for_pool("default").rate is None


def test_resolution_is_cached_per_user_and_groups_and_bounded(quotas: Quotas) -> None:
    first = quotas.for_user("alice", groups("analytics"))
    assert quotas.for_user("alice", groups("analytics")) is first
    assert quotas.for_user("alice", NOBODY) is not first
    for i in range(10_000):
        quotas.for_user(f"u{i}", NOBODY)
    assert len(quotas._users) <= 4096


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"users": {"alice": {"sessions": -1}}}, "quotas.users.alice.sessions: Input should be"),
        ({"users": {"alice": {"sessions": 2.5}}}, "quotas.users.alice.sessions: Input should be"),
        ({"groups": {"g": {"running": "lots"}}}, "quotas.groups.g.running: Input should be"),
        ({"users": {"alice": {"sesions": 3}}}, "quotas.users.alice.sesions: Extra inputs"),
        ({"users": {"alice": {"burst": 3}}}, "quotas.users.alice: Value error, burst needs"),
        ({"default": {"calls_per_second": 0}}, "quotas.default.calls_per_second: Input should"),
        ({"pools": {"etl": {"burst": 9}}}, "quotas.pools.etl.calls_per_second: Field required"),
        ({"pools": {"etl": {"calls_per_second": 1, "running": 2}}}, "quotas.pools.etl.running"),
        ({"limits": {}}, "quotas.limits: Extra inputs"),
    ],
)
def test_parse_errors_name_the_place(data: Mapping[str, Any], message: str) -> None:
    with pytest.raises(QuotaError) as err:
        QuotaSpec.parse(data)
    assert str(err.value).startswith(message), str(err.value)
    assert isinstance(err.value, ValueError)


# --- refusals and shares --------------------------------------------------------------------


async def test_a_refusal_names_the_limit_its_value_the_count_and_the_setting() -> None:
    registry = MemoryRegistry()
    gate = QuotaGate(registry, QuotaSpec.parse(SAMPLE))
    for i in range(3):
        await gate.admit_session(session_key("alice", f"s{i}"), NOBODY)
    with pytest.raises(QuotaExceeded) as err:
        await gate.admit_session(session_key("alice", "s3"), NOBODY)
    refusal = err.value
    assert (refusal.limit, refusal.value, refusal.current, refusal.retry_after) == (
        "sessions",
        3,
        3,
        None,
    )
    assert str(refusal) == (
        "user 'alice' is at the limit of 3 sessions (3 open); release one (spark.stop()) or "
        "ask an operator to raise quotas.users.alice.sessions"
    )
    code, details = to_status(refusal)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "3 sessions" in details
    assert refusal.trailers() == ()  # no point in waiting: a session must end first


@pytest.mark.parametrize(
    ("limit", "replicas", "expected"),
    [(10, 3, 4), (10, 1, 10), (1, 5, 1), (7, 0, 7), (0, 3, 0), (9, 3, 3), (100, 7, 15)],
)
def test_a_replicas_share_of_a_limit(limit: int, replicas: int, expected: int) -> None:
    assert share(limit, replicas) == expected


# --- local slots ----------------------------------------------------------------------------


def test_slot_leases_are_reused_locally_and_handed_back_when_idle() -> None:
    slots = SlotLeases(idle_seconds=2.0)
    assert not slots.try_local("alice", 0.0)  # nothing leased yet: ask the registry
    slots.add("alice", 0.0)
    slots.add("alice", 0.0)
    assert not slots.try_local("alice", 0.0)  # both in use
    assert slots.snapshot() == {"alice": (2, 2)}
    slots.release("alice", 1.0)
    assert slots.idle(2.9) == {}  # idle for less than idle_seconds: kept for reuse
    assert slots.try_local("alice", 2.9)  # reused without a round trip
    assert not slots.try_local("alice", 2.9)
    slots.release("alice", 3.0)
    slots.release("alice", 3.5)
    assert slots.idle(5.4) == {}
    assert slots.idle(5.5) == {"alice": 2}
    assert not slots.try_local("alice", 3.6, limit=0)  # a lowered limit holds locally too
    slots.returned("alice", 2)
    assert slots.held() == {} and slots.snapshot() == {}
    slots.release("alice", 6.0)  # an extra end: nothing to free
    assert slots.busy("alice") == 0 and not slots.try_local("alice", 6.0)


def test_slot_leases_never_hand_back_a_slot_in_use() -> None:
    slots = SlotLeases(idle_seconds=0.0)
    for _ in range(3):
        slots.add("alice", 0.0)
    slots.release("alice", 0.0)
    assert slots.idle(0.0) == {"alice": 1}
    slots.returned("alice", 3)  # asked to return more than idle: keeps those in use
    assert slots.snapshot() == {"alice": (2, 2)}


# --- local tokens ---------------------------------------------------------------------------

B = "user:alice"


def test_tokens_are_spent_locally_until_they_run_out_or_lapse() -> None:
    leases = TokenLeases(lease_seconds=1.0, hold_seconds=10.0)
    assert not leases.take(B, 0.0)
    assert leases.wait(B, 0.0) == 0  # may ask now
    leases.granted(B, 3, 3, 0.0, 0.0, rate=50, burst=50)
    assert [leases.take(B, 1.0) for _ in range(4)] == [True, True, True, False]
    leases.granted(B, 5, 5, 0.0, 2.0, rate=50, burst=50)
    assert leases.held(B, 11.9) == 5
    assert not leases.take(B, 12.0)  # unused tokens lapse after the hold time
    assert leases.held(B, 12.0) == 0


def test_a_short_grant_holds_asks_back_until_a_lease_refills() -> None:
    leases = TokenLeases(lease_seconds=1.0)
    leases.take(B, 0.0)
    leases.granted(B, 2, 10, 0.0, 0.0, rate=50, burst=50, replicas=2)  # asked 10, got 2
    assert leases.take(B, 0.0) and leases.take(B, 0.0) and not leases.take(B, 0.0)
    # This replica's share of a refill: 2 replicas x cap 25 (50 // 2) at 50/s.
    assert leases.wait(B, 0.0) == pytest.approx(2 * 25 / 50)
    assert leases.wait(B, 0.5) == pytest.approx(0.5)
    assert leases.wait(B, 1.0) == 0
    leases.granted(B, 0, 1, 2.0, 1.0, rate=1, burst=1)  # none: the bucket's own hint wins
    assert leases.wait(B, 1.0) == pytest.approx(2.0)


def test_asks_follow_demand_within_the_cap() -> None:
    leases = TokenLeases(lease_seconds=1.0, hold_seconds=10.0)
    assert leases.cap(50, 50, 1) == 50
    assert leases.cap(50, 50, 2) == 25  # all replicas' leases fit in one burst
    assert leases.cap(50, 1000, 1) == 50  # a lease holds at most rate x lease_seconds
    assert leases.cap(0.1, 1, 4) == 1
    assert leases.want(B, 50, 50, 0.0) == 1  # never seen: one token
    leases.take(B, 0.0)
    assert leases.want(B, 500, 1000, 0.0) == 10  # one call: a second's worth of 1/s x 10 s
    leases.granted(B, 10, 10, 0.0, 0.0, rate=500, burst=1000)
    for i in range(300):  # 300 calls in 0.1 s
        leases.take(B, i / 3000)
    assert leases.want(B, 500, 1000, 0.1) == 500  # a busy bucket: the whole cap
    leases.granted(B, 500, 500, 0.0, 0.1, rate=500, burst=1000)
    leases.take(B, 100.0)
    assert leases.want(B, 500, 1000, 100.0) == 1  # one call in 100 s: one token


def test_tokens_of_several_buckets_are_taken_all_or_none() -> None:
    leases = TokenLeases()
    pool = "pool:etl"
    leases.granted(B, 1, 1, 0.0, 0.0, rate=1, burst=1)
    assert leases.take_all((B, pool), 0.0) == pool
    assert leases.held(B, 0.0) == 1  # the user's token was not spent for nothing
    leases.granted(pool, 1, 1, 0.0, 0.0, rate=1, burst=1)
    assert leases.take_all((B, pool), 0.0) is None
    assert leases.held(B, 0.0) == leases.held(pool, 0.0) == 0
    assert leases.seen(B, 0.5) == 2 and leases.seen(pool, 0.5) == 2
    assert leases.seen(B, 1.5) == 2  # the window before
    assert leases.seen(B, 5.0) == 0
    leases.prune(30.0)
    assert len(leases) == 0


def test_the_exact_bucket_refills_up_to_its_burst() -> None:
    bucket = TokenBucket()
    assert bucket.lease(0.0, 10, 5, 100) == (5, 0.0)
    granted, retry_after = bucket.lease(0.0, 10, 5, 1)
    assert granted == 0 and retry_after == pytest.approx(0.1)
    assert bucket.lease(0.25, 10, 5, 100) == (2, 0.0)
    assert bucket.lease(100.0, 10, 5, 100) == (5, 0.0)  # never more than the burst
    assert bucket.lease(99.0, 10, 5, 1)[0] == 0  # a clock going back refills nothing


# --- the accuracy bound, N replicas on simulated clocks ---------------------------------------


def simulate(
    rate: float,
    burst: int,
    demands: list[float],
    seconds: float,
    known: int,
    seed: int = 1,
) -> tuple[list[float], int, int, int]:
    """Calls at `demands` per second on each replica, over `seconds`, through TokenLeases
    against one exact bucket (what Redis runs), as QuotaGate does: (admitted call times,
    refused, asks of the shared bucket, calls)."""
    rnd = random.Random(seed)
    bucket = TokenBucket()
    leases = [TokenLeases(lease_seconds=1.0, hold_seconds=10.0) for _ in demands]
    calls: list[tuple[float, int]] = []
    for replica, per_second in enumerate(demands):
        t = rnd.random() / per_second
        while t < seconds:
            calls.append((t, replica))
            t += (0.5 + rnd.random()) / per_second  # jittered arrivals, mean 1/per_second
    calls.sort()
    admitted: list[float] = []
    refused = asks = 0
    for t, replica in calls:
        mine = leases[replica]
        if mine.take(B, t):
            admitted.append(t)
            continue
        if mine.wait(B, t) > 0:
            refused += 1
            continue
        want = mine.want(B, rate, burst, t, known)
        granted, retry_after = bucket.lease(t, rate, burst, want)
        asks += 1
        mine.granted(B, granted, want, retry_after, t, rate, burst, known)
        if mine.take_all((B,), t, count=False) is None:
            admitted.append(t)
        else:
            refused += 1
    return admitted, refused, asks, len(calls)


def most_in_a_window(times: list[float], window: float) -> int:
    most = start = 0
    for end in range(len(times)):
        while times[end] - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


@pytest.mark.parametrize(
    ("rate", "burst", "demands", "known"),
    [
        (50, 50, [200, 200], 2),  # both replicas far over the limit
        (50, 50, [200, 200], 1),  # ... before they know of each other
        (50, 100, [400, 5], 2),  # one busy replica, one quiet
        (50, 50, [300] * 5, 5),
        (20, 5, [100, 100, 100], 3),  # a burst smaller than the replicas' leases
    ],
)
def test_calls_admitted_in_any_window_stay_within_the_documented_bound(
    rate: float, burst: int, demands: list[float], known: int
) -> None:
    admitted, _, asks, calls = simulate(rate, burst, demands, 10.0, known)
    n = len(demands)
    caps = n * TokenLeases(1.0).cap(rate, burst, known)
    assert caps <= n * max(1, min(rate, burst))
    for window in (0.1, 0.5, 1.0, 2.0, 5.0, 10.0):
        most = most_in_a_window(admitted, window)
        assert most <= rate * window + burst + caps, (window, most)
        if known == n and burst >= n:
            assert most <= rate * window + 2 * burst, (window, most)
    # Not needlessly strict either: over 10 s the limit is nearly reached.
    assert len(admitted) >= 0.9 * rate * 10.0
    if burst >= 10 * n:
        assert asks / calls < 0.05
    else:  # leases of a token or two: about one ask per admitted call
        assert asks <= 2 * len(admitted)


def test_replicas_under_the_limit_together_are_never_refused() -> None:
    for demands in ([40, 40], [15] * 5, [80, 1, 1], [10, 10]):
        admitted, refused, asks, calls = simulate(100, 100, demands, 30.0, len(demands))
        assert refused == 0, demands
        assert len(admitted) == calls
        assert asks / calls <= 0.06, demands


def test_the_redis_cost_of_a_steady_stream_is_a_fraction_of_a_call() -> None:
    # A user at 80% of a 100/s limit on two replicas: one ask per lease, not per call.
    _, refused, asks, calls = simulate(100, 200, [40, 40], 60.0, 2)
    assert refused == 0
    assert asks / calls <= 0.02


# --- the gate -------------------------------------------------------------------------------


class CountingRegistry(MemoryRegistry):
    """A MemoryRegistry counting quota operations, able to go down."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock=clock)
        self.calls: Counter[str] = Counter()
        self.down = False

    def _op(self, name: str) -> None:
        self.calls[name] += 1
        if self.down:
            raise RegistryUnavailable("Redis at 127.0.0.1:1: connection refused")

    async def quota_session_acquire(
        self, user: str, key: str, limit: int, ttl: float
    ) -> SessionGrant:
        self._op("quota_session_acquire")
        return await super().quota_session_acquire(user, key, limit, ttl)

    async def quota_session_release(self, user: str, key: str) -> None:
        self._op("quota_session_release")
        await super().quota_session_release(user, key)

    async def quota_slots_acquire(
        self, user: str, replica: str, limit: int, lease_ttl: float
    ) -> SlotGrant:
        self._op("quota_slots_acquire")
        return await super().quota_slots_acquire(user, replica, limit, lease_ttl)

    async def quota_slots_sync(
        self, replica: str, held: Mapping[str, tuple[int, int]], lease_ttl: float
    ) -> int:
        self._op("quota_slots_sync")
        return await super().quota_slots_sync(replica, held, lease_ttl)

    async def quota_tokens_lease(
        self, bucket: str, rate: float, burst: int, want: int
    ) -> TokenGrant:
        self._op("quota_tokens_lease")
        return await super().quota_tokens_lease(bucket, rate, burst, want)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> CountingRegistry:
    return CountingRegistry(clock)


def gates(
    registry: CountingRegistry, clock: Clock, quotas: Quotas, n: int = 2, **options: Any
) -> list[QuotaGate]:
    options.setdefault("slot_wait_seconds", 0.0)
    return [QuotaGate(registry, quotas, replica=f"r{i}", clock=clock, **options) for i in range(n)]


async def test_sessions_are_capped_across_replicas_and_released_slots_come_back(
    registry: CountingRegistry, clock: Clock, quotas: Quotas
) -> None:
    a, b = gates(registry, clock, quotas)
    keys = [session_key("alice", f"s{i}") for i in range(5)]
    await a.admit_session(keys[0], NOBODY)
    await b.admit_session(keys[1], NOBODY)
    await a.admit_session(keys[2], NOBODY)
    for gate in (a, b):
        with pytest.raises(QuotaExceeded, match="limit of 3 sessions"):
            await gate.admit_session(keys[3], NOBODY)
    await b.admit_session(keys[0], NOBODY)  # the same session again: counted once
    await a.release_session(keys[1])  # ReleaseSession on either replica
    await b.admit_session(keys[3], NOBODY)
    with pytest.raises(QuotaExceeded):
        await a.admit_session(keys[4], NOBODY)
    # Another user is unaffected; an expired pin frees its slot as the pin expires.
    await a.admit_session(session_key("bob", "s0"), NOBODY)
    pin = Pin("s5", "d1:1", owner="carol")
    await a.admit_session(pin.key, NOBODY)
    await registry.bind(pin)
    clock.now += 3 * 3600  # past the pin's TTL and the reservation
    assert (await registry.quota_session_acquire("carol", "carol/probe", 0, 1.0)).current == 0


async def test_running_operations_are_capped_across_replicas(
    registry: CountingRegistry, clock: Clock, quotas: Quotas
) -> None:
    a, b = gates(registry, clock, quotas, idle_seconds=1.0)
    analysts = groups("analytics")  # running: 2
    first = await a.start_operation("alice", analysts)
    second = await b.start_operation("alice", analysts)
    for gate in (a, b):
        with pytest.raises(QuotaExceeded) as err:
            await gate.start_operation("alice", analysts)
        assert (err.value.limit, err.value.value, err.value.current) == ("running", 2, 2)
        assert "quotas.groups.analytics.running" in str(err.value)
    other = await a.start_operation("bob", analysts)  # another user is unaffected
    other.end()
    first.end()
    first.end()  # ending twice frees one slot, once
    third = await a.start_operation("alice", analysts)  # a's idle slot, reused locally
    assert registry.calls["quota_slots_acquire"] == 3 + 2  # 3 grants, 2 refusals
    third.end()
    with pytest.raises(QuotaExceeded):  # a keeps its idle slot a little while
        await b.start_operation("alice", analysts)
    clock.now += 1.0
    await a.sync()  # idle for idle_seconds: handed back
    fourth = await b.start_operation("alice", analysts)
    fourth.end()
    second.end()


async def test_a_dead_replicas_slots_free_after_its_lease(
    registry: CountingRegistry, clock: Clock, quotas: Quotas
) -> None:
    a, b = gates(registry, clock, quotas, slot_lease_seconds=30.0)
    await a.start_operation("alice", groups("analytics"))
    await a.start_operation("alice", groups("analytics"))  # a "dies" holding both
    with pytest.raises(QuotaExceeded):
        await b.start_operation("alice", groups("analytics"))
    clock.now += 29.0
    await b.sync()
    with pytest.raises(QuotaExceeded):
        await b.start_operation("alice", groups("analytics"))
    clock.now += 1.0
    await b.start_operation("alice", groups("analytics"))


async def test_calls_per_second_in_the_steady_state_cost_no_round_trip(
    registry: CountingRegistry, clock: Clock
) -> None:
    quotas = QuotaSpec.parse({"default": {"calls_per_second": 1000, "burst": 1000}})
    (gate,) = gates(registry, clock, quotas, n=1)
    for _ in range(20_000):  # 20 s at 1000 calls/s... less a little: 900/s
        await gate.admit_call("alice", NOBODY, "default")
        clock.now += 1 / 900
    assert registry.calls["quota_tokens_lease"] / 20_000 <= 0.01


async def test_a_rate_limit_refuses_with_a_retry_after_and_spares_others(
    registry: CountingRegistry, clock: Clock
) -> None:
    quotas = QuotaSpec.parse({"default": {"calls_per_second": 50, "burst": 50}})
    a, b = gates(registry, clock, quotas)
    admitted = 0
    for i in range(200):  # at once, on both replicas
        try:
            await (a if i % 2 else b).admit_call("alice", NOBODY, None)
            admitted += 1
        except QuotaExceeded as exc:
            refusal = exc
    assert admitted == 50  # the burst, exactly: the store's bucket was never over-drawn
    assert refusal.limit == "calls_per_second" and refusal.value == 50
    assert refusal.retry_after is not None and 0 < refusal.retry_after <= 1.0
    assert "over the limit of 50 calls per second (burst 50)" in str(refusal)
    assert "quotas.default.calls_per_second" in str(refusal)
    ((name, value),) = refusal.trailers()
    assert name == "retry-after" and 0 <= float(value) - refusal.retry_after < 0.001
    await a.admit_call("bob", NOBODY, None)
    clock.now += refusal.retry_after
    await b.admit_call("alice", NOBODY, None)  # back after the hint


async def test_a_pool_limit_caps_all_its_users_together(
    registry: CountingRegistry, clock: Clock
) -> None:
    quotas = QuotaSpec.parse({"pools": {"etl": {"calls_per_second": 10, "burst": 10}}})
    (gate,) = gates(registry, clock, quotas, n=1)
    for i in range(10):
        await gate.admit_call(f"user{i}", NOBODY, "etl")
    with pytest.raises(QuotaExceeded) as err:
        await gate.admit_call("user99", NOBODY, "etl")
    assert err.value.limit == "pool_calls_per_second"
    assert "pool 'etl' is over its limit of 10 calls per second for all its users" in str(err.value)
    await gate.admit_call("user99", NOBODY, "default")  # other pools are not limited


async def test_without_quotas_the_gate_never_asks_the_registry(
    registry: CountingRegistry, clock: Clock
) -> None:
    (gate,) = gates(registry, clock, Quotas(), n=1)
    for _ in range(100):
        await gate.admit_call("alice", NOBODY, "etl")
        (await gate.start_operation("alice", NOBODY)).end()
    await gate.admit_session("alice/s1", NOBODY)
    await gate.release_session("alice/s1")
    await gate.sync()
    await gate.close()
    assert sum(registry.calls.values()) == 0


async def test_registry_down_falls_back_to_shares_and_says_so_once(
    registry: CountingRegistry, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    quotas = QuotaSpec.parse({"default": {"sessions": 4, "running": 3, "calls_per_second": 10}})
    states: list[bool] = []
    a, b = gates(registry, clock, quotas)
    a._on_degraded = states.append
    await b.sync()
    await a.sync()
    assert a.replicas == 2
    registry.down = True
    caplog.set_level(logging.WARNING, "router.admit.quotas")
    # Calls: half the rate and half the burst (10/s over 2 replicas: 5/s, burst 5).
    admitted = 0
    for _ in range(20):
        try:
            await a.admit_call("alice", NOBODY, None)
            admitted += 1
        except QuotaExceeded as exc:
            assert "share of it while the registry is unreachable" in str(exc)
    assert admitted == 5
    clock.now += 1.0
    await a.admit_call("alice", NOBODY, None)
    # Sessions and operations: ceil(limit / 2) here.
    await a.admit_session("alice/s1", NOBODY)
    await a.admit_session("alice/s2", NOBODY)
    with pytest.raises(QuotaExceeded, match="limit of 2 sessions"):
        await a.admit_session("alice/s3", NOBODY)
    ops = [await a.start_operation("alice", NOBODY) for _ in range(2)]
    with pytest.raises(QuotaExceeded, match="limit of 2 running"):
        await a.start_operation("alice", NOBODY)
    await a.sync()  # still down
    assert states == [True]
    assert [r.getMessage() for r in caplog.records if "quotas degraded" in r.getMessage()] == [
        "registry unavailable (Redis at 127.0.0.1:1: connection refused): quotas degraded: "
        "each limit is enforced here as this replica's share (1/2) until the registry is back"
    ]
    registry.down = False
    await a.sync()
    assert states == [True, False] and not a.degraded
    # Back: the outage's sessions and operations are counted in the registry.
    assert (await registry.quota_session_acquire("alice", "alice/probe", 0, 1.0)).current == 2
    grant = await registry.quota_slots_acquire("alice", "probe", 3, 30.0)
    assert grant == (True, 3, 3)
    for op in ops:
        op.end()


async def test_a_sync_renews_leases_only_when_due(
    registry: CountingRegistry, clock: Clock, quotas: Quotas
) -> None:
    (gate,) = gates(registry, clock, quotas, n=1, slot_lease_seconds=30.0)
    await gate.sync()
    op = await gate.start_operation("alice", NOBODY)
    for _ in range(9):  # every second, as the replica calls it
        clock.now += 1.0
        await gate.sync()
    assert registry.calls["quota_slots_sync"] == 1  # nothing to hand back, renewal not due
    clock.now += 1.0
    await gate.sync()
    assert registry.calls["quota_slots_sync"] == 2  # renewed every lease / 3
    op.end()
    clock.now += 1.0
    await gate.sync()  # idle for idle_seconds: handed back
    assert registry.calls["quota_slots_sync"] == 3
    assert await registry.quota_slots_acquire("alice", "probe", 1, 30.0) == (True, 1, 1)


async def test_the_local_path_is_fast(registry: CountingRegistry, clock: Clock) -> None:
    huge = {"calls_per_second": 1e9, "burst": 10**9}
    quotas = QuotaSpec.parse({"default": huge, "pools": {"etl": huge}})
    (gate,) = gates(registry, clock, quotas, n=1)
    calls = 20_000
    for _ in range(calls):  # leases grow with the demand: 10, 100, 1000, ... tokens
        await gate.admit_call("alice", NOBODY, "etl")
    registry.calls.clear()
    started = time.perf_counter()
    for _ in range(calls):
        await gate.admit_call("alice", NOBODY, "etl")
    per_call = (time.perf_counter() - started) / calls
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} µs per admitted call"
    assert registry.calls["quota_tokens_lease"] <= 2  # at most one more lease per bucket


async def test_usage_is_what_this_replica_holds(
    registry: CountingRegistry, clock: Clock, quotas: Quotas
) -> None:
    a, b = gates(registry, clock, quotas)
    running = await a.start_operation("bob", NOBODY)
    await a.start_operation("bob", NOBODY)
    running.end()
    for _ in range(3):
        await a.admit_call("carol", NOBODY, "etl")
    usage = a.usage()
    assert (usage["replica"], usage["degraded"], usage["active"]) == ("r0", False, True)
    assert usage["users"] == [{"user": "bob", "running": 1, "slots_leased": 2}]
    assert [(x["kind"], x["name"], x["calls_last_second"]) for x in usage["buckets"]] == [
        ("pool", "etl", 3),
        ("user", "carol", 3),
    ]
    assert all(x["tokens_held"] >= 0 for x in usage["buckets"])
    assert b.usage()["users"] == [] and b.usage()["buckets"] == []  # the other one's view
