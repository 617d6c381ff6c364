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

import os
from pathlib import Path

import torch

from guard.errors import DataError, InputError
from guard.idx import FASHION_MNIST_ENV, IDX_IMAGES_MAGIC, fashion_mnist_dir, read_idx
from guard.inputs import image_files, resize_batch
from guard.preprocess import Preprocess

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_TEST_IMAGES = "t10k-images-idx3-ubyte.gz"  # training.data's test split reads the same file


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
    path = fashion_mnist_dir() / FASHION_MNIST_TEST_IMAGES
    if not path.is_file():
        raise DataError(f"{path} is missing: run `apt-get install dataset-fashion-mnist`, or set "
                        f"{FASHION_MNIST_ENV} to a directory holding the gzipped IDX files")
    return torch.from_numpy(read_idx(path, IDX_IMAGES_MAGIC, 3).copy()).unsqueeze(1)


def folder_images(root: Path, preprocess: Preprocess, limit: int | None = None) -> torch.Tensor:
    """Every image file under root/test (or root), resized for the model: float [N, 3, S, S] in [0, 1]."""
    directory = root / "test" if (root / "test").is_dir() else root
    files = image_files(directory)
    if not files:
        raise DataError(f"no image files under {directory}")
    return resize_batch(files[:limit] if limit else files, preprocess)
