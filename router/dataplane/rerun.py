"""What an ExecutePlan's client has been shown, so that the plan can run again elsewhere.

A query whose driver is lost while its results stream runs again on the session's next
driver, in the same client call (proxy.py). The client must then see the stream it would
have seen without the loss: notes it was told once (the schema, the plan's metrics) are not
told again, and the results it already has are not sent again. Results are not kept: each
is remembered by a digest (protocol.told), and the second run's results are
compared with them one by one before the rest is sent. A plan whose results differ between
two runs (a non-deterministic query, a table written in between, drivers configured apart)
is stopped with ABORTED, never spliced from two runs.

Without this, the client reattaches to an operation the new driver never heard of, and
pyspark refuses to run it again once it received any response (RESPONSE_ALREADY_RECEIVED).
No I/O here: proxy.py feeds it the responses.
"""

from __future__ import annotations

from array import array

from router.dataplane import protocol
from router.errors import RerunDiffers

# Fingerprints kept per stream: 8 bytes each, 512 KiB at most. A stream of more results
# (256 GiB in Spark's default 4 MiB Arrow batches) is not run again.
MAX_RESULTS = 65_536

# Notes a second run must not tell again: pyspark's toLocalIterator asserts a single schema.
# Progress is told again: it describes the new run.
_ONCE = frozenset({protocol.SCHEMA_FIELD, protocol.METRICS_FIELD})


class Shown:
    """The notes and result digests one ExecutePlan stream has sent its client."""

    def __init__(self, max_results: int = MAX_RESULTS) -> None:
        self._max = max_results
        self._notes: set[int] = set()
        self._prints = array("Q")
        self._rerunnable = True
        self._matched: int | None = None  # results of the second run compared so far

    @property
    def rerunnable(self) -> bool:
        """Whether the stream may run again: once, and only if every result was remembered."""
        return self._rerunnable and self._matched is None

    @property
    def results(self) -> int:
        """How many results the client has."""
        return len(self._prints)

    def rerun(self) -> None:
        """The plan starts again on another driver: compare its results from now on."""
        if not self.rerunnable:
            raise RuntimeError("a stream runs again at most once, and only if rerunnable")
        self._matched = 0

    def admit(self, response: bytes) -> bool:
        """Whether to send `response` to the client; RerunDiffers if a second run's result
        is not the one the client already has."""
        told = protocol.told(response)
        if self._matched is None:
            if not self._rerunnable:
                return True
            if told is None or (told[1] is not None and len(self._prints) >= self._max):
                self._rerunnable = False
                return True
            self._notes |= told[0]
            if told[1] is not None:
                self._prints.append(told[1])
            return True
        if told is not None and told[1] is None:
            return not (told[0] and told[0] <= _ONCE & self._notes)
        if self._matched >= len(self._prints):
            return True
        if told is None or told[1] != self._prints[self._matched]:
            raise RerunDiffers(self._differs(f"result {self._matched + 1} is not the same"))
        self._matched += 1
        return False

    def ended(self) -> None:
        """The stream ended; RerunDiffers if a second run ended before all it had to match."""
        if self._matched is not None and self._matched < len(self._prints):
            raise RerunDiffers(self._differs(f"it ended after {self._matched} of them"))

    def _differs(self, how: str) -> str:
        return (
            f"the query's driver was lost after {len(self._prints)} of its results had been "
            f"sent, and run again on another driver {how}: its results change from run to "
            "run, so it was stopped rather than mixing two runs; run it again"
        )
