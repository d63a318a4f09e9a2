"""The cache key changes with every field and with nothing else."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import pytest

import esper
from esper.cache.keys import cache_key, current_versions

BASE: dict[str, Any] = dict(
    blueprint_hash="a" * 64,
    target="cuda:sm_90",
    dtype="float32",
    backend="triton",
    versions={"esper": "0.1.0", "torch": "2.13.0", "triton": "3.9.0", "python": "3.11"},
    options={"num_warps": 4, "block": [64, 128], "autotune": {"budget": 8}},
)


def test_key_is_sha256_hex_and_stable() -> None:
    key = cache_key(**BASE)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert cache_key(**BASE) == key


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("blueprint_hash", "b" * 64),
        ("target", "cuda:sm_80"),
        ("target", "cpu"),
        ("dtype", "bfloat16"),
        ("backend", "torch"),
        ("versions", {**BASE["versions"], "torch": "2.11.0"}),
        ("versions", {**BASE["versions"], "triton": "3.6.0"}),
        ("versions", {**BASE["versions"], "esper": "0.2.0"}),
        ("versions", {**BASE["versions"], "python": "3.12"}),
        ("versions", {**BASE["versions"], "cuda": "12.4"}),
        ("options", {**BASE["options"], "num_warps": 8}),
        ("options", {**BASE["options"], "block": [128, 64]}),
        ("options", {**BASE["options"], "autotune": {"budget": 9}}),
        ("options", {**BASE["options"], "extra": None}),
        ("options", {}),
    ],
)
def test_every_field_changes_the_key(field: str, value: Any) -> None:
    assert cache_key(**{**BASE, field: value}) != cache_key(**BASE)


def test_dict_order_and_tuple_vs_list_do_not_change_it() -> None:
    reordered = dict(
        options={"autotune": {"budget": 8}, "block": (64, 128), "num_warps": 4},
        versions=dict(reversed(list(BASE["versions"].items()))),
        backend="triton",
        dtype="float32",
        target="cuda:sm_90",
        blueprint_hash="a" * 64,
    )
    assert cache_key(**reordered) == cache_key(**BASE)


def test_fields_cannot_bleed_into_each_other() -> None:
    # Moving a value between fields must never collide (JSON keeps them apart).
    a = cache_key(**{**BASE, "target": "cuda", "dtype": "sm_90float32"})
    b = cache_key(**{**BASE, "target": "cudasm_90", "dtype": "float32"})
    assert len({a, b, cache_key(**BASE)}) == 3


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        cache_key(**{**BASE, "target": ""})
    with pytest.raises(ValueError):
        cache_key(**{**BASE, "options": {"x": float("inf")}})
    with pytest.raises(ValueError):
        cache_key(**{**BASE, "options": {1: "int keys are ambiguous"}})


def test_key_is_fast() -> None:
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        cache_key(**BASE)
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 100e-6, f"{per_call * 1e6:.1f} µs per key"


def test_current_versions() -> None:
    import torch

    v = current_versions("torch")
    assert set(v) == {"esper", "torch", "triton", "python"}
    assert v["esper"] == esper.__version__
    assert v["torch"] == str(torch.__version__)
    assert v["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert v["triton"]
    v["torch"] = "mutated"
    assert current_versions("torch")["torch"] == str(torch.__version__)
