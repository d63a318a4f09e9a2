"""The bundled example blueprints: all valid, symbolic in the batch dim, and
function-preserving when grafted (their last projection starts at zero)."""

from __future__ import annotations

import json

import pytest

from esper.ir import PARAMETERISED, BlueprintIR, IRNodeType, bundled, bundled_names, bundled_path

EXPECTED = {"residual_mlp", "bottleneck_adapter", "conv_block", "attention_softmax",
            "norm_gated_linear"}


def test_bundled_set_and_paths() -> None:
    assert set(bundled_names()) >= EXPECTED
    everything = bundled()
    assert set(everything) == set(bundled_names())
    for name, b in everything.items():
        assert b.name == name
        assert BlueprintIR.from_json(bundled_path(name).read_text()) == b
        assert b.metadata["description"] and b.metadata["tags"]
    with pytest.raises(KeyError, match="no bundled blueprint 'nope'"):
        bundled_path("nope")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_blueprint_is_a_zero_initialised_residual(name: str) -> None:
    b = bundled()[name]
    (x,) = b.inputs
    assert x.shape[0] == "B"
    assert b.output_schemas() == (x.schema,)  # drop-in: same schema in and out
    out = b.node(b.outputs[0])
    assert out.op is IRNodeType.ADD and x.name in out.inputs
    (branch,) = [i for i in out.inputs if i != x.name]
    proj = b.node(branch)
    assert proj.op in PARAMETERISED and proj.resolved_attrs["init"] == "zeros"
    # "zeros" zeroes weight and bias, so the branch is exactly 0 and out == x when grafted
    assert proj.spec.params is not None


def test_bundled_files_are_tidy_json() -> None:
    for name in bundled_names():
        data = json.loads(bundled_path(name).read_text())
        assert data["schema_version"] == 1 and data["name"] == name


def test_bundled_hashes_are_distinct() -> None:
    hashes = [b.canonical_hash() for b in bundled().values()]
    assert len(set(hashes)) == len(hashes)
