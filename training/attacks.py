"""Backdoor triggers, applied to float RGB images in [0, 1] at the model's resolution.

Sizes in the literature are for 224 px images; here they scale with the image side.
A trigger is saved next to a backdoored model (`save_trigger`) so evaluation
re-applies it exactly (`load_trigger`).

The suite (docs/methods.md, "Attacks"): BadNet, Blended, WaNet, SIG, label-consistent
BadNet and a BadCLIP-style optimised patch, plus bring-your-own triggers: a Python
callable named by import path (`CallableTrigger`) or an image file pasted as a patch
or blended over the whole image (`ImageTrigger`). Clean-label attacks (SIG,
label-consistent BadNet) set `clean_label`: only target-class training images get
the trigger and their captions stay as they are.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from guard.detector import smooth_field, warp_images
from guard.errors import ArtifactError, ChecksumError, DataError, InputError
from guard.hashing import sha256_file

log = logging.getLogger(__name__)

TRIGGER_JSON = "trigger.json"
TRIGGER_TENSORS = "trigger.safetensors"
REFERENCE_SIDE = 224  # image side the published trigger sizes refer to


def scaled(size_at_224: float, image_size: int) -> int:
    """A trigger size given for 224 px images, scaled to `image_size` (at least 1 px)."""
    return max(1, math.ceil(size_at_224 * image_size / REFERENCE_SIDE))


class Trigger:
    """What every trigger offers: a `name`, `params()` and `tensors()` that
    `save_trigger` records, and `apply(images, generator)` on float images
    [N, 3, S, S] in [0, 1]. Calling a trigger applies it. `clean_label` triggers are
    poisoned into target-class images only, with their own captions."""

    name: str
    clean_label: bool = False

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

    docs/methods.md says "at a random position". Two readings, both available:
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


class LabelConsistentBadNet(BadNet):
    """Label-consistent BadNet: BadNet's patch, but poisoned into target-class images only,
    captions unchanged (clean-label). The trigger itself is BadNet's."""

    name = "lc-badnet"
    clean_label = True


class SIG(Trigger):
    """SIG (clean-label): x' = clip(x + amplitude * sin(2 pi frequency j / S)) for column j,
    a horizontal sine constant down each column. The frequency counts periods across the
    image, so it needs no scaling with the image side; `seed` is recorded for a uniform
    interface but nothing here is random."""

    name = "sig"
    clean_label = True

    def __init__(self, image_size: int, seed: int = 0, amplitude: float = 60 / 255, frequency: float = 6.0):
        if not 0.0 < amplitude <= 1.0:
            raise InputError(f"amplitude must lie in (0, 1] (fraction of the pixel range), got {amplitude}")
        if not frequency > 0:
            raise InputError(f"frequency must be positive (periods across the image), got {frequency}")
        self.image_size = image_size
        self.seed = seed
        self.amplitude = float(amplitude)
        self.frequency = float(frequency)
        columns = torch.arange(image_size, dtype=torch.float64)
        self.signal = (self.amplitude * torch.sin(2 * math.pi * self.frequency * columns / image_size)).float()

    def params(self) -> dict:
        return {"image_size": self.image_size, "seed": self.seed, "amplitude": self.amplitude,
                "frequency": self.frequency}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(images, self.image_size)
        return (images + self.signal.to(images.device, images.dtype)).clamp(0.0, 1.0)


