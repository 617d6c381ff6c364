"""Baseline defenses of the evaluation report: a linear probe, FT and CleanCLIP.

(No defense and plain VPT need no code of their own: training/purify.py runs them.)

Linear probe: the image tower stays frozen; a linear head is trained on the few-shot
image embeddings with cross-entropy, SGD lr 0.01, momentum 0.9, batch 32, 40 epochs
(docs/methods.md). The head is a *cosine* classifier,
    logits = logit_scale * normalize(embedding) @ normalize(W).T,
with the model's own logit scale, fixed. That is exactly what PromptedCLIP computes
with W in place of the class text embeddings, so W is stored as the artifact's
`text_features` and every serving path (torch, ONNX, C++) runs the probe unchanged;
a head with a bias or without the normalisation could not be served that way.
W starts from a seeded normal N(0, 1/E): rows of norm about 1, so that the step size
means what it means for an ordinary linear head on unit-norm features (a cosine head's
angular step shrinks with 1/|W|^2). The learning rate decays by a cosine per step,
as in RVPT and CBPT. The few-shot images are embedded once (the encoder is frozen).

FT: contrastive fine-tuning of the whole CLIP (both towers and the logit scale) on the
few-shot images with class-name captions (training/contrastive.py's CAPTION_TEMPLATES
and multi-positive loss: every same-class image-caption pair is a positive), AdamW
with linear warm-up and cosine decay, the batch and step schedule of
`train_contrastive` (which drops the last partial batch of an epoch).

CleanCLIP (arXiv 2303.03323): FT plus an in-modality self-supervised term,
    loss = multimodal + self_supervised_weight * (image-image + text-text),
image-image: symmetric InfoNCE between two augmented views of each image (the two
    views of one image are the only positives: instance discrimination);
text-text: symmetric InfoNCE between two different caption templates of each image's
    class. Captions are per class here, so captions of the same class are positives
    (two images of one class can draw the identical caption, which cannot be a negative).
Both use the model's own (trained) logit scale, as CleanCLIP does. The multimodal term
sees the un-augmented images. Augmentations (`augment`) are torch ops on [0, 1] images
at model resolution: random resized crop (area 0.5 to 1, aspect 3/4 to 4/3), horizontal
flip, brightness and contrast jitter. They draw from a generator of their own, so with
self_supervised_weight = 0 the run is exactly FT, which is exactly `train_contrastive`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from guard import console
from guard.errors import InputError
from guard.preprocess import Preprocess
from guard.prompted import PromptedVisionEncoder

from .contrastive import (CAPTION_TEMPLATES, ContrastiveConfig, TemplatePairs, multi_positive_clip_loss,
                          train_contrastive)
from .configs import with_overrides
from .data import ImageDataset

log = logging.getLogger(__name__)


def _need(condition: bool, what: str, message: str) -> None:
    if not condition:
        raise InputError(f"{what} config: {message}")


@dataclass(frozen=True)
class LinearProbeConfig:
    """The linear probe's settings (docs/methods.md: SGD lr 0.01, momentum 0.9, batch 32,
    40 epochs). init_std None: 1/sqrt(E), rows of norm about 1."""
    epochs: int = 40
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    init_std: float | None = None
    seed: int = 0

    def __post_init__(self):
        _need(self.epochs >= 1, "linear probe", f"epochs must be at least 1, got {self.epochs}")
        _need(self.batch_size >= 1, "linear probe", f"batch_size must be at least 1, got {self.batch_size}")
        _need(self.lr > 0 and math.isfinite(self.lr), "linear probe", f"lr must be positive, got {self.lr}")
        _need(0 <= self.momentum < 1, "linear probe", f"momentum must lie in [0, 1), got {self.momentum}")
        _need(self.weight_decay >= 0, "linear probe", f"weight_decay must be non-negative, got {self.weight_decay}")
        _need(self.init_std is None or self.init_std > 0, "linear probe",
              f"init_std must be positive, got {self.init_std}")

    @classmethod
    def with_overrides(cls, **overrides) -> "LinearProbeConfig":
        return with_overrides(cls, "linear-probe", overrides)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneConfig:
    """FT's settings; self_supervised_weight > 0 makes it CleanCLIP (lambda; 1 in the
    paper). The defaults are CleanCLIP's lr and epochs (1e-5, 10), the setting that kept
    CA within a point on the reference benchmark (docs/baselines.md)."""
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    self_supervised_weight: float = 0.0
    min_crop_scale: float = 0.5  # augmentations of CleanCLIP's image-image term
    flip: bool = True
    jitter: float = 0.2
    seed: int = 0

    def __post_init__(self):
        _need(self.epochs >= 1, "FT", f"epochs must be at least 1, got {self.epochs}")
        _need(self.batch_size >= 1, "FT", f"batch_size must be at least 1, got {self.batch_size}")
        _need(self.lr > 0 and math.isfinite(self.lr), "FT", f"lr must be positive, got {self.lr}")
        _need(self.weight_decay >= 0, "FT", f"weight_decay must be non-negative, got {self.weight_decay}")
        _need(0 <= self.warmup_fraction <= 1, "FT", f"warmup_fraction must lie in [0, 1], got {self.warmup_fraction}")
        _need(self.self_supervised_weight >= 0 and math.isfinite(self.self_supervised_weight), "FT",
              f"self_supervised_weight must be finite and non-negative, got {self.self_supervised_weight}")
        _need(0 < self.min_crop_scale <= 1, "FT", f"min_crop_scale must lie in (0, 1], got {self.min_crop_scale}")
        _need(0 <= self.jitter < 1, "FT", f"jitter must lie in [0, 1), got {self.jitter}")

    @classmethod
    def with_overrides(cls, **overrides) -> "FinetuneConfig":
        return with_overrides(cls, "FT", overrides)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- linear probe


@torch.no_grad()
def embed_images(encoder: PromptedVisionEncoder, preprocess: Preprocess, images: torch.Tensor,
                 device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Unnormalised image embeddings [N, E] of uint8 images through the frozen tower."""
    encoder.eval()
    out = [encoder(preprocess(images[start:start + batch_size]).to(device)).embedding.float()
           for start in range(0, len(images), batch_size)]
    return torch.cat(out)


