"""Turning what callers hand to `Guard.classify` into image tensors, in one place.

`to_tensor` checks one image and returns it as a CHW tensor (uint8, or float in
[0, 1]); `prepare_batch` runs a list of them through the artifact's `Preprocess`.
Every input either becomes an image or raises `InputError` (a ValueError) saying
what is wrong and what to do; in a list, the error names the item's index.

Accepted, and how each is read:

- PIL images, of any mode. The EXIF orientation is applied first (as a photo viewer
  shows it; unreadable EXIF is ignored with a warning). Then: RGB as is; L, 1, P, CMYK,
  YCbCr, LAB, HSV, RGBX through Pillow's RGB conversion; images with transparency
  (RGBA, LA, PA, RGBa, La, P or L/RGB with a transparent colour) are composited on
  white, so the model sees what a person sees and content hidden in fully transparent
  pixels (a trigger, say) cannot reach it; 16-bit grey (I;16, I;16B, I;16L, I;16N) is
  scaled by 1/65535, not clipped; mode I is read as 16-bit grey too (what 16-bit PNG
  and TIFF files decode to) and must lie in 0..65535; mode F follows the float
  convention below and must lie in [0, 1]. Multi-frame files give their first frame.
- Image files: a path (str or os.PathLike), or a binary file object (io.BytesIO,
  open(path, "rb"), an upload stream; read from its start, not closed). Raw `bytes`
  are refused: wrap them in io.BytesIO. Only the header is read before the size check,
  so a decompression bomb is refused before any pixel is decoded.
- numpy arrays HxW, HxWx1 or HxWx3 and torch tensors CHW with C = 1 or 3: uint8
  (0..255) or floating point in [0, 1] (NaN, infinities and values outside [0, 1] are
  refused, never clipped). Any strides, byte order and read-only arrays are fine.

Size limits: an image may have at most `MAX_PIXELS` pixels (Pillow's own limit,
PIL.Image.MAX_IMAGE_PIXELS, also applies to files), and its resized copy at the
model's resolution (the shorter side scaled to the input size) at most as many, which
bounds the aspect ratio: about 1:1300 for a 224-pixel model. Raise `MAX_PIXELS` for
trusted inputs if memory allows; decoding and resizing take about 16 bytes per pixel.
"""
from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .preprocess import Preprocess

log = logging.getLogger(__name__)

MAX_PIXELS = 64 * 1024 * 1024
"""Most pixels (height x width) one image may have: 64 Mi, e.g. 8192 x 8192."""

# What Pillow's format plugins raise on malformed or truncated data (its fuzzers see all of
# these). Caught only around Pillow's own decoding calls, never around clip-guard code.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
                  ZeroDivisionError, OverflowError)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # the warning, if made an error

_FORMATS = "such as PNG, JPEG, WebP, GIF, BMP, TIFF"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

ACCEPTED = ("a PIL image, an image file path (str or pathlib.Path), a binary file object (io.BytesIO), "
            "a numpy array HxW, HxWx1 or HxWx3 (uint8, or float in [0, 1]), or a torch tensor CHW with "
            "C = 1 or 3 (uint8, or float in [0, 1])")


def image_files(directory: Path) -> list[Path]:
    """Every non-hidden file under directory (recursively, sorted) with an extension Pillow reads."""
    extensions = set(Image.registered_extensions())
    return [path for path in sorted(Path(directory).rglob("*"))
            if path.suffix.lower() in extensions and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(directory).parts)]


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
    if isinstance(item, io.TextIOBase):
        raise InputError(f"{_file_name(item)} is open in text mode; open image files with mode 'rb'")
    if callable(getattr(item, "read", None)):
        return _from_file(item)
    raise InputError(f"cannot read an image from a {type(item).__name__}; expected {ACCEPTED}{_type_hint(item)}")


def resize_batch(items: Sequence, preprocess: Preprocess, device: torch.device | None = None,
                 first_index: int | None = 0) -> torch.Tensor:
    """Images of any sizes -> resized float images [N, 3, S, S] in [0, 1] on `device`.

    first_index: position of items[0] in the caller's list, so an error names the
    input the caller knows ("input 3: ..."); None for a single image, named by nothing."""
    if len(items) == 0:
        raise InputError("no images to prepare")
    resized = []
    for index, item in enumerate(items, start=first_index or 0):
        try:
            image = to_tensor(item)
            _check_resizable(image.shape[-2:], preprocess)
            # Sizes differ from image to image, so each is resized on its own before stacking.
            resized.append(preprocess.resize(image.unsqueeze(0).to(device)))
        except InputError as error:
            if first_index is None:
                raise
            raise InputError(f"input {index}: {error}") from error
    return torch.cat(resized)


def prepare_batch(items: Sequence, preprocess: Preprocess, device: torch.device | None = None,
                  first_index: int | None = 0) -> torch.Tensor:
    """Images of any sizes -> normalised model input [N, 3, S, S] (see resize_batch)."""
    return preprocess.normalize(resize_batch(items, preprocess, device, first_index))


# --- PIL images and files -----------------------------------------------------------------

