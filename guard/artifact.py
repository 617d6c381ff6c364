"""The purified-model artifact: a directory with a manifest and safetensors files.

    manifest.json                  what the model is and how it was made (see save_artifact)
    visual.safetensors             the frozen image tower of the base model
    prompts.safetensors            learned RVPT prompts ("visual_prompts": [blocks, tokens, width])
    class_embeddings.safetensors   constant class text embeddings and the logit scale
    alert_*.safetensors            only when calibrated with an alert kind that fits something
                                   (guard.alert_kinds): its fitted_file, e.g.
                                   alert_density.safetensors (the feature density's class
                                   means and precision) or alert_detector.safetensors (the
                                   input detector's weights)

Every file's sha256 is in the manifest, and the manifest carries the sha256 of its
own canonical JSON, so a flipped byte anywhere is caught when the artifact loads.
The serving side needs no text tower, tokenizer or base checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import __version__
from .alert_kinds import DENSITY_FILE, DETECTOR_FILE, fitted_files  # noqa: F401 (the built-in kinds' files)
from .errors import ArtifactError
from .manifest import ARTIFACT_FORMAT
from .preprocess import Preprocess
from .sealed import file_records, read_sealed, verify_files, write_sealed

FORMAT = ARTIFACT_FORMAT
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHECKSUM_KEY = "manifest_sha256"
VISUAL_FILE = "visual.safetensors"
PROMPTS_FILE = "prompts.safetensors"
CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict
    vision_state: dict
    visual_prompts: Optional[torch.Tensor]
    text_features: torch.Tensor
    logit_scale: float
    alert_state: Optional[dict] = None  # the tensors of the recorded alert kind's fitted_file, if it has one

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest["classes"])

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.manifest["preprocess"])

    @property
    def model_cfg(self) -> dict:
        return self.manifest["base_model"]["model_cfg"]

    @property
    def prompt_start_block(self) -> Optional[int]:
        prompts = self.manifest.get("visual_prompts")
        return None if prompts is None else int(prompts["start_block"])


def save_artifact(out_dir: str | Path, *, base_model: dict, vision_state: dict,
                  visual_prompts: Optional[torch.Tensor], prompt_start_block: Optional[int],
                  text_features: torch.Tensor, logit_scale: float, classes, templates,
                  preprocess: Preprocess, method: str, hyperparameters: dict, metrics: dict) -> Path:
    """Write a purified model. `base_model` is the base model's identity (spec, sha256,
    quick_gelu, model_cfg); `vision_state` the image tower's state dict."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(classes) != text_features.shape[0]:
        raise ArtifactError(f"{len(classes)} class names but {text_features.shape[0]} class embeddings")
    save_file({k: v.detach().contiguous().cpu() for k, v in vision_state.items()}, out / VISUAL_FILE)
    save_file({"text_features": text_features.detach().float().contiguous().cpu(),
               "logit_scale": torch.tensor(float(logit_scale))}, out / CLASS_EMBEDDINGS_FILE)
    files = [VISUAL_FILE, CLASS_EMBEDDINGS_FILE]
    prompts_record = None
    if visual_prompts is not None:
        save_file({"visual_prompts": visual_prompts.detach().float().contiguous().cpu()}, out / PROMPTS_FILE)
        files.append(PROMPTS_FILE)
        prompts_record = {"start_block": int(prompt_start_block),
                          "num_blocks": int(visual_prompts.shape[0]),
                          "num_tokens": int(visual_prompts.shape[1])}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clip_guard_version": __version__,
        "base_model": base_model,
        "classes": list(classes),
        "templates": list(templates),
        "preprocess": preprocess.to_dict(),
        "visual_prompts": prompts_record,
        "method": {"name": method, "hyperparameters": hyperparameters},
        "metrics": metrics,
        "files": file_records(out, files),
    }
    write_sealed(out / MANIFEST, manifest, CHECKSUM_KEY)
    return out


def read_manifest(path: str | Path) -> dict:
    """Read and check manifest.json of an artifact directory (format, version, own checksum)."""
    directory = Path(path)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{directory} is not a clip-guard artifact: {MANIFEST} is missing "
                            "(make one with `python -m training.purify`)")
    return read_sealed(manifest_path, format=FORMAT, what="manifest", format_version=FORMAT_VERSION,
                       checksum_key=CHECKSUM_KEY, remedy="re-create the artifact or restore it from a copy")


def load_artifact(path: str | Path) -> Artifact:
    """Read an artifact, verifying the manifest and the sha256 of every file it lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(path)
    manifest = read_manifest(directory)
    verify_files(directory, manifest["files"], MANIFEST, "restore it or re-create the artifact")
    tensors = {}
    for name in manifest["files"]:
        file = directory / name
        try:
            tensors[name] = load_file(file)
        except SafetensorError as error:
            raise ArtifactError(f"{file} is not a readable safetensors file ({error})") from error
    for name in (VISUAL_FILE, CLASS_EMBEDDINGS_FILE):
        if name not in tensors:
            raise ArtifactError(f"{MANIFEST} of {directory} lists no {name}")
    if (manifest.get("visual_prompts") is None) != (PROMPTS_FILE not in tensors):
        raise ArtifactError(f"{MANIFEST} of {directory} disagrees with its files about visual prompts")
    embeddings = tensors[CLASS_EMBEDDINGS_FILE]
    prompts = tensors.get(PROMPTS_FILE, {}).get("visual_prompts")
    alert = manifest.get("alert")  # checked when the runtime reads it (guard.manifest.Manifest)
    alert_file = fitted_files().get(alert.get("statistic")) if isinstance(alert, dict) else None
    return Artifact(directory, manifest, tensors[VISUAL_FILE], prompts,
                    embeddings["text_features"], float(embeddings["logit_scale"]), tensors.get(alert_file))
