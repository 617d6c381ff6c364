"""Fashion-MNIST's files: gzipped IDX arrays of unsigned bytes, and where they are installed.

training.data reads its splits from them and export.parity its test images; guard is the
layer both build on, so the one reader lives here (serving never calls it).
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

FASHION_MNIST_ENV = "CLIP_GUARD_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def fashion_mnist_dir() -> Path:
    """$CLIP_GUARD_FASHION_MNIST_DIR if set, else Debian's install directory."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR)


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes with `ndim` dimensions, as a uint8 array."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a readable gzip file: {error}") from error
    header_size = 4 * (1 + ndim)
    if len(data) < header_size:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header")
    found_magic, *shape = struct.unpack(f">{1 + ndim}I", data[:header_size])
    if found_magic != magic:
        raise DataError(f"{path}: IDX magic number {found_magic}, expected {magic}")
    if ndim > 1 and 0 in shape[1:]:
        raise DataError(f"{path}: IDX dimensions {shape} contain a zero")
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header_size != expected:
        raise DataError(f"{path}: payload of {len(data) - header_size} bytes, the IDX header "
                        f"{shape} announces {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)
