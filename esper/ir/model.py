"""The small IR models: TensorSchema, IRInput and IRNode (a node checks its own
arity and attrs when built; graph-level checks live in ``graph``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Self

from pydantic import Field, PlainValidator

from esper.ir.attrs import resolve
from esper.ir.base import IRModel, node_error
from esper.ir.canonical import attrs_json
from esper.ir.frozen import EMPTY, FrozenDict, freeze
from esper.ir.ops import OPS, OpSpec
from esper.ir.types import Dim, DType, IRNodeType, RuleError, Shape, check_shape, fmt_shape


def _shape(value: Any) -> Shape:
    try:
        return check_shape(value)
    except RuleError as exc:
        raise ValueError(str(exc)) from None


def _attrs(value: Any) -> FrozenDict:
    if isinstance(value, FrozenDict):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"attrs must be a JSON object, got {type(value).__name__}")
    try:
        frozen = freeze(value)
    except RuleError as exc:
        raise ValueError(str(exc)) from None
    return frozen  # type: ignore[no-any-return]


ShapeField = Annotated[Shape, PlainValidator(_shape, json_schema_input_type=list[Dim])]
AttrsField = Annotated[
    Mapping[str, Any], PlainValidator(_attrs, json_schema_input_type=dict[str, Any])
]
Name = Annotated[str, Field(min_length=1)]


class _Revalidating(IRModel):
    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """Frozen models are shared, not copied; ``update`` builds a new, validated model."""
        if not update:
            return self
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self)(**{**fields, **update})


class TensorSchema(_Revalidating):
    """The shape (ints and symbols) and dtype of one tensor."""

    shape: ShapeField
    dtype: DType

    def __str__(self) -> str:
        return f"{self.dtype.value}{fmt_shape(self.shape)}"

    @property
    def rank(self) -> int:
        return len(self.shape)


def schema(shape: Shape, dtype: DType) -> TensorSchema:
    """A TensorSchema from values the IR has already validated (no re-validation)."""
    return TensorSchema.model_construct(shape=shape, dtype=dtype)


def schemas(pairs: Iterable[tuple[Shape, DType]]) -> tuple[TensorSchema, ...]:
    """Schemas for validated (shape, dtype) pairs; equal pairs share one frozen object."""
    memo: dict[tuple[Shape, DType], TensorSchema] = {}
    out = []
    for pair in pairs:
        s = memo.get(pair)
        if s is None:
            s = memo[pair] = schema(*pair)
        out.append(s)
    return tuple(out)


class IRInput(_Revalidating):
    """A named graph input. Its name acts like a node id: only its position matters."""

    name: Name
    shape: ShapeField
    dtype: DType

    @property
    def schema(self) -> TensorSchema:  # type: ignore[override]  # BaseModel.schema is deprecated
        return schema(self.shape, self.dtype)


class IRNode(_Revalidating):
    """One op applied to named tensors; it produces one tensor named by ``id``."""

    id: Name
    op: IRNodeType
    inputs: tuple[Name, ...]
    attrs: AttrsField = EMPTY

    def model_post_init(self, context: Any, /) -> None:
        spec = OPS[self.op]
        n = len(self.inputs)
        lo, hi = spec.arity
        if n < lo or (hi is not None and n > hi):
            raise node_error(self.id, self.op, f"takes {spec.arity_text} input(s), got {n}")
        try:
            resolved = resolve(spec.attrs, self.attrs)
            if spec.check is not None:
                spec.check(resolved)
        except RuleError as exc:
            raise node_error(self.id, self.op, str(exc)) from None
        self.__dict__["_resolved"] = resolved
        if not spec.symbolic_attrs:
            # The canonical hash needs this per node; it is cheapest made once here.
            self.__dict__["_tail"] = '],"attrs":' + attrs_json(resolved) + "}"

    @property
    def spec(self) -> OpSpec:
        """This node's row of the op table."""
        return OPS[self.op]

    @property
    def resolved_attrs(self) -> FrozenDict:
        """Attrs with defaults filled and values normalised (immutable, computed once)."""
        return self.__dict__["_resolved"]  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        from esper.ir.frozen import thaw

        out: dict[str, Any] = {"id": self.id, "op": self.op.value, "inputs": list(self.inputs)}
        if self.attrs:
            out["attrs"] = thaw(self.attrs)
        return out
