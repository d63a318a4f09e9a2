"""``TritonBackend``: the ``triton`` backend of the compilation plane.

compile (no GPU needed): optimise -> partition -> derive backward programs ->
configs (measured when a GPU of the target's arch is present, else heuristic) ->
emit one kernel source file -> AOT-compile each kernel for the target. Files:
``ir.json``, ``kernels/esper_kernels.py``, ``kernels/<kernel>.cubin|json``,
``triton/plan.json``, ``triton/build.json`` (Triton version, target, timings).
When measured, the tuned plan is kept only if its whole step beats the
blueprint's plain torch ops; otherwise the plan serves those (``plan.serve``)
and no binaries ship. Unmeasured, ``esper.triton.serve`` predicts that choice;
``CompileOptions.extra["serve"]`` fixes it.

load (trainer): same Triton version and GPU arch -> shipped binaries launched
without compiling or importing the kernel source; otherwise a background
recompile from the shipped source while the module serves the reference
implementation."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esper.compile.backend import CompiledFiles, CompileOptions, ModuleFactory, register_backend
from esper.errors import CompileError
from esper.ir import BlueprintIR
from esper.triton import aot
from esper.triton.codegen import emit_module
from esper.triton.derivatives import backward_program
from esper.triton.plan import Plan, TorchStep
from esper.triton.runtime import aliases, stored
from esper.triton.serve import predicted_serve
from esper.triton.tiles import TileProgram
from esper.triton.tune import apply_heuristics

if TYPE_CHECKING:
    import torch

    from esper.artifacts import ArtifactManifest
    from esper.compile.params import BlueprintModule

log = logging.getLogger("esper.triton")
IR_FILE = "ir.json"


def build_plan(ir: BlueprintIR, dtype: str, arch: int = 90) -> tuple[Plan, str]:
    """Partition, differentiate and configure ``ir``; return the plan and kernel source."""
    from esper.compile.lowering import node_attrs
    from esper.triton.partition import partition

    plan = partition(ir, node_attrs(ir))
    plan.dtype = dtype
    uses: dict[str, int] = {}  # steps reading each value (+1 for a graph output)
    for s in plan.steps:
        read = s.inputs if isinstance(s, TorchStep) else [i.value for i in s.inputs]
        for v in set(read):
            uses[v] = uses.get(v, 0) + 1
    for v in plan.outputs:
        uses[v] = uses.get(v, 0) + 1
    for g in plan.groups():
        g.bwd = backward_program(g.fwd)
        skip = aliases(g.bwd)
        # another output that IS this grad (``relu(x + y)``: one tensor for both
        # operands) must not receive the other consumer's grad added in-kernel
        shared = {k for kind, k in skip.values() if kind == "out"}
        # a stored full grad of a value read elsewhere too: add the other grad in-kernel
        g.bwd_acc = [j for j, i in enumerate(g.inputs)
                     if i.param is None and i.kind == "full" and uses.get(i.value, 0) > 1
                     and j not in skip and j not in shared]
    apply_heuristics(plan, arch)
    return plan, plan_source(plan)


def plan_source(plan: Plan) -> str:
    kernels: list[tuple[str, TileProgram, int, tuple[int, ...]]] = []
    for g in plan.groups():
        kernels.append((g.fwd_kernel, stored(g.fwd), g.c, ()))
        if g.bwd is not None:
            kernels.append((g.bwd_kernel, stored(g.bwd), g.c, aot.accumulating(g)))
    return emit_module(kernels)


class TritonBackend:
    """Fused Triton kernels (forward + backward) around cuBLAS, compiled ahead of time."""

    name = "triton"

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "esper-triton"

    def supports(self, target: str) -> bool:
        try:
            return aot.parse_target(target)[1] >= 80
        except ValueError:
            return False

    def compile(self, ir: BlueprintIR, target: str, options: CompileOptions) -> CompiledFiles:
        from esper.compile.passes import optimize

        if not self.supports(target):
            raise CompileError(f"backend 'triton' does not support target {target!r}")
        if options.dtype not in aot._PTR:
            raise CompileError(f"backend 'triton' does not support dtype {options.dtype!r}")
        t0 = time.perf_counter()
        # Built from the canonical IR the artifact ships (the reference backend ships
        # the same), so node ids and hence parameter keys match across backends.
        ir_bytes = optimize(ir).canonical_json().encode()
        optimised = BlueprintIR.from_json(ir_bytes)
        t1 = time.perf_counter()
        forced = options.extra.get("serve")
        if forced not in (None, "schedule", "reference"):
            raise CompileError(f"compile option extra.serve={forced!r}: expected 'schedule' "
                               "or 'reference'")
        arch = aot.parse_target(target)[1]
        plan, source = build_plan(optimised, options.dtype, arch)
        predicted = predicted_serve(plan)
        plan.serve = forced or predicted
        t2 = time.perf_counter()
        report: dict[str, Any] = {"predicted_serve": predicted}
        measure = options.autotune and aot.local_target() == target and not _interpreting()
        if measure and forced != "reference":
            from esper.triton.measure import measure_and_tune

            plan.serve = "schedule"  # the kernels are what gets timed
            report.update(measure_and_tune(plan, optimised, source, self.cache_dir, arch,
                                           decide_serve=forced is None))
            source = plan_source(plan)  # groups now on torch drop their kernels
        t3 = time.perf_counter()
        files: dict[str, bytes] = {IR_FILE: ir_bytes,
                                   aot.SOURCE_FILE: source.encode()}
        build: dict[str, Any] = {"target": target, "triton_version": None, "kernels": {}}
        if options.extra.get("binaries", True):
            bins, info = aot.compile_binaries(source, aot.kernel_requests(plan), target,
                                              python=options.extra.get("triton_python"))
            files.update(bins)
            build.update(triton_version=info["triton_version"], kernels=info["kernels"])
        t4 = time.perf_counter()
        plan.meta = {"target": target, "tuning": report}
        files[aot.PLAN_FILE] = plan.to_json()
        timings = {"optimize_s": t1 - t0, "codegen_s": t2 - t1, "tune_s": t3 - t2,
                   "binaries_s": t4 - t3}
        build["timings"] = timings
        files[aot.BUILD_FILE] = json.dumps(build, sort_keys=True).encode()
        opts = options.model_dump()
        opts["triton_version"] = build["triton_version"]
        # Validators allow run-to-run rounding differences only where declared.
        opts["atomic_reductions"] = plan.serve != "reference" and "tl.atomic_add(" in source
        return CompiledFiles(files=files, options=opts, timings=timings)

    def load(self, manifest: ArtifactManifest, files: Mapping[str, bytes]) -> ModuleFactory:
        from esper.compile.dtypes import torch_dtype
        from esper.triton.module import ServedTorchOpsModule, TritonBlueprintModule

        for f in (IR_FILE, aot.SOURCE_FILE, aot.PLAN_FILE, aot.BUILD_FILE):
            if f not in files:
                raise CompileError(f"triton artifact lacks {f!r}")
        ir = BlueprintIR.from_json(files[IR_FILE])
        plan = Plan.from_json(files[aot.PLAN_FILE])
        build = json.loads(files[aot.BUILD_FILE])
        source = files[aot.SOURCE_FILE].decode()
        dtype = torch_dtype(manifest.dtype)
        if plan.serve == "reference":
            log.info("blueprint %r: its torch ops were %s faster than fused kernels; the "
                     "module runs them", ir.name,
                     "measured" if plan.meta.get("tuning", {}).get("serve") else "predicted")

            def reference(device: torch.device | str = "cpu") -> BlueprintModule:
                return ServedTorchOpsModule(ir, plan, dtype=dtype, device=device)

            return reference
        requests = aot.kernel_requests(plan)
        kernels: dict[str, Any] | None = None
        pending: list[weakref.ref[Any]] = []
        lock = threading.Lock()
        state: dict[str, Any] = {"kernels": None}
        mode = self._mode(build)
        if mode == "interpret":
            kernels = aot.jit_kernels(aot.import_source(source, self.cache_dir / "src"), plan)
        elif mode == "binaries":
            kernels = aot.load_binaries(requests, files, self.cache_dir / "bin")
        elif mode == "recompile":
            local = aot.local_target()
            assert local is not None
            log.warning("artifact built by Triton %s for %s; this process has Triton %s on %s: "
                        "serving the reference backend while recompiling from source",
                        build.get("triton_version"), build.get("target"), _triton_version(),
                        local)

            def done(ks: dict[str, Any]) -> None:
                with lock:
                    state["kernels"] = ks
                    mods = [m() for m in pending]
                for m in mods:
                    if m is not None:
                        m.install(ks)

            aot.recompile_in_background(aot.import_source(source, self.cache_dir / "src"),
                                        requests, local, done)
        else:
            log.warning("no GPU and no Triton interpreter: blueprint %r runs on the reference "
                        "backend", ir.name)

        def factory(device: torch.device | str = "cpu") -> BlueprintModule:
            with lock:
                ks = kernels if kernels is not None else state["kernels"]
            m = TritonBlueprintModule(ir, plan, ks, dtype=dtype, device=device)
            if ks is None and mode == "recompile":
                with lock:
                    if state["kernels"] is None:
                        pending.append(weakref.ref(m))
                    else:
                        m.install(state["kernels"])
            return m

        return factory

    @staticmethod
    def _mode(build: dict[str, Any]) -> str:
        if _interpreting():
            return "interpret"
        local = aot.local_target()
        if local is None:
            return "reference"
        if build.get("triton_version") == _triton_version() and build.get("target") == local:
            return "binaries"
        return "recompile"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return str(triton.__version__)


register_backend(TritonBackend(), replace=True)
