"""Artifact format: deterministic signed packing, and refusal of every tampering."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from esper.artifacts import (
    FORMAT_VERSION,
    Artifact,
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactSignatureError,
    canonical_json,
    digest_of,
    read_manifest_unverified,
    unpack_verified,
)
from esper.artifacts import format as fmt

KEY = "1" * 64
BP = "2" * 64


def build(files: dict[str, bytes] | None = None, **over: object) -> Artifact:
    fields: dict[str, object] = dict(
        cache_key=KEY,
        blueprint_hash=BP,
        target="cuda:sm_90",
        dtype="float32",
        backend="triton",
        versions={"esper": "0.1.0", "torch": "2.13.0", "triton": "3.9.0", "python": "3.11"},
        options={"num_warps": 4, "blocks": (64, 128)},
        files=files
        if files is not None
        else {
            "ir.json": b'{"nodes": []}',
            "kernels.py": b"def fwd(x):\n    return x\n",
            "kernels/fwd0.cubin": bytes(range(256)) * 3,
            "kernels/fwd0.json": b'{"name": "fwd0"}',
        },
        created_at="2026-11-26T00:00:00+00:00",
    )
    fields.update(over)
    return Artifact.build(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def packed(key: Ed25519PrivateKey) -> bytes:
    return build().pack(key)


def raw_tar(members: list[tuple[str, bytes]], **kinds: bytes) -> bytes:
    """A tar written by hand, for archives pack() would never write."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.type = kinds.get(name, tarfile.REGTYPE)
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname, info.size = data.decode(), 0
                tf.addfile(info)
            else:
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def signed_members(
    key: Ed25519PrivateKey, art: Artifact, manifest: bytes | None = None
) -> list[tuple[str, bytes]]:
    """Validly signed members in pack()'s order (``manifest`` overrides the real one)."""
    manifest = manifest if manifest is not None else art.manifest.canonical_bytes()
    signature = key.sign(fmt.SIGNATURE_CONTEXT + manifest)
    members = [("manifest.json", manifest), ("signature", signature)]
    return members + [("files/" + p, d) for p, d in art.files.items()]


def test_round_trip(key: Ed25519PrivateKey, packed: bytes) -> None:
    art = unpack_verified(packed, key.public_key())
    original = build()
    assert art.manifest == original.manifest
    assert dict(art.files) == dict(original.files)
    assert art.manifest.format_version == FORMAT_VERSION
    assert art.manifest.options == {"num_warps": 4, "blocks": [64, 128]}
    assert art.manifest.files["kernels.py"] == fmt.sha256_hex(original.files["kernels.py"])
    assert art.text("ir.json") == '{"nodes": []}'


def test_packing_is_deterministic(key: Ed25519PrivateKey, packed: bytes) -> None:
    files = dict(build().files)
    reordered = {p: files[p] for p in reversed(list(files))}
    again = build(files=reordered, options={"blocks": [64, 128], "num_warps": 4}).pack(key)
    assert again == packed
    assert digest_of(again) == digest_of(packed)
    with tarfile.open(fileobj=io.BytesIO(packed)) as tf:
        infos = tf.getmembers()
    assert [i.name for i in infos] == [
        "manifest.json",
        "signature",
        "files/ir.json",
        "files/kernels.py",
        "files/kernels/fwd0.cubin",
        "files/kernels/fwd0.json",
    ]
    assert {(i.mtime, i.uid, i.gid, i.mode, i.uname) for i in infos} == {(0, 0, 0, 0o644, "")}


def test_manifest_is_canonical_json(packed: bytes) -> None:
    manifest = read_manifest_unverified(packed)
    raw = manifest.canonical_bytes()
    assert raw == canonical_json(json.loads(raw))
    assert b" " not in raw.replace(b"def fwd", b"")


def test_every_single_byte_flip_is_refused(key: Ed25519PrivateKey) -> None:
    # A small artifact so every byte (headers, padding, end blocks) is tried.
    small = build(files={"ir.json": b"{}", "kernels.py": b"x = 1\n"}).pack(key)
    public = key.public_key()
    unpack_verified(small, public)
    accepted = []
    for i in range(len(small)):
        tampered = bytearray(small)
        tampered[i] ^= 0x01
        try:
            unpack_verified(bytes(tampered), public)
        except ArtifactError:
            continue
        accepted.append(i)
    assert accepted == []


