"""Where a Triton-backend step's host time goes, line by line (GPU machine).

For each ``case-dtype``: eager vs Esper (shipped artifact) in the training-loop
view at several burst lengths (steps back to back, one sync), then the
generated forward/backward re-executed with a timestamp before every line and
run for 300 steps back to back; the median host time of each line over the
second half (steady state) is printed, with the time before the forward's
first line and between forward and backward (the autograd function's own).

    python benchmarks/bench_triton_lines.py --shipped .triton-shipped \\
        conv_block-float32-fused conv_block-bfloat16-fused

(an artifact that serves torch ops has no generated code: name the fused plan
``bench_triton.py build`` writes beside it, ``KEY-fused``)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_triton import case_inputs, train_step

START, END = -1, -2


def instrument(source: str) -> tuple[str, list[str]]:
    """``source`` with ``_T.append((line, clock))`` before every statement."""
    lines = source.split("\n")
    out = []
    for i, ln in enumerate(lines):
        st = ln.strip()
        indent = ln[: len(ln) - len(ln.lstrip())]
        if st and not st.startswith(("def ", "else", "elif", "#")):
            out.append(f"{indent}_T.append(({i}, _pc()))")
        out.append(ln)
    return "\n".join(out), lines


def burst_ms(m: Any, xs: list[Any], g: Any, n: int, rounds: int = 3) -> float:
    import torch

    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(m, xs, g)
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


def lines(shipped: Path, key: str, steps: int = 300) -> None:
    import torch

    from esper.artifacts import unpack_verified
    from esper.artifacts.signing import load_public_key
    from esper.compile.reference import build_module
    from esper.triton.backend import TritonBackend

    # KEY-fused: the fused plan built beside an artifact that serves torch ops
    name, dtype_name = key.removesuffix("-fused").rsplit("-", 1)
    dtype = getattr(torch, dtype_name)
    art = unpack_verified((shipped / f"{key}.esper").read_bytes(),
                          load_public_key(shipped / "pub.pem"))
    esper = TritonBackend().load(art.manifest, art.files)("cuda")
    ref = build_module(esper.ir, device="cuda", dtype=dtype)
    ref.load_state_dict(esper.state_dict())
    xs = case_inputs(name, dtype)
    g = torch.randn_like(esper(*xs))
    for n in (20, 100, 300):
        print(f"{key}: {n} steps back to back, ms/step: eager "
              f"{burst_ms(ref, xs, g, n):.3f}, Esper {burst_ms(esper, xs, g, n):.3f}", flush=True)
    sched = esper._schedule
    assert sched is not None, (f"{key} serves torch ops: nothing generated to profile "
                               f"(its fused plan: {key}-fused)")
    params = [esper.params._parameters[k] for k in esper._pkeys]
    prog = sched.program(tuple(t.requires_grad for t in (*xs, *params)))
    glb = prog.forward.__globals__
    source, text = instrument(prog.source)
    stamps: list[tuple[int, float]] = []
    glb["_T"], glb["_pc"] = stamps, time.perf_counter
    exec(compile(source, "<esper-host-lines>", "exec"), glb)  # our own generated code
    prog.forward, prog.backward = glb["forward"], glb["backward"]
    torch.cuda.synchronize()
    for _ in range(steps):
        stamps.append((START, time.perf_counter()))
        train_step(esper, xs, g)
        stamps.append((END, time.perf_counter()))
    torch.cuda.synchronize()
    per: dict[int, list[float]] = {}
    half = stamps[len(stamps) // 2:]
    for (a, ta), (_, tb) in itertools.pairwise(half):
        per.setdefault(a, []).append((tb - ta) * 1e6)
    print(f"{key}: host us per line, median of the last {steps // 2} steps")
    for k, v in sorted(per.items()):
        label = {START: "<step start: clear grads, module call, apply>",
                 END: "<between steps>"}.get(k) or text[k].strip()
        if statistics.median(v) >= 2 or k < 0:
            print(f"{statistics.median(v):8.1f}  {label[:120]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shipped", type=Path, required=True)
    ap.add_argument("cases", nargs="+")
    args = ap.parse_args()
    import torch

    torch.backends.cudnn.benchmark = True  # as in bench_triton run
    for key in args.cases:
        lines(args.shipped, key)


if __name__ == "__main__":
    main()
