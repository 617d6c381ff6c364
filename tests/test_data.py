"""training.data: Fashion-MNIST IDX reader, digits split, image folders, few-shot subsets."""
from __future__ import annotations

import gzip
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guard.errors import DataError, InputError
from guard.preprocess import Preprocess
from training.data import (DIGITS_CLASSES, FASHION_MNIST_CLASSES, ImageDataset, few_shot,
                           load_dataset)

REAL_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_ENV = "CLIP_GUARD_FASHION_MNIST_DIR"


# --- Fashion-MNIST, real files ------------------------------------------------------------

@pytest.fixture
def real_fashion(monkeypatch):
    monkeypatch.delenv(FASHION_ENV, raising=False)
    if not REAL_FASHION_DIR.is_dir():
        if os.environ.get("CLIP_GUARD_REQUIRE_DATA") == "1":
            pytest.fail(f"{REAL_FASHION_DIR} is missing and CLIP_GUARD_REQUIRE_DATA=1: "
                        f"apt-get install dataset-fashion-mnist")
        pytest.skip(f"{REAL_FASHION_DIR} absent (apt-get install dataset-fashion-mnist)")


@pytest.mark.parametrize("split, count", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_real_files(real_fashion, split, count):
    data = load_dataset("fashion-mnist", split, image_size=224)  # image_size is ignored
    assert len(data) == count
    assert data.images.shape == (count, 1, 28, 28)
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    assert data.classes == FASHION_MNIST_CLASSES and len(data.classes) == 10
    assert data.classes[0] == "t-shirt" and data.classes[9] == "ankle boot"
    assert data.labels.min() == 0 and data.labels.max() == 9
    assert data.labels.bincount().tolist() == [count // 10] * 10
    assert int(data.images.max()) == 255 and int(data.images.min()) == 0


def test_fashion_mnist_cache_cannot_be_corrupted(real_fashion):
    first = load_dataset("fashion-mnist", "test")
    original = first.images[:5].clone(), first.labels[:5].clone()
    first.images.zero_()
    first.labels.fill_(3)
    again = load_dataset("fashion-mnist", "test")
    assert torch.equal(again.images[:5], original[0])
    assert torch.equal(again.labels[:5], original[1])


# --- Fashion-MNIST, synthetic IDX files ---------------------------------------------------

def write_idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes) -> None:
    header = struct.pack(f">{1 + len(shape)}I", magic, *shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + payload)


def write_fashion(directory: Path, images: np.ndarray, labels: np.ndarray,
                  prefix: str = "train") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", 2051, images.shape, images.tobytes())
    write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels.shape, labels.tobytes())


def random_fashion(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n, dtype=np.uint8))


def test_fashion_mnist_synthetic_files_load(tmp_path, monkeypatch):
    images, labels = random_fashion(7)
    test_images, test_labels = random_fashion(3, seed=1)
    write_fashion(tmp_path, images, labels, "train")
    write_fashion(tmp_path, test_images, test_labels, "t10k")
    monkeypatch.setenv(FASHION_ENV, str(tmp_path))
    train = load_dataset("fashion-mnist", "train")
    assert train.images.shape == (7, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), images)
    assert train.labels.tolist() == labels.tolist() and train.labels.dtype == torch.int64
    test = load_dataset("fashion-mnist", "test")
    assert np.array_equal(test.images[:, 0].numpy(), test_images)
    assert test.labels.tolist() == test_labels.tolist()


