"""How well the per-input trigger alert (guard.alerts) tells triggered from clean images.

    python -m training.detection --model M --attack BACKDOORED_DIR [--images N] [--json OUT] [--plot OUT.png]

M is a purified artifact or a CLIP directory (as for training.evaluate); BACKDOORED_DIR holds
the trigger and target (trigger.json) to apply. Clean set: N seeded test images. Triggered
set: the same images with the trigger, those of the target class left out. For every
candidate alert (statistic x perturbations), STRIP (Gao et al. 2019) with the same number
of extra forward passes, and an adaptive attacker, it reports AUROC and the TPR at 1 % and
5 % FPR, the threshold being that quantile of the clean scores. "hit" columns count only
the triggered images the model classifies as the target (those the alert must catch).

Adaptive attacker (white-box, knows the alert): the trigger's own tensors (a patch's or a
blend's pixels, a warp field; within the original's bounds) are optimised on training
images for cross-entropy towards the target plus `weight` x the mean alert score over
the alert's own perturbations (they are deterministic, so the expectation over the
family is this mean). "evade" is the fraction of triggered non-target images that reach
the target and are not flagged at 1 % FPR.

A purified artifact also gets a second signal: how far its outputs are from those of the
frozen tower it was purified from: guard's alert view 'frozen' alone, and added to the
default alert's views (`FROZEN_TOWER_SIGNALS`).

Feature density (`ClassDensity`, no perturbation): class-conditional Gaussians with one
shared, shrunk covariance, fitted on the last block's class token of clean labelled
training images; the score is the smallest squared Mahalanobis distance to a class mean.
It is measured on the served tower and, for a purified artifact, on its frozen tower.

Input detector (guard.detector, no perturbation): a small CNN trained on the same clean
training images against copies carrying synthetic triggers of the families given (never
the attack's own trigger); it reads the input, not the model.
"""
from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from guard import console
from guard.alert_kinds import alert_of, alert_rows
from guard.alerts import AlertConfig, calibrate_threshold, density_alert, density_rows
from guard.density import ClassDensity
from guard.detector import FAMILIES, DetectorConfig, InputDetector, train_detector
from guard.errors import InputError
from guard.preprocess import Preprocess
from guard.prompted import PromptedCLIP

from .attacks import Backdoor, Trigger, load_trigger
from .data import DATA_HELP, load_dataset
from .plots import save_figure

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
DEFAULT = AlertConfig()


def _cfg(statistic: str, *perturbations: str) -> AlertConfig:
    return AlertConfig(perturbations, statistic)


# The alerts compared; docs/detection.md has the measured table.
CANDIDATES: tuple[AlertConfig, ...] = (
    DEFAULT,
    _cfg("pr", "open:3", "median:3"),
    _cfg("pr_abs", "open:3", "median:3"),
    _cfg("feature", "open:3", "median:3"),
    _cfg("logit", "open:3", "median:3"),
    _cfg("kl", "open:3", "median:3"),
    _cfg("pr", "open:3", "median:3", "hflip", "downup:3"),
    _cfg("pr_terms", "open:3", "median:3", "hflip", "downup:3"),
    _cfg("pr_terms", "open:3"),
    _cfg("pr_terms", "median:3"),
    _cfg("pr_terms", "blur:5"),
    _cfg("pr_terms", "downup:2"),
    _cfg("pr_terms", "close:3"),
    _cfg("pr_terms", "hflip"),
    _cfg("pr_terms", "quant:4"),
    _cfg("pr_terms", "noise:0.1"),
    _cfg("pr", "noise:0.03"),
    _cfg("pr", "blur:5"),
)


# For purified artifacts: how far the prompted model's outputs are from its frozen tower's,
# where a trigger the purification removed still fires (guard's alert view 'frozen').
FROZEN_TOWER_SIGNALS = {
    "disagreement": AlertConfig((), frozen_tower=True),
    "pr_terms[open3,median3]+frozen tower": AlertConfig(DEFAULT.perturbations, frozen_tower=True),
}


def config_name(config: AlertConfig) -> str:
    return f"{config.statistic}[{','.join(p.replace(':', '') for p in config.views)}]"


