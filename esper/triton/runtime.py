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
    if not t.is_contiguous():
        t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


class GroupRunner:
    """Forward and backward of one fused group through two launchers. Everything
    that does not depend on the batch is decided here once: each call is a few
    allocations and one launch (Python overhead is what a small block pays)."""

    def __init__(self, step: FusedStep, fwd: Launcher, bwd: Launcher | None,
                 dtype: torch.dtype) -> None:
        self.step = step
        self.fwd, self.bwd = fwd, bwd
        self.dtype = dtype
        self.c = step.c
        self.fwd_cfg, self.bwd_cfg = step.fwd_cfg, step.bwd_cfg
        fwd_alias = aliases(step.fwd)
        self.fwd_loop = stored(step.fwd).has_col_reduction()
        self.bwd_loop = step.bwd is not None and stored(step.bwd).has_col_reduction()
        kinds = [k for _, k in step.fwd.inputs]
        self.full_input = kinds.index("full") if "full" in kinds else None
        rank = len(step.frame)
        # forward outputs: (alias or None, shape rule: "full" | "keep" | "drop", IR shape)
        self.fwd_outs = [
            (fwd_alias.get(j), "full" if o.kind == "full" else
             ("keep" if len(o.shape) == rank else "drop"), o.shape)
            for j, o in enumerate(step.outputs)
        ]
        # backward outputs: (alias or None, kind), one per forward input
        self.bwd_outs: list[tuple[tuple[str, int] | None, str]] = []
        self.partial_aliases: dict[int, list[int]] = {}
        if step.bwd is not None:
            bwd_alias = aliases(step.bwd)
            for j, (_, vid) in enumerate(step.bwd.outputs):
                self.bwd_outs.append((bwd_alias.get(j), step.bwd.kind(vid)))
                a = bwd_alias.get(j)
                if a is not None and a[0] == "out":
                    self.partial_aliases.setdefault(a[1], []).append(j)

    def _rows_lead(self, tensors: Sequence[torch.Tensor], symbols: dict[str, int] | None
                   ) -> tuple[int, list[int] | None]:
        if self.full_input is not None:
            t = tensors[self.full_input]
            return t.numel() // self.c, list(t.shape[:-1])
        from esper.triton.partition import row_count

        return row_count(self.step.frame, symbols or {}), None

    def _out_shape(self, rule: str, shape: Sequence[Any], lead: list[int] | None,
                   symbols: dict[str, int] | None) -> list[int]:
        if lead is None:
            sym = symbols or {}
            return [sym[d] if isinstance(d, str) else int(d) for d in shape]
        if rule == "full":
            return [*lead, self.c]
        return [*lead, 1] if rule == "keep" else lead

    def forward(self, tensors: Sequence[torch.Tensor],
                symbols: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
        ins = [_aligned(t) for t in tensors]
        rows, lead = self._rows_lead(ins, symbols)
        dev = ins[0].device
        outs: list[torch.Tensor] = []
        kernel_outs: list[torch.Tensor] = []
        for alias, rule, shape in self.fwd_outs:
            if alias is not None:
                outs.append(tensors[alias[1]] if alias[0] == "in" else outs[alias[1]])
                continue
            t = torch.empty(self._out_shape(rule, shape, lead, symbols), dtype=self.dtype,
                            device=dev)
            outs.append(t)
            kernel_outs.append(t)
        cfg = self.fwd_cfg
        assert cfg is not None
        self.fwd.launch(_grid(rows, cfg, self.fwd_loop), [*ins, *kernel_outs, rows], cfg)
        return tuple(outs)

    def backward(self, saved: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
                 symbols: dict[str, int] | None = None) -> list[torch.Tensor]:
        """Grads of every group input, in the forward's input order."""
        assert self.bwd is not None and self.bwd_cfg is not None
        ins = [_aligned(t) for t in saved]
        rows, lead = self._rows_lead(ins, symbols)
        dev = ins[0].device
        gs = [_aligned(g) if g is not None else torch.zeros(
                  self._out_shape(rule, shape, lead, symbols), dtype=self.dtype, device=dev)
              for g, (_, rule, shape) in zip(grads, self.fwd_outs, strict=True)]
        cfg = self.bwd_cfg
        grid = _grid(rows, cfg, self.bwd_loop)
        bwd_inputs = [*ins, *gs]
        results: list[torch.Tensor] = []
        kernel_outs: list[torch.Tensor] = []
        partial: list[int] = []
        for j, (alias, kind) in enumerate(self.bwd_outs):
            if alias is not None:
                results.append(bwd_inputs[alias[1]] if alias[0] == "in" else results[alias[1]])
                continue
            if kind in ("full", "row"):
                t = torch.empty_like(ins[j])
            else:
                t = torch.empty((grid, self.c) if kind == "col" else (grid,),
                                dtype=torch.float32, device=dev)
                partial.append(j)
            results.append(t)
            kernel_outs.append(t)
        self.bwd.launch(grid, [*bwd_inputs, *kernel_outs, rows], cfg)
        for j in partial:
            total = results[j].sum(0)
            if total.dtype != saved[j].dtype:
                total = total.to(saved[j].dtype)
            if total.dim() != saved[j].dim():
                total = total.reshape(saved[j].shape)
            results[j] = total
            for k in self.partial_aliases.get(j, ()):
                results[k] = total
        return results
