"""Per-input trigger alert: how an input's features and logits move under a few perturbations.

The perturbation resistivity (PR) of docs/methods.md compares how far the image embedding h and
the class logits z move when the input is perturbed: PR = E cos(h, h~) / E cos(z, z~). Per
input x and K perturbed copies x_k the two terms are

    ch(x) = mean_k cos(h(x), h(x_k))        cz(x) = mean_k cos(z(x), z(x_k))

and the default alert score (statistic "pr_terms") is how far both fall short of 1:

    score(x) = (1 - ch(x)) + (1 - cz(x))     in [0, 4]; higher = more suspicious.

The default perturbations remove small image structures (a 3x3 morphological opening and a
3x3 median filter), which is what a patch trigger is: on a backdoored model a triggered
input's features and decision jump back towards its true class, while a clean input barely
moves. The literal per-input ratio ("pr": 1 - ch/cz) is available but separates worse: a
triggered input's features and logits move together, and the ratio cancels their common
movement (docs/detection.md has the measurements and the reasons for the default).

Serving runs everything in one backend call per batch:

    expanded = expand_batch(resized, config)              # [N * (1 + K), 3, S, S]
    logits, embedding = guard.forward(preprocess.normalize(expanded))
    scores = alert_scores(logits, embedding, len(resized), config)
    logits = logits[:len(resized)]                         # the unperturbed images come first

Rows k * N + i hold perturbation k of image i (k = 0 is the image itself). Every perturbation
is deterministic and draws no global random state (noise comes from a generator seeded per
call and is the same for every image), so scores are thread-safe, and an image's score does
not depend on the rest of its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .errors import InputError

Perturbation = Callable[[torch.Tensor], torch.Tensor]


# Paeth's median-of-9 network (Devillard's opt_med9): 19 compare-exchanges leave the median
# in slot 4. About ten times faster than torch.median over unfolded windows on a CPU.
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
            (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def median_filter(images: torch.Tensor, size: int) -> torch.Tensor:
    """Per-channel median over size x size windows, reflect padding."""
    pad = size // 2
    if size == 3:
        padded, side = F.pad(images, (1, 1, 1, 1), mode="reflect"), images.shape[-2:]
        v = [padded[..., i:i + side[0], j:j + side[1]] for i in range(3) for j in range(3)]
        for a, b in _MEDIAN9:
            v[a], v[b] = torch.minimum(v[a], v[b]), torch.maximum(v[a], v[b])
        return v[4]
    windows = F.unfold(F.pad(images, (pad,) * 4, mode="reflect"), size)   # [N, 3 * size^2, S * S]
    n, channels = images.shape[:2]
    return windows.view(n, channels, size * size, -1).median(dim=2).values.view_as(images)


def _erode(images: torch.Tensor, size: int) -> torch.Tensor:
    return -F.max_pool2d(F.pad(-images, (size // 2,) * 4, mode="reflect"), size, stride=1)


def _dilate(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.max_pool2d(F.pad(images, (size // 2,) * 4, mode="reflect"), size, stride=1)


def opening(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey-level opening (erosion, then dilation) with a size x size square: removes bright
    structures smaller than the square."""
    return _dilate(_erode(images, size), size)


