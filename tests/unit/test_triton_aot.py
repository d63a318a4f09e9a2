"""Ahead-of-time compile on this CPU machine for an explicit GPU target
(cuda:sm_90): binaries and metadata land in the artifact, the kernel source and
the compile step import no torch, and loading picks shipped binaries only when
the Triton version and GPU arch match (else recompile in the background)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from esper.artifacts import Artifact
from esper.compile.backend import CompileOptions, get_backend
from esper.ir import BlueprintIR
from esper.triton import aot
from esper.triton.backend import TritonBackend, build_plan

BP = json.dumps({
    "schema_version": 1, "name": "mlp", "inputs": [{"name": "x", "shape": ["B", 64],
                                                     "dtype": "float32"}],
    "nodes": [
        {"id": "h", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 256}},
        {"id": "a", "op": "gelu", "inputs": ["h"]},
        {"id": "y", "op": "linear", "inputs": ["a"], "attrs": {"out_features": 64}},
        {"id": "n", "op": "layer_norm", "inputs": ["y"], "attrs": {"normalized_shape": [64]}},
        {"id": "out", "op": "add", "inputs": ["x", "n"]}],
    "outputs": ["out"]})


@pytest.mark.slow
def test_compiles_sm90_binaries_without_a_gpu() -> None:
    backend = get_backend("triton")
    cf = backend.compile(BlueprintIR.from_json(BP), "cuda:sm_90",
                         CompileOptions(dtype="bfloat16", autotune=False))
    build = json.loads(cf.files[aot.BUILD_FILE])
    import triton

    assert build["triton_version"] == triton.__version__ and build["target"] == "cuda:sm_90"
    cubins = [f for f in cf.files if f.endswith(".cubin")]
    assert len(cubins) == 4  # two groups, forward + backward each
    for f in cubins:
        assert cf.files[f][:4] == b"\x7fELF"
        meta = json.loads(cf.files[f.removesuffix(".cubin") + ".json"])
        assert meta["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
        assert meta["triton_version"] == triton.__version__
    assert cf.timings["binaries_s"] < 60  # goal <= 10 s: measured by the benchmark, not here
    art = Artifact.build(cache_key="0" * 64, blueprint_hash="1" * 64, target="cuda:sm_90",
                         dtype="bfloat16", backend="triton", versions={"triton": "x"},
                         options=cf.options, files=cf.files)
    assert set(art.files) == set(cf.files)


@pytest.mark.slow
def test_compile_step_and_kernel_source_import_no_torch(tmp_path: Path) -> None:
    plan, source = build_plan(BlueprintIR.from_json(BP), "float16")
    assert "import torch" not in source and "torch." not in source
    req = {"source": str(tmp_path / "k.py"), "module_name": "k_notorch",
           "target": ["cuda", 90, 32], "kernels": aot.kernel_requests(plan)[:1],
           "out_dir": str(tmp_path / "out")}
    (tmp_path / "k.py").write_text(source)
    (tmp_path / "req.json").write_text(json.dumps(req))
    script = Path(aot.__file__).with_name("aot_compile.py")
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['x', sys.argv[1]]; "
            f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "req.json")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(info["kernels"]) == [req["kernels"][0]["key"]]
    assert (tmp_path / "out" / f"{req['kernels'][0]['key']}.cubin").stat().st_size > 1000


def test_load_mode_follows_triton_version_and_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    build = {"triton_version": triton.__version__, "target": "cuda:sm_90"}
    monkeypatch.setattr(aot, "local_target", lambda: "cuda:sm_90")
    assert TritonBackend._mode(build) == "binaries"
    assert TritonBackend._mode({**build, "triton_version": "0.0.1"}) == "recompile"
    monkeypatch.setattr(aot, "local_target", lambda: "cuda:sm_80")
    assert TritonBackend._mode(build) == "recompile"
    monkeypatch.setattr(aot, "local_target", lambda: None)
    assert TritonBackend._mode(build) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TritonBackend._mode(build) == "interpret"


def test_targets_and_dtypes() -> None:
    backend = TritonBackend()
    assert backend.supports("cuda:sm_90") and backend.supports("cuda:sm_80")
    assert not backend.supports("cpu") and not backend.supports("cuda:sm_70")
    assert aot.parse_target("cuda:sm_90") == ("cuda", 90, 32)
