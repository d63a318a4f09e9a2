"""Validation time per kernel: every bundled blueprint compiled to a signed
artifact and validated in a real sandbox subprocess (``esper.validate.runner``),
as the validate stage does. On CPU: the ``torch`` backend for target ``cpu`` (and,
with ``--triton``, Triton artifacts for ``cuda:sm_90`` checked under the
interpreter). On a GPU machine also the local arch, ``torch`` and ``triton``
backends, with device numerics, performance and memory checks.

    python benchmarks/bench_validate.py [--dtypes float32,float16,bfloat16]
        [--repeat 3] [--triton] [--configs cpu-torch,gpu-torch,gpu-triton]
        [--no-autotune] [--json out.json] [--results benchmarks/RESULTS.md]

Times are per kernel: ``checks`` is the sandbox's own work on one request (wall
and CPU seconds; the goal on GPU is <= 2 s), ``wall`` is request to answer as
the worker sees it, both with a warm sandbox (process start excluded and
reported apart as ``start``). With ``--results`` the "## Validation" section is
appended to RESULTS.md (earlier runs stay: append only)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from esper.artifacts import signing  # noqa: E402
from esper.compile.backend import CompileOptions  # noqa: E402
from esper.compile.pipeline import compile_blueprint  # noqa: E402
from esper.ir import BlueprintIR, bundled  # noqa: E402
from esper.validate.policy import ValidationPolicy  # noqa: E402
from esper.validate.protocol import ExpectedKernel  # noqa: E402
from esper.validate.runner import SandboxRunner  # noqa: E402

GOAL_GPU_S = 2.0


def local_target() -> str | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"cuda:sm_{major}{minor}"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def configurations(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(target, backend) pairs to validate."""
    gpu = local_target()
    named = {"cpu-torch": ("cpu", "torch")}
    if gpu is not None:
        named |= {"gpu-torch": (gpu, "torch"), "gpu-triton": (gpu, "triton")}
    elif args.triton:
        named["gpu-triton"] = ("cuda:sm_90", "triton")
    wanted = args.configs.split(",") if args.configs else list(named)
    return [named[c] for c in wanted if c in named]


def compile_one(ir: BlueprintIR, target: str, backend: str, dtype: str, key: Any, *,
                autotune: bool = True) -> Any:
    options = None
    if backend == "triton":
        import esper.triton.backend  # noqa: F401  (registers the backend)

        on_gpu = target == local_target()
        options = CompileOptions(dtype=dtype, autotune=on_gpu and autotune,
                                 extra={"binaries": on_gpu})
    return compile_blueprint(ir, target=target, dtype=dtype, backend=backend, options=options,
                             private_key=key)


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    private, public = signing.generate_keypair()
    pem = signing.public_pem(public).decode()
    policy = ValidationPolicy(timeout_s=args.timeout)
    runner = SandboxRunner(spares=args.spares, cwd=REPO)
    rows: list[dict[str, Any]] = []
    names = args.blueprints.split(",") if args.blueprints else sorted(bundled())
    try:
        t0 = time.monotonic()
        await runner.wait_ready()
        cold_start = time.monotonic() - t0
        for name in names:
            ir = bundled()[name]
            for dtype in args.dtypes.split(","):
                for target, backend in configurations(args):
                    if backend == "triton" and target == "cuda:sm_90" and dtype == "bfloat16" \
                            and local_target() is None:
                        continue  # the interpreter has no bfloat16
                    t = time.perf_counter()
                    res = compile_one(ir, target, backend, dtype, private,
                                      autotune=not args.no_autotune)
                    compile_s = time.perf_counter() - t
                    m = res.manifest
                    expected = ExpectedKernel(cache_key=m.cache_key,
                                              blueprint_hash=m.blueprint_hash, target=target,
                                              dtype=dtype, backend=backend, digest=res.digest)
                    reports = []
                    for _ in range(args.repeat):
                        await runner.wait_ready()  # exclude process start
                        reports.append(await runner.validate(
                            res.packed, expected=expected, blueprint=ir.to_dict(),
                            public_key_pem=pem, policy=policy))
                    rows.append(summarise(name, dtype, target, backend, compile_s=compile_s,
                                         reports=reports))
                    print(line(rows[-1]), flush=True)
                    if args.json:  # as we go: a run cut short keeps what it measured
                        args.json.write_text(json.dumps({"device": device_name(), "rows": rows},
                                                        indent=1))
    finally:
        await runner.aclose()
    rows.append({"cold_start_s": cold_start})
    return rows


