"""Feature density: where an input's features lie relative to the clean classes.

A triggered input's features tend to sit away from every clean class, whatever the trigger
does to the outputs. `ClassDensity` fits class-conditional Gaussians with one shared,
shrunk covariance on clean features (the last block's class token,
`PromptedVisionEncoder.final_class_token`) and scores an input by its smallest squared
Mahalanobis distance to a class mean. guard serves it as the alert statistic "density"
(guard.alerts); docs/detection.md has the measurements.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError

# Covariance shrinkage towards (shrinkage x mean variance) x I; it also keeps the inverse
# stable for few images. Over 0.001 to 1 on the undefended zoo models (docs/detection.md)
# 0.1 is near the best for WaNet (AUROC 0.979) and costs SIG and Blended little.
DENSITY_SHRINKAGE = 0.1


@dataclass(frozen=True)
class ClassDensity:
    """Class-conditional Gaussians with one shared covariance (the model of linear
    discriminant analysis), fitted on clean labelled features [N, D]. score(x) is
    min_k (x - mean_k)^T precision (x - mean_k): far from every clean class = suspicious."""
    means: torch.Tensor  # [C, D], float64
    precision: torch.Tensor  # [D, D], float64: the inverse of the shrunk shared covariance

    def to_tensors(self) -> dict:
        return {"means": self.means.contiguous(), "precision": self.precision.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict) -> "ClassDensity":
        """The inverse of to_tensors (the artifact's density file); InputError when malformed."""
        means, precision = tensors.get("means"), tensors.get("precision")
        if not isinstance(means, torch.Tensor) or not isinstance(precision, torch.Tensor) or means.ndim != 2 \
                or tuple(precision.shape) != (means.shape[1], means.shape[1]):
            raise InputError("a feature density needs means [C, D] and a precision [D, D]")
        return cls(means.double(), precision.double())

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
            shrinkage: float = DENSITY_SHRINKAGE) -> "ClassDensity":
        if features.ndim != 2 or labels.shape != (len(features),):
            raise InputError(f"the feature density takes features [N, D] and labels [N], got "
                             f"{tuple(features.shape)} and {tuple(labels.shape)}")
        if not shrinkage > 0:
            raise InputError(f"the covariance shrinkage must be > 0, got {shrinkage}")
        if not torch.isfinite(features).all():
            raise InputError("the calibration features hold NaN or inf values")
        if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
            raise InputError(f"calibration labels must lie in [0, {num_classes}), got {labels.min().item()} to "
                             f"{labels.max().item()}")
        counts = torch.bincount(labels, minlength=num_classes)
        if (counts == 0).any():
            raise InputError(f"the feature density needs clean images of every class; classes "
                             f"{(counts == 0).nonzero().flatten().tolist()} have none")
        features = features.double()
        means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64).index_add_(0, labels, features)
        means /= counts[:, None]
        centred = features - means[labels]
        covariance = centred.T @ centred / len(features)
        scale = covariance.diagonal().mean()
        if not scale > 0:
            raise InputError("the calibration features do not vary; the feature density needs distinct images")
        covariance += shrinkage * scale * torch.eye(len(covariance), dtype=torch.float64)
        return cls(means, torch.linalg.inv(covariance))

    def score(self, features: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """[N] float32: the smallest squared Mahalanobis distance to a class mean."""
        if features.ndim != 2 or features.shape[1] != self.means.shape[1]:
            raise InputError(f"the feature density was fitted on {self.means.shape[1]}-dimensional features, "
                             f"got {tuple(features.shape)}")
        scores = [torch.empty(0, dtype=torch.float64)]
        for batch in features.double().split(batch_size):
            difference = batch[:, None, :] - self.means[None]  # [B, C, D]
            scores.append(torch.einsum("bcd,de,bce->bc", difference, self.precision, difference).min(1).values)
        return torch.cat(scores).float()