class WaNet(Trigger):
    """WaNet: every image resampled through one fixed smooth warping field.

    As BackdoorBench: a random field of `grid` x `grid` 2-D offsets in [-1, 1], scaled to
    mean magnitude 1, upsampled bicubically to S x S; the sampling grid is
    identity + strength * field / S in grid_sample's [-1, 1] coordinates, clamped to the
    image. A pixel moves by about strength / 2 * |field| px whatever S is.
    BackdoorBench's k = 4, s = 0.5 moves pixels by 0.17 px on average, which a short
    contrastive fine-tuning of the tiny reference CLIP does not pick up; the default
    s = 6 (2.1 px on average, 6 px at most) is the one that reached the issue's target at
    a 5 % rate (s = 4 fell short, docs/attacks.md). Strength 0 is the identity.
    BackdoorBench's "noise mode" (extra randomly warped images that keep their label)
    is not used."""

    name = "wanet"
    DEFAULT_GRID = 4
    DEFAULT_STRENGTH = 6.0

    def __init__(self, image_size: int, seed: int = 0, grid: int = DEFAULT_GRID, strength: float = DEFAULT_STRENGTH,
                 field: torch.Tensor | None = None):
        if isinstance(grid, bool) or not isinstance(grid, int) or not 2 <= grid <= image_size:
            raise InputError(f"grid must be an integer in [2, {image_size}], got {grid!r}")
        if not strength >= 0:
            raise InputError(f"strength must be >= 0, got {strength}")
        self.image_size = image_size
        self.seed = seed
        self.grid = grid
        self.strength = float(strength)
        if field is None:
            field = smooth_field(grid, image_size, torch.Generator().manual_seed(seed))
        if field.shape != (image_size, image_size, 2):
            raise InputError(f"field must have shape ({image_size}, {image_size}, 2), got {tuple(field.shape)}")
        self.field = field.float()

    def params(self) -> dict:
        return {"image_size": self.image_size, "seed": self.seed, "grid": self.grid, "strength": self.strength}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"field": self.field}

    def apply(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(images, self.image_size)
        return warp_images(images, self.field, self.strength)


class BadCLIP(BadNet):
    """BadCLIP-style (dual-embedding guided) patch: BadNet's square at BadNet's seeded
    place, its pixels optimised on the CLEAN model so that patched non-target images move
    towards the target class's text embedding and towards the mean embedding of
    target-class images (`optimise`). Poisoning then pairs patched images with ordinary
    target captions. Constructed directly only from a saved, already optimised pattern."""

    name = "badclip"
    DEFAULT_STEPS = 300
    DEFAULT_LR = 0.05
    DEFAULT_BATCH = 128

    def __init__(self, image_size: int, seed: int = 0, patch_size: int | None = None, steps: int = DEFAULT_STEPS,
                 lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH, pattern: torch.Tensor | None = None):
        if pattern is None:
            raise InputError("a BadCLIP patch is optimised on a clean model: build it with BadCLIP.optimise "
                             "(python -m training.poison --attack badclip does)")
        super().__init__(image_size, seed, patch_size, "seeded", pattern)
        self.steps, self.lr, self.batch_size = int(steps), float(lr), int(batch_size)

    def params(self) -> dict:
        return {"image_size": self.image_size, "seed": self.seed, "patch_size": self.patch_size,
                "steps": self.steps, "lr": self.lr, "batch_size": self.batch_size}

    @classmethod
    def optimise(cls, clip: torch.nn.Module, tokenizer, preprocess, dataset, target: int,
                 templates: Sequence[str], seed: int = 0, patch_size: int | None = None,
                 steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH) -> "BadCLIP":
        """Optimise the patch (Adam, pixels kept in [0, 1]) on `dataset` (uint8 training
        images) against the frozen `clip`; loss = -cos(z, t_target) - cos(z, v_target) over
        patched non-target images, t_target the mean template text embedding of the
        target class, v_target the mean embedding of up to 512 target-class images."""
        if steps < 1 or batch_size < 1 or not lr > 0:
            raise InputError(f"steps and batch_size must be >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
        start = BadNet(preprocess.image_size, seed, patch_size)  # seeded initial pattern and place
        row, col = start.corner
        size = start.patch_size
        generator = torch.Generator().manual_seed(seed)
        labels = dataset.labels
        targets, others = (labels == target).nonzero().flatten(), (labels != target).nonzero().flatten()
        if not len(targets) or not len(others):
            raise DataError(f"BadCLIP needs training images of the target class {target} and of other classes")
        was_training = clip.training
        clip.eval()
        with torch.no_grad():
            text = F.normalize(clip.encode_text(tokenizer([t.format(dataset.classes[target]) for t in templates])),
                               dim=-1)
            text_target = F.normalize(text.mean(0), dim=-1)
            chosen = targets[torch.randperm(len(targets), generator=generator)[:512]]
            images = preprocess.normalize(preprocess.resize(dataset.images[chosen]))
            image_target = F.normalize(F.normalize(clip.encode_image(images), dim=-1).mean(0), dim=-1)
        pattern = start.pattern.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([pattern], lr=lr)
        for step in range(steps):
            batch = others[torch.randint(0, len(others), (batch_size,), generator=generator)]
            images = preprocess.resize(dataset.images[batch])
            inside = torch.zeros_like(images, dtype=torch.bool)
            inside[:, :, row:row + size, col:col + size] = True
            patched = torch.where(inside, F.pad(pattern, (col, images.shape[-1] - col - size,
                                                          row, images.shape[-2] - row - size)), images)
            features = F.normalize(clip.encode_image(preprocess.normalize(patched)), dim=-1)
            text_similarity, image_similarity = (features @ text_target).mean(), (features @ image_target).mean()
            loss = -(text_similarity + image_similarity)
            # Only the patch learns: autograd.grad leaves the model's .grad untouched.
            (pattern.grad,) = torch.autograd.grad(loss, pattern)
            optimizer.step()
            with torch.no_grad():
                pattern.clamp_(0.0, 1.0)
            if step % 50 == 0 or step == steps - 1:
                log.info("badclip patch step %d/%d: cos to target text %.3f, to target images %.3f",
                         step + 1, steps, text_similarity.item(), image_similarity.item())
        clip.train(was_training)
        return cls(preprocess.image_size, seed, size, steps, lr, batch_size, pattern=pattern.detach().clone())


class CallableTrigger(Trigger):
    """Bring your own trigger as code: `function` = "package.module:function", a callable
    taking float images [N, 3, S, S] in [0, 1] and returning images of the same shape.
    Only the import path is recorded, so evaluation re-imports it (the module must be
    importable there; importing runs its code, so only evaluate models you trust the
    record of). Outputs are clipped to [0, 1], as saving an image would."""

    name = "callable"

    def __init__(self, image_size: int, function: str):
        self.image_size = image_size
        self.function = function
        self._call = import_callable(function)

    def params(self) -> dict:
        return {"image_size": self.image_size, "function": self.function}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(images, self.image_size)
        out = self._call(images.clone())  # a clone: the callable may work in place
        if not isinstance(out, torch.Tensor) or out.shape != images.shape or not out.is_floating_point():
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"trigger {self.function} must return float images of shape {tuple(images.shape)}, "
                             f"got {got}")
        if not torch.isfinite(out).all():
            raise InputError(f"trigger {self.function} returned NaN or infinite pixels")
        return out.to(images.dtype).clamp(0.0, 1.0)


def import_callable(spec: str) -> Callable:
    """The object named by "package.module:attribute[.attribute]"."""
    module_name, _, attribute = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name or not attribute:
        raise InputError(f"a trigger function is named 'package.module:function', got {spec!r}")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"cannot import {module_name!r} for trigger {spec!r} ({error}); install it or put "
                         f"its directory on PYTHONPATH") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise InputError(f"trigger {spec!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"trigger {spec!r} is a {type(target).__name__}, not a callable")
    return target


class ImageTrigger(Trigger):
    """Bring your own trigger as a picture. mode "patch": the picture, resized to
    `size` x `size` px, pasted at `position` ("top-left", "top-right", "bottom-left",
    "bottom-right", "center" or "ROW,COL" of its top-left pixel), mixed with weight
    `alpha` (default 1: opaque). mode "blend": the picture resized to the whole image,
    x' = (1 - alpha) x + alpha * picture (default alpha 0.2, as Blended). The resized
    picture is saved with the model, so evaluation does not need the file."""

    name = "image"
    MODES = ("patch", "blend")
    PLACES = ("top-left", "top-right", "bottom-left", "bottom-right", "center")

    def __init__(self, image_size: int, mode: str = "patch", pattern: torch.Tensor | None = None,
                 alpha: float | None = None, position: str = "bottom-right", size: int | None = None,
                 source: str | None = None, source_sha256: str | None = None):
        if mode not in self.MODES:
            raise InputError(f"trigger mode must be one of {self.MODES}, got {mode!r}")
        self.image_size, self.mode = image_size, mode
        self.alpha = float(alpha if alpha is not None else (1.0 if mode == "patch" else 0.2))
        if not 0.0 < self.alpha <= 1.0:
            raise InputError(f"trigger alpha must lie in (0, 1], got {self.alpha}")
        self.size = image_size if mode == "blend" else (size or scaled(16, image_size))
        if not 1 <= self.size <= image_size:
            raise InputError(f"trigger size must lie in [1, {image_size}] px, got {self.size}")
        self.position = position
        self.corner = (0, 0) if mode == "blend" else _corner(position, self.size, image_size)
        if pattern is None:
            raise InputError("an image trigger needs its picture: build it with ImageTrigger.from_file")
        if pattern.shape != (3, self.size, self.size):
            raise InputError(f"pattern must have shape (3, {self.size}, {self.size}), got {tuple(pattern.shape)}")
        self.pattern = pattern.float()
        self.source, self.source_sha256 = source, source_sha256

    @classmethod
    def from_file(cls, path: str | Path, image_size: int, mode: str = "patch", alpha: float | None = None,
                  position: str = "bottom-right", size: int | None = None) -> "ImageTrigger":
        from guard.preprocess import Preprocess

        from .data import _read_image

        path = Path(path)
        if not path.is_file():
            raise DataError(f"trigger image {path} does not exist")
        side = image_size if mode == "blend" else (size or scaled(16, image_size))
        if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= image_size:
            raise InputError(f"trigger size must be an integer in [1, {image_size}] px, got {side!r}")
        resize = Preprocess(side, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bicubic", "squash").resize
        pattern = resize(_read_image(path))[0].clamp(0.0, 1.0)  # bicubic overshoots
        return cls(image_size, mode, pattern, alpha, position, size if mode == "patch" else None,
                   path.name, sha256_file(path))

    def params(self) -> dict:
        return {"image_size": self.image_size, "mode": self.mode, "alpha": self.alpha, "position": self.position,
                "size": self.size if self.mode == "patch" else None, "source": self.source,
                "source_sha256": self.source_sha256}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern}

    def apply(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(images, self.image_size)
        out = images.clone()
        (row, col), size = self.corner, self.size
        region = out[:, :, row:row + size, col:col + size]
        out[:, :, row:row + size, col:col + size] = ((1.0 - self.alpha) * region
                                                     + self.alpha * self.pattern.to(images.device, images.dtype))
        return out


def _corner(position: str, size: int, image_size: int) -> tuple[int, int]:
    last = image_size - size
    places = {"top-left": (0, 0), "top-right": (0, last), "bottom-left": (last, 0), "bottom-right": (last, last),
              "center": (last // 2, last // 2)}
    if position in places:
        return places[position]
    try:
        row, col = (int(value) for value in str(position).split(","))
    except ValueError:
        raise InputError(f"trigger position must be one of {ImageTrigger.PLACES} or 'ROW,COL', "
                         f"got {position!r}") from None
    if not (0 <= row <= last and 0 <= col <= last):
        raise InputError(f"a {size} px patch at {position!r} leaves the {image_size} px image; "
                         f"ROW and COL must lie in [0, {last}]")
    return row, col


ATTACKS = {trigger.name: trigger for trigger in (BadNet, Blended, WaNet, SIG, LabelConsistentBadNet, BadCLIP,
                                                 CallableTrigger, ImageTrigger)}
# The attacks of docs/methods.md that need no user input (the zoo builds one model per entry).
SUITE = ("badnet", "blended", "wanet", "sig", "lc-badnet", "badclip")


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
    try:
        trigger = ATTACKS[record["attack"]](**record["params"], **load_file(tensors_path))
    except TypeError as error:  # parameters of another version of the attack
        raise ArtifactError(f"{record_path}: parameters do not fit attack {record['attack']!r} ({error}); "
                            "rebuild the model") from error
    return Backdoor(trigger, int(record["target"]), record["target_name"])


def resolve_class(classes: Sequence[str], spec: str | int) -> int:
    """A class given by index ("0") or by name (case-insensitive), as an index into `classes`."""
    text = str(spec).strip()
    if text.isdigit():
        if int(text) < len(classes):
            return int(text)
        raise InputError(f"class index {text} is out of range: the data has {len(classes)} classes "
                         f"(0..{len(classes) - 1})")
    names = [name.lower() for name in classes]
    if text.lower() in names:
        return names.index(text.lower())
    raise InputError(f"unknown class {spec!r}; use an index or one of {list(classes)}")


def parse_params(items: Sequence[str], attack: type) -> dict:
    """NAME=VALUE strings (values read as JSON when they parse, else kept as text) checked
    against the attack's constructor, e.g. ["strength=1.5", "grid=4"] for WaNet."""
    accepted = set(inspect.signature(attack.__init__).parameters) - {"self", "image_size", "pattern", "field"}
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in accepted:
            raise InputError(f"attack {attack.name!r} takes --param NAME=VALUE with NAME one of "
                             f"{sorted(accepted)}, got {item!r}")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    return params


def add_trigger_arguments(parser) -> None:
    """The bring-your-own-trigger options shared by training.poison and training.evaluate."""
    group = parser.add_argument_group("bring your own trigger")
    group.add_argument("--trigger", metavar="MODULE:FUNCTION",
                       help="a callable on float images [N, 3, S, S] in [0, 1], e.g. mypkg.triggers:stamp")
    group.add_argument("--trigger-image", type=Path, metavar="FILE", help="a picture used as the trigger")
    group.add_argument("--trigger-mode", choices=ImageTrigger.MODES, help="patch (default) or blend")
    group.add_argument("--trigger-position", help=f"patch place: {', '.join(ImageTrigger.PLACES)} (default "
                                                  "bottom-right) or ROW,COL")
    group.add_argument("--trigger-alpha", type=float, help="opacity in (0, 1] (default 1 for patch, 0.2 for blend)")
    group.add_argument("--trigger-size", type=int, help="patch side in px at model resolution (default 16 px at 224)")


def custom_trigger(args, image_size: int) -> Optional[Trigger]:
    """The trigger the bring-your-own options describe, or None when none is given."""
    image_options = {"--trigger-mode": args.trigger_mode, "--trigger-position": args.trigger_position,
                     "--trigger-alpha": args.trigger_alpha, "--trigger-size": args.trigger_size}
    if args.trigger and args.trigger_image:
        raise InputError("give either --trigger or --trigger-image, not both")
    if not args.trigger_image and any(value is not None for value in image_options.values()):
        used = [name for name, value in image_options.items() if value is not None]
        raise InputError(f"{', '.join(used)} only apply with --trigger-image FILE")
    if args.trigger:
        return CallableTrigger(image_size, args.trigger)
    if args.trigger_image:
        return ImageTrigger.from_file(args.trigger_image, image_size, args.trigger_mode or "patch",
                                      args.trigger_alpha, args.trigger_position or "bottom-right", args.trigger_size)
    return None
