"""Triton backend benchmark: eager torch vs torch.compile vs Esper, forward+backward.

Two steps, two machines:

  build (this CPU machine, no GPU): compile every case for cuda:sm_90 in fp32 and
  bf16 (heuristic configs), sign, write ``<dir>/<case>-<dtype>.esper`` + ``pub.pem``
  + ``compile_times.json``. ``--triton-python`` builds the binaries with another
  Python's Triton (the GPU machine's version).

      python benchmarks/bench_triton.py build --out .triton-shipped \
          --triton-python /work/venv-triton36/bin/python

  run (GPU machine): ceilings (copy bandwidth, matmul rate), then per case and
  dtype: eager, torch.compile (default mode), Esper from the shipped artifact
  (zero compiles counted), optionally Esper tuned on this GPU (``--tune``); hot
  load time; writes ``results.json`` and ``results.md``.

      python benchmarks/bench_triton.py run --shipped .triton-shipped --out $OUT

  host (any machine, no GPU): a CPU proxy of the host cost of one step.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("float32", "bfloat16")


def _x(name: str, shape: list[Any]) -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": "float32"}


def _lin(i: str, src: str, n: int, **kw: Any) -> dict[str, Any]:
    return {"id": i, "op": "linear", "inputs": [src], "attrs": {"out_features": n, **kw}}


# name -> (blueprint, symbol bindings at training shape)
CASES: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    "residual_mlp": ({"inputs": [_x("x", ["B", 512])], "nodes": [
        _lin("h", "x", 2048), {"id": "a", "op": "gelu", "inputs": ["h"]},
        _lin("y", "a", 512), {"id": "out", "op": "add", "inputs": ["x", "y"]}],
        "outputs": ["out"]}, {"B": 16384}),
    "bottleneck_adapter": ({"inputs": [_x("x", ["B", 768])], "nodes": [
        {"id": "n", "op": "layer_norm", "inputs": ["x"], "attrs": {"normalized_shape": [768]}},
        _lin("d", "n", 64), {"id": "a", "op": "relu", "inputs": ["d"]},
        _lin("u", "a", 768), {"id": "out", "op": "add", "inputs": ["x", "u"]}],
        "outputs": ["out"]}, {"B": 32768}),
    "conv_block": ({"inputs": [_x("x", ["B", 64, 32, 32])], "nodes": [
        {"id": "c1", "op": "conv2d", "inputs": ["x"],
         "attrs": {"out_channels": 64, "kernel_size": 3, "padding": 1}},
        {"id": "r1", "op": "relu", "inputs": ["c1"]},
        {"id": "c2", "op": "conv2d", "inputs": ["r1"],
         "attrs": {"out_channels": 64, "kernel_size": 3, "padding": 1}},
        {"id": "s", "op": "add", "inputs": ["x", "c2"]},
        {"id": "out", "op": "relu", "inputs": ["s"]}], "outputs": ["out"]}, {"B": 64}),
    "elementwise_chain": ({"inputs": [_x("x", ["B", 1024]), _x("y", ["B", 1024])], "nodes": [
        {"id": "s", "op": "sigmoid", "inputs": ["y"]},
        {"id": "m", "op": "mul", "inputs": ["x", "s"]},
        {"id": "g", "op": "gelu", "inputs": ["m"]},
        {"id": "t", "op": "tanh", "inputs": ["g"]},
        {"id": "a", "op": "add", "inputs": ["t", "x"]},
        {"id": "out", "op": "scale", "inputs": ["a"], "attrs": {"value": 0.5}}],
        "outputs": ["out"]}, {"B": 65536}),
    "norm_gated_linear": ({"inputs": [_x("x", ["B", 1024])], "nodes": [
        {"id": "n", "op": "rms_norm", "inputs": ["x"], "attrs": {"normalized_shape": [1024]}},
        _lin("a", "n", 2048), _lin("b", "n", 2048),
        {"id": "sa", "op": "silu", "inputs": ["a"]},
        {"id": "g", "op": "mul", "inputs": ["sa", "b"]},
        _lin("o", "g", 1024), {"id": "out", "op": "add", "inputs": ["x", "o"]}],
        "outputs": ["out"]}, {"B": 16384}),
    "softmax_attention": ({"inputs": [_x("q", ["B", 256, 64]), _x("k", ["B", 256, 64]),
                                      _x("v", ["B", 256, 64])], "nodes": [
        {"id": "kt", "op": "permute", "inputs": ["k"], "attrs": {"dims": [0, 2, 1]}},
        {"id": "s", "op": "matmul", "inputs": ["q", "kt"]},
        {"id": "z", "op": "scale", "inputs": ["s"], "attrs": {"value": 0.125}},
        {"id": "p", "op": "softmax", "inputs": ["z"], "attrs": {"dim": -1}},
        {"id": "o", "op": "matmul", "inputs": ["p", "v"]}], "outputs": ["o"]}, {"B": 256}),
}


def case_ir(name: str) -> Any:
    from esper.ir import BlueprintIR

    bp, _ = CASES[name]
    return BlueprintIR.from_dict({"schema_version": 1, "name": name, **bp})


# --- build (CPU machine) ----------------------------------------------------------------


def build(out: Path, triton_python: str | None) -> None:
    from esper.artifacts import Artifact
    from esper.artifacts.signing import generate_keypair, public_pem
    from esper.compile.backend import CompileOptions
    from esper.triton.backend import TritonBackend

    out.mkdir(parents=True, exist_ok=True)
    priv, pub = generate_keypair()
    (out / "pub.pem").write_bytes(public_pem(pub))
    backend = TritonBackend()
    times: dict[str, Any] = {}
    try:
        from esper.ir import bundled

        extra = dict(bundled())
    except Exception:
        extra = {}
    extra_opts = {"triton_python": triton_python} if triton_python else {}

    def emit(name: str, ir: Any, dtype: str, suffix: str = "", **serve: str) -> str:
        """Compile, sign and write one artifact; return what its plan serves."""
        start = time.perf_counter()
        cf = backend.compile(ir, "cuda:sm_90", CompileOptions(
            dtype=dtype, autotune=False, extra={**extra_opts, **serve}))
        wall = time.perf_counter() - start
        build_info = json.loads(cf.files["triton/build.json"])
        served = json.loads(cf.files["triton/plan.json"])["serve"]
        art = Artifact.build(cache_key="0" * 64, blueprint_hash=ir.canonical_hash(),
                             target="cuda:sm_90", dtype=dtype, backend="triton",
                             versions={"triton": build_info["triton_version"]},
                             options=cf.options, files=cf.files)
        key = f"{name}-{dtype}{suffix}"
        (out / f"{key}.esper").write_bytes(art.pack(priv))
        times[key] = {"wall_s": wall, **cf.timings, "serve": served,
                      "triton": build_info["triton_version"],
                      "kernels": len(build_info["kernels"])}
        print(f"{key:32s} compiled in {wall:5.2f} s ({len(build_info['kernels'])} "
              f"kernels, serves {served}, triton {build_info['triton_version']})")
        return served

    for name in [*CASES, *(f"bundled_{n}" for n in extra)]:
        for dtype in DTYPES:
            ir = case_ir(name) if name in CASES else extra[name.removeprefix("bundled_")]
            if emit(name, ir, dtype) == "reference" and name in CASES:
                # the fused plan too, measured beside the torch ops it was predicted
                # to lose to
                emit(name, ir, dtype, "-fused", serve="schedule")
    (out / "compile_times.json").write_text(json.dumps(times, indent=1))


# --- run (GPU machine) ------------------------------------------------------------------


class CompileCounter:
    """Counts every ``triton.compile`` call (cache hits included) via Triton's listener."""

    def __init__(self) -> None:
        import triton

        self.count = 0
        self._knobs = triton.knobs.compilation
        self._knobs.listener = self._on_compile

    def _on_compile(self, **kw: Any) -> None:
        self.count += 1


