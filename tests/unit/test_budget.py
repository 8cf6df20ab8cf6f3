"""The memory budget's counting and refusals (router/dataplane/budget.py), without servers."""

from __future__ import annotations

import grpc
import pytest

from router.dataplane.budget import Budget, worst_case_bytes
from router.errors import OverBudget, to_status

MiB = 1024 * 1024


def test_calls_are_counted_per_replica_and_per_connection_and_given_back() -> None:
    budget = Budget(max_streams=3, max_per_connection=2, max_request_bytes=10 * MiB)
    a1 = budget.open("ipv4:127.0.0.1:1")
    a2 = budget.open("ipv4:127.0.0.1:1")
    with pytest.raises(OverBudget) as per_connection:
        budget.open("ipv4:127.0.0.1:1")
    assert per_connection.value.limit == "max_streams_per_connection"
    assert "max_streams_per_connection=2" in str(per_connection.value)
    b1 = budget.open("ipv4:127.0.0.1:2")
    with pytest.raises(OverBudget) as per_replica:
        budget.open("ipv4:127.0.0.1:3")
    assert per_replica.value.limit == "max_streams"
    assert "max_streams=3" in str(per_replica.value)
    assert (budget.streams, budget.connections) == (3, 2)
    for held in (a1, a2, b1):
        with held:
            pass
    assert (budget.streams, budget.connections, budget.request_bytes) == (0, 0, 0)
    budget.open("ipv4:127.0.0.1:3").__exit__()  # room again once calls ended


def test_request_bytes_are_held_until_the_call_ends() -> None:
    budget = Budget(max_streams=10, max_per_connection=10, max_request_bytes=300 * MiB)
    first = budget.open("p", 127 * MiB)
    second = budget.open("q", 127 * MiB)
    with pytest.raises(OverBudget) as refused:
        budget.open("r", 127 * MiB)
    assert refused.value.limit == "max_request_bytes_in_flight"
    assert "127.0 MiB" in str(refused.value) and "254.0 MiB" in str(refused.value)
    # A refusal takes nothing: neither a call nor bytes.
    assert (budget.streams, budget.request_bytes) == (2, 254 * MiB)
    assert budget.open("r", 40 * MiB) is not None  # small requests still fit
    with first:
        pass
    assert budget.request_bytes == 167 * MiB
    second.__exit__()


def test_a_client_streams_first_request_is_counted_in_its_calls_share() -> None:
    budget = Budget(max_streams=10, max_per_connection=10, max_request_bytes=100)
    held = budget.open("p")
    held.hold(60)
    other = budget.open("q")
    with pytest.raises(OverBudget):
        other.hold(60)
    assert budget.request_bytes == 60
    with held:
        pass
    with other:
        pass
    assert (budget.streams, budget.request_bytes) == (0, 0)


def test_a_refusal_is_resource_exhausted_naming_the_setting() -> None:
    code, details = to_status(OverBudget("x (max_streams=1)", "max_streams"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == "spark-router: x (max_streams=1)"


def test_the_worst_case_grows_with_each_setting() -> None:
    base = worst_case_bytes(1000, 256 * 1024, 256 * MiB, 4 * MiB)
    assert worst_case_bytes(2000, 256 * 1024, 256 * MiB, 4 * MiB) > base
    assert worst_case_bytes(1000, 1 * MiB, 256 * MiB, 4 * MiB) > base
    assert worst_case_bytes(1000, 256 * 1024, 512 * MiB, 4 * MiB) > base
    # The defaults, 1000 stalled calls of Spark's 4 MiB batches: about 15 GiB.
    assert 14.5 * 1024 * MiB < base < 15.5 * 1024 * MiB