def summarise(name: str, dtype: str, target: str, backend: str, *, compile_s: float,
              reports: list[Any]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(r.timings.get(key, float("nan")) for r in reports)

    last = reports[-1]
    return {
        "blueprint": name, "dtype": dtype, "target": target, "backend": backend,
        "device": last.device, "passed": all(r.passed for r in reports),
        "failures": sorted({c.check for r in reports for c in r.failures()}),
        "messages": sorted({f"{c.check}: {c.message}" for r in reports for c in r.failures()}),
        "checks_s": med("checks_s"), "checks_cpu_s": med("checks_cpu_s"),
        "wall_s": med("exchange_s"), "compile_s": compile_s, "repeat": len(reports),
        "per_check_ms": {c.check: c.duration_ms for c in last.checks if c.duration_ms},
        "perf": next((c.figure for c in last.checks if c.check == "performance"), None),
        "memory": next((c.figure for c in last.checks if c.check == "resources"), None),
        # a tuned Triton artifact may run the blueprint's plain torch ops (measured faster)
        "serves_torch_ops": any(c.check == "integrity" and c.details.get("serves_reference")
                                for c in last.checks),
    }


def line(row: dict[str, Any]) -> str:
    perf = "-" if row["perf"] is None else f"x{row['perf']:.2f}"
    mem = "-" if row["memory"] is None else f"x{row['memory']:.2f}"
    verdict = "pass" if row["passed"] else "FAIL " + ",".join(row["failures"])
    if row.get("serves_torch_ops"):
        verdict += " (torch ops)"
    return (f"| {row['blueprint']} | {row['dtype']} | {row['target']} | {row['backend']} | "
            f"{row['device']} | {verdict} | {row['checks_s']:.3f} | {row['checks_cpu_s']:.3f} | "
            f"{row['wall_s']:.3f} | {perf} | {mem} |")


def section(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO, check=False).stdout.strip()
    kernels = [r for r in rows if "blueprint" in r]
    cold = next(r["cold_start_s"] for r in rows if "cold_start_s" in r)
    gpu = [r for r in kernels if r["target"].startswith("cuda") and r["device"] != "cpu"]
    out = [
        "## Validation",
        "",
        f"Device: {device_name()}. Date: {dt.date.today().isoformat()}. Commit: `{commit}`. "
        f"torch {torch.__version__}, Python {platform.python_version()}. "
        f"Command: `python benchmarks/bench_validate.py {' '.join(sys.argv[1:])}`.",
        "",
        "Per kernel, median of "
        f"{args.repeat}: `checks` = the sandbox's work on one artifact (wall / CPU s), "
        "`wall` = request to answer as the worker sees it; warm sandbox, process start "
        f"excluded (a cold sandbox start took {cold:.2f} s here). perf/mem = kernel / eager "
        "(GPU only).",
        "",
        "| blueprint | dtype | target | backend | device | verdict | checks s | CPU s | "
        "wall s | perf | mem |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(line(r) for r in kernels),
        "",
    ]
    if gpu:
        worst = max(r["checks_s"] for r in gpu)
        out.append(f"GPU goal <= {GOAL_GPU_S:.0f} s per blueprint: worst {worst:.2f} s "
                   f"({'met' if worst <= GOAL_GPU_S else 'NOT met'}).")
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--blueprints", help="comma list (default: every bundled blueprint)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--triton", action="store_true",
                    help="on CPU: also Triton artifacts for cuda:sm_90 (interpreter)")
    ap.add_argument("--configs", help="comma list of cpu-torch, gpu-torch, gpu-triton "
                    "(default: all this machine can run)")
    ap.add_argument("--no-autotune", action="store_true",
                    help="compile Triton artifacts without measuring configs (faster)")
    ap.add_argument("--spares", type=int, default=1,
                    help="warm sandboxes kept (2 overlaps the next start with a validation: "
                    "quicker on a many-core GPU machine, noisier on a small CPU one)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--results", type=Path, help="append the section to this RESULTS.md")
    args = ap.parse_args()
    rows = asyncio.run(bench(args))
    text = section(rows, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"device": device_name(), "rows": rows}, indent=1))
    if args.results:
        existing = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
        args.results.write_text(existing.rstrip("\n") + "\n\n" + text)
    return 0 if all(r.get("passed", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
