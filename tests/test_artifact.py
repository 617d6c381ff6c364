"""guard.artifact: a purified model written with save_artifact reads back exactly, and
every kind of damage (a flipped byte anywhere, a missing file, a newer format, a
path that is no artifact) is refused with a typed error."""
import hashlib
import json

import pytest
import torch

from conftest import CLASSES, PROMPT_START_BLOCK, TINY_CFG
from guard.artifact import (CLASS_EMBEDDINGS_FILE, MANIFEST, PROMPTS_FILE, VISUAL_FILE, load_artifact,
                            read_manifest)
from guard.errors import ArtifactError, ChecksumError


def flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_manifest(directory, **changes):
    """Change manifest entries and recompute its own checksum the documented way
    (sha256 of the sorted, compact JSON without manifest_sha256), so that only the
    changed entries can be what makes loading fail."""
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.update(changes)
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    manifest["manifest_sha256"] = hashlib.sha256(canonical).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


# --- round trip ---------------------------------------------------------------------------

def test_round_trip_gives_back_every_tensor_and_record(tiny_artifact):
    artifact = load_artifact(tiny_artifact.path)
    expected_state = tiny_artifact.clip.visual.state_dict()
    assert artifact.vision_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(artifact.vision_state[name], tensor), name
    assert torch.equal(artifact.visual_prompts, tiny_artifact.visual_prompts)
    assert torch.equal(artifact.text_features, tiny_artifact.text_features)
    assert artifact.logit_scale == tiny_artifact.logit_scale
    assert artifact.prompt_start_block == PROMPT_START_BLOCK
    assert artifact.classes == CLASSES
    assert artifact.preprocess == tiny_artifact.preprocess
    assert artifact.model_cfg == TINY_CFG
    assert artifact.manifest["metrics"] == {"clean_accuracy": 0.75, "asr": 0.05}
    assert artifact.manifest["method"] == {"name": "rvpt", "hyperparameters": {"epochs": 2, "lr": 0.01}}
    assert artifact.manifest["templates"] == ["a photo of a {}."]
    assert sorted(artifact.manifest["files"]) == sorted([VISUAL_FILE, CLASS_EMBEDDINGS_FILE, PROMPTS_FILE])


def test_artifact_without_prompts_round_trips(tiny_artifact, tmp_path):
    path = tiny_artifact.save(tmp_path / "plain", visual_prompts=None, prompt_start_block=None)
    artifact = load_artifact(path)
    assert artifact.visual_prompts is None
    assert artifact.prompt_start_block is None
    assert artifact.manifest["visual_prompts"] is None
    assert not (path / PROMPTS_FILE).exists()
    assert torch.equal(artifact.text_features, tiny_artifact.text_features)
    assert artifact.vision_state.keys() == tiny_artifact.clip.visual.state_dict().keys()


def test_save_refuses_class_names_that_do_not_match_the_embeddings(tiny_artifact, tmp_path):
    with pytest.raises(ArtifactError, match="3 class names but 4"):
        tiny_artifact.save(tmp_path / "bad", classes=CLASSES[:3])


# --- damage -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [VISUAL_FILE, PROMPTS_FILE, CLASS_EMBEDDINGS_FILE])
def test_a_flipped_byte_in_a_tensor_file_is_a_checksum_error(artifact_copy, name):
    load_artifact(artifact_copy)  # intact: loads
    flip_byte(artifact_copy / name)
    with pytest.raises(ChecksumError, match=name):
        load_artifact(artifact_copy)


def test_a_changed_value_in_the_manifest_is_a_checksum_error(artifact_copy):
    text = (artifact_copy / MANIFEST).read_text()
    assert text.count('"airplane"') == 1
    (artifact_copy / MANIFEST).write_text(text.replace('"airplane"', '"airplanf"'))
    with pytest.raises(ChecksumError, match="modified"):
        load_artifact(artifact_copy)


def test_a_changed_file_checksum_in_the_manifest_is_caught(artifact_copy):
    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    recorded = manifest["files"][VISUAL_FILE]["sha256"]
    text = (artifact_copy / MANIFEST).read_text()
    flipped = ("1" if recorded[0] != "1" else "2") + recorded[1:]
    (artifact_copy / MANIFEST).write_text(text.replace(recorded, flipped))
    with pytest.raises(ChecksumError):
        load_artifact(artifact_copy)


def test_a_manifest_that_is_not_json_is_an_artifact_error(artifact_copy):
    flip_byte(artifact_copy / MANIFEST, offset=0)  # "{" -> "z"
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(artifact_copy)


@pytest.mark.parametrize("name", [VISUAL_FILE, PROMPTS_FILE, CLASS_EMBEDDINGS_FILE])
def test_a_missing_file_is_an_artifact_error(artifact_copy, name):
    (artifact_copy / name).unlink()
    with pytest.raises(ArtifactError, match=f"{name} is missing"):
        load_artifact(artifact_copy)


def test_a_newer_format_version_asks_to_upgrade(artifact_copy):
    rewrite_manifest(artifact_copy, format_version=1)
    load_artifact(artifact_copy)  # the rewrite alone is harmless
    rewrite_manifest(artifact_copy, format_version=99)
    with pytest.raises(ArtifactError, match="upgrade") as info:
        load_artifact(artifact_copy)
    assert "99" in str(info.value)
    assert not isinstance(info.value, ChecksumError)


def test_a_manifest_of_another_format_is_refused(artifact_copy):
    rewrite_manifest(artifact_copy, format="something/else")
    with pytest.raises(ArtifactError, match="not a clip-guard/purified manifest"):
        read_manifest(artifact_copy)


def test_paths_that_are_no_artifact(tiny_artifact, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"weights")
    for path in (empty, a_file, tmp_path / "does-not-exist", tiny_artifact.path / MANIFEST):
        with pytest.raises(ArtifactError, match="manifest.json is missing"):
            load_artifact(path)


def test_checksum_error_is_an_artifact_error_and_a_value_error(artifact_copy):
    assert issubclass(ChecksumError, ArtifactError) and issubclass(ChecksumError, ValueError)
    flip_byte(artifact_copy / VISUAL_FILE)
    with pytest.raises(ValueError):  # what a caller without clip-guard's types would catch
        load_artifact(artifact_copy)
