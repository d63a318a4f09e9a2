"""The one place that creates and initialises a blueprint's parameters, and the
module that holds them. Every backend builds on ``BlueprintModule`` so checkpoints
move between backends unchanged.

Parameter key scheme (the ``nn.ParameterDict`` keys, hence ``state_dict`` keys
``params.<key>``): ``f"{safe_id}__{name}"`` where ``name`` is ``weight`` or
``bias`` and ``safe_id`` is the node id itself when it matches ``[A-Za-z0-9_]+``;
any other id has each other character replaced by ``_`` and ``_`` plus the first
8 hex digits of the id's sha256 appended (``"fc.1"`` -> ``"fc_1_<hash8>"``), so
distinct ids never share a key. ``module.param_keys`` maps
``(node_id, name) -> key``."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, MutableMapping, Sequence
from typing import cast

import torch
from torch import nn

from esper.errors import CompileError
from esper.ir import BlueprintIR, IRNode, IRNodeType

_SAFE_ID = re.compile(r"[A-Za-z0-9_]+")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_]")

def param_key(node_id: str, name: str) -> str:
    """The ``ParameterDict`` key of parameter ``name`` of node ``node_id``."""
    if _SAFE_ID.fullmatch(node_id):
        safe = node_id
    else:
        digest = hashlib.sha256(node_id.encode()).hexdigest()[:8]
        safe = f"{_UNSAFE_CHAR.sub('_', node_id)}_{digest}"
    return f"{safe}__{name}"


def param_keys(ir: BlueprintIR) -> dict[tuple[str, str], str]:
    """``(node_id, name) -> key`` for every parameter of ``ir``, in topological order."""
    shapes = ir.param_shapes()
    keys: dict[tuple[str, str], str] = {}
    seen: dict[str, tuple[str, str]] = {}
    for node in ir.topological_order():
        for name in shapes.get(node.id, {}):
            key = param_key(node.id, name)
            if key in seen:  # only if an id mimics another's sanitised form
                raise CompileError(
                    f"node {node.id!r} ({node.op.value}): parameter key {key!r} collides "
                    f"with node {seen[key][0]!r}; rename one of them"
                )
            seen[key] = (node.id, name)
            keys[(node.id, name)] = key
    return keys


def concrete(shape: Sequence[int | str]) -> tuple[int, ...]:
    """A parameter shape, which the IR guarantees has no symbols."""
    if not all(isinstance(d, int) for d in shape):
        raise CompileError(f"parameter shape {list(shape)} has a symbolic dim")
    return tuple(int(d) for d in shape)


# --- initialisation rules: (op, init) -> fill the node's tensors in place ------------

InitRule = Callable[[dict[str, torch.Tensor], "torch.Generator | None"], None]


def _torch_default_affine(t: dict[str, torch.Tensor], g: torch.Generator | None) -> None:
    # Exactly nn.Linear / nn.Conv2d reset_parameters(): same calls in the same order.
    w = t["weight"]
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
    if "bias" in t:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(w)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(t["bias"], -bound, bound, generator=g)


def _torch_default_norm(t: dict[str, torch.Tensor], g: torch.Generator | None) -> None:
    # nn.LayerNorm / nn.RMSNorm: gain ones, shift zeros.
    if "weight" in t:
        nn.init.ones_(t["weight"])
    if "bias" in t:
        nn.init.zeros_(t["bias"])


def _zeros(t: dict[str, torch.Tensor], g: torch.Generator | None) -> None:
    for tensor in t.values():
        nn.init.zeros_(tensor)


def _normal(t: dict[str, torch.Tensor], g: torch.Generator | None) -> None:
    nn.init.normal_(t["weight"], 0.0, 0.02, generator=g)
    if "bias" in t:
        nn.init.zeros_(t["bias"])


INIT_RULES: dict[tuple[IRNodeType, str], InitRule] = {}
for _op in (IRNodeType.LINEAR, IRNodeType.CONV2D):
    INIT_RULES[(_op, "default")] = _torch_default_affine
    INIT_RULES[(_op, "zeros")] = _zeros
    INIT_RULES[(_op, "normal")] = _normal
for _op in (IRNodeType.LAYER_NORM, IRNodeType.RMS_NORM):
    INIT_RULES[(_op, "default")] = _torch_default_norm
    INIT_RULES[(_op, "zeros")] = _zeros
    # A norm's gain drawn at N(0, 0.02) would silence the block; "normal" is
    # meant for projections, so norms keep their torch init (ones / zeros).
    INIT_RULES[(_op, "normal")] = _torch_default_norm


def _init_node(node: IRNode, tensors: dict[str, torch.Tensor], g: torch.Generator | None) -> None:
    init = node.resolved_attrs.get("init", "default")
    rule = INIT_RULES.get((node.op, init))
    if rule is None:
        raise CompileError(f"node {node.id!r} ({node.op.value}): unknown init {init!r}")
    rule(tensors, g)


def init_parameters(
    ir: BlueprintIR,
    module_or_dict: BlueprintModule | MutableMapping[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Initialise every parameter of ``ir`` per its node's ``attrs.init``, in
    topological order (so a seeded generator gives the same values on every
    backend). A ``BlueprintModule``'s parameters are filled in place; in a plain
    mapping, missing keys are created with ``dtype``/``device``. Returns key -> tensor."""
    target: MutableMapping[str, torch.Tensor] = (
        cast("MutableMapping[str, torch.Tensor]", module_or_dict.params)
        if isinstance(module_or_dict, BlueprintModule) else module_or_dict
    )
    shapes = ir.param_shapes()
    keys = param_keys(ir)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for node in ir.topological_order():
            named = shapes.get(node.id)
            if not named:
                continue
            tensors: dict[str, torch.Tensor] = {}
            for name, written in named.items():
                shape = concrete(written)
                key = keys[(node.id, name)]
                tensor = target.get(key)
                if tensor is None:
                    tensor = torch.empty(shape, dtype=dtype, device=device)
                    target[key] = tensor
                    tensor = target[key]
                elif tuple(tensor.shape) != shape:
                    raise CompileError(
                        f"node {node.id!r} ({node.op.value}): parameter {name!r} has shape "
                        f"{tuple(tensor.shape)}, the IR needs {shape}"
                    )
                tensors[name] = tensor
                out[key] = tensor
            _init_node(node, tensors, generator)
    return out


