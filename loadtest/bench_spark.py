"""The benchmark's real-Spark row: a large ``toPandas()`` with the real pyspark client.

``python -m loadtest.bench_spark --target direct=sc://127.0.0.1:15002 --target
router=sc://127.0.0.1:15003 --rows 5000000 --rounds 3`` runs, per round and per target in
turn (interleaved), ``spark.range(rows).selectExpr("id", "id * 2 AS b").toPandas()`` in a new
session (a unique session id per run), after one small warm-up query in that session, and
prints one JSON line per run: target, round, seconds, rows, bytes (pandas memory), rows/s.
The result is checked (row count and sums); a wrong result is an error, not a number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _run_once(url: str, rows: int) -> dict[str, float | int]:
    from pyspark.sql import SparkSession

    session_id = str(uuid.uuid4())
    spark = SparkSession.builder.remote(f"{url}/;session_id={session_id}").create()
    try:
        version = spark.version
        port = spark.conf.get("spark.connect.grpc.binding.port")
        if spark.range(10).count() != 10:  # warms the session (and its driver) up
            raise AssertionError(f"Spark {version} on port {port} cannot count to 10")
        t0 = time.perf_counter()
        try:
            df: Any = spark.range(rows).selectExpr("id", "id * 2 AS b").toPandas()
        except Exception as exc:
            raise RuntimeError(f"Spark {version} on port {port}: {exc}") from exc
        seconds = time.perf_counter() - t0
        if len(df) != rows or int(df["id"].sum()) != rows * (rows - 1) // 2:
            raise AssertionError(f"wrong result from Spark {version} on {port}: {len(df)} rows")
        if not bool((df["b"] == df["id"] * 2).all()):
            raise AssertionError("wrong result: b != 2 * id")
        size = int(df.memory_usage(index=False).sum())
    finally:
        spark.stop()
    return {"seconds": seconds, "rows": rows, "bytes": size, "rows_per_s": rows / seconds}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the interleaved toPandas() rounds; one JSON line per run on stdout."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_spark")
    parser.add_argument("--target", action="append", required=True, metavar="NAME=sc://HOST:PORT")
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per target first")
    args = parser.parse_args(argv)
    targets = [tuple(t.split("=", 1)) for t in args.target]
    for _, url in targets:  # JIT and caches warm on every path before anything is timed
        for _ in range(args.warmup):
            try:
                _run_once(url, args.rows)
            except Exception as exc:
                print(json.dumps({"warmup_error": f"{type(exc).__name__}: {exc}"[:500]}))
    for round_no in range(args.rounds):
        order = targets if round_no % 2 == 0 else targets[::-1]
        for name, url in order:
            try:
                result: dict[str, object] = dict(_run_once(url, args.rows))
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            result.update(target=name, round=round_no)
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
