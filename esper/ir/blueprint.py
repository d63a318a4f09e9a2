"""BlueprintIR: a whole blueprint — inputs, nodes, outputs — validated as a graph
when built, with its schemas, canonical form and hash computed once."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import Field

from esper.ir import jsonio
from esper.ir.base import ir_error
from esper.ir.canonical import canonical_json, digest
from esper.ir.frozen import thaw
from esper.ir.graph import Analysis, analyse
from esper.ir.model import IRInput, IRNode, TensorSchema, _Revalidating, schemas
from esper.ir.ops import OPS
from esper.ir.types import Shape


@contextmanager
def _gc_deferred() -> Iterator[None]:
    """Parsing and validation allocate many small acyclic objects; pausing the cyclic
    GC meanwhile saves ~40% on large blueprints. It resumes right after."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


class BlueprintIR(_Revalidating):
    """A blueprint in the JSON format of ARCHITECTURE.md (schema_version 1)."""

    schema_version: Literal[1]
    name: str
    inputs: tuple[IRInput, ...]
    nodes: tuple[IRNode, ...]
    outputs: tuple[str, ...]
    metadata: dict[str, Any] = Field(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        try:
            jsonio.dumps(self.metadata)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ir_error(f"metadata must be plain JSON: {exc}") from None
        self.__dict__["_an"] = analyse(self)

    @property
    def _an(self) -> Analysis:
        return self.__dict__["_an"]  # type: ignore[no-any-return]

    def _cached(self, key: str) -> Any:
        return self.__dict__.get(key)

    # -- (de)serialisation ---------------------------------------------------------

    @classmethod
    def from_json(cls, text: str | bytes) -> BlueprintIR:
        """Parse and validate; any problem raises IRValidationError."""
        with _gc_deferred():
            return cls.from_dict(jsonio.loads(text))

    @classmethod
    def model_validate_json(cls, json_data: Any, *args: Any, **kwargs: Any) -> BlueprintIR:
        return cls.from_json(json_data)

    @classmethod
    def from_dict(cls, data: Any) -> BlueprintIR:
        if not isinstance(data, Mapping):
            raise ir_error(f"a blueprint must be a JSON object, got {type(data).__name__}")
        with _gc_deferred():
            return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; ``from_dict(to_dict())`` gives an equal blueprint."""
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "inputs": [
                {"name": i.name, "shape": list(i.shape), "dtype": i.dtype.value}
                for i in self.inputs
            ],
            "nodes": [n.to_dict() for n in self.nodes],
            "outputs": list(self.outputs),
            "metadata": thaw(self.metadata),
        }

    def to_json(self, indent: int | None = None) -> str:
        """Deterministic JSON (attrs and metadata keys sorted); round-trips exactly."""
        return jsonio.dumps(self.to_dict(), indent)

    def canonical_json(self) -> str:
        """The canonical form: canonical ids and symbols, resolved attrs, no
        name/metadata. It is a valid blueprint with the same canonical hash."""
        text = self._cached("_canonical")
        if text is None:
            text = self.__dict__["_canonical"] = canonical_json(self, self._an)
        return text  # type: ignore[no-any-return]

    def canonical_hash(self) -> str:
        """sha256 hex of ``canonical_json()`` (computed once per model)."""
        h = self._cached("_hash")
        if h is None:
            h = self.__dict__["_hash"] = digest(self.canonical_json())
        return h  # type: ignore[no-any-return]

    def __hash__(self) -> int:
        return hash(self.canonical_hash())

    # -- graph queries --------------------------------------------------------------

    def topological_order(self) -> list[IRNode]:
        """Kahn's order; among ready nodes the one earliest in the file goes first."""
        nodes = self.nodes
        return [nodes[j] for j in self._an.order]

    def node(self, node_id: str) -> IRNode:
        """The node with this id (KeyError if none; graph inputs are not nodes)."""
        i = self._an.index.get(node_id)
        n_in = len(self.inputs)
        if i is None or i < n_in:
            raise KeyError(f"no node {node_id!r} in blueprint {self.name!r}")
        return self.nodes[i - n_in]

    def _schemas(self) -> tuple[TensorSchema, ...]:
        cached = self._cached("_schemas_t")
        if cached is None:
            an = self._an
            cached = schemas(zip(an.shapes, an.dtypes, strict=True))
            self.__dict__["_schemas_t"] = cached  # not "_schemas": that would shadow the method
        return cached  # type: ignore[no-any-return]

    def infer_shapes(self) -> dict[str, TensorSchema]:
        """TensorSchema of every input (by name) and node (by id), in file order."""
        return dict(zip(self._an.index, self._schemas(), strict=True))

    def schema_of(self, name: str) -> TensorSchema:
        """The schema of one input or node."""
        i = self._an.index.get(name)
        if i is None:
            raise KeyError(f"no tensor {name!r} in blueprint {self.name!r}")
        return self._schemas()[i]

    def input_schemas(self) -> tuple[TensorSchema, ...]:
        return self._schemas()[: len(self.inputs)]

    def output_schemas(self) -> tuple[TensorSchema, ...]:
        all_ = self._schemas()
        return tuple(all_[i] for i in self._an.outputs)

    def param_shapes(self) -> dict[str, dict[str, Shape]]:
        """node id -> {"weight": shape, "bias": shape} for nodes that own parameters."""
        an = self._an
        out: dict[str, dict[str, Shape]] = {}
        for j, node in enumerate(self.nodes):
            rule = OPS[node.op].params
            if rule is None:
                continue
            params = rule([an.shapes[t] for t in an.args[j]], node.resolved_attrs)
            if params:
                out[node.id] = params
        return out
