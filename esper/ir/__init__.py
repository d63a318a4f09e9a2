"""BlueprintIR — the language blueprints are written in: frozen pydantic models,
an op table (``esper.ir.ops``), graph validation, shape inference and a canonical
hash. Importing it never imports torch."""

from __future__ import annotations

from esper.errors import IRValidationError
from esper.ir.blueprint import BlueprintIR
from esper.ir.bundled import bundled, bundled_names, bundled_path
from esper.ir.frozen import FrozenDict
from esper.ir.model import IRInput, IRNode, TensorSchema
from esper.ir.ops import OPS, PARAMETERISED, OpSpec
from esper.ir.types import (
    FLOAT_DTYPES,
    NUMERIC_DTYPES,
    Dim,
    DType,
    IRNodeType,
    Shape,
    fmt_shape,
)

__all__ = [
    "FLOAT_DTYPES",
    "NUMERIC_DTYPES",
    "OPS",
    "PARAMETERISED",
    "BlueprintIR",
    "DType",
    "Dim",
    "FrozenDict",
    "IRInput",
    "IRNode",
    "IRNodeType",
    "IRValidationError",
    "OpSpec",
    "Shape",
    "TensorSchema",
    "bundled",
    "bundled_names",
    "bundled_path",
    "fmt_shape",
]
