"""Input detector: a small CNN that tells clean inputs from inputs carrying a trigger.

It never sees the attacker's trigger. It learns, when calibrating, to separate the user's
clean images from copies carrying *synthetic* triggers of the families backdoor attacks
use, each copy with its own random trigger:

    patch   a square of uniform noise (colour or grey), 1/16 to 1/6 of the side, anywhere
    blend   x' = (1 - a) x + a * noise, a in [0.1, 0.3], colour or grey noise
    sine    x' = clip(x + A sin(2 pi f t / S + phase)), A in [20, 80] / 255, f in [2, 12]
            periods, along the rows or the columns
    warp    WaNet's smooth warping field (warp_images), a 3 to 5 grid, strength 3 to 8

so what it learns is the family, not one trigger. It reads the resized input in [0, 1],
not the model, so it scores the same on a purified model as on the one downloaded, and
costs one small CNN pass beside the classification. guard serves it as the alert
statistic "detector" (guard.alerts); docs/detection.md has the measurements, including
what it misses when a family is left out of training and what an attacker who knows it
can do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError

FAMILIES = ("patch", "blend", "sine", "warp")
CHANNELS = (32, 64)  # width of the two convolution stages


def smooth_field(grid: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """WaNet's warping field: grid x grid random 2-D offsets in [-1, 1], scaled to mean
    magnitude 1, upsampled bicubically to [S, S, 2]."""
    offsets = torch.rand(1, 2, grid, grid, generator=generator) * 2 - 1
    offsets = offsets / offsets.abs().mean()
    return F.interpolate(offsets, size=image_size, mode="bicubic", align_corners=True)[0].permute(1, 2, 0)


def warp_images(images: torch.Tensor, field: torch.Tensor, strength: float) -> torch.Tensor:
    """Resample images [N, 3, S, S] through identity + strength * field / S (grid_sample's
    [-1, 1] coordinates, clamped to the image): pixels move by about strength / 2 * |field| px."""
    side = images.shape[-1]
    axis = torch.linspace(-1, 1, side, device=images.device, dtype=images.dtype)
    rows, columns = torch.meshgrid(axis, axis, indexing="ij")
    identity = torch.stack((columns, rows), dim=-1)
    grid = (identity + strength * field.to(images) / side).clamp(-1, 1).expand(len(images), -1, -1, -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _noise(generator: torch.Generator, height: int, width: int) -> torch.Tensor:
    """[3, H, W] uniform noise, in colour or (half the time) grey."""
    channels = 3 if torch.rand((), generator=generator).item() < 0.5 else 1
    return torch.rand(channels, height, width, generator=generator).expand(3, height, width)


def synthetic_trigger(image: torch.Tensor, family: str, generator: torch.Generator) -> torch.Tensor:
    """One image [3, S, S] in [0, 1] carrying a fresh random trigger of `family`."""
    side = image.shape[-1]
    if family == "patch":
        size = int(torch.randint(max(1, side // 16), max(2, side // 6) + 1, (), generator=generator))
        row, column = torch.randint(0, side - size + 1, (2,), generator=generator).tolist()
        out = image.clone()
        out[:, row:row + size, column:column + size] = _noise(generator, size, size)
        return out
    if family == "blend":
        weight = _uniform(generator, 0.1, 0.3)
        return (1 - weight) * image + weight * _noise(generator, side, side)
    if family == "sine":
        amplitude, frequency = _uniform(generator, 20, 80) / 255, _uniform(generator, 2, 12)
        phase = _uniform(generator, 0, 2 * math.pi)
        wave = amplitude * torch.sin(2 * math.pi * frequency * torch.arange(side) / side + phase)
        wave = wave[None, :] if torch.rand((), generator=generator).item() < 0.5 else wave[:, None]
        return (image + wave).clamp(0, 1)
    if family == "warp":
        grid = int(torch.randint(3, 6, (), generator=generator))
        field = smooth_field(grid, side, generator)
        return warp_images(image[None], field, _uniform(generator, 3, 8))[0]
    raise InputError(f"unknown trigger family {family!r}; known: {list(FAMILIES)}")


def synthetic_triggers(images: torch.Tensor, generator: torch.Generator,
                       families: Sequence[str] = FAMILIES) -> torch.Tensor:
    """A copy of every image [N, 3, S, S] with its own random trigger of a random family."""
    _check_families(families)
    picks = torch.randint(0, len(families), (len(images),), generator=generator).tolist()
    return torch.stack([synthetic_trigger(image, families[pick], generator) for image, pick in zip(images, picks)])


def _check_families(families: Sequence[str]) -> None:
    if isinstance(families, str) or not families or any(family not in FAMILIES for family in families):
        raise InputError(f"trigger families must be a non-empty list of {list(FAMILIES)}, got {families!r}")


class InputDetector(nn.Module):
    """Two convolution stages, then a linear score of the feature maps' global average and
    global maximum: the average sees what spreads over the image (a blend, a sine, a warp),
    the maximum what sits in one place (a patch, wherever it is). Any image size."""

    def __init__(self, channels: Sequence[int] = CHANNELS):
        super().__init__()
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, first, 3, padding=1), nn.GELU(), nn.Conv2d(first, first, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2), nn.Conv2d(first, second, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(second, second, 3, padding=1), nn.GELU())
        self.score = nn.Linear(2 * second, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Resized images [N, 3, S, S] in [0, 1] -> scores [N]; higher = more likely triggered."""
        maps = self.features(images * 2 - 1).flatten(2)
        return self.score(torch.cat([maps.mean(2), maps.amax(2)], 1))[:, 0]

    def to_tensors(self) -> dict:
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict) -> "InputDetector":
        """The inverse of to_tensors (the artifact's detector file); InputError when malformed."""
        try:
            detector = cls((tensors["features.0.weight"].shape[0], tensors["features.5.weight"].shape[0]))
            detector.load_state_dict(tensors)
        except (KeyError, RuntimeError, AttributeError, IndexError) as error:
            raise InputError(f"an input detector needs the weights of {cls.__name__} ({error})") from error
        return detector.eval()


