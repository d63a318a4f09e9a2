"""Run one fused group's kernels on torch tensors (no autograd here).

A ``Launcher`` is anything with ``launch(grid, args, cfg)``: shipped binaries
(``aot.BinaryLauncher``) or the ``@triton.jit`` function itself (JIT on a GPU,
numpy under ``TRITON_INTERPRET=1``). ``GroupRunner`` allocates outputs, flattens
leading dims into rows (one artifact serves every batch size) and launches; the
backward kernel finishes bias/gain grads itself (its workspace and ticket
counter live here, one pair per device, zeroed once and left zeroed by every
launch), so a group costs one launch each way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from esper.triton.plan import FusedStep, KernelConfig
from esper.triton.tiles import TileProgram


class Launcher(Protocol):
    def launch(self, grid: int, args: Sequence[Any], cfg: KernelConfig) -> None: ...

    def bind(self, cfg: KernelConfig) -> Callable[..., None]:
        """``go(grid, *args)`` launching under ``cfg`` (the generated host code's call)."""
        ...


class JitLauncher:
    """Launch a ``@triton.jit`` function (compiles on first use; interpreter on CPU)."""

    raw_pointers = False  # the JIT specialises on argument types: tensors stay tensors

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def launch(self, grid: int, args: Sequence[Any], cfg: KernelConfig) -> None:
        self.fn[(grid,)](*args, BLOCK_R=cfg.block_r, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)

    def bind(self, cfg: KernelConfig) -> Callable[..., None]:
        fn, br, nw, ns = self.fn, cfg.block_r, cfg.num_warps, cfg.num_stages

        def go(grid: int, *args: Any) -> None:
            fn[(grid,)](*args, BLOCK_R=br, num_warps=nw, num_stages=ns)

        return go


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


def _loaded(prog: TileProgram) -> set[int]:
    """Inputs that some output of ``prog`` depends on (aliased outputs included)."""
    return {v.attr for v, live in zip(prog.vals, prog.live(), strict=True)
            if live and v.op == "load"}


def stored(prog: TileProgram) -> TileProgram:
    """``prog`` without its aliased outputs: what the kernel actually computes."""
    skip = aliases(prog)
    return TileProgram(vals=list(prog.vals), inputs=list(prog.inputs),
                       outputs=[o for j, o in enumerate(prog.outputs) if j not in skip])


def stored_index(prog: TileProgram, j: int) -> int:
    """Position of output ``j`` among the outputs the kernel stores."""
    skip = aliases(prog)
    assert j not in skip
    return j - sum(1 for k in skip if k < j)


def _grid(rows: int, cfg: KernelConfig, looping: bool) -> int:
    n = max(1, -(-rows // cfg.block_r))
    return min(n, cfg.grid_cap) if looping and cfg.grid_cap > 0 else n


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # binaries are compiled assuming 16-byte aligned, contiguous operands
    if not t.is_contiguous():
        t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous and 16-byte aligned, else such a copy."""
    return t if t.is_contiguous() and not t.data_ptr() % 16 else _aligned(t)


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
        self.rank = rank
        self.plain_fwd = self.full_input is not None and all(
            a is None and r == "full" for a, r, _ in self.fwd_outs)
        # backward outputs: (alias or None, kind), one per forward input
        self.bwd_outs: list[tuple[tuple[str, int] | None, str]] = []
        self.n_partial = 0
        if step.bwd is not None:
            bwd_alias = aliases(step.bwd)
            for j, (_, vid) in enumerate(step.bwd.outputs):
                a = bwd_alias.get(j)
                kind = step.bwd.kind(vid)
                self.bwd_outs.append((a, kind))
                if a is None and kind in ("col", "scalar"):
                    self.n_partial += 1
        self.acc = tuple(step.bwd_acc)
        # forward inputs the backward reads: the rest need not be saved for it
        self.bwd_used = frozenset(_loaded(step.bwd)) if step.bwd is not None else frozenset()
        # every grad is an input passed through (a residual add): nothing to launch
        self.bwd_noop = (step.bwd is not None and not stored(step.bwd).outputs
                         and not self.acc)
        self._ws: dict[torch.device, list[torch.Tensor]] = {}

    def _workspace(self, dev: torch.device) -> list[torch.Tensor]:
        """fp32 sums + ticket counter of the backward kernel (one stream at a time)."""
        got = self._ws.get(dev)
        if got is None:
            got = [torch.zeros(max(1, self.n_partial * self.c), dtype=torch.float32, device=dev),
                   torch.zeros(1, dtype=torch.int32, device=dev)]
            self._ws[dev] = got
        return got

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
        ins = [t if t.is_contiguous() and not t.data_ptr() % 16 else _aligned(t)
               for t in tensors]
        if self.plain_fwd and ins[self.full_input].dim() == self.rank:  # type: ignore[index]
            # every output is a fresh full tile shaped like the full input
            t = ins[self.full_input]  # type: ignore[index]
            fresh = [torch.empty(t.shape, dtype=self.dtype, device=t.device)
                     for _ in self.fwd_outs]
            n = t.numel() // self.c
            self.fwd.launch(_grid(n, self.fwd_cfg, self.fwd_loop),  # type: ignore[arg-type]
                            [*ins, *fresh, n], self.fwd_cfg)  # type: ignore[arg-type]
            return tuple(fresh)
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
                 symbols: dict[str, int] | None = None,
                 prev: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Grads of every group input, in the forward's input order. ``prev``: for
        inputs in ``step.bwd_acc``, a grad already accumulated (contiguous, 16-byte
        aligned, the input's shape and dtype) that the kernel adds in: the grad
        returned for that input then includes it."""
        assert self.bwd is not None and self.bwd_cfg is not None
        ins = [t if t.is_contiguous() and not t.data_ptr() % 16 else _aligned(t) for t in saved]
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
        for alias, _ in self.bwd_outs:
            if alias is not None:
                results.append(bwd_inputs[alias[1]] if alias[0] == "in" else results[alias[1]])
                continue
            # a grad has its input's shape and dtype (col/scalar: the kernel's final sums)
            t = torch.empty_like(ins[len(results)])
            results.append(t)
            kernel_outs.append(t)
        if self.bwd_noop:
            return results
        if self.n_partial:
            kernel_outs.extend(self._workspace(dev))
        if self.acc:
            have = prev or {}
            # no grad there yet: any valid pointer (the output itself), flag 0
            kernel_outs.extend(have.get(j, results[j]) for j in self.acc)
            kernel_outs.extend(int(j in have) for j in self.acc)  # type: ignore[misc]
        self.bwd.launch(grid, [*bwd_inputs, *kernel_outs, rows], cfg)
        return results
