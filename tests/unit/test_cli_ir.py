"""``esper check`` and ``esper hash``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from esper.cli import main
from esper.ir import bundled, bundled_names, bundled_path

BAD = {
    "schema_version": 1,
    "name": "bad",
    "inputs": [{"name": "x", "shape": ["B", 8], "dtype": "float32"}],
    "nodes": [
        {"id": "h", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 4}},
        {"id": "s", "op": "add", "inputs": ["x", "h"]},
    ],
    "outputs": ["s"],
}


def test_check_prints_every_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(bundled_path("residual_mlp"))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("residual_mlp: valid (4 nodes")
    assert re.search(r"^\s+x\s+input\s+float32\[B, 64\]$", out, re.M)
    assert re.search(r"^\s+h\s+linear\s+float32\[B, 256\]\s+params: weight \[256, 64\]", out,
                     re.M)
    assert re.search(r"^\s+out\s+add\s+float32\[B, 64\]$", out, re.M)
    assert "output out: float32[B, 64]" in out


def test_check_every_bundled_blueprint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--bundled", "all"]) == 0
    out = capsys.readouterr().out
    for name in bundled_names():
        assert f"{name}: valid" in out


def test_check_invalid_names_the_node(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(BAD))
    assert main(["check", str(f)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "node 's' (add)" in captured.err and "cannot broadcast" in captured.err


def test_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["check", str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["check"]) == 2


def test_hash_prints_only_the_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash", str(bundled_path("conv_block"))]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"[0-9a-f]{64}\n", out)
    assert out.strip() == bundled()["conv_block"].canonical_hash()
    assert main(["hash", "--bundled", "conv_block"]) == 0
    assert capsys.readouterr().out == out


def test_hash_invalid_and_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    assert main(["hash", str(f)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "malformed JSON" in captured.err
    assert main(["hash", str(tmp_path / "missing.json")]) == 2
    assert main(["hash", "--bundled", "nope"]) == 2


def test_console_entry_point_runs() -> None:
    res = subprocess.run([sys.executable, "-m", "esper", "hash", "--bundled", "residual_mlp"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == bundled()["residual_mlp"].canonical_hash()
    bad = subprocess.run([sys.executable, "-m", "esper", "check", "/nonexistent/x.json"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "cannot read" in bad.stderr
