"""Check 1, integrity: the artifact's signature and digests verify, its manifest
is the kernel row's, the submitted blueprint hashes to the manifest's blueprint
hash, and it loads through ``load_artifact`` — what trainers call — into a module
whose graph is the blueprint's. Passing yields the Subject every other check
works on."""

from __future__ import annotations

import time
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from esper.artifacts import digest_of, unpack_verified
from esper.compile.dtypes import torch_dtype
from esper.compile.ids import artifact_param_map
from esper.compile.params import BlueprintModule
from esper.compile.pipeline import load_artifact
from esper.errors import ArtifactError, EsperError
from esper.ir import BlueprintIR
from esper.validate import report as r
from esper.validate.policy import ValidationPolicy
from esper.validate.protocol import ExpectedKernel
from esper.validate.subject import Subject, fit_batches, randomize_parameters
from esper.validate.tolerances import tolerance

_MANIFEST_FIELDS = ("cache_key", "blueprint_hash", "target", "dtype", "backend")


def check_integrity(packed: bytes, public_key: Ed25519PublicKey, expected: ExpectedKernel,
                    blueprint: dict[str, Any], *, device: torch.device,
                    policy: ValidationPolicy, interpreted: bool = False,
                    ) -> tuple[r.CheckRecord, Subject | None]:
    """Signature and digests verify; the manifest is the kernel row's; the submitted
    blueprint hashes to the manifest's blueprint hash; the artifact loads through
    ``load_artifact`` (what trainers call) and its graph is the blueprint's."""
    digest = digest_of(packed)
    try:
        manifest = unpack_verified(packed, public_key).manifest
    except ArtifactError as exc:
        return r.failed(r.INTEGRITY, f"artifact refused: {exc}", error=type(exc).__name__,
                        digest=digest), None
    problems = []
    if expected.digest is not None and digest != expected.digest:
        problems.append(f"digest {digest} is not the kernel's {expected.digest}")
    for name in _MANIFEST_FIELDS:
        have, want = getattr(manifest, name), getattr(expected, name)
        if have != want:
            problems.append(f"manifest {name} {have!r} differs from the kernel's {want!r}")
    try:
        ir = BlueprintIR.from_dict(blueprint)
        if ir.canonical_hash() != manifest.blueprint_hash:
            problems.append(f"the submitted blueprint hashes to {ir.canonical_hash()}, "
                            f"the manifest names {manifest.blueprint_hash}")
    except (EsperError, ValueError) as exc:
        problems.append(f"the kernel's blueprint does not parse: {exc}")
    if problems:
        return r.failed(r.INTEGRITY, "; ".join(problems), digest=digest), None

    t0 = time.perf_counter()
    try:
        factory = load_artifact(packed, public_key)
        module = factory(device)
    except Exception as exc:
        return r.failed(r.INTEGRITY, f"artifact does not load: {type(exc).__name__}: {exc}",
                        digest=digest), None
    load_ms = (time.perf_counter() - t0) * 1000
    if not isinstance(module, BlueprintModule):
        return r.failed(r.INTEGRITY, f"the loader built a {type(module).__name__}, "
                        "not a BlueprintModule", digest=digest), None
    want_dtype = torch_dtype(manifest.dtype)
    if module.compute_dtype != want_dtype:
        return r.failed(r.INTEGRITY, f"module computes in {module.compute_dtype}, the "
                        f"manifest says {manifest.dtype}", digest=digest), None
    in_use = getattr(module, "backend_in_use", None)
    serves_reference = bool(getattr(module, "serves_reference", False))
    # A module that is not ready serves a fallback, not the artifact's kernels (the
    # shipped binaries did not load); one whose plan chose the blueprint's plain
    # torch ops is ready: those are its kernels.
    if not getattr(module, "ready", True):
        return r.failed(r.INTEGRITY, "the module serves the reference implementation, not "
                        "the artifact's kernels (Triton version or arch mismatch?)",
                        digest=digest), None
    try:
        key_map = artifact_param_map(ir, module.ir)
    except EsperError as exc:
        return r.failed(r.INTEGRITY, f"the artifact's graph is not the blueprint's: {exc}",
                        digest=digest), None
    module.eval()
    randomize_parameters(module, policy.seed)
    batches = fit_batches(ir, policy, interpreted=interpreted, gpu=device.type == "cuda")
    tf32 = policy.allow_tf32 and device.type == "cuda"
    subject = Subject(ir=ir, factory=factory, module=module, device=device,
                      dtype_name=manifest.dtype, key_map=key_map, policy=policy,
                      batch_sizes=batches, tol=tolerance(manifest.dtype, tf32=tf32),
                      target=manifest.target, backend=manifest.backend,
                      atomic_reductions=bool(manifest.options.get("atomic_reductions")))
    return r.passed(r.INTEGRITY, "signature, digests and manifest verified; loaded by "
                    "load_artifact", digest=digest, files=len(manifest.files),
                    load_ms=round(load_ms, 3), backend_in_use=in_use,
                    serves_reference=serves_reference), subject
