"""The reference benchmark's gates: what a clean reference CLIP must show before any
defense is measured on it. They were fixed before a defense ran on the benchmark and
are never tuned on defense results.

- **class-irrelevant features**: perturbation resistivity (PR) at most 0.95 under
  Gaussian blur (kernel 5) and under colour jitter (a web-trained CLIP scores about
  0.82 and 0.83 there; a supervised ViT 0.975 and 0.946); PR under Gaussian noise
  0.03 is reported, not gated;
- **a text tower that reads its context**: the class embeddings of random prompt
  contexts have a mean cosine of at most 0.95 to the template's (so class-wise
  prompts have a lever);
- **a usable classifier**: zero-shot clean accuracy on the downstream test split at
  least 80 %;
- **a low floor**: for every attack of the suite, the never-poisoned model's ASR with
  that trigger at most 1 %, so that excess ASR (ASR minus this floor) stays readable.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .text import DEFAULT_TEMPLATES, ClassContext, TextEncoder, class_text_features

from .data import ImageDataset
from .evaluate import model_outputs, perturbation_resistivity, zero_shot_classifier
from .perturbations import color_jitter, gaussian_blur, gaussian_noise

MAX_PR = 0.95  # blur 5 and colour jitter
MAX_CONTEXT_COSINE = 0.95
MIN_ZERO_SHOT_CA = 80.0
MAX_FLOOR = 1.0  # percent, every attack of the suite
GATED_PERTURBATIONS = ("blur_5", "color_jitter")
CONTEXT_TOKENS = 4  # CBPT's context length
CONTEXT_DRAWS = 8


@dataclass(frozen=True)
class GateFigures:
    """What the gates read: PR per perturbation, the mean cosine of random-context class
    embeddings to the template's, zero-shot CA (percent) and, per attack, the floor (the
    clean model's ASR with that attack's trigger, percent)."""
    pr: dict
    context_cosine: float
    zero_shot_ca: float
    floors: dict

    def failures(self) -> list[str]:
        """The gates that do not hold, each as a sentence (empty when all hold)."""
        failed = [f"PR under {name} is {self.pr[name]:.3f} > {MAX_PR}" for name in GATED_PERTURBATIONS
                  if self.pr[name] > MAX_PR]
        if self.context_cosine > MAX_CONTEXT_COSINE:
            failed.append(f"random prompt contexts keep cosine {self.context_cosine:.3f} > "
                          f"{MAX_CONTEXT_COSINE} to the template: the text tower ignores its context")
        if self.zero_shot_ca < MIN_ZERO_SHOT_CA:
            failed.append(f"zero-shot clean accuracy {self.zero_shot_ca:.2f} % < {MIN_ZERO_SHOT_CA} %")
        failed += [f"the floor of {attack} is {floor:.2f} % > {MAX_FLOOR} %"
                   for attack, floor in self.floors.items() if floor > MAX_FLOOR]
        return failed

    def to_dict(self) -> dict:
        return {**asdict(self), "failures": self.failures()}


def gate_perturbations(seed: int = 0) -> dict:
    return {"noise_0.03": gaussian_noise(0.03, seed), "blur_5": gaussian_blur(5),
            "color_jitter": color_jitter(0.4, seed)}


def resistivity(loaded, test: ImageDataset, images: int = 2000, seed: int = 0) -> dict:
    """PR of `loaded`'s zero-shot classifier under the gate's perturbations, on a seeded
    subset of `images` test images."""
    classifier = zero_shot_classifier(loaded, test.classes)
    subset = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:images]
    pixels = test.images[subset]
    clean = model_outputs(classifier, loaded.preprocess, pixels)
    return {name: perturbation_resistivity(clean, model_outputs(classifier, loaded.preprocess, pixels, perturb))
            for name, perturb in gate_perturbations(seed).items()}


@torch.no_grad()
def context_cosine(loaded, classes: Sequence[str], draws: int = CONTEXT_DRAWS, seed: int = 0) -> float:
    """Mean cosine between class embeddings of random CONTEXT_TOKENS-token contexts (drawn
    with the spread of the tower's own token embeddings) and the template's class embeddings."""
    text_encoder = TextEncoder(loaded.model)
    template = class_text_features(text_encoder, loaded.tokenizer, classes, DEFAULT_TEMPLATES)
    spread = text_encoder.tower.token_embedding.weight.std().item()
    generator = torch.Generator().manual_seed(seed)
    cosines = []
    for _ in range(draws):
        context = ClassContext(text_encoder, loaded.tokenizer, classes, CONTEXT_TOKENS, init_words=None)
        context.context.copy_(spread * torch.randn(context.context.shape, generator=generator))
        embeddings, token_ids = context()
        features = F.normalize(text_encoder.encode(embeddings, token_ids).float(), dim=-1)
        cosines.append((features * template).sum(-1).mean().item())
    return sum(cosines) / len(cosines)


def measure_gates(loaded, test: ImageDataset, floors: Optional[Mapping[str, float]] = None,
                  pr_images: int = 2000, seed: int = 0) -> GateFigures:
    """Every gate's figure for the clean model `loaded` on the downstream test split;
    `floors` (attack -> percent) come from evaluating the attacks' triggers on it."""
    classifier = zero_shot_classifier(loaded, test.classes)
    logits, _ = model_outputs(classifier, loaded.preprocess, test.images)
    ca = 100.0 * (logits.argmax(1) == test.labels).float().mean().item()
    return GateFigures(resistivity(loaded, test, pr_images, seed), context_cosine(loaded, test.classes, seed=seed),
                       ca, dict(floors or {}))
