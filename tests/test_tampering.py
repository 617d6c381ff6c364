"""Damage that tests/test_artifact.py does not already cover, through guard.load as a
server would meet it: a flipped bit at every byte of the manifest, at the first and
last byte of every tensor file, files cut short, grown, emptied, swapped or replaced by
a directory, the manifest alone missing, a newer format version. Each is refused with
a typed error (ChecksumError or ArtifactError, both ValueErrors) naming the file."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import guard
from guard.artifact import MANIFEST, load_artifact
from guard.errors import ArtifactError, ChecksumError

TENSOR_FILES = ("visual.safetensors", "prompts.safetensors", "class_embeddings.safetensors")


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path) -> Path:
    copy = Path(shutil.copytree(tiny_artifact.path, tmp_path / "copy"))
    assert sorted(path.name for path in copy.iterdir()) == sorted((MANIFEST,) + TENSOR_FILES)
    return copy


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_manifest(directory: Path, **changes) -> None:
    """Change entries and recompute manifest_sha256 as the format defines it (sha256 of the
    sorted, compact JSON without that field), so only the changed entries are wrong."""
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.update(changes)
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    manifest["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                                                 .encode()).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def format_version_key_offsets(text: str) -> range:
    start = text.index('"format_version"')
    return range(start, start + len('"format_version"'))


def test_a_flipped_bit_anywhere_in_the_manifest_is_refused(artifact_copy):
    """All ~1,700 one-bit corruptions: none loads, each is an ArtifactError naming the manifest
    (except in the "format_version" key, see the next test), and none is another exception."""
    manifest = artifact_copy / MANIFEST
    original = manifest.read_bytes()
    key = format_version_key_offsets(original.decode())
    kinds = {"checksum": 0, "other": 0}
    for offset in range(len(original)):
        flip_bit(manifest, offset)
        with pytest.raises(ArtifactError) as info:
            load_artifact(artifact_copy)
        manifest.write_bytes(original)
        kinds["checksum" if isinstance(info.value, ChecksumError) else "other"] += 1
        named = MANIFEST in str(info.value) if offset not in key else str(artifact_copy) in str(info.value)
        assert named, (offset, str(info.value))
    assert kinds["checksum"] > 500 and kinds["other"] > 300  # both the checksum and the parser catch damage
    load_artifact(artifact_copy)  # restored: loads again


def test_a_damaged_format_version_key_is_reported_as_damage(artifact_copy):
    manifest = artifact_copy / MANIFEST
    flip_bit(manifest, format_version_key_offsets(manifest.read_text()).start + 3)
    with pytest.raises(ArtifactError) as info:
        load_artifact(artifact_copy)
    assert MANIFEST in str(info.value) and "upgrade" not in str(info.value)


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("name", TENSOR_FILES)
def test_a_flipped_bit_at_either_end_of_a_tensor_file(artifact_copy, name, where):
    file = artifact_copy / name
    flip_bit(file, 0 if where == "first" else file.stat().st_size - 1)
    with pytest.raises(ChecksumError, match=f"{name} does not match its sha256"):
        guard.load(artifact_copy, device="cpu")


@pytest.mark.parametrize("damage", ["cut short", "grown", "emptied", "a directory"])
@pytest.mark.parametrize("name", TENSOR_FILES)
def test_files_changed_in_size_or_kind(artifact_copy, name, damage):
    file = artifact_copy / name
    data = file.read_bytes()
    if damage == "cut short":
        file.write_bytes(data[:-1])
    elif damage == "grown":
        file.write_bytes(data + b"\x00")
    elif damage == "emptied":
        file.write_bytes(b"")
    else:
        file.unlink()
        file.mkdir()
    expected = ChecksumError if damage != "a directory" else ArtifactError
    with pytest.raises(expected, match=name):
        guard.load(artifact_copy, device="cpu")


def test_two_files_swapped(artifact_copy):
    visual, embeddings = artifact_copy / TENSOR_FILES[0], artifact_copy / TENSOR_FILES[2]
    visual_bytes = visual.read_bytes()
    visual.write_bytes(embeddings.read_bytes())
    embeddings.write_bytes(visual_bytes)
    with pytest.raises(ChecksumError, match=r"\.safetensors does not match its sha256"):
        guard.load(artifact_copy, device="cpu")


def test_the_manifest_alone_missing(artifact_copy):
    (artifact_copy / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        guard.load(artifact_copy, device="cpu")


@pytest.mark.parametrize("name", TENSOR_FILES)
def test_a_missing_tensor_file_through_guard_load(artifact_copy, name):
    (artifact_copy / name).unlink()
    with pytest.raises(ArtifactError, match=f"{name} is missing"):
        guard.load(artifact_copy, device="cpu")


def test_a_future_format_version_through_guard_load(artifact_copy):
    rewrite_manifest(artifact_copy, format_version=2)
    with pytest.raises(ArtifactError, match=r"format version 2; .* upgrade clip-guard") as info:
        guard.load(artifact_copy, device="cpu")
    assert not isinstance(info.value, ChecksumError)  # only the version is wrong


@pytest.mark.parametrize("version", ["1", 1.0, None, [1]])
def test_a_format_version_of_the_wrong_type_is_refused(artifact_copy, version):
    rewrite_manifest(artifact_copy, format_version=version)
    with pytest.raises(ArtifactError, match="format version"):
        guard.load(artifact_copy, device="cpu")


def test_an_untouched_copy_loads(artifact_copy):
    with guard.load(artifact_copy, device="cpu") as model:
        assert model.classes
