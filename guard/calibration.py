"""Calibrating the trigger alert: a threshold from clean images at a target false-alarm rate.

    record = calibrate("artifacts/purified", clean_images, fpr=0.01)

scores the clean images with the model's alert (guard.alerts), sets the threshold to the
(1 - fpr) quantile of their scores, and stores the alert config with the threshold and
the calibration statistics in the model's manifest (artifact directory) or sidecar
(compiled file), re-sealed. From then on every `classify` result says whether its input
alerts; before, results say "uncalibrated". `python -m guard calibrate` is the CLI.

The "density" statistic (artifact directories only) first fits the feature density
(guard.density) on every other clean image, labelled by `labels` where given (the CLI
passes a built-in data set's) or else by the model's own predictions (docs/detection.md
measured the difference as small), sets the threshold on the other images, and stores the
density in the artifact as DENSITY_FILE. The "detector" statistic (artifact directories only)
trains the input detector (guard.detector) on every other clean image against synthetic
triggers, sets the threshold on the other images, and stores its weights as DETECTOR_FILE.
"""
from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import __version__, artifact, sidecar
from .alerts import DENSITY, DETECTOR, FITTED_STATISTICS, FITTED_TYPES, AlertConfig, calibrate_threshold
from .density import ClassDensity
from .detector import DetectorConfig, InputDetector, train_detector
from .errors import InputError
from .runtime import load, model_kind
from .sealed import file_records, write_sealed


def calibrate(path: str | Path, images: Sequence, fpr: float = 0.01, *, data: str = "", backend: str = "auto",
              device=None, config: Optional[AlertConfig] = None, batch_size: int = 64,
              progress: Optional[Callable[[int, int], None]] = None, labels: Optional[Sequence[int]] = None,
              detector: DetectorConfig = DetectorConfig(),
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
    fitted, fit_images, fit_record = None, None, {}
    with load(path, backend=backend, device=device) as model:
        config = dataclasses.replace(config or model.alert_config, threshold=None)
        if config.statistic in FITTED_STATISTICS and len(images) < 2 * needed:
            raise InputError(f"calibrating the {config.statistic} at fpr {fpr} needs at least {2 * needed} clean "
                             f"images (half to fit it, half for the threshold), got {len(images)}")
        if config.statistic == DENSITY:
            # the image's rows are what a served density score reads: same class tokens, same scores
            logits, tokens = model.class_tokens(images, batch_size, config.uses_frozen_tower, progress)
            labels = _density_labels(labels, logits)
            # Fitted on every other image, thresholded on the rest: distances to a density fitted
            # on the same images are biased low (measured: 1.65 to 2.4 % clean alerts on new
            # images at an in-sample 1 % threshold; docs/detection.md).
            fitted = ClassDensity.fit(tokens[0::2], labels[0::2], len(model.classes))
            scores, fit_images = fitted.score(tokens[1::2]).double(), len(tokens[0::2])
        elif config.statistic == DETECTOR:  # fitted on every other image, as the density
            resized = model.resized(images, batch_size, progress)
            fitted = train_detector(resized[0::2], detector, training_progress)
            with torch.no_grad():
                scores = fitted(resized[1::2]).double()
            fit_images, fit_record = len(resized[0::2]), {"detector": detector.to_dict()}
        else:
            scores = model.alert_scores(images, batch_size, config, progress).double()
        measured_on = {"backend": model.backend, "device": str(model.device),
                       "precision": model.manifest.get("precision", "fp32")}
    threshold = calibrate_threshold(scores, fpr)
    record = {
        "fpr": fpr,
        "threshold": threshold,
        "images": len(scores),
        **({"fit_images": fit_images} if fit_images is not None else {}),
        **fit_record,
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
    store_alert(path, dataclasses.replace(config, threshold=threshold), record, fitted)
    return record


def _density_labels(labels: Optional[Sequence[int]], logits: torch.Tensor) -> torch.Tensor:
    if labels is None:
        predicted = logits.argmax(-1)
        missing = (torch.bincount(predicted, minlength=logits.shape[1]) == 0).nonzero().flatten().tolist()
        if missing:
            raise InputError(f"the model predicts none of the calibration images as classes {missing}; the feature "
                             "density needs clean images of every class: add some, or pass their labels")
        return predicted
    labels = torch.as_tensor(list(labels))
    if labels.shape != (len(logits),) or labels.is_floating_point():
        raise InputError(f"labels must be {len(logits)} class indices, one per image, got shape {tuple(labels.shape)}")
    return labels


def model_document(path: str | Path) -> tuple[dict, Path, str]:
    """(the checked manifest or sidecar of a model, its file, its checksum key)."""
    path = Path(path)
    kind = model_kind(path)[0]
    if kind == "artifact":
        return artifact.read_manifest(path), path / artifact.MANIFEST, artifact.CHECKSUM_KEY
    return sidecar.read_sidecar(path, kind), sidecar.sidecar_path(path), sidecar.CHECKSUM_KEY


def store_alert(path: str | Path, config: AlertConfig, calibration: Optional[dict],
                fitted: Optional[ClassDensity | InputDetector] = None) -> Path:
    """Write the alert config and its calibration record into the model's manifest or sidecar
    (checked first, then re-sealed and replaced atomically); returns the file written.
    fitted: what calibration fitted for a DENSITY or DETECTOR alert (a ClassDensity or an
    InputDetector), written into an artifact directory as the statistic's file of
    artifact.ALERT_FILES and listed with its checksum; an alert drops every other such file."""
    from safetensors.torch import save_file

    document, document_path, checksum_key = model_document(path)
    expected = FITTED_TYPES.get(config.statistic, type(None))
    if not isinstance(fitted, expected):
        raise InputError(f"the {config.statistic!r} alert statistic needs "
                         + (f"a fitted {expected.__name__}" if fitted is None else "nothing fitted")
                         + f", got {type(fitted).__name__}")
    directory = Path(path)
    is_artifact = model_kind(directory)[0] == "artifact"
    if fitted is not None and not is_artifact:
        raise InputError(f"{path} is compiled; the {config.statistic!r} statistic is served from artifact "
                         "directories only")
    kept = artifact.ALERT_FILES.get(config.statistic)
    if fitted is not None:
        save_file({name: tensor.cpu() for name, tensor in fitted.to_tensors().items()}, directory / kept)
        document["files"].update(file_records(directory, [kept]))
    dropped = [name for name in artifact.ALERT_FILES.values() if name != kept] if is_artifact else []
    for name in dropped:
        document["files"].pop(name, None)
    document["alert"] = config.to_dict()
    document["alert_calibration"] = calibration
    write_sealed(document_path, document, checksum_key)
    for name in dropped:
        (directory / name).unlink(missing_ok=True)  # no longer listed: nothing to verify it against
    return document_path
