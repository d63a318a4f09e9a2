"""Local content-addressed disk tier: layout, integrity, multi-process safety."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from esper.cache.disk import DiskTier

KEY = "c" * 64


def test_put_get_layout(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    data = b"packed artifact bytes" * 100
    digest = tier.put(KEY, data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "objects" / digest[:2] / digest[2:]).read_bytes() == data
    assert (tmp_path / "keys" / KEY).read_text() == digest
    assert tier.get_by_key(KEY) == data
    assert tier.get(digest) == data
    assert tier.get_by_key("d" * 64) is None
    assert tier.put(KEY, data) == digest  # idempotent
    assert tier.usage() == {"keys": 1, "objects": 1, "bytes": len(data)}
    # A second instance (another process's view) sees the same store.
    assert DiskTier(tmp_path).get_by_key(KEY) == data
    assert not list(tmp_path.rglob(".tmp-*"))


def test_rebinding_a_key_keeps_objects(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    d1 = tier.put(KEY, b"one")
    d2 = tier.put(KEY, b"two")
    assert tier.get_by_key(KEY) == b"two"
    assert tier.get(d1) == b"one" and d2 != d1
    tier.discard_key(KEY)
    assert tier.get_by_key(KEY) is None
    tier.discard_key(KEY)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "C" * 64, "c" * 63, "", "c" * 63 + "/"])
def test_keys_and_digests_must_be_hex(tmp_path: Path, bad: str) -> None:
    tier = DiskTier(tmp_path)
    with pytest.raises(ValueError):
        tier.put(bad, b"x")
    with pytest.raises(ValueError):
        tier.get_by_key(bad)
    with pytest.raises(ValueError):
        tier.get(bad)


def test_corrupt_object_is_a_miss_and_is_rewritten(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    digest = tier.put(KEY, b"good bytes")
    path = tier.object_path(digest)
    path.write_bytes(b"bad bytes!")
    assert tier.get_by_key(KEY) is None
    assert not path.exists()
    tier.put(KEY, b"good bytes")
    assert tier.get_by_key(KEY) == b"good bytes"


def test_corrupt_key_file_is_a_miss(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    tier.put(KEY, b"x")
    (tmp_path / "keys" / KEY).write_text("../../../etc/passwd")
    assert tier.get_by_key(KEY) is None


_WRITER = """
import hashlib, sys
from pathlib import Path
from esper.cache.disk import DiskTier
root, key, me = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
tier = DiskTier(root)
payloads = [bytes([me, i]) * 50_000 for i in range(2)]
bad = 0
for i in range(60):
    tier.put(key, payloads[i % 2])
    got = tier.get_by_key(key)
    # Whatever a racing writer left, it is one whole payload of some writer.
    if got is None or len(got) != 100_000 or got != bytes([got[0], got[1]]) * 50_000:
        bad += 1
print(bad)
"""


def test_processes_racing_on_one_key(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), KEY, str(me)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for me in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert outputs == ["0", "0", "0"]
    tier = DiskTier(tmp_path)
    final = tier.get_by_key(KEY)
    assert final is not None and final[:2] * 50_000 == final
    usage = tier.usage()
    assert usage == {"keys": 1, "objects": 6, "bytes": 6 * 100_000}
    assert not list(tmp_path.rglob(".tmp-*"))
