"""Finding a submitted blueprint's parameters in an artifact whose IR is canonical."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from esper.compile.backend import CompileOptions
from esper.compile.evaluate import evaluate
from esper.compile.ids import artifact_param_map, match_nodes, params_for
from esper.compile.passes import optimize
from esper.compile.reference import TorchBackend, build_module
from esper.errors import CompileError
from esper.ir import BlueprintIR, bundled


def artifact_module(ir: BlueprintIR, seed: int = 0) -> torch.nn.Module:
    files = TorchBackend().compile(ir, "cpu", CompileOptions()).files
    stored = BlueprintIR.from_json(files["ir.json"])
    return build_module(stored, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed)).eval()


def renamed(ir: BlueprintIR, seed: int) -> BlueprintIR:
    """The same graph with fresh ids, nodes shuffled in the file."""
    rng = random.Random(seed)
    data = ir.to_dict()
    ids = {n["id"]: f"r{rng.randrange(10**6)}_{k}" for k, n in enumerate(data["nodes"])}
    for n in data["nodes"]:
        n["id"] = ids[n["id"]]
        n["inputs"] = [ids.get(i, i) for i in n["inputs"]]
    rng.shuffle(data["nodes"])
    data["outputs"] = [ids.get(o, o) for o in data["outputs"]]
    return BlueprintIR.from_dict(data)


def _check(ir: BlueprintIR, module: Any, batch: int = 3) -> None:
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn([batch if isinstance(d, str) else d for d in i.shape], generator=g,
                      dtype=torch.float64) for i in ir.inputs]
    with torch.no_grad():
        for p in module.parameters():  # break the zero inits: every weight must matter
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    got = module(*xs)
    got = got if isinstance(got, tuple) else (got,)
    want = evaluate(ir, xs, params_for(ir, module))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


SYMMETRIC: dict[str, Any] = {
    "schema_version": 1, "name": "sym",
    "inputs": [{"name": "x", "shape": ["B", 4], "dtype": "float32"}],
    "nodes": [
        {"id": "f1", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 4}},
        {"id": "f2", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 4}},
        {"id": "g", "op": "relu", "inputs": ["f2"]},
        {"id": "d", "op": "sub", "inputs": ["f1", "g"]},
        {"id": "f3", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 4}},
        {"id": "f4", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 4}},
        {"id": "s", "op": "add", "inputs": ["f3", "f4"]},
        {"id": "o", "op": "mul", "inputs": ["d", "s"]},
    ],
    "outputs": ["o", "f1"],
}


def test_symmetric_branches_map_to_an_equivalent_assignment() -> None:
    ir = BlueprintIR.from_dict(SYMMETRIC)
    module = artifact_module(ir)
    assert set(artifact_param_map(ir, module.ir)) == set(dict(build_module(ir).params))
    _check(ir, module)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_renamed_and_reordered_submission_maps_onto_the_first_artifact(seed: int) -> None:
    ir = BlueprintIR.from_dict(SYMMETRIC)
    module = artifact_module(ir)
    other = renamed(ir, seed)
    assert other.canonical_hash() == ir.canonical_hash()
    _check(other, module)


@pytest.mark.parametrize("name", sorted(bundled()))
def test_bundled_blueprints_map_onto_their_artifacts(name: str) -> None:
    ir = bundled()[name]
    _check(ir, artifact_module(ir))
    _check(renamed(ir, 7), artifact_module(ir))


def test_different_graphs_do_not_match() -> None:
    ir = BlueprintIR.from_dict(SYMMETRIC)
    data = ir.to_dict()
    data["nodes"][3]["inputs"] = ["g", "f1"]  # sub operands swapped
    other = BlueprintIR.from_dict(data)
    with pytest.raises(CompileError, match="not the same graph"):
        match_nodes(optimize(other), optimize(ir))
