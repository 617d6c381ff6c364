"""The sidecar manifest of a compiled model: `purified.onnx` travels with `purified.onnx.json`.

A compiled file (ONNX graph, TensorRT engine, AOTInductor package) holds only the
forward pass. Its sidecar says what that forward means: class names, preprocessing,
the artifact it was exported from, precision, and for engines the TensorRT version
and GPU they were built for. It records the compiled file's sha256 and its own, so
a damaged or swapped file is refused like a damaged artifact.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from . import __version__
from .errors import ArtifactError
from .manifest import Manifest
from .sealed import file_records, read_sealed, verify_files, write_sealed

FORMAT = "clip-guard/compiled"
FORMAT_VERSION = 1
CHECKSUM_KEY = "sidecar_sha256"
KINDS = ("onnx", "tensorrt", "aoti")
# Outputs every compiled graph provides, in this order.
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "embedding")


def sidecar_path(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def write_sidecar(model_path: str | Path, *, kind: str, source_manifest: Manifest | dict, source_path: str,
                  precision: str, details: dict, extra_files: tuple[str, ...] = ()) -> Path:
    """Describe the compiled file at model_path, which must already be written.

    source_manifest: the manifest of the purified artifact (or the sidecar of the ONNX
    graph an engine was built from); its classes, preprocessing and base model carry
    over (checked as a Manifest first). extra_files: names of files beside it that it needs
    (ONNX external data)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    source = source_manifest if isinstance(source_manifest, Manifest) else \
        Manifest.from_document(source_manifest, source_path)
    model_path = Path(model_path)
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clip_guard_version": __version__,
        "kind": kind,
        "file": model_path.name,
        "files": file_records(model_path.parent, (model_path.name, *extra_files)),
        "precision": precision,
        "input": INPUT_NAME,
        "outputs": list(OUTPUT_NAMES),
        "classes": list(source.classes),
        "preprocess": source.preprocess.to_dict(),
        "base_model": source.base_model,
        "method": source.method,
        "metrics": source.metrics,
        **_inherited_alert(source, precision),
        "source": {"path": str(source_path), "sha256": source.checksum},
        kind: details,
    }
    path = sidecar_path(model_path)
    write_sealed(path, sidecar, CHECKSUM_KEY)
    return path


def _inherited_alert(source: Manifest, precision: str) -> dict:
    """The source's alert entries. Its threshold carries over only where the scores do:
    fp32 matches the reference to ~1e-6; fp16 and int8 move them, so those start uncalibrated.
    An alert with the frozen-tower view or a statistic calibration fitted (the feature
    density, the input detector) does not carry over at all (a compiled graph has the prompts
    folded into every row and returns no class token, and its sidecar holds no fitted state):
    the compiled model starts with the uncalibrated default."""
    alert, calibration = source.alert, source.alert_calibration
    if alert is not None and alert.needs_torch_backend:
        alert, calibration = None, None
    elif alert is not None and precision != "fp32":
        alert, calibration = dataclasses.replace(alert, threshold=None), None
    return {"alert": None if alert is None else alert.to_dict(), "alert_calibration": calibration}


def read_sidecar(model_path: str | Path, kind: str) -> dict:
    """Read and check the sidecar of a compiled file (format, version, checksums)."""
    model_path = Path(model_path)
    path = sidecar_path(model_path)
    if not model_path.is_file():
        raise ArtifactError(f"{model_path} does not exist")
    if not path.is_file():
        raise ArtifactError(f"{model_path} has no sidecar manifest {path.name}; it must sit next to the "
                            "compiled file (re-run the export that made it)")
    sidecar = read_sealed(path, format=FORMAT, what="sidecar", format_version=FORMAT_VERSION,
                          checksum_key=CHECKSUM_KEY, remedy="re-run the export")
    if sidecar.get("kind") != kind:
        raise ArtifactError(f"{model_path} is a {sidecar.get('kind')!r} model, not {kind!r}")
    if sidecar.get("file") != model_path.name:
        raise ArtifactError(f"{path.name} describes {sidecar.get('file')!r}, not {model_path.name}: "
                            "a compiled file keeps the name it was exported under")
    verify_files(model_path.parent, sidecar["files"], path.name, "re-run the export")
    return sidecar