def _from_pil(image: Image.Image, source: str = "the PIL image") -> torch.Tensor:
    _check_pixels(image.height, image.width, source)
    try:
        image.load()  # a lazily opened image decodes here
    except _BOMB_ERRORS as error:
        raise _too_large(source, error) from error
    except _DECODE_ERRORS as error:
        raise InputError(f"{source} could not be decoded: it is truncated or damaged ({error})") from error
    except (AssertionError, AttributeError) as error:  # what Pillow raises when the file is gone
        raise InputError(f"{source} could not be decoded: its file was closed before it was loaded; call "
                         "image.load() inside the `with Image.open(...)` block") from error
    image = _upright(image, source)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float32) / 65535.0
        return _from_array(grey, f"{source} (mode {mode})")
    if mode == "I":
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise InputError(f"{source} has mode I with values in [{low}, {high}]; clip-guard reads mode I as "
                             "16-bit grey (0..65535): scale it into that range, or convert it to L or RGB")
        return _from_array(values.astype(np.float32) / 65535.0, f"{source} (mode I)")
    if mode == "F":
        return _from_array(np.asarray(image), f"{source} (mode F)")
    try:
        if mode in _ALPHA_MODES or "transparency" in image.info:
            rgb = _on_white(image)
        else:
            rgb = image.convert("RGB")
    except _DECODE_ERRORS as error:
        raise InputError(f"{source} has mode {mode}, which Pillow cannot convert to RGB ({error}); "
                         "convert it to RGB first") from error
    return _from_array(np.asarray(rgb), source)


