"""The execution plan a Triton artifact ships (``triton/plan.json``): the steps in
order, each fused group's tile programs, kernel names, tuned launch configs and
the per-group choice of Triton or torch. Loading reads it; nothing is re-derived
or re-tuned in the trainer."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from esper.triton.tiles import TileProgram

PLAN_VERSION = 2  # 2: in-kernel bias/gain sums (ws, lock), accumulating grads


@dataclass
class TorchStep:
    """One IR node run with torch ops. ``bias``: for a ``linear``, whether the
    matmul adds its bias itself (False: a fused group adds it); None otherwise."""

    node: str
    out: str
    inputs: list[str]
    bias: bool | None = None


@dataclass
class GroupInput:
    value: str  # activation name, or "<node>.<param>" for a parameter
    kind: str
    param: list[str] | None = None  # [node id, param name]


@dataclass
class GroupOutput:
    value: str
    kind: str  # "full" or "row"
    shape: list[Any]  # the IR shape (symbols bound at run time)


@dataclass
class Unit:
    """A group member, kept so a group can also run as plain torch ops."""

    node: str
    op: str  # IR op value, or "bias" (a linear's bias add)
    inputs: list[str]
    out: str


@dataclass
class KernelConfig:
    block_r: int
    num_warps: int
    num_stages: int = 1
    grid_cap: int = 0  # row-looping kernels: max programs (0: one per row block)


@dataclass
class FusedStep:
    name: str
    c: int
    frame: list[Any]
    inputs: list[GroupInput]
    outputs: list[GroupOutput]
    fwd: TileProgram
    units: list[Unit]
    bwd: TileProgram | None = None
    # forward inputs whose grad the backward kernel adds to the grad already
    # accumulated for that value (another consumer's), in the same pass
    bwd_acc: list[int] = field(default_factory=list)
    impl: str = "triton"  # or "torch" when measurement says torch is faster
    fwd_cfg: KernelConfig | None = None
    bwd_cfg: KernelConfig | None = None
    measured: dict[str, float] = field(default_factory=dict)

    @property
    def fwd_kernel(self) -> str:
        return f"{self.name}_fwd"

    @property
    def bwd_kernel(self) -> str:
        return f"{self.name}_bwd"


@dataclass
class Plan:
    inputs: list[str]
    outputs: list[str]
    steps: list[TorchStep | FusedStep]
    dtype: str = "float32"
    meta: dict[str, Any] = field(default_factory=dict)
    # "reference": the blueprint's plain torch ops were measured (tuning) or
    # predicted (``esper.triton.serve``) faster than any plan of fused kernels (a
    # host-bound block around cuDNN/cuBLAS calls); the module then runs them and
    # the artifact ships no binaries
    serve: str = "schedule"

    def groups(self) -> list[FusedStep]:
        return [s for s in self.steps if isinstance(s, FusedStep)]

    def to_json(self) -> bytes:
        steps = []
        for s in self.steps:
            if isinstance(s, TorchStep):
                steps.append({"type": "torch", **asdict(s)})
                continue
            d = {k: v for k, v in asdict(s).items() if k not in ("fwd", "bwd")}
            d["fwd"] = s.fwd.to_json()
            d["bwd"] = s.bwd.to_json() if s.bwd is not None else None
            steps.append({"type": "fused", **d})
        body = {"version": PLAN_VERSION, "inputs": self.inputs, "outputs": self.outputs,
                "dtype": self.dtype, "meta": self.meta, "serve": self.serve, "steps": steps}
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Plan:
        body = json.loads(data)
        if body.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {body.get('version')!r} != {PLAN_VERSION}")
        steps: list[TorchStep | FusedStep] = []
        for d in body["steps"]:
            kind = d.pop("type")
            if kind == "torch":
                steps.append(TorchStep(**d))
                continue
            d["inputs"] = [GroupInput(**x) for x in d["inputs"]]
            d["outputs"] = [GroupOutput(**x) for x in d["outputs"]]
            d["units"] = [Unit(**x) for x in d["units"]]
            d["fwd"] = TileProgram.from_json(d["fwd"])
            d["bwd"] = TileProgram.from_json(d["bwd"]) if d["bwd"] is not None else None
            for k in ("fwd_cfg", "bwd_cfg"):
                d[k] = KernelConfig(**d[k]) if d[k] is not None else None
            steps.append(FusedStep(**d))
        return cls(inputs=body["inputs"], outputs=body["outputs"], steps=steps,
                   dtype=body["dtype"], meta=body["meta"], serve=body.get("serve", "schedule"))