def clear_grads(m: Any, xs: list[Any]) -> None:
    for x in xs:
        x.grad = None
    for p in m.parameters():
        p.grad = None


def train_step(m: Any, xs: list[Any], g: Any) -> None:
    """One forward+backward with the grads of the last step cleared first."""
    clear_grads(m, xs)
    m(*xs).backward(g)


def _bench(fn: Any, rep_ms: int = 200) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def _per_step_ms(fn: Any, n: int, rounds: int, device_done: bool) -> float:
    """Median over ``rounds`` of ``n`` steps back to back; the clock stops when the
    host has enqueued them, or (``device_done``) when the GPU has run them."""
    import torch

    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if device_done:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / n * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def host_ms(fn: Any, n: int = 20) -> float:
    """Host time to enqueue one step (no sync inside the timed loop), median of 5."""
    return _per_step_ms(fn, n, 5, device_done=False)


def loop_ms(fn: Any, n: int = 100, rounds: int = 5) -> float:
    """A training loop's view: ``n`` steps back to back, one sync at the end (the
    host and the GPU overlap as they would in a trainer), median of ``rounds``."""
    return _per_step_ms(fn, n, rounds, device_done=True)


def _fused_note(row: dict[str, Any]) -> str:
    if "fused_ms" not in row:
        return ""
    return f"  fused (not served) {row['fused_ms']:.3f} / loop {row['fused_loop_ms']:.3f}"


