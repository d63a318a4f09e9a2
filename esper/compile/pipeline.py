"""Blueprint -> signed artifact bytes, and signed artifact bytes -> module factory.
The thin seam between the compilation plane and the artifact format."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from esper.artifacts import Artifact, ArtifactManifest, digest_of, unpack_verified
from esper.cache.keys import cache_key, current_versions
from esper.compile.backend import Backend, CompileOptions, ModuleFactory, get_backend
from esper.compile.passes import optimize
from esper.errors import CompileError
from esper.ir import BlueprintIR

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

COMPILE_DTYPES = ("float32", "float16", "bfloat16")

# Options that say *where* the toolchain is, not what it builds: the key records
# the toolchain's version instead, so two machines with the same compiler share keys.
LOCATION_OPTIONS = frozenset({"triton_python"})


@lru_cache(maxsize=8)
def _triton_version_of(python: str) -> str:
    """The Triton version another interpreter (a side venv that builds binaries
    for a trainer's Triton) would compile with."""
    try:
        out = subprocess.run(
            [python, "-c", "import triton; print(triton.__version__)"],
            capture_output=True, text=True, timeout=60, check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise CompileError(f"cannot ask {python} for its Triton version: {exc}") from exc
    return out.stdout.strip()


def key_inputs(backend: Backend, options: CompileOptions,
               versions: Mapping[str, str] | None) -> tuple[dict[str, str], dict[str, object]]:
    """The versions and options a cache key is made of."""
    found_versions = dict(versions) if versions is not None else current_versions(backend.name)
    dumped = options.model_dump()
    extra = dict(dumped.get("extra") or {})
    side = extra.get("triton_python")
    if side and versions is None:
        found_versions["triton"] = _triton_version_of(str(side))
    dumped["extra"] = {k: v for k, v in extra.items() if k not in LOCATION_OPTIONS}
    return found_versions, dumped


@dataclass(frozen=True)
class CompileResult:
    """A signed artifact and how it was made (timings in seconds)."""

    cache_key: str
    packed: bytes
    digest: str
    manifest: ArtifactManifest
    timings: dict[str, float] = field(default_factory=dict)


def _resolve(backend: str | Backend, target: str, dtype: str,
             options: CompileOptions | None) -> tuple[Backend, CompileOptions]:
    found = get_backend(backend) if isinstance(backend, str) else backend
    if not found.supports(target):
        raise CompileError(f"backend {found.name!r} does not support target {target!r}")
    if dtype not in COMPILE_DTYPES:
        raise CompileError(f"unsupported dtype {dtype!r} (one of {', '.join(COMPILE_DTYPES)})")
    options = options if options is not None else CompileOptions(dtype=dtype)
    if options.dtype != dtype:
        raise CompileError(f"options.dtype {options.dtype!r} contradicts dtype {dtype!r}")
    return found, options


def compute_cache_key(ir: BlueprintIR, *, target: str, dtype: str = "float32",
                      backend: str | Backend = "torch",
                      options: CompileOptions | None = None,
                      versions: Mapping[str, str] | None = None) -> str:
    """The key ``compile_blueprint`` would give ``ir``; look it up before compiling.
    ``versions`` (default: this process's toolchain) is what the key records."""
    found, options = _resolve(backend, target, dtype, options)
    key_versions, key_options = key_inputs(found, options, versions)
    return cache_key(blueprint_hash=ir.canonical_hash(), target=target, dtype=dtype,
                     backend=found.name, versions=key_versions, options=key_options)


def compile_blueprint(
    ir: BlueprintIR,
    *,
    target: str,
    dtype: str = "float32",
    backend: str | Backend = "torch",
    options: CompileOptions | None = None,
    private_key: Ed25519PrivateKey,
    versions: Mapping[str, str] | None = None,
) -> CompileResult:
    """Optimise, compile with ``backend`` for ``target``, build and sign the artifact.
    The key and manifest hold the *submitted* IR's canonical hash, so every
    equivalent submission maps to this artifact. ``versions`` (default: this
    process's toolchain) go into the key and manifest, as in ``compute_cache_key``."""
    start = time.perf_counter()
    found, options = _resolve(backend, target, dtype, options)
    blueprint_hash = ir.canonical_hash()
    versions, key_options = key_inputs(found, options, versions)
    key = cache_key(blueprint_hash=blueprint_hash, target=target, dtype=dtype,
                    backend=found.name, versions=versions, options=key_options)
    keyed = time.perf_counter()
    optimised = optimize(ir)
    optimised_at = time.perf_counter()
    compiled = found.compile(optimised, target, options)
    compiled_at = time.perf_counter()
    artifact = Artifact.build(cache_key=key, blueprint_hash=blueprint_hash, target=target,
                              dtype=dtype, backend=found.name, versions=versions,
                              options=compiled.options, files=compiled.files)
    packed = artifact.pack(private_key)
    done = time.perf_counter()
    timings = {
        "key_s": keyed - start,
        "optimize_s": optimised_at - keyed,
        "backend_s": compiled_at - optimised_at,
        **{f"backend.{k}": v for k, v in compiled.timings.items()},
        "pack_s": done - compiled_at,
        "total_s": done - start,
    }
    return CompileResult(cache_key=key, packed=packed, digest=digest_of(packed),
                         manifest=artifact.manifest, timings=timings)


def load_artifact(packed: bytes, public_key: Ed25519PublicKey) -> ModuleFactory:
    """Verify ``packed`` against ``public_key`` (before anything is parsed beyond the
    container), then hand its files to the backend named in the signed manifest."""
    artifact = unpack_verified(packed, public_key)
    return get_backend(artifact.manifest.backend).load(artifact.manifest, artifact.files)
