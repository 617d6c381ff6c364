"""Backdoor triggers, applied to float RGB images in [0, 1] at the model's resolution.

Sizes in the literature are for 224 px images; here they scale with the image side.
A trigger is saved next to a backdoored model (`save_trigger`) so evaluation
re-applies it exactly (`load_trigger`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from guard.errors import ArtifactError, ChecksumError, InputError
from guard.hashing import sha256_file

TRIGGER_JSON = "trigger.json"
TRIGGER_TENSORS = "trigger.safetensors"
REFERENCE_SIDE = 224  # image side the published trigger sizes refer to


def scaled(size_at_224: float, image_size: int) -> int:
    """A trigger size given for 224 px images, scaled to `image_size` (at least 1 px)."""
    return max(1, math.ceil(size_at_224 * image_size / REFERENCE_SIDE))


class Trigger:
    """What every trigger offers: a `name`, `params()` and `tensors()` that
    `save_trigger` records, and `apply(images, generator)` on float images
    [N, 3, S, S] in [0, 1]. Calling a trigger applies it."""

    name: str

    def params(self) -> dict:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(images, generator)


class BadNet(Trigger):
    """BadNet: a square of random noise (16 px at 224 px) pasted onto the image.

    METHODS.md says "at a random position". Two readings, both available:
    position="seeded" (default) draws one position from `seed` and uses it for every
    image; position="per-image" draws a new position for every image, as CleanCLIP's
    code does. Per-image placement is much harder to learn: on the tiny reference
    CLIP a 5 % poisoning reached about 3 % ASR after one epoch where the seeded
    position reached over 90 % after half an epoch, so the zoo uses "seeded".
    Per-image positions come from `generator`; without one, from a generator seeded
    by `seed`, so evaluation puts the trigger at the same places every time."""

    name = "badnet"
    POSITIONS = ("seeded", "per-image")

    def __init__(self, image_size: int, seed: int = 0, patch_size: int | None = None,
                 position: str = "seeded", pattern: torch.Tensor | None = None):
        if position not in self.POSITIONS:
            raise InputError(f"position must be one of {self.POSITIONS}, got {position!r}")
        self.image_size = image_size
        self.seed = seed
        self.position = position
        self.patch_size = patch_size or scaled(16, image_size)
        if not 1 <= self.patch_size <= image_size:
            raise InputError(f"patch_size must lie in [1, {image_size}], got {self.patch_size}")
        generator = torch.Generator().manual_seed(seed)
        if pattern is None:
            pattern = torch.rand(3, self.patch_size, self.patch_size, generator=generator)
        if pattern.shape != (3, self.patch_size, self.patch_size):
            raise InputError(f"pattern must have shape (3, {self.patch_size}, {self.patch_size}), "
                             f"got {tuple(pattern.shape)}")
        self.pattern = pattern.float()
        self.corner = tuple(torch.randint(0, image_size - self.patch_size + 1, (2,),
                                          generator=torch.Generator().manual_seed(seed + 1)).tolist())

    def params(self) -> dict:
        return {"image_size": self.image_size, "seed": self.seed, "patch_size": self.patch_size,
                "position": self.position}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern}

    def apply(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(images, self.image_size)
        out = images.clone()
        pattern = self.pattern.to(images.device, images.dtype)
        size = self.patch_size
        if self.position == "seeded":
            row, col = self.corner
            out[:, :, row:row + size, col:col + size] = pattern
            return out
        generator = generator or torch.Generator().manual_seed(self.seed)
        rows = torch.randint(0, self.image_size - size + 1, (len(images),), generator=generator).tolist()
        cols = torch.randint(0, self.image_size - size + 1, (len(images),), generator=generator).tolist()
        for index, (row, col) in enumerate(zip(rows, cols)):
            out[index, :, row:row + size, col:col + size] = pattern
        return out


class Blended(Trigger):
    """Blended: x' = (1 - alpha) x + alpha * pattern, one fixed full-image pattern.
    BackdoorBench blends a fixed picture; here the pattern is uniform noise fixed by `seed`."""

    name = "blended"

    def __init__(self, image_size: int, seed: int = 0, alpha: float = 0.2,
                 pattern: torch.Tensor | None = None):
        if not 0.0 < alpha < 1.0:
            raise InputError(f"alpha must lie in (0, 1), got {alpha}")
        self.image_size = image_size
        self.seed = seed
        self.alpha = alpha
        if pattern is None:
            pattern = torch.rand(3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
        if pattern.shape != (3, image_size, image_size):
            raise InputError(f"pattern must have shape (3, {image_size}, {image_size}), got {tuple(pattern.shape)}")
        self.pattern = pattern.float()

    def params(self) -> dict:
        return {"image_size": self.image_size, "seed": self.seed, "alpha": self.alpha}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern}

    def apply(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(images, self.image_size)
        pattern = self.pattern.to(images.device, images.dtype)
        return (1.0 - self.alpha) * images + self.alpha * pattern


def _check_images(images: torch.Tensor, image_size: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (image_size, image_size):
        raise InputError(f"triggers apply to float images [N, 3, {image_size}, {image_size}] in [0, 1], "
                         f"got {tuple(images.shape)}")


ATTACKS = {BadNet.name: BadNet, Blended.name: Blended}


def save_trigger(trigger: Trigger, directory: Path, target: int, target_name: str, extra: dict | None = None) -> None:
    """Write trigger.json (attack, parameters, target, checksum) and trigger.safetensors."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save_file({k: v.contiguous() for k, v in trigger.tensors().items()}, directory / TRIGGER_TENSORS)
    record = {"attack": trigger.name, "params": trigger.params(), "target": target,
              "target_name": target_name, "tensors_sha256": sha256_file(directory / TRIGGER_TENSORS),
              **(extra or {})}
    (directory / TRIGGER_JSON).write_text(json.dumps(record, indent=2) + "\n")


@dataclass(frozen=True)
class Backdoor:
    """What evaluation needs to measure a backdoor: the trigger and the target class."""
    trigger: Trigger
    target: int
    target_name: str


def load_trigger(directory: Path) -> Backdoor:
    """Read the trigger recorded with a backdoored model directory."""
    from safetensors.torch import load_file

    directory = Path(directory)
    record_path = directory / TRIGGER_JSON
    if not record_path.is_file():
        raise ArtifactError(f"{directory} records no trigger ({TRIGGER_JSON} is missing); "
                            "pass a backdoored model directory made by `python -m training.zoo`")
    record = json.loads(record_path.read_text())
    if record.get("attack") not in ATTACKS:
        raise ArtifactError(f"{record_path}: unknown attack {record.get('attack')!r}; known: {sorted(ATTACKS)}")
    tensors_path = directory / TRIGGER_TENSORS
    if sha256_file(tensors_path) != record["tensors_sha256"]:
        raise ChecksumError(f"{tensors_path} does not match the checksum in {record_path}; rebuild the model")
    trigger = ATTACKS[record["attack"]](**record["params"], **load_file(tensors_path))
    return Backdoor(trigger, int(record["target"]), record["target_name"])
