"""Names of the float dtypes a blueprint is compiled for, as torch dtypes."""

from __future__ import annotations

import torch

from esper.errors import CompileError

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "bool": torch.bool,
}


def torch_dtype(name: object) -> torch.dtype:
    """``"bfloat16"`` (or ``DType.bfloat16``) -> ``torch.bfloat16``; a torch dtype passes."""
    if isinstance(name, torch.dtype):
        return name
    key = getattr(name, "value", name)
    try:
        return TORCH_DTYPES[key]  # type: ignore[index]
    except (KeyError, TypeError):
        raise CompileError(f"unsupported dtype {name!r} (one of {sorted(TORCH_DTYPES)})") from None
