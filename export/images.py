"""The real images `python -m export.parity` compares compiled models on, without the training package.

    fashion-mnist   the 10,000 Fashion-MNIST test images, read from the same gzipped IDX file
                    (and the same directory: $CLIP_GUARD_FASHION_MNIST_DIR, else Debian's
                    /usr/share/datasets/fashion-mnist) as training.data, byte for byte
    a directory     every image file under its test/ sub-folder if it has one (an image folder
                    with a train/test split), else every image file under it, read as serving
                    reads them (guard.inputs) and resized to the artifact's input size

Parity needs no labels: any real image is a fair place to compare two models, so a folder
without a split is used whole rather than through a held-out subset.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from guard.errors import DataError, InputError
from guard.inputs import image_files, resize_batch
from guard.preprocess import Preprocess

FASHION_MNIST = "fashion-mnist"
# The same location and file as training.data's Fashion-MNIST test split.
FASHION_MNIST_ENV = "CLIP_GUARD_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions


def parity_images(source: str | os.PathLike, preprocess: Preprocess, limit: int | None = None) -> torch.Tensor:
    """Images [N, C, H, W] (uint8, or float in [0, 1]) from `source` (see the module docstring),
    the first `limit` of them if given."""
    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of images, got {limit}")
    name = os.fspath(source)
    if name == FASHION_MNIST:
        images = fashion_mnist_test_images()
        return images[:limit] if limit else images
    if Path(name).is_dir():
        return folder_images(Path(name), preprocess, limit)
    raise DataError(f"unknown image source {name!r}: use {FASHION_MNIST!r} or a directory of image files "
                    f"(digits and other training data sets: write their test images to a folder first)")


def fashion_mnist_test_images() -> torch.Tensor:
    """The Fashion-MNIST test images as uint8 [10000, 1, 28, 28]."""
    directory = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR)
    path = directory / FASHION_MNIST_TEST_IMAGES
    if not path.is_file():
        raise DataError(f"{path} is missing: run `apt-get install dataset-fashion-mnist`, or set "
                        f"{FASHION_MNIST_ENV} to a directory holding the gzipped IDX files")
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a readable gzip file: {error}") from error
    if len(data) < 16:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header")
    magic, count, height, width = struct.unpack(">4I", data[:16])
    if magic != IDX_IMAGES_MAGIC or len(data) - 16 != count * height * width:
        raise DataError(f"{path} is not an IDX file of {count} images of {height}x{width} bytes "
                        f"(magic {magic}, expected {IDX_IMAGES_MAGIC}; {len(data) - 16} payload bytes)")
    pixels = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, 1, height, width)
    return torch.from_numpy(pixels.copy())


def folder_images(root: Path, preprocess: Preprocess, limit: int | None = None) -> torch.Tensor:
    """Every image file under root/test (or root), resized for the model: float [N, 3, S, S] in [0, 1]."""
    directory = root / "test" if (root / "test").is_dir() else root
    files = image_files(directory)
    if not files:
        raise DataError(f"no image files under {directory}")
    return resize_batch(files[:limit] if limit else files, preprocess)
