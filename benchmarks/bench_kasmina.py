"""Dormant-seed overhead: a training step of a plain host vs the same host with
seed sites whose seeds are all dormant (default 8 sites x 16 seeds), plus the
cost of active seeds: K seeds sharing a kernel batched (vmap) vs one by one.

    python benchmarks/bench_kasmina.py [--device cuda] [--sites 8] [--seeds 16]

Prints a table and one JSON line. Plain and Kasmina steps are measured in
alternating rounds (so drift hits both) and reported as medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import date

import torch
from torch import nn

from esper.compile.reference import build_module
from esper.ir import BlueprintIR
from esper.kasmina import KasminaConfig, SeedState, add_seed_sites


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Host(nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def residual_mlp(d: int, hidden: int) -> BlueprintIR:
    return BlueprintIR.from_json(json.dumps({
        "schema_version": 1, "name": "residual_mlp",
        "inputs": [{"name": "x", "shape": ["B", d], "dtype": "float32"}],
        "nodes": [
            {"id": "h", "op": "linear", "inputs": ["x"], "attrs": {"out_features": hidden}},
            {"id": "a", "op": "gelu", "inputs": ["h"]},
            {"id": "y", "op": "linear", "inputs": ["a"],
             "attrs": {"out_features": d, "init": "zeros"}},
            {"id": "out", "op": "add", "inputs": ["x", "y"]},
        ],
        "outputs": ["out"],
    }))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Seconds per call, averaged over ``reps`` calls (synchronised at the ends)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def bench_dormant(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    host = Host(args.width, args.sites).to(device)
    plain = Host(args.width, args.sites).to(device)
    plain.load_state_dict(host.state_dict())
    kas = add_seed_sites(
        host,
        {f"blocks.{i}": (("B", args.width), "float32") for i in range(args.sites)},
        seeds_per_site=args.seeds,
    )
    x = torch.randn(args.batch, args.width, device=device)
    y = torch.randn(args.batch, 1, device=device)
    opt_k = torch.optim.Adam(host.parameters(), lr=1e-4)
    opt_p = torch.optim.Adam(plain.parameters(), lr=1e-4)

    def closure(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss
        return run

    step = [0]

    def kas_step() -> None:
        step[0] += 1
        kas.train_step(closure(host, opt_k), opt_k, step[0])

    def plain_step() -> None:
        closure(plain, opt_p)()
        opt_p.step()

    for _ in range(args.warmup):
        kas_step()
        plain_step()
    plain_t, kas_t = [], []
    for r in range(args.rounds):  # alternate which goes first: no order bias
        pair = [(plain_t, plain_step), (kas_t, kas_step)]
        for times, fn in pair if r % 2 == 0 else pair[::-1]:
            times.append(_time(fn, device, args.reps))
    p, k = statistics.median(plain_t), statistics.median(kas_t)
    kas.close()
    return {
        "plain_step_ms": p * 1e3,
        "dormant_step_ms": k * 1e3,
        "overhead_pct": (k / p - 1) * 100,
        "overhead_pct_min": (min(kas_t) / min(plain_t) - 1) * 100,
    }


def bench_active(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """One site, ``--seeds`` seeds of one kernel in GRAFTING: forward+backward of
    the host, batched (one vmapped launch per op) vs seed-by-seed."""
    out: dict[str, float] = {}
    ir = residual_mlp(args.width, args.width)
    for batched in (True, False):
        torch.manual_seed(0)
        host = Host(args.width, 2).to(device)
        kas = add_seed_sites(
            host, {"blocks.0": (("B", args.width), "float32")}, seeds_per_site=args.seeds,
            config=KasminaConfig(train_steps=None, stabilize_steps=None),
        )
        for _ in range(args.seeds):
            kas.offer_kernel("blocks.0", None, "k", lambda d: build_module(ir, device=d))
        kas.step_boundary(0)
        kas.wait_for_loads()
        kas.step_boundary(1)
        for k in range(args.seeds):
            kas.transition("blocks.0", k, SeedState.GRAFTING, "bench")
        (group,) = kas.site("blocks.0").running
        group.batched = batched
        x = torch.randn(args.batch, args.width, device=device)

        def fwd_bwd(host: nn.Module = host, x: torch.Tensor = x) -> None:
            host(x).sum().backward()

        for _ in range(args.warmup):
            fwd_bwd()
        t = statistics.median(_time(fwd_bwd, device, args.reps) for _ in range(args.rounds))
        out["batched_ms" if batched else "looped_ms"] = t * 1e3
        kas.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sites", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    ap.add_argument("--commit", default="unknown", help="recorded where git is absent")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dormant = bench_dormant(args, device)
    active = bench_active(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip() or args.commit
    print(f"device {device.type} ({name or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, commit {commit}, {date.today()}")
    print(f"host: {args.sites} blocks of d={args.width} (MLP 4x), batch {args.batch}; "
          f"{args.sites} sites x {args.seeds} dormant seeds")
    print(f"  plain step    {dormant['plain_step_ms']:8.3f} ms")
    print(f"  dormant sites {dormant['dormant_step_ms']:8.3f} ms  "
          f"overhead {dormant['overhead_pct']:+.2f} % (medians), "
          f"{dormant['overhead_pct_min']:+.2f} % (best rounds)")
    print(f"active: {args.seeds} GRAFTING seeds of one kernel at one site, host fwd+bwd")
    print(f"  batched (vmap) {active['batched_ms']:8.3f} ms   looped {active['looped_ms']:8.3f} ms")
    print(json.dumps({"bench": "kasmina", **vars(args), "device": str(device),
                      "device_name": name, "commit": commit, "date": str(date.today()),
                      **dormant, **active}))


if __name__ == "__main__":
    main()
