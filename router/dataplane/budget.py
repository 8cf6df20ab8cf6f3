"""The replica's memory budget: calls in flight (per replica, per connection), request bytes held.

Pure counting, no I/O: the proxy opens a call with its connection's peer (and the bytes of
the request it holds), and the call's `Held` share is given back when the call ends. Each
refusal names the limit, its setting and its value, so an operator knows what to raise and
a client what it overdid.

Why these three bound memory (the README's "Memory" section has the arithmetic): a call
holds its request, one response message in hand and two flow-control windows
(`stream_window_bytes`, towards its client and its driver); `max_streams` bounds how many
calls there are, `max_streams_per_connection` stops one connection from taking them all, and
`max_request_bytes_in_flight` bounds the large requests (up to `max_message_bytes` each)
held at once, which the number of calls alone would not.
"""

from __future__ import annotations

from router.errors import OverBudget

__all__ = ["Budget", "Held"]


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


class Budget:
    """Counts calls in flight and request bytes held; refuses what goes beyond a limit."""

    def __init__(self, max_streams: int, max_per_connection: int, max_request_bytes: int) -> None:
        """The three limits, as in Settings (max_streams, ..._per_connection, ...bytes...)."""
        self.max_streams = max_streams
        self.max_per_connection = max_per_connection
        self.max_request_bytes = max_request_bytes
        self.streams = 0
        self.request_bytes = 0
        self._by_peer: dict[str, int] = {}

    def open(self, peer: str, request_bytes: int = 0) -> Held:
        """Count a new call from `peer` holding `request_bytes`; OverBudget if over a limit."""
        if self.streams >= self.max_streams:
            raise OverBudget(
                f"the router has {self.streams} calls in flight, its limit (max_streams="
                f"{self.max_streams}); retry later, or add replicas or raise max_streams",
                "max_streams",
            )
        on_peer = self._by_peer.get(peer, 0)
        if on_peer >= self.max_per_connection:
            raise OverBudget(
                f"this connection has {on_peer} calls in flight, the limit per connection "
                f"(max_streams_per_connection={self.max_per_connection}); wait for some to "
                "finish, or spread calls over connections",
                "max_streams_per_connection",
            )
        self._take(request_bytes)
        self._by_peer[peer] = on_peer + 1
        self.streams += 1
        return Held(self, peer, request_bytes)

    def _take(self, request_bytes: int) -> None:
        if request_bytes and self.request_bytes + request_bytes > self.max_request_bytes:
            raise OverBudget(
                f"a request of {_mib(request_bytes)} does not fit: the router holds "
                f"{_mib(self.request_bytes)} of requests in flight, its limit "
                f"(max_request_bytes_in_flight={self.max_request_bytes}); retry later, or "
                "send large data as artifacts",
                "max_request_bytes_in_flight",
            )
        self.request_bytes += request_bytes

    def _close(self, peer: str, request_bytes: int) -> None:
        self.streams -= 1
        self.request_bytes -= request_bytes
        on_peer = self._by_peer[peer]
        if on_peer <= 1:
            del self._by_peer[peer]  # only connections with calls in flight are kept
        else:
            self._by_peer[peer] = on_peer - 1

    @property
    def connections(self) -> int:
        """Client connections with calls in flight."""
        return len(self._by_peer)


class Held:
    """One admitted call's share of the budget; leaving its `with` gives the share back."""

    __slots__ = ("_budget", "_peer", "_request_bytes")

    def __init__(self, budget: Budget, peer: str, request_bytes: int) -> None:
        self._budget = budget
        self._peer = peer
        self._request_bytes = request_bytes

    def hold(self, request_bytes: int) -> None:
        """Count `request_bytes` more for this call (a client stream's first request)."""
        self._budget._take(request_bytes)
        self._request_bytes += request_bytes

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self._budget._close(self._peer, self._request_bytes)


# Measured (tests/integration/test_memory.py): a replica serving nothing holds ~175 MiB
# (Python, grpc, OpenTelemetry, prometheus-client); each call in flight costs ~128 KiB of
# its own besides its windows and messages; a stalled stream holds its response message
# about 3.5 times (the bytes in hand, grpc's copy being sent, its framing, and the next
# message grpc reads from the driver).
BASE_BYTES = 180 * 1024 * 1024
CALL_BYTES = 128 * 1024
RESPONSE_COPIES = 3.5


def worst_case_bytes(
    max_streams: int,
    stream_window_bytes: int,
    max_request_bytes_in_flight: int,
    response_message_bytes: int,
) -> int:
    """The replica's documented worst-case RSS: every call in flight stalled by its client.

    `response_message_bytes` is the largest response message the drivers send (Spark's
    spark.connect.grpc.arrow.maxBatchSize, 4 MiB by default): the router never decodes
    responses, so that bound comes from the drivers, not from the router's settings.
    """
    per_call = CALL_BYTES + 2 * stream_window_bytes + RESPONSE_COPIES * response_message_bytes
    return int(BASE_BYTES + max_request_bytes_in_flight + max_streams * per_call)
