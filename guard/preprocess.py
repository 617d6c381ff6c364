"""The one image preprocessing of clip-guard, on tensors.

Training, evaluation and the runtime all go through `Preprocess`: images become
float RGB in [0, 1] at the model's resolution (`resize`), triggers and
perturbations act there, then `normalize` applies the model's mean and std.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import InputError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class Preprocess:
    """image_size: side of the square model input. resize_mode 'shortest' scales the
    shorter side to image_size and centre-crops (open_clip's default); 'squash'
    resizes both sides to image_size."""
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise InputError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InputError(f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def from_open_clip(cls, cfg: dict) -> "Preprocess":
        """From an open_clip preprocess_cfg (keys size, mean, std, interpolation, resize_mode)."""
        size = cfg["size"]
        if isinstance(size, (list, tuple)):
            if size[0] != size[1]:
                raise InputError(f"only square model inputs are supported, got {size}")
            size = size[0]
        return cls(int(size), tuple(cfg["mean"]), tuple(cfg["std"]),
                   cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"))

    def to_open_clip(self) -> dict:
        return {"size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]),
                   data.get("interpolation", "bicubic"), data.get("resize_mode", "shortest"))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] uint8 (0..255) or float (0..1), C in {1, 3} -> float [N, 3, S, S] in [0, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise InputError(f"expected images of shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif not images.is_floating_point():
            raise InputError(f"images must be uint8 or floating point, got {images.dtype}")
        else:
            images = images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        height, width = images.shape[-2:]
        side = self.image_size
        if self.resize_mode == "squash":
            target = (side, side)
        elif height <= width:
            target = (side, max(side, int(side * width / height)))
        else:
            target = (max(side, int(side * height / width)), side)
        if (height, width) != target:
            smooth = self.interpolation != "nearest"
            images = F.interpolate(images, size=target, mode=self.interpolation,
                                   align_corners=False if smooth else None, antialias=smooth)
            images = images.clamp_(0.0, 1.0)
        top, left = (target[0] - side) // 2, (target[1] - side) // 2
        return images[:, :, top:top + side, left:left + side].contiguous()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.resize(images))