class BlueprintModule(nn.Module):
    """A blueprint's parameters plus a way to run it. Subclasses (one per backend)
    implement ``run``; ``forward(*inputs)`` returns a tensor for a one-output
    blueprint, else a tuple in the IR's output order."""

    def __init__(
        self,
        ir: BlueprintIR,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self._ir = ir
        self.param_keys = param_keys(ir)
        self.params = nn.ParameterDict()
        shapes = ir.param_shapes()
        for (node_id, name), key in self.param_keys.items():
            shape = concrete(shapes[node_id][name])
            self.params[key] = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        init_parameters(ir, self, dtype=dtype, device=device, generator=generator)
        self.compute_dtype = dtype

    @property
    def ir(self) -> BlueprintIR:
        return self._ir

    def param(self, node_id: str, name: str) -> nn.Parameter:
        """Parameter ``name`` (``weight``/``bias``) of node ``node_id``."""
        key = self.param_keys.get((node_id, name))
        if key is None:
            raise KeyError(f"node {node_id!r} has no parameter {name!r}")
        return self.params[key]

    def node_params(self, node_id: str) -> dict[str, nn.Parameter]:
        """Every parameter of one node, by name (empty for unparameterised nodes)."""
        return {n: self.params[k] for (nid, n), k in self.param_keys.items() if nid == node_id}

    def run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Compute every output, in the IR's output order."""
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self.run(inputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def extra_repr(self) -> str:
        return f"name={self._ir.name!r}, dtype={self.compute_dtype}, params={len(self.params)}"
