"""RVPT: repulsive visual prompt tuning (arXiv 2412.20392), CLIP kept frozen.

Loss = CE(logit_scale * cos(prompted image embedding, class text embeddings), y)
     + alpha * FR, where FR = mean over prompted blocks and batch of
       max(cos(class token of the prompted encoder, class token of the frozen
       encoder at the same block), margin).
margin = -1 is full repulsion (the paper's default); alpha = 0 is plain VPT.

Extension (off by default, not in the paper): with unlearn_weight > 0 the loss adds
unlearn_weight * CE(prompted logits of the shots carrying a trigger inverted from the
shots themselves, y), training.inversion's Neural-Cleanse-style stand-in for the
unknown trigger; docs/reference-benchmark.md says why and what it measures. With
unlearn_refresh = R > 0 the trigger is re-inverted through the current prompts every R
epochs (training.inversion.refine_trigger) and every trigger found so far is unlearned:
once one way to the target is gone, the next cheapest is found and removed too. This
stops when the refined mask is no longer anomalously small, i.e. its L1 norm exceeds
unlearn_refresh_stop (1) x the median over all classes of the first inversion: from
there on the cheapest way to the target is as costly as the way to any class, and
unlearning it would fight the clean features. With unlearn_targets = "frozen" the
stamped shots learn the frozen model's predictions on the same shots without the
trigger (T^2 KL at distill_temperature) instead of their labels: what a purified model
should say of a stamped image is what the frozen one says of the clean image. With
distill_weight = K > 0 the loss also adds K * T^2 * KL(frozen || prompted) of the clean
shots' class probabilities at temperature T (Hinton et al.'s distillation
from the frozen model): its clean predictions carry more than the shots' labels, and
unlearning without them costs clean accuracy, the target class most
(docs/reference-benchmark.md). With distill_mixup = M > 0 it also distils the frozen
model's predictions on mixed pairs of clean shots (mixup, each shot blended with another
of its batch at a uniform random weight; the teacher runs on the same mixed image):
160 shots pin the prompted model to the frozen one at 160 points only, the mixtures
pin it between them (Beyer et al. 2022, "Knowledge distillation: a good teacher is
patient and consistent").
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from guard import console
from guard.errors import InputError
from guard.preprocess import Preprocess
from guard.prompted import PromptedCLIP, PromptedVisionEncoder, VisualPrompts, class_logits

from .configs import check_known
from .data import ImageDataset
from .evaluate import model_outputs
from .inversion import Inversion, refine_trigger

log = logging.getLogger(__name__)

# The paper's ViT-B/32 setting: the last 9 of 12 blocks prompted, 50 prompt tokens
# per block (for 49 image patches).
PAPER_PROMPTED_BLOCKS, PAPER_TOKENS, PAPER_PATCHES = 9, 50, 49
UNLEARN_TARGETS = ("labels", "frozen")


@dataclass(frozen=True)
class RVPTConfig:
    start_block: int
    num_tokens: int
    alpha: float = 2.0
    margin: float = -1.0
    epochs: int = 50
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    seed: int = 0
    unlearn_weight: float = 0.0  # 0: the paper's RVPT; > 0: also unlearn an inverted trigger
    unlearn_steps: int = 300  # steps of the trigger inversion
    unlearn_mask_weight: float = 0.01  # L1 weight of its mask
    unlearn_refresh: int = 0  # re-invert the trigger through the prompts every this many epochs (0: never)
    unlearn_refresh_steps: int = 10  # inversion steps per refresh
    unlearn_refresh_stop: float = 1.0  # stop refreshing once the mask's L1 exceeds this x the median of all classes
    unlearn_targets: str = "labels"  # what stamped shots learn: labels, or the frozen model's clean predictions
    distill_weight: float = 0.0  # > 0: also distil the frozen model's predictions on the clean shots
    distill_temperature: float = 2.0
    distill_mixup: float = 0.0  # > 0: also distil the frozen model's predictions on mixed pairs of clean shots

    def __post_init__(self) -> None:  # checked here so that a bad value fails before the inversion runs
        if self.unlearn_refresh < 0 or self.unlearn_refresh_steps < 1:
            raise InputError(f"unlearn_refresh must be >= 0 and unlearn_refresh_steps >= 1, got "
                             f"{self.unlearn_refresh}, {self.unlearn_refresh_steps}")
        if not self.unlearn_refresh_stop > 0:
            raise InputError(f"unlearn_refresh_stop must be > 0, got {self.unlearn_refresh_stop}")
        if self.unlearn_targets not in UNLEARN_TARGETS:
            raise InputError(f"unlearn_targets must be one of {', '.join(UNLEARN_TARGETS)}, "
                             f"got {self.unlearn_targets!r}")
        if not self.distill_weight >= 0 or not self.distill_temperature > 0:
            raise InputError(f"distill_weight must be >= 0 and distill_temperature > 0, got "
                             f"{self.distill_weight}, {self.distill_temperature}")
        if not self.distill_mixup >= 0:
            raise InputError(f"distill_mixup must be >= 0, got {self.distill_mixup}")

    @classmethod
    def for_encoder(cls, encoder: PromptedVisionEncoder, **overrides) -> "RVPTConfig":
        """The paper's defaults, scaled to the encoder: the last 9 blocks prompted (all
        of a smaller model: the paper's ablation finds about 6 prompted blocks counted
        from the output already optimal) and the same prompt-to-patch ratio (50 tokens
        for 49 patches). ViT-B/32 gets exactly J = 3, b = 50; the tiny reference CLIP
        (4 blocks, 16 patches) gets J = 0, b = 16. Optimiser settings stay the paper's."""
        check_known(cls, "RVPT", overrides)
        num_patches = encoder.visual.positional_embedding.shape[0] - 1
        defaults = cls(start_block=max(0, encoder.num_blocks - PAPER_PROMPTED_BLOCKS),
                       num_tokens=max(1, round(PAPER_TOKENS * num_patches / PAPER_PATCHES)))
        return replace(defaults, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


# The extension's settings, outside the paper: the `unlearn` defense's own (training/defenses/unlearn.py).
EXTENSION_FIELDS = ("unlearn_weight", "unlearn_steps", "unlearn_mask_weight", "unlearn_refresh",
                    "unlearn_refresh_steps", "unlearn_refresh_stop", "unlearn_targets", "distill_weight",
                    "distill_temperature", "distill_mixup")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch; the T^2
    keeps the gradient's scale independent of T (Hinton et al. 2015)."""
    return temperature ** 2 * F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                                       F.log_softmax(teacher_logits / temperature, dim=-1),
                                       reduction="batchmean", log_target=True)


