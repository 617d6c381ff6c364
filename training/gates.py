"""The reference benchmark's gates: what a clean reference CLIP must show before any
defense is measured on it. They were fixed before a defense ran on the benchmark and
are never tuned on defense results.

- **class-irrelevant features**: perturbation resistivity (PR) at most 0.95 under
  Gaussian blur (kernel 5) and under colour jitter (a web-trained CLIP scores about
  0.82 and 0.83 there; a supervised ViT 0.975 and 0.946); PR under Gaussian noise
  0.03 is reported, not gated;
- **a text tower that reads its context**: a class-wise context learned on the
  defense's shots (CoOp-style, as CBPT learns its own) gives class embeddings with a
  mean cosine of at most 0.95 to the template's, so class-wise prompts have a lever.
  Random contexts are reported beside it, drawn two ways: as vectors with the spread of
  the token embeddings (a tower that reads words can ignore vectors unlike any word) and
  as random words of the corpus's captions;
- **a usable classifier**: zero-shot clean accuracy on the downstream test split at
  least 80 %;
- **a low floor**: for every attack of the suite, the never-poisoned model's ASR with
  that trigger at most 1 %, so that excess ASR (ASR minus this floor) stays readable.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .text import DEFAULT_TEMPLATES, ClassContext, TextEncoder, class_text_features

from .data import ImageDataset, few_shot
from .evaluate import model_outputs, perturbation_resistivity, zero_shot_classifier
from .perturbations import color_jitter, gaussian_blur, gaussian_noise

MAX_PR = 0.95  # blur 5 and colour jitter
MAX_CONTEXT_COSINE = 0.95
MIN_ZERO_SHOT_CA = 80.0
MAX_FLOOR = 1.0  # percent, every attack of the suite
GATED_PERTURBATIONS = ("blur_5", "color_jitter")
CONTEXT_TOKENS = 4  # CBPT's context length
CONTEXT_DRAWS = 8
CONTEXT_SHOTS = 16  # per class, from the downstream train split: what a defense gets
CONTEXT_STEPS = 100  # Adam, lr CONTEXT_LR, full batch of the shots
CONTEXT_LR = 1e-2


@dataclass(frozen=True)
class GateFigures:
    """What the gates read: PR per perturbation, the mean cosine to the template's class
    embeddings of a learned context's (`context_cosine`, gated) and of random contexts'
    (`random_contexts`: "vectors" and "words", reported), zero-shot CA (percent) and, per
    attack, the floor (the clean model's ASR with that attack's trigger, percent)."""
    pr: dict
    context_cosine: float
    zero_shot_ca: float
    floors: dict
    random_contexts: dict = field(default_factory=dict)

    def failures(self) -> list[str]:
        """The gates that do not hold, each as a sentence (empty when all hold)."""
        failed = [f"PR under {name} is {self.pr[name]:.3f} > {MAX_PR}" for name in GATED_PERTURBATIONS
                  if self.pr[name] > MAX_PR]
        if self.context_cosine > MAX_CONTEXT_COSINE:
            failed.append(f"a learned prompt context keeps cosine {self.context_cosine:.3f} > "
                          f"{MAX_CONTEXT_COSINE} to the template: the text tower ignores its context")
        if self.zero_shot_ca < MIN_ZERO_SHOT_CA:
            failed.append(f"zero-shot clean accuracy {self.zero_shot_ca:.2f} % < {MIN_ZERO_SHOT_CA} %")
        failed += [f"the floor of {attack} is {floor:.2f} % > {MAX_FLOOR} %"
                   for attack, floor in self.floors.items() if floor > MAX_FLOOR]
        return failed

    def to_dict(self) -> dict:
        return {**asdict(self), "failures": self.failures()}

    @classmethod
    def from_dict(cls, figures: Mapping) -> "GateFigures":
        """Figures written by to_dict (pretrain.json, gates.json); failures are recomputed."""
        return cls(**{key: value for key, value in figures.items() if key != "failures"})


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
def context_cosine(loaded, classes: Sequence[str], draws: int = CONTEXT_DRAWS, seed: int = 0,
                   vocabulary: Optional[Sequence[str]] = None) -> float:
    """Mean cosine between the class embeddings of random CONTEXT_TOKENS-token contexts and
    the template's. Without `vocabulary` the contexts are vectors drawn with the spread of
    the tower's token embeddings; with it, random words of `vocabulary`."""
    text_encoder = TextEncoder(loaded.model)
    template = class_text_features(text_encoder, loaded.tokenizer, classes, DEFAULT_TEMPLATES)
    table = text_encoder.tower.token_embedding.weight
    words = None if vocabulary is None else torch.tensor(sorted({ids[0] for ids in map(loaded.tokenizer.encode,
                                                                                           vocabulary)}))
    generator = torch.Generator().manual_seed(seed)
    cosines = []
    for _ in range(draws):
        context = ClassContext(text_encoder, loaded.tokenizer, classes, CONTEXT_TOKENS, init_words=None)
        shape = context.context.shape
        if words is None:
            context.context.copy_(table.std().item() * torch.randn(shape, generator=generator))
        else:
            context.context.copy_(table[words[torch.randint(len(words), shape[:2], generator=generator)]])
        cosines.append(_cosine_to(template, text_encoder, context))
    return sum(cosines) / len(cosines)