def _upright(image: Image.Image, source: str) -> Image.Image:
    """The image as a viewer shows it: phones store rotation as an EXIF tag."""
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as error:
        # The pixels decoded; only the metadata is damaged. A viewer shows such a photo as stored.
        log.warning("%s: its EXIF data is unreadable (%s); classifying it without applying an orientation",
                    source, error)
        return image


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with transparency over opaque white, as RGB."""
    if image.mode == "La":  # premultiplied; Pillow converts it only to LA
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _from_path(path) -> torch.Tensor:
    try:
        name = os.fspath(path)
    except TypeError as error:  # an os.PathLike whose __fspath__ returns something else
        raise InputError(f"{path!r} is not a usable path ({error})") from error
    source = repr(name)
    try:
        return _decode(path, source)
    except InputError:
        raise  # already says what is wrong (InputError is a ValueError, caught below otherwise)
    except FileNotFoundError as error:
        hint = "; URLs are not downloaded: fetch the image first" if "://" in str(name) else ""
        raise InputError(f"{source}: no such file{hint}") from error
    except IsADirectoryError as error:
        raise InputError(f"{source} is a directory, not an image file") from error
    except PermissionError as error:
        raise InputError(f"{source} cannot be read: permission denied") from error
    except UnidentifiedImageError as error:
        if os.path.isfile(name) and os.path.getsize(name) == 0:
            raise InputError(f"{source} is an empty file (0 bytes)") from error
        raise InputError(f"{source} is not an image Pillow can read: it is damaged or truncated, or not in "
                         f"a format Pillow knows ({_FORMATS})") from error
    except _DECODE_ERRORS as error:
        raise InputError(f"{source} is not a readable image ({error})") from error


def _from_file(handle) -> torch.Tensor:
    source = _file_name(handle)
    try:
        return _decode(handle, source)
    except InputError:
        raise
    except UnidentifiedImageError as error:
        raise InputError(f"{source} holds no image Pillow can read: it is damaged or truncated, or not in a "
                         f"format Pillow knows ({_FORMATS})") from error
    except _DECODE_ERRORS as error:
        raise InputError(f"{source} could not be read as an image ({error}); pass a binary file object, "
                         "e.g. io.BytesIO(data) or open(path, 'rb')") from error


def _decode(source_file, source: str) -> torch.Tensor:
    """Open a path or file object, refuse it by its header size, then decode it."""
    try:
        opened = Image.open(source_file)  # reads the header only
    except _BOMB_ERRORS as error:
        raise _too_large(source, error) from error
    with opened as image:
        _check_pixels(image.height, image.width, source)
        try:
            image.load()  # decode now, so a truncated file fails here, with its name
        except _BOMB_ERRORS as error:
            raise _too_large(source, error) from error
        except _DECODE_ERRORS as error:
            raise InputError(f"{source} could not be decoded: it is truncated or damaged ({error})") from error
        return _from_pil(image, source)


def _file_name(handle) -> str:
    name = getattr(handle, "name", None)
    return f"the file object {name!r}" if isinstance(name, (str, bytes)) else f"the {type(handle).__name__}"


def _too_large(source: str, error: Exception) -> InputError:
    return InputError(f"{source} is too large to decode safely ({error}); downscale it first (limits: "
                      f"guard.inputs.MAX_PIXELS = {MAX_PIXELS:,} and PIL.Image.MAX_IMAGE_PIXELS)")


def _type_hint(item) -> str:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "; for encoded image bytes pass io.BytesIO(data)"
    if isinstance(item, (list, tuple)):
        return "; a list is a batch of images: pass pixel values as a numpy array instead"
    return ""


# --- arrays and tensors -------------------------------------------------------------------

def _from_array(array: np.ndarray, what: str = "a numpy image") -> torch.Tensor:
    if type(array) is not np.ndarray:
        array = np.asarray(array)  # np.matrix and other subclasses index differently
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise InputError(f"a numpy image must be HxW, HxWx1 or HxWx3, got shape {array.shape}"
                         f"{_array_shape_hint(array.shape)}")
    _check_kind(array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating), array.dtype, array.shape[:2])
    _check_pixels(array.shape[0], array.shape[1], what)
    if array.dtype == np.uint8:
        # A copy: the caller's array may be read-only (PIL's are), have negative strides, or
        # change after this call.
        image = torch.from_numpy(np.array(array, order="C"))
    else:
        _check_range(bool(np.isfinite(array).all()), lambda: (float(array.min()), float(array.max())), what)
        # A C-ordered float32 copy in native byte order; the range check ran first, so no overflow.
        image = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    return image.permute(2, 0, 1)


def _array_shape_hint(shape) -> str:
    if len(shape) == 3 and shape[2] == 4:
        return "; for RGBA pass Image.fromarray(array) (alpha is composited on white)"
    if len(shape) == 3 and shape[2] == 2:
        return "; for grey + alpha pass Image.fromarray(array, 'LA') (alpha is composited on white)"
    if len(shape) == 3 and shape[0] in (1, 3):
        return "; this looks channels-first: pass array.transpose(1, 2, 0)"
    if len(shape) == 4:
        return "; pass a batch as a list of images"
    return ""


def _from_tensor(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.layout != torch.strided:
        raise InputError(f"a torch image must be a dense tensor, got layout {tensor.layout}; pass tensor.to_dense()")
    if tensor.is_meta:
        raise InputError("the tensor is on the meta device and holds no values")
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        if tensor.ndim == 4:
            hint = "; pass a batch as a list of CHW tensors"
        elif tensor.ndim == 3 and tensor.shape[2] in (1, 3):
            hint = "; this looks channels-last (HWC): pass tensor.permute(2, 0, 1)"
        else:
            hint = ""
        raise InputError(f"a torch image must be CHW with C = 1 or 3, got shape {tuple(tensor.shape)}{hint}")
    _check_kind(tensor.dtype == torch.uint8 or tensor.is_floating_point(), tensor.dtype, tuple(tensor.shape[1:]))
    _check_pixels(tensor.shape[1], tensor.shape[2], "the torch image")
    tensor = tensor.detach()
    if tensor.is_floating_point():
        _check_range(bool(torch.isfinite(tensor).all()), lambda: (tensor.min().item(), tensor.max().item()),
                     "a float torch image")
    return tensor


# --- checks -------------------------------------------------------------------------------

def _check_kind(supported_dtype: bool, dtype, height_width) -> None:
    if not supported_dtype:
        raise InputError(f"image values must be uint8 (0..255) or float (0..1), got {dtype}; convert 0..255 "
                         "values with .astype(np.uint8) / .to(torch.uint8), or divide by the maximum value "
                         f"(65535 for 16 bits) for floats in [0, 1]; expected {ACCEPTED}")
    if 0 in tuple(height_width):
        raise InputError(f"the image is empty (height x width {tuple(height_width)})")


def _check_range(finite: bool, low_high, what: str) -> None:
    if not finite:
        raise InputError(f"{what} has NaN or infinite values; replace them (numpy or torch nan_to_num) "
                         "before classifying")
    low, high = low_high()
    if low < 0.0 or high > 1.0:
        raise InputError(f"float images must lie in [0, 1], but {what} has values in [{low:g}, {high:g}]; "
                         "divide 0..255 values by 255 or pass uint8")


def _check_pixels(height: int, width: int, source: str) -> None:
    if height * width > MAX_PIXELS:
        raise InputError(f"{source} is {width} x {height} = {height * width:,} pixels, more than clip-guard "
                         f"accepts ({MAX_PIXELS:,}, guard.inputs.MAX_PIXELS); downscale it first")


def _check_resizable(height_width, preprocess: Preprocess) -> None:
    """Refuse an aspect ratio whose resized copy (shorter side scaled to the model's input
    size, before the centre crop) would exceed MAX_PIXELS: a 1 x 1,000,000 strip would
    otherwise become a 224 x 224,000,000 float tensor."""
    if preprocess.resize_mode != "shortest":
        return  # squash resizes straight to the square input size
    height, width = (int(side) for side in height_width)
    short, long = min(height, width), max(height, width)
    side = preprocess.image_size
    resized = side * max(side, int(side * long / short))
    if resized > MAX_PIXELS:
        raise InputError(f"the image is {width} x {height}: its aspect ratio ({long / short:,.0f}:1) is too extreme "
                         f"to resize to the model's {side}-pixel input within {MAX_PIXELS:,} pixels; crop or pad "
                         "it closer to square")
