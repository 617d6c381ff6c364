"""Offline reference data sets: Fashion-MNIST, scikit-learn's digits, and image folders.

Every data set is an `ImageDataset` of uint8 images at their stored size (image folders
are brought to one size when loaded); the model's `Preprocess` resizes and normalizes
them later. Nothing here downloads anything:

- "fashion-mnist": the gzipped IDX files of Debian's `dataset-fashion-mnist` package in
  /usr/share/datasets/fashion-mnist/, or in the directory named by the environment
  variable CLIP_GUARD_FASHION_MNIST_DIR. Official split, 60,000 train / 10,000 test.
- "scenes": the reference benchmark's downstream task (training/scenes.py): Fashion-MNIST
  test objects composited into 56 px scenes, 5,000 train / 5,000 test.
- "digits": `sklearn.datasets.load_digits` (1,797 images of 8x8). It has no official split,
  so a fixed one is used: one third of each class (rounded), drawn with seed 0, is "test".
- a directory: one sub-folder per class. With DIR/train and DIR/test, those are the
  splits; otherwise 20 % of each class (rounded), drawn with seed 0, is "test".
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from guard.errors import DataError, InputError, MissingDependencyError
from guard.idx import FASHION_MNIST_ENV, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, fashion_mnist_dir, read_idx
from guard.inputs import image_files
from guard.preprocess import Preprocess

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
DIGITS_CLASSES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)

SPLITS = ("train", "test")
BUILTIN_SOURCES = ("scenes", "fashion-mnist", "digits")
# What a --data option accepts, for every command's help.
DATA_HELP = ", ".join(BUILTIN_SOURCES) + " or an image folder (one sub-folder per class)"

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_SIDE = 28

DIGITS_TEST_FRACTION = 1 / 3
FOLDER_TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images kept as uint8 [N, C, H, W] (C = 1 grayscale or 3 RGB) to save memory,
    labels int64 [N] indexing `classes` (prompt-friendly class names)."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self):
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise InputError(f"images must be uint8 [N, 1 or 3, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.ndim != 1 or len(labels) != len(images):
            raise InputError(f"labels must be int64 [N] with N = {len(images)} images, got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise InputError(f"labels must lie in 0..{len(self.classes) - 1}, got "
                             f"{int(labels.min())}..{int(labels.max())}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageDataset":
        """The images at `indices` (in that order), as a new data set of the same name."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return ImageDataset(self.name, self.images[index], self.labels[index], self.classes)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) of `batch_size` items in data set order, no shuffling;
        the last batch may be smaller. The tensors are views into the data set."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


def load_dataset(source: str | os.PathLike, split: str, *,
                 image_size: int | None = None) -> ImageDataset:
    """source: "fashion-mnist", "digits" or an image-folder directory; split: "train" or "test".

    image_size is required for image folders (each image is resized and centre-cropped to
    image_size x image_size with the model's `Preprocess.resize`); the built-in data sets
    ignore it and keep their native size."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    name = os.fspath(source)
    if name == "scenes":
        from .scenes import load_downstream  # scenes composites Fashion-MNIST objects loaded here

        return load_downstream(split)
    if name == "fashion-mnist":
        return _load_fashion_mnist(split)
    if name == "digits":
        return _load_digits(split)
    if Path(name).is_dir():
        return _load_image_folder(Path(name), split, image_size)
    raise DataError(f"unknown data source {name!r}: use one of {', '.join(BUILTIN_SOURCES)} "
                    f"or the path of an image-folder directory (one sub-folder per class)")


def few_shot(dataset: ImageDataset, shots: int, seed: int = 0) -> ImageDataset:
    """Exactly `shots` images of every class, ordered by class (and by position within a
    class). The choice is drawn with a torch.Generator seeded with `seed`, so it is the
    same for the same data set and seed."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise InputError(f"shots must be a positive integer, got {shots!r}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label, class_name in enumerate(dataset.classes):
        members = (dataset.labels == label).nonzero().flatten()
        if len(members) < shots:
            raise DataError(f"class {class_name!r} of {dataset.name!r} has {len(members)} "
                            f"images, fewer than the {shots} shots asked for")
        picked = members[torch.randperm(len(members), generator=generator)[:shots]]
        chosen.append(picked.sort().values)
    index = torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)
    return dataset.subset(index)


