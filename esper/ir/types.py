"""The IR's value types: dtypes, dims, tensor schemas and the one op enum."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

Dim = int | str
"""A tensor dim: an int >= 1, or a symbol such as ``"B"`` bound at run time."""

Shape = tuple[Dim, ...]

SYMBOL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class RuleError(ValueError):
    """An op rule's complaint, without node context; callers add node id and op."""


class DType(StrEnum):
    """Tensor element types. Values are the JSON spellings."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    int64 = "int64"
    bool = "bool"


FLOAT_DTYPES = frozenset({DType.float32, DType.float16, DType.bfloat16})
NUMERIC_DTYPES = FLOAT_DTYPES | {DType.int64}
ALL_DTYPES = frozenset(DType)


class IRNodeType(StrEnum):
    """Every op a blueprint may use; ``esper.ir.ops.OPS`` holds one rule set per member."""

    LINEAR = "linear"
    MATMUL = "matmul"
    CONV2D = "conv2d"
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    RELU = "relu"
    GELU = "gelu"
    SILU = "silu"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    SOFTMAX = "softmax"
    LAYER_NORM = "layer_norm"
    RMS_NORM = "rms_norm"
    DROPOUT = "dropout"
    SUM = "sum"
    MEAN = "mean"
    MAX = "max"
    RESHAPE = "reshape"
    PERMUTE = "permute"
    CONCAT = "concat"
    IDENTITY = "identity"
    SCALE = "scale"


def check_dim(value: Any, where: str = "dim") -> Dim:
    """A dim as written: an int >= 1 (not a bool) or a symbol name."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 1:
            return value
        raise RuleError(f"{where}: {value} is not >= 1")
    if isinstance(value, str):
        if SYMBOL_RE.match(value):
            return value
        raise RuleError(f"{where}: {value!r} is not a symbol (letters, digits, _)")
    raise RuleError(f"{where}: expected an int >= 1 or a symbol, got {value!r}")


def check_shape(value: Any) -> Shape:
    """Validate a written shape (list or tuple of dims) into a tuple."""
    if not isinstance(value, (list, tuple)):
        raise RuleError(f"shape must be a list of dims, got {value!r}")
    return tuple([check_dim(v, f"shape {list(value)!r}") for v in value])


def fmt_shape(shape: Shape) -> str:
    """``[B, 64]`` — the way errors and the CLI show a shape."""
    return "[" + ", ".join(map(str, shape)) + "]"
