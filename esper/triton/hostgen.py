"""The host side of a blueprint's training step as generated Python.

The schedule's steps, walked generically, cost a trainer's CPU several Python
calls, list builds and attribute lookups per step; on a slow host that alone
outweighs the fused kernels' gain. For each requires-grad pattern this module
writes one straight-line ``forward(ctx, sym, *inputs, *params)`` and one
``backward(ctx, *grads)``: cuBLAS/cuDNN calls, direct kernel launches with
their grid arithmetic, saved tensors and grad accumulation spelled out, every
decision that does not depend on the data made here. Steps without a rule
here (torch subgraphs, groups with row outputs or several outputs) call their
step object, which stays the reference implementation."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from esper.triton.runtime import GroupRunner, aligned
from esper.triton.steps import (
    Call,
    ConvStep,
    Grads,
    GroupStep,
    LinearStep,
    MatmulStep,
    PermuteStep,
    ReshapeStep,
    Step,
)

if TYPE_CHECKING:
    from esper.triton.autograd import Schedule, _Needs

_ids = itertools.count()


def _ok_prev(g: torch.Tensor | None, like: torch.Tensor) -> int:
    """1 when grad ``g`` can be added inside a kernel writing a grad shaped ``like``."""
    return int(g is not None and g.shape == like.shape and g.dtype == like.dtype
               and g.is_contiguous() and not g.data_ptr() % 16)


def _pointers(launcher: Any, exprs: list[str]) -> list[str]:
    """Kernel pointer arguments as the launcher takes them fastest: raw addresses
    for shipped binaries (no driver check per pointer per launch), else tensors."""
    if not getattr(launcher, "raw_pointers", False):
        return exprs
    return [f"{x}.data_ptr()" if x.isidentifier() else f"({x}).data_ptr()" for x in exprs]


def _need_cuda(*tensors: torch.Tensor) -> None:
    where = sorted({str(t.device) for t in tensors if not t.is_cuda})
    raise ValueError(f"this blueprint runs shipped GPU kernels: every input and parameter "
                     f"must be on a CUDA device, got tensors on {', '.join(where)}")


def _own(t: torch.Tensor, taken: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """An autograd output must not be an input or an earlier output."""
    return t.view_as(t) if any(t is x for x in taken) else t


class _Emitter:
    def __init__(self, tag: str) -> None:
        self.tag = tag  # keeps forward's and backward's globals apart
        self.lines: list[str] = []
        self.glb: dict[str, Any] = {}
        self.ind = 1

    def line(self, text: str) -> None:
        self.lines.append("    " * self.ind + text)

    def const(self, prefix: str, value: Any) -> str:
        name = f"_{prefix}{self.tag}{len(self.glb)}"
        self.glb[name] = value
        return name


class HostProgram:
    """Generated ``forward``/``backward`` of one schedule for one requires-grad pattern."""

    def __init__(self, schedule: Schedule, needs: _Needs, dtype: torch.dtype) -> None:
        self.schedule, self.needs, self.dtype = schedule, needs, dtype
        self.fresh = {o for st in schedule.steps for o in st.outs
                      if isinstance(st, (LinearStep, MatmulStep))
                      or (isinstance(st, GroupStep) and st.plain)}
        fwd, bwd = _Emitter("f"), _Emitter("b")
        self._emit_forward(fwd)
        self._emit_backward(bwd)
        glb: dict[str, Any] = {"_own": _own, "_ok_prev": _ok_prev, "_fix": aligned,
                               "_need_cuda": _need_cuda,
                               "_Call": Call, "_Grads": Grads, "_linear": F.linear,
                               "_mm": torch.mm, "_addmm": torch.addmm, "_matmul": torch.matmul,
                               "_conv2d": F.conv2d, "_empty": torch.empty,
                               "_empty_like": torch.empty_like, "_DT": dtype,
                               "_conv_bwd": torch.ops.aten.convolution_backward.default,
                               **fwd.glb, **bwd.glb}
        self.source = "\n".join([*fwd.lines, "", *bwd.lines]) + "\n"
        code = compile(self.source, f"<esper-host-{next(_ids)}>", "exec")
        exec(code, glb)  # generated here from the plan: no outside text reaches it
        self.forward: Callable[..., tuple[torch.Tensor, ...]] = glb["forward"]
        self.backward: Callable[..., tuple[torch.Tensor | None, ...]] = glb["backward"]

    # -- forward ------------------------------------------------------------------

    def _emit_forward(self, e: _Emitter) -> None:
        sc, nd = self.schedule, self.needs
        ins = [f"s{s}" for s in sc.input_slots]
        prm = [f"p{i}" for i in range(sc.n_params)]
        e.lines.append(f"def forward(ctx, sym, {', '.join([*ins, *prm, '*_'])}):")
        raw = any(isinstance(st, GroupStep) and st.runner is not None
                  and getattr(st.runner.fwd, "raw_pointers", False) for st in sc.steps)
        if raw and ins + prm:
            # raw addresses skip the launcher's own check that each one is on the GPU
            e.line(f"if not ({' and '.join(f'{v}.is_cuda' for v in [*ins, *prm])}):")
            e.line(f"    _need_cuda({', '.join([*ins, *prm])})")
        generic = any(not _inline(st) for st in sc.steps)
        if generic:
            e.line(f"P = ({', '.join(prm)}{',' if prm else ''})")
            e.line("K = {}")
        for i, st in enumerate(sc.steps):
            self._fwd_step(e, i, st, nd.step[i])
        saved = [f"s{s}" for s in nd.saved]
        e.line(f"ctx.save_for_backward({', '.join([*saved, *prm])})")
        e.line("ctx.sym = sym")
        shapes = self._reshapes()
        if shapes:
            e.line(f"ctx.shapes = ({', '.join(shapes)},)")
        if generic:
            e.line("ctx.keep = K")
        outs: list[str] = []
        taken = list(ins)
        for s in sc.output_slots:
            v = f"s{s}"
            if v in taken or self._producer_generic(s):
                v = f"_own({v}, ({', '.join(taken)},))"
            outs.append(v)
            taken.append(f"s{s}")
        e.line(f"return ({', '.join(outs)},)")

    def _reshapes(self) -> list[str]:
        """Input shapes recorded by reshape steps for their backward."""
        return [f"k{i}" for i, st in enumerate(self.schedule.steps)
                if isinstance(st, ReshapeStep) and self.needs.step[i]]

    def _producer_generic(self, slot: int) -> bool:
        return any(slot in st.outs and not _inline(st) for st in self.schedule.steps)

    def _fwd_step(self, e: _Emitter, i: int, st: Step, rec: bool) -> None:
        o = [f"s{s}" for s in st.outs]
        x = [f"s{s}" for s in st.ins]
        p = [f"p{k}" for k in st.pins]
        if isinstance(st, LinearStep):
            e.line(f"{o[0]} = _linear({x[0]}, {p[0]}, {p[1] if st.bias else 'None'})")
        elif isinstance(st, MatmulStep):
            e.line(f"{o[0]} = _matmul({x[0]}, {x[1]})")
        elif isinstance(st, ConvStep):
            b = p[1] if st.bias else "None"
            e.line(f"{o[0]} = _conv2d({x[0]}, {p[0]}, {b}, {st.stride!r}, {st.padding!r}, "
                   f"{st.dilation!r}, {st.groups})")
        elif isinstance(st, PermuteStep):
            e.line(f"{o[0]} = {x[0]}.permute({st.dims!r})")
        elif isinstance(st, ReshapeStep):
            dims = ", ".join(f"sym[{d!r}]" if isinstance(d, str) else str(int(d))
                             for d in st.shape)
            if rec:
                e.line(f"k{i} = {x[0]}.shape")
            e.line(f"{o[0]} = {x[0]}.reshape(({dims},))")
        elif _inline(st):
            assert isinstance(st, GroupStep) and st.runner is not None
            self._fwd_group(e, i, st)
        else:
            obj = e.const("S", st)
            self._env_in(e, st.ins)
            e.line(f"{obj}.forward(_Call(_e, P, sym, K), {i}, {rec})")
            for s in st.outs:
                e.line(f"s{s} = _e[{s}]")

    def _env_in(self, e: _Emitter, slots: tuple[int, ...]) -> None:
        e.line(f"_e = [None] * {self.schedule.n_slots}")
        for s in slots:
            e.line(f"_e[{s}] = s{s}")

    def _fwd_group(self, e: _Emitter, i: int, st: GroupStep) -> None:
        r = st.runner
        assert r is not None and r.fwd_cfg is not None and r.full_input is not None
        args = self._group_args(e, st)
        full = args[r.full_input]
        go = e.const("L", r.fwd.bind(r.fwd_cfg))  # type: ignore[attr-defined]
        e.line(f"n = {full}.numel() // {r.c}")
        outs = [f"s{s}" for s in st.outs]
        for o in outs:
            # ``full`` is contiguous and of the kernel's dtype: empty_like skips the
            # keyword parsing of a factory call (several us a call on a slow host)
            e.line(f"{o} = _empty_like({full})")
        ptrs = _pointers(r.fwd, [*args, *outs])
        e.line(f"{go}({_grid(r, 'fwd')}, {', '.join(ptrs)}, n)")

    def _group_args(self, e: _Emitter, st: GroupStep, stand_in: str | None = None
                    ) -> list[str]:
        """Each group input, made contiguous and 16-byte aligned where it may not be
        (graph inputs, parameters, views); fresh outputs of GEMMs and of our own
        kernels already are. In backward, an input that was not saved (the kernel
        never reads it) gets ``stand_in``'s pointer."""
        out = []
        for j, (kind, k) in enumerate(st.args):
            if stand_in is not None and kind == "slot" and k not in st.saves:
                out.append(stand_in)
                continue
            if kind == "slot" and k in self.fresh:
                out.append(f"s{k}")
                continue
            src = f"s{k}" if kind == "slot" else f"p{k}"
            e.line(f"a{j} = _fix({src})")
            out.append(f"a{j}")
        return out

    # -- backward -----------------------------------------------------------------

    def _emit_backward(self, e: _Emitter) -> None:
        sc, nd = self.schedule, self.needs
        gos = [f"go{j}" for j in range(len(sc.output_slots))]
        e.lines.append(f"def backward(ctx, {', '.join(gos)}):")
        saved = [f"s{s}" for s in nd.saved]
        prm = [f"p{i}" for i in range(sc.n_params)]
        if saved or prm:  # a residual add's backward may need nothing saved at all
            e.line(f"{', '.join([*saved, *prm])}, = ctx.saved_tensors")
        e.line("sym = ctx.sym")
        shapes = self._reshapes()
        if shapes:
            e.line(f"{', '.join(shapes)}, = ctx.shapes")
        if any(not _inline(st) for st in sc.steps):
            e.line("K = ctx.keep")
            e.line(f"P = ({', '.join(prm)}{',' if prm else ''})")
        grads = {s for s in range(sc.n_slots) if nd.slot[s]}
        for s in grads:
            e.line(f"g{s} = None")
        for k in range(sc.n_params):
            if nd.param[k]:
                e.line(f"q{k} = None")
        for j, s in enumerate(sc.output_slots):
            if s in grads:
                e.line(f"if go{j} is not None:")
                e.line(f"    g{s} = go{j} if g{s} is None else g{s} + go{j}")
        for i in range(len(sc.steps) - 1, -1, -1):
            st = sc.steps[i]
            if not nd.step[i]:
                continue
            cond = " or ".join(f"g{s} is not None" for s in st.outs)
            e.line(f"if {cond}:")
            e.ind += 1
            start = len(e.lines)
            self._bwd_step(e, i, st)
            temps = _temporaries(e.lines[start:])
            if temps:
                # a temporary left bound keeps a grad or an activation alive into the
                # next steps: eager autograd frees it here, so must we (peak memory)
                e.line(f"{' = '.join(temps)} = None")
            e.ind -= 1
            for s in st.outs:
                e.line(f"g{s} = None")
        ret = [f"g{s}" if nd.slot[s] else "None" for s in sc.input_slots]
        ret += [f"q{k}" if nd.param[k] else "None" for k in range(sc.n_params)]
        e.line(f"return ({', '.join(ret)},)")

    def _add(self, e: _Emitter, target: str, value: str) -> None:
        e.line(f"_v = {value}")
        e.line(f"{target} = _v if {target} is None else {target} + _v")

    def _bwd_step(self, e: _Emitter, i: int, st: Step) -> None:
        nd = self.needs
        need = [nd.slot[s] for s in st.ins]
        pneed = [nd.param[k] for k in st.pins]
        g = [f"g{s}" for s in st.outs]
        x = [f"s{s}" for s in st.ins]
        p = [f"p{k}" for k in st.pins]
        if isinstance(st, LinearStep):
            e.line(f"_g2 = {g[0]}.reshape(-1, {g[0]}.shape[-1])")
            if need[0]:
                gx = f"g{st.ins[0]}"
                e.line(f"if {gx} is not None and {gx}.shape == {x[0]}.shape:")
                e.line("    # the input grad already there joins inside the GEMM (beta = 1)")
                e.line(f"    {gx} = _addmm({gx}.reshape(-1, {p[0]}.shape[1]), _g2, {p[0]})"
                       f".view({x[0]}.shape)")
                e.line("else:")
                e.ind += 1
                self._add(e, gx, f"_mm(_g2, {p[0]}).view({x[0]}.shape)")
                e.ind -= 1
            if pneed[0]:
                self._add(e, f"q{st.pins[0]}",
                          f"_mm(_g2.t(), {x[0]}.reshape(-1, {p[0]}.shape[1]))")
            if st.bias and pneed[1]:
                self._add(e, f"q{st.pins[1]}", "_g2.sum(0)")
        elif isinstance(st, MatmulStep):
            if need[0]:
                self._add(e, f"g{st.ins[0]}", f"_matmul({g[0]}, {x[1]}.mT)")
            if need[1]:
                e.line(f"if {x[1]}.dim() == 2:")
                e.line(f"    _v = _mm({x[0]}.reshape(-1, {x[0]}.shape[-1]).t(), "
                       f"{g[0]}.reshape(-1, {g[0]}.shape[-1]))")
                e.line("else:")
                e.line(f"    _v = _matmul({x[0]}.mT, {g[0]})")
                e.line(f"g{st.ins[1]} = _v if g{st.ins[1]} is None else g{st.ins[1]} + _v")
        elif isinstance(st, ConvStep):
            mask = [need[0], pneed[0], st.bias and pneed[1]]
            bsz = f"[{p[0]}.shape[0]]" if st.bias else "None"
            e.line(f"_gx, _gw, _gb = _conv_bwd({g[0]}.contiguous(), {x[0]}, {p[0]}, {bsz}, "
                   f"{list(st.stride)!r}, {list(st.padding)!r}, {list(st.dilation)!r}, False, "
                   f"[0, 0], {st.groups}, {mask!r})")
            if mask[0]:
                self._add(e, f"g{st.ins[0]}", "_gx")
            if mask[1]:
                self._add(e, f"q{st.pins[0]}", "_gw")
            if mask[2]:
                self._add(e, f"q{st.pins[1]}", "_gb")
        elif isinstance(st, PermuteStep):
            if need[0]:
                inverse = [0] * len(st.dims)
                for k, d in enumerate(st.dims):
                    inverse[d % len(st.dims)] = k
                self._add(e, f"g{st.ins[0]}", f"{g[0]}.permute({tuple(inverse)!r})")
        elif isinstance(st, ReshapeStep):
            if need[0]:
                self._add(e, f"g{st.ins[0]}", f"{g[0]}.reshape(k{i})")
        elif _inline(st):
            assert isinstance(st, GroupStep)
            self._bwd_group(e, st)
        else:
            self._bwd_generic(e, i, st)

    def _bwd_group(self, e: _Emitter, st: GroupStep) -> None:
        r = st.runner
        assert r is not None and r.bwd is not None and r.bwd_cfg is not None
        assert r.full_input is not None
        nd = self.needs
        e.line(f"_go = _fix(g{st.outs[0]})")
        args = self._group_args(e, st, stand_in="_go")
        bwd_inputs = [*args, "_go"]
        full = args[r.full_input]
        if not r.bwd_noop:
            e.line(f"n = {full}.numel() // {r.c}")
        results: list[str] = []
        stored: list[str] = []
        for j, (alias, _) in enumerate(r.bwd_outs):
            if alias is None:
                e.line(f"r{j} = _empty_like({args[j]})")
                results.append(f"r{j}")
                stored.append(f"r{j}")
            else:
                results.append(bwd_inputs[alias[1]] if alias[0] == "in" else results[alias[1]])
        extra: list[str] = []
        if r.n_partial:
            ws = e.const("R", r)
            e.line(f"_ws, _lock = {ws}._workspace({full}.device)")
            extra += ["_ws", "_lock"]
        flags: list[str] = []
        for j in r.acc:
            kind, slot = st.args[j]
            if kind == "slot" and nd.slot[slot]:
                e.line(f"h{j} = _ok_prev(g{slot}, {args[j]})")
                extra.append(f"g{slot} if h{j} else r{j}")
            else:
                e.line(f"h{j} = 0")
                extra.append(f"r{j}")
            flags.append(f"h{j}")
        if not r.bwd_noop:
            go = e.const("L", r.bwd.bind(r.bwd_cfg))  # type: ignore[attr-defined]
            ptrs = _pointers(r.bwd, [*bwd_inputs, *stored, *extra])
            e.line(f"{go}({_grid(r, 'bwd')}, {', '.join([*ptrs, *flags])}, n)")
        for j, (kind, k) in enumerate(st.args):
            if kind == "slot":
                if not nd.slot[k]:
                    continue
                if j in r.acc:  # the kernel already added the grad that was there
                    e.line(f"if h{j}:")
                    e.line(f"    g{k} = {results[j]}")
                    e.line("else:")
                    e.ind += 1
                    self._add(e, f"g{k}", results[j])
                    e.ind -= 1
                else:
                    self._add(e, f"g{k}", results[j])
            elif nd.param[k]:
                self._add(e, f"q{k}", results[j])

    def _bwd_generic(self, e: _Emitter, i: int, st: Step) -> None:
        """Through the step object: its env, the grads it may add to, its keep."""
        nd = self.needs
        obj = e.const("S", st)
        need = e.const("N", list(nd.slot))
        pneed = e.const("Q", list(nd.param))
        e.line(f"_e = [None] * {self.schedule.n_slots}")
        for s in st.saves:
            e.line(f"_e[{s}] = s{s}")
        e.line(f"_gs = [None] * {self.schedule.n_slots}")
        for s in st.ins:
            if nd.slot[s]:
                e.line(f"_gs[{s}] = g{s}")
        e.line(f"_qs = [None] * {self.schedule.n_params}")
        gouts = ", ".join(f"g{s}" for s in st.outs)
        e.line(f"{obj}.backward(_Call(_e, P, sym, K), {i}, [{gouts}], "
               f"_Grads(_gs, _qs, {need}, {pneed}))")
        for s in st.ins:
            if nd.slot[s]:
                e.line(f"g{s} = _gs[{s}]")
        for k in st.pins:
            if nd.param[k]:
                e.line(f"if _qs[{k}] is not None:")
                e.ind += 1
                self._add(e, f"q{k}", f"_qs[{k}]")
                e.ind -= 1


_TEMP = re.compile(r"^\s*((?:_|[arh]\d)\w*(?:\s*,\s*(?:_|[arh]\d)\w*)*)\s*,?\s*=[^=]")


def _temporaries(lines: list[str]) -> list[str]:
    """Names a backward step binds for itself (``_v``, ``_go``, ``r0``, ``a1``...)."""
    out: list[str] = []
    for line in lines:
        m = _TEMP.match(line)
        if m:
            for raw in m.group(1).split(","):
                name = raw.strip()
                if name and name not in out:
                    out.append(name)
    return out


def _inline(st: Step) -> bool:
    """Steps the generator spells out; the rest go through their step object."""
    if isinstance(st, GroupStep):
        return st.plain
    return isinstance(st, (LinearStep, MatmulStep, ConvStep, PermuteStep, ReshapeStep))


def _grid(r: GroupRunner, which: str) -> str:
    cfg = r.fwd_cfg if which == "fwd" else r.bwd_cfg
    loop = r.fwd_loop if which == "fwd" else r.bwd_loop
    assert cfg is not None
    blocks = f"max(1, -(-n // {cfg.block_r}))"
    return f"min({blocks}, {cfg.grid_cap})" if loop and cfg.grid_cap > 0 else blocks
