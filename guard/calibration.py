"""Calibrating the trigger alert: a threshold from clean images at a target false-alarm rate.

    record = calibrate("artifacts/purified", clean_images, fpr=0.01)

scores the clean images with the model's alert (guard.alerts), sets the threshold to the
(1 - fpr) quantile of their scores, and stores the alert config with the threshold and
the calibration statistics in the model's manifest (artifact directory) or sidecar
(compiled file), re-sealed. From then on every `classify` result says whether its input
alerts; before, results say "uncalibrated". `python -m guard calibrate` is the CLI.

What happens to the images is the alert kind's business (guard.alert_kinds): most kinds
score them all; a kind that fits something (artifact directories only) fits it on every
other image and scores the rest. The "density" kind fits the feature density (guard.density),
labelled by `labels` where given (the CLI passes those of a labelled image folder) or else
by the model's own predictions (docs/detection.md measured the difference as small); the
"detector" kind trains the input detector (guard.detector) against synthetic triggers. What
was fitted goes into the artifact as the kind's `fitted_file`.
"""
from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import __version__, artifact, sidecar
from .alert_kinds import FitData, fitted_files, kind_of
from .alerts import DETECTOR, AlertConfig, calibrate_threshold
from .detector import DetectorConfig
from .errors import InputError
from .runtime import load, model_kind
from .sealed import file_records, write_sealed


def calibrate(path: str | Path, images: Sequence, fpr: float = 0.01, *, data: str = "", backend: str = "auto",
              device=None, config: Optional[AlertConfig] = None, batch_size: int = 64,
              progress: Optional[Callable[[int, int], None]] = None, labels: Optional[Sequence[int]] = None,
              detector: Optional[DetectorConfig] = None,
              training_progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Score clean `images` (anything Guard.classify takes), store the threshold; returns the
    calibration record. config: the alert to calibrate (default: the model's own perturbations
    and statistic). data: a description of the images for the record. progress(done, total)
    is called after every batch, training_progress(step, steps) after every epoch of
    training the detector. labels: the images' class indices, which the "density" statistic
    fits on (default: the model's predictions). The "density" and "detector" statistics fit
    on every other image and set the threshold on the others; detector: how the "detector"
    statistic trains. Nothing is written when any image fails."""
    path = Path(path)
    images = list(images)
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0.0 < fpr < 1.0:
        raise InputError(f"fpr must lie in (0, 1), got {fpr!r}")
    # Fewer than 1 / fpr images would put the threshold at the largest score, whatever fpr says.
    needed = math.ceil(1.0 / fpr)
    if len(images) < needed:
        raise InputError(f"calibrating at fpr {fpr} needs at least {needed} clean images, got {len(images)}")
    with load(path, backend=backend, device=device) as model:
        config = dataclasses.replace(config or model.alert_config, threshold=None)
        kind = kind_of(config.statistic)
        if kind.fitted_type is not None and len(images) < 2 * needed:
            raise InputError(f"calibrating the {config.statistic} at fpr {fpr} needs at least {2 * needed} clean "
                             f"images (half to fit it, half for the threshold), got {len(images)}")
        fit = kind(config).fit(FitData(model, images, labels, batch_size, progress, training_progress,
                                       {DETECTOR: detector or DetectorConfig()}))
        scores = fit.scores
        measured_on = {"backend": model.backend, "device": str(model.device),
                       "precision": model.manifest.get("precision", "fp32")}
    threshold = calibrate_threshold(scores, fpr)
    record = {
        "fpr": fpr,
        "threshold": threshold,
        "images": len(scores),
        **fit.record,
        "data": data,
        "clean_alert_rate": (scores > threshold).double().mean().item(),
        "scores": {"mean": scores.mean().item(), "std": scores.std().item() if len(scores) > 1 else 0.0,
                   "min": scores.min().item(), "median": scores.median().item(),
                   "p95": torch.quantile(scores, 0.95).item(), "p99": torch.quantile(scores, 0.99).item(),
                   "max": scores.max().item()},
        "measured_on": measured_on,
        "clip_guard_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    store_alert(path, dataclasses.replace(config, threshold=threshold), record, fit.alert.fitted)
    return record


def model_document(path: str | Path) -> tuple[dict, Path, str]:
    """(the checked manifest or sidecar of a model, its file, its checksum key)."""
    path = Path(path)
    kind = model_kind(path)[0]
    if kind == "artifact":
        return artifact.read_manifest(path), path / artifact.MANIFEST, artifact.CHECKSUM_KEY
    return sidecar.read_sidecar(path, kind), sidecar.sidecar_path(path), sidecar.CHECKSUM_KEY


def store_alert(path: str | Path, config: AlertConfig, calibration: Optional[dict], fitted=None) -> Path:
    """Write the alert config and its calibration record into the model's manifest or sidecar
    (checked first, then re-sealed and replaced atomically); returns the file written.
    fitted: what calibration fitted for the alert's kind (its fitted_type: a ClassDensity for
    "density", an InputDetector for "detector"), written into an artifact directory as the
    kind's fitted_file and listed with its checksum; an alert drops every other such file."""
    from safetensors.torch import save_file

    document, document_path, checksum_key = model_document(path)
    kind = kind_of(config.statistic)
    entry, tensors = kind(config, fitted).to_manifest()  # InputError when fitted is not what the kind fits
    directory = Path(path)
    is_artifact = model_kind(directory)[0] == "artifact"
    if tensors is not None and not is_artifact:
        raise InputError(f"{path} is compiled; the {config.statistic!r} statistic is served from artifact "
                         "directories only")
    kept = kind.fitted_file
    if tensors is not None:
        save_file({name: tensor.cpu() for name, tensor in tensors.items()}, directory / kept)
        document["files"].update(file_records(directory, [kept]))
    dropped = sorted(set(fitted_files().values()) - {kept}) if is_artifact else []
    for name in dropped:
        document["files"].pop(name, None)
    document["alert"] = entry
    document["alert_calibration"] = calibration
    write_sealed(document_path, document, checksum_key)
    for name in dropped:
        (directory / name).unlink(missing_ok=True)  # no longer listed: nothing to verify it against
    return document_path