def test_fashion_mnist_cache_is_keyed_on_directory_and_files(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    write_fashion(first, *random_fashion(4, seed=0))
    write_fashion(second, *random_fashion(6, seed=1))
    monkeypatch.setenv(FASHION_ENV, str(first))
    assert len(load_dataset("fashion-mnist", "train")) == 4
    monkeypatch.setenv(FASHION_ENV, str(second))
    assert len(load_dataset("fashion-mnist", "train")) == 6
    write_fashion(second, *random_fashion(9, seed=2))  # replaced in place
    assert len(load_dataset("fashion-mnist", "train")) == 9


def test_fashion_mnist_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_ENV, str(tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", "test")
    assert "t10k-images-idx3-ubyte.gz" in str(info.value) and FASHION_ENV in str(info.value)


def corrupt_cases():
    images, labels = random_fashion(5)
    good_images = (2051, images.shape, images.tobytes())
    good_labels = (2049, labels.shape, labels.tobytes())
    return {
        "bad image magic": ((2049, images.shape, images.tobytes()), good_labels, "images", "magic"),
        "bad label magic": (good_images, (2051, labels.shape, labels.tobytes()), "labels", "magic"),
        "truncated images": ((2051, images.shape, images.tobytes()[:-10]), good_labels,
                             "images", "payload"),
        "truncated labels": (good_images, (2049, labels.shape, labels.tobytes()[:-1]),
                             "labels", "payload"),
        "count mismatch": (good_images, (2049, (4,), labels[:4].tobytes()), "labels", "4 labels"),
        "wrong image size": ((2051, (5, 14, 56), images.tobytes()), good_labels, "images", "14x56"),
        "label out of range": (good_images, (2049, labels.shape, bytes([0, 1, 2, 3, 10])),
                               "labels", "out of range"),
    }


@pytest.mark.parametrize("case", sorted(corrupt_cases()))
def test_fashion_mnist_corrupt_idx(tmp_path, monkeypatch, case):
    image_spec, label_spec, culprit, message = corrupt_cases()[case]
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", *image_spec)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", *label_spec)
    monkeypatch.setenv(FASHION_ENV, str(tmp_path))
    with pytest.raises(DataError, match=message) as info:
        load_dataset("fashion-mnist", "train")
    assert f"train-{culprit}-idx" in str(info.value)


def test_fashion_mnist_not_gzip_and_too_short(tmp_path, monkeypatch):
    images, labels = random_fashion(2)
    write_fashion(tmp_path, images, labels)
    monkeypatch.setenv(FASHION_ENV, str(tmp_path))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"plain bytes, no gzip")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", "train")
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(b"\x00\x00")
    with pytest.raises(DataError, match="too short"):
        load_dataset("fashion-mnist", "train")


# --- digits -------------------------------------------------------------------------------

def rows(data: ImageDataset) -> Counter:
    return Counter(image.numpy().tobytes() + bytes([label]) for image, label in
                   zip(data.images, data.labels.tolist()))


def test_digits_split_partitions_the_data_stratified():
    from sklearn.datasets import load_digits
    full = load_digits()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (1, 8, 8) and test.images.shape[1:] == (1, 8, 8)
    assert train.classes == test.classes == DIGITS_CLASSES and DIGITS_CLASSES[3] == "three"
    # Disjoint and complete: train + test is exactly the whole data set, as a multiset.
    whole = ImageDataset("digits", torch.from_numpy(
        np.round(full.images * 255 / 16).astype(np.uint8)).unsqueeze(1),
        torch.from_numpy(full.target.astype(np.int64)), DIGITS_CLASSES)
    assert rows(train) + rows(test) == rows(whole)
    # Stratified: one third of every class (rounded) is test.
    class_sizes = np.bincount(full.target, minlength=10)
    assert test.labels.bincount(minlength=10).tolist() == [round(n / 3) for n in class_sizes]
    assert train.labels.bincount(minlength=10).tolist() == [n - round(n / 3) for n in class_sizes]


def test_digits_deterministic_and_uint8_range():
    for split in ("train", "test"):
        a, b = load_dataset("digits", split), load_dataset("digits", split, image_size=32)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.images.dtype == torch.uint8
        assert int(a.images.min()) == 0 and int(a.images.max()) == 255
        allowed = {round(v * 255 / 16) for v in range(17)}
        assert set(a.images.unique().tolist()) <= allowed


