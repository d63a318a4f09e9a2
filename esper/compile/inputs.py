"""Check runtime tensors against a blueprint's declared inputs and bind its
symbolic dims (``"B"`` -> 32) for ops such as ``reshape`` that name them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from esper.errors import InputMismatchError
from esper.ir import BlueprintIR


def bind_inputs(ir: BlueprintIR, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """Validate count, rank and fixed dims of ``inputs``; return symbol -> size.
    A symbol used by several inputs must have one size."""
    if len(inputs) != len(ir.inputs):
        raise InputMismatchError(
            f"blueprint {ir.name!r} takes {len(ir.inputs)} input(s) "
            f"({', '.join(i.name for i in ir.inputs)}), got {len(inputs)}"
        )
    symbols: dict[str, int] = {}
    for spec, tensor in zip(ir.inputs, inputs, strict=True):
        if not isinstance(tensor, torch.Tensor):
            raise InputMismatchError(f"input {spec.name!r}: expected a tensor, got {type(tensor)}")
        if tensor.dim() != len(spec.shape):
            raise InputMismatchError(
                f"input {spec.name!r}: expected rank {len(spec.shape)} {tuple(spec.shape)}, "
                f"got shape {tuple(tensor.shape)}"
            )
        for axis, (dim, size) in enumerate(zip(spec.shape, tensor.shape, strict=True)):
            if isinstance(dim, str):
                bound = symbols.setdefault(dim, int(size))
                if bound != size:
                    raise InputMismatchError(
                        f"input {spec.name!r} dim {axis}: symbol {dim!r} is {bound} "
                        f"elsewhere, got {size}"
                    )
            elif dim != size:
                raise InputMismatchError(
                    f"input {spec.name!r} dim {axis}: expected {dim}, got {size} "
                    f"(shape {tuple(tensor.shape)})"
                )
    return symbols


def resolve_shape(shape: Sequence[int | str], symbols: dict[str, int]) -> list[int]:
    """A ``reshape`` target with its symbols replaced by their bound sizes."""
    return [symbols[d] if isinstance(d, str) else int(d) for d in shape]