def mix_pairs(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image blended with another image of the batch at a uniform random weight
    (mixup, Zhang et al. 2018); the partner order and weights come from `generator`."""
    partner = torch.randperm(len(images), generator=generator).to(images.device)
    weight = torch.rand(len(images), 1, 1, 1, generator=generator).to(images.device)
    return weight * images + (1 - weight) * images[partner]


def feature_repelling_loss(prompted_cls: torch.Tensor, frozen_cls: torch.Tensor, margin: float) -> torch.Tensor:
    """mean(max(cos(prompted, frozen), margin)) over blocks and batch; [N, K, D] inputs."""
    return F.cosine_similarity(prompted_cls, frozen_cls, dim=-1).clamp(min=margin).mean()


@torch.no_grad()
def repelling_cosine(encoder: PromptedVisionEncoder, prompts: VisualPrompts, preprocess: Preprocess,
                     images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean cosine between the prompted and the frozen class tokens at the prompted blocks
    on `images` [N, C, H, W] uint8: the FR term at margin -1 of trained prompts. Near 1 the
    prompts repel nothing; the paper drives it towards -1."""
    device = next(prompts.parameters()).device
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch = preprocess.normalize(preprocess.resize(images[start:start + batch_size]).to(device))
        prompted, frozen = encoder.forward_with_reference(batch, prompts)
        total += F.cosine_similarity(prompted.block_cls.float(), frozen.block_cls.float(), dim=-1).mean(-1).sum().item()
    return total / len(images)


def train_rvpt(encoder: PromptedVisionEncoder, text_features: torch.Tensor, logit_scale: float,
               preprocess: Preprocess, shots: ImageDataset, config: RVPTConfig,
               progress: bool = False, inversion: Optional[Inversion] = None
               ) -> tuple[VisualPrompts, list[dict]]:
    """Learn the prompts on the few-shot set. Returns them and per-epoch mean losses.
    SGD with momentum and cosine decay; bf16 autocast on CUDA, fp32 on CPU.
    `inversion` (training.inversion.invert_triggers) gives the trigger to unlearn when
    config.unlearn_weight > 0."""
    if config.unlearn_weight and inversion is None:
        raise InputError("unlearn_weight > 0 needs the trigger inversion (training.inversion.invert_triggers)")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = text_features.device
    prompts = encoder.new_prompts(config.start_block, config.num_tokens).to(device)
    text = F.normalize(text_features.float(), dim=-1)
    steps_per_epoch = math.ceil(len(shots) / config.batch_size)
    optimizer = torch.optim.SGD(prompts.parameters(), lr=config.lr, momentum=config.momentum)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    encoder.eval()  # frozen CLIP: no dropout, fixed norms
    history = []
    triggers = [inversion.trigger] if config.unlearn_weight else []  # every trigger unlearned so far
    # the distillation targets, the frozen model's logits of the clean shots, never change: computed once
    unlearn_frozen = bool(triggers) and config.unlearn_targets == "frozen"
    frozen_logits = (model_outputs(PromptedCLIP(encoder, text_features, logit_scale), preprocess, shots.images)[0]
                     if config.distill_weight or unlearn_frozen else None)
    refreshing = bool(config.unlearn_weight and config.unlearn_refresh)
    for epoch in console.progress(range(config.epochs), desc="RVPT" if config.alpha else "VPT", enabled=progress):
        if refreshing and epoch and epoch % config.unlearn_refresh == 0:
            refined, flip_rate = refine_trigger(encoder, prompts, text_features, logit_scale, preprocess, shots,
                                                triggers[-1], config.unlearn_refresh_steps,
                                                config.unlearn_mask_weight)
            mask_l1, limit = refined.mask.sum().item(), config.unlearn_refresh_stop * inversion.median_mask_l1
            refreshing = mask_l1 <= limit
            if refreshing:
                triggers.append(refined)
            log.info("epoch %d: refined trigger, mask L1 %.1f (limit %.1f), flips %.3f of the shots; %s", epoch,
                     mask_l1, limit, flip_rate, f"{len(triggers)} triggers" if refreshing else "stop refining")
        order = torch.randperm(len(shots), generator=generator)
        totals = {"loss": 0.0, "ce": 0.0, "fr": 0.0, "unlearn": 0.0, "distill": 0.0, "mixup": 0.0,
                  "triggers": len(triggers)}
        for start in range(0, len(shots), config.batch_size):
            index = order[start:start + config.batch_size]
            resized = preprocess.resize(shots.images[index]).to(device)
            images = preprocess.normalize(resized)
            labels = shots.labels[index].to(device)
            with autocast:
                fr = distill = unlearn = mixup = torch.zeros((), device=device)
                if config.alpha:
                    prompted, frozen = encoder.forward_with_reference(images, prompts)
                    fr = feature_repelling_loss(prompted.block_cls.float(), frozen.block_cls.float(), config.margin)
                else:  # plain VPT needs no frozen reference pass
                    prompted = encoder(images, prompts)
                logits = class_logits(prompted.embedding, text, logit_scale)
                ce = F.cross_entropy(logits, labels)
                teacher = frozen_logits[index].to(device) if frozen_logits is not None else None
                if config.distill_weight:
                    distill = distillation_loss(logits, teacher, config.distill_temperature)
                if triggers:  # the shots carrying each trigger, in one batch
                    stamped = torch.cat([trigger(resized) for trigger in triggers])
                    embedding = encoder(preprocess.normalize(stamped), prompts).embedding
                    stamped_logits = class_logits(embedding, text, logit_scale)
                    if unlearn_frozen:  # say of the stamped shot what the frozen model says of the clean one
                        unlearn = distillation_loss(stamped_logits, teacher.repeat(len(triggers), 1),
                                                    config.distill_temperature)
                    else:
                        unlearn = F.cross_entropy(stamped_logits, labels.repeat(len(triggers)))
                if config.distill_mixup:
                    mixed = preprocess.normalize(mix_pairs(resized, generator))
                    with torch.no_grad():  # the teacher sees the same mixed image
                        mixed_teacher = class_logits(encoder(mixed).embedding, text, logit_scale)
                    mixed_logits = class_logits(encoder(mixed, prompts).embedding, text, logit_scale)
                    mixup = distillation_loss(mixed_logits, mixed_teacher, config.distill_temperature)
                loss = (ce + config.alpha * fr + config.unlearn_weight * unlearn + config.distill_weight * distill
                        + config.distill_mixup * mixup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            for key, value in (("loss", loss), ("ce", ce), ("fr", fr), ("unlearn", unlearn), ("distill", distill),
                               ("mixup", mixup)):
                totals[key] += value.item() / steps_per_epoch
        history.append(totals)
        log.debug("epoch %d: %s", epoch, totals)
    return prompts.eval(), history