# --- image folders --------------------------------------------------------------------------

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "red_fox": (0, 0, 255)}
SIZES = [(20, 12), (9, 30), (16, 16), (40, 25), (11, 7)]


def make_folder(root: Path, per_class: int = 5) -> None:
    for name, colour in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            fmt = "png" if i % 2 == 0 else "jpg"
            Image.new("RGB", SIZES[i % len(SIZES)], colour).save(folder / f"img{i}.{fmt}")
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.png").write_bytes(b"")  # hidden: skipped although unreadable


def check_colours(data: ImageDataset) -> None:
    for image, label in zip(data.images, data.labels.tolist()):
        expected = torch.tensor(COLOURS[sorted(COLOURS)[label]]).view(3, 1, 1)
        assert (image.int() - expected).abs().max() <= 8  # JPEG is lossy


def test_image_folder_without_split_folders(tmp_path):
    make_folder(tmp_path / "animals")
    train = load_dataset(tmp_path / "animals", "train", image_size=12)
    test = load_dataset(str(tmp_path / "animals"), "test", image_size=12)
    assert train.classes == test.classes == ("cat", "dog", "red fox")
    assert train.name == "animals"
    assert train.images.shape == (12, 3, 12, 12) and test.images.shape == (3, 3, 12, 12)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.labels.bincount().tolist() == [4, 4, 4]  # 20 % of 5 per class to test
    assert test.labels.tolist() == [0, 1, 2]
    check_colours(train)
    check_colours(test)
    again = load_dataset(tmp_path / "animals", "test", image_size=12)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_image_folder_resize_matches_preprocess(tmp_path):
    folder = tmp_path / "one" / "gradient"
    folder.mkdir(parents=True)
    pixels = np.arange(30 * 18 * 3, dtype=np.int64).reshape(18, 30, 3) % 256
    Image.fromarray(pixels.astype(np.uint8)).save(folder / "a.png")
    Image.fromarray(pixels.astype(np.uint8)).save(folder / "b.png")
    data = load_dataset(tmp_path / "one", "train", image_size=10)
    source = torch.from_numpy(pixels.astype(np.uint8)).permute(2, 0, 1).unsqueeze(0)
    expected = (Preprocess(10, (0, 0, 0), (1, 1, 1)).resize(source) * 255).round().to(torch.uint8)
    assert data.images.shape == (2, 3, 10, 10)
    assert torch.equal(data.images[0], expected[0])


def test_image_folder_with_split_folders(tmp_path):
    make_folder(tmp_path / "train", per_class=4)
    make_folder(tmp_path / "test", per_class=2)
    train = load_dataset(tmp_path, "train", image_size=8)
    test = load_dataset(tmp_path, "test", image_size=8)
    assert train.classes == test.classes == ("cat", "dog", "red fox")
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.images.shape == (6, 3, 8, 8)
    check_colours(train)
    check_colours(test)


def test_image_folder_mismatched_split_classes(tmp_path):
    make_folder(tmp_path / "train", per_class=2)
    make_folder(tmp_path / "test", per_class=2)
    (tmp_path / "test" / "dog").rename(tmp_path / "test" / "wolf")
    with pytest.raises(DataError, match="different classes"):
        load_dataset(tmp_path, "test", image_size=8)


def test_image_folder_half_split_layout(tmp_path):
    make_folder(tmp_path / "train", per_class=2)
    with pytest.raises(DataError, match="no test/"):
        load_dataset(tmp_path, "train", image_size=8)


def test_image_folder_corrupt_image(tmp_path):
    make_folder(tmp_path / "animals")
    broken = tmp_path / "animals" / "dog" / "broken.png"
    broken.write_bytes(b"")
    with pytest.raises(DataError, match="broken.png"):
        # Read both splits: the broken file lands in one of them.
        load_dataset(tmp_path / "animals", "train", image_size=8)
        load_dataset(tmp_path / "animals", "test", image_size=8)


