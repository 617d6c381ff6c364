"""Universal trigger inversion on the few-shot set (Neural Cleanse, Wang et al. 2019).

RVPT as the paper specifies never sees a trigger. On small models whose backdoor is a
local pathway (docs/reference-benchmark.md) its repulsion cannot remove it without
destroying clean accuracy, while prompts trained to classify *triggered* shots
correctly can. This module finds a stand-in for the unknown trigger from the clean
shots alone, so RVPT can unlearn it (`RVPTConfig.unlearn_weight`).

For every class k, a mask m in [0, 1]^(S x S) and a pattern p in [0, 1]^(3 x S x S)
(sigmoid-parameterised; Adam) minimise

    CE(f((1 - m) x + m p), k) + mask_weight * |m|_1

over the shots not of class k, f the frozen model's zero-shot classifier. A backdoor
target needs an anomalously small mask: anomaly index_k = (median - |m_k|_1) / (1.4826
MAD) over the classes; the suspected target is the class with the largest index, a
backdoor being likely when it exceeds 2 (Neural Cleanse's threshold). All classes are
inverted in one batch per step.

`refine_trigger` goes on inverting one class's trigger through a *prompted* encoder: once
the prompts have unlearned a trigger, it finds the cheapest way to the target that is
left (RVPTConfig.unlearn_refresh).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from guard import console
from guard.errors import InputError
from guard.preprocess import Preprocess
from guard.prompted import PromptedVisionEncoder, VisualPrompts, class_logits

from .data import ImageDataset

log = logging.getLogger(__name__)

ANOMALY_THRESHOLD = 2.0  # Neural Cleanse: an index above 2 flags a backdoor target
MAD_TO_STD = 1.4826  # consistency constant of the median absolute deviation for normal data
INVERSION_LR = 0.1


@dataclass(frozen=True)
class InvertedTrigger:
    """x' = (1 - mask) x + mask * pattern on float images [N, 3, S, S] in [0, 1]."""
    target: int
    mask: torch.Tensor  # [1, 1, S, S] in [0, 1]
    pattern: torch.Tensor  # [1, 3, S, S] in [0, 1]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mask, pattern = self.mask.to(images), self.pattern.to(images)
        return (1 - mask) * images + mask * pattern


@dataclass(frozen=True)
class Inversion:
    """Per class: the inverted mask and pattern, the mask's L1 norm, the fraction of the
    other shots the trigger flips to the class, and its anomaly index."""
    masks: torch.Tensor  # [C, 1, S, S]
    patterns: torch.Tensor  # [C, 3, S, S]
    mask_l1: tuple[float, ...]
    flip_rate: tuple[float, ...]
    anomaly_index: tuple[float, ...]

    @property
    def suspected(self) -> int:
        """The class with the largest anomaly index: the likeliest backdoor target."""
        return max(range(len(self.anomaly_index)), key=self.anomaly_index.__getitem__)

    def trigger_of(self, target: int) -> InvertedTrigger:
        return InvertedTrigger(target, self.masks[target:target + 1], self.patterns[target:target + 1])

    @property
    def trigger(self) -> InvertedTrigger:
        return self.trigger_of(self.suspected)

    @property
    def median_mask_l1(self) -> float:
        """The typical cost of reaching a class: a target's mask above it is no longer anomalous."""
        return torch.tensor(self.mask_l1, dtype=torch.float64).median().item()

    @property
    def backdoor_likely(self) -> bool:
        return self.anomaly_index[self.suspected] > ANOMALY_THRESHOLD

    def to_dict(self, classes: tuple[str, ...] | list[str]) -> dict:
        return {"suspected_target": classes[self.suspected], "backdoor_likely": self.backdoor_likely,
                "threshold": ANOMALY_THRESHOLD,
                "classes": {name: {"mask_l1": round(l1, 4), "flip_rate": round(flip, 4),
                                   "anomaly_index": round(index, 4)}
                            for name, l1, flip, index in zip(classes, self.mask_l1, self.flip_rate,
                                                             self.anomaly_index)}}


def anomaly_indices(mask_l1: torch.Tensor) -> torch.Tensor:
    """(median - l1) / (1.4826 * MAD): large for classes with unusually small masks."""
    median = mask_l1.median()
    mad = MAD_TO_STD * (mask_l1 - median).abs().median()
    return (median - mask_l1) / mad.clamp_min(1e-12)


