"""The numeric checks of one loaded artifact (checks 2-5), each a small function
returning a CheckRecord with its figure and bound: forward and backward
equivalence against the float64 evaluator, finiteness, determinism and graft
safety. Integrity (check 1) lives in ``integrity``, device-only checks in
``device_checks``. Every check runs with uninitialised memory poisoned."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from esper.compile.params import BlueprintModule
from esper.validate import report as r
from esper.validate.subject import (
    Subject,
    cotangents,
    make_inputs,
    poisoned,
    reference,
    reference_params,
    run,
)
from esper.validate.tolerances import (
    EAGER_CAP,
    EAGER_FACTOR,
    ELEMENT_FACTOR,
    compare,
    representable,
    rms_of,
)

T = torch.Tensor
Check = Callable[[Subject], r.CheckRecord]

def _fmt(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


# -- 2./3. forward and backward equivalence ---------------------------------------------


def _structure(got: tuple[T, ...], want: tuple[T, ...], s: Subject) -> list[str]:
    if len(got) != len(want):
        return [f"{len(got)} outputs, the blueprint has {len(want)}"]
    out = []
    for name, g, w in zip(s.ir.outputs, got, want, strict=True):
        if tuple(g.shape) != tuple(w.shape):
            out.append(f"output {name!r} has shape {tuple(g.shape)}, expected {tuple(w.shape)}")
        expected = s.dtype if w.is_floating_point() else w.dtype
        if g.dtype != expected:
            out.append(f"output {name!r} is {g.dtype}, expected {expected}")
    return out


class _Worst:
    """The largest errors seen over several comparisons, and where."""

    def __init__(self) -> None:
        self.error = self.element = 0.0
        self.where = self.element_where = ""
        self.nonfinite = 0
        self.compared = 0
        self.per_batch: dict[str, float] = {}

    def add(self, what: str, batch: int, got: T, want: T, s: Subject, *,
            scale: float = 0.0) -> None:
        c = compare(got, want, s.dtype, scale)
        self.nonfinite += c.nonfinite
        here = f"{what} at batch {batch}"
        key = str(batch)
        self.per_batch[key] = max(self.per_batch.get(key, 0.0), c.error)
        if c.error > self.error or not self.where:
            self.error, self.where = c.error, here
        if c.element_error > self.element or not self.element_where:
            self.element, self.element_where = c.element_error, here

    def record(self, check: str, s: Subject, what: str) -> r.CheckRecord:
        element_bound = ELEMENT_FACTOR * s.tol
        details: dict[str, Any] = {
            "per_batch": {k: r.finite_or_none(v) for k, v in self.per_batch.items()},
            "batch_sizes": list(s.batch_sizes), "worst": self.where,
            "element_error": r.finite_or_none(self.element), "element_bound": element_bound,
            "worst_element": self.element_where}
        if self.nonfinite:
            return r.failed(check, f"{self.nonfinite} {what} element(s) are NaN/Inf where the "
                            f"reference is finite (first: {self.where}); unwritten output "
                            "memory reads as NaN here", bound=s.tol, **details)
        msg = (f"rel err {_fmt(self.error)} ({self.where}), bound {_fmt(s.tol)}; element err "
               f"{_fmt(self.element)} ({self.element_where}), bound {_fmt(element_bound)}")
        if self.error > s.tol:
            return r.failed(check, msg, figure=self.error, bound=s.tol, **details)
        if self.element > element_bound:
            return r.failed(check, msg, figure=self.element, bound=element_bound, **details)
        return r.passed(check, msg, figure=self.error, bound=s.tol, **details)


def _forward_errors(s: Subject, module: torch.nn.Module) -> _Worst | r.CheckRecord:
    """``module``'s output errors at every batch size (a failed record if the
    outputs are not even shaped right)."""
    worst = _Worst()
    params = reference_params(s)
    for k, batch in enumerate(s.batch_sizes):
        xs = make_inputs(s, batch, seed=s.policy.seed * 7919 + k)
        with poisoned(), torch.no_grad():
            got = run(module, xs.module)
        with torch.no_grad():
            want = reference(s, xs.ref, params)
        problems = _structure(got, want, s)
        if problems:
            return r.failed(r.FORWARD, f"batch {batch}: " + "; ".join(problems))
        for name, g, w in zip(s.ir.outputs, got, want, strict=True):
            worst.add(f"output {name!r}", batch, g, w, s)
    return worst


def _judge(check: str, s: Subject, worst: _Worst, what: str,
           eager: Callable[[], _Worst | r.CheckRecord]) -> r.CheckRecord:
    """The dtype's bounds, or — where the eager reference backend itself misses them
    on this device (cuDNN's bf16 conv weight gradient, say) — up to
    ``EAGER_FACTOR`` x eager's own error on the very same inputs, never more than
    ``EAGER_CAP`` x the dtype's bounds."""
    record = worst.record(check, s, what)
    if not record.failed or worst.nonfinite:
        return record
    element_bound = ELEMENT_FACTOR * s.tol
    if worst.error > EAGER_CAP * s.tol or worst.element > EAGER_CAP * element_bound:
        return record
    base = eager()
    if not isinstance(base, _Worst):
        return record
    bound = min(max(s.tol, EAGER_FACTOR * base.error), EAGER_CAP * s.tol)
    el_bound = min(max(element_bound, EAGER_FACTOR * base.element),
                   EAGER_CAP * element_bound)
    details = {**record.details, "eager_error": r.finite_or_none(base.error),
               "eager_element_error": r.finite_or_none(base.element)}
    note = (f"; eager torch on this device: rel err {_fmt(base.error)}, element err "
            f"{_fmt(base.element)}")
    if worst.error <= bound and worst.element <= el_bound:
        return r.passed(check, f"{record.message}{note}: within {EAGER_FACTOR:g}x of eager, "
                        "whose own error misses the dtype bound", figure=worst.error,
                        bound=bound, **{**details, "bound_from": "eager"})
    return record.model_copy(update={"message": record.message + note, "details": details})


def check_forward(s: Subject) -> r.CheckRecord:
    """Outputs vs float64 evaluation of the submitted IR at every batch size."""
    worst = _forward_errors(s, s.module)
    if not isinstance(worst, _Worst):
        return worst
    return _judge(r.FORWARD, s, worst, "output", lambda: _forward_errors(s, s.eager()))


def _fwd_bwd(module: torch.nn.Module, xs_mod: list[T], cots: list[T]) -> tuple[T, ...]:
    module.zero_grad(set_to_none=True)
    outs = run(module, xs_mod)
    pairs = [(o, c) for o, c in zip(outs, cots, strict=True) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [c for _, c in pairs])
    return outs


def _grads(s: Subject, module: BlueprintModule, xs_mod: list[T], xs_ref: list[T],
           params64: dict[str, T]) -> list[tuple[str, T | None, T]]:
    """(name, kernel grad, reference grad) for every leaf the reference differentiates."""
    out: list[tuple[str, T | None, T]] = []
    for spec, xm, xr in zip(s.ir.inputs, xs_mod, xs_ref, strict=True):
        if xr.grad is not None:
            out.append((f"input {spec.name!r}", xm.grad, xr.grad))
    for ours, theirs in s.key_map.items():
        ref = params64[ours].grad
        if ref is not None:
            out.append((f"parameter {ours!r}", module.params[theirs].grad, ref))
    return out


def _backward_errors(s: Subject, module: BlueprintModule) -> _Worst | r.CheckRecord:
    """``module``'s gradient errors at every batch size (or a failed/skipped record)."""
    worst = _Worst()
    for k, batch in enumerate(s.batch_sizes):
        xs = make_inputs(s, batch, seed=s.policy.seed * 7919 + 100 + k)
        xs_mod, xs_ref = xs.leaves()
        params64 = reference_params(s, requires_grad=True)
        want = reference(s, xs_ref, params64)
        cot_mod, cot_ref = cotangents(want, s, seed=s.policy.seed + 200 + k)
        with poisoned():
            _fwd_bwd(module, xs_mod, cot_mod)
        diff = [(w, c) for w, c in zip(want, cot_ref, strict=True) if w.requires_grad]
        if not diff:
            return r.skipped(r.BACKWARD, "no output depends on an input or parameter")
        torch.autograd.backward([w for w, _ in diff], [c for _, c in diff])
        grads = _grads(s, module, xs_mod, xs_ref, params64)
        scale = rms_of([ref for _, _, ref in grads])
        for what, got, ref in grads:
            if got is None:
                return r.failed(r.BACKWARD, f"{what} gets no gradient at batch {batch}; "
                                "the reference's is nonzero" if bool(ref.any()) else
                                f"{what} gets no gradient at batch {batch}")
            worst.add(f"grad of {what}", batch, got, ref, s, scale=scale)
            worst.compared += 1
    return worst


def check_backward(s: Subject) -> r.CheckRecord:
    """Input and parameter gradients vs float64 autograd through the evaluator."""
    worst = _backward_errors(s, s.module)
    if not isinstance(worst, _Worst):
        return worst
    rec = _judge(r.BACKWARD, s, worst, "gradient", lambda: _backward_errors(s, s.eager()))
    return rec.model_copy(update={"details": {**rec.details, "gradients": worst.compared}})


# -- 4. finiteness and determinism -----------------------------------------------------


def _nonfinite(got: T | None, representable_mask: T) -> int:
    if got is None:
        return 0
    g = got.detach().cpu()
    return int((~torch.isfinite(g) & representable_mask).sum())


def check_finiteness(s: Subject) -> r.CheckRecord:
    """No NaN/Inf in outputs or gradients, on normal and large-magnitude inputs,
    wherever the float64 result fits the dtype and the eager reference backend
    (same dtype, same parameters) is finite itself."""
    eager = s.eager()
    scale = s.policy.large_scale.get(s.dtype_name, 1e4)
    counts: dict[str, int] = {}
    first = ""
    for label, mult in (("normal", 1.0), ("large", scale)):
        xs = make_inputs(s, s.mid_batch, seed=s.policy.seed + 300, scale=mult)
        with torch.no_grad():
            want = reference(s, xs.ref, reference_params(s))
        cot_mod, _ = cotangents(want, s, seed=s.policy.seed + 301)
        xm, _ = xs.leaves()
        xe, _ = xs.leaves()
        with poisoned():
            got = _fwd_bwd(s.module, xm, cot_mod)
            ref_e = _fwd_bwd(eager, xe, cot_mod)
        bad = 0
        for name, g, e, w in zip(s.ir.outputs, got, ref_e, want, strict=True):
            ok = representable(w.detach().cpu(), s.dtype) & torch.isfinite(e.detach().cpu())
            n = _nonfinite(g, ok)
            if n and not first:
                first = f"output {name!r} on {label} inputs"
            bad += n
        for spec, a, b in zip(s.ir.inputs, xm, xe, strict=True):
            if b.grad is not None:
                n = _nonfinite(a.grad, torch.isfinite(b.grad.detach().cpu()))
                if n and not first:
                    first = f"grad of input {spec.name!r} on {label} inputs"
                bad += n
        for key, p in s.module.params.items():
            pe = eager.params[key].grad
            if pe is not None:
                n = _nonfinite(p.grad, torch.isfinite(pe.detach().cpu()))
                if n and not first:
                    first = f"grad of parameter {key!r} on {label} inputs"
                bad += n
        counts[label] = bad
    total = sum(counts.values())
    details = {"nonfinite": counts, "large_scale": scale, "batch": s.mid_batch}
    if total:
        return r.failed(r.FINITENESS, f"{total} NaN/Inf element(s) where the reference is "
                        f"finite (first: {first})", figure=total, bound=0, **details)
    return r.passed(r.FINITENESS, f"finite on normal inputs and inputs x{scale:g}",
                    figure=0, bound=0, **details)


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _differing(a: T | None, b: T | None) -> int:
    if a is None or b is None:
        return 0 if a is None and b is None else max(
            t.numel() for t in (a, b) if t is not None)
    if a.shape != b.shape or a.dtype != b.dtype:
        return max(a.numel(), b.numel())
    if a.is_floating_point():
        bits = _BITS[a.element_size()]
        return int((a.detach().view(bits) != b.detach().view(bits)).sum())
    return int((a != b).sum())



def _differing_beyond(x: T | None, y: T | None, ulps: float) -> int:
    """Elements of ``x`` and ``y`` further apart than ``ulps`` units in the last
    place of their dtype, taken at the tensor's largest magnitude."""
    if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
        return _differing(x, y)
    if not x.is_floating_point():
        return _differing(x, y)
    eps = torch.finfo(x.dtype).eps
    a, b = x.double(), y.double()
    scale = float(a.abs().max()) if a.numel() else 0.0
    far = (a - b).abs() > ulps * eps * scale
    both_nan = a.isnan() & b.isnan()
    return int((far | (a.isnan() ^ b.isnan())).logical_and(~both_nan).sum())

def check_determinism(s: Subject) -> r.CheckRecord:
    """The same inputs twice (forward and backward) give the same bits."""
    xs = make_inputs(s, s.mid_batch, seed=s.policy.seed + 400)
    with torch.no_grad():
        want = reference(s, xs.ref, reference_params(s))
    cot_mod, _ = cotangents(want, s, seed=s.policy.seed + 401)

    def once() -> list[T | None]:
        xm, _ = xs.leaves()
        with poisoned():
            outs = _fwd_bwd(s.module, xm, cot_mod)
        grads = [x.grad for x in xm] + [p.grad for p in s.module.params.values()]
        return [o.detach().clone() for o in outs] + [
            None if g is None else g.detach().clone() for g in grads]

    a, b = once(), once()
    if s.atomic_reductions:
        # Documented bound for atomics: sums finished in fp32 atomics may round
        # differently run to run, by at most a few units in the last place of the
        # output dtype relative to the tensor's scale; anything more is a bug.
        ulps = s.policy.atomic_ulps
        diff = sum(_differing_beyond(x, y, ulps) for x, y in zip(a, b, strict=True))
        what = f"beyond {ulps:g} ulp of scale (atomic reductions)"
    else:
        diff = sum(_differing(x, y) for x, y in zip(a, b, strict=True))
        what = "at all"
    bound = s.policy.determinism_bound
    msg = (f"{diff} element(s) differ {what} between two identical runs "
           "(outputs and gradients)")
    if diff > bound:
        return r.failed(r.DETERMINISM, msg, figure=diff, bound=bound, batch=s.mid_batch)
    return r.passed(r.DETERMINISM, msg, figure=diff, bound=bound, batch=s.mid_batch)


# -- 5. graft safety --------------------------------------------------------------------


def check_graft_safety(s: Subject) -> r.CheckRecord:
    """With the declared init (a fresh module from the artifact) the seed leaves the
    host unchanged. Residual kernels (one output shaped like the first input, as
    Kasmina's default ``kernel_output="residual"`` expects): max |out - x| <= bound,
    i.e. the seed's delta is 0. Any other kernel is read as a delta kernel
    (``kernel_output="delta"``): every output max |out| <= bound."""
    fresh = s.factory(s.device).eval()
    xs = make_inputs(s, s.mid_batch, seed=s.policy.seed + 500)
    with poisoned(), torch.no_grad():
        outs = run(fresh, xs.module)
    bound = s.policy.graft_bound
    host = xs.module[0]
    residual: float | None = None
    if len(outs) == 1 and outs[0].shape == host.shape and host.is_floating_point():
        change = (outs[0].double() - host.double()).abs()
        residual = float(change.max()) if change.numel() else 0.0
        residual = math.inf if math.isnan(residual) else residual
    delta = 0.0
    for o in outs:
        if o.is_floating_point() and o.numel():
            m = float(o.double().abs().max())
            delta = max(delta, math.inf if math.isnan(m) else m)
    enforce = s.policy.graft == "require"
    details: dict[str, Any] = {"residual_change": r.finite_or_none(residual),
                               "delta_max": r.finite_or_none(delta), "enforced": enforce}
    host_name = s.ir.inputs[0].name
    if residual is not None and residual <= bound:
        return r.passed(r.GRAFT_SAFETY, f"residual: output equals host input {host_name!r} at "
                        f"the declared init (max change {_fmt(residual)})", figure=residual,
                        bound=bound, mode="residual", **details)
    if delta <= bound:
        return r.passed(r.GRAFT_SAFETY, f"delta: every output is zero at the declared init "
                        f"(max {_fmt(delta)})", figure=delta, bound=bound, mode="delta",
                        **details)
    figure = delta if residual is None else min(residual, delta)
    shape = "" if residual is None else (
        f"differs from host input {host_name!r} by up to {_fmt(residual)} and ")
    msg = (f"at the declared init the output {shape}is nonzero up to {_fmt(delta)}: "
           "grafting it would change the host")
    if not enforce:
        return r.passed(r.GRAFT_SAFETY, f"not enforced: {msg}", figure=figure, bound=bound,
                        mode="none", **details)
    return r.failed(r.GRAFT_SAFETY, msg, figure=figure, bound=bound, mode="none", **details)


NUMERIC_CHECKS: tuple[tuple[str, Check], ...] = (
    (r.FORWARD, check_forward),
    (r.BACKWARD, check_backward),
    (r.FINITENESS, check_finiteness),
    (r.DETERMINISM, check_determinism),
    (r.GRAFT_SAFETY, check_graft_safety),
)