def parse_alert(spec: str) -> AlertConfig:
    """'STATISTIC=P1+P2+...' (as --adaptive-alert takes it) -> AlertConfig."""
    statistic, sep, perturbations = spec.partition("=")
    if not sep or not perturbations:
        raise InputError(f"an alert is written STATISTIC=P1+P2, e.g. pr_terms=open:3+median:3; got {spec!r}")
    return AlertConfig(tuple(perturbations.split("+")), statistic)


# --- metrics ---------------------------------------------------------------------------

def auroc(clean: torch.Tensor, triggered: torch.Tensor) -> float:
    """P(triggered score > clean score) + P(tie) / 2 (the Mann-Whitney form of the ROC area)."""
    clean, triggered = clean.double().flatten(), triggered.double().flatten()
    if not len(clean) or not len(triggered):
        return float("nan")
    ordered = clean.sort().values
    below = torch.searchsorted(ordered, triggered, right=False)
    not_above = torch.searchsorted(ordered, triggered, right=True)
    return ((below + not_above).double().sum() / (2.0 * len(clean) * len(triggered))).item()


def detection_metrics(clean: torch.Tensor, triggered: torch.Tensor) -> dict:
    """AUROC and, at 1 % and 5 % FPR, the threshold (clean quantile) and TPR, as fractions."""
    result = {"auroc": auroc(clean, triggered), "n_clean": len(clean), "n_triggered": len(triggered)}
    for fpr, tag in ((0.01, "1"), (0.05, "5")):
        threshold = calibrate_threshold(clean, fpr)
        result[f"threshold@{tag}"] = threshold
        result[f"tpr@{tag}"] = (triggered > threshold).double().mean().item() if len(triggered) else float("nan")
    return result


# --- scores ----------------------------------------------------------------------------

def _runner(model: Forward):
    """The model as guard.alert_kinds.alert_rows runs it: a model that serves no frozen tower
    or class token (a plain forward) is called with the images alone."""
    def run(images: torch.Tensor, frozen_rows: int, class_token: bool) -> tuple:
        return model(images, frozen_rows, class_token) if frozen_rows or class_token else model(images)
    return run


def alert_scores_of(forward: Forward, preprocess: Preprocess, images: torch.Tensor, config: AlertConfig,
                    batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [N], logits [N, C] of the unperturbed images) for resized images [N, 3, S, S],
    one forward call of N * (1 + K) rows per batch, as serving runs it (the guard's
    alert_rows and the alert kind's score)."""
    scores, logits = [], []
    alert = alert_of(config)
    with torch.no_grad():
        for batch in images.split(batch_size):
            rows = alert_rows(_runner(forward), preprocess, batch, config)
            scores.append(alert.score(rows))
            logits.append(rows.logits[:len(batch)].float())
    return torch.cat(scores), torch.cat(logits)


def strip_scores(forward: Forward, preprocess: Preprocess, images: torch.Tensor, overlays: torch.Tensor,
                 batch_size: int = 256) -> torch.Tensor:
    """STRIP: minus the mean prediction entropy over 0.5 x image + 0.5 x overlay for each
    overlay (resized clean held-out images); higher = lower entropy = more suspicious."""
    scores = []
    with torch.no_grad():
        for batch in images.split(batch_size):
            blended = torch.cat([0.5 * batch + 0.5 * overlay for overlay in overlays])
            logits, _ = forward(preprocess.normalize(blended))
            logp = logits.float().log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1).view(len(overlays), len(batch))
            scores.append(-entropy.mean(0))
    return torch.cat(scores)


# --- feature density ---------------------------------------------------------------------