def closing(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey-level closing (dilation, then erosion): removes small dark structures."""
    return _erode(_dilate(images, size), size)


def gaussian_blur(images: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur, kernel `size`, torchvision's default sigma, reflect padding."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    weights = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    weights = (weights / weights.sum()).to(images)
    channels, pad = images.shape[1], size // 2
    out = F.pad(images, (pad,) * 4, mode="reflect")
    out = F.conv2d(out, weights.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, weights.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def down_up(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Area-downsample by `factor`, then bilinear back to the input side."""
    side = images.shape[-1]
    small = F.interpolate(images, size=side // factor, mode="area")
    return F.interpolate(small, size=side, mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def gaussian_noise(images: torch.Tensor, std: float, seed: int, per_image: bool = False) -> torch.Tensor:
    """One fixed noise image (seeded generator made per call) added to every image, so that an
    image's result does not depend on its batch; per_image: a fresh draw for each image of the
    batch instead (the training side's PR perturbation)."""
    shape = images.shape if per_image else (1, *images.shape[1:])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return (images + std * noise.to(images)).clamp(0.0, 1.0)


def quantize(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Round every value to `levels` evenly spaced levels in [0, 1]."""
    return torch.round(images * (levels - 1)) / (levels - 1)


# The frozen-tower option's spelling in a list of perturbations (manifests, the CLI's
# --perturbations): a last 'frozen' runs the image itself once more through the frozen tower.
# It is no image change, so AlertConfig keeps it apart as `frozen_tower`.
FROZEN_TOWER = "frozen"

# name -> (parameter type or None, parameter check, function(images, parameter, index)).
# Kernel sizes are pixels at the model's resolution; the defaults fit 3 px patch triggers
# (BadNet's 16 px at 224 px scaled to the 32 px reference model).
_odd_kernel = (lambda v: v >= 3 and v % 2 == 1, "an odd integer >= 3")
PERTURBATIONS = {
    "median": (int, _odd_kernel, lambda x, v, i: median_filter(x, v)),
    "open": (int, _odd_kernel, lambda x, v, i: opening(x, v)),
    "close": (int, _odd_kernel, lambda x, v, i: closing(x, v)),
    "blur": (int, _odd_kernel, lambda x, v, i: gaussian_blur(x, v)),
    "downup": (int, (lambda v: v >= 2, "an integer >= 2"), lambda x, v, i: down_up(x, v)),
    "noise": (float, (lambda v: 0 < v <= 1, "a std in (0, 1]"), lambda x, v, i: gaussian_noise(x, v, seed=i)),
    "quant": (int, (lambda v: v >= 2, "an integer >= 2"), lambda x, v, i: quantize(x, v)),
    "hflip": (None, None, lambda x, v, i: x.flip(-1)),
}

# The statistics of the perturbation resistivity family (guard.alert_kinds.Resistivity):
# name -> score(ch, cz, kl); ch, cz: mean cosines of embeddings and logits; kl: mean KL.
STATISTICS = {
    "pr_terms": lambda ch, cz, kl: (1 - ch) + (1 - cz),
    "pr": lambda ch, cz, kl: 1 - ch / cz.clamp_min(1e-6),
    "pr_abs": lambda ch, cz, kl: (ch.clamp_min(1e-6).log() - cz.clamp_min(1e-6).log()).abs(),
    "feature": lambda ch, cz, kl: 1 - ch,
    "logit": lambda ch, cz, kl: 1 - cz,
    "kl": lambda ch, cz, kl: kl,
}


# The registered names of the alert kinds that calibration fits (guard.alert_kinds).
DENSITY = "density"
DETECTOR = "detector"


def _parse(spec) -> tuple[str, object]:
    """'name' or 'name:value' -> (name, typed value), InputError when unusable."""
    if not isinstance(spec, str):
        raise InputError(f"a perturbation is a string such as 'median:3', got {spec!r}")
    name, _, raw = spec.partition(":")
    if name == FROZEN_TOWER:
        raise InputError(f"the {FROZEN_TOWER!r} view takes no parameter and must be the last perturbation, "
                         f"got {spec!r}")
    if name not in PERTURBATIONS:
        raise InputError(f"unknown perturbation {name!r} in {spec!r}; known: {sorted(PERTURBATIONS)} "
                         f"and a last {FROZEN_TOWER!r} (the frozen tower)")
    kind, check, _ = PERTURBATIONS[name]
    if kind is None:
        if raw:
            raise InputError(f"perturbation {name!r} takes no parameter, got {spec!r}")
        return name, None
    try:
        value = kind(raw)
    except ValueError:
        raise InputError(f"perturbation {spec!r} needs {check[1]} after the colon") from None
    if (kind is float and not math.isfinite(value)) or not check[0](value):
        raise InputError(f"perturbation {spec!r} needs {check[1]} after the colon")
    return name, value


@dataclass(frozen=True)
class AlertConfig:
    """What an alert is, as a manifest records it. statistic: a name in the alert registry
    (guard.alert_kinds: the PR statistics of STATISTICS, "density", "detector", and any
    registered since), which says which perturbations and options it takes.
    perturbations: specs 'name' or 'name:value' (see PERTURBATIONS), one extra forward pass
    each. frozen_tower: one more pass of the image itself, through the frozen tower (torch
    backend only); a last 'frozen' in perturbations is the same option in the manifests'
    spelling. threshold: scores above it alert (calibrate it on clean images with
    `calibrate_threshold`); None means not calibrated."""
    perturbations: tuple[str, ...] = ("open:3", "median:3")
    statistic: str = "pr_terms"
    threshold: Optional[float] = None
    frozen_tower: bool = False

    def __post_init__(self):
        from .alert_kinds import kind_of  # the registry's kinds build on this module

        if isinstance(self.perturbations, str) or not isinstance(self.perturbations, (tuple, list)):
            raise InputError(f"perturbations must be a list of specs such as ['median:3'], got {self.perturbations!r}")
        perturbations = tuple(self.perturbations)
        if FROZEN_TOWER in perturbations:
            if perturbations.index(FROZEN_TOWER) != len(perturbations) - 1:
                raise InputError(f"the {FROZEN_TOWER!r} view must be the last perturbation, got {list(perturbations)}")
            perturbations = perturbations[:-1]
            object.__setattr__(self, "frozen_tower", True)
        for spec in perturbations:
            _parse(spec)
        object.__setattr__(self, "perturbations", perturbations)
        if not isinstance(self.frozen_tower, bool):
            raise InputError(f"frozen_tower must be True or False, got {self.frozen_tower!r}")
        kind_of(self.statistic).check(self)
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                    or not math.isfinite(self.threshold):
                raise InputError(f"threshold must be a finite number or None, got {self.threshold!r}")
            object.__setattr__(self, "threshold", float(self.threshold))

    @property
    def views(self) -> tuple[str, ...]:
        """The extra rows per image in the manifests' spelling: the perturbations, then 'frozen'."""
        return self.perturbations + ((FROZEN_TOWER,) if self.frozen_tower else ())

    @property
    def num_perturbations(self) -> int:
        """Extra forward rows per image (the frozen-tower view included)."""
        return len(self.views)

    @property
    def uses_frozen_tower(self) -> bool:
        return self.frozen_tower

    @property
    def needs_torch_backend(self) -> bool:
        """The frozen-tower view, the class token and what calibration fitted (stored in an
        artifact directory) are served by the torch backend only."""
        from .alert_kinds import kind_of

        return kind_of(self.statistic).needs_tower_internals(self)

    def to_dict(self) -> dict:
        # the frozen-tower option keeps its format-1 spelling on disk, so that every reader of
        # format 1 (older clip-guard releases included) reads what this one writes
        return {"perturbations": list(self.views), "statistic": self.statistic, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: dict) -> "AlertConfig":
        if not isinstance(data, dict):
            raise InputError(f"an alert config is a dict, got {type(data).__name__}")
        unknown = set(data) - {"perturbations", "statistic", "threshold"}
        if unknown:
            raise InputError(f"unknown alert config keys {sorted(unknown)}")
        if "perturbations" not in data or "statistic" not in data:
            raise InputError("an alert config needs 'perturbations' and 'statistic'")
        if isinstance(data["perturbations"], str) or not isinstance(data["perturbations"], (list, tuple)):
            raise InputError(f"perturbations must be a list of specs such as ['median:3'], got "
                             f"{data['perturbations']!r}")
        return cls(tuple(data["perturbations"]), data["statistic"], data.get("threshold"))


def expand_batch(images: torch.Tensor, config: AlertConfig) -> torch.Tensor:
    """Resized float images [N, 3, S, S] in [0, 1] -> [N * (1 + K), 3, S, S]: the images, then
    each perturbation of all of them (row k * N + i is perturbation k of image i, k = 0 none).
    Normalise the result and run it through the model in one call."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 \
            or images.shape[2] != images.shape[3] or not images.is_floating_point():
        raise InputError("expand_batch takes resized float images [N, 3, S, S], got "
                         + (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                            else type(images).__name__))
    side = images.shape[-1]
    if len(images) == 0:
        return images.clone()
    copies = [images]
    for index, spec in enumerate(config.perturbations):
        name, value = _parse(spec)
        if isinstance(value, int) and name != "quant" and value > side:
            raise InputError(f"perturbation {spec!r} is too large for {side} px images")
        copies.append(PERTURBATIONS[name][2](images, value, index))
    if config.frozen_tower:  # the image itself, run through the frozen tower: its rows come last
        copies.append(images)
    return torch.cat(copies)


def alert_scores(logits: torch.Tensor, embedding: torch.Tensor, n_images: int,
                 config: AlertConfig) -> torch.Tensor:
    """Scores [N] (float32, higher = more suspicious) from the model outputs of
    `expand_batch`'s N * (1 + K) rows: logits [N * (1 + K), C], embedding [N * (1 + K), E].
    With ch, cz the mean cosines over k of the embeddings and of the logits between image i
    and its perturbations, and kl the mean KL(softmax z || softmax z_k):
    pr_terms = (1 - ch) + (1 - cz) (default); pr = 1 - ch / cz (the per-input PR, low PR
    suspicious); pr_abs = |log ch - log cz|; feature = 1 - ch; logit = 1 - cz; kl = kl."""
    copies = 1 + config.num_perturbations
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0:
        raise InputError(f"n_images must be a non-negative integer, got {n_images!r}")
    for name, tensor in (("logits", logits), ("embedding", embedding)):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or len(tensor) != n_images * copies:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise InputError(f"{name} must be 2-D with {n_images} x {copies} = {n_images * copies} rows "
                             f"(images x (1 + perturbations)), got {got}")
    if config.statistic not in STATISTICS:
        raise InputError(f"the {config.statistic!r} statistic is not a function of the outputs that alert_scores "
                         f"computes (those are {sorted(STATISTICS)}): the guard serves it through its alert kind "
                         "(guard.alert_kinds)")
    if n_images == 0:
        return torch.empty(0)
    z = logits.float().reshape(copies, n_images, -1)
    h = embedding.float().reshape(copies, n_images, -1)
    ch = F.cosine_similarity(h[:1], h[1:], dim=-1).mean(0)
    cz = F.cosine_similarity(z[:1], z[1:], dim=-1).mean(0)
    kl = torch.zeros_like(ch)
    if config.statistic == "kl":
        logp = z.log_softmax(-1)
        kl = (logp[:1].exp() * (logp[:1] - logp[1:])).sum(-1).mean(0)
    return STATISTICS[config.statistic](ch, cz, kl)


def density_alert(frozen: bool = False) -> AlertConfig:
    """The uncalibrated DENSITY alert on the served tower, or on the frozen tower."""
    return AlertConfig((), DENSITY, frozen_tower=frozen)


def density_rows(class_tokens: torch.Tensor, n_images: int, config: AlertConfig) -> torch.Tensor:
    """The [N, D] rows of `expand_batch`'s N * (1 + K) last-block class tokens that the
    DENSITY statistic reads: the image's own, or with the frozen-tower view the frozen tower's."""
    copies = 1 + config.num_perturbations
    if not isinstance(class_tokens, torch.Tensor) or class_tokens.ndim != 2 \
            or len(class_tokens) != n_images * copies:
        raise InputError(f"class_tokens must be 2-D with {n_images} x {copies} rows")
    return class_tokens[n_images * (copies - 1):]


def density_scores(class_tokens: torch.Tensor, n_images: int, config: AlertConfig, density) -> torch.Tensor:
    """Scores [N] of the DENSITY statistic from the class tokens of `expand_batch`'s rows
    (density_rows). density: the guard.density.ClassDensity fitted when calibrating."""
    if config.statistic != DENSITY:
        raise InputError(f"density_scores serves the {DENSITY!r} statistic, not {config.statistic!r}")
    return density.score(density_rows(class_tokens, n_images, config))


def calibrate_threshold(clean_scores: torch.Tensor, fpr: float = 0.01) -> float:
    """The (1 - fpr) quantile of scores of clean images: alerting above it flags about a
    fraction fpr of clean inputs."""
    if not 0.0 < fpr < 1.0:
        raise InputError(f"fpr must lie in (0, 1), got {fpr!r}")
    scores = torch.as_tensor(clean_scores, dtype=torch.float64).flatten()
    if len(scores) == 0 or not torch.isfinite(scores).all():
        raise InputError("calibrate_threshold needs at least one finite clean score")
    return torch.quantile(scores, 1.0 - fpr).item()


def alerts(scores: torch.Tensor, config: AlertConfig) -> torch.Tensor:
    """Boolean [N]: score > config.threshold. InputError when the config has no threshold."""
    if config.threshold is None:
        raise InputError("this alert config has no threshold; calibrate one with calibrate_threshold")
    return scores > config.threshold