def learned_context_cosine(loaded, shots: ImageDataset, seed: int = 0) -> float:
    """Mean cosine to the template's class embeddings of a class-wise context learned on
    `shots` (cross-entropy of zero-shot logits, the image tower frozen; CoOp's objective
    and CBPT's warm-up), from a random start."""
    text_encoder = TextEncoder(loaded.model)
    template = class_text_features(text_encoder, loaded.tokenizer, shots.classes, DEFAULT_TEMPLATES)
    torch.manual_seed(seed)
    context = ClassContext(text_encoder, loaded.tokenizer, shots.classes, CONTEXT_TOKENS, init_words=None)
    with torch.no_grad():
        images = F.normalize(loaded.model.encode_image(loaded.preprocess(shots.images)).float(), dim=-1)
    scale = loaded.model.logit_scale.exp().item()
    optimizer = torch.optim.Adam(context.parameters(), lr=CONTEXT_LR)
    for _ in range(CONTEXT_STEPS):
        embeddings, token_ids = context()
        classes = F.normalize(text_encoder.encode(embeddings, token_ids).float(), dim=-1)
        loss = F.cross_entropy(scale * images @ classes.T, shots.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return _cosine_to(template, text_encoder, context)


def _cosine_to(template: torch.Tensor, text_encoder: TextEncoder, context: ClassContext) -> float:
    embeddings, token_ids = context()
    features = F.normalize(text_encoder.encode(embeddings, token_ids).float(), dim=-1)
    return (features * template).sum(-1).mean().item()


def measure_gates(loaded, test: ImageDataset, train: ImageDataset, floors: Optional[Mapping[str, float]] = None,
                  pr_images: int = 2000, seed: int = 0, vocabulary: Sequence[str] = (),
                  shots: int = CONTEXT_SHOTS) -> GateFigures:
    """Every gate's figure for the clean model `loaded` on the downstream task: CA and PR
    on the `test` split, the learned context on `shots` per class of `train`;
    `floors` (attack -> percent) come from evaluating the attacks' triggers on it;
    `vocabulary` gives the random word contexts (none: not measured)."""
    classifier = zero_shot_classifier(loaded, test.classes)
    logits, _ = model_outputs(classifier, loaded.preprocess, test.images)
    ca = 100.0 * (logits.argmax(1) == test.labels).float().mean().item()
    random_contexts = {"vectors": context_cosine(loaded, test.classes, seed=seed)}
    if vocabulary:
        random_contexts["words"] = context_cosine(loaded, test.classes, seed=seed, vocabulary=vocabulary)
    learned = learned_context_cosine(loaded, few_shot(train, shots, seed), seed)
    return GateFigures(resistivity(loaded, test, pr_images, seed), learned, ca, dict(floors or {}), random_contexts)


def format_gates(figures: GateFigures) -> str:
    """The gates as text: each figure beside its bound ("reported": not gated), then the verdict."""
    rows = [("zero-shot CA %", f"{figures.zero_shot_ca:.2f}", f">= {MIN_ZERO_SHOT_CA}")]
    rows += [(f"PR {name}", f"{value:.3f}", f"<= {MAX_PR}" if name in GATED_PERTURBATIONS else "reported")
             for name, value in figures.pr.items()]
    rows.append(("learned context cosine", f"{figures.context_cosine:.3f}", f"<= {MAX_CONTEXT_COSINE}"))
    rows += [(f"random {kind} context cosine", f"{value:.3f}", "reported")
             for kind, value in figures.random_contexts.items()]
    rows += [(f"floor {attack} %", f"{floor:.2f}", f"<= {MAX_FLOOR}") for attack, floor in figures.floors.items()]
    failures = figures.failures()
    verdict = "gates: all hold" if not failures else "gates FAIL: " + "; ".join(failures)
    return "\n".join([*(f"{label:<30}{value:>9}  {bound}" for label, value, bound in rows), verdict])
