"""The perturbations of perturbation resistivity (PR), on float images in [0, 1].

docs/methods.md lists Gaussian noise (std 0.01, 0.03), Gaussian blur (kernel 3, 5),
colour jitter, horizontal flip and the BadNet, Blended and BadCLIP triggers.
Random ones are seeded so PR is reproducible. BadCLIP's trigger is an optimised
patch that comes with the attack suite, not here.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from guard import alerts

from .attacks import BadNet, Blended

Perturbation = Callable[[torch.Tensor], torch.Tensor]


def gaussian_noise(std: float, seed: int = 0) -> Perturbation:
    """Seeded Gaussian noise, a fresh draw for each image of a batch (guard's gaussian_noise)."""
    return partial(alerts.gaussian_noise, std=std, seed=seed, per_image=True)


def gaussian_blur(kernel_size: int) -> Perturbation:
    """Separable Gaussian blur with torchvision's default sigma (guard's gaussian_blur)."""
    return partial(alerts.gaussian_blur, size=kernel_size)


def color_jitter(strength: float = 0.4, seed: int = 0) -> Perturbation:
    """Per-image brightness, contrast and saturation factors drawn from [1 - s, 1 + s]."""
    def perturb(images: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        factors = 1 + strength * (2 * torch.rand(3, len(images), 1, 1, 1, generator=generator) - 1)
        brightness, contrast, saturation = factors.to(images)
        out = (images * brightness).clamp(0.0, 1.0)
        mean_gray = _luma(out).mean(dim=(2, 3), keepdim=True)
        out = ((out - mean_gray) * contrast + mean_gray).clamp(0.0, 1.0)
        gray = _luma(out)
        return ((out - gray) * saturation + gray).clamp(0.0, 1.0)
    return perturb


def _luma(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 grey level [N, 1, H, W] of RGB images."""
    return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)


def horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


def standard_perturbations(image_size: int, seed: int = 0) -> dict[str, Perturbation]:
    """The PR perturbation set of docs/methods.md that needs no trained attack."""
    return {
        "noise_0.01": gaussian_noise(0.01, seed),
        "noise_0.03": gaussian_noise(0.03, seed),
        "blur_3": gaussian_blur(3),
        "blur_5": gaussian_blur(5),
        "color_jitter": color_jitter(0.4, seed),
        "hflip": horizontal_flip,
        "badnet": BadNet(image_size, seed=seed),
        "blended": Blended(image_size, seed=seed),
    }