def paired(fns: dict[str, Any], measure: Any, rounds: int = 6) -> dict[str, float]:
    """Each of ``fns`` measured ``rounds`` times, interleaved with the others (the
    order rotating), best of each: a drift of the host during a row reaches every
    side alike instead of deciding the comparison (host-bound rows moved by ±10%
    from one measurement of the same module to the next)."""
    best = {k: math.inf for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            best[k] = min(best[k], measure(fns[k]))
    return best


def host_costs(shipped: Path, pub: Any) -> dict[str, float]:
    """What one op costs the host on this machine (microseconds, tiny tensors):
    the cost model behind the host-bound rows."""
    import torch

    from esper.artifacts import unpack_verified
    from esper.triton.backend import TritonBackend

    a = torch.randn(64, 64, device="cuda")
    x = torch.randn(16384, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16)
    out: dict[str, float] = {}
    # a training-size bf16 GEMM: 10 enqueued back to back (~50 us of GPU each)
    out["torch_linear_bf16_16kx512x2048_us"] = host_ms(
        lambda: [torch.nn.functional.linear(x, w) for _ in range(10)], n=2) * 100
    for label, fn in (("torch_add", lambda: a + a), ("torch_mm", lambda: a @ a),
                      ("torch_empty", lambda: torch.empty(64, 64, device="cuda")),
                      ("torch_sum_dim0", lambda: a.sum(0))):
        out[label + "_us"] = host_ms(lambda fn=fn: [fn() for _ in range(10)]) * 100
    art = unpack_verified((shipped / "elementwise_chain-float32.esper").read_bytes(), pub)
    chain = TritonBackend().load(art.manifest, art.files)("cuda")
    x = torch.randn(8, 1024, device="cuda")
    with torch.no_grad():  # module call: input checks, one alloc, one launch
        out["esper_chain_fwd_nograd_us"] = host_ms(lambda: chain(x, x)) * 1e3
        ref = torch.sigmoid
        out["torch_6_elementwise_ops_us"] = host_ms(
            lambda: ((torch.tanh(torch.nn.functional.gelu(x * ref(x))) + x) * 0.5)) * 1e3
    xg = x.clone().requires_grad_(True)
    out["esper_chain_fwd_bwd_us"] = host_ms(lambda: chain(xg, xg).sum().backward()) * 1e3
    return out


def ceilings() -> dict[str, float]:
    import torch

    n = 1 << 28  # 1 GiB of fp32
    a = torch.empty(n, device="cuda")
    a.normal_()
    b = torch.empty_like(a)
    ms = _bench(lambda a=a, b=b: b.copy_(a))
    out = {"copy_TBps": 2 * a.numel() * 4 / ms / 1e9}
    for dt, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        m = 8192
        x = torch.randn(m, m, device="cuda", dtype=dt)
        y = torch.randn(m, m, device="cuda", dtype=dt)
        ms = _bench(lambda x=x, y=y: x @ y)
        out[f"matmul_{name}_TFLOPs"] = 2 * m**3 / ms / 1e9
    return out


def case_inputs(name: str, dtype: Any, device: str = "cuda") -> list[Any]:
    import torch

    ir = case_ir(name)
    sym = CASES[name][1]
    gen = torch.Generator(device=device).manual_seed(0)  # not the default: CUDA graphs
    return [torch.randn([sym.get(d, d) if isinstance(d, str) else d for d in i.shape],
                        device=device, dtype=dtype, generator=gen).requires_grad_(True)
            for i in ir.inputs]


def _flops(name: str) -> float:
    sym = CASES[name][1]
    b = sym["B"]
    if name == "residual_mlp":
        return 6 * b * 512 * 2048 * 2
    if name == "bottleneck_adapter":
        return 6 * b * 768 * 64 * 2
    if name == "norm_gated_linear":
        return 6 * b * 1024 * 2048 * 3
    if name == "conv_block":
        return 6 * b * 32 * 32 * 64 * 64 * 9 * 2
    if name == "softmax_attention":
        return 6 * b * 256 * 256 * 64 * 2
    return 0.0


def run(shipped: Path, out: Path, tune: bool, only: list[str] | None, rounds: int = 6) -> None:
    import torch
    import triton

    from esper.artifacts import unpack_verified
    from esper.artifacts.signing import load_public_key
    from esper.compile.backend import CompileOptions
    from esper.compile.reference import build_module
    from esper.triton.backend import TritonBackend

    torch.backends.cudnn.benchmark = True
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name()
    info: dict[str, Any] = {"device": dev, "torch": torch.__version__,
                            "triton": triton.__version__, "cases": {}}
    info["ceilings"] = ceil = ceilings()
    print(f"{dev}: copy {ceil['copy_TBps']:.2f} TB/s, bf16 mm {ceil['matmul_bf16_TFLOPs']:.0f} "
          f"TFLOP/s, fp32 mm {ceil['matmul_fp32_TFLOPs']:.0f} TFLOP/s", flush=True)
    pub = load_public_key(shipped / "pub.pem")
    info["host_costs"] = host_costs(shipped, pub)
    print("host costs (us):", json.dumps({k: round(v, 1) for k, v in info["host_costs"].items()}),
          flush=True)
    counter = CompileCounter()
    graphed: list[tuple[dict[str, Any], Any, Any, list[Any], Any]] = []
    names = only or list(CASES)
    for name in names:
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            key = f"{name}-{dtype_name}"
            row: dict[str, Any] = {}
            packed = (shipped / f"{key}.esper").read_bytes()
            before = counter.count
            art = unpack_verified(packed, pub)
            esper = TritonBackend().load(art.manifest, art.files)("cuda")
            assert esper.ready, "shipped binaries not used"
            row["serves"] = "reference" if esper.serves_reference else "schedule"
            ref = build_module(esper.ir, device="cuda", dtype=dtype)
            ref.load_state_dict(esper.state_dict())
            xs = case_inputs(name, dtype)
            y = esper(*xs)
            g = torch.randn(y.shape, device=y.device, dtype=y.dtype,
                            generator=torch.Generator(device="cuda").manual_seed(1))

            step = functools.partial(train_step, xs=xs, g=g)

            step(esper)
            torch.cuda.synchronize()
            row["esper_compiles"] = counter.count - before
            # correctness vs eager (same params, same inputs)
            ye = ref(*xs).detach()
            y = y.detach()
            row["rel_err_vs_eager"] = float((y.float() - ye.float()).norm() / ye.float().norm())
            # a second eager module, built the same way: how far apart two
            # measurements of identical work land on this host (the noise floor)
            ref2 = build_module(esper.ir, device="cuda", dtype=dtype)
            ref2.load_state_dict(esper.state_dict())
            step(ref2)
            sides = {"eager": functools.partial(step, ref), "esper": functools.partial(step, esper),
                     "eager_again": functools.partial(step, ref2)}
            fused_path = shipped / f"{key}-fused.esper"
            if fused_path.exists():  # the fused plan this artifact was predicted to lose with
                fart = unpack_verified(fused_path.read_bytes(), pub)
                fused = TritonBackend().load(fart.manifest, fart.files)("cuda")
                assert fused.backend_in_use == "triton"
                fused.load_state_dict(esper.state_dict())
                sides["fused"] = functools.partial(step, fused)
                step(fused)
            for side, ms in paired(sides, _bench, rounds).items():
                row[f"{side}_ms"] = ms
            for side, ms in paired(sides, functools.partial(loop_ms, rounds=2), rounds).items():
                row[f"{side}_loop_ms"] = ms
            del sides["eager_again"], ref2
            row["eager_host_ms"] = host_ms(functools.partial(step, ref))
            row["esper_host_ms"] = host_ms(functools.partial(step, esper))
            if tune:
                t0 = time.perf_counter()
                be = TritonBackend(Path(tempfile.mkdtemp()))
                major, minor = torch.cuda.get_device_capability()
                cf = be.compile(case_ir(name), f"cuda:sm_{major}{minor}",
                                CompileOptions(dtype=dtype_name, autotune=True))
                tuned = be.load(art.manifest, cf.files)("cuda")
                tuned.load_state_dict(esper.state_dict())
                row["tune_s"] = time.perf_counter() - t0
                with torch.no_grad():
                    yt = tuned(*xs).float()
                row["tuned_rel_err_vs_eager"] = float((yt - ye.float()).norm()
                                                      / ye.float().norm())
                row["esper_tuned_host_ms"] = host_ms(functools.partial(step, tuned))
                # eager again, in the state tuning left the process in (allocator,
                # caches), interleaved with the tuned module: its own baseline
                pair = {"eager_after_tune": functools.partial(step, ref),
                        "esper_tuned": functools.partial(step, tuned)}
                for side, ms in paired(pair, _bench, rounds).items():
                    row[f"{side}_ms"] = ms
                for side, ms in paired(pair, functools.partial(loop_ms, rounds=2), rounds).items():
                    row[f"{side}_loop_ms"] = ms
                plan = json.loads(cf.files["triton/plan.json"])
                row["tuning"] = plan["meta"]["tuning"]
                row["tuned_serve"] = plan.get("serve", "schedule")
            try:
                # every case is a new BlueprintModule of one class: without a reset
                # dynamo hits its recompile limit and silently runs eager
                torch._dynamo.reset()
                t0 = time.perf_counter()
                comp = torch.compile(ref)
                step(comp)
                torch.cuda.synchronize()
                row["compile_first_step_s"] = time.perf_counter() - t0
                row["torch_compile_ms"] = _bench(functools.partial(step, comp))
                row["compile_loop_ms"] = loop_ms(functools.partial(step, comp))
            except Exception as exc:  # record, keep going
                row["torch_compile_error"] = repr(exc)[:300]
            graphed.append((row, ref, esper, xs, step))
            # unavoidable traffic: inputs read twice (fwd, bwd) and their grads written,
            # params read twice and grads written, output written, its grad read
            nbytes = (3 * sum(x.numel() for x in xs) + 3 * sum(p.numel() for p in ref.parameters())
                      + 2 * y.numel()) * y.element_size()
            flops = _flops(name)
            rate = ceil["matmul_bf16_TFLOPs" if dtype_name == "bfloat16" else "matmul_fp32_TFLOPs"]
            row["floor_ms"] = max(nbytes / ceil["copy_TBps"] / 1e9, flops / rate / 1e9)
            row["min_bytes"], row["flops"] = nbytes, flops
            best = min(row["esper_ms"], row.get("esper_tuned_ms", math.inf))
            row["esper_best_ms"] = best
            row["roofline_fraction"] = row["floor_ms"] / best
            # each Esper figure against the eager figure taken next to it
            ratios = [row["eager_ms"] / row["esper_ms"]]
            if "esper_tuned_ms" in row:
                ratios.append(row["eager_after_tune_ms"] / row["esper_tuned_ms"])
            row["speedup_vs_eager"] = max(ratios)
            if "torch_compile_ms" in row:
                row["speedup_vs_compile"] = row["torch_compile_ms"] / best
            info["cases"][key] = row
            print(f"{key:30s} eager {row['eager_ms']:7.3f}  compile "
                  f"{row.get('torch_compile_ms', float('nan')):7.3f}  esper {row['esper_ms']:7.3f}"
                  f"  tuned {row.get('esper_tuned_ms', float('nan')):7.3f}  graphed e/E "
                  f"{row.get('eager_graphed_ms', float('nan')):6.3f}/"
                  f"{row.get('esper_graphed_ms', float('nan')):6.3f}  host e/E "
                  f"{row['eager_host_ms']:6.3f}/{row['esper_host_ms']:6.3f}  floor "
                  f"{row['floor_ms']:6.3f}  x{row['speedup_vs_eager']:.2f}  "
                  f"compiles {row['esper_compiles']}  err {row['rel_err_vs_eager']:.1e}  "
                  f"serves {row['serves']}  loop e/E {row['eager_loop_ms']:.3f}/"
                  f"{row['esper_loop_ms']:.3f}  eager again {row['eager_again_ms']:.3f} / loop "
                  f"{row['eager_again_loop_ms']:.3f}{_fused_note(row)}"
                  f"{'  tuned serves ' + row['tuned_serve'] if 'tuned_serve' in row else ''}",
                  flush=True)
            (out / "results.json").write_text(json.dumps(info, indent=1))
    info["hot_load"] = hot_load(shipped, pub)
    (out / "results.json").write_text(json.dumps(info, indent=1))
    # CUDA graphs take Python launch overhead out of both sides (a trainer may graph
    # its step). Last: a capture that fails can leave the default CUDA generator
    # marked as capturing, which breaks every later module init that draws from it.
    for row, ref, esper, xs, step in graphed:
        for label, m in (("eager", ref), ("esper", esper)):
            try:
                sample = tuple(x.detach().clone().requires_grad_(True) for x in xs)
                gm = torch.cuda.make_graphed_callables(m, sample)
                row[f"{label}_graphed_ms"] = _bench(lambda gm=gm, step=step: step(gm))
            except Exception as exc:  # record, keep going
                row[f"{label}_graphed_error"] = repr(exc)[:300]
        print(f"graphed eager/esper {row.get('eager_graphed_ms', math.nan):.3f}/"
              f"{row.get('esper_graphed_ms', math.nan):.3f}", flush=True)
    (out / "results.json").write_text(json.dumps(info, indent=1))
    summary(info)


def hot_load(shipped: Path, pub: Any) -> dict[str, Any]:
    """Artifact bytes on local disk -> first launch done, in a warm trainer process."""
    import torch

    from esper.artifacts import unpack_verified
    from esper.triton.backend import TritonBackend

    samples = []
    phases: dict[str, list[float]] = {}
    gen = torch.Generator(device="cuda").manual_seed(2)
    paths = sorted(shipped.glob("*.esper"))
    for rep in range(6):
        for path in paths:
            for mod in [m for m in sys.modules if m.startswith("esper_kernels_")]:
                del sys.modules[mod]  # a fresh import of the kernel source each time
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            art = unpack_verified(path.read_bytes(), pub)
            t1 = time.perf_counter()
            module = TritonBackend(Path(tempfile.mkdtemp())).load(art.manifest, art.files)("cuda")
            t2 = time.perf_counter()
            xs = [torch.randn([2 if isinstance(d, str) else d for d in i.shape], device="cuda",
                              dtype=module.compute_dtype, generator=gen)
                  for i in module.ir.inputs]
            t3 = time.perf_counter()
            module(*xs)
            torch.cuda.synchronize()
            t4 = time.perf_counter()
            dt = (t4 - t0 - (t3 - t2)) * 1e3  # the inputs are the trainer's, not load time
            if rep > 0:  # rep 0 builds/loads Triton's per-signature launcher stubs
                samples.append(dt)
                for k, v in (("unpack", t1 - t0), ("load", t2 - t1), ("first_call", t4 - t3)):
                    phases.setdefault(k, []).append(v * 1e3)
    samples.sort()
    return {"n": len(samples), "p50_ms": statistics.median(samples),
            "p99_ms": samples[min(len(samples) - 1, int(0.99 * len(samples)))],
            "max_ms": samples[-1],
            "phases_p50_ms": {k: statistics.median(v) for k, v in phases.items()}}


def summary(info: dict[str, Any]) -> None:
    rows = info["cases"]
    sp = [r["speedup_vs_eager"] for r in rows.values()]
    spc = [r["speedup_vs_compile"] for r in rows.values() if "speedup_vs_compile" in r]
    lines = [f"device: {info['device']}, torch {info['torch']}, triton {info['triton']}",
             "| case | eager ms | torch.compile ms | Esper ms (shipped) | Esper tuned ms | "
             "eager graphed ms | Esper graphed ms | host eager/Esper ms | floor ms | x eager | "
             "x compile | x eager (graphed) | roofline | compiles |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(
            f"| {k} | {r['eager_ms']:.3f} | {r.get('torch_compile_ms', float('nan')):.3f} | "
            f"{r['esper_ms']:.3f} | {r.get('esper_tuned_ms', float('nan')):.3f} | "
            f"{r.get('eager_graphed_ms', float('nan')):.3f} | "
            f"{r.get('esper_graphed_ms', float('nan')):.3f} | "
            f"{r.get('eager_host_ms', math.nan):.3f}/{r.get('esper_host_ms', math.nan):.3f} | "
            f"{r['floor_ms']:.3f} | {r['speedup_vs_eager']:.2f} | "
            f"{r.get('speedup_vs_compile', float('nan')):.2f} | "
            f"{r.get('eager_graphed_ms', math.nan) / r.get('esper_graphed_ms', math.nan):.2f} | "
            f"{r['roofline_fraction']:.0%} | {r['esper_compiles']} |")
    geo = math.exp(sum(map(math.log, sp)) / len(sp))
    geoc = math.exp(sum(map(math.log, spc)) / len(spc)) if spc else float("nan")
    lines.append(f"geomean x eager {geo:.2f}, x torch.compile {geoc:.2f}")
    shipped = [r["eager_ms"] / r["esper_ms"] for r in rows.values()]
    geos = math.exp(sum(map(math.log, shipped)) / len(shipped))
    slow = [k for k, r in rows.items() if r["speedup_vs_eager"] < 0.97]
    lines.append(f"geomean x eager, shipped configs only {geos:.2f}; rows >3% slower than "
                 f"eager: {len(slow)}/{len(rows)} {slow}")
    noise = [max(r["eager_again_ms"] / r["eager_ms"], r["eager_ms"] / r["eager_again_ms"],
                 r["eager_again_loop_ms"] / r["eager_loop_ms"],
                 r["eager_loop_ms"] / r["eager_again_loop_ms"])
             for r in rows.values() if "eager_again_ms" in r]
    if noise:
        lines.append(f"two identical eager modules, measured the same way: up to "
                     f"{max(noise) - 1:.1%} apart (median row {statistics.median(noise) - 1:.1%})")
    spg = [r["eager_graphed_ms"] / r["esper_graphed_ms"] for r in rows.values()
           if "eager_graphed_ms" in r and "esper_graphed_ms" in r]
    if spg:
        geog = math.exp(sum(map(math.log, spg)) / len(spg))
        lines.append(f"geomean with CUDA graphs on both sides: x eager {geog:.2f} (n={len(spg)})")
    lp = [(k, r) for k, r in rows.items() if "esper_loop_ms" in r]
    if lp:
        lines.append("training-loop view (100 steps back to back, one sync), ms/step: "
                     "| case | eager | torch.compile | Esper | x eager | x compile |")
        for k, r in lp:
            if "fused_loop_ms" in r:
                lines.append(f"| {k}, fused plan (not served) | {r['eager_loop_ms']:.3f} | | "
                             f"{r['fused_loop_ms']:.3f} | "
                             f"{r['eager_loop_ms'] / r['fused_loop_ms']:.2f} | |")
            lines.append(f"| {k} ({r.get('serves', 'schedule')}) | {r['eager_loop_ms']:.3f} | "
                         f"{r.get('compile_loop_ms', math.nan):.3f} | {r['esper_loop_ms']:.3f} | "
                         f"{r['eager_loop_ms'] / r['esper_loop_ms']:.2f} | "
                         f"{r.get('compile_loop_ms', math.nan) / r['esper_loop_ms']:.2f} |")
        tl = [(k, r["eager_after_tune_loop_ms"] / r["esper_tuned_loop_ms"], r.get("tuned_serve"))
              for k, r in lp if "esper_tuned_loop_ms" in r]
        if tl:
            lines.append("tuned on this GPU, loop view vs eager measured next to it: " + ", ".join(
                f"{k} x{x:.2f} ({serve})" for k, x, serve in tl))
        sl = [r["eager_loop_ms"] / r["esper_loop_ms"] for _, r in lp]
        slc = [r["compile_loop_ms"] / r["esper_loop_ms"] for _, r in lp if "compile_loop_ms" in r]
        lines.append(f"loop geomean x eager {math.exp(sum(map(math.log, sl)) / len(sl)):.2f}, "
                     f"x torch.compile {math.exp(sum(map(math.log, slc)) / max(1, len(slc))):.2f}"
                     f"; rows >3% slower than eager: "
                     f"{[k for k, r in lp if r['eager_loop_ms'] / r['esper_loop_ms'] < 0.97]}")
    hl = info.get("hot_load")
    if hl:
        lines.append(f"hot load p50 {hl['p50_ms']:.1f} ms, p99 {hl['p99_ms']:.1f} ms "
                     f"(n={hl['n']}); phase p50s (ms): {hl.get('phases_p50_ms')}")
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out, "results.md").write_text(text + "\n")


