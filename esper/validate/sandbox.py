"""``python -m esper.validate.sandbox``: validate ONE artifact in a process of its
own, so a kernel that segfaults, aborts or spins forever takes only this process
down. Protocol: the process imports torch, prints ``@@esper-validate ready`` on
stderr, reads one ``SandboxRequest`` (JSON) from stdin until EOF, runs the
checks (announcing each on stderr), writes one ``ValidationReport`` (JSON) to
its stdout and exits. Whatever the kernel prints goes to stderr: stdout carries
the answer only. Extra backend modules are imported only from the allow-list in
``esper.validate.policy``."""

from __future__ import annotations

import faulthandler
import importlib
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from esper.validate.protocol import PROGRESS_PREFIX, SandboxRequest

_PRELOAD = ("cryptography.hazmat.primitives.serialization", "esper.compile.pipeline",
            "esper.validate.checks", "esper.validate.device_checks", "esper.validate.integrity")
# Built-in backends that register on import rather than through get_backend.
_BACKEND_MODULES = {"triton": "esper.triton.backend"}


def progress(event: str, name: str = "") -> None:
    print(f"{PROGRESS_PREFIX} {event} {name}".rstrip(), file=sys.__stderr__, flush=True)


def _choose_device(request: SandboxRequest) -> tuple[str, str, list[str]]:
    """(torch device, its description, notes)."""
    import torch

    target = request.expected.target
    if request.device == "cpu" or target == "cpu" or not torch.cuda.is_available():
        return "cpu", "cpu", []
    major, minor = torch.cuda.get_device_capability(0)
    local = f"cuda:sm_{major}{minor}"
    name = f"cuda {torch.cuda.get_device_name(0)} sm_{major}{minor}"[:64]
    if request.device == "auto" and local != target:
        return "cpu", "cpu", [f"this GPU is {local}, the kernel targets {target}: CPU numerics"]
    return "cuda:0", name, []


def _register_backends(request: SandboxRequest) -> None:
    from esper.compile.backend import available_backends
    from esper.validate.policy import check_module_name

    for module in request.policy.backend_modules:
        importlib.import_module(check_module_name(module))
    backend = request.expected.backend
    if backend not in available_backends() and backend in _BACKEND_MODULES:
        importlib.import_module(_BACKEND_MODULES[backend])