def cosine_logits(embeddings: torch.Tensor, weights: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """logit_scale * cos(embedding, W_c): PromptedCLIP's logits with W as class embeddings."""
    return logit_scale * F.normalize(embeddings, dim=-1) @ F.normalize(weights, dim=-1).T


def train_linear_probe(encoder: PromptedVisionEncoder, logit_scale: float, preprocess: Preprocess,
                       shots: ImageDataset, config: LinearProbeConfig, progress: bool = False,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[dict]]:
    """The head W [C, E] (store it as class embeddings) and per-epoch mean loss and
    few-shot accuracy (%). The encoder is not changed."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(config.seed)
    embeddings = embed_images(encoder, preprocess, shots.images, device)
    labels = shots.labels.to(device)
    num_classes, dim = len(shots.classes), embeddings.shape[1]
    std = config.init_std if config.init_std is not None else dim ** -0.5
    weights = (torch.randn(num_classes, dim, generator=generator) * std).to(device).requires_grad_(True)
    steps_per_epoch = math.ceil(len(shots) / config.batch_size)
    optimizer = torch.optim.SGD([weights], lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    history = []
    for epoch in console.progress(range(config.epochs), desc="linear probe", enabled=progress):
        order = torch.randperm(len(shots), generator=generator).to(device)
        totals = {"loss": 0.0, "accuracy": 0.0}
        for start in range(0, len(shots), config.batch_size):
            index = order[start:start + config.batch_size]
            logits = cosine_logits(embeddings[index], weights, logit_scale)
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            totals["loss"] += loss.item() / steps_per_epoch
            totals["accuracy"] += 100.0 * (logits.argmax(1) == labels[index]).sum().item() / len(shots)
        history.append(totals)
        log.debug("linear probe epoch %d: %s", epoch, totals)
    return weights.detach(), history


# --------------------------------------------------------------------------- FT and CleanCLIP


def augment(images: torch.Tensor, generator: torch.Generator, *, min_scale: float = 0.5,
            aspect: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, jitter: float = 0.2) -> torch.Tensor:
    """Random resized crop (area min_scale..1, aspect ratio in `aspect`, resized back to the
    same side), horizontal flip, brightness and contrast jitter of +-jitter; every image
    draws its own. uint8 [N, C, H, W] in, uint8 out; float in [0, 1] in, float in [0, 1] out."""
    if images.ndim != 4 or not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise InputError(f"augment needs uint8 or float images [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    n = len(pixels)
    draws = torch.rand(n, 7, generator=generator)  # one fixed draw order: reproducible per seed
    area = min_scale + (1 - min_scale) * draws[:, 0]
    low, high = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(low + (high - low) * draws[:, 1])
    width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    # affine_grid works in [-1, 1] coordinates: a crop of relative size w sits anywhere
    # with its centre in [-(1 - w), 1 - w]; a negative x scale mirrors it.
    centre_x, centre_y = (1 - width) * (2 * draws[:, 2] - 1), (1 - height) * (2 * draws[:, 3] - 1)
    mirror = torch.where(draws[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    zeros = torch.zeros(n)
    theta = torch.stack([torch.stack([width * mirror, zeros, centre_x], 1),
                         torch.stack([zeros, height, centre_y], 1)], 1).to(pixels.device)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = (1 + jitter * (2 * draws[:, 5] - 1)).view(n, 1, 1, 1).to(pixels.device)
    contrast = (1 + jitter * (2 * draws[:, 6] - 1)).view(n, 1, 1, 1).to(pixels.device)
    out = out * brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean).clamp(0, 1)
    return (out * 255).round().to(torch.uint8) if images.dtype == torch.uint8 else out


def finetune(clip: torch.nn.Module, tokenizer, preprocess: Preprocess, shots: ImageDataset,
             config: FinetuneConfig, progress: bool = False) -> list[dict]:
    """Fine-tune every parameter of `clip` in place (FT; CleanCLIP when
    config.self_supervised_weight > 0). Returns per-epoch mean losses ("loss",
    "multimodal", "image_ss", "text_ss"). The requires_grad flags are restored after."""
    # train_contrastive runs the loop, so weight 0 is it exactly (tests/test_baselines.py);
    # CleanCLIP's augmentations draw from a generator of their own for the same reason.
    weight = config.self_supervised_weight
    views = torch.Generator().manual_seed(config.seed + 1)
    caption_ids = TemplatePairs(shots, preprocess, tokenizer).caption_ids  # the captions the loop draws from
    in_modality = []  # (image_ss, text_ss) of every step

    def self_supervised(images, classes, templates, scale):
        image_ss, text_ss = _self_supervised_losses(clip, preprocess, images, classes, templates,
                                                    caption_ids.to(images.device), scale, views, config)
        in_modality.append((image_ss.item(), text_ss.item()))
        return weight * (image_ss + text_ss)

    was_trainable = [p.requires_grad for p in clip.parameters()]
    clip.requires_grad_(True)  # PromptedVisionEncoder and TextEncoder freeze their towers
    try:
        losses = train_contrastive(
            clip, tokenizer, preprocess, shots,
            ContrastiveConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                              weight_decay=config.weight_decay, warmup_fraction=config.warmup_fraction,
                              seed=config.seed),
            progress=progress, description="CleanCLIP" if weight else "FT",
            extra_loss=self_supervised if weight else None)
    finally:
        clip.eval()
        for parameter, trainable in zip(clip.parameters(), was_trainable):
            parameter.requires_grad_(trainable)
    steps_per_epoch = len(losses) // config.epochs
    history = []
    for epoch in range(config.epochs):
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        loss = sum(losses[step] for step in steps) / steps_per_epoch
        image_ss, text_ss = (sum(in_modality[step][term] for step in steps) / steps_per_epoch if in_modality
                             else 0.0 for term in (0, 1))
        history.append({"loss": loss, "multimodal": loss - weight * (image_ss + text_ss),
                        "image_ss": image_ss, "text_ss": text_ss})
    return history


def _self_supervised_losses(clip, preprocess: Preprocess, images: torch.Tensor, classes: torch.Tensor,
                            templates: torch.Tensor, caption_ids: torch.Tensor, scale: torch.Tensor,
                            views: torch.Generator, config: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """CleanCLIP's in-modality InfoNCE terms (image-image, text-text) of one batch."""
    n, num_templates = len(images), len(CAPTION_TEMPLATES)
    settings = dict(min_scale=config.min_crop_scale, flip=config.flip, jitter=config.jitter)
    pair = torch.cat([augment(images, views, **settings), augment(images, views, **settings)])
    first, second = clip.encode_image(preprocess.normalize(pair)).chunk(2)
    own = torch.arange(n, device=images.device)  # each image's two views, nothing else, are positives
    image_ss = multi_positive_clip_loss(first, second, own, own, scale)
    # A second template, always a different one, for every image's class.
    other = (templates + torch.randint(1, num_templates, (n,), generator=views)) % num_templates
    ids = torch.cat([classes * num_templates + templates, classes * num_templates + other])
    unique, inverse = torch.unique(ids, return_inverse=True)  # encode each caption once
    text = clip.encode_text(caption_ids[unique])[inverse.to(caption_ids.device)]
    labels = classes.to(text.device)
    text_ss = multi_positive_clip_loss(text[:n], text[n:], labels, labels, scale)
    return image_ss, text_ss
