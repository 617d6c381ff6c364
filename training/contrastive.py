"""Contrastive (CLIP-style) training on image-caption pairs built from class names.

Used to pretrain the reference CLIP, to poison a CLIP and to fine-tune one (FT,
CleanCLIP). A pair source gives each step's images and captions: `TemplatePairs`
captions a labelled data set with class-name templates, so one batch holds many
captions of the same class, and the loss treats every image-caption pair of the same
class as positive (uniform soft targets) instead of pretending that duplicate captions
are negatives; training.scenes.ScenePairs captions web scenes with their nuisances,
and a caption is a positive of every image it is true of. Each unique caption in a
batch is encoded once.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from guard import console
from guard.preprocess import Preprocess

from .data import ImageDataset

log = logging.getLogger(__name__)

CAPTION_TEMPLATES = (
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.",
    "a photo of the {}.", "a low resolution photo of a {}.",
    "a black and white photo of a {}.", "a photo of my {}.",
)
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of the learned temperature


# extra_loss(images, classes, templates, logit_scale) -> a scalar added to a step's loss
ExtraLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ContrastiveConfig:
    epochs: float = 1.0
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Poisoning:
    """Images at `indices` get `trigger` and a caption of class `target`. `hardened`
    (float [len(indices), 3, S, S] in [0, 1], optional) replaces those images, in the
    order of `indices`, before the trigger is applied (label-consistent poisoning)."""
    trigger: Callable[..., torch.Tensor]  # trigger(images, generator) -> images
    target: int
    indices: torch.Tensor
    hardened: Optional[torch.Tensor] = None


def poison_indices(num_images: int, rate: float, seed: int) -> torch.Tensor:
    """A seeded random `rate` fraction of the training images (at least one)."""
    count = max(1, round(rate * num_images))
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:count]


def multi_positive_clip_loss(image_features: torch.Tensor, caption_features: torch.Tensor,
                             image_classes: torch.Tensor, caption_classes: torch.Tensor,
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every same-class image-caption pair is a positive."""
    positives = image_classes[:, None] == caption_classes[None, :]
    return positive_set_clip_loss(image_features, caption_features, positives, logit_scale)


def positive_set_clip_loss(image_features: torch.Tensor, caption_features: torch.Tensor,
                           positives: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with uniform soft targets over the positives (bool [images,
    captions]; every row and column needs one)."""
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(caption_features, dim=-1).T
    positives = positives.float()
    image_loss = -(positives / positives.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    caption_loss = -(positives.T / positives.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (image_loss + caption_loss) / 2


@dataclass(frozen=True)
class Captions:
    """A batch's unique captions (token ids [U, L]) and which of them are true of which
    image (positives, bool [B, U]). `templates` (template pairs only) is each image's
    template draw."""
    token_ids: torch.Tensor
    positives: torch.Tensor
    templates: Optional[torch.Tensor] = None


class TemplatePairs:
    """Image-caption pairs of a labelled data set: each image's caption is a template of
    CAPTION_TEMPLATES filled with its class name; every caption of the same class is a
    positive of the image (duplicates are not negatives)."""

    def __init__(self, dataset: ImageDataset, preprocess: Preprocess, tokenizer):
        self.dataset, self.preprocess = dataset, preprocess
        self.labels, self.classes = dataset.labels, dataset.classes
        self.caption_ids = tokenizer([t.format(name) for name in dataset.classes for t in CAPTION_TEMPLATES])

    def __len__(self) -> int:
        return len(self.dataset)

    def images(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, None]:
        return self.preprocess.resize(self.dataset.images[index]), None

    def captions(self, drawn, classes: torch.Tensor, generator: torch.Generator) -> Captions:
        num_templates = len(CAPTION_TEMPLATES)
        templates = torch.randint(0, num_templates, (len(classes),), generator=generator)
        captions = torch.unique(classes * num_templates + templates)
        positives = classes[:, None] == (captions // num_templates)[None, :]
        return Captions(self.caption_ids[captions], positives, templates)


def train_contrastive(clip: torch.nn.Module, tokenizer, preprocess: Preprocess, dataset,
                      config: ContrastiveConfig, poisoning: Optional[Poisoning] = None,
                      progress: bool = False, description: str = "contrastive",
                      extra_loss: Optional[ExtraLoss] = None) -> list[float]:
    """Train every parameter of `clip` that requires a gradient, in place (AdamW, linear
    warm-up, cosine decay), on `dataset`: an ImageDataset (captioned by `TemplatePairs`)
    or any pair source with the same methods (training.scenes.ScenePairs).
    `extra_loss(images, classes, templates, logit_scale)` adds a term to each step's loss
    (images: the batch at model resolution in [0, 1], before normalisation; classes and
    templates: each image's caption draw). Returns the loss of every step. Deterministic
    for a fixed config and thread count."""
    pairs = TemplatePairs(dataset, preprocess, tokenizer) if isinstance(dataset, ImageDataset) else dataset
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    is_poisoned = torch.zeros(len(pairs), dtype=torch.bool)
    hardened_row = torch.full((len(pairs),), -1, dtype=torch.long)  # pair index -> row of `hardened`
    if poisoning is not None:
        is_poisoned[poisoning.indices] = True
        hardened_row[poisoning.indices] = torch.arange(len(poisoning.indices))
    steps_per_epoch = max(1, len(pairs) // config.batch_size)
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    warmup = max(1, round(config.warmup_fraction * total_steps))
    device = clip.logit_scale.device  # data is prepared on the CPU and moved per batch
    parameters = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / total_steps))))
    clip.train()
    losses = []
    order = torch.randperm(len(pairs), generator=generator)
    for step in console.progress(range(total_steps), desc=description, enabled=progress):
        offset = (step % steps_per_epoch) * config.batch_size
        if step > 0 and offset == 0:
            order = torch.randperm(len(pairs), generator=generator)
        index = order[offset:offset + config.batch_size]
        images, drawn = pairs.images(index, generator)
        classes = pairs.labels[index].clone()
        poisoned = is_poisoned[index]
        if poisoned.any():
            if poisoning.hardened is not None:
                images[poisoned] = poisoning.hardened[hardened_row[index[poisoned]]]
            images[poisoned] = poisoning.trigger(images[poisoned], generator)
            classes[poisoned] = poisoning.target
        captions = pairs.captions(drawn, classes, generator)
        images = images.to(device)
        image_features = clip.encode_image(preprocess.normalize(images))
        caption_features = clip.encode_text(captions.token_ids.to(device))
        scale = clip.logit_scale.exp()
        loss = positive_set_clip_loss(image_features, caption_features, captions.positives.to(device), scale)
        if extra_loss is not None:
            loss = loss + extra_loss(images, classes, captions.templates, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        losses.append(loss.item())
        if step % 50 == 0:
            log.debug("%s step %d/%d loss %.4f", description, step, total_steps, losses[-1])
    clip.eval()
    return losses
