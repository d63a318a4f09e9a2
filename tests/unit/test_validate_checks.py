"""The validation checks on real artifacts (compile_blueprint → signed bytes →
load_artifact), in this process: clean kernels pass every check in every dtype,
each deliberately broken kernel fails the check made for it, integrity refuses
tampered or mismatched artifacts. The sandbox runner (subprocess, timeout,
crash) and the Triton-interpreter path have their own slower tests at the end."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.artifacts import signing
from esper.compile.backend import CompileOptions
from esper.compile.pipeline import CompileResult, compile_blueprint
from esper.ir import BlueprintIR, bundled
from esper.validate import report as r
from esper.validate.checks import NUMERIC_CHECKS, _judge, _Worst
from esper.validate.integrity import check_integrity
from esper.validate.policy import ValidationPolicy, check_module_name
from esper.validate.protocol import ExpectedKernel
from esper.validate.runner import SandboxRunner
from esper.validate.subject import fit_batches
from esper.validate.tolerances import ELEMENT_FACTOR, REL_TOLERANCE, compare, tolerance
from tests.fixtures import faulty_backend

REPO = Path(__file__).resolve().parents[2]
PRIVATE, PUBLIC = signing.generate_keypair()
CPU = torch.device("cpu")


def _x(shape: list[Any], name: str = "x") -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": "float32"}


def _bp(name: str, inputs: list[dict[str, Any]], nodes: list[dict[str, Any]],
        outputs: list[str]) -> dict[str, Any]:
    return {"schema_version": 1, "name": name, "inputs": inputs, "nodes": nodes,
            "outputs": outputs}


BLUEPRINTS: dict[str, dict[str, Any]] = {
    "residual_mlp": _bp("residual_mlp", [_x(["B", 32])], [
        {"id": "h", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 48}},
        {"id": "a", "op": "gelu", "inputs": ["h"]},
        {"id": "y", "op": "linear", "inputs": ["a"],
         "attrs": {"out_features": 32, "init": "zeros"}},
        {"id": "out", "op": "add", "inputs": ["x", "y"]}], ["out"]),
    "gated_rms": _bp("gated_rms", [_x(["B", "T", 16])], [
        {"id": "r", "op": "rms_norm", "inputs": ["x"], "attrs": {"normalized_shape": [16]}},
        {"id": "a", "op": "linear", "inputs": ["r"], "attrs": {"out_features": 24}},
        {"id": "b", "op": "linear", "inputs": ["r"], "attrs": {"out_features": 24}},
        {"id": "g", "op": "silu", "inputs": ["b"]},
        {"id": "m", "op": "mul", "inputs": ["a", "g"]},
        {"id": "y", "op": "linear", "inputs": ["m"],
         "attrs": {"out_features": 16, "init": "zeros"}},
        {"id": "out", "op": "add", "inputs": ["y", "x"]}], ["out"]),
    "conv_block": _bp("conv_block", [_x(["B", 4, 6, 6])], [
        {"id": "c", "op": "conv2d", "inputs": ["x"],
         "attrs": {"out_channels": 8, "kernel_size": 3, "padding": "same"}},
        {"id": "n", "op": "relu", "inputs": ["c"]},
        {"id": "p", "op": "conv2d", "inputs": ["n"],
         "attrs": {"out_channels": 4, "kernel_size": 1, "init": "zeros"}},
        {"id": "out", "op": "add", "inputs": ["x", "p"]}], ["out"]),
    "attention": _bp("attention", [_x(["B", "T", 8])], [
        {"id": "n", "op": "layer_norm", "inputs": ["x"], "attrs": {"normalized_shape": [8]}},
        {"id": "kt", "op": "permute", "inputs": ["n"], "attrs": {"dims": [0, 2, 1]}},
        {"id": "s", "op": "matmul", "inputs": ["n", "kt"]},
        {"id": "z", "op": "scale", "inputs": ["s"], "attrs": {"value": 0.35}},
        {"id": "w", "op": "softmax", "inputs": ["z"], "attrs": {"dim": -1}},
        {"id": "v", "op": "matmul", "inputs": ["w", "n"]},
        {"id": "o", "op": "linear", "inputs": ["v"], "attrs": {"out_features": 8, "init": "zeros"}},
        {"id": "out", "op": "add", "inputs": ["x", "o"]}], ["out"]),
    # Not residual: a delta kernel (its output is the seed's contribution itself).
    "delta_head": _bp("delta_head", [_x(["B", 12])], [
        {"id": "h", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 20}},
        {"id": "t", "op": "tanh", "inputs": ["h"]},
        {"id": "y", "op": "linear", "inputs": ["t"],
         "attrs": {"out_features": 6, "init": "zeros"}}],
        ["y"]),
}


def compiled(name: str, *, dtype: str = "float32", backend: str = "torch",
             target: str = "cpu", options: CompileOptions | None = None) -> CompileResult:
    ir = BlueprintIR.from_dict(BLUEPRINTS[name])
    return compile_blueprint(ir, target=target, dtype=dtype, backend=backend, options=options,
                             private_key=PRIVATE)


def expected_of(res: CompileResult, **changes: Any) -> ExpectedKernel:
    m = res.manifest
    fields = {"cache_key": m.cache_key, "blueprint_hash": m.blueprint_hash, "target": m.target,
              "dtype": m.dtype, "backend": m.backend, "digest": res.digest, **changes}
    return ExpectedKernel(**fields)


def run_checks(res: CompileResult, name: str, policy: ValidationPolicy | None = None,
               blueprint: dict[str, Any] | None = None,
               **expected: Any) -> dict[str, r.CheckRecord]:
    rec, subject = check_integrity(res.packed, PUBLIC, expected_of(res, **expected),
                                   blueprint or BLUEPRINTS[name], device=CPU,
                                   policy=policy or ValidationPolicy())
    out = {rec.check: rec}
    if subject is not None:
        out.update({check: fn(subject) for check, fn in NUMERIC_CHECKS})
    return out


def failed(records: dict[str, r.CheckRecord]) -> set[str]:
    return {name for name, rec in records.items() if rec.failed}


# -- tolerances and the error measure ---------------------------------------------------


def test_tolerances_are_the_issue_bounds() -> None:
    assert REL_TOLERANCE == {"float32": 1e-4, "tf32": 2e-3, "float16": 2e-3, "bfloat16": 2e-2}
    assert tolerance("float32", tf32=True) == 2e-3
    with pytest.raises(ValueError, match="no tolerance"):
        tolerance("int64")


def test_one_wrong_element_in_a_large_tensor_is_caught() -> None:
    ref = torch.randn(256, 256, dtype=torch.float64)
    got = ref.float().clone()
    assert compare(got, ref, torch.float32).error < 1e-6
    got[100, 7] += 0.01  # one element of 65536 off by 1% of the tensor's scale
    c = compare(got, ref, torch.float32)
    # The norm-wise error hides it (~4e-5 < the fp32 bound); the element error does not.
    assert c.error < tolerance("float32")
    assert c.element_error > ELEMENT_FACTOR * tolerance("float32")


def test_non_finite_results_count_only_where_the_reference_fits_the_dtype() -> None:
    ref = torch.tensor([1.0, 2.0, math.inf, 1e6], dtype=torch.float64)
    got = torch.tensor([1.0, math.nan, math.nan, math.inf], dtype=torch.float16)
    c = compare(got, ref, torch.float16)
    # inf in the reference, and 1e6 beyond fp16's range, are not compared.
    assert (c.nonfinite, c.compared, c.error, c.element_error) == (1, 2, math.inf, math.inf)
    assert not c.finite


# -- clean kernels ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(BLUEPRINTS))
def test_reference_kernels_pass_every_check(name: str, dtype: str) -> None:
    records = run_checks(compiled(name, dtype=dtype), name)
    assert not failed(records), {k: v.message for k, v in records.items() if v.failed}
    assert set(records) == {"integrity", "forward", "backward", "finiteness", "determinism",
                            "graft_safety"}
    fwd = records["forward"]
    assert fwd.figure is not None and fwd.figure <= tolerance(dtype) == fwd.bound
    assert fwd.details["batch_sizes"] == [1, 7, 16]
    assert records["determinism"].figure == 0
    mode = records["graft_safety"].details["mode"]
    assert mode == ("delta" if name == "delta_head" else "residual")


@pytest.mark.parametrize("name", sorted(bundled()))
def test_every_bundled_blueprint_validates_on_cpu(name: str) -> None:
    ir = bundled()[name]
    res = compile_blueprint(ir, target="cpu", private_key=PRIVATE)
    records = run_checks(res, name, blueprint=ir.to_dict())
    assert not failed(records), {k: v.message for k, v in records.items() if v.failed}
    assert records["graft_safety"].details["mode"] == "residual"


def test_bundled_set_is_not_empty() -> None:
    assert len(bundled()) >= 5


def test_large_inputs_keep_1_and_a_non_power_of_two_batch_on_cpu() -> None:
    policy = ValidationPolicy()
    conv = bundled()["conv_block"]  # [B, 64, 32, 32]: 65536 elements a sample
    assert fit_batches(conv, policy, interpreted=False, gpu=False) == (1, 3)
    assert fit_batches(conv, policy, interpreted=False, gpu=True) == (1, 7, 16)
    small = BlueprintIR.from_dict(BLUEPRINTS["residual_mlp"])
    assert fit_batches(small, policy, interpreted=False, gpu=False) == (1, 7, 16)
    assert fit_batches(small, policy, interpreted=True, gpu=False) == (1, 3, 4)


# -- broken kernels -----------------------------------------------------------------------

# Faults that break only their own property (the others also disturb the output at init).
PRECISE = {"wrong-grad", "nan-large", "nondeterministic", "nonzero-init"}
IN_PROCESS = [k for k, check in faulty_backend.KINDS.items() if check not in ("crash", "timeout")]


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_each_broken_kernel_fails_its_check(kind: str) -> None:
    res = compiled("residual_mlp", backend=f"faulty-{kind}")
    records = run_checks(res, "residual_mlp")
    want = faulty_backend.KINDS[kind]
    assert want in failed(records), {k: v.message for k, v in records.items()}
    if kind in PRECISE:
        assert failed(records) == {want}
    reason = records[want].reason()
    assert reason.check == want and reason.message


def test_an_unwritten_element_is_reported_as_non_finite() -> None:
    records = run_checks(compiled("residual_mlp", backend="faulty-unwritten"), "residual_mlp")
    fwd = records["forward"]
    assert "NaN/Inf where the reference is finite" in fwd.message
    assert fwd.figure is None and fwd.bound == 1e-4


def test_graft_safety_can_be_reported_without_rejecting() -> None:
    res = compiled("residual_mlp", backend="faulty-nonzero-init")
    records = run_checks(res, "residual_mlp", ValidationPolicy(graft="report"))
    graft = records["graft_safety"]
    assert not graft.failed and graft.details["enforced"] is False
    assert graft.message.startswith("not enforced")


def test_over_the_dtype_bound_passes_only_within_2x_of_eager_and_under_the_cap() -> None:
    res = compiled("residual_mlp", dtype="bfloat16")
    _, subject = check_integrity(res.packed, PUBLIC, expected_of(res), BLUEPRINTS["residual_mlp"],
                                 device=CPU, policy=ValidationPolicy())
    assert subject is not None and subject.tol == 2e-2

    def errors(error: float, element: float = 0.0) -> _Worst:
        w = _Worst()
        w.error, w.element, w.where, w.element_where = error, element, "out", "out"
        return w

    calls: list[float] = []

    def eager(error: float) -> Callable[[], _Worst]:
        def run() -> _Worst:
            calls.append(error)
            return errors(error)
        return run

    ok = _judge("backward", subject, errors(0.022), "gradient", eager(0.021))
    assert not ok.failed and ok.details["bound_from"] == "eager"
    assert ok.figure == 0.022 and ok.bound == pytest.approx(0.042)
    assert _judge("backward", subject, errors(0.022), "gradient", eager(0.005)).failed
    # Beyond EAGER_CAP x the bound nothing is asked of eager: rejected outright.
    calls.clear()
    assert _judge("backward", subject, errors(0.2), "gradient", eager(0.2)).failed
    assert calls == []
    # Within the dtype bound: eager is never run.
    assert not _judge("forward", subject, errors(0.01), "output", eager(1.0)).failed
    assert calls == []


# -- integrity ----------------------------------------------------------------------------


def _integrity(res: CompileResult, packed: bytes | None = None, name: str = "residual_mlp",
               **expected: Any) -> r.CheckRecord:
    rec, subject = check_integrity(packed if packed is not None else res.packed, PUBLIC,
                                   expected_of(res, **expected), BLUEPRINTS[name], device=CPU,
                                   policy=ValidationPolicy())
    assert (subject is None) == rec.failed
    return rec


def test_integrity_passes_a_genuine_artifact() -> None:
    rec = _integrity(compiled("residual_mlp"))
    assert rec.status == "passed" and rec.details["files"] == 1


def test_integrity_refuses_a_flipped_byte() -> None:
    res = compiled("residual_mlp")
    packed = bytearray(res.packed)
    packed[len(packed) // 3] ^= 0x01
    rec = _integrity(res, bytes(packed), digest=None)
    assert rec.failed and "artifact refused" in rec.message


def test_integrity_refuses_a_foreign_signature() -> None:
    other, _ = signing.generate_keypair()
    ir = BlueprintIR.from_dict(BLUEPRINTS["residual_mlp"])
    res = compile_blueprint(ir, target="cpu", private_key=other)
    rec = _integrity(res)
    assert rec.failed and rec.details["error"] == "ArtifactSignatureError"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("cache_key", "0" * 64, "manifest cache_key"),
    ("dtype", "float16", "manifest dtype"),
    ("backend", "triton", "manifest backend"),
    ("target", "cuda:sm_90", "manifest target"),
    ("digest", "f" * 64, "is not the kernel's"),
])
def test_integrity_refuses_an_artifact_that_is_not_the_kernel_row(
        field: str, value: str, message: str) -> None:
    rec = _integrity(compiled("residual_mlp"), **{field: value})
    assert rec.failed and message in rec.message


def test_integrity_refuses_an_artifact_of_another_blueprint() -> None:
    res = compiled("residual_mlp")
    rec = _integrity(res, name="gated_rms")
    assert rec.failed and "hashes to" in rec.message


# -- report and policy --------------------------------------------------------------------


def test_report_is_json_without_non_finite_numbers() -> None:
    report = r.ValidationReport(device="cpu", checks=[
        r.passed("forward", "ok", figure=1e-7, bound=1e-4),
        r.failed("finiteness", "NaN", figure=math.inf, bound=0),
    ])
    back = r.ValidationReport.model_validate_json(report.model_dump_json())
    assert back == report and not back.passed
    assert back.check("finiteness").figure is None  # type: ignore[union-attr]
    assert [x.check for x in back.reasons()] == ["finiteness"]
    assert [c.passed for c in back.check_results()] == [True, False]
    json.loads(report.model_dump_json())  # plain JSON: no NaN/Infinity tokens


def test_extra_backend_modules_are_allow_listed() -> None:
    assert check_module_name("tests.fixtures.faulty_backend")
    for bad in ("os", "subprocess", "esper..x", "tests.unit.test_x", "esper.x; import os"):
        with pytest.raises(ValueError, match="not allowed"):
            check_module_name(bad)
    policy = ValidationPolicy.with_extra_backends(
        {"ESPER_EXTRA_BACKENDS": " tests.fixtures.faulty_backend , esper.triton.backend"})
    assert policy.backend_modules == ("tests.fixtures.faulty_backend", "esper.triton.backend")
    with pytest.raises(ValueError):
        ValidationPolicy.with_extra_backends({"ESPER_EXTRA_BACKENDS": "os"})


# -- the sandbox (subprocesses) -----------------------------------------------------------

SANDBOX_POLICY = ValidationPolicy(backend_modules=("tests.fixtures.faulty_backend",),
                                  timeout_s=8.0)


def _validate(runner: SandboxRunner, res: CompileResult, name: str = "residual_mlp",
              policy: ValidationPolicy = SANDBOX_POLICY) -> r.ValidationReport:
    pem = signing.public_pem(PUBLIC).decode()
    return asyncio.run(runner.validate(res.packed, expected=expected_of(res),
                                       blueprint=BLUEPRINTS[name], public_key_pem=pem,
                                       policy=policy))


@pytest.mark.slow
def test_sandbox_survives_segfault_abort_and_hang_then_validates_a_good_kernel() -> None:
    runner = SandboxRunner(spares=0, cwd=REPO)
    seg = _validate(runner, compiled("residual_mlp", backend="faulty-segfault"))
    assert [c.check for c in seg.failures()] == ["crash"]
    assert "SIGSEGV during check 'forward'" in seg.failures()[0].message
    abort = _validate(runner, compiled("residual_mlp", backend="faulty-abort"))
    assert "SIGABRT" in abort.failures()[0].message
    hang = _validate(runner, compiled("residual_mlp", backend="faulty-hang"))
    assert [c.check for c in hang.failures()] == ["timeout"]
    assert hang.failures()[0].message == "killed after 8s during check 'forward'"
    good = _validate(runner, compiled("residual_mlp"))
    assert good.passed and good.device == "cpu"
    assert good.check("performance").status == "skipped"  # type: ignore[union-attr]
    assert good.check("resources").status == "skipped"  # type: ignore[union-attr]
    assert good.timings["checks_s"] < good.timings["total_s"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_triton_artifact_for_a_gpu_validates_on_cpu_under_the_interpreter(dtype: str) -> None:
    try:
        import esper.triton.backend  # noqa: F401  (registers "triton")
    except Exception as exc:  # pragma: no cover - the backend is optional
        pytest.skip(f"the triton backend is not available here: {exc}")
    res = compiled("residual_mlp", dtype=dtype, backend="triton", target="cuda:sm_90",
                   options=CompileOptions(dtype=dtype, autotune=False,
                                          extra={"binaries": False, "serve": "schedule"}))
    report = _validate(SandboxRunner(spares=0, cwd=REPO), res,
                       policy=ValidationPolicy(timeout_s=120.0))
    assert report.passed, [c.message for c in report.failures()]
    assert report.device == "cpu"
    coverage = report.check("coverage")
    assert coverage is not None and coverage.message.startswith(r.CPU_NUMERICS_NOTE)
    assert report.check("forward").details["batch_sizes"] == [1, 3, 4]  # type: ignore[union-attr]
    assert report.check("integrity").details["backend_in_use"] == "triton"  # type: ignore[union-attr]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_gpu_validator_checks_device_numerics_speed_and_memory(backend: str) -> None:
    major, minor = torch.cuda.get_device_capability(0)
    target = f"cuda:sm_{major}{minor}"
    options = None
    if backend == "triton":
        import esper.triton.backend  # noqa: F401  (registers "triton")

        options = CompileOptions(dtype="float32", autotune=False, extra={"serve": "schedule"})
    res = compiled("residual_mlp", backend=backend, target=target, options=options)
    report = _validate(SandboxRunner(spares=0, cwd=REPO), res,
                       policy=ValidationPolicy(timeout_s=300.0))
    assert report.device.startswith("cuda"), report.device
    numeric = {"integrity", "forward", "backward", "finiteness", "determinism", "graft_safety"}
    assert not numeric & {c.check for c in report.failures()}, report.failures()
    perf, mem = report.check("performance"), report.check("resources")
    assert perf is not None and perf.status != "skipped" and perf.figure is not None
    assert perf.bound == pytest.approx(1.10) and perf.details["eager_ms"] > 0
    assert mem is not None and mem.status != "skipped" and mem.details["eager_bytes"] > 0
    assert report.check("coverage").message.startswith("numerics verified on cuda")  # type: ignore[union-attr]


def test_atomic_reductions_may_differ_in_last_bits_only() -> None:
    from esper.validate.checks import _differing, _differing_beyond

    a = torch.linspace(-1, 1, 1000)
    b = a.clone()
    b[10] = torch.nextafter(b[10], torch.tensor(2.0))  # one ulp: atomics' reordering
    assert _differing(a, b) == 1
    assert _differing_beyond(a, b, 4.0) == 0
    b[20] += 1e-3  # a real difference
    assert _differing_beyond(a, b, 4.0) == 1
    b[30] = float("nan")
    assert _differing_beyond(a, b, 4.0) == 2
    assert _differing_beyond(a, None, 4.0) == a.numel()


def test_a_triton_artifact_that_serves_plain_torch_ops_passes_integrity() -> None:
    """A residual MLP's fused groups save no kernel over addmm + gelu + add, so its
    artifact serves the blueprint's own torch ops (predicted here; tuning on a GPU
    may measure the same); that module runs them by design, which integrity must
    tell apart from shipped binaries that failed to load."""
    try:
        import esper.triton.backend  # noqa: F401  (registers "triton")
    except Exception as exc:  # pragma: no cover - the backend is optional
        pytest.skip(f"the triton backend is not available here: {exc}")
    res = compiled("residual_mlp", backend="triton", target="cuda:sm_90",
                   options=CompileOptions(autotune=False, extra={"binaries": False}))
    records = run_checks(res, "residual_mlp")
    assert not failed(records), {k: v.message for k, v in records.items() if v.failed}
    details = records["integrity"].details
    assert details["backend_in_use"] == "reference" and details["serves_reference"] is True
