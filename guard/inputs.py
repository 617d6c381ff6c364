"""Turning what callers hand to `Guard.classify` into image tensors, in one place.

`to_tensor` checks one image and returns it as a CHW tensor (uint8, or float in
[0, 1]); `prepare_batch` runs a list of them through the artifact's `Preprocess`.
Everything that cannot be an image raises `InputError` saying what is accepted.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InputError
from .preprocess import Preprocess

# PIL reports unreadable or non-image data with any of these, depending on the format.
_PIL_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

ACCEPTED = ("a PIL image, an image file path (str or pathlib.Path), a numpy array HxW, HxWx1 or HxWx3 "
            "(uint8, or float in [0, 1]), or a torch tensor CHW with C = 1 or 3 (uint8, or float in [0, 1])")


def to_tensor(item) -> torch.Tensor:
    """One image -> CHW tensor with C in {1, 3}: uint8 (0..255) or float (0..1)."""
    if isinstance(item, Image.Image):
        return _from_pil(item)
    if isinstance(item, (str, os.PathLike)):
        return _from_path(item)
    if isinstance(item, np.ndarray):
        return _from_array(item)
    if isinstance(item, torch.Tensor):
        return _from_tensor(item)
    raise InputError(f"cannot read an image from a {type(item).__name__}; expected {ACCEPTED}")


def prepare_batch(items: Sequence, preprocess: Preprocess, device: Optional[torch.device] = None,
                  first_index: int = 0) -> torch.Tensor:
    """Images of any sizes -> normalised model input [N, 3, S, S] on `device`.

    first_index: position of items[0] in the caller's list, so an error names the
    input the caller knows ("input 3: ...")."""
    if len(items) == 0:
        raise InputError("no images to prepare")
    resized = []
    for index, item in enumerate(items, start=first_index):
        try:
            image = to_tensor(item)
        except InputError as error:
            raise InputError(f"input {index}: {error}") from error
        # Sizes differ from image to image, so each is resized on its own before stacking.
        resized.append(preprocess.resize(image.unsqueeze(0).to(device)))
    return preprocess.normalize(torch.cat(resized))


def _from_pil(image: Image.Image, source: str = "the PIL image") -> torch.Tensor:
    try:
        # Phones store rotation as an EXIF tag; without applying it the model sees the photo sideways.
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    except _PIL_READ_ERRORS as error:  # a lazily opened image decodes only here
        raise InputError(f"{source} could not be decoded ({error})") from error
    return _from_array(np.asarray(rgb))


def _from_path(path) -> torch.Tensor:
    source = repr(os.fspath(path))
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here, with its path
            return _from_pil(image, source)
    except InputError:
        raise  # already says what is wrong (InputError is a ValueError, caught below otherwise)
    except FileNotFoundError as error:
        raise InputError(f"{source}: no such file") from error
    except _PIL_READ_ERRORS as error:
        raise InputError(f"{source} is not a readable image ({error})") from error


def _from_array(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise InputError(f"a numpy image must be HxW, HxWx1 or HxWx3, got shape {array.shape}")
    _check_kind(array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating), array.dtype, array.shape[:2])
    if array.dtype == np.uint8:
        # A copy: the caller's array may be read-only (PIL's are) or change after this call.
        image = torch.from_numpy(array.copy())
    else:
        image = torch.from_numpy(array.astype(np.float32))  # astype copies too
        _check_range(image)
    return image.permute(2, 0, 1)


def _from_tensor(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        hint = "; pass a batch as a list of CHW tensors" if tensor.ndim == 4 else ""
        raise InputError(f"a torch image must be CHW with C = 1 or 3, got shape {tuple(tensor.shape)}{hint}")
    _check_kind(tensor.dtype == torch.uint8 or tensor.is_floating_point(), tensor.dtype, tuple(tensor.shape[1:]))
    tensor = tensor.detach()
    if tensor.is_floating_point():
        _check_range(tensor)
    return tensor


def _check_kind(supported_dtype: bool, dtype, height_width) -> None:
    if not supported_dtype:
        raise InputError(f"image values must be uint8 (0..255) or float (0..1), got {dtype}; expected {ACCEPTED}")
    if 0 in height_width:
        raise InputError(f"the image is empty (height x width {tuple(height_width)})")


def _check_range(image: torch.Tensor) -> None:
    if not torch.isfinite(image).all():
        raise InputError("the image has NaN or infinite values")
    low, high = image.min().item(), image.max().item()
    if low < 0.0 or high > 1.0:
        raise InputError(f"float images must lie in [0, 1], got values in [{low:g}, {high:g}]; "
                         "divide 0..255 values by 255 or pass uint8")