@pytest.mark.parametrize("where", ["manifest", "signature", "file", "header", "trailer"])
def test_byte_flip_in_each_region_of_a_large_artifact(
    key: Ed25519PrivateKey, packed: bytes, where: str
) -> None:
    offsets = {
        "header": 100,  # mode field of the first header
        "manifest": 512 + 10,
        "signature": 512 * 3 + 5,
        "file": packed.index(bytes(range(256))) + 77,
        "trailer": len(packed) - 1,
    }
    tampered = bytearray(packed)
    tampered[offsets[where]] ^= 0x80
    with pytest.raises(ArtifactError):
        unpack_verified(bytes(tampered), key.public_key())


def test_manifest_tamper_is_a_signature_error(key: Ed25519PrivateKey) -> None:
    art = build()
    members = signed_members(key, art)
    evil_manifest = members[0][1].replace(b'"float32"', b'"float16"')
    members[0] = ("manifest.json", evil_manifest)
    with pytest.raises(ArtifactSignatureError):
        unpack_verified(raw_tar(members), key.public_key())


def test_file_tamper_is_an_integrity_error(key: Ed25519PrivateKey) -> None:
    members = signed_members(key, build())
    members[3] = (members[3][0], b"import os; os.system('rm -rf /')\n")
    with pytest.raises(ArtifactIntegrityError, match="does not match its signed digest"):
        unpack_verified(raw_tar(members), key.public_key())


def test_foreign_key_is_refused(packed: bytes) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(ArtifactSignatureError, match="another key"):
        unpack_verified(packed, other.public_key())
    resigned = build().pack(other)
    with pytest.raises(ArtifactSignatureError):
        unpack_verified(resigned, Ed25519PrivateKey.generate().public_key())


def test_stripped_or_empty_signature_is_refused(key: Ed25519PrivateKey) -> None:
    members = signed_members(key, build())
    stripped = [m for m in members if m[0] != "signature"]
    with pytest.raises(ArtifactSignatureError, match="unsigned"):
        unpack_verified(raw_tar(stripped), key.public_key())
    emptied = [(n, b"" if n == "signature" else d) for n, d in members]
    with pytest.raises(ArtifactSignatureError):
        unpack_verified(raw_tar(emptied), key.public_key())


@pytest.mark.parametrize(
    "name",
    ["files/../evil.py", "../evil.py", "/etc/passwd", "files//x", "files/.hidden", "evil.py"],
)
def test_path_traversal_and_stray_members_are_refused(key: Ed25519PrivateKey, name: str) -> None:
    members = [*signed_members(key, build()), (name, b"boom")]
    with pytest.raises(ArtifactIntegrityError):
        unpack_verified(raw_tar(members), key.public_key())


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE])
def test_links_and_directories_are_refused(key: Ed25519PrivateKey, kind: bytes) -> None:
    members = [*signed_members(key, build()), ("files/link", b"/etc/passwd")]
    with pytest.raises(ArtifactIntegrityError, match="not a regular file"):
        unpack_verified(raw_tar(members, **{"files/link": kind}), key.public_key())


def test_duplicate_unlisted_and_missing_files_are_refused(key: Ed25519PrivateKey) -> None:
    members = signed_members(key, build())
    public = key.public_key()
    with pytest.raises(ArtifactIntegrityError, match="duplicate"):
        unpack_verified(raw_tar([*members, members[2]]), public)
    with pytest.raises(ArtifactIntegrityError, match="unlisted"):
        unpack_verified(raw_tar([*members, ("files/extra.py", b"x")]), public)
    with pytest.raises(ArtifactIntegrityError, match="missing"):
        unpack_verified(raw_tar(members[:-1]), public)


def test_non_canonical_container_is_refused(key: Ed25519PrivateKey, packed: bytes) -> None:
    # Same signed content, different member order: still refused.
    members = signed_members(key, build())
    shuffled = [members[1], members[0], *reversed(members[2:])]
    with pytest.raises(ArtifactIntegrityError, match="canonical"):
        unpack_verified(raw_tar(shuffled), key.public_key())
    with pytest.raises(ArtifactIntegrityError, match="canonical"):
        unpack_verified(packed + b"\0" * 512, key.public_key())


