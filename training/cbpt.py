"""CBPT: class-wise backdoor prompt tuning (arXiv 2502.19269), CLIP kept frozen.

Every class j owns M learnable context vectors (training.text.ClassContext); the class
text embedding is the frozen text tower run on [SOS, V_1^j..V_M^j, class, '.', EOS].
Each training step first inverts a trigger for every image of the batch, then
updates the contexts so that the inverted trigger no longer changes the prediction.

Inner loop (trigger inversion), for image v with label y, with s the cosine and f
the frozen image tower:
    y'    = argmax_{k != y} s(f(v), t_k)            the most similar wrong class
    v_pos = the few-shot image of class y' whose embedding is farthest from f(v)
            ("closest" and "random" are the ablation's alternatives)
    L_CL(delta) = s(f(v+delta), f(v)) - s(f(v+delta), f(v_pos))
    delta = 0, then `inversion_steps` SGD steps of `inversion_lr`, each followed by
    the projection onto the l2 ball of radius `rho`.
Outer loss, with p(v; i) = softmax_i(logit_scale * s(f(v), t_i)):
    L_bn    = -log p(v; y) - a * log p(v+delta; y)
    L_adv   = -log(1 - p(v+delta; y'))
    L_align = p(v; y) * mean_i (p(v; i) - p(v+delta; i))^2
    L = bn_weight * L_bn + adv_weight * L_adv + align_weight * L_align (1, 0.4, 0.4),
    averaged over the batch; the first `warmup_epochs` use L_bn alone.

Choices where the paper is silent (all fields of CBPTConfig):
- Pixel scale of rho: delta lives on [0, 1] pixels at model resolution, before the
  mean/std normalisation (where triggers act, see guard.preprocess), and v + delta is
  clipped to [0, 1] so it stays an image. The l2 norm is over the whole image
  (3 x S x S values). rho = 6/255 is therefore tiny: one pixel channel moved by 6 grey
  levels, or all 3,072 values of a 32 px image by 0.04 levels each.
- The inner loop minimises the sum of the per-image L_CL, so each image's delta gets
  its own gradient whatever the batch size (a mean would shrink the step by 1/B).
- a = 1; the softmax temperature is the model's own logit scale (None) unless set.
- L_align's weight p(v; y) is a confidence weight and is detached: a gradient through
  it would reward lowering the clean confidence.
- y' and v_pos use the class embeddings of the current contexts (no gradient); the
  positive is searched among all few-shot images of class y'.
- Optimiser: CoOp's, which CBPT builds on: SGD, momentum 0.9, cosine decay per step.
- The context starts from the words "a photo of a" when they tokenise to exactly M
  tokens (M = 4: the untrained prompt is the zero-shot template), else N(0, 0.02).

Efficiency: with a frozen image tower f(v) and the positives' features do not change,
so the few-shot set is embedded once; each inner step runs one batched forward and
backward of the image tower on v + delta, and the outer step needs one more forward
of f(v + delta) (no gradient) plus the text tower on the C class prompts.
With trainable visual prompts (`train_joint`, RVPT + CBPT at once) the features are
recomputed, the positives' once per epoch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from guard import console
from guard.errors import InputError
from guard.preprocess import Preprocess
from guard.prompted import PromptedVisionEncoder, VisualPrompts
from .text import CONTEXT_POSITIONS, ClassContext, TextEncoder

from .configs import with_overrides
from .data import ImageDataset
from .rvpt import RVPTConfig, feature_repelling_loss

log = logging.getLogger(__name__)

POSITIVE_CHOICES = ("farthest", "closest", "random")


@dataclass(frozen=True)
class CBPTConfig:
    """CBPT's settings; the defaults are the paper's (see the module docstring for the
    choices it leaves open). Invalid values raise InputError."""
    num_context: int = 4
    position: str = "end"
    init_words: Optional[str] = "a photo of a"
    epochs: int = 20
    warmup_epochs: int = 5
    batch_size: int = 32
    lr: float = 2e-3
    momentum: float = 0.9
    bn_weight: float = 1.0
    adv_weight: float = 0.4
    align_weight: float = 0.4
    trigger_weight: float = 1.0  # a in L_bn
    logit_scale: Optional[float] = None  # softmax scale in p(v; i); None: the model's own
    positive: str = "farthest"
    rho: float = 6 / 255  # l2 radius of delta on [0, 1] pixels
    inversion_steps: int = 10
    inversion_lr: float = 0.1
    seed: int = 0

    def __post_init__(self):
        def need(condition: bool, message: str):
            if not condition:
                raise InputError(f"CBPT config: {message}")

        need(self.num_context >= 1, f"num_context must be at least 1, got {self.num_context}")
        need(self.position in CONTEXT_POSITIONS, f"position must be one of {CONTEXT_POSITIONS}, got {self.position!r}")
        need(self.positive in POSITIVE_CHOICES, f"positive must be one of {POSITIVE_CHOICES}, got {self.positive!r}")
        need(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        need(0 <= self.warmup_epochs <= self.epochs,
             f"warmup_epochs must lie in [0, epochs = {self.epochs}], got {self.warmup_epochs}")
        need(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        need(self.lr > 0 and self.inversion_lr > 0, f"learning rates must be positive, got lr {self.lr}, "
             f"inversion_lr {self.inversion_lr}")
        need(0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}")
        need(self.rho >= 0, f"rho must be non-negative, got {self.rho}")
        need(self.inversion_steps >= 0, f"inversion_steps must be non-negative, got {self.inversion_steps}")
        weights = {"bn_weight": self.bn_weight, "adv_weight": self.adv_weight,
                   "align_weight": self.align_weight, "trigger_weight": self.trigger_weight}
        need(all(w >= 0 and math.isfinite(w) for w in weights.values()),
             f"loss weights must be finite and non-negative, got {weights}")
        need(self.logit_scale is None or self.logit_scale > 0, f"logit_scale must be positive, got {self.logit_scale}")

    @classmethod
    def with_overrides(cls, **overrides) -> "CBPTConfig":
        """The defaults with every override that is not None; unknown names are an InputError."""
        return with_overrides(cls, "CBPT", overrides)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- pieces


def select_positives(features: torch.Tensor, wrong_class: torch.Tensor, shot_features: torch.Tensor,
                     shot_labels: torch.Tensor, mode: str = "farthest",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Index into the shots of the positive for each image: the shot of class
    wrong_class[n] whose embedding has the lowest ("farthest") or highest ("closest")
    cosine to features[n], or a uniformly drawn one ("random")."""
    if mode not in POSITIVE_CHOICES:
        raise InputError(f"positive must be one of {POSITIVE_CHOICES}, got {mode!r}")
    in_class = shot_labels.unsqueeze(0) == wrong_class.unsqueeze(1)  # [N, shots]
    if not in_class.any(dim=1).all():
        raise InputError("a most similar wrong class has no few-shot image; every class needs shots")
    if mode == "random":
        scores = torch.rand(in_class.shape, generator=generator).to(in_class.device)
    else:
        cosine = F.normalize(features.float(), dim=-1) @ F.normalize(shot_features.float(), dim=-1).T
        scores = -cosine if mode == "farthest" else cosine
    return scores.masked_fill(~in_class, -math.inf).argmax(dim=1)