def validate(request: SandboxRequest) -> object:
    """Run every check on the request's artifact; returns a ValidationReport."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    device_str, device_name, notes = _choose_device(request)
    interpreted = device_str == "cpu" and request.expected.backend == "triton"
    from esper.validate import report as r

    if interpreted and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton read the flag when it was imported (at start-up, see main).
        return r.ValidationReport(device=device_name, notes=notes, checks=[r.failed(
            r.SANDBOX, "this validator cannot run the kernel: Triton on CPU needs "
            "TRITON_INTERPRET=1, set only on validators without a GPU")])
    _register_backends(request)

    import torch
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from esper.validate.checks import NUMERIC_CHECKS
    from esper.validate.device_checks import check_coverage, check_performance, check_resources
    from esper.validate.integrity import check_integrity

    policy = request.policy
    torch.manual_seed(policy.seed)  # the declared init of fresh modules
    torch.backends.cuda.matmul.allow_tf32 = policy.allow_tf32
    torch.backends.cudnn.allow_tf32 = policy.allow_tf32
    device = torch.device(device_str)
    packed = Path(request.artifact_path).read_bytes()
    public_key = load_pem_public_key(request.public_key_pem.encode())
    progress("check", r.INTEGRITY)
    started = time.perf_counter()
    record, subject = check_integrity(packed, public_key, request.expected,  # type: ignore[arg-type]
                                      request.blueprint, device=device, policy=policy,
                                      interpreted=interpreted)
    records = [_timed(record, started)]
    if subject is not None:
        checks = [*NUMERIC_CHECKS, (r.PERFORMANCE, check_performance),
                  (r.RESOURCES, check_resources)]
        for name, fn in checks:
            progress("check", name)
            started = time.perf_counter()
            try:
                record = fn(subject)
            except Exception as exc:
                record = r.failed(name, f"raised {type(exc).__name__}: {exc}")
            records.append(_timed(record, started))
        records.append(check_coverage(subject, interpreted=interpreted, device_name=device_name))
    if interpreted:
        notes.append("Triton kernels run by the interpreter at small shapes")
    return r.ValidationReport(device=device_name, checks=records, notes=notes,
                              timings={"checks_s": time.perf_counter() - t0,
                                       "checks_cpu_s": time.process_time() - cpu0})


def _timed(record, started: float):  # type: ignore[no-untyped-def]
    return record.model_copy(update={"duration_ms": (time.perf_counter() - started) * 1000})


def _warm_up() -> None:
    """Pay the one-time costs before announcing readiness: torch's import, the
    lazy import behind ``use_deterministic_algorithms`` (~1 s), autograd's start,
    and on a GPU machine the CUDA context."""
    import torch

    for module in _PRELOAD:  # imported now, used by each request
        importlib.import_module(module)
    from esper.validate.subject import poisoned

    with poisoned():
        w = torch.ones(2, 2, requires_grad=True)
        (w @ w).sum().backward()
        if torch.cuda.is_available():
            _warm_cuda()


# A small graph of the ops whose first CUDA launch is costly (cuBLAS/cuDNN handles and
# heuristics, lazily loaded kernel modules), run once per dtype before "ready".
_WARM_IR = {
    "schema_version": 1, "name": "warm-up",
    "inputs": [{"name": "x", "shape": ["B", 4, 6, 6], "dtype": "float32"}],
    "nodes": [
        {"id": "c", "op": "conv2d", "inputs": ["x"],
         "attrs": {"out_channels": 4, "kernel_size": 3, "padding": "same"}},
        {"id": "f", "op": "reshape", "inputs": ["c"], "attrs": {"shape": ["B", 144]}},
        {"id": "n", "op": "layer_norm", "inputs": ["f"], "attrs": {"normalized_shape": [144]}},
        {"id": "h", "op": "linear", "inputs": ["n"], "attrs": {"out_features": 32}},
        {"id": "g", "op": "gelu", "inputs": ["h"]},
        {"id": "s", "op": "softmax", "inputs": ["g"], "attrs": {"dim": -1}},
        {"id": "r", "op": "rms_norm", "inputs": ["s"], "attrs": {"normalized_shape": [32]}},
    ],
    "outputs": ["r"],
}


def _warm_cuda() -> None:
    import torch

    from esper.compile.evaluate import evaluate
    from esper.compile.reference import build_module
    from esper.ir import BlueprintIR

    ir = BlueprintIR.from_dict(_WARM_IR)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        module = build_module(ir, device="cuda", dtype=dtype)
        x = torch.randn(3, 4, 6, 6, device="cuda", dtype=dtype, requires_grad=True)
        module(x).sum().backward()
    params = {k: p.detach() for k, p in module.params.items()}
    evaluate(ir, [x.detach()], params)
    torch.cuda.synchronize()


def main() -> None:
    faulthandler.enable()  # a segfault leaves a Python traceback on stderr
    answer: TextIO = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed to stdout (by a kernel, say) goes to stderr
    sys.stdout = sys.stderr
    # cuBLAS is deterministic only with a fixed workspace; set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    if not torch.cuda.is_available():
        # Without a GPU, Triton kernels can only run in the interpreter, and Triton
        # reads this flag when imported (which the warm-up below already does).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _warm_up()
    progress("ready")
    request = SandboxRequest.model_validate_json(sys.stdin.buffer.read())
    report = validate(request)
    answer.write(report.model_dump_json())  # type: ignore[attr-defined]
    answer.flush()
    progress("done")
    sys.stderr.flush()
    # Skip interpreter teardown (about a second with torch loaded): the answer is
    # out and nothing else here needs cleaning up.
    os._exit(0)


if __name__ == "__main__":
    main()
