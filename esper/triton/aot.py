"""Compile a plan's kernels ahead of time for a GPU target, and load shipped
binaries in a trainer without compiling.

Binaries only run under the Triton version that built them, so the artifact
records it. On a mismatch (or another GPU arch) ``load_or_recompile`` starts a
background thread that recompiles the shipped source for the local GPU, while
the module serves the reference implementation (logged); then it swaps in."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from esper.triton.aot_compile import compile_request
from esper.triton.plan import FusedStep, KernelConfig, Plan
from esper.triton.runtime import JitLauncher, Launcher, stored, stored_index

log = logging.getLogger("esper.triton")

SOURCE_FILE = "kernels/esper_kernels.py"
PLAN_FILE = "triton/plan.json"
BUILD_FILE = "triton/build.json"
_PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def parse_target(target: str) -> tuple[str, int, int]:
    """``cuda:sm_90`` -> ``("cuda", 90, 32)``."""
    if not target.startswith("cuda:sm_"):
        raise ValueError(f"not a CUDA target: {target!r}")
    return ("cuda", int(target.removeprefix("cuda:sm_")), 32)


def kernel_requests(plan: Plan) -> list[dict[str, Any]]:
    """One compile request per kernel: its signature, alignment, constexprs, options."""
    if plan.serve == "reference":  # the module runs torch ops: no kernel is launched
        return []
    out = []
    for g in plan.groups():
        if g.impl != "triton":
            continue
        for which, cfg in (("fwd", g.fwd_cfg), ("bwd", g.bwd_cfg)):
            if (g.fwd if which == "fwd" else g.bwd) is not None and cfg is not None:
                out.append(kernel_request(g, which, cfg, plan.dtype))
    return out


def kernel_request(g: FusedStep, which: str, cfg: KernelConfig, dtype: str) -> dict[str, Any]:
    """The compile request of group ``g``'s ``which`` ("fwd"/"bwd") kernel under ``cfg``."""
    act = _PTR[dtype]
    prog = g.fwd if which == "fwd" else g.bwd
    assert prog is not None
    key = g.fwd_kernel if which == "fwd" else g.bwd_kernel
    kept = stored(prog)
    sig: dict[str, str] = {f"in_{i}": act for i in range(len(kept.inputs))}
    for j in range(len(kept.outputs)):
        sig[f"out_{j}"] = act  # col/scalar outputs: the final sums, same dtype
    if kept.has_col_reduction():
        sig["ws"], sig["lock"] = "*fp32", "*i32"
    acc = accumulating(g) if which == "bwd" else ()
    sig.update({f"prev_{j}": act for j in acc})
    n_ptr = len(sig)
    sig.update({f"has_prev_{j}": "i32" for j in acc})
    sig["n_rows"] = "i32"
    sig["BLOCK_R"] = "constexpr"
    return {
        "key": key, "fn": key, "signature": sig, "aligned": list(range(n_ptr)),
        "constexprs": {"BLOCK_R": cfg.block_r},
        "options": {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    }


def accumulating(g: FusedStep) -> tuple[int, ...]:
    """The backward kernel's stored outputs that add an existing grad (``bwd_acc``)."""
    assert g.bwd is not None
    return tuple(stored_index(g.bwd, j) for j in g.bwd_acc)


def compile_binaries(source: str, requests: list[dict[str, Any]], target: str,
                     python: str | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Compile ``requests`` for ``target``; returns artifact files and build info.

    ``python``: another interpreter whose Triton should build the binaries (the
    trainers' version); default: this process (or a child when this process runs
    the Triton interpreter, which cannot build binaries)."""
    with tempfile.TemporaryDirectory(prefix="esper-aot-") as tmp:
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        src_path = Path(tmp) / f"esper_kernels_{digest}.py"
        src_path.write_text(source)
        req = {"source": str(src_path), "module_name": f"esper_kernels_{digest}",
               "target": list(parse_target(target)), "kernels": requests,
               "out_dir": str(Path(tmp) / "out")}
        # In-process unless this process runs (or ran) Triton's interpreter, which
        # patches triton.language while kernels run: then a clean child compiles.
        interpreted = (os.environ.get("TRITON_INTERPRET") == "1"
                       or "triton.runtime.interpreter" in sys.modules)
        if python is None and not interpreted:
            info = compile_request(req)
        else:
            (Path(tmp) / "req.json").write_text(json.dumps(req))
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            script = Path(__file__).with_name("aot_compile.py")
            cmd = [python or sys.executable, str(script), str(Path(tmp) / "req.json")]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"AOT compile failed: {proc.stderr[-4000:]}")
            info = json.loads(proc.stdout.strip().splitlines()[-1])
        files = {}
        for r in requests:
            for ext in ("cubin", "json"):
                files[f"kernels/{r['key']}.{ext}"] = (Path(tmp) / "out" / f"{r['key']}.{ext}"
                                                      ).read_bytes()
    return files, info


def import_source(source: str, cache_dir: Path) -> Any:
    """Import generated kernel source from a file (Triton's JIT reads source files)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    name = f"esper_kernels_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}.py"
    if not path.exists():
        path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def jit_kernels(module: Any, plan: Plan) -> dict[str, Launcher]:
    """Launchers that JIT-compile from source (or interpret, under TRITON_INTERPRET=1)."""
    names = [k for g in plan.groups() if g.impl == "triton"
             for k in (g.fwd_kernel, g.bwd_kernel) if hasattr(module, k)]
    return {k: JitLauncher(getattr(module, k)) for k in names}


class BinaryLauncher:
    """Launch a shipped binary: no compile, one cached launcher stub per signature.

    After ``warm`` it calls Triton's C launch function directly when the kernel
    needs no scratch memory (the common case), skipping two Python frames per
    launch; otherwise it goes through ``CompiledKernel.run``.

    Pointer arguments may be passed as raw device addresses (``t.data_ptr()``):
    Triton's C launcher asks the driver to check every tensor argument
    (``cuPointerGetAttribute``, one driver call per pointer per launch) and
    checks nothing for an integer."""

    raw_pointers = True

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._go: Callable[[int, Sequence[Any], KernelConfig], None] | None = None
        self._direct: tuple[Any, ...] | None = None

    def warm(self) -> None:
        k = self.kernel
        k._init_handles()  # loads the cubin; builds/loads the launcher stub
        from triton.runtime import driver

        device = driver.active.get_current_device()
        get_stream = driver.active.get_current_stream
        run, function, packed = k.run, k.function, k.packed_metadata
        md = k.metadata
        direct = (hasattr(run, "launch") and not getattr(md, "global_scratch_size", 0)
                  and not getattr(md, "profile_scratch_size", 0)
                  and hasattr(run, "launch_cooperative_grid"))
        self._direct = None
        if direct:
            launch, coop, pdl = run.launch, run.launch_cooperative_grid, run.launch_pdl
            self._direct = (launch, get_stream, device, function, coop, pdl, packed)

            def go(grid: int, args: Sequence[Any], cfg: KernelConfig) -> None:
                launch(grid, 1, 1, get_stream(device), function, coop, pdl, None, None,
                       packed, None, None, None, *args, cfg.block_r)
        else:
            def go(grid: int, args: Sequence[Any], cfg: KernelConfig) -> None:
                run(grid, 1, 1, get_stream(device), function, packed, None, None, None,
                    *args, cfg.block_r)

        self._go = go

    def launch(self, grid: int, args: Sequence[Any], cfg: KernelConfig) -> None:
        if self._go is None:
            self.warm()
        assert self._go is not None
        self._go(grid, args, cfg)

    def bind(self, cfg: KernelConfig) -> Callable[..., None]:
        """``go(grid, *args)``: one Python frame over Triton's C launcher."""
        if self._go is None:
            self.warm()
        if self._direct is None:
            slow = self._go
            assert slow is not None
            return lambda grid, *args: slow(grid, args, cfg)
        launch, get_stream, device, function, coop, pdl, packed = self._direct
        br = cfg.block_r

        def go(grid: int, *args: Any) -> None:
            launch(grid, 1, 1, get_stream(device), function, coop, pdl, None, None, packed,
                   None, None, None, *args, br)

        return go


class _ShippedFn:
    """What Triton's launcher reads of a kernel function: its argument names."""

    def __init__(self, name: str, arg_names: list[str]) -> None:
        self.__name__ = name
        self.arg_names = arg_names
        self.launch_metadata = None  # no per-launch metadata hook (profilers see the name)


class ShippedSource:
    """A shipped kernel's signature and constants, standing in for the ``ASTSource``
    a compile would have had. Launching a binary needs only these, so a trainer
    never imports the kernel source (executing its ``@triton.jit`` decorators was
    most of a hot load's time); the source is imported only to recompile."""

    def __init__(self, request: dict[str, Any]) -> None:
        names = list(request["signature"])
        self.fn = _ShippedFn(request["fn"], names)
        self.signature = dict(request["signature"])
        self.constants = {(names.index(k),): v for k, v in request["constexprs"].items()}


def load_binaries(requests: list[dict[str, Any]], files: Mapping[str, bytes],
                  cache_dir: Path) -> dict[str, Launcher]:
    """``CompiledKernel``s from the shipped cubins + metadata: nothing is compiled,
    and the kernel source is not imported."""
    from triton.compiler import CompiledKernel

    cache_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Launcher] = {}
    for r in requests:
        paths = {}
        for ext in ("cubin", "json"):
            data = files[f"kernels/{r['key']}.{ext}"]
            p = cache_dir / f"{r['key']}-{hashlib.sha256(data).hexdigest()[:12]}.{ext}"
            if not p.exists():
                p.write_bytes(data)
            paths[f"{r['key']}.{ext}"] = str(p)
        meta = json.loads(files[f"kernels/{r['key']}.json"])
        out[r["key"]] = BinaryLauncher(CompiledKernel(ShippedSource(r), paths, meta["hash"]))
    return out


def local_target() -> str | None:
    """``cuda:sm_XX`` of the current GPU, or None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        return f"cuda:sm_{major}{minor}"
    except Exception:  # no usable driver: no target
        return None


def compile_local(module: Any, request: dict[str, Any], target: str) -> BinaryLauncher:
    """Compile one kernel request in this process for ``target``; a launcher for it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i in request["aligned"]}
    src = ASTSource(fn=getattr(module, request["fn"]), signature=request["signature"],
                    constexprs=request["constexprs"], attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget(*parse_target(target)),
                            options=request["options"])
    return BinaryLauncher(kernel)


def recompile_in_background(module: Any, requests: list[dict[str, Any]], target: str,
                            on_done: Callable[[dict[str, Launcher]], None]) -> threading.Thread:
    """Compile the shipped source for the local GPU off the training thread."""

    def work() -> None:
        start = time.perf_counter()
        try:
            launchers: dict[str, Launcher] = {r["key"]: compile_local(module, r, target)
                                              for r in requests}
            on_done(launchers)
            log.warning("triton kernels recompiled from source for %s in %.2f s; switched over "
                        "from the reference backend", target, time.perf_counter() - start)
        except Exception:
            log.exception("background recompile for %s failed; staying on the reference "
                          "backend", target)

    t = threading.Thread(target=work, name="esper-triton-recompile", daemon=True)
    t.start()
    return t
