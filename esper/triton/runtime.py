"""Run one fused group's kernels on torch tensors (no autograd here).

A ``Launcher`` is anything with ``launch(grid, args, cfg)``: shipped binaries
(``aot.BinaryLauncher``) or the ``@triton.jit`` function itself (JIT on a GPU,
numpy under ``TRITON_INTERPRET=1``). ``GroupRunner`` allocates outputs, flattens
leading dims into rows (one artifact serves every batch size), launches, and
sums the per-program partials of bias/gain grads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from esper.triton.plan import FusedStep, KernelConfig
from esper.triton.tiles import TileProgram


class Launcher(Protocol):
    def launch(self, grid: int, args: Sequence[Any], cfg: KernelConfig) -> None: ...


class JitLauncher:
    """Launch a ``@triton.jit`` function (compiles on first use; interpreter on CPU)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def launch(self, grid: int, args: Sequence[Any], cfg: KernelConfig) -> None:
        self.fn[(grid,)](*args, BLOCK_R=cfg.block_r, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)


def aliases(prog: TileProgram) -> dict[int, tuple[str, int]]:
    """Outputs the kernel need not store: output index -> ("in", input index) when
    the output is a plain copy of an input of the same kind (a residual add's
    grad is the incoming grad), or ("out", earlier output index) when two outputs
    are the same value (``x + x``'s operands, ``relu(x + y)``'s two grads)."""
    out: dict[int, tuple[str, int]] = {}
    first: dict[int, int] = {}
    for j, (_, vid) in enumerate(prog.outputs):
        v = prog.vals[vid]
        if v.op == "load" and prog.inputs[v.attr][1] == v.kind and v.kind in ("full", "row"):
            out[j] = ("in", v.attr)
        elif vid in first:
            out[j] = ("out", first[vid])
        else:
            first[vid] = j
    return out


def stored(prog: TileProgram) -> TileProgram:
    """``prog`` without its aliased outputs: what the kernel actually computes."""
    skip = aliases(prog)
    return TileProgram(vals=list(prog.vals), inputs=list(prog.inputs),
                       outputs=[o for j, o in enumerate(prog.outputs) if j not in skip])


def _grid(rows: int, cfg: KernelConfig, looping: bool) -> int:
    n = max(1, -(-rows // cfg.block_r))
    return min(n, cfg.grid_cap) if looping and cfg.grid_cap > 0 else n


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # binaries are compiled assuming 16-byte aligned, contiguous operands
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


class GroupRunner:
    """Forward and backward of one fused group through two launchers."""

    def __init__(self, step: FusedStep, fwd: Launcher, bwd: Launcher | None,
                 dtype: torch.dtype) -> None:
        self.step = step
        self.fwd, self.bwd = fwd, bwd
        self.dtype = dtype
        self.c = step.c
        self.fwd_alias = aliases(step.fwd)
        self.bwd_alias = aliases(step.bwd) if step.bwd is not None else {}
        self.fwd_loop = stored(step.fwd).has_col_reduction()
        self.bwd_loop = step.bwd is not None and stored(step.bwd).has_col_reduction()
        self.in_kinds = [k for _, k in step.fwd.inputs]
        self.out_kinds = [step.fwd.kind(v) for _, v in step.fwd.outputs]
        full = [i for i, k in enumerate(self.in_kinds) if k == "full"]
        self.full_input = full[0] if full else None

    def rows(self, tensors: Sequence[torch.Tensor], symbols: dict[str, int] | None) -> int:
        if self.full_input is not None:
            return tensors[self.full_input].numel() // self.c
        from esper.triton.partition import row_count

        return row_count(self.step.frame, symbols or {})

    def _shape(self, shape: Sequence[Any], symbols: dict[str, int] | None,
               lead: Sequence[int] | None) -> list[int]:
        if lead is not None and len(shape) == len(self.step.frame):
            return [*lead, int(shape[-1])]
        sym = symbols or {}
        return [sym[d] if isinstance(d, str) else int(d) for d in shape]

    def _out_shape(self, j: int, lead: list[int] | None,
                   symbols: dict[str, int] | None) -> list[int]:
        o = self.step.outputs[j]
        if lead is None:
            sym = symbols or {}
            return [sym[d] if isinstance(d, str) else int(d) for d in o.shape]
        if o.kind == "full":
            return [*lead, self.c]
        return [*lead, 1] if len(o.shape) == len(self.step.frame) else list(lead)

    def _lead(self, tensors: Sequence[torch.Tensor]) -> list[int] | None:
        if self.full_input is None:
            return None
        return list(tensors[self.full_input].shape[:-1])

    def forward(self, tensors: Sequence[torch.Tensor],
                symbols: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
        ins = [_aligned(t) for t in tensors]
        rows = self.rows(ins, symbols)
        lead = self._lead(tensors)
        outs: list[torch.Tensor] = []
        kernel_outs: list[torch.Tensor] = []
        for j in range(len(self.step.outputs)):
            alias = self.fwd_alias.get(j)
            if alias is not None:
                outs.append(tensors[alias[1]] if alias[0] == "in" else outs[alias[1]])
                continue
            t = torch.empty(self._out_shape(j, lead, symbols), dtype=self.dtype,
                            device=ins[0].device)
            outs.append(t)
            kernel_outs.append(t)
        cfg = self.step.fwd_cfg
        assert cfg is not None
        self.fwd.launch(_grid(rows, cfg, self.fwd_loop), [*ins, *kernel_outs, rows], cfg)
        return tuple(outs)

    def backward(self, saved: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
                 symbols: dict[str, int] | None = None) -> list[torch.Tensor]:
        """Grads of every group input, in the forward's input order."""
        bwd = self.step.bwd
        assert bwd is not None and self.bwd is not None
        ins = [_aligned(t) for t in saved]
        rows = self.rows(ins, symbols)
        lead = self._lead(saved)
        dev = ins[0].device
        gs = [
            _aligned(g) if g is not None
            else torch.zeros(self._out_shape(j, lead, symbols), dtype=self.dtype, device=dev)
            for j, g in enumerate(grads)
        ]
        cfg = self.step.bwd_cfg
        assert cfg is not None
        grid = _grid(rows, cfg, self.bwd_loop)
        bwd_inputs = [*ins, *gs]
        results: list[torch.Tensor] = []
        kernel_outs: list[torch.Tensor] = []
        partial: list[int] = []
        for j, (_, vid) in enumerate(bwd.outputs):
            alias = self.bwd_alias.get(j)
            if alias is not None:
                results.append(bwd_inputs[alias[1]] if alias[0] == "in" else results[alias[1]])
                continue
            kind = bwd.kind(vid)
            if kind in ("full", "row"):
                t = torch.empty_like(saved[j], memory_format=torch.contiguous_format)
            else:
                t = torch.empty((grid, self.c) if kind == "col" else (grid,),
                                dtype=torch.float32, device=dev)
                partial.append(j)
            results.append(t)
            kernel_outs.append(t)
        self.bwd.launch(grid, [*bwd_inputs, *kernel_outs, rows], cfg)
        for j in partial:
            results[j] = results[j].sum(0).to(saved[j].dtype).reshape(saved[j].shape)
            for k, alias in self.bwd_alias.items():  # an output aliasing a partial sum
                if alias == ("out", j):
                    results[k] = results[j]
        return results