def _optimise_triggers(encoder: PromptedVisionEncoder, prompts: Optional[VisualPrompts], text_features: torch.Tensor,
                       logit_scale: float, preprocess: Preprocess, shots: ImageDataset, targets: list[int],
                       mask_logits: torch.Tensor, pattern_logits: torch.Tensor, steps: int, mask_weight: float,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam on the sigmoid-parameterised masks and patterns, one per entry of `targets`, each
    pushed onto the shots not of its class. Only the triggers are optimised: the prompts'
    gradients are left alone. Returns the masks, patterns and flip rates."""
    device = text_features.device
    images = preprocess.resize(shots.images).to(device)
    labels = shots.labels.to(device)
    # one row per (trigger, shot of another class)
    rows = [(t, index) for t, k in enumerate(targets) for index in (labels != k).nonzero().flatten().tolist()]
    row_trigger = torch.tensor([t for t, _ in rows], device=device)
    row_image = torch.tensor([index for _, index in rows], device=device)
    row_class = torch.tensor(targets, device=device)[row_trigger]
    rows_per_trigger = torch.bincount(row_trigger, minlength=len(targets)).float()
    optimizer = torch.optim.Adam([mask_logits, pattern_logits], lr=INVERSION_LR)
    text = F.normalize(text_features.float(), dim=-1)

    def stamped_logits() -> tuple[torch.Tensor, torch.Tensor]:
        mask, pattern = torch.sigmoid(mask_logits), torch.sigmoid(pattern_logits)
        stamped = (1 - mask[row_trigger]) * images[row_image] + mask[row_trigger] * pattern[row_trigger]
        return class_logits(encoder(preprocess.normalize(stamped), prompts).embedding, text, logit_scale), mask

    encoder.eval()
    for _ in console.progress(range(steps), desc="trigger inversion", enabled=progress):
        logits, mask = stamped_logits()
        # per trigger: mean CE over its rows, plus its mask's L1 norm
        per_row = F.cross_entropy(logits, row_class, reduction="none")
        ce = torch.zeros(len(targets), device=device).index_add(0, row_trigger, per_row) / rows_per_trigger
        loss = (ce + mask_weight * mask.flatten(1).sum(1)).sum()
        gradients = torch.autograd.grad(loss, [mask_logits, pattern_logits])
        mask_logits.grad, pattern_logits.grad = gradients
        optimizer.step()
    with torch.no_grad():
        logits, mask = stamped_logits()
        flips = torch.zeros(len(targets), device=device).index_add(
            0, row_trigger, (logits.argmax(-1) == row_class).float()) / rows_per_trigger
    return mask.detach().cpu(), torch.sigmoid(pattern_logits).detach().cpu(), flips.cpu()


def _check_shots(shots: ImageDataset, num_classes: int) -> None:
    counts = torch.bincount(shots.labels, minlength=num_classes)
    if (counts == 0).any() or (counts == len(shots)).any():
        raise InputError("trigger inversion needs shots of every class and of more than one class")


def invert_triggers(encoder: PromptedVisionEncoder, text_features: torch.Tensor, logit_scale: float,
                    preprocess: Preprocess, shots: ImageDataset, steps: int, mask_weight: float,
                    seed: int = 0, progress: bool = False) -> Inversion:
    """Invert a mask and pattern towards every class on the shots of the frozen model (see
    the module doc). All classes are inverted in one batch per step."""
    num_classes = text_features.shape[0]
    if steps < 1 or not mask_weight >= 0:
        raise InputError(f"inversion steps must be >= 1 and the mask weight >= 0, got {steps}, {mask_weight}")
    _check_shots(shots, num_classes)
    device = text_features.device
    side = preprocess.image_size
    generator = torch.Generator().manual_seed(seed)
    mask_logits = torch.full((num_classes, 1, side, side), -3.0, device=device, requires_grad=True)
    pattern_logits = (torch.rand(num_classes, 3, side, side, generator=generator) * 2 - 1).to(device)
    pattern_logits.requires_grad_(True)
    masks, patterns, flips = _optimise_triggers(encoder, None, text_features, logit_scale, preprocess, shots,
                                                list(range(num_classes)), mask_logits, pattern_logits, steps,
                                                mask_weight, progress)
    mask_l1 = masks.flatten(1).sum(1)
    inversion = Inversion(masks, patterns, tuple(mask_l1.tolist()), tuple(flips.tolist()),
                          tuple(anomaly_indices(mask_l1).tolist()))
    if not inversion.backdoor_likely:
        log.warning("trigger inversion: no class stands out (largest anomaly index %.2f <= %.1f); the model may "
                    "carry no patch-like backdoor", inversion.anomaly_index[inversion.suspected], ANOMALY_THRESHOLD)
    return inversion


def refine_trigger(encoder: PromptedVisionEncoder, prompts: VisualPrompts, text_features: torch.Tensor,
                   logit_scale: float, preprocess: Preprocess, shots: ImageDataset, trigger: InvertedTrigger,
                   steps: int, mask_weight: float) -> tuple[InvertedTrigger, float]:
    """Go on inverting `trigger` through the prompted encoder, starting from it: the cheapest
    way to the same target that is left once the prompts have unlearned the earlier ones.
    Returns the refined trigger and the fraction of the other shots it flips."""
    if steps < 1 or not mask_weight >= 0:
        raise InputError(f"refinement steps must be >= 1 and the mask weight >= 0, got {steps}, {mask_weight}")
    _check_shots(shots, text_features.shape[0])
    device = text_features.device

    def logits_of(probabilities: torch.Tensor) -> torch.Tensor:
        return torch.logit(probabilities.to(device).clamp(1e-4, 1 - 1e-4)).requires_grad_(True)

    masks, patterns, flips = _optimise_triggers(encoder, prompts, text_features, logit_scale, preprocess, shots,
                                                [trigger.target], logits_of(trigger.mask),
                                                logits_of(trigger.pattern), steps, mask_weight)
    return InvertedTrigger(trigger.target, masks, patterns), flips.item()