def test_image_folder_needs_image_size(tmp_path):
    make_folder(tmp_path / "animals")
    with pytest.raises(InputError, match="image_size"):
        load_dataset(tmp_path / "animals", "train")
    with pytest.raises(InputError, match="image_size"):
        load_dataset(tmp_path / "animals", "train", image_size=0)


def test_image_folder_without_classes(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(tmp_path / "empty", "train", image_size=8)


# --- few_shot ---------------------------------------------------------------------------------

def test_few_shot_counts_order_and_determinism():
    data = load_dataset("digits", "train")
    shots = few_shot(data, 5, seed=3)
    assert len(shots) == 50
    assert shots.labels.tolist() == sorted(shots.labels.tolist())
    assert shots.labels.bincount().tolist() == [5] * 10
    assert shots.classes == data.classes and shots.images.shape[1:] == (1, 8, 8)
    same = few_shot(data, 5, seed=3)
    assert torch.equal(same.images, shots.images) and torch.equal(same.labels, shots.labels)
    other = few_shot(data, 5, seed=4)
    assert other.labels.bincount().tolist() == [5] * 10
    assert not torch.equal(other.images, shots.images)
    # Every chosen image comes from the right class of the data set.
    assert not (rows(shots) - rows(data))


def test_few_shot_too_few_images():
    images = torch.zeros(7, 1, 4, 4, dtype=torch.uint8)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    data = ImageDataset("tiny", images, labels, ("alpha", "beta", "gamma"))
    assert few_shot(data, 1).labels.tolist() == [0, 1, 2]
    with pytest.raises(DataError, match=r"'beta'.* 2 images"):
        few_shot(data, 3)
    with pytest.raises(InputError):
        few_shot(data, 0)


# --- ImageDataset and load_dataset arguments ---------------------------------------------------

def test_image_dataset_subset_and_batches():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).clone()
    labels = torch.tensor([0, 1] * 5)
    data = ImageDataset("toy", images, labels, ("a", "b"))
    assert len(data) == 10
    part = data.subset([7, 2, 4])
    assert part.images[:, 0, 0, 0].tolist() == [7, 2, 4] and part.labels.tolist() == [1, 0, 0]
    assert part.name == "toy" and part.classes == ("a", "b")
    batches = list(data.batches(4))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert all(b[0].dtype == torch.uint8 for b in batches)
    assert torch.equal(torch.cat([b[0] for b in batches]), images)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)
    with pytest.raises(InputError):
        list(data.batches(0))


def test_image_dataset_validates():
    with pytest.raises(InputError):
        ImageDataset("x", torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), ("a",))
    with pytest.raises(InputError):
        ImageDataset("x", torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
                     torch.zeros(3, dtype=torch.long), ("a",))
    with pytest.raises(InputError):
        ImageDataset("x", torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
                     torch.tensor([0, 1]), ("a",))


def test_unknown_source_and_bad_split(tmp_path):
    with pytest.raises(DataError, match="fashion-mnist, digits") as info:
        load_dataset("cifar-100", "train")
    assert isinstance(info.value, ValueError)
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError):
        load_dataset(str(tmp_path / "nope"), "train", image_size=8)
    with pytest.raises(InputError, match="split"):
        load_dataset("digits", "validation")


def test_few_shot_keeps_data_set_order_within_a_class():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    labels = torch.arange(40) % 4
    data = ImageDataset("indexed", images, labels, ("a", "b", "c", "d"))
    shots = few_shot(data, 6, seed=11)
    positions = shots.images.flatten().long()
    assert torch.equal(labels[positions], shots.labels)  # images travel with their labels
    for label in range(4):
        chosen = positions[shots.labels == label].tolist()
        assert len(chosen) == 6 and chosen == sorted(chosen) and len(set(chosen)) == 6
