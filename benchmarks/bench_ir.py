"""BlueprintIR benchmark: parse+validate, canonical hash and infer_shapes on a
50-node and a 10,000-node blueprint (stacked pre-norm residual MLP blocks), plus
a symmetric one whose hash needs the tie-breaking search.

Run: python benchmarks/bench_ir.py [--reps-small N] [--reps-large N]
Prints a Markdown table (median and p99 per operation) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import date
from typing import Any

from esper.ir import BlueprintIR


def residual_stack(blocks: int, d: int = 64) -> dict[str, Any]:
    """``blocks`` x (layer_norm → linear 4d → gelu → linear d (zeros) → add): 5 nodes each."""
    nodes: list[dict[str, Any]] = []
    prev = "x"
    for b in range(blocks):
        p = f"b{b}"
        nodes += [
            {"id": f"{p}_ln", "op": "layer_norm", "inputs": [prev],
             "attrs": {"normalized_shape": d}},
            {"id": f"{p}_up", "op": "linear", "inputs": [f"{p}_ln"],
             "attrs": {"out_features": 4 * d}},
            {"id": f"{p}_act", "op": "gelu", "inputs": [f"{p}_up"]},
            {"id": f"{p}_down", "op": "linear", "inputs": [f"{p}_act"],
             "attrs": {"out_features": d, "init": "zeros"}},
            {"id": f"{p}_out", "op": "add", "inputs": [prev, f"{p}_down"]},
        ]
        prev = f"{p}_out"
    return {"schema_version": 1, "name": f"stack{blocks}",
            "inputs": [{"name": "x", "shape": ["B", d], "dtype": "float32"}],
            "nodes": nodes, "outputs": [prev], "metadata": {"author": "bench"}}


def experts(n: int, d: int = 64) -> dict[str, Any]:
    """``n`` identical linear→gelu→linear experts of x summed by a balanced add tree:
    every expert is interchangeable, so the hash must search (2n + n - 1 nodes)."""
    nodes: list[dict[str, Any]] = []
    level = []
    for i in range(n):
        nodes += [
            {"id": f"e{i}_up", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 2 * d}},
            {"id": f"e{i}_act", "op": "gelu", "inputs": [f"e{i}_up"]},
            {"id": f"e{i}_down", "op": "linear", "inputs": [f"e{i}_act"],
             "attrs": {"out_features": d}},
        ]
        level.append(f"e{i}_down")
    k = 0
    while len(level) > 1:
        nxt = []
        for a, b in zip(level[::2], level[1::2], strict=True):
            nodes.append({"id": f"s{k}", "op": "add", "inputs": [a, b]})
            nxt.append(f"s{k}")
            k += 1
        level = nxt
    return {"schema_version": 1, "name": f"experts{n}",
            "inputs": [{"name": "x", "shape": ["B", d], "dtype": "float32"}],
            "nodes": nodes, "outputs": level}


def timed(fn: Callable[[Any], object], reps: int, setup: Callable[[], Any]) -> list[float]:
    """Seconds per ``fn(setup())`` call; setup runs untimed, one object alive at a time."""
    gc.collect()
    out = []
    for _ in range(reps):
        arg = setup()
        t0 = time.perf_counter()
        fn(arg)
        out.append(time.perf_counter() - t0)
        del arg
    return out


def fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


def bench(label: str, data: dict[str, Any], reps: int) -> list[tuple[str, str, list[float]]]:
    text = json.dumps(data)
    BlueprintIR.from_json(text).canonical_hash()  # warm imports and caches of the code

    def fresh() -> BlueprintIR:
        return BlueprintIR.from_json(text)

    def hashed() -> BlueprintIR:
        b = fresh()
        b.canonical_hash()
        return b

    def total(t: str) -> str:
        return BlueprintIR.from_json(t).canonical_hash()

    return [
        (label, "parse + validate (from_json)",
         timed(BlueprintIR.from_json, reps, lambda: text)),
        (label, "canonical_hash, first call", timed(BlueprintIR.canonical_hash, reps, fresh)),
        (label, "canonical_hash, cached", timed(BlueprintIR.canonical_hash, reps, hashed)),
        (label, "infer_shapes, first call", timed(BlueprintIR.infer_shapes, reps, fresh)),
        (label, "parse + validate + hash", timed(total, reps, lambda: text)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps-small", type=int, default=2000)
    ap.add_argument("--reps-large", type=int, default=30)
    ap.add_argument("--only", choices=["50", "10000", "experts"], action="append",
                    help="run only these blueprints (repeatable; default all)")
    args = ap.parse_args()
    only = set(args.only or ["50", "10000", "experts"])
    rows = []
    if "50" in only:
        rows += bench("50 nodes", residual_stack(10), args.reps_small)
    if "10000" in only:
        rows += bench("10,000 nodes", residual_stack(2000), args.reps_large)
    if "experts" in only:
        rows += bench("16 interchangeable experts (63 nodes)", experts(16),
                      max(1, args.reps_small // 10))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{date.today()}, commit {commit}, load average after the run {load}")
    print()
    print("| blueprint | operation | median | p99 | min | reps |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for label, what, xs in rows:
        print(f"| {label} | {what} | {fmt(statistics.median(xs))} | {fmt(p99(xs))} "
              f"| {fmt(min(xs))} | {len(xs)} |")


if __name__ == "__main__":
    main()
