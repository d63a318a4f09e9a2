"""The ``torch`` reference backend: a ``BlueprintModule`` that interprets the IR
through the lowering table. Its artifact holds only the optimised IR; loading
rebuilds the module from it."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from esper.compile.backend import CompiledFiles, CompileOptions, ModuleFactory
from esper.compile.dtypes import torch_dtype
from esper.compile.inputs import bind_inputs
from esper.compile.lowering import LOWERING, Rule, RunContext, node_attrs
from esper.compile.params import BlueprintModule
from esper.errors import CompileError
from esper.ir import BlueprintIR

if TYPE_CHECKING:
    from esper.artifacts import ArtifactManifest

IR_FILE = "ir.json"
_CUDA_TARGET = re.compile(r"cuda:sm_\d+")

@dataclass(frozen=True)
class _Step:
    """One node, prepared once so ``run`` is a tight loop."""

    node_id: str
    op: str
    rule: Rule
    attrs: dict[str, Any]
    inputs: tuple[str, ...]
    params: tuple[tuple[str, str], ...]  # (name, ParameterDict key)


class TorchBlueprintModule(BlueprintModule):
    """Runs the IR node by node with torch ops (dropout is active only in training)."""

    def __init__(self, ir: BlueprintIR, **kwargs: Any) -> None:
        super().__init__(ir, **kwargs)
        by_node: dict[str, list[tuple[str, str]]] = {}
        for (node_id, name), key in self.param_keys.items():
            by_node.setdefault(node_id, []).append((name, key))
        attrs = node_attrs(ir)
        self._steps = tuple(
            _Step(n.id, n.op.value, LOWERING[n.op], attrs[n.id], tuple(n.inputs),
                  tuple(by_node.get(n.id, ())))
            for n in ir.topological_order()
        )
        self._input_names = tuple(i.name for i in ir.inputs)
        self._outputs = tuple(ir.outputs)

    def run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        ctx = RunContext(symbols=bind_inputs(self.ir, inputs), training=self.training)
        env: dict[str, torch.Tensor] = dict(zip(self._input_names, inputs, strict=True))
        for step in self._steps:
            args = [env[i] for i in step.inputs]
            params = {name: self.params[key] for name, key in step.params}
            try:
                env[step.node_id] = step.rule(step.attrs, args, params, ctx)
            except Exception as exc:
                exc.add_note(f"while running node {step.node_id!r} ({step.op}) of "
                             f"blueprint {self.ir.name!r}")
                raise
        return tuple(env[o] for o in self._outputs)


def build_module(
    ir: BlueprintIR,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    generator: torch.Generator | None = None,
) -> TorchBlueprintModule:
    """The reference module for ``ir`` with freshly initialised parameters."""
    return TorchBlueprintModule(ir, dtype=torch_dtype(dtype), device=device, generator=generator)


class TorchBackend:
    """The reference backend: supports every target; its artifact is the optimised IR."""

    name = "torch"

    def supports(self, target: str) -> bool:
        return target == "cpu" or _CUDA_TARGET.fullmatch(target) is not None

    def compile(self, ir: BlueprintIR, target: str, options: CompileOptions) -> CompiledFiles:
        from esper.compile.passes import optimize  # passes import nothing from here

        if not self.supports(target):
            raise CompileError(f"backend 'torch' does not support target {target!r}")
        torch_dtype(options.dtype)  # refuse an unknown dtype at compile time, not load time
        start = time.perf_counter()
        optimised = optimize(ir)  # idempotent: cheap when the pipeline already optimised
        optimised_at = time.perf_counter()
        files = {IR_FILE: optimised.canonical_json().encode()}
        done = time.perf_counter()
        return CompiledFiles(
            files=files,
            options=options.model_dump(),
            timings={"optimize_s": optimised_at - start, "codegen_s": done - optimised_at},
        )

    def load(self, manifest: ArtifactManifest, files: Mapping[str, bytes]) -> ModuleFactory:
        if IR_FILE not in files:
            raise CompileError(f"torch artifact lacks {IR_FILE!r} (files: {sorted(files)})")
        ir = BlueprintIR.from_json(files[IR_FILE])
        dtype = torch_dtype(manifest.dtype)

        def factory(device: torch.device | str = "cpu") -> BlueprintModule:
            return build_module(ir, device=device, dtype=dtype)

        return factory
