"""What every exporter shares: the model to compile, validation against the torch
reference and the parity tolerances. Their command lines use guard.console (exit codes:
2 bad input, 3 a missing dependency or an unusable artifact, 4 the export failed or
disagrees with the reference)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from guard.artifact import Artifact, load_artifact
from guard.errors import ExportError, InputError
from guard.folded import fold
from guard.preprocess import Preprocess
from guard.runtime import build_classifier

# Parity tolerance of each precision: the largest |logit difference| from the torch
# float32 reference, in units of the logit scale (i.e. on the cosine similarity).
# fp32: reordered float32 arithmetic; fp16: 10-bit mantissas through 12+ blocks;
# int8: dynamic weight quantisation, which can also move a close top-1.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "int8": 6e-2}
PRECISIONS = tuple(TOLERANCES)
FORMS = ("folded", "literal")


def serving_model(artifact_path: str | Path, form: str = "folded",
                  fused: bool = False) -> tuple[torch.nn.Module, Artifact]:
    """The artifact's classifier on the CPU in float32: folded (serving) or literal (training)
    form; fused: the folded form's attention through the clip_guard operator (cpp_ext)."""
    if form not in FORMS:
        raise InputError(f"form must be one of {FORMS}, got {form!r}")
    artifact = load_artifact(artifact_path)
    model = build_classifier(artifact, "cpu")
    return (fold(model, fused=fused) if form == "folded" else model), artifact


def validation_images(preprocess: Preprocess, count: int = 16, seed: int = 0) -> torch.Tensor:
    """Deterministic random pictures, preprocessed: [count, 3, S, S] float32."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(count, 3, preprocess.image_size, preprocess.image_size, generator=generator)
    # Smooth them so they look less like noise and more like the images a model sees.
    pixels = torch.nn.functional.avg_pool2d(pixels, 3, stride=1, padding=1)
    return preprocess.normalize(pixels)


@dataclass(frozen=True)
class Parity:
    """How a compiled model's outputs differ from the torch reference on the same images."""
    max_logit_diff: float       # in units of the logit scale
    top1_agreement: float       # fraction of images with the same top-1 class
    max_embedding_diff: float   # relative to the reference embedding's largest magnitude
    images: int

    def to_dict(self) -> dict:
        return {"max_logit_diff": self.max_logit_diff, "top1_agreement": self.top1_agreement,
                "max_embedding_diff": self.max_embedding_diff, "images": self.images}


def parity(reference: tuple[torch.Tensor, torch.Tensor], candidate: tuple[torch.Tensor, torch.Tensor],
           logit_scale: float) -> Parity:
    ref_logits, ref_embedding = (tensor.float() for tensor in reference)
    logits, embedding = (tensor.float() for tensor in candidate)
    return Parity(
        max_logit_diff=float((logits - ref_logits).abs().max() / logit_scale),
        top1_agreement=float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        max_embedding_diff=float((embedding - ref_embedding).abs().max() / ref_embedding.abs().max()),
        images=len(ref_logits))


def check_parity(result: Parity, precision: str, what: str) -> None:
    """Refuse a compiled model that disagrees with the reference beyond its tolerance."""
    tolerance = TOLERANCES[precision]
    if not result.max_logit_diff <= tolerance:  # also catches NaN
        raise ExportError(f"{what} differs from the torch reference by {result.max_logit_diff:.2e} "
                          f"(logit-scale units) on {result.images} validation images; the {precision} "
                          f"tolerance is {tolerance:.0e}")
