"""The router's own errors: the status each maps to, and what NoLiveDriver says."""

from __future__ import annotations

import grpc

from router.errors import NoLiveDriver, describe_pool, to_status


def test_no_live_driver_is_a_status_pyspark_does_not_retry() -> None:
    from pyspark.sql.connect.client.retries import DefaultPolicy

    exc = NoLiveDriver.in_pool("default", {"127.0.0.1:1": "down"})
    code, details = to_status(exc)
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("spark-router: pool 'default' has no driver")

    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return code

        def details(self) -> str:
            return details

        def trailing_metadata(self) -> tuple[()]:
            return ()

    assert not DefaultPolicy().can_retry(Failed())


def test_the_message_names_pool_drivers_states_and_probe_errors() -> None:
    exc = NoLiveDriver.in_pool("etl", {"10.0.0.2:15002": "draining", "10.0.0.1:15002": "down"})
    refused = "UNAVAILABLE: failed to connect to all addresses; Connection refused"
    explained = exc.explained(
        {"10.0.0.1:15002": refused}, lead="driver 10.0.0.1:15002 is down and "
    )
    assert str(explained) == (
        "driver 10.0.0.1:15002 is down and pool 'etl' has no driver that takes new sessions "
        f"(drivers: 10.0.0.1:15002: down, last probe: {refused}; 10.0.0.2:15002: draining); "
        "start or fix a driver, then retry"
    )
    assert explained.code is grpc.StatusCode.FAILED_PRECONDITION
    assert explained.pool == "etl" and explained.drivers == exc.drivers


def test_a_message_without_a_pool_keeps_its_text() -> None:
    assert str(NoLiveDriver("driver d is down").explained({"d": "x"}, "lead: ")) == (
        "lead: driver d is down"
    )


def test_a_large_pool_is_named_in_part() -> None:
    drivers = {f"10.0.0.{i}:1": "down" for i in range(10, 40)}
    text = describe_pool("p", drivers, {a: "UNAVAILABLE: " + "x" * 150 for a in drivers})
    assert text.count("10.0.0.") == 10 and "and 20 more" in text
    assert len(text) < 4096  # it travels in a trailer