def profile(shipped: Path, out: Path, cases: list[str]) -> None:
    """Where a step's time goes: CPU enqueue time per step and the GPU kernel table."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from esper.artifacts import unpack_verified
    from esper.artifacts.signing import load_public_key
    from esper.compile.reference import build_module
    from esper.triton.backend import TritonBackend

    torch.backends.cudnn.benchmark = True  # as in ``run``
    pub = load_public_key(shipped / "pub.pem")
    lines = []
    for key in cases:
        name, dtype_name = key.rsplit("-", 1)
        dtype = getattr(torch, dtype_name)
        art = unpack_verified((shipped / f"{key}.esper").read_bytes(), pub)
        esper = TritonBackend().load(art.manifest, art.files)("cuda")
        ref = build_module(esper.ir, device="cuda", dtype=dtype)
        ref.load_state_dict(esper.state_dict())
        xs = case_inputs(name, dtype)
        g = torch.randn_like(esper(*xs))

        step = functools.partial(train_step, xs=xs, g=g)

        for label, m in (("eager", ref), ("esper", esper)):
            for _ in range(10):
                step(m)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                step(m)
            cpu = (time.perf_counter() - t0) / 20 * 1e3
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 20 * 1e3
            # host time of each half on an idle GPU: which half costs the host
            fwd_us, bwd_us = [], []
            for _ in range(50):
                clear_grads(m, xs)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                y = m(*xs)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                y.backward(g)
                t3 = time.perf_counter()
                torch.cuda.synchronize()
                fwd_us.append((t1 - t0) * 1e6)
                bwd_us.append((t3 - t2) * 1e6)
            with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step(m)
                torch.cuda.synchronize()
            prof.export_chrome_trace(str(out / f"trace-{key}-{label}.json"))
            avg = prof.key_averages()
            lines.append(f"== {key} {label}: cpu enqueue {cpu:.3f} ms/step, "
                         f"wall {wall:.3f} ms/step; idle-GPU host time: forward "
                         f"{statistics.median(fwd_us):.0f} us, backward "
                         f"{statistics.median(bwd_us):.0f} us")
            lines.append(avg.table(sort_by="cuda_time_total", row_limit=10))
            lines.append(avg.table(sort_by="self_cpu_time_total", row_limit=12))
    text = "\n".join(lines)
    print(text)
    (out / "profile.txt").write_text(text)


def host_proxy(reps: int = 200, rounds: int = 7) -> None:
    """CPU-only proxy of the host cost of one training step: every case's structure
    at tiny widths on CPU tensors, kernels replaced by launchers that do nothing;
    eager vs Esper (generated host code) vs Esper (step objects walked
    generically). Best of ``rounds`` rounds of ``reps`` steps, interleaved."""
    import copy

    import torch

    from esper.compile.passes import optimize
    from esper.compile.reference import build_module
    from esper.ir import BlueprintIR
    from esper.triton.backend import build_plan
    from esper.triton.module import TritonBlueprintModule

    class Nop:
        def launch(self, grid: int, args: Any, cfg: Any) -> None:
            pass

        def bind(self, cfg: Any) -> Any:
            return lambda grid, *args: None

    def tiny(name: str) -> Any:
        bp = copy.deepcopy(CASES[name][0])
        for i in bp["inputs"]:
            rank = len(i["shape"])
            i["shape"] = [d if isinstance(d, str) else (4 if rank == 4 and k == 1 else 8)
                          for k, d in enumerate(i["shape"])]
        for n in bp["nodes"]:
            a = n.get("attrs", {})
            for key, val in (("out_features", 8), ("normalized_shape", [8]),
                             ("out_channels", 4)):
                if key in a:
                    a[key] = val
        return BlueprintIR.from_dict({"schema_version": 1, "name": name, **bp})

    torch.set_num_threads(1)
    print("| case | eager us | Esper generated us | Esper step objects us | x eager |")
    print("|---|---|---|---|---|")
    for name in CASES:
        ir = optimize(tiny(name))
        plan, _ = build_plan(ir, "float32")
        nop = {k: Nop() for g in plan.groups() for k in (g.fwd_kernel, g.bwd_kernel)}
        gen = TritonBlueprintModule(ir, plan, nop)  # type: ignore[arg-type]
        ref = TritonBlueprintModule(ir, plan, nop)  # type: ignore[arg-type]
        assert ref._schedule is not None
        ref._schedule.generated = False
        eager = build_module(ir)
        xs = [torch.randn([1 if isinstance(d, str) else d for d in i.shape], requires_grad=True)
              for i in ir.inputs]
        g = torch.ones_like(eager(*xs))
        best = {"eager": math.inf, "gen": math.inf, "ref": math.inf}
        for _ in range(rounds):
            for label, m in (("eager", eager), ("gen", gen), ("ref", ref)):
                for _ in range(20):
                    train_step(m, xs, g)
                t0 = time.perf_counter()
                for _ in range(reps):
                    train_step(m, xs, g)
                best[label] = min(best[label], (time.perf_counter() - t0) / reps * 1e6)
        print(f"| {name} | {best['eager']:.1f} | {best['gen']:.1f} | {best['ref']:.1f} | "
              f"{best['eager'] / best['gen']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--triton-python")
    r = sub.add_parser("run")
    r.add_argument("--shipped", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--tune", action="store_true")
    r.add_argument("--only", nargs="*")
    r.add_argument("--rounds", type=int, default=6,
                   help="interleaved measurement rounds per side (best of)")
    pr = sub.add_parser("profile")
    pr.add_argument("--shipped", type=Path, required=True)
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("cases", nargs="+")
    sub.add_parser("host", help="CPU proxy of the host cost per step (no GPU)")
    args = ap.parse_args()
    if args.cmd == "host":
        host_proxy()
    elif args.cmd == "build":
        build(args.out, args.triton_python)
    elif args.cmd == "profile":
        profile(args.shipped, args.out, args.cases)
    else:
        run(args.shipped, args.out, args.tune, args.only, args.rounds)


if __name__ == "__main__":
    main()