@dataclass(frozen=True)
class DetectorConfig:
    steps: int = 1000  # optimizer steps, whatever the number of images: few images get more epochs
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-3
    families: tuple[str, ...] = FAMILIES
    seed: int = 0

    def __post_init__(self):
        _check_families(self.families)
        object.__setattr__(self, "families", tuple(self.families))
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise InputError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")

    def to_dict(self) -> dict:
        return {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay, "families": list(self.families), "seed": self.seed}


def train_detector(clean: torch.Tensor, config: DetectorConfig = DetectorConfig(),
                   progress: Optional[Callable[[int, int], None]] = None) -> InputDetector:
    """Fit an InputDetector on clean resized images [N, 3, S, S] in [0, 1] against a copy of
    each carrying a synthetic trigger (a fresh one every epoch): config.steps AdamW steps on
    the logistic loss; deterministic for a seed, and the global random state is left as it
    was. progress(step, steps) is called after every epoch."""
    if not isinstance(clean, torch.Tensor) or clean.ndim != 4 or clean.shape[1] != 3 or len(clean) < 2:
        raise InputError("the input detector trains on at least two resized clean images [N, 3, S, S], got "
                         + (f"{tuple(clean.shape)}" if isinstance(clean, torch.Tensor) else type(clean).__name__))
    if not torch.isfinite(clean).all():
        raise InputError("the calibration images hold NaN or inf values")
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        detector = InputDetector()
    optimizer = torch.optim.AdamW(detector.parameters(), config.lr, weight_decay=config.weight_decay)
    labels = torch.cat([torch.zeros(len(clean)), torch.ones(len(clean))])
    detector.train()
    step = 0
    with torch.enable_grad():
        while step < config.steps:  # an epoch: every clean image and a fresh triggered copy of each
            images = torch.cat([clean, synthetic_triggers(clean, generator, config.families)])
            order = torch.randperm(len(images), generator=generator)
            for index in order.split(config.batch_size)[:config.steps - step]:
                loss = F.binary_cross_entropy_with_logits(detector(images[index]), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
            if progress is not None:
                progress(step, config.steps)
    return detector.eval()
