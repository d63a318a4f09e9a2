"""Ahead-of-time compile of generated kernels for an explicit GPU target.

Imports only triton and the standard library, so it also runs as a script under
another Python that has a different Triton (the version the trainers run):
``python aot_compile.py request.json`` prints a JSON result. The request names
the kernel source file, the target and each kernel's signature/constexprs/
options; the result holds, per kernel, the cubin and metadata file paths."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any


def _import_source(path: str, module_name: str) -> Any:
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # triton's JIT looks functions up by module
    spec.loader.exec_module(module)
    return module


def metadata_json(kernel: Any) -> str:
    """The kernel's metadata as ``CompiledKernel`` reads it back (target as a dict)."""
    md = dict(kernel.metadata._asdict())
    t = md["target"]
    md["target"] = {"backend": t.backend, "arch": t.arch, "warp_size": t.warp_size}
    return json.dumps(md, default=lambda o: o._asdict() if hasattr(o, "_asdict") else str(o))


def compile_request(req: dict[str, Any]) -> dict[str, Any]:
    """Compile every kernel of ``req``; write ``<key>.cubin``/``<key>.json`` to out_dir."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = _import_source(req["source"], req["module_name"])
    backend, arch, warp = req["target"]
    target = GPUTarget(backend, arch, warp)
    out_dir = Path(req["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"triton_version": triton.__version__, "kernels": {}}
    for k in req["kernels"]:
        start = time.perf_counter()
        fn = getattr(module, k["fn"])
        attrs = {(i,): [["tt.divisibility", 16]] for i in k["aligned"]}
        src = ASTSource(fn=fn, signature=k["signature"], constexprs=k["constexprs"], attrs=attrs)
        compiled = triton.compile(src, target=target, options=k["options"])
        binary_ext = "cubin" if backend == "cuda" else "hsaco"
        (out_dir / f"{k['key']}.{binary_ext}").write_bytes(compiled.asm[binary_ext])
        (out_dir / f"{k['key']}.json").write_text(metadata_json(compiled))
        result["kernels"][k["key"]] = {
            "hash": compiled.hash,
            "compile_s": time.perf_counter() - start,
            "shared": compiled.metadata.shared,
        }
    return result


if __name__ == "__main__":
    request = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(compile_request(request)))