def density_outputs(model: PromptedCLIP, preprocess: Preprocess, images: torch.Tensor, frozen: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the served model's logits [N, C], the class tokens [N, D] the density reads) of resized
    images, in one forward call as guard serves them (Guard.class_tokens); differentiable in
    the images."""
    config = density_alert(frozen)
    rows = alert_rows(_runner(model), preprocess, images, config, class_token=True)
    return rows.logits[:len(images)].float(), density_rows(rows.class_token, len(images), config).float()


def _batched_density_outputs(model: PromptedCLIP, preprocess: Preprocess, images: torch.Tensor, frozen: bool,
                             batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits, tokens = zip(*(density_outputs(model, preprocess, batch, frozen) for batch in images.split(batch_size)))
    return torch.cat(logits), torch.cat(tokens)


def density_scores_of(model: PromptedCLIP, preprocess: Preprocess, images: torch.Tensor, density: ClassDensity,
                      frozen: bool = False, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature-density scores [N], the served model's logits [N, C]) for resized images."""
    logits, tokens = _batched_density_outputs(model, preprocess, images, frozen, batch_size)
    return density.score(tokens), logits


def class_tokens_of(model: PromptedCLIP, preprocess: Preprocess, images: torch.Tensor, frozen: bool = False,
                    batch_size: int = 256) -> torch.Tensor:
    """[N, D] last-block class tokens of resized images, through the model's prompts or
    (frozen) through its frozen tower."""
    return _batched_density_outputs(model, preprocess, images, frozen, batch_size)[1]


def detector_scores_of(forward: Forward, preprocess: Preprocess, detector: InputDetector, images: torch.Tensor,
                       batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(input-detector scores [N], the model's logits [N, C]) for resized images."""
    with torch.no_grad():
        scores, logits = zip(*((detector(batch), forward(preprocess.normalize(batch))[0].float())
                               for batch in images.split(batch_size)))
    return torch.cat(scores), torch.cat(logits)


# --- adaptive attacker -----------------------------------------------------------------

# What the attacker evaluates on a batch of resized triggered images: (logits [B, C] of the
# images themselves, the detector's score [B]), differentiable in the images.
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def alert_objective(model: torch.nn.Module, preprocess: Preprocess, config: AlertConfig) -> Objective:
    """The alert's scores, from one forward call over the image and its perturbed copies (the
    frozen-tower view's rows last, run through the frozen tower)."""
    alert = alert_of(config)

    def objective(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = alert_rows(_runner(model), preprocess, images, config)
        return rows.logits[:len(images)], alert.score(rows)
    return objective


def density_objective(model: PromptedCLIP, preprocess: Preprocess, density: ClassDensity, frozen: bool,
                      threshold: float) -> Objective:
    """The feature density on the served (or frozen) tower, in units of its clean threshold:
    above 1 is flagged, whatever the feature width."""
    def objective(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, tokens = density_outputs(model, preprocess, images, frozen)
        return logits, density.score(tokens) / threshold
    return objective


def detector_objective(model: torch.nn.Module, preprocess: Preprocess, detector: InputDetector,
                       threshold: float) -> Objective:
    """The input detector's score past its clean threshold, softplus(score - threshold): about 0
    where it does not flag, growing where it does; with the model's own logits."""
    def objective(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model(preprocess.normalize(images))[0], F.softplus(detector(images) - threshold)
    return objective


def adaptive_trigger(backdoor: Backdoor, images: torch.Tensor, objective: Objective, weight: float,
                     steps: int = 100, batch_size: int = 128, lr: float = 0.05, seed: int = 0) -> Trigger:
    """The backdoor's own trigger with its tensors (a patch or blend pattern, a warp field)
    re-optimised by Adam to minimise CE(target) + weight * mean detector score on `images`
    (resized, not of the target class), both from `objective` (alert_objective,
    density_objective; freeze the model first, or its parameters collect gradients too). Everything else
    about the trigger (kind, place, size, blend weight, warp strength) stays, and so do its
    bounds: patterns stay in [0, 1], a warp field within its original largest offset, so the
    trigger is no stronger than the one the model was poisoned with."""
    trigger = backdoor.trigger
    start = trigger.tensors()
    if not start:
        raise InputError(f"the adaptive attacker re-optimises a trigger's tensors and {trigger.name} has none "
                         f"({trigger.params()}); run it on a patch, blend or warp trigger")
    bounds = {name: (0.0, 1.0) if name == "pattern" else (-tensor.abs().max().item(), tensor.abs().max().item())
              for name, tensor in start.items()}
    variables = {name: tensor.detach().clone().float().requires_grad_(True) for name, tensor in start.items()}
    optimizer = torch.optim.Adam(list(variables.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    target = torch.full((batch_size,), backdoor.target, dtype=torch.long)
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        logits, scores = objective(type(trigger)(**trigger.params(), **variables)(batch))
        loss = F.cross_entropy(logits, target) + weight * scores.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, variable in variables.items():
                variable.clamp_(*bounds[name])
    return type(trigger)(**trigger.params(), **{name: value.detach().clone() for name, value in variables.items()})


# --- the evaluation --------------------------------------------------------------------

def evaluate_detection(model: torch.nn.Module, preprocess: Preprocess, images: torch.Tensor, labels: torch.Tensor,
                       backdoor: Backdoor, candidates: Sequence[AlertConfig] = CANDIDATES,
                       overlays: Optional[torch.Tensor] = None, strip_counts: Sequence[int] = (2, 8),
                       attack_images: Optional[torch.Tensor] = None, adaptive_weights: Sequence[float] = (),
                       adaptive_steps: int = 100, adaptive_alerts: Sequence[AlertConfig] = (DEFAULT,),
                       calibration: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                       density_adaptive_weights: Sequence[float] = (), detector: Optional[DetectorConfig] = None,
                       detector_adaptive_weights: Sequence[float] = (), seed: int = 0, progress: bool = False) -> dict:
    """Detection results for uint8 test images [N, C, H, W] with labels [N] on `model`
    (a module returning (logits, embedding)). overlays: uint8 clean held-out images for
    STRIP; attack_images: uint8 images the adaptive attacker trains on (not the test set),
    once per alert in adaptive_alerts and weight in adaptive_weights; calibration: uint8
    clean held-out images and their labels that the feature density is fitted on (a
    PromptedCLIP model only), attacked once per tower and weight in density_adaptive_weights
    (weights on the score over its clean 1 % FPR threshold); detector: how the input detector
    trains on the same calibration images (None: not measured), attacked once per weight in
    detector_adaptive_weights (detector_objective).
    Every candidate's scores are stored under "scores" for plots (clean, triggered lists);
    progress: report the candidates measured (guard.console.progress)."""
    model.eval()
    forward: Forward = model
    clean = preprocess.resize(images)
    others = labels != backdoor.target
    triggered = backdoor.trigger(clean[others])
    result = {"n_clean": len(clean), "n_triggered": len(triggered), "target": backdoor.target,
              "target_name": backdoor.target_name, "candidates": {}, "strip": {}, "adaptive": [], "scores": {}}

    def measure(clean_scores, trig_scores, trig_logits, passes, extra=None):
        entry = {"passes": passes, **(extra or {}), **detection_metrics(clean_scores, trig_scores)}
        hit = trig_logits.argmax(-1) == backdoor.target
        entry["asr"] = hit.double().mean().item() if len(hit) else float("nan")
        entry["hit"] = detection_metrics(clean_scores, trig_scores[hit]) if hit.any() else None
        return entry

    clean_scores_of = {}
    for config in console.progress(candidates, desc="detection: alerts", enabled=progress):
        name = config_name(config)
        clean_scores, _ = alert_scores_of(forward, preprocess, clean, config)
        trig_scores, trig_logits = alert_scores_of(forward, preprocess, triggered, config)
        result["candidates"][name] = measure(clean_scores, trig_scores, trig_logits, 1 + config.num_perturbations,
                                             {"config": config.to_dict(), "default": config == DEFAULT})
        result["scores"][name] = (clean_scores.tolist(), trig_scores.tolist())
        clean_scores_of[config] = clean_scores
    result["default"] = config_name(DEFAULT)
    result["asr"] = next(iter(result["candidates"].values()))["asr"] if candidates else None

    result["frozen_tower"] = {}
    if isinstance(model, PromptedCLIP) and model.prompts is not None:  # the second signal
        for name, config in FROZEN_TOWER_SIGNALS.items():
            clean_scores, _ = alert_scores_of(forward, preprocess, clean, config)
            trig_scores, trig_logits = alert_scores_of(forward, preprocess, triggered, config)
            result["frozen_tower"][name] = measure(clean_scores, trig_scores, trig_logits,
                                                   1 + config.num_perturbations)
            result["scores"][name] = (clean_scores.tolist(), trig_scores.tolist())

    result["density"] = {}
    densities = {}  # name -> (ClassDensity, frozen tower?, clean scores), for the adaptive attacker
    if calibration is not None and isinstance(model, PromptedCLIP):
        calibration_images = preprocess.resize(calibration[0])
        towers = {"served tower": False, "frozen tower": True} if model.prompts is not None else {"served tower": False}
        for tower, frozen in towers.items():
            density = ClassDensity.fit(class_tokens_of(model, preprocess, calibration_images, frozen),
                                       calibration[1], model.text_features.shape[0])
            clean_scores, _ = density_scores_of(model, preprocess, clean, density, frozen)
            trig_scores, trig_logits = density_scores_of(model, preprocess, triggered, density, frozen)
            name = f"feature density, {tower}"
            result["density"][name] = measure(clean_scores, trig_scores, trig_logits, 2 if frozen else 1)
            result["scores"][name] = (clean_scores.tolist(), trig_scores.tolist())
            densities[name] = density, frozen, clean_scores

    result["input_detector"] = {}
    detectors = {}  # name -> (InputDetector, clean scores), for the adaptive attacker
    if calibration is not None and detector is not None:
        input_detector = train_detector(preprocess.resize(calibration[0]), detector).requires_grad_(False)
        clean_scores, _ = detector_scores_of(forward, preprocess, input_detector, clean)
        trig_scores, trig_logits = detector_scores_of(forward, preprocess, input_detector, triggered)
        name = "input detector, " + "+".join(detector.families)
        result["input_detector"][name] = measure(clean_scores, trig_scores, trig_logits, 1,
                                                 {"detector": detector.to_dict()})
        result["scores"][name] = (clean_scores.tolist(), trig_scores.tolist())
        detectors[name] = input_detector, clean_scores

    if overlays is not None:
        overlay_images = preprocess.resize(overlays)
        with torch.no_grad():
            trig_logits = forward(preprocess.normalize(triggered))[0].float()
        for count in strip_counts:
            chosen = overlay_images[:count]
            result["strip"][f"strip-{count}"] = measure(strip_scores(forward, preprocess, clean, chosen),
                                                        strip_scores(forward, preprocess, triggered, chosen),
                                                        trig_logits, 1 + count)

    attacks_fitted = bool(densities and density_adaptive_weights) or bool(detectors and detector_adaptive_weights)
    if (adaptive_weights or attacks_fitted) and (attack_images is None or not len(attack_images)):
        log.warning("no images for the adaptive attacker to train on; it is skipped")
    elif adaptive_weights or attacks_fitted:
        model.requires_grad_(False)  # only the trigger learns
        train = preprocess.resize(attack_images)

        def attack(detector: str, objective: Objective, scorer: Callable, clean_scores: torch.Tensor, passes: int,
                   weight: float) -> None:
            trigger = adaptive_trigger(backdoor, train, objective, weight, adaptive_steps, seed=seed)
            scores, logits = scorer(trigger(clean[others]))
            entry = measure(clean_scores, scores, logits, passes, {"alert": detector, "weight": weight})
            hit = logits.argmax(-1) == backdoor.target
            entry["evade@1"] = (hit & (scores <= calibrate_threshold(clean_scores, 0.01))).double().mean().item()
            result["adaptive"].append(entry)
            result["scores"][f"adaptive {detector} w={weight:g}"] = (clean_scores.tolist(), scores.tolist())

        for config in adaptive_alerts if adaptive_weights else ():
            if config not in clean_scores_of:
                clean_scores_of[config] = alert_scores_of(forward, preprocess, clean, config)[0]
            for weight in adaptive_weights:
                attack(config_name(config), alert_objective(model, preprocess, config),
                       partial(alert_scores_of, forward, preprocess, config=config), clean_scores_of[config],
                       1 + config.num_perturbations, weight)
        for name, (density, frozen, clean_scores) in densities.items():
            objective = density_objective(model, preprocess, density, frozen, calibrate_threshold(clean_scores, 0.01))
            for weight in density_adaptive_weights:
                attack(name, objective, partial(density_scores_of, model, preprocess, density=density, frozen=frozen),
                       clean_scores, 2 if frozen else 1, weight)
        for name, (input_detector, clean_scores) in detectors.items():
            objective = detector_objective(model, preprocess, input_detector, calibrate_threshold(clean_scores, 0.01))
            for weight in detector_adaptive_weights:
                attack(name, objective, partial(detector_scores_of, forward, preprocess, input_detector), clean_scores,
                       1, weight)
    return result


def format_table(result: dict) -> str:
    """One row per alert: passes (1 + K), AUROC, TPR at 1 % / 5 % FPR, the same on hits."""
    header = (f"{'alert':<52}{'passes':>7}{'AUROC':>8}{'TPR@1%':>8}{'TPR@5%':>8}"
              f"{'hit AUROC':>11}{'hit TPR@1%':>12}{'ASR':>7}{'evade@1%':>10}")
    lines = [header, "-" * len(header)]

    def row(label, entry):
        hit = entry.get("hit") or {}
        evade = entry.get("evade@1")
        lines.append(f"{label:<52}{entry['passes']:>7}{entry['auroc']:>8.3f}{entry['tpr@1']:>8.3f}"
                     f"{entry['tpr@5']:>8.3f}{hit.get('auroc', float('nan')):>11.3f}"
                     f"{hit.get('tpr@1', float('nan')):>12.3f}{entry['asr']:>7.3f}"
                     + (f"{evade:>10.3f}" if evade is not None else f"{'':>10}"))

    for name, entry in result["candidates"].items():
        row(name + (" (default)" if entry.get("default") else ""), entry)
    for name, entry in result["strip"].items():
        row(name, entry)
    for name, entry in [*result.get("frozen_tower", {}).items(), *result.get("density", {}).items(),
                        *result.get("input_detector", {}).items()]:
        row(name, entry)
    for entry in result["adaptive"]:
        row(f"adaptive vs {entry['alert']} w={entry['weight']:g}", entry)
    return "\n".join(lines)


def plot_scores(result: dict, out: str | Path, names: Optional[Sequence[str]] = None) -> Path:
    """Histograms of clean vs triggered scores, one panel per alert in `names` (default:
    the default alert, the frozen-tower and feature-density signals and every adaptive run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(names or [n for n in result["scores"]
                           if n == result["default"] or n in result.get("frozen_tower", {})
                           or n in result.get("density", {})
                           or n.startswith(f"adaptive {result['default']}")])
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for axis, name in zip(axes[0], names):
        clean, triggered = (torch.tensor(s, dtype=torch.float64) for s in result["scores"][name])
        low, high = torch.cat([clean, triggered]).min().item(), torch.cat([clean, triggered]).max().item()
        bins = torch.linspace(low, high if high > low else low + 1e-6, 50).tolist()
        axis.hist(clean.tolist(), bins=bins, alpha=0.6, density=True, label=f"clean ({len(clean)})")
        axis.hist(triggered.tolist(), bins=bins, alpha=0.6, density=True, label=f"triggered ({len(triggered)})")
        if len(clean):
            axis.axvline(calibrate_threshold(clean, 0.01), color="k", linestyle="--", label="1 % FPR threshold")
        axis.set_yscale("log")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("score (higher = more suspicious)")
        axis.legend(fontsize=8)
    return save_figure(figure, out, dpi=110)


def run_detection(model: str, attack: str | Path, data: str = "fashion-mnist", images: int = 2000,
                  candidates: Sequence[AlertConfig] = CANDIDATES, strip_counts: Sequence[int] = (2, 8),
                  adaptive_weights: Sequence[float] = (), adaptive_steps: int = 100,
                  adaptive_alerts: Sequence[AlertConfig] = (DEFAULT,), density_images: int = 2000,
                  density_adaptive_weights: Sequence[float] = (), detector: Optional[DetectorConfig] = None,
                  detector_adaptive_weights: Sequence[float] = (), seed: int = 0, progress: bool = True) -> dict:
    """evaluate_detection on `images` seeded test images of `data` for a purified artifact or
    CLIP directory `model` and the trigger recorded with `attack`; STRIP overlays and the
    adaptive attacker's images come from one seeded order of the training split, the
    attacker's after the overlays (so they depend on the largest STRIP count); the feature
    density's and the input detector's `density_images` calibration images (0: none) from a
    second seeded order."""
    from .evaluate import _model_image_size, load_classifier

    if images < 1 or any(count < 1 for count in strip_counts) or adaptive_steps < 0 or density_images < 0:
        raise InputError("the image count and STRIP counts must be positive, adaptive_steps and density_images "
                         "not negative")
    image_size = _model_image_size(model)
    test = load_dataset(data, "test", image_size=image_size)
    train = load_dataset(data, "train", image_size=image_size)
    classifier, preprocess = load_classifier(model, test.classes)
    backdoor = load_trigger(Path(attack))
    chosen = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:images]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
    overlays = train.images[order[:max(strip_counts, default=0)]]
    attack_pool = order[max(strip_counts, default=0):]
    attack_pool = attack_pool[train.labels[attack_pool] != backdoor.target][:5000]
    calibration = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 2))[:density_images]
    result = evaluate_detection(classifier, preprocess, test.images[chosen], test.labels[chosen], backdoor,
                                candidates, overlays if strip_counts else None, strip_counts,
                                train.images[attack_pool], adaptive_weights, adaptive_steps, adaptive_alerts,
                                (train.images[calibration], train.labels[calibration]) if density_images else None,
                                density_adaptive_weights, detector, detector_adaptive_weights, seed, progress)
    result.update(model=str(model), attack=str(attack), data=data, seed=seed)
    return result


def _number_list(kind: type) -> Callable[[str], list]:
    """argparse type: a comma-separated list of `kind` numbers ('' is the empty list)."""
    def parse(text: str) -> list:
        try:
            return [kind(value) for value in text.split(",") if value.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {'integers' if kind is int else 'numbers'} "
                                             f"(or '' for none), got {text!r}") from None
    return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.detection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=console.EPILOG)
    parser.add_argument("--model", required=True, help="purified artifact directory or CLIP directory")
    parser.add_argument("--attack", required=True, help="backdoored model directory whose trigger and target to apply")
    parser.add_argument("--data", default="fashion-mnist", help=DATA_HELP)
    parser.add_argument("--images", type=int, default=2000, help="clean test images (seeded choice)")
    parser.add_argument("--candidates", choices=("all", "default"), default="all")
    parser.add_argument("--strip", type=_number_list(int), default="2,8",
                        help="STRIP overlay counts, comma-separated ('' skips STRIP)")
    parser.add_argument("--adaptive-weights", type=_number_list(float), default="10,100",
                        help="alert-score weights of the adaptive attacker, comma-separated ('' skips it)")
    parser.add_argument("--adaptive-steps", type=int, default=100)
    parser.add_argument("--adaptive-alert", action="append", metavar="STATISTIC=P1+P2",
                        help="alert the adaptive attacker targets, e.g. pr=open:3+median:3 (repeatable; "
                             "default: the default alert)")
    parser.add_argument("--density-images", type=int, default=2000,
                        help="clean training images the feature density is fitted on and the input detector "
                             "trained on (0 skips both)")
    parser.add_argument("--density-adaptive-weights", type=_number_list(float), default="",
                        help="weights of the adaptive attacker against the feature density, on its score over "
                             "the clean 1 %% FPR threshold, comma-separated (default '': none)")
    parser.add_argument("--detector-families", default=",".join(FAMILIES), metavar="F1,F2",
                        help="synthetic trigger families the input detector trains on (default: all, "
                             f"{','.join(FAMILIES)}; '' skips the detector)")
    parser.add_argument("--detector-adaptive-weights", type=_number_list(float), default="",
                        help="weights of the adaptive attacker against the input detector, comma-separated "
                             "(default '': none)")
    parser.add_argument("--json", type=Path, help="write the results (scores included) here")
    parser.add_argument("--plot", type=Path, help="write score histograms here (.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug messages on stderr")
    args = parser.parse_args(argv)
    console.setup_logging(args.verbose)
    result = run_detection(
        args.model, args.attack, args.data, args.images, CANDIDATES if args.candidates == "all" else (DEFAULT,),
        args.strip, args.adaptive_weights, args.adaptive_steps,
        [parse_alert(spec) for spec in args.adaptive_alert] if args.adaptive_alert else [DEFAULT],
        args.density_images, args.density_adaptive_weights,
        DetectorConfig(families=tuple(args.detector_families.split(","))) if args.detector_families else None,
        args.detector_adaptive_weights, args.seed, progress=not args.no_progress)
    print(f"{args.model} / trigger of {args.attack}: {result['n_clean']} clean, {result['n_triggered']} triggered "
          f"(target {result['target_name']!r} left out), ASR {100 * result['asr']:.1f} %")
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result) + "\n")
    if args.plot:
        plot_scores(result, args.plot)
    return console.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(console.run(main))