def most_similar_wrong_class(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """y' = argmax over k != y of the logits (any monotone function of s(v, t_k))."""
    return logits.scatter(1, labels.unsqueeze(1), -math.inf).argmax(dim=1)


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Each delta[n] scaled down onto the l2 ball of `radius` if it lies outside."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (radius / norms).clamp(max=1.0)
    return delta * scale.view(-1, *([1] * (delta.ndim - 1)))


def contrastive_inversion_loss(perturbed: torch.Tensor, clean: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per image L_CL = s(f(v+delta), f(v)) - s(f(v+delta), f(v_pos)); [N] from [N, E] inputs."""
    return F.cosine_similarity(perturbed, clean, dim=-1) - F.cosine_similarity(perturbed, positive, dim=-1)


def invert_triggers(embed: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                    clean: torch.Tensor, positive: torch.Tensor, rho: float, steps: int,
                    lr: float) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Per-image deltas [N, 3, S, S] minimising L_CL by projected SGD, batched.

    embed: [0, 1] pixels -> image embeddings (normalisation included); pixels: [N, 3, S, S]
    in [0, 1]; clean, positive: [N, E] embeddings of v and v_pos (constants).
    Returns the deltas, the embeddings of v + delta (no gradient) and the mean L_CL
    before each step and after the last."""
    clean, positive = clean.detach(), positive.detach()
    delta = torch.zeros_like(pixels, requires_grad=True)
    trace = []
    for _ in range(steps):
        loss = contrastive_inversion_loss(embed((pixels + delta).clamp(0, 1)), clean, positive)
        trace.append(loss.mean().item())
        (grad,) = torch.autograd.grad(loss.sum(), delta)  # sum: every image its own step
        with torch.no_grad():
            delta = project_l2(delta - lr * grad, rho)
        delta.requires_grad_(True)
    delta = delta.detach()
    with torch.no_grad():
        perturbed = embed((pixels + delta).clamp(0, 1))
    trace.append(contrastive_inversion_loss(perturbed, clean, positive).mean().item())
    return delta, perturbed, trace


@dataclass(frozen=True)
class CBPTLosses:
    total: torch.Tensor
    bn: torch.Tensor
    adv: torch.Tensor
    align: torch.Tensor


def cbpt_losses(clean_logits: torch.Tensor, perturbed_logits: torch.Tensor, labels: torch.Tensor,
                wrong_class: torch.Tensor, config: CBPTConfig, warmup: bool) -> CBPTLosses:
    """The outer loss from scaled logits [N, C] of v and v + delta; batch means.
    In warm-up the total is bn_weight * L_bn alone (the other terms are still reported)."""
    log_p_clean = F.log_softmax(clean_logits.float(), dim=1)
    log_p_perturbed = F.log_softmax(perturbed_logits.float(), dim=1)
    p_clean, p_perturbed = log_p_clean.exp(), log_p_perturbed.exp()
    true = labels.unsqueeze(1)
    bn = -log_p_clean.gather(1, true).squeeze(1) - config.trigger_weight * log_p_perturbed.gather(1, true).squeeze(1)
    p_wrong = p_perturbed.gather(1, wrong_class.unsqueeze(1)).squeeze(1)
    adv = -torch.log1p(-p_wrong.clamp(max=1 - 1e-6))  # -log(1 - p), finite at p -> 1
    confidence = p_clean.gather(1, true).squeeze(1).detach()
    align = confidence * (p_clean - p_perturbed).pow(2).mean(dim=1)
    bn, adv, align = bn.mean(), adv.mean(), align.mean()
    total = config.bn_weight * bn
    if not warmup:
        total = total + config.adv_weight * adv + config.align_weight * align
    return CBPTLosses(total, bn, adv, align)


def context_text_features(text_encoder: TextEncoder, context: ClassContext) -> torch.Tensor:
    """Normalised class embeddings [C, E] of the current contexts (with gradient)."""
    return F.normalize(text_encoder.encode(*context()).float(), dim=-1)


# --------------------------------------------------------------------------- training


def _check_shots(shots: ImageDataset, context: ClassContext) -> None:
    classes = context.token_ids.shape[0]
    if len(shots) == 0 or len(shots.classes) != classes:
        raise InputError(f"the few-shot set has {len(shots.classes)} classes and {len(shots)} images; "
                         f"the prompts are for {classes} classes")
    counts = torch.bincount(shots.labels, minlength=classes)
    if (counts == 0).any():
        missing = [shots.classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
        raise InputError(f"CBPT needs few-shot images of every class; none of {missing}")


def train_cbpt(encoder: PromptedVisionEncoder, text_encoder: TextEncoder, tokenizer, classes,
               logit_scale: float, preprocess: Preprocess, shots: ImageDataset, config: CBPTConfig,
               visual_prompts: Optional[VisualPrompts] = None, progress: bool = False
               ) -> tuple[ClassContext, list[dict]]:
    """Learn the class contexts with the image tower (and `visual_prompts`, if given, as in
    RVPT-then-CBPT) frozen. Returns the contexts and per-epoch mean losses."""
    context, _, history = _train(encoder, text_encoder, tokenizer, classes, logit_scale, preprocess,
                                 shots, config, visual_prompts, None, progress)
    return context, history


def train_joint(encoder: PromptedVisionEncoder, text_encoder: TextEncoder, tokenizer, classes,
                logit_scale: float, preprocess: Preprocess, shots: ImageDataset, config: CBPTConfig,
                rvpt: RVPTConfig, progress: bool = False
                ) -> tuple[ClassContext, VisualPrompts, list[dict]]:
    """RVPT and CBPT at once: loss = CBPT's loss + rvpt.alpha * FR, both prompt sets
    trained by one SGD (two learning rates) for max(rvpt.epochs, config.epochs) epochs,
    the first config.warmup_epochs with L_bn + alpha * FR. L_bn's clean term is RVPT's
    CE (with the learned class embeddings), so CE is not added twice."""
    return _train(encoder, text_encoder, tokenizer, classes, logit_scale, preprocess, shots,
                  config, None, rvpt, progress)


def _train(encoder, text_encoder, tokenizer, classes, logit_scale, preprocess, shots, config,
           frozen_prompts, rvpt, progress):
    """The loop of train_cbpt (rvpt None: visual prompts fixed or absent, features cached)
    and of train_joint (rvpt given: new visual prompts trained with the contexts)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = text_encoder.tower.positional_embedding.device
    context = ClassContext(text_encoder, tokenizer, classes, config.num_context, config.position,
                           config.init_words).to(device)
    _check_shots(shots, context)
    scale = float(config.logit_scale or logit_scale)
    encoder.eval()
    text_encoder.eval()
    joint = rvpt is not None
    prompts = encoder.new_prompts(rvpt.start_block, rvpt.num_tokens).to(device) if joint else frozen_prompts
    groups = [{"params": [context.context], "lr": config.lr}]
    if joint:
        groups.append({"params": [prompts.tokens], "lr": rvpt.lr})
    epochs = max(config.epochs, rvpt.epochs) if joint else config.epochs
    steps_per_epoch = math.ceil(len(shots) / config.batch_size)
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return encoder(preprocess.normalize(pixels), prompts).embedding.float()

    pixels_all = preprocess.resize(shots.images).to(device)  # [0, 1] pixels, once
    labels_all = shots.labels.to(device)
    shot_features = None
    history = []
    for epoch in console.progress(range(epochs), desc="RVPT+CBPT" if joint else "CBPT", enabled=progress):
        warmup = epoch < config.warmup_epochs
        if shot_features is None or joint:  # a frozen tower needs them once; prompts in training, per epoch
            with torch.no_grad():
                shot_features = torch.cat([embed(pixels_all[i:i + 256]) for i in range(0, len(shots), 256)])
        order = torch.randperm(len(shots), generator=generator)
        totals = dict.fromkeys(("loss", "bn", "adv", "align", "fr", "cl_start", "cl_end"), 0.0)
        for start in range(0, len(shots), config.batch_size):
            index = order[start:start + config.batch_size].to(device)
            pixels, labels = pixels_all[index], labels_all[index]
            if joint:  # the prompted clean features carry the prompts' gradient
                prompted, frozen = encoder.forward_with_reference(preprocess.normalize(pixels), prompts)
                clean = prompted.embedding.float()
                fr = feature_repelling_loss(prompted.block_cls.float(), frozen.block_cls.float(), rvpt.margin)
            else:
                clean, fr = shot_features[index], torch.zeros((), device=device)
            text = context_text_features(text_encoder, context)
            with torch.no_grad():
                wrong = most_similar_wrong_class(F.normalize(clean.detach(), dim=-1) @ text.detach().T, labels)
                positive = shot_features[select_positives(clean.detach(), wrong, shot_features, labels_all,
                                                          config.positive, generator)]
            delta, perturbed, trace = invert_triggers(embed, pixels, clean, positive, config.rho,
                                                      config.inversion_steps, config.inversion_lr)
            if joint:  # with a frozen tower the inversion's last forward is f(v + delta) already
                perturbed = embed((pixels + delta).clamp(0, 1))
            losses = cbpt_losses(scale * F.normalize(clean, dim=-1) @ text.T,
                                 scale * F.normalize(perturbed, dim=-1) @ text.T, labels, wrong, config, warmup)
            loss = losses.total + rvpt.alpha * fr if joint else losses.total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            for key, value in (("loss", loss.item()), ("bn", losses.bn.item()), ("adv", losses.adv.item()),
                               ("align", losses.align.item()), ("fr", fr.item()),
                               ("cl_start", trace[0]), ("cl_end", trace[-1])):
                totals[key] += value / steps_per_epoch
        totals["warmup"] = warmup
        history.append(totals)
        log.debug("epoch %d: %s", epoch, totals)
    return context.eval(), prompts, history


@torch.no_grad()
def purified_text_features(text_encoder: TextEncoder, context: ClassContext) -> torch.Tensor:
    """The constant class embeddings [C, E] an artifact stores (serving never runs the text tower)."""
    return context_text_features(text_encoder, context).detach()
