"""The backend interface, its registry, the torch backend's compile/load, and the
compile pipeline through a real signed artifact."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from esper.artifacts import ArtifactError, ArtifactSignatureError, unpack_verified
from esper.artifacts.signing import generate_keypair
from esper.compile.backend import (
    Backend,
    CompiledFiles,
    CompileOptions,
    available_backends,
    get_backend,
    register_backend,
)
from esper.compile.evaluate import evaluate
from esper.compile.ids import params_for
from esper.compile.passes import optimize
from esper.compile.pipeline import compile_blueprint, compute_cache_key, load_artifact
from esper.compile.reference import TorchBackend, build_module
from esper.errors import CompileError, UnknownBackendError
from esper.ir import BlueprintIR

BLUEPRINT: dict[str, Any] = {
    "schema_version": 1,
    "name": "residual_mlp",
    "inputs": [{"name": "x", "shape": ["B", 16], "dtype": "float32"}],
    "nodes": [
        {"id": "h", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 32}},
        {"id": "a", "op": "gelu", "inputs": ["h"]},
        {"id": "i", "op": "identity", "inputs": ["a"]},
        {"id": "y", "op": "linear", "inputs": ["i"], "attrs": {"out_features": 16}},
        {"id": "out", "op": "add", "inputs": ["x", "y"]},
    ],
    "outputs": ["out"],
}


@pytest.fixture(scope="module")
def ir() -> BlueprintIR:
    return BlueprintIR.from_dict(BLUEPRINT)


@pytest.fixture(scope="module")
def keys() -> tuple[Any, Any]:
    return generate_keypair()


def test_options_are_frozen_strict_and_dump_for_the_key() -> None:
    opts = CompileOptions(dtype="bfloat16", extra={"block": 64})
    assert opts.model_dump() == {"dtype": "bfloat16", "autotune": True, "extra": {"block": 64}}
    with pytest.raises(ValidationError):
        CompileOptions(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        opts.dtype = "float32"  # type: ignore[misc]


def test_registry_finds_torch_and_names_the_unknown() -> None:
    torch_backend = get_backend("torch")
    assert isinstance(torch_backend, TorchBackend) and isinstance(torch_backend, Backend)
    assert get_backend("torch") is torch_backend
    assert "torch" in available_backends()
    with pytest.raises(UnknownBackendError, match=r"'nope'.*torch"):
        get_backend("nope")


class _Echo:
    """A minimal third backend: proves the interface is all a backend needs."""

    name = "echo-test"

    def supports(self, target: str) -> bool:
        return target == "cpu"

    def compile(self, ir: BlueprintIR, target: str, options: CompileOptions) -> CompiledFiles:
        return CompiledFiles(files={"ir.json": ir.to_json().encode()},
                             options=options.model_dump())

    def load(self, manifest: Any, files: Mapping[str, bytes]) -> Any:
        ir = BlueprintIR.from_json(files["ir.json"].decode())
        return lambda device: build_module(ir, device=device, dtype=manifest.dtype)


def test_register_a_backend_and_refuse_a_clashing_name(ir: BlueprintIR, keys: Any) -> None:
    echo = register_backend(_Echo())
    assert get_backend("echo-test") is echo
    assert register_backend(echo) is echo  # same object again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_backend(_Echo())
    result = compile_blueprint(ir, target="cpu", backend="echo-test", private_key=keys[0])
    assert result.manifest.backend == "echo-test"
    module = load_artifact(result.packed, keys[1])("cpu")
    assert module(torch.randn(2, 16)).shape == (2, 16)


def test_torch_backend_supports_cpu_and_cuda_targets() -> None:
    backend = TorchBackend()
    assert backend.supports("cpu") and backend.supports("cuda:sm_90")
    assert backend.supports("cuda:sm_80")
    assert not backend.supports("cuda") and not backend.supports("rocm:gfx90a")
    with pytest.raises(CompileError, match="target"):
        backend.compile(BlueprintIR.from_dict(BLUEPRINT), "tpu", CompileOptions())


def test_torch_compile_holds_only_the_optimised_ir(ir: BlueprintIR) -> None:
    compiled = TorchBackend().compile(ir, "cpu", CompileOptions())
    assert set(compiled.files) == {"ir.json"}
    stored = BlueprintIR.from_json(compiled.files["ir.json"])
    # Canonical bytes: equivalent blueprints give byte-identical artifacts.
    assert compiled.files["ir.json"] == optimize(ir).canonical_json().encode()
    assert stored.canonical_hash() == optimize(ir).canonical_hash()
    assert len(stored.nodes) == len(ir.nodes) - 1  # the identity was folded
    assert compiled.options == CompileOptions().model_dump()
    assert set(compiled.timings) >= {"optimize_s"}


def test_pipeline_round_trip_computes_the_blueprint(ir: BlueprintIR, keys: Any) -> None:
    private, public = keys
    result = compile_blueprint(ir, target="cpu", dtype="float32", private_key=private)
    assert result.cache_key == compute_cache_key(ir, target="cpu", dtype="float32")
    assert result.manifest.blueprint_hash == ir.canonical_hash()
    assert result.manifest.cache_key == result.cache_key
    assert result.timings["total_s"] > 0
    assert unpack_verified(result.packed, public).manifest == result.manifest

    module = load_artifact(result.packed, public)("cpu").eval()
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    x = torch.randn(4, 16)
    # The artifact's IR is canonical (ids n0, n1, ...): map the submitted ids onto it.
    want = evaluate(ir, [x], params_for(ir, module))[0]
    torch.testing.assert_close(module(x).double(), want, rtol=1e-5, atol=1e-5)


def test_pipeline_half_precision_artifact_builds_half_modules(ir: BlueprintIR,
                                                              keys: Any) -> None:
    result = compile_blueprint(ir, target="cuda:sm_90", dtype="bfloat16", private_key=keys[0])
    module = load_artifact(result.packed, keys[1])("cpu")
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert result.cache_key != compute_cache_key(ir, target="cuda:sm_90", dtype="float16")
    with pytest.raises(CompileError, match="contradicts"):
        compile_blueprint(ir, target="cpu", dtype="float16",
                          options=CompileOptions(dtype="float32"), private_key=keys[0])


def test_renamed_equivalent_blueprint_has_the_same_key(ir: BlueprintIR) -> None:
    renamed = BlueprintIR.from_json(
        ir.to_json().replace('"h"', '"hidden"').replace('"residual_mlp"', '"other"'))
    assert compute_cache_key(renamed, target="cpu") == compute_cache_key(ir, target="cpu")
    changed = dict(BLUEPRINT, nodes=[*BLUEPRINT["nodes"][:-1],
                                     {"id": "out", "op": "sub", "inputs": ["x", "y"]}])
    assert compute_cache_key(BlueprintIR.from_dict(changed), target="cpu") != \
        compute_cache_key(ir, target="cpu")


def test_tampered_or_foreign_artifacts_are_refused_before_loading(ir: BlueprintIR,
                                                                  keys: Any) -> None:
    private, public = keys
    packed = compile_blueprint(ir, target="cpu", private_key=private).packed
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(ArtifactError):
        load_artifact(bytes(flipped), public)
    other_private, _ = generate_keypair()
    foreign = compile_blueprint(ir, target="cpu", private_key=other_private).packed
    with pytest.raises(ArtifactSignatureError):
        load_artifact(foreign, public)
