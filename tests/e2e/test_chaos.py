"""The chaos soak (loadtest/chaos.py), two minutes of it: every operation must succeed.

It runs as a subprocess, as an operator would run it: three real Spark drivers, two replicas
on a real Redis behind a real Envoy, three pyspark users, a fault every 15 s. The soak waits
for Spark JVM slots itself (at most three on the machine), which is part of the time bound.
Two quick tests check the soak's own bookkeeping (the fault deck, attribution to faults).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from loadtest.chaos import KINDS, NO_FAULT, Fault, Op, attribute, fault_deck, summarize
from tests.helpers import ROOT

SLOT_WAIT = 900  # seconds the soak may wait for other Spark JVMs to end
# slot wait + start (~1 min) + 2 min + the last fault's recovery + stopping users and cluster
TIMEOUT = SLOT_WAIT + 900


def test_every_kind_comes_once_in_each_round_of_the_deck() -> None:
    faults = list(islice(fault_deck(random.Random(1)), 3 * len(KINDS)))
    for start in range(0, len(faults), len(KINDS)):
        assert sorted(faults[start : start + len(KINDS)]) == sorted(KINDS)
    assert faults == list(islice(fault_deck(random.Random(1)), 3 * len(KINDS)))


def test_an_op_counts_for_the_latest_fault_whose_window_it_overlaps() -> None:
    faults = [Fault(1, "drain", start=10, end=20), Fault(2, "driver-kill", start=30, end=40)]
    ops = [
        Op(0, "sum", 1, 2, "ok"),  # before any fault
        Op(0, "sum", 19, 21, "failed"),  # during the drain
        Op(0, "sum", 24, 31, "lost"),  # in the drain's grace and the kill: the kill
        Op(0, "sum", 44, 45, "ok"),  # in the kill's grace (5 s)
        Op(0, "sum", 46, 47, "ok"),  # after it
    ]
    attribute(ops, faults, grace=5)
    assert [op.fault for op in ops] == [None, "drain", "driver-kill", "driver-kill", None]
    rows = summarize(ops, faults)
    assert (rows["drain"]["faults"], rows["drain"]["failed"]) == (1, 1)
    assert (rows["driver-kill"]["ops"], rows["driver-kill"]["lost"]) == (2, 1)
    assert rows[NO_FAULT]["ops"] == 2
    assert (rows["total"]["ops"], rows["total"]["faults"]) == (5, 2)


@pytest.mark.own_drivers
@pytest.mark.timeout(TIMEOUT + 60)
def test_two_minutes_of_chaos_lose_no_operation(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    args = [sys.executable, "-m", "loadtest.chaos", "--minutes", "2", "--every", "15"]
    args += ["--seed", "1", "--json", str(out), "--slot-wait", str(SLOT_WAIT)]
    proc = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    output = proc.stdout[-8000:] + proc.stderr[-4000:]
    assert out.exists(), output
    report = json.loads(out.read_text())
    total = report["summary"]["total"]
    kinds = {fault["kind"] for fault in report["faults"]}
    failures = [
        f"{op['result']} {op['op']} during {op['fault'] or NO_FAULT}: "
        + op["error"].split("\n\nJVM stacktrace:")[0][:300]
        for op in report["failures"]
    ]
    assert total["ops"] > 0, output
    assert len(kinds) >= 3, f"fault kinds injected: {kinds}\n{output}"
    assert total["unrecovered"] == 0, [f["note"] for f in report["faults"] if not f["recovered"]]
    assert not failures, "\n".join(failures)
    assert (total["failed"], total["lost"], total["wrong"]) == (0, 0, 0)
    assert not report["problems"], report["problems"]
    assert proc.returncode == 0, output