def test_signed_but_malformed_manifests_are_refused(key: Ed25519PrivateKey) -> None:
    art = build()
    doc = json.loads(art.manifest.canonical_bytes())
    for change in ({"extra": 1}, {"format_version": FORMAT_VERSION + 1}, {"files": {"a": "b"}}):
        members = signed_members(key, art, canonical_json({**doc, **change}))
        with pytest.raises(ArtifactIntegrityError):
            unpack_verified(raw_tar(members), key.public_key())


def test_signature_is_domain_separated(key: Ed25519PrivateKey) -> None:
    # A signature over the bare manifest (no context) must not verify.
    manifest = build().manifest.canonical_bytes()
    members = [("manifest.json", manifest), ("signature", key.sign(manifest))]
    members += [("files/" + p, d) for p, d in build().files.items()]
    with pytest.raises(ArtifactSignatureError):
        unpack_verified(raw_tar(members), key.public_key())


def test_garbage_and_oversized_input_are_refused(
    key: Ed25519PrivateKey, packed: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    for junk in (b"", b"not a tar", b"\0" * 10240, packed[:700]):
        with pytest.raises(ArtifactError):
            unpack_verified(junk, key.public_key())
    monkeypatch.setattr(fmt, "MAX_ARTIFACT_BYTES", len(packed) - 1)
    with pytest.raises(ArtifactIntegrityError, match="at most"):
        unpack_verified(packed, key.public_key())


UNSAFE = ["../x", "/abs", "a//b", "a/./b", ".x", "a\\b", "", "a/" + "b" * 99]


@pytest.mark.parametrize("path", UNSAFE)
def test_build_rejects_unsafe_paths(path: str) -> None:
    with pytest.raises(ValueError):
        build(files={path: b"x"})


def test_build_rejects_file_dir_clash_and_bad_fields() -> None:
    with pytest.raises(ValueError, match="files and directories"):
        build(files={"k": b"1", "k/a": b"2"})
    with pytest.raises(ValueError):
        build(cache_key="not-hex")
    with pytest.raises(ValueError):
        build(options={"x": float("nan")})
    with pytest.raises(ValueError):
        build(options={"x": object()})
    with pytest.raises(TypeError):
        build(files={"a": "text, not bytes"})


def test_canonical_json_rejects_ambiguous_keys() -> None:
    assert canonical_json({"b": 1, "a": [1, 2.5, None, True]}) == b'{"a":[1,2.5,null,true],"b":1}'
    with pytest.raises(ValueError):
        canonical_json({1: "x"})


def test_extract_to_writes_the_files(key: Ed25519PrivateKey, packed: bytes, tmp_path) -> None:
    art = unpack_verified(packed, key.public_key())
    out = art.extract_to(tmp_path / "k")
    assert (out / "kernels" / "fwd0.cubin").read_bytes() == art.files["kernels/fwd0.cubin"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        art.files
    )


def test_artifact_files_are_read_only(key: Ed25519PrivateKey, packed: bytes) -> None:
    art = unpack_verified(packed, key.public_key())
    with pytest.raises(TypeError):
        art.files["kernels.py"] = b"evil"  # type: ignore[index]


def test_bytes_are_pinned_across_python_versions() -> None:
    # The verifier re-serialises and compares bytes, so the container must not
    # depend on the Python version: this digest was produced on 3.11.7 and 3.12.1.
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fixed").digest())
    art = Artifact.build(
        cache_key="a" * 64,
        blueprint_hash="b" * 64,
        target="cuda:sm_90",
        dtype="bfloat16",
        backend="triton",
        versions={"python": "x", "torch": "2.11"},
        options={"f": 0.1, "u": "é", "t": (1, 2.5e-7), "n": None},
        files={
            "ir.json": '{"é": 1}'.encode(),
            "kernels/fwd0.cubin": bytes(range(256)) * 40,
            "kernels.py": b"x = 1\n",
        },
        created_at="2026-11-26T00:00:00+00:00",
    )
    packed = art.pack(key)
    assert digest_of(packed) == "833c9c4d0435521727344be64ac6b6d4b3bd462da3234b34fae9316ff066e89c"
    assert unpack_verified(packed, key.public_key()).manifest == art.manifest


def test_pack_refuses_what_loaders_would_refuse(
    key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fmt, "MAX_ARTIFACT_BYTES", 4096)
    with pytest.raises(ValueError, match="at most 4096"):
        build().pack(key)
