"""The sidecar manifest of a compiled model: `purified.onnx` travels with `purified.onnx.json`.

A compiled file (ONNX graph, TensorRT engine, AOTInductor package) holds only the
forward pass. Its sidecar says what that forward means: class names, preprocessing,
the artifact it was exported from, precision, and for engines the TensorRT version
and GPU they were built for. It records the compiled file's sha256 and its own, so
a damaged or swapped file is refused like a damaged artifact.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .errors import ArtifactError, ChecksumError
from .hashing import sha256_bytes, sha256_file

FORMAT = "clip-guard/compiled"
FORMAT_VERSION = 1
KINDS = ("onnx", "tensorrt", "aoti")
# Outputs every compiled graph provides, in this order.
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "embedding")


def sidecar_path(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def _canonical(sidecar: dict) -> bytes:
    body = {key: value for key, value in sidecar.items() if key != "sidecar_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def write_sidecar(model_path: str | Path, *, kind: str, source_manifest: dict, source_path: str,
                  precision: str, details: dict, extra_files: tuple[str, ...] = ()) -> Path:
    """Describe the compiled file at model_path, which must already be written.

    source_manifest: the manifest of the purified artifact (or the sidecar of the ONNX
    graph an engine was built from); its classes, preprocessing and base model carry
    over. extra_files: names of files beside it that it needs (ONNX external data)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model_path = Path(model_path)
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clip_guard_version": __version__,
        "kind": kind,
        "file": model_path.name,
        "files": {name: {"sha256": sha256_file(model_path.parent / name),
                         "bytes": (model_path.parent / name).stat().st_size}
                  for name in (model_path.name, *extra_files)},
        "precision": precision,
        "input": INPUT_NAME,
        "outputs": list(OUTPUT_NAMES),
        "classes": list(source_manifest["classes"]),
        "preprocess": source_manifest["preprocess"],
        "base_model": source_manifest["base_model"],
        "method": source_manifest.get("method"),
        "metrics": source_manifest.get("metrics", {}),
        "source": {"path": str(source_path),
                   "sha256": source_manifest.get("manifest_sha256") or source_manifest.get("sidecar_sha256")},
        kind: details,
    }
    sidecar["sidecar_sha256"] = sha256_bytes(_canonical(sidecar))
    path = sidecar_path(model_path)
    path.write_text(json.dumps(sidecar, indent=2) + "\n")
    return path


def read_sidecar(model_path: str | Path, kind: str, verify_file: bool = True) -> dict:
    """Read and check the sidecar of a compiled file (format, version, checksums).

    verify_file=False skips hashing the compiled files (the sidecar's own checksum is
    still checked), for callers that only need the description."""
    model_path = Path(model_path)
    path = sidecar_path(model_path)
    if not model_path.is_file():
        raise ArtifactError(f"{model_path} does not exist")
    if not path.is_file():
        raise ArtifactError(f"{model_path} has no sidecar manifest {path.name}; it must sit next to the "
                            "compiled file (re-run the export that made it)")
    try:
        sidecar = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON ({error}); re-run the export") from error
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a {FORMAT} sidecar")
    if sidecar.get("sidecar_sha256") != sha256_bytes(_canonical(sidecar)):
        raise ChecksumError(f"{path} was modified after it was written; re-run the export")
    version = sidecar.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {version!r}; this clip-guard ({__version__}) reads "
                            f"up to {FORMAT_VERSION}: upgrade clip-guard")
    if sidecar.get("kind") != kind:
        raise ArtifactError(f"{model_path} is a {sidecar.get('kind')!r} model, not {kind!r}")
    if sidecar.get("file") != model_path.name:
        raise ArtifactError(f"{path.name} describes {sidecar.get('file')!r}, not {model_path.name}: "
                            "a compiled file keeps the name it was exported under")
    for name, record in sidecar["files"].items() if verify_file else ():
        file = model_path.parent / name
        if not file.is_file():
            raise ArtifactError(f"{file} is missing; {model_path.name} needs it")
        if sha256_file(file) != record["sha256"]:
            raise ChecksumError(f"{file} does not match the sha256 in {path.name}; the file is damaged "
                                "or was replaced: re-run the export")
    return sidecar