def _stratified_split(labels: torch.Tensor, test_fraction: float, split: str) -> torch.Tensor:
    """Sorted indices of `split`: round(test_fraction * n) of each class's n items go to
    "test", drawn with a generator seeded with SPLIT_SEED; the rest are "train"."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for label in torch.unique(labels, sorted=True):
        members = (labels == label).nonzero().flatten()
        n_test = round(len(members) * test_fraction)
        is_test[members[torch.randperm(len(members), generator=generator)[:n_test]]] = True
    keep = is_test if split == "test" else ~is_test
    return keep.nonzero().flatten()


# --- Fashion-MNIST ---------------------------------------------------------------------

def _load_fashion_mnist(split: str) -> ImageDataset:
    directory = fashion_mnist_dir()
    paths = [directory / name for name in _FASHION_FILES[split]]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST files missing in {directory}: {', '.join(missing)}. "
                        f"Run `apt-get install dataset-fashion-mnist`, or set {FASHION_MNIST_ENV} "
                        f"to a directory holding the gzipped IDX files")
    # The file sizes and mtimes are part of the cache key, so replaced files are re-read.
    stamp = tuple((path.stat().st_size, path.stat().st_mtime_ns) for path in paths)
    images, labels = _read_fashion_mnist(str(directory.resolve()), split, stamp)
    # Clones: the cached tensors stay intact whatever callers do to theirs.
    return ImageDataset("fashion-mnist", images.clone(), labels.clone(), FASHION_MNIST_CLASSES)


@functools.lru_cache(maxsize=8)
def _read_fashion_mnist(directory: str, split: str, stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    image_file, label_file = (Path(directory) / name for name in _FASHION_FILES[split])
    log.debug("parsing Fashion-MNIST %s from %s", split, directory)
    images = read_idx(image_file, IDX_IMAGES_MAGIC, 3)
    labels = read_idx(label_file, IDX_LABELS_MAGIC, 1)
    if images.shape[1:] != (_FASHION_SIDE, _FASHION_SIDE):
        raise DataError(f"{image_file}: images are {images.shape[1]}x{images.shape[2]}, "
                        f"Fashion-MNIST's are {_FASHION_SIDE}x{_FASHION_SIDE}")
    if len(images) != len(labels):
        raise DataError(f"{image_file} holds {len(images)} images but {label_file} holds "
                        f"{len(labels)} labels")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{label_file}: label {int(labels.max())} out of range "
                        f"0..{len(FASHION_MNIST_CLASSES) - 1}")
    return (torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))


# --- digits ----------------------------------------------------------------------------

def _load_digits(split: str) -> ImageDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise MissingDependencyError("the digits data set needs scikit-learn: "
                                     "pip install 'clip-guard[training]'") from error
    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * 255.0 / 16.0).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    index = _stratified_split(labels, DIGITS_TEST_FRACTION, split)
    return ImageDataset("digits", images[index], labels[index], DIGITS_CLASSES)


# --- image folders ---------------------------------------------------------------------

def _load_image_folder(root: Path, split: str, image_size: int | None) -> ImageDataset:
    if image_size is None:
        raise InputError(f"image folder {root}: pass image_size, the side every image is "
                         f"resized to so that images of different sizes can be stacked")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise InputError(f"image_size must be a positive integer, got {image_size!r}")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        raise DataError(f"image folder {root} has a {'train' if has_train else 'test'}/ "
                        f"sub-folder but no {'test' if has_train else 'train'}/ one")
    if has_train:
        folders = _class_folders(root / "train")
        other = _class_folders(root / "test")
        if [f.name for f in folders] != [f.name for f in other]:
            raise DataError(f"image folder {root}: train/ and test/ have different classes: "
                            f"{[f.name for f in folders]} vs {[f.name for f in other]}")
        if split == "test":
            folders = other
        files, labels = _image_files(folders)
    else:
        folders = _class_folders(root)
        files, labels = _image_files(folders)
        if any(labels.count(label) == 0 for label in range(len(folders))):
            empty = [f.name for label, f in enumerate(folders) if labels.count(label) == 0]
            raise DataError(f"image folder {root}: class folders without images: {empty}")
        index = _stratified_split(torch.tensor(labels, dtype=torch.long),
                                  FOLDER_TEST_FRACTION, split).tolist()
        files, labels = [files[i] for i in index], [labels[i] for i in index]
    log.debug("reading %d images of %s (%s)", len(files), root, split)
    resize = Preprocess(image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).resize
    images = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    for i, path in enumerate(files):
        images[i] = (resize(_read_image(path)) * 255.0).round_().to(torch.uint8)[0]
    classes = tuple(folder.name.replace("_", " ") for folder in folders)
    return ImageDataset(root.name, images, torch.tensor(labels, dtype=torch.long), classes)


def _class_folders(directory: Path) -> list[Path]:
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"image folder {directory} has no class sub-folders")
    return folders


def _image_files(folders: list[Path]) -> tuple[list[Path], list[int]]:
    """guard.inputs.image_files of each class folder, with the class index as label."""
    files, labels = [], []
    for label, folder in enumerate(folders):
        found = image_files(folder)
        files.extend(found)
        labels.extend([label] * len(found))
    return files, labels


def _read_image(path: Path) -> torch.Tensor:
    """uint8 [1, 3, H, W]."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).unsqueeze(0)
